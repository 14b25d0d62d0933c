"""geolie.losses.lie_penalty: its value is the audit's Lie derivative, "random" is unbiased, its parameter gradient
agrees with finite differences, Orb's equigrad is a special case, and training with it lowers the held-out Lie
derivative."""
import numpy as np
import pytest
import torch

import geolie
from geolie.adapters import Structure, TorchAdapter
from geolie.losses import lie_penalty
from geolie.models import CartesianMLPPotential

FRAMES = geolie.data.load("xtb-md/ethanol", "test")
EF = {"energy": "scalar", "forces": "vector"}


class PointMLP(torch.nn.Module):
    """An unconstrained per-atom MLP on centred coordinates: translation invariant, not rotation invariant."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, z, pos, batch=None):
        return self.net(pos - pos.mean(0)).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("group", ["SO3", "SE3"])
def test_value_equals_the_audit_lie_derivative(dtype, group):
    ev = TorchAdapter(CartesianMLPPotential()).evaluation(Structure.from_atoms(FRAMES[0]), dtype)
    p = lie_penalty(ev.fn, ev.inputs, group=group, in_rep=ev.in_rep, out_rep=ev.out_rep, generators="all")
    rep = geolie.measure(ev, group=group, floor=False)
    d = 3 if group == "SO3" else 6
    expected = sum(float((o.abs[0] ** 2).sum()) for o in rep.outputs.values()) / d
    assert float(p) == pytest.approx(expected, rel=1e-10 if dtype == torch.float64 else 1e-4)
    rel = lie_penalty(ev.fn, ev.inputs, group=group, in_rep=ev.in_rep, out_rep=ev.out_rep, generators="all",
                      relative=True, weights={"energy": 2.0})
    expected_rel = sum((2.0 if n == "energy" else 1.0) * float((o.rel[0] ** 2).sum())
                       for n, o in rep.outputs.items()) / d
    assert float(rel) == pytest.approx(expected_rel, rel=1e-10 if dtype == torch.float64 else 1e-4)


def test_random_directions_are_unbiased():
    ev = TorchAdapter(CartesianMLPPotential()).evaluation(Structure.from_atoms(FRAMES[0]), torch.float64)
    kw = dict(in_rep=ev.in_rep, out_rep=ev.out_rep)
    full = float(lie_penalty(ev.fn, ev.inputs, generators="all", **kw))
    g = torch.Generator().manual_seed(0)
    draws = np.array([float(lie_penalty(ev.fn, ev.inputs, generator=g, **kw)) for _ in range(300)])
    assert abs(draws.mean() - full) <= 4 * draws.std() / np.sqrt(len(draws))


def test_parameter_gradient_agrees_with_finite_differences():
    torch.manual_seed(0)
    m = PointMLP().double()
    a = FRAMES[0]
    x = (torch.as_tensor(a.positions), torch.as_tensor(a.numbers))
    f = geolie.conservative(lambda p, z: m(z, p), as_dict=True)  # forces too: a third derivative of the energy
    kw = dict(group="SE3", in_rep=("point", None), out_rep=EF, generators="all")
    lie_penalty(f, x, **kw).backward()
    params = [p for p in m.parameters()]
    # the last bias shifts the energy only: no derivative sees it (no gradient)
    grads = torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten() for p in params])
    for k in torch.argsort(grads.abs(), descending=True)[:4].tolist():
        for p in params:  # the parameter holding flat index k
            if k < p.numel():
                break
            k -= p.numel()
        h = 1e-6
        with torch.no_grad():
            p.view(-1)[k] += h
            up = float(lie_penalty(f, x, **kw))
            p.view(-1)[k] -= 2 * h
            down = float(lie_penalty(f, x, **kw))
            p.view(-1)[k] += h
        assert float(p.grad.view(-1)[k]) == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_orb_equigrad_is_a_special_case():
    m = CartesianMLPPotential().double()
    a = FRAMES[1]
    z, pos = torch.as_tensor(a.numbers), torch.as_tensor(a.positions)
    G = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    E = m(z, pos @ torch.linalg.matrix_exp(G - G.T).T).sum()
    equigrad = torch.autograd.grad(E, G)[0].norm()  # Orb: ‖∂E/∂G‖ at G = 0
    f = geolie.conservative(lambda p, zz: m(zz, p).sum(), as_dict=True)
    p = lie_penalty(f, (pos, z), group="SO3", in_rep=("point", None), out_rep=EF, generators="all",
                    weights={"energy": 1.0, "forces": 0.0})
    assert float(equigrad) ** 2 == pytest.approx(6 * float(p), rel=1e-10)


def test_training_with_the_penalty_lowers_the_held_out_lie_derivative():
    """PointMLP fitted to GFN2-xTB energies of 8 ethanol frames (80 Adam steps, fixed seeds), with and without the
    penalty (λ = 300, one random direction per structure and step); held out: 4 other frames. Measured: 5.6x lower."""
    train, held = FRAMES[:8], FRAMES[8:12]
    e0 = float(np.mean([a.get_potential_energy() for a in train]))

    def run(lam):
        torch.manual_seed(0)
        m = PointMLP().double()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(80):
            loss = 0
            for a in train:
                x = (torch.as_tensor(a.positions), torch.as_tensor(a.numbers))
                f = lambda p, z: m(z, p)  # noqa: E731
                loss = loss + (f(*x) - (a.get_potential_energy() - e0)) ** 2 / len(train)
                if lam:
                    loss = loss + lam * lie_penalty(f, x, in_rep=("point", None), generator=g) / len(train)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return np.mean([float(lie_penalty(lambda p, z: m(z, p), (torch.as_tensor(a.positions),
                                                                   torch.as_tensor(a.numbers)),
                                          in_rep=("point", None), generators="all")) for a in held])

    assert run(0.0) / run(300.0) > 3.0


def test_bad_arguments():
    ev = TorchAdapter(CartesianMLPPotential()).evaluation(Structure.from_atoms(FRAMES[0]), torch.float64)
    with pytest.raises(ValueError, match="generators must be"):
        lie_penalty(ev.fn, ev.inputs, in_rep=ev.in_rep, out_rep=ev.out_rep, generators="some")
    with pytest.raises(ValueError, match=r"weights name outputs \['dipole'\]"):
        lie_penalty(ev.fn, ev.inputs, in_rep=ev.in_rep, out_rep=ev.out_rep, weights={"dipole": 1.0})
