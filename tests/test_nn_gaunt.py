"""Gaunt tensor products: grid = Fourier = dense = e3nn's CG product on the even paths; equivariance; degrees > 12."""
import math

import pytest
import torch
from e3nn import o3

import geolie
from geolie.nn import GauntTensorProduct, gaunt_coefficients
from geolie.nn.spherical_harmonics import wigner_3j_float64, spherical_harmonics
from conftest import TOL, rel_err

CONFIGS = [
    ("3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e+3x3o+3x4e"),
    ("2x0e+2x1o+2x1e+2x2e", "1x0e+1x1o+1x2e", "2x0e+2x1o+2x1e+2x2e+2x2o+2x3o"),  # parity split, shared in2
    ("1x0o+1x1e+1x2o", "1x0e+1x1o", "1x0o+1x1e+1x2o+1x3e"),  # pseudoscalar signal
]


def _inputs(ir1, ir2, dtype, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, o3.Irreps(ir1).dim, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(n, o3.Irreps(ir2).dim, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_three_methods_agree(cfg, dtype):
    x, y = _inputs(cfg[0], cfg[1], dtype)
    outs = {}
    for m in ("dense", "grid", "fourier"):
        tp = GauntTensorProduct(*cfg, method=m).to(dtype)
        with torch.no_grad():
            for w in (tp.w1, tp.w2, tp.w3):
                w.copy_(torch.linspace(0.5, 1.5, w.numel()).reshape(w.shape))
        outs[m] = tp(x, y)
    assert outs["dense"].abs().max() > 0.1
    assert rel_err(outs["grid"], outs["dense"]) <= TOL[dtype]
    assert rel_err(outs["fourier"], outs["dense"]) <= TOL[dtype]


@pytest.mark.parametrize("l1,l2,l3", [(0, 0, 0), (1, 1, 0), (1, 1, 2), (2, 1, 3), (2, 2, 2), (3, 2, 1), (4, 3, 3)])
def test_gaunt_is_a_path_constant_times_clebsch_gordan(l1, l2, l3):
    """G = c C with |c| = sqrt((2l1+1)(2l2+1)(2l3+1)/4π) |(l1 l2 l3; 0 0 0)| (e3nn's C has unit norm)."""
    G = gaunt_coefficients(l1, l2, l3)
    C = wigner_3j_float64(l1, l2, l3)
    c = float((G * C).sum())
    assert float((G - c * C).abs().max()) < 1e-14
    # (l1 l2 l3; 0 0 0)^2 from Racah's closed form
    J = l1 + l2 + l3
    f = math.factorial
    tj2 = (f(J - 2 * l1) * f(J - 2 * l2) * f(J - 2 * l3) / f(J + 1)
           * (f(J // 2) / (f(J // 2 - l1) * f(J // 2 - l2) * f(J // 2 - l3))) ** 2)
    assert abs(abs(c) - math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1) / (4 * math.pi) * tj2)) < 1e-13


def test_odd_paths_vanish():
    assert float(gaunt_coefficients(1, 1, 1).abs().max()) < 1e-15
    assert float(gaunt_coefficients(2, 1, 2).abs().max()) < 1e-15


def test_matches_e3nn_tensor_product_on_even_paths():
    ir1, ir2, ir3 = o3.Irreps("2x0e+2x1o+2x2e"), o3.Irreps("2x0e+2x1o+2x2e"), o3.Irreps("2x0e+2x1o+2x2e+2x3o")
    instr = []
    for i1, (_, a) in enumerate(ir1):
        for i2, (_, b) in enumerate(ir2):
            for i3, (_, c) in enumerate(ir3):
                if (a.l + b.l + c.l) % 2 == 0 and abs(a.l - b.l) <= c.l <= a.l + b.l:
                    G, C = gaunt_coefficients(a.l, b.l, c.l), wigner_3j_float64(a.l, b.l, c.l)
                    instr.append(((i1, i2, i3, "uuu", True, 1.0), float((G * C).sum())))
    torch.set_default_dtype(torch.float64)
    try:  # the path constants go in as weights (e3nn takes the square root of path_weight, losing the sign)
        ref = o3.TensorProduct(ir1, ir2, ir3, [i for i, _ in instr], irrep_normalization="none",
                               path_normalization="none", internal_weights=True)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([c for _, c in instr for _ in range(2)], dtype=torch.float64))
    x, y = _inputs(str(ir1), str(ir2), torch.float64)
    ours = GauntTensorProduct(ir1, ir2, ir3, method="grid").double()
    assert rel_err(ours(x, y), ref(x, y)) < 1e-12


@pytest.mark.parametrize("method", ["grid", "fourier", "dense"])
def test_equivariance_lie_and_finite(method, dtype):
    cfg = CONFIGS[1]
    tp = GauntTensorProduct(*cfg, method=method).to(dtype)
    x, y = _inputs(cfg[0], cfg[1], dtype)
    L = geolie.lie_derivative(tp, (x, y), group="SO3", in_rep=cfg[:2], out_rep=cfg[2])
    assert float(L.norm() / tp(x, y).norm()) <= 10 * TOL[dtype]
    fin = geolie.finite_equivariance_error(tp, (x, y), group="SO3", in_rep=cfg[:2], out_rep=cfg[2], n=3,
                                           parity=True)
    assert fin.max_rel() <= 10 * TOL[dtype]


@pytest.mark.parametrize("method", ["grid", "fourier", "dense"])
def test_gradients(method):
    cfg = ("1x0e+1x1o+1x2e", "1x0e+1x1o", "1x0e+1x1o+1x2e")
    tp = GauntTensorProduct(*cfg, method=method).double()
    x, y = _inputs(cfg[0], cfg[1], torch.float64, n=2)
    assert torch.autograd.gradcheck(lambda a, b: tp(a, b), (x.requires_grad_(), y.requires_grad_()))
    tp(x, y).pow(2).sum().backward()
    assert tp.w1.grad is not None and tp.w3.grad.abs().sum() > 0


def test_cross_product_is_refused():
    with pytest.raises(ValueError, match="cross product"):
        GauntTensorProduct("1x1o", "1x1o", "1x1e")
    with pytest.raises(ValueError, match="same multiplicity"):
        GauntTensorProduct("2x0e+1x1o", "1x0e", "2x0e")
    with pytest.raises(ValueError, match="method must be"):
        GauntTensorProduct("1x0e", "1x0e", "1x0e", method="fft")


def test_beyond_e3nn_degree_24():
    """L1 = L2 = 12, Lout = 24 (e3nn's harmonics stop at 12): grid = Fourier, and exactly equivariant."""
    ir = "+".join(f"1x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(13))
    ir_out = "+".join(f"1x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(25))
    x, y = _inputs(ir, ir, torch.float64, n=2)
    grid = GauntTensorProduct(ir, ir, ir_out, method="grid").double()
    four = GauntTensorProduct(ir, ir, ir_out, method="fourier").double()
    z = grid(x, y)
    assert rel_err(four(x, y), z) < 1e-12
    L = geolie.lie_derivative(grid, (x, y), group="SO3", in_rep=(ir, ir), out_rep=ir_out)
    assert float(L.norm() / z.norm()) < 1e-12
    assert float(z[:, -49:].norm()) > 1e-3  # degree 24 is really produced
    # the harmonics beyond 12 are orthonormal
    from geolie.nn.spherical_harmonics import gauss_legendre_grid, minimal_grid

    pts, w = gauss_legendre_grid(*minimal_grid(48))
    Y = spherical_harmonics(24, pts)
    assert float(((Y * w[:, None]).T @ Y - torch.eye(625, dtype=torch.float64)).abs().max()) < 1e-12


def test_resolution_override_aliases():
    cfg = CONFIGS[0]
    x, y = _inputs(cfg[0], cfg[1], torch.float64)
    exact = GauntTensorProduct(*cfg).double()(x, y)
    coarse = GauntTensorProduct(*cfg, resolution=(3, 5)).double()(x, y)
    assert rel_err(coarse, exact) > 1e-3
    assert GauntTensorProduct(*cfg).resolution == (5, 9)  # D = 2 + 2 + 4 = 8


def test_compile_and_dtype_moves():
    cfg = ("2x0e+2x1o", "2x0e+2x1o", "2x0e+2x1o+2x2e")
    tp = GauntTensorProduct(*cfg, method="grid")
    x, y = _inputs(cfg[0], cfg[1], torch.float32)
    ref = tp(x, y)
    compiled = torch.compile(tp)
    assert torch.allclose(compiled(x, y), ref, atol=1e-5)
    assert tp.double().B1.dtype == torch.float64


def test_cpu_chunking_is_exact(dtype):
    """The grid method runs in batch chunks on the CPU (cache-sized intermediates): values, gradients and the
    second derivatives used by forces/Hessian-vector products equal the one-pass result."""
    cfg = CONFIGS[1]
    x, y = _inputs(cfg[0], cfg[1], dtype, n=37, seed=3)
    x = x.reshape(37, 1, -1).expand(37, 2, -1).clone()  # two leading dimensions
    y = y.reshape(37, 1, -1).expand(37, 2, -1).clone()
    tp = GauntTensorProduct(*cfg).to(dtype)

    def run(chunk_bytes):
        tp.chunk_bytes = chunk_bytes
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        z = tp(xr, yr)
        gx, = torch.autograd.grad((z ** 2).sum(), xr, create_graph=True)
        hx, = torch.autograd.grad(gx.sum(), yr)
        return z, gx, hx

    row = tp.l1.mul * max(len(tp.l1.signals), len(tp.l2.signals)) * tp.n_grid * x.element_size()
    assert tp._chunk_rows(x, y) is None  # small batch: one pass
    tp.chunk_bytes = 5 * row
    assert tp._chunk_rows(x, y) == 5  # 74 rows -> 15 chunks
    one, chunked = run(0), run(5 * row)
    for a, b in zip(one, chunked):
        assert a.shape == b.shape and a.abs().max() > 0
        assert rel_err(b, a) <= TOL[dtype]
    # broadcasting leading dimensions is one pass
    assert tp._chunk_rows(x, y[:1]) is None
