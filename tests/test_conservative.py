import numpy as np
import pytest
import torch

import geolie
from geolie import lie_derivative, lie_energy_from_forces
from geolie.models import CartesianMLPPotential, PairMLPPotential
from conftest import TOL, rel_err
from test_lie_derivative import cloud, periodic_energy


def test_forces_are_minus_gradient(dtype):
    m = PairMLPPotential().to(dtype)
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    x = cloud(dtype=dtype)
    e, f = geolie.conservative(lambda p: m(z, p))(x)
    p = x.clone().requires_grad_(True)
    g = torch.autograd.grad(m(z, p).sum(), p)[0]
    assert rel_err(f, -g) <= TOL[dtype]


def test_stress_matches_finite_strain():
    """σ = (1/V) dE/dε by central differences of the strained cell (float64, error ~ h² ≈ 1e-12)."""
    g = torch.Generator().manual_seed(3)
    cell = torch.eye(3, dtype=torch.float64) * 3 + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    pos = torch.rand(4, 3, generator=g, dtype=torch.float64) @ cell
    e, f, s = geolie.conservative(periodic_energy)(pos, cell=cell)
    h = 1e-6
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] += h / 2
            eps[b, a] += h / 2
            F1, F2 = torch.eye(3, dtype=torch.float64) + eps, torch.eye(3, dtype=torch.float64) - eps
            fd[a, b] = (periodic_energy(pos @ F1.T, cell @ F1.T) - periodic_energy(pos @ F2.T, cell @ F2.T)) / (2 * h)
    fd /= torch.linalg.det(cell).abs()
    assert rel_err(s, fd) < 1e-8
    assert torch.allclose(s, s.T, atol=1e-14)


@pytest.mark.parametrize("model", ["pair", "cartesian"])
@pytest.mark.parametrize("about", ["origin", "centroid"])
def test_energy_identity_from_forces(model, about, dtype):
    """L_{r_k} E = -Σ F·(X_k (x - c)), L_{t_k} E = -Σ F_k: the cheap diagnostic equals the direct derivative."""
    m = (PairMLPPotential() if model == "pair" else CartesianMLPPotential(anisotropy=0.5)).to(dtype)
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    x = cloud(dtype=dtype)
    ef = geolie.conservative(lambda p: m(z, p))
    L = lie_derivative(ef, x, out_rep=("scalar", "vector"), about=about)
    e, f = ef(x)
    ident = lie_energy_from_forces(x, f, about=about)
    scale = float(f.detach().double().norm() * x.double().norm())  # the size of the terms summed in the identity
    assert float((ident - L[0].reshape(-1)).abs().max()) <= 10 * TOL[dtype] * scale


def test_energy_identity_batched():
    m = CartesianMLPPotential(anisotropy=0.5).double()
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7, 8, 8])
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    x = cloud(9)
    ef = geolie.conservative(lambda p: m(z, p, batch))
    L = lie_derivative(ef, x, out_rep=("scalar", "vector"))
    ident = lie_energy_from_forces(x, ef(x)[1], batch=batch)
    assert ident.shape == (6, 2) and rel_err(ident, L[0]) < 1e-12


def test_conservative_bad_input():
    ef = geolie.conservative(lambda p: p.sum())
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        ef(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"cell must have shape \[3, 3\]"):
        ef(torch.zeros(3, 3), cell=torch.zeros(3))
    with pytest.raises(ValueError, match="both have shape"):
        lie_energy_from_forces(torch.zeros(3, 3), torch.zeros(2, 3))


class _StressHead(torch.nn.Module):
    """``E = c V² + Σ_{i<j} morse(r_ij)`` (atoms of one cell, no images: rotation and strain are what matter here) and
    its own stress head ``σ = (1/V) ∂E/∂ε`` by autograd, plus ``delta · I`` (a planted non-conservative part)."""

    def __init__(self, delta=0.0):
        super().__init__()
        self.delta = delta

    def energy(self, pos, cell):
        i, j = torch.triu_indices(len(pos), len(pos), 1)
        r = (pos[j] - pos[i]).norm(dim=-1)
        return 1e-4 * torch.linalg.det(cell) ** 2 + (0.2 * (1 - torch.exp(-1.5 * (r - 2.5))) ** 2).sum()

    def forward(self, z, pos, batch, cell):
        eps = torch.zeros(3, 3, dtype=pos.dtype, requires_grad=True)
        strain = torch.eye(3, dtype=pos.dtype) + 0.5 * (eps + eps.T)
        e = self.energy(pos @ strain.T, cell @ strain.T)
        s = torch.autograd.grad(e, eps, create_graph=True)[0] / torch.linalg.det(cell).abs()
        return {"energy": self.energy(pos, cell).reshape(1), "stress": s + self.delta * torch.eye(3, dtype=pos.dtype)}


def test_stress_gap_conservative_head_and_planted_part():
    """A stress head that is the energy's strain derivative: gap at rounding (< 1e-13); with ``δ I`` added: the gap
    is ``‖δ I‖ / ‖σ + δ I‖`` exactly (closed form); the audit reports it (rows, table, CSV column)."""
    from ase.build import bulk

    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=2)
    pos, cell = torch.tensor(cu.positions), torch.tensor(cu.cell.array)
    z, b = torch.tensor(cu.numbers), torch.zeros(len(cu), dtype=torch.long)
    fn = lambda p, zz, c: _StressHead()(zz, p, b, c)  # noqa: E731
    assert geolie.stress_gap(fn, (pos, z, cell)) < 1e-13
    delta = 1e-3
    fn2 = lambda p, zz, c: _StressHead(delta)(zz, p, b, c)  # noqa: E731
    s = fn2(pos, z, cell)["stress"].detach()
    assert geolie.stress_gap(fn2, (pos, z, cell)) == pytest.approx(delta * np.sqrt(3) / float(s.norm()), rel=1e-10)
    rep = geolie.audit(_StressHead(delta), [cu], dtype=torch.float64, n_finite=1, progress=False)
    assert rep.rows[0]["conservative"]["stress_gap_rel"] == pytest.approx(delta * np.sqrt(3) / float(s.norm()),
                                                                          rel=1e-10)
    assert "stress - (1/V) dE/dstrain" in rep.table()
    exact = geolie.audit(_StressHead(), [cu], dtype=torch.float64, n_finite=1, progress=False)
    assert exact.rows[0]["conservative"]["stress_gap_rel"] < 1e-13
