import pytest
import torch

import geolie
from geolie import SE3, as_rep

REPS = ["scalar", "vector", "pseudovector", "point", "tensor2", "2x0e+1x1o+1x1e+2x2e+1x3o"]


def _sample(rep, g):
    r = as_rep(rep)
    if isinstance(r, geolie.Tensor2Rep):
        return torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    if isinstance(r, geolie.IrrepsRep):
        return torch.randn(4, r.irreps.dim, generator=g, dtype=torch.float64)
    return torch.randn(4, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", REPS)
@pytest.mark.parametrize("centered", [False, True])
def test_infinitesimal_is_derivative_of_finite_action(name, centered):
    """dρ(X_k) x = d/dt ρ(exp(t X_k)) x, by central differences (error ~ h² = 1e-10)."""
    g = torch.Generator().manual_seed(0)
    rep = as_rep(name)
    x = _sample(name, g)
    c = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64) if centered else None
    omega, v = SE3.algebra_basis()
    inf = rep.infinitesimal(x, omega, v, c if isinstance(rep, geolie.PointRep) else None)
    h = 1e-5
    for k in range(6):
        xi = torch.zeros(6, dtype=torch.float64)
        xi[k] = h
        Rp, tp = SE3.exp(xi)
        Rm, tm = SE3.exp(-xi)
        cc = c if isinstance(rep, geolie.PointRep) else None
        fd = (rep.act(x, Rp, tp, cc) - rep.act(x, Rm, tm, cc)) / (2 * h)
        assert torch.allclose(inf[k], fd, atol=1e-9), (name, k)


def test_action_is_a_homomorphism():
    g = torch.Generator().manual_seed(1)
    R = geolie.SO3.random(2, g)
    for name in REPS:
        rep = as_rep(name)
        x = _sample(name, g)
        assert torch.allclose(rep.act(rep.act(x, R[1]), R[0]), rep.act(x, R[0] @ R[1]), atol=1e-12), name


def test_parity():
    x = torch.randn(2, 3, dtype=torch.float64)
    inv = -torch.eye(3, dtype=torch.float64)
    assert torch.allclose(as_rep("vector").act(x, inv), -x)
    assert torch.allclose(as_rep("pseudovector").act(x, inv), x)
    assert torch.allclose(as_rep("point").act(x, inv), -x)
    s = torch.randn(3, 3, dtype=torch.float64)
    assert torch.allclose(as_rep("stress").act(s, inv), s)
    y = torch.randn(2, 1 + 3 + 3, dtype=torch.float64)
    out = as_rep("0e+1o+1e").act(y, inv)
    assert torch.allclose(out, torch.cat([y[:, :1], -y[:, 1:4], y[:, 4:]], -1))
    assert as_rep("vector").parity_sign() == -1 and as_rep("1e").parity_sign() == 1


def test_irreps_1o_is_vector():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    R = geolie.SO3.random(1, g)[0]
    assert torch.allclose(as_rep("1x1o").act(x, R), as_rep("vector").act(x, R), atol=1e-14)
    omega, v = SE3.algebra_basis()
    assert torch.allclose(as_rep("1o").infinitesimal(x, omega, v), as_rep("vector").infinitesimal(x, omega, v))


def test_aliases_and_errors():
    assert isinstance(as_rep(None), geolie.ScalarRep)
    assert isinstance(as_rep("cell"), geolie.VectorRep) and isinstance(as_rep("stress"), geolie.Tensor2Rep)
    with pytest.raises(ValueError, match="unknown representation 'vektor'"):
        as_rep("vektor")
    with pytest.raises(ValueError, match=r"trailing dimensions \[3\]"):
        as_rep("vector").check(torch.zeros(4, 2), "input x")
    with pytest.raises(ValueError, match=r"trailing dimensions \[3, 3\]"):
        as_rep("tensor2").check(torch.zeros(4, 3), "output")
    with pytest.raises(TypeError):
        geolie.register_rep("bad", object())


def test_register_custom_rep():
    class Doubled(geolie.VectorRep):
        name = "doubled"

    geolie.register_rep("doubled", Doubled())
    assert "doubled" in geolie.known_reps() and as_rep("Doubled").name == "doubled"


@pytest.mark.parametrize("name", REPS)
def test_act_rows_matches_act(name):
    g = torch.Generator().manual_seed(7)
    rep = as_rep(name)
    x = _sample(name, g)
    R = geolie.SO3.random(4, g)
    R[1] = -R[1]  # an improper element too
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    rows = rep.act_rows(x, R, t)
    for i in range(4):
        assert torch.allclose(rows[i], rep.act(x[i], R[i], t[i]), atol=1e-12), (name, i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_tensor2_parts_are_orthogonal_equivariant_projections(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    p = geolie.tensor2_parts(x)
    assert set(p) == {"l=0", "l=1", "l=2"}
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(p["l=0"] + p["l=1"] + p["l=2"], x, atol=tol)
    for a, b in [("l=0", "l=1"), ("l=0", "l=2"), ("l=1", "l=2")]:
        assert float((p[a] * p[b]).sum(dim=(-1, -2)).abs().max()) < tol * 10
    assert float(p["l=2"].diagonal(dim1=-2, dim2=-1).sum(-1).abs().max()) < tol * 10  # traceless
    R = geolie.SO3.random(1, g)[0].to(dtype)
    for k, v in geolie.tensor2_parts(R @ x @ R.T).items():  # P(R x Rᵀ) = R P(x) Rᵀ
        assert torch.allclose(v, R @ p[k] @ R.T, atol=tol * 10), k
    sym = x + x.transpose(-1, -2)
    assert set(geolie.tensor2_parts(sym)) == {"l=0", "l=2"}  # symmetric to rounding: no l = 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_irreps_on_another_axis(dtype):
    """``IrrepsRep(irreps, axis=-2)`` (spherical-channel layout ``[N, dim, C]``) is the trailing-axis action on the
    transposed tensor: finite action, rows and infinitesimal action; its infinitesimal action is the derivative of
    its finite one (central differences, error ~ h²); shapes are checked on that axis."""
    g = torch.Generator().manual_seed(3)
    last, mid = geolie.IrrepsRep("0e+1o+2e"), geolie.IrrepsRep("0e+1o+2e", axis=-2)
    x = torch.randn(5, 9, 4, generator=g, dtype=torch.float64).to(dtype)
    R = geolie.SO3.random(1, g)[0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(mid.act(x, R), last.act(x.transpose(-1, -2), R).transpose(-1, -2), atol=tol)
    Rs = geolie.SO3.random(5, g)
    assert torch.allclose(mid.act_rows(x, Rs), last.act_rows(x.transpose(-1, -2), Rs).transpose(-1, -2), atol=tol)
    omega, v = geolie.SO3.algebra_basis(dtype=torch.float64)
    inf = mid.infinitesimal(x, omega, v)
    assert torch.allclose(inf, last.infinitesimal(x.transpose(-1, -2), omega, v).transpose(-1, -2), atol=tol)
    h, x64 = 1e-5, x.double()
    for k in range(3):
        xi = torch.zeros(3, dtype=torch.float64)
        xi[k] = h
        fd = (mid.act(x64, geolie.SO3.exp(xi)) - mid.act(x64, geolie.SO3.exp(-xi))) / (2 * h)
        assert torch.allclose(mid.infinitesimal(x64, omega, v)[k], fd, atol=1e-9)
    assert mid.name == "1x0e+1x1o+1x2e on dim -2"
    with pytest.raises(ValueError, match="dimension -2 of size 9"):
        mid.check(x.transpose(-1, -2), "features")
    with pytest.raises(ValueError, match="counts from the end"):
        geolie.IrrepsRep("1o", axis=1)
