"""Torch models audited through the outputs they return: direct forces, conservativeness, periodic cells with stress,
declared extra outputs, and the adjoint test catching a wrong forward-mode formula. Closed forms throughout."""
import csv
import itertools

import numpy as np
import pytest
import torch

import geolie
from geolie.adapters import Structure, TorchAdapter

MOL = geolie.data.load("xtb-md/ethanol", "test")[0]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
X = geolie.hat(torch.eye(3, dtype=torch.float64))  # X[k] is the generator of rotations about axis k


def pair_energy(pos):
    d = (pos[:, None] - pos[None]).pow(2).sum(-1)
    iu = torch.triu_indices(pos.shape[0], pos.shape[0], 1)
    return torch.exp(-d[iu[0], iu[1]] / 2.0).sum()


class DirectForce(torch.nn.Module):
    """Invariant pair energy and a force head ``F_i = W x_i + b`` of absolute coordinates (a direct-force model)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.head = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(3, 3, generator=g))
            self.head.bias.copy_(torch.randn(3, generator=g))

    def forward(self, z, pos, batch=None):
        return {"energy": pair_energy(pos).reshape(1), "forces": self.head(pos)}


class Harmonic(torch.nn.Module):
    """``E = k/2 Σ|x_i − c|²`` about the centroid with an analytic force head ``−k (x_i − c)`` (exactly −∇E) plus
    ``c_rot · W (x_i − c)`` with ``W`` antisymmetric (a rotational, non-conservative term) when ``curl > 0``."""

    def __init__(self, k=1.3, curl=0.0):
        super().__init__()
        self.k, self.curl = k, curl

    def forward(self, z, pos, batch=None):
        r = pos - pos.mean(0)
        e = 0.5 * self.k * r.pow(2).sum()
        f = -self.k * r + self.curl * r @ X[2].to(r).T
        return {"energy": e.reshape(1), "forces": f}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_direct_force_head_is_audited_at_its_closed_form(dtype):
    model = DirectForce()
    pot = TorchAdapter(model)
    st = Structure.from_atoms(MOL)
    ev = pot.evaluation(st, dtype)
    assert ev.sources == {"energy": "model", "forces": "model"}
    rep = geolie.measure(ev)
    L = rep.lie[1].double()  # forces: [6, N, 3]
    x = torch.as_tensor(st.positions)
    W, b = model.head.weight.double().detach(), model.head.bias.double().detach()
    for k in range(3):  # L_{r_k} F_i = W X x_i − X (W x_i + b)
        expected = x @ X[k].T @ W.T - (x @ W.T + b) @ X[k].T
        assert torch.allclose(L[k], expected, rtol=0, atol=TOL[dtype] * float(expected.abs().max()) * 10)
    for k in range(3):  # L_{t_k} F_i = W e_k
        assert torch.allclose(L[3 + k], W[:, k].expand_as(L[3 + k]), atol=TOL[dtype] * 10)
    assert rep.outputs["forces"].rel.max() > 0.1 and not rep.outputs["forces"].at_floor.any()
    # the audit flags it, says where the forces came from, and reports them far from -dE/dx
    a = geolie.audit(model, [MOL], dtype=dtype, n_finite=1, progress=False)
    row = a.rows[0]
    assert row["outputs"]["forces"]["source"] == "model"
    assert not any(row["outputs"]["forces"]["at_floor"])
    assert all(row["outputs"]["energy"]["at_floor"])  # the pair energy is invariant
    assert row["conservative"]["force_gap_rel"] > 0.5
    assert row["finite"]["forces"]["rotation"] > 1e-2


def test_force_head_equal_to_minus_gradient_is_reported_conservative():
    rep = geolie.audit(Harmonic(), [MOL], n_finite=1, progress=False)
    c = rep.rows[0]["conservative"]
    assert c["force_gap_rel"] < 1e-14 and c["jacobian_asym_rel"] < 1e-14
    for o in rep.rows[0]["outputs"].values():
        assert all(o["at_floor"])


def test_non_conservative_head_reports_its_closed_form_mismatch():
    k, curl = 1.3, 0.4
    pot = TorchAdapter(Harmonic(k, curl))
    st = Structure.from_atoms(MOL)
    ev = pot.evaluation(st, torch.float64)
    r = torch.as_tensor(st.positions) - torch.as_tensor(st.positions).mean(0)
    F = -k * r + curl * r @ X[2].T
    gap = float((curl * r @ X[2].T).norm() / F.norm())  # F + dE/dx = curl W r
    c = geolie.conservativeness(ev.fn, ev.inputs, n_probes=400)
    assert c["force_gap_rel"][0] == pytest.approx(gap, rel=1e-12)
    # J = −k (I − 11ᵀ/N) ⊗ I₃ + curl (I − 11ᵀ/N) ⊗ W: antisymmetric part curl (P ⊗ W); with Gaussian probes
    # E‖(P⊗W)v‖² = curl² (N−1) ‖W‖_F² and E‖Jv‖² = (N−1)(3k² + curl² ‖W‖_F²), ‖W_z‖_F² = 2
    n = len(st.numbers)
    expected = np.sqrt(curl ** 2 * 2 / (3 * k ** 2 + curl ** 2 * 2))
    assert c["jacobian_asym_rel"][0] == pytest.approx(expected, rel=0.1)  # Hutchinson, 400 probes
    assert n > 1


class WrongJvpCube(torch.autograd.Function):
    """``x³`` with the right backward and a forward-mode formula off by a factor 2 (a planted bug)."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 6 * x * x * t


class WrongJvpModel(torch.nn.Module):
    """Pair energy through :class:`WrongJvpCube` plus a planted lab-frame term ``0.1 Σ x_i,z``; with
    ``direct=True`` also a direct force head (so the audit takes the forward-mode path, not the HVP one)."""

    def __init__(self, direct=False):
        super().__init__()
        self.direct = direct

    def forward(self, z, pos, batch=None):
        d = (pos[:, None] - pos[None]).pow(2).sum(-1)
        e = (WrongJvpCube.apply(torch.exp(-d / 4)).sum() + 0.1 * pos[:, 2].sum()).reshape(1)
        if not self.direct:
            return e
        return {"energy": e, "forces": torch.tanh(pos)}


def test_adjoint_test_catches_a_wrong_forward_formula_and_falls_back(tmp_path):
    pos = torch.as_tensor(MOL.positions)
    with pytest.warns(geolie.GeolieADCheckWarning, match=r"jvp-loop failed its adjoint test .*output.*[0-9]e-0[0-2]"):
        L = geolie.lie_derivative(lambda p: WrongJvpModel()(None, p), pos, method="jvp", out_rep="scalar")
    ref = geolie.lie_derivative(lambda p: WrongJvpModel()(None, p), pos, method="double-backward", out_rep="scalar")
    assert torch.allclose(L, ref, rtol=0, atol=1e-13)
    # closed form of the planted term: L_{r_k} (0.1 Σ z_i) = 0.1 Σ (X_k x_i)_z; L_{t_z} = 0.1 N
    assert L[5, 0] == pytest.approx(0.1 * len(pos), rel=1e-12)
    for k in range(3):
        assert L[k, 0] == pytest.approx(float(0.1 * (pos @ X[k].T)[:, 2].sum()), rel=1e-10, abs=1e-13)
    # the audit: the warning names the structure and output, report.json and the CSV record it
    with pytest.warns(geolie.GeolieADCheckWarning, match=r"structure 0 .*jvp-loop failed.*output\['energy'\]"):
        rep = geolie.audit(WrongJvpModel(direct=True), [MOL], n_finite=0, progress=False, out_dir=str(tmp_path))
    row = rep.rows[0]
    assert row["method"] == "double-backward" and any("adjoint test" in n for n in row["notes"])
    assert rep.rows[0]["outputs"]["energy"]["abs"][5] == pytest.approx(0.1 * len(pos), rel=1e-12)
    assert all(o["ad_check"] <= 1e-9 for o in row["outputs"].values())
    assert any("adjoint test" in n for n in rep.to_dict()["notes"])
    with open(tmp_path / "structures.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["output"] for r in rows} == {"energy", "forces"}
    assert all("adjoint test" in r["ad_fallback"] and float(r["ad_check"]) <= 1e-9 for r in rows)


def test_undeclared_and_declared_extra_outputs():
    class WithDipole(torch.nn.Module):
        def forward(self, z, pos, batch=None):
            q = torch.where(z == 1, 0.4, -0.3).to(pos)
            return {"energy": pair_energy(pos).reshape(1), "dipole": (q[:, None] * pos).sum(0)}

    with pytest.raises(ValueError, match=r"\['dipole'\].*not declared"):
        geolie.audit(WithDipole(), [MOL], n_finite=0, progress=False)
    rep = geolie.audit(TorchAdapter(WithDipole(), out_rep={"dipole": "vector"}), [MOL], n_finite=1, progress=False)
    o = rep.rows[0]["outputs"]
    assert set(o) == {"energy", "dipole", "forces"} and o["forces"]["source"] == "-dE/dx (geolie)"
    assert all(o["dipole"]["at_floor"][:3])  # Σ q x rotates as a vector
    Q = float(np.where(MOL.numbers == 1, 0.4, -0.3).sum())
    assert np.allclose(o["dipole"]["abs"][3:], abs(Q), rtol=1e-12)  # L_{t_k} μ = Q e_k


# -- periodic ----------------------------------------------------------------------------------------------------
SHIFTS = torch.tensor(list(itertools.product(range(-2, 3), repeat=3)), dtype=torch.float64)


class PeriodicPair(torch.nn.Module):
    """``E = ½ Σ_{i,j,S} exp(−|x_j + S·cell − x_i|² / 0.64)`` over lattice shifts ``S ∈ {−2..2}³`` (no self term),
    optionally plus a uniform external field on charges ``q_i = 0.5 + (i mod 2)``: ``−Σ q_i f·x_i``."""

    def __init__(self, field=None):
        super().__init__()
        self.field = None if field is None else torch.as_tensor(field, dtype=torch.float64)

    def forward(self, z, pos, batch, cell):
        S = SHIFTS.to(pos) @ cell  # [27, 3]
        d = pos[None, :, None] + S[:, None, None] - pos[None, None, :]  # x_j + S − x_i: [S, j, i, 3]
        r2 = d.pow(2).sum(-1)
        self_term = (SHIFTS.abs().sum(-1) == 0).to(pos)[:, None, None] * torch.eye(len(pos)).to(pos)[None]
        e = 0.5 * (torch.exp(-r2 / 0.64) * (1 - self_term)).sum()
        if self.field is not None:
            q = 0.5 + (torch.arange(len(pos)) % 2).to(pos)
            e = e - (q[:, None] * pos * self.field.to(pos)).sum()
        return e.reshape(1)


CRYSTAL = geolie.data.load("emt-bulk", "test")[1]  # Al4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_periodic_exact_model_sits_at_its_floor(dtype):
    rep = geolie.audit(PeriodicPair(), [CRYSTAL], dtype=dtype, n_finite=2, progress=False)
    row = rep.rows[0]
    assert set(row["outputs"]) == {"energy", "forces", "stress", "stress[l=0]", "stress[l=2]"}
    assert row["outputs"]["stress"]["source"] == "strain derivative (geolie)"
    assert row["outputs"]["stress"]["rep"] == "tensor2"
    for name, o in row["outputs"].items():
        assert all(o["at_floor"]), (name, o["rel"], o["floor_rel"])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for fam in ("rotation", "translation", "permutation"):  # finite translations wrap atoms back into the cell
        assert row["finite"]["stress"][fam] < tol and row["finite"]["forces"][fam] < tol, fam


def test_periodic_stress_matches_ase_convention_by_finite_strain():
    pot = TorchAdapter(PeriodicPair())
    st = Structure.from_atoms(CRYSTAL)
    out = pot.evaluation(st, torch.float64).fn(*pot.evaluation(st, torch.float64).inputs)
    m = PeriodicPair()
    pos, cell = torch.as_tensor(st.positions), torch.as_tensor(st.cell)
    h, V = 1e-5, abs(float(torch.linalg.det(cell)))
    for a, b in [(0, 0), (0, 1), (2, 1)]:
        eps = torch.zeros(3, 3, dtype=torch.float64)
        eps[a, b] = eps[b, a] = h / 2 if a != b else h
        ep = float(m(None, pos @ (torch.eye(3) + eps).T.double(), None, cell @ (torch.eye(3) + eps).T.double()))
        em = float(m(None, pos @ (torch.eye(3) - eps).T.double(), None, cell @ (torch.eye(3) - eps).T.double()))
        # an off-diagonal strain moves (a, b) and (b, a) by h/2 each: dE = σ_ab V h either way
        assert float(out["stress"][a, b]) == pytest.approx((ep - em) / (2 * h) / V, rel=1e-6, abs=1e-9)


def test_periodic_lab_frame_field_at_its_closed_form():
    f = np.array([0.3, -0.2, 0.5])
    rep = geolie.audit(PeriodicPair(f), [CRYSTAL], n_finite=0, progress=False)
    o = rep.rows[0]["outputs"]
    st = Structure.from_atoms(CRYSTAL)
    x, V = st.positions, abs(np.linalg.det(st.cell))
    q = 0.5 + (np.arange(len(x)) % 2)
    M, Q = (q[:, None] * x).sum(0), q.sum()
    Xn = X.numpy()
    sym = lambda A: 0.5 * (A + A.T)  # noqa: E731
    e_rot = [abs(-f @ (Xn[k] @ M)) for k in range(3)]
    assert np.allclose(o["energy"]["abs"], e_rot + [abs(Q * f[k]) for k in range(3)], rtol=1e-10)
    f_rot = [np.linalg.norm(-(q[:, None] * f) @ Xn[k].T) for k in range(3)]
    assert np.allclose(o["forces"]["abs"][:3], f_rot, rtol=1e-8)  # the pair part is exactly equivariant
    assert max(o["forces"]["abs"][3:]) < 1e-10
    L_rot = [sym(Xn[k] @ np.outer(f, M)) / V for k in range(3)]
    L_tr = [-Q * sym(np.outer(f, np.eye(3)[k])) / V for k in range(3)]
    assert np.allclose(o["stress"]["abs"], [np.linalg.norm(L) for L in L_rot + L_tr], rtol=1e-8)
    # by irreducible part: l = 0 is the trace's third times I, l = 2 the rest (stress is symmetric: no l = 1)
    assert "stress[l=1]" not in o
    tr = [np.trace(L) / 3 * np.eye(3) for L in L_rot + L_tr]
    assert np.allclose(o["stress[l=0]"]["abs"], [np.linalg.norm(t) for t in tr], rtol=1e-8, atol=1e-14)
    assert np.allclose(o["stress[l=2]"]["abs"], [np.linalg.norm(L - t) for L, t in zip(L_rot + L_tr, tr)],
                       rtol=1e-8, atol=1e-14)


def test_periodic_model_without_cell_argument_is_refused():
    with pytest.raises(ValueError, match="periodic structures need forward"):
        geolie.audit(DirectForce(), [CRYSTAL], n_finite=0, progress=False)


def test_float32_constants_in_a_float64_copy_are_named():
    class Consts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.table = torch.tensor([0.1, 0.2, 0.3])  # a plain attribute: .to(float64) leaves it float32

        def forward(self, z, pos, batch=None):
            return (pair_energy(pos) + (self.w.sum() * self.table.to(pos)).sum() * 0).reshape(1)

    rep = geolie.audit(Consts(), [MOL], n_finite=0, progress=False)
    assert any("table (float32)" in n and "does not cast" in n for n in rep.notes())


class PeriodicPairData(torch.nn.Module):
    """:class:`PeriodicPair` called PyG style, ``forward(data)`` with ``data.cell [1, 3, 3]``; records the largest
    fractional coordinate it was given (finite translations must hand it wrapped atoms)."""

    def __init__(self):
        super().__init__()
        self.inner = PeriodicPair()
        self.max_frac = 0.0

    def forward(self, data):
        cell = data.cell[0]
        frac = data.pos.detach() @ torch.linalg.inv(cell.detach())
        self.max_frac = max(self.max_frac, float(frac.max()))
        return self.inner(data.z, data.pos, data.batch, cell)


def test_pyg_data_input_with_cell_and_wrapped_translations():
    model = PeriodicPairData()
    rep = geolie.audit(model, [CRYSTAL], n_finite=3, progress=False)
    row = rep.rows[0]
    assert set(row["outputs"]) == {"energy", "forces", "stress", "stress[l=0]", "stress[l=2]"}
    assert all(all(o["at_floor"]) for o in row["outputs"].values())
    assert row["finite"]["energy"]["translation"] < 1e-10
    ev = TorchAdapter(model).evaluation(Structure.from_atoms(CRYSTAL), torch.float64)
    model.max_frac = 0.0
    far = geolie.finite_equivariance_error(ev, n=2, box=50.0, generator=torch.Generator().manual_seed(1))
    assert model.max_frac < 1.0 + 1e-9  # translated atoms came back into the cell
    assert far.errors["stress"]["translation"]["max_rel"] < 1e-10
    with pytest.raises(ValueError, match="wrap=True needs"):
        geolie.finite_equivariance_error(lambda p: p.sum(), torch.ones(3, 3), wrap=True)


def test_pyg_models_get_the_pyg_adapter_also_inside_a_wrapper():
    from geolie.adapters import PyGAdapter, load_model
    from geolie.adapters.pyg import schnet

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = schnet(hidden_channels=16, num_interactions=1)

        def forward(self, z, pos, batch=None):
            return 2.0 * self.inner(z, pos, batch)

    assert isinstance(load_model("schnet"), PyGAdapter)
    pot = load_model(Wrapped())
    assert isinstance(pot, PyGAdapter)
    assert not isinstance(load_model(DirectForce()), PyGAdapter)
    rep = geolie.audit(pot, [MOL], n_finite=0, progress=False)  # runs on geolie's radius_graph
    assert all(all(o["at_floor"]) for o in rep.rows[0]["outputs"].values())
