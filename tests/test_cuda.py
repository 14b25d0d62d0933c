"""CUDA: the engine, the baselines and the audit run on a GPU and give the CPU's numbers.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
Every test computes the same thing on the CPU and on the GPU from the same float64 parameters and compares them at
the tolerances of conftest.TOL (float32 on the GPU is compared with TF32 off, as everywhere in geolie).
"""
import copy

import numpy as np
import pytest
import torch

import geolie
from geolie.models import E3nnPotential, GauntPotential, PairMLPPotential
from geolie.neighbors import radius_graph
from geolie.nn import FrameAveraging, GauntTensorProduct, SphericalGridNonlinearity
from conftest import TOL, rel_err
from test_lie_derivative import cloud

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
GAUNT = ("2x0e+2x1o+2x1e+2x2e", "1x0e+1x1o+1x2e", "2x0e+2x1o+2x1e+2x2e+2x2o+2x3o")  # two parities, shared in2


@pytest.mark.parametrize("method", ["grid", "fourier", "dense"])
def test_gaunt_tensor_product(method, dtype):
    from e3nn import o3

    g = torch.Generator().manual_seed(0)
    tp = GauntTensorProduct(*GAUNT, method=method)
    with torch.no_grad():
        for w in (tp.w1, tp.w2, tp.w3):
            w.copy_(0.5 + torch.rand(w.shape, generator=g))
    tp = tp.to(dtype)
    x = torch.randn(300, o3.Irreps(GAUNT[0]).dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randn(300, o3.Irreps(GAUNT[1]).dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    z = tp(x, y)
    gx, gy = torch.autograd.grad((z ** 2).sum(), (x, y))
    tpc = copy.deepcopy(tp).to(CUDA)
    assert all(b.device.type == "cuda" for b in tpc.buffers())
    xc, yc = x.detach().to(CUDA).requires_grad_(), y.detach().to(CUDA).requires_grad_()
    zc = tpc(xc, yc)
    gxc, gyc = torch.autograd.grad((zc ** 2).sum(), (xc, yc))
    assert zc.device.type == "cuda" and z.abs().max() > 0.1
    for a, b in ((zc, z), (gxc, gx), (gyc, gy)):
        assert rel_err(a.cpu(), b) <= TOL[dtype]


def test_gaunt_equivariance_and_degrees_beyond_e3nn_on_cuda():
    """Lout = 16 (past e3nn's l = 12): grid and Fourier agree on the GPU in float64 and the grid product is
    equivariant there (Lie derivative on the GPU)."""
    ir1, ir2, ir3 = "1x0e+1x1o+1x2e+1x3o+1x4e+1x5o+1x6e+1x7o+1x8e", "1x8e", "1x16e"
    g = torch.Generator().manual_seed(1)
    from e3nn import o3

    x = torch.randn(8, o3.Irreps(ir1).dim, generator=g, dtype=torch.float64).to(CUDA)
    y = torch.randn(8, o3.Irreps(ir2).dim, generator=g, dtype=torch.float64).to(CUDA)
    grid = GauntTensorProduct(ir1, ir2, ir3, method="grid").double().to(CUDA)
    four = GauntTensorProduct(ir1, ir2, ir3, method="fourier").double().to(CUDA)
    assert rel_err(four(x, y), grid(x, y)) <= TOL[torch.float64]
    def joint(xy):  # both inputs rotate
        return grid(xy[:, :x.shape[1]], xy[:, x.shape[1]:])

    xy = torch.cat([x, y], -1)
    L = geolie.lie_derivative(joint, xy, group="SO3", in_rep=f"{ir1}+{ir2}", out_rep=ir3)
    assert L.device.type == "cuda"
    assert float(L.norm() / grid(x, y).detach().norm()) <= 1e-12


@pytest.mark.parametrize("group", ["SE3", "E3"])
def test_frame_averaging(group, dtype):
    """Frames, the folded batch and the mapping back on the GPU: same outputs as on the CPU, and exactly
    equivariant there."""
    from geolie.models import CartesianMLPPotential

    z = torch.tensor([1, 6, 8, 1, 6, 1, 7, 8, 6])
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    backbone = CartesianMLPPotential(anisotropy=1.0).to(dtype)
    fa = FrameAveraging(backbone, group=group)
    x = cloud(9, dtype=dtype)
    e = fa(z, x, batch)
    fac = copy.deepcopy(fa).to(CUDA)
    zc, xc, bc = z.to(CUDA), x.to(CUDA), batch.to(CUDA)
    ec = fac(zc, xc, bc)
    assert ec.device.type == "cuda" and rel_err(ec.cpu(), e) <= TOL[dtype]
    rep = geolie.finite_equivariance_error(lambda p: fac(zc, p, bc), xc, group="SE3", n=3,
                                           parity=group == "E3", generator=torch.Generator().manual_seed(2))
    assert rep.max_rel() <= TOL[dtype], rep.table()


@pytest.mark.parametrize("make", [PairMLPPotential, E3nnPotential, lambda: GauntPotential(tp="gaunt-grid")],
                         ids=["pair", "e3nn", "gaunt-grid"])
def test_lie_derivative_energy_forces(make, dtype):
    """The SE(3) Lie derivative of energy and forces on the GPU: equals the CPU's, at the floor, all methods."""
    torch.manual_seed(0)
    model = make().to(dtype)
    pos = cloud(12, dtype=dtype)
    z = torch.tensor([1, 6, 7, 8] * 3)

    def ef_on(device):
        m = copy.deepcopy(model).to(device)
        zz = z.to(device)
        if isinstance(m, PairMLPPotential):
            return geolie.conservative(lambda p: m(zz, p))
        ei = radius_graph(pos.to(device), 5.0)
        return geolie.conservative(lambda p: m(zz, p, ei))

    ef_cpu, ef_gpu = ef_on("cpu"), ef_on(CUDA)
    pc = pos.to(CUDA)
    e, f = [t.detach() for t in ef_gpu(pc)]
    assert rel_err(f.cpu(), ef_cpu(pos)[1]) <= TOL[dtype]
    out = ("scalar", "vector")
    ref = geolie.lie_derivative(ef_cpu, pos, out_rep=out)
    for method in ("hvp", "jvp", "double-backward"):
        L = geolie.lie_derivative(ef_gpu, pc, out_rep=out, method=method)
        assert L[1].device.type == "cuda"
        assert float(L[1].norm() / f.norm()) <= 10 * TOL[dtype], method
        if dtype == torch.float64:  # at the float64 floor both are rounding noise: compare sizes only
            assert float(L[1].norm()) <= 10 * float(ref[1].norm()) + 1e-12 * float(f.norm())


def test_lie_derivative_of_a_broken_model_matches_cpu(dtype):
    """A non-equivariant model (anisotropic): the GPU's Lie derivative equals the CPU's, method by method."""
    from geolie.models import CartesianMLPPotential

    torch.manual_seed(0)
    model = CartesianMLPPotential(anisotropy=0.5).to(dtype)
    pos = cloud(10, dtype=dtype)
    z = torch.tensor([1, 6, 7, 8, 1, 6, 7, 8, 1, 6])
    mc = copy.deepcopy(model).to(CUDA)
    zc = z.to(CUDA)
    ref = geolie.lie_derivative(geolie.conservative(lambda p: model(z, p)), pos, out_rep=("scalar", "vector"))
    for method in ("hvp", "jvp", "fd"):
        L = geolie.lie_derivative(geolie.conservative(lambda p: mc(zc, p)), pos.to(CUDA),
                                  out_rep=("scalar", "vector"), method=method)
        tol = 1e-7 if method == "fd" and dtype == torch.float64 else (1e-2 if method == "fd" else TOL[dtype])
        assert rel_err(L[1].cpu(), ref[1]) <= tol, method
        assert rel_err(L[0].cpu(), ref[0]) <= tol, method


def test_neighbors_and_grid_nonlinearity():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(200, 3, generator=g, dtype=torch.float64) * 8
    batch = torch.arange(200) // 70
    a = radius_graph(pos, 2.0, batch)
    b = radius_graph(pos.to(CUDA), 2.0, batch.to(CUDA))
    assert b.device.type == "cuda"
    assert set(map(tuple, a.T.tolist())) == set(map(tuple, b.cpu().T.tolist()))
    ir = "4x0e+4x1o+4x2e"
    layer = SphericalGridNonlinearity(ir).double()
    from e3nn import o3

    x = torch.randn(5, o3.Irreps(ir).dim, generator=g, dtype=torch.float64)
    assert rel_err(copy.deepcopy(layer).to(CUDA)(x.to(CUDA)).cpu(), layer(x)) <= 1e-12


@pytest.mark.parametrize("model", ["e3nn", "schnet", "cartesian-mlp"])
def test_audit_on_cuda_matches_cpu(model):
    """``geolie.audit(..., device="cuda")``: per-structure Lie derivatives equal the CPU audit's (broken model) or
    sit at the floor (equivariant ones)."""
    kw = dict(limit=2, n_finite=1, progress=False)
    cpu = geolie.audit(model, "xtb-md/ethanol:test", **kw)
    gpu = geolie.audit(model, "xtb-md/ethanol:test", device="cuda", **kw)
    for a, b in zip(cpu.rows, gpu.rows):
        for name, o in b["outputs"].items():
            if model == "cartesian-mlp":
                assert np.allclose(o["abs"], a["outputs"][name]["abs"], rtol=1e-9, atol=1e-14), name
            else:
                assert all(o["at_floor"]), (model, name, o["rel"])


def test_cli_audit_device_cuda(tmp_path, capsys):
    from geolie.cli import main

    out = tmp_path / "audit"
    assert main(["audit", "--model", "pair-mlp", "--data", "xtb-md/ethanol:test", "--limit", "2", "--out", str(out),
                 "--n-finite", "1", "--fail-above", "1e-8", "--device", "cuda"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_layerwise_and_batched_audits_on_cuda():
    """Layer-wise attribution and batched audits on the GPU give the CPU's numbers (a planted, broken model)."""
    kw = dict(n_finite=1, progress=False)
    cpu = geolie.audit("planted_models:planted", "xtb-md/ethanol:test", limit=1, layerwise=True, **kw)
    gpu = geolie.audit("planted_models:planted", "xtb-md/ethanol:test", limit=1, layerwise=True, device="cuda", **kw)
    a, b = cpu.rows[0]["layerwise"], gpu.rows[0]["layerwise"]
    assert set(a) == set(b)
    for name in a:
        assert np.allclose(b[name]["contribution"], a[name]["contribution"], rtol=1e-9, atol=1e-14), name
    mols = geolie.data.load("xtb-md/ethanol", "test")[:3] + geolie.data.load("xtb-md/aspirin", "test")[:2]
    one = geolie.audit("cartesian-mlp", mols, **kw)
    many = geolie.audit("cartesian-mlp", mols, batch_size=3, device="cuda", **kw)
    for a, b in zip(one.rows, many.rows):
        for name in ("energy", "forces"):
            assert np.allclose(b["outputs"][name]["abs"], a["outputs"][name]["abs"], rtol=1e-9, atol=1e-14)


def test_compiled_grid_product_with_cuda_graphs():
    """torch.compile with CUDA graphs (mode reduce-overhead): repeated calls keep giving the eager numbers."""
    tp = GauntTensorProduct("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e+4x3o+4x4e").to(CUDA)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 36, generator=g).to(CUDA) for _ in range(4)]
    ref = [tp(x, x.flip(0)) for x in xs]
    ctp = torch.compile(tp, mode="reduce-overhead")
    for _ in range(2):
        for x, r in zip(xs, ref):
            assert torch.allclose(ctp(x, x.flip(0)), r, atol=1e-5)


def test_frame_averaging_degenerate_remedy_on_cuda():
    """A symmetric top (two equal eigenvalues): the in-plane remedy on the GPU equals the CPU's."""
    from geolie.models import CartesianMLPPotential

    ang = torch.arange(3, dtype=torch.float64) * 2 * torch.pi / 3
    pos = torch.cat([torch.stack([ang.cos(), ang.sin(), torch.zeros(3, dtype=torch.float64)], 1),
                     torch.tensor([[0.0, 0.0, 0.8]], dtype=torch.float64)])
    z = torch.tensor([6, 6, 6, 8])
    fa = FrameAveraging(CartesianMLPPotential(anisotropy=1.0).double(), group="SE3", degenerate="average")
    e = fa(z, pos)
    ec = copy.deepcopy(fa).to(CUDA)(z.to(CUDA), pos.to(CUDA))
    assert float(fa.last_gap[0]) < 1e-12
    assert rel_err(ec.cpu(), e) <= 1e-12
