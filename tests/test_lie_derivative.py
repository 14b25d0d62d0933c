"""The Lie derivative engine against exact equivariance, closed forms and independent numerical routes.

Tolerances: float64 results match closed forms (or zero, relative to the output scale) to 1e-12; float32 results
to 2e-5 relative (a few hundred float32 round-offs), see ``conftest.TOL``.
"""

import warnings

import numpy as np
import pytest
import torch
from e3nn import o3

import geolie
from geolie import SE3, SO3, hat, lie_derivative
from conftest import TOL, rel_err

W = hat(torch.eye(3, dtype=torch.float64))  # X_x, X_y, X_z


def cloud(n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).to(dtype)


def scale_of(t):
    return float(t.detach().double().norm())


# ------------------------------------------------------------------------------------------------ references
def lj_energy(pos):
    d = pos[:, None] - pos[None]
    n = pos.shape[0]
    r2 = (d * d).sum(-1) + torch.eye(n, dtype=pos.dtype)
    inv6 = (1.0 / r2) ** 3
    return 0.5 * ((4 * (inv6 * inv6 - inv6)) * (1 - torch.eye(n, dtype=pos.dtype))).sum()


def periodic_energy(pos, cell):
    """Gaussian pair potential over the 27 nearest images (smooth, invariant under joint rotations)."""
    shifts = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3).to(pos)
    img = shifts @ cell  # [27, 3]
    d = pos[None, :, None, :] + img[:, None, None, :] - pos[None, None, :, :]  # [27, N, N, 3]
    r2 = (d * d).sum(-1)
    return 0.5 * (torch.exp(-r2)).sum() - 0.5 * pos.shape[0]  # drop the self term (image 0, i = j)


def test_equivariant_spherical_harmonics(dtype):
    irreps = "1x0e+1x1o+1x2e+1x3o"
    x = cloud(dtype=dtype)
    f = lambda p: o3.spherical_harmonics(irreps, p, normalize=False)  # noqa: E731
    L = lie_derivative(f, x, group=SO3, out_rep=irreps)
    assert L.shape == (3, 7, 16)
    assert scale_of(L) / scale_of(f(x)) <= TOL[dtype]


def test_equivariant_tensor_product(dtype):
    torch.set_default_dtype(torch.float64)  # e3nn builds its CG buffers in the default dtype
    try:
        tp = o3.FullyConnectedTensorProduct("2x1o", "1x1o+1x2e", "2x0e+2x1e+1x2e+1x3o").to(dtype)
    finally:
        torch.set_default_dtype(torch.float32)
    x = cloud(dtype=dtype)

    def f(p):
        d = p[1:] - p[:-1]  # displacement vectors: translation invariant
        a = torch.cat([d, d.roll(1, 0)], -1)
        b = o3.spherical_harmonics("1o+2e", d.roll(2, 0), normalize=True)
        return tp(a, b)

    L = lie_derivative(f, x, group=SE3, out_rep=tp.irreps_out)
    assert L.shape == (6, 6, tp.irreps_out.dim)
    assert scale_of(L) / scale_of(f(x)) <= TOL[dtype]


def test_equivariant_pair_potential_energy_forces(dtype):
    x = cloud(dtype=dtype) * 1.2
    ef = geolie.conservative(lj_energy)
    e, f = ef(x)
    L = lie_derivative(ef, x, out_rep=("scalar", "vector"))
    assert L[0].shape == (6,) and L[1].shape == (6, 7, 3)
    assert scale_of(L[0]) / scale_of(e) <= 10 * TOL[dtype]
    assert scale_of(L[1]) / scale_of(f) <= 10 * TOL[dtype]


def test_equivariant_periodic_stress(dtype):
    g = torch.Generator().manual_seed(3)
    cell = (torch.eye(3, dtype=torch.float64) * 3 + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64))
    pos = (torch.rand(4, 3, generator=g, dtype=torch.float64) @ cell).to(dtype)
    cell = cell.to(dtype)
    ef = geolie.conservative(periodic_energy)
    out = lambda p, c: ef(p, cell=c)  # noqa: E731
    e, f, s = out(pos, cell)
    L = lie_derivative(out, (pos, cell), in_rep=("point", "cell"), out_rep=("scalar", "vector", "stress"))
    assert L[2].shape == (6, 3, 3)
    for Li, yi in zip(L, (e, f, s)):
        assert scale_of(Li) / scale_of(yi) <= 10 * TOL[dtype]
    # rotating only the positions (the cell held fixed) is NOT a symmetry: the stress derivative is then nonzero
    L2 = lie_derivative(lambda p: ef(p, cell=cell), pos, out_rep=("scalar", "vector", "stress"))
    assert scale_of(L2[2]) / scale_of(s) > 1e-3


# ------------------------------------------------------------------------------------------------ closed forms
def test_closed_form_linear_map(dtype):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = cloud()
    f = lambda p: p @ A.to(p).T  # noqa: E731
    L = lie_derivative(f, x.to(dtype), group=SE3, in_rep="point", out_rep="vector")
    for k in range(3):
        expected = x @ (A @ W[k] - W[k] @ A).T
        assert rel_err(L[k], expected) <= TOL[dtype]
    for k in range(3):
        assert rel_err(L[3 + k], A[:, k].expand(7, 3)) <= TOL[dtype]


def test_closed_form_external_field(dtype):
    field = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    q = torch.linspace(-1, 2, 7, dtype=torch.float64)
    x = cloud()
    ef = geolie.conservative(lambda p: lj_energy(p) * 0 - (q.to(p)[:, None] * p * field.to(p)).sum())
    L = lie_derivative(ef, x.to(dtype), out_rep=("scalar", "vector"))
    F = q[:, None] * field
    for k in range(3):
        assert rel_err(L[0][k], -(q[:, None] * (x @ W[k].T) * field).sum()) <= TOL[dtype]
        assert rel_err(L[1][k], -(F @ W[k].T)) <= TOL[dtype]
        assert rel_err(L[0][3 + k], -(q * field[k]).sum()) <= TOL[dtype]
    assert float(L[1][3:].abs().max()) == 0.0


def test_closed_form_anisotropic_pair_term(dtype):
    n_axis = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    x = cloud()

    def energy(p):
        d = p[:, None] - p[None]
        return 0.5 * ((d @ n_axis.to(p)) ** 2).sum()

    L = lie_derivative(energy, x.to(dtype), group=SE3)
    d = x[:, None] - x[None]
    for k in range(3):
        expected = 0.5 * (2 * (d @ n_axis) * ((d @ W[k].T) @ n_axis)).sum()
        assert rel_err(L[k], expected) <= TOL[dtype]
    assert float(L[3:].abs().max()) <= TOL[dtype] * scale_of(energy(x))


def test_closed_form_irreps_valued_map(dtype):
    irreps = o3.Irreps("1x0e+1x1o+1x2e")
    g = torch.Generator().manual_seed(2)
    M = torch.randn(irreps.dim, irreps.dim, generator=g, dtype=torch.float64)
    x = cloud()
    f = lambda p: o3.spherical_harmonics(irreps, p, normalize=True) @ M.to(p).T  # noqa: E731
    L = lie_derivative(f, x.to(dtype), group=SO3, out_rep=irreps)
    G = geolie.as_rep(irreps)._generators(torch.float64, None)
    y = o3.spherical_harmonics(irreps, x, normalize=True)
    for k in range(3):
        assert rel_err(L[k], y @ (M @ G[k] - G[k] @ M).T) <= 10 * TOL[dtype]


# -------------------------------------------------------------------------------------- independent routes
def _cartesian_model(dtype):
    from geolie.models import CartesianMLPPotential

    m = CartesianMLPPotential(anisotropy=0.5).to(dtype)
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    return geolie.conservative(lambda p: m(z, p))


@pytest.mark.parametrize("method", ["double-backward", "fd"])
def test_jvp_matches_other_methods(method, dtype):
    x = cloud(dtype=dtype)
    ef = _cartesian_model(dtype)
    Lj = lie_derivative(ef, x, method="jvp", out_rep=("scalar", "vector"))
    Lm = lie_derivative(ef, x, method=method, out_rep=("scalar", "vector"))
    # double-backward: same AD derivative, rounding only. fd: float64 (~1e-10 relative) when the function takes
    # float64; this float32 module does not, so fd runs in float32 (h = 0.15) and is good to ~1e-3.
    tol = {torch.float64: 1e-12 if method != "fd" else 1e-9, torch.float32: 2e-4 if method != "fd" else 2e-3}[dtype]
    for a, b in zip(Lj, Lm):
        assert rel_err(a, b) <= tol
    if method == "fd":  # the reported error estimate is honest: it bounds the actual difference
        res = geolie.lie_result(ef, x, method="fd", out_rep=("scalar", "vector"))
        for a, b, err in zip(Lj, res.values, res.fd_error):
            assert float((a - b).double().norm()) <= 2 * float(err.double().norm()) + 1e-12
    assert scale_of(Lj[1][:3]) > 1e-3 * scale_of(ef(x)[1])  # the model really breaks rotations


def test_jvp_matches_small_finite_rotation():
    """(ρ_out(g)⁻¹ f(g x) − f(x)) / t with g = exp(t X_k): agrees to O(t)."""
    x = cloud()
    ef = _cartesian_model(torch.float64)
    L = lie_derivative(ef, x, out_rep=("scalar", "vector"))
    e0, f0 = ef(x)
    t = 1e-6
    for k in range(6):
        xi = torch.zeros(6, dtype=torch.float64)
        xi[k] = t
        R, tr = SE3.exp(xi)
        e1, f1 = ef(x @ R.T + tr)
        assert rel_err((e1 - e0) / t, L[0][k]) < 1e-4 or abs(float(L[0][k])) < 1e-12
        assert rel_err(((f1 @ R) - f0) / t, L[1][k]) < 1e-4 or scale_of(L[1][k]) < 1e-12


def test_forward_over_reverse_through_autograd_grad(dtype):
    """A model computing forces with torch.autograd.grad inside (MACE/NequIP style) is differentiated exactly."""
    from geolie.models import CartesianMLPPotential

    m = CartesianMLPPotential(anisotropy=0.5).to(dtype)
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])

    def model(pos):
        pos = pos if pos.requires_grad else pos.requires_grad_(True)
        e = m(z, pos)
        f = -torch.autograd.grad(e.sum(), pos, create_graph=True)[0]
        return {"energy": e, "forces": f}

    x = cloud(dtype=dtype)
    L = lie_derivative(model, x, method="jvp", out_rep={"energy": None, "forces": "vector"})
    Lref = lie_derivative(_cartesian_model(dtype), x, out_rep=("scalar", "vector"))
    assert rel_err(L["forces"], Lref[1]) <= 10 * TOL[dtype]
    assert rel_err(L["energy"], Lref[0]) <= 10 * TOL[dtype]


def test_numpy_and_non_differentiable_functions_use_fd():
    w = np.array([1.0, 2.0, 0.5])

    def f(p):
        a = p.detach().numpy()
        return np.sum(w * a * a)

    x = cloud()
    L = lie_derivative(f, x, method="fd", group=SO3)
    for k in range(3):
        expected = (2 * torch.as_tensor(w) * x * (x @ W[k].T)).sum()
        assert rel_err(L[k], expected) < 1e-10
    with pytest.warns(geolie.GeolieFallbackWarning, match="falling back to finite differences"):
        L2 = lie_derivative(f, x, group=SO3)
    assert rel_err(L2, L) < 1e-12


def test_fallback_warning_names_the_cause():
    x = cloud()
    f = lambda p: torch.cdist(p, p).pow(2).sum()  # noqa: E731  (cdist has no forward-mode formula)
    with pytest.warns(geolie.GeolieFallbackWarning, match="cdist"):
        L = lie_derivative(f, x)
    assert float(L.abs().max()) < 1e-8 * scale_of(f(x))
    with pytest.raises(RuntimeError, match="method='jvp'"):
        lie_derivative(f, x, method="jvp")


# --------------------------------------------------------------------------------------------- structures
def test_dict_and_tuple_outputs_and_invariant_inputs():
    x = cloud()
    z = torch.arange(7)

    def f(pos, zz):
        w = zz.to(pos)[:, None]
        return {"moment": (w * pos).sum(0), "pair": ((pos * w).sum(), pos.sum(0))}

    L = lie_derivative(f, (x, z), in_rep=("point", None),
                       out_rep={"moment": "vector", "pair": ("scalar", "vector")})
    assert set(L) == {"moment", "pair"} and isinstance(L["pair"], tuple)
    wz = z.double()[:, None]
    for k in range(3):  # moment Σ w x is equivariant under rotations about the origin
        assert float(L["moment"][k].abs().max()) < 1e-12
    for k in range(3):  # translations: moment shifts by Σw e_k, ρ_out(vector) does not undo it
        assert rel_err(L["moment"][3 + k], wz.sum() * torch.eye(3, dtype=torch.float64)[k]) < 1e-12


def test_batched_about_centroid():
    """f = Σ_i z-coordinate per graph: about the origin L_k = Σ (X_k x)_z; about each centroid it vanishes."""
    x = cloud(9)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])

    def f(pos):
        return torch.zeros(3, dtype=pos.dtype).index_add(0, batch, pos[:, 2])

    L0 = lie_derivative(f, x, group=SO3)
    for k in range(3):
        expected = torch.zeros(3, dtype=torch.float64).index_add(0, batch, (x @ W[k].T)[:, 2])
        assert rel_err(L0[k], expected) < 1e-12
    Lc = lie_derivative(f, x, group=SO3, about="centroid", batch=batch)
    assert float(Lc.abs().max()) < 1e-14
    # points as outputs are rotated back about the same centroids: the identity map is equivariant
    Lid = lie_derivative(lambda p: p * 1.0, x, group=SE3, out_rep="point", about="centroid", batch=batch)
    assert float(Lid.abs().max()) < 1e-14


def test_cells_rotate_with_positions():
    g = torch.Generator().manual_seed(4)
    cell = 3 * torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = cloud(4)
    vol = lambda p, c: torch.linalg.det(c) + 0 * p.sum()  # noqa: E731
    assert float(lie_derivative(vol, (x, cell), in_rep=("point", "cell")).abs().max()) < 1e-13
    # the cell's rows are not translated
    L = lie_derivative(lambda p, c: c, (x, cell), in_rep=("point", "cell"), out_rep="cell")
    assert float(L.abs().max()) < 1e-14


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.0, 1.0, float("nan")]]), "NaN"),
    (torch.tensor([[0.0, float("inf"), 1.0]]), "inf"),
    (torch.zeros(0, 3), "empty"),
    (torch.zeros(4, 2), r"trailing dimensions \[3\]"),
    (torch.zeros(4, 3, dtype=torch.long), "floating-point"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        lie_derivative(lambda p: p.sum(), bad)


def test_bad_declarations():
    x = cloud()
    with pytest.raises(ValueError, match="unknown representation 'spinor'"):
        lie_derivative(lambda p: p.sum(), x, in_rep="spinor")
    with pytest.raises(ValueError, match="in_rep must be a tuple of 2"):
        lie_derivative(lambda p, q: p.sum(), (x, x), in_rep="point")
    with pytest.raises(ValueError, match="x has 2 entries but in_rep has 3"):
        lie_derivative(lambda p, q: p.sum(), (x, x), in_rep=("point", None, None))
    with pytest.raises(ValueError, match=r"undeclared output\(s\) \['stress'\]"):
        lie_derivative(lambda p: {"energy": p.sum(), "stress": torch.eye(3)}, x, out_rep={"energy": None})
    with pytest.raises(ValueError, match=r"output: representation 'vector' needs trailing dimensions \[3\]"):
        lie_derivative(lambda p: p.sum(-1), x, out_rep="vector")
    with pytest.raises(ValueError, match="tuple of 2 representations"):
        lie_derivative(lambda p: (p.sum(), p), x, out_rep="scalar")
    with pytest.raises(ValueError, match="floating point"):
        lie_derivative(lambda p: (p > 0).sum(), x)
    with pytest.raises(ValueError, match="output.*NaN"):
        lie_derivative(lambda p: p.sum() * float("nan"), x)
    with pytest.raises(ValueError, match="every input invariant"):
        lie_derivative(lambda p: p.sum(), x, in_rep=None)
    with pytest.raises(ValueError, match="method must be one of"):
        lie_derivative(lambda p: p.sum(), x, method="magic")
    with pytest.raises(ValueError, match="about must be"):
        lie_derivative(lambda p: p.sum(), x, about="everywhere")


@pytest.mark.parametrize("batched", [False, True])
def test_hvp_path_matches_forward_mode(batched, dtype):
    """conservative() functions take the Hessian-vector-product path; it equals both jvp strategies."""
    from geolie.models import CartesianMLPPotential

    m = CartesianMLPPotential(anisotropy=0.5).to(dtype)
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1]) if batched else None
    ef = geolie.conservative(lambda p: m(z, p, batch) if batched else m(z, p)[0])
    x = cloud(dtype=dtype)
    res = geolie.lie_result(ef, x, out_rep=("scalar", "vector"), batch=batch)
    assert res.method == "hvp-batched"  # 7 atoms on the CPU: the batched pass (HVP_BATCHED_UP_TO)
    for method in ("jvp-loop", "jvp-vmap", "double-backward", "hvp-loop", "hvp-batched"):
        other = lie_derivative(ef, x, out_rep=("scalar", "vector"), method=method, batch=batch)
        for a, b in zip(res.values, other):
            assert a.shape == b.shape
            assert rel_err(a, b) <= 10 * TOL[dtype], method
    assert scale_of(res.values[1][:3]) > 1e-4  # a real, nonzero derivative was compared
    with pytest.raises(RuntimeError, match="hvp: needs f = geolie.conservative"):
        lie_derivative(lambda p: ef(p), x, out_rep=("scalar", "vector"), method="hvp")


def test_hvp_variant_chosen_by_measurement_per_device(monkeypatch):
    """Where no choice is recorded for the device type, the first problem times both HVP variants (twice each,
    alternating) and the faster is kept for the process; a batched pass that fails leaves the loop; a second opinion
    never comes from the same family (it would repeat the same arithmetic: a false zero floor)."""
    from geolie import _lie
    from geolie.models import CartesianMLPPotential

    m = CartesianMLPPotential(anisotropy=0.5).double()
    ef = geolie.conservative(lambda p: m(torch.tensor([1, 6, 8, 1, 6, 1, 7]), p)[0])
    x = cloud()
    ref = lie_derivative(ef, x, out_rep=("scalar", "vector"), method="hvp-loop")
    orig = _lie._jvp_hvp
    calls = []

    def spy(prob, ts, batched=False):
        calls.append(batched)
        return orig(prob, ts, batched)

    monkeypatch.setattr(_lie, "_jvp_hvp", spy)
    monkeypatch.setattr(_lie, "HVP_BATCHED_UP_TO", {})
    for faster, method in (("batched", "hvp-batched"), ("loop", "hvp")):
        monkeypatch.setattr(_lie, "_HVP_MEASURED", {})
        monkeypatch.setattr(_lie, "_timed", lambda fn, dev, f=faster: (
            (0.1 if (len(calls) % 2 == 0) == (f == "loop") else 1.0), fn()))
        calls.clear()
        res = geolie.lie_result(ef, x, out_rep=("scalar", "vector"))
        assert calls == [False, True, False, True] and res.method == method
        assert _lie.hvp_choice(x.device, x.dtype, 7) == faster == _lie.hvp_choice(x.device, x.dtype, 5)
        assert _lie.hvp_choice(x.device, x.dtype, 9) is None  # another size class: not measured yet
        for a, b in zip(res.values, ref):
            assert rel_err(a, b) <= 1e-12
        calls.clear()
        again = geolie.lie_result(ef, x, out_rep=("scalar", "vector"))  # measured once: the choice is reused
        assert calls == [faster == "batched"] and again.method == method
        second = _lie.second_opinion(res)
        assert second is not None and not second[1].startswith("hvp")

    def no_batching(prob, ts, batched=False):
        if batched:
            raise RuntimeError("no batching rule")
        return orig(prob, ts)

    monkeypatch.setattr(_lie, "_jvp_hvp", no_batching)
    monkeypatch.setattr(_lie, "_HVP_MEASURED", {})
    res = geolie.lie_result(ef, x, out_rep=("scalar", "vector"))
    assert res.method == "hvp" and _lie.hvp_choice(x.device, x.dtype, 7) == "loop"
    monkeypatch.undo()
    assert _lie.hvp_choice(x.device, x.dtype, 48) == "batched" and _lie.hvp_choice(x.device, x.dtype, 49) == "loop"


def test_forward_mode_variant_chosen_by_measurement(monkeypatch):
    """Forward mode runs the faster of the loop and the vmap, measured on the first problem per device, dtype, size
    class and function; a variant that cannot run (vmap over a model calling torch.autograd.grad) is measured out
    and not retried as a fallback; the values are those of the explicit methods."""
    from geolie import _lie

    A = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, -0.5], [0.0, -0.5, 0.5]], dtype=torch.float64)

    def field(p):  # a vector field, not equivariant: a nonzero Lie derivative
        return torch.tanh(p @ A) * (p * p).sum(-1, keepdim=True)

    def own_forces(p):  # computes its own forces, as MACE and NequIP do: vmap cannot run it
        p = p if p.requires_grad else p.clone().requires_grad_(True)
        e = ((p @ A) * p).sum()
        return -torch.autograd.grad(e, p, create_graph=True)[0]

    x = cloud()
    calls = {"loop": 0, "vmap": 0}
    loop, vmap = _lie._jvp_forward_ad, _lie._jvp_vmap

    def spy_loop(*a):
        calls["loop"] += 1
        return loop(*a)

    def spy_vmap(*a):
        calls["vmap"] += 1
        return vmap(*a)

    monkeypatch.setattr(_lie, "_jvp_forward_ad", spy_loop)
    monkeypatch.setattr(_lie, "_jvp_vmap", spy_vmap)
    monkeypatch.setattr(_lie, "_JVP_MEASURED", {})
    # measured in the order loop, vmap, loop, vmap: the vmap is timed faster
    monkeypatch.setattr(_lie, "_timed", lambda fn, dev: (0.1 if calls["loop"] > calls["vmap"] else 1.0, fn()))
    for f, expected in ((field, "jvp-vmap"), (own_forces, "jvp-loop")):
        calls.update(loop=0, vmap=0)
        res = geolie.lie_result(f, x, out_rep="vector")
        # both ran twice; or the vmap failed at once: the loop ran once, and nothing was retried
        assert calls == ({"loop": 2, "vmap": 2} if expected == "jvp-vmap" else {"loop": 1, "vmap": 1})
        assert res.method == expected
        for method in ("jvp-loop", "double-backward"):
            ref = lie_derivative(f, x, out_rep="vector", method=method)
            assert rel_err(res.values[0], ref) <= 1e-12, method
        assert scale_of(res.values[0]) > 1e-3
        calls.update(loop=0, vmap=0)
        again = geolie.lie_result(f, x, out_rep="vector")  # measured once: the choice is reused
        assert sum(calls.values()) == 1 and again.method == res.method
    assert len(_lie._JVP_MEASURED) == 2  # one entry per function


def test_hvp_path_with_dict_outputs():
    from geolie.models import CartesianMLPPotential

    m = CartesianMLPPotential(anisotropy=0.5).double()
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    ef = geolie.conservative(lambda p, zz: m(zz, p)[0], as_dict=True)
    x = cloud()
    spec = {"energy": None, "forces": "vector"}
    res = geolie.lie_result(ef, (x, z), in_rep=("point", None), out_rep=spec)
    assert res.method.startswith("hvp")
    ref = lie_derivative(ef, (x, z), in_rep=("point", None), out_rep=spec, method="jvp-loop")
    assert rel_err(res.structured()["forces"], ref["forces"]) < 1e-12


def _autograd_forces_fn(energy, skew=0.0):
    """``{"energy", "forces"}`` with forces the autograd gradient of ``energy`` (graph kept, as MACE computes them),
    declared so; ``skew`` adds a non-conservative part ``skew · (z × x)`` that the declaration then misstates."""

    def fn(pos):
        p = pos if pos.requires_grad else pos + torch.zeros((), dtype=pos.dtype, requires_grad=True)
        with torch.enable_grad():
            e = energy(p)
            f = -torch.autograd.grad(e.sum(), p, create_graph=True)[0]
        ez = torch.tensor([0.0, 0.0, 1.0], dtype=pos.dtype)
        return {"energy": e.reshape(1), "forces": f + skew * torch.linalg.cross(ez.expand_as(p), p)}

    fn._geolie_autograd_forces = ("energy", "forces")
    return fn


def _anisotropic(p):
    d = p[:, None] - p[None]
    r2 = (d ** 2).sum(-1) + torch.eye(len(p), dtype=p.dtype)
    return (torch.exp(-r2) * (1 + 0.3 * d[..., 2] ** 2)).sum() + 0.1 * (p[:, 0] * p[:, 1]).sum()


def test_hvp_forces_equals_forward_mode_and_finite_differences(dtype):
    """The forces' Jacobian used as its own transpose (one reverse pass per tangent): the same Lie derivatives as
    forward mode and finite differences on a model that breaks rotations and translations, in both dtypes."""
    pos = cloud(dtype=dtype)
    fn = _autograd_forces_fn(_anisotropic)
    kw = dict(out_rep={"energy": "scalar", "forces": "vector"})
    a = geolie.lie_result(fn, pos, method="hvp-forces", **kw)
    b = geolie.lie_derivative(fn, pos, method="jvp-loop", **kw)
    c = geolie.lie_derivative(fn, pos.double(), method="fd", **kw)
    assert a.method == "hvp-forces"
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    for k in ("energy", "forces"):
        va = a.structured()[k]
        scale = float(b[k].abs().max())
        assert scale > 1e-2  # a real break, not rounding
        assert float((va - b[k]).abs().max()) <= tol * scale
        assert float((va.double() - c[k]).abs().max()) <= max(tol, 1e-6) * scale


def test_hvp_forces_refused_where_the_forces_are_not_the_gradient():
    """Forces declared the energy's gradient but with a non-conservative part: the adjoint test (a test of the
    Jacobian's symmetry for this strategy) refuses it, says why, and forward mode gives the right values."""
    pos = cloud()
    kw = dict(out_rep={"energy": "scalar", "forces": "vector"})
    # a large skew fails the adjoint test itself; a small one (1e-5) passes it but not the symmetry to rounding
    for skew, said in ((0.05, "hvp-forces failed its adjoint test"), (1e-5, "hvp-forces not used")):
        fn = _autograd_forces_fn(_anisotropic, skew=skew)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", geolie.GeolieADCheckWarning)
            res = geolie.lie_result(fn, pos, method="auto", **kw)
        ref = geolie.lie_derivative(fn, pos, method="jvp-loop", **kw)
        assert res.method.startswith("jvp") and any(said in n for n in res.notes), (res.method, res.notes)
        assert torch.allclose(res.structured()["forces"], ref["forces"], rtol=1e-10, atol=1e-12)


def test_hvp_probe_runs_only_where_the_generators_cannot_test_the_forces(monkeypatch):
    """Away from equilibrium the generators' tangents give the forces' adjoint test non-zero sides: no probe (one
    Hessian-vector product fewer). At an equilibrium (two atoms at a pair potential's minimum: F = 0, every
    generator side 0) the probe runs. Both results pass the adjoint test."""
    import geolie._lie as L

    seen = []
    orig = L._jvp_hvp

    def spy(prob, tangents, batched=False):
        seen.append(tangents[0].shape[0])
        return orig(prob, tangents, batched)

    monkeypatch.setattr(L, "_jvp_hvp", spy)

    def energy(p):  # a pair well with its minimum at r = 1
        r = (p[0] - p[1]).norm()
        return (r - 1.0) ** 2 + 0.1 * (r - 1.0) ** 3

    fn = geolie.conservative(energy)
    kw = dict(out_rep=("scalar", "vector"), method="hvp-loop")
    generic = geolie.lie_result(fn, cloud(n=2), **kw)
    at_minimum = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.8]], dtype=torch.float64)
    eq = geolie.lie_result(fn, at_minimum, **kw)
    assert seen == [6, 7]  # six SE(3) generators; the probe only at the minimum
    assert generic.ad_check and eq.ad_check and max(eq.ad_check.values()) <= 1e-3
