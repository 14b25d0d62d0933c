"""Frame averaging: exact invariance/equivariance for every output type, per structure; degeneracy handling."""
import math
import warnings

import pytest
import torch

import geolie
from geolie.models import CartesianMLPPotential
from geolie.nn import FrameAveraging, GeolieDegenerateFrameWarning, pca_frames
from test_lie_derivative import cloud

Z = torch.tensor([1, 6, 8, 1, 6, 1, 7, 8, 6])
BATCH = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])


class MultiHead(torch.nn.Module):
    """A deliberately non-equivariant backbone with every kind of output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(3, 3, generator=g))
        self.U = torch.nn.Parameter(torch.randn(3, 9, generator=g))

    def forward(self, z, pos, batch):
        h = torch.tanh(pos @ self.W.to(pos).T)  # per-atom vectors read off lab axes
        n = int(batch.max()) + 1
        s = torch.zeros(n, 3, dtype=pos.dtype).index_add(0, batch, h)
        stress = (s[:, :, None] * s[:, None, :]) + torch.diag_embed(s ** 2)
        irr = torch.cat([s[:, :1] ** 2, s, torch.tanh(s @ self.U.to(pos))[:, :5]], -1)  # "0e+1o+2e"
        e_atom = (h ** 2).sum(-1) * h[:, 0] + h[:, 1] ** 4 + 0.1 * z.to(pos)  # neither even nor odd
        energy = torch.zeros(n, dtype=pos.dtype).index_add(0, batch, e_atom)
        return {"energy": energy, "forces": h, "pos": pos + 0.1 * h, "stress": stress, "irreps": irr}


OUT = {"energy": None, "forces": "vector", "pos": "point", "stress": "tensor2", "irreps": "1x0e+1x1o+1x2e"}


@pytest.mark.parametrize("group", ["SE3", "E3", "SO3", "O3"])
def test_all_outputs_equivariant(group, dtype):
    fa = FrameAveraging(MultiHead().to(dtype), group=group, out_rep=OUT)
    x = cloud(9, dtype=dtype)
    if group in ("SO3", "O3"):
        x = x - x.mean(0)  # frames about the origin: translations are not a symmetry
    fn = lambda p: fa(Z, p, BATCH)  # noqa: E731
    parity = group in ("E3", "O3")
    rep = geolie.finite_equivariance_error(fn, x, group="SE3" if group in ("SE3", "E3") else "SO3", out_rep=OUT,
                                           n=4, parity=parity, generator=torch.Generator().manual_seed(1))
    tol = {torch.float64: 1e-12, torch.float32: 2e-5}[dtype]
    assert rep.max_rel() <= tol, rep.table()
    bare = geolie.finite_equivariance_error(lambda p: MultiHead().to(dtype)(Z, p, BATCH), x, group="SO3",
                                            out_rep=OUT, n=2)
    assert bare.max_rel("rotation") > 1e-2  # the backbone alone is far from equivariant


def test_proper_frames_fail_reflections_by_design():
    fa = FrameAveraging(MultiHead().double(), group="SE3", out_rep=OUT)
    rep = geolie.finite_equivariance_error(lambda p: fa(Z, p, BATCH), cloud(9), out_rep=OUT, n=1, parity=True)
    assert rep.max_rel("inversion") > 1e-3 and rep.max_rel("rotation") < 1e-12


def test_energy_and_forces_by_autograd_have_zero_lie_derivative(dtype):
    fa = FrameAveraging(CartesianMLPPotential(anisotropy=1.0).to(dtype), group="E3")
    ef = geolie.conservative(lambda p: fa(Z, p, BATCH))
    L = geolie.lie_derivative(ef, cloud(9, dtype=dtype), out_rep=("scalar", "vector"), method="jvp-loop")
    e, f = ef(cloud(9, dtype=dtype))
    tol = {torch.float64: 1e-11, torch.float32: 1e-4}[dtype]
    assert float(L[1].norm() / f.norm()) <= tol and float(L[0].norm() / e.norm()) <= tol


def test_frames_are_per_structure():
    fa = FrameAveraging(MultiHead().double(), group="SE3", out_rep=OUT)
    x = cloud(9)
    out = fa(Z, x, BATCH)
    R = geolie.SO3.random(1, torch.Generator().manual_seed(3))[0]
    x2 = x.clone()
    x2[4:] = x[4:] @ R.T + 1.0  # move only structure 1
    out2 = fa(Z, x2, BATCH)
    assert torch.allclose(out2["energy"], out["energy"], atol=1e-12)
    assert torch.allclose(out2["forces"][:4], out["forces"][:4], atol=1e-12)
    assert torch.allclose(out2["forces"][4:], out["forces"][4:] @ R.T, atol=1e-12)


def test_stochastic_mode_is_equivariant_in_expectation():
    g = torch.Generator().manual_seed(0)
    fa_all = FrameAveraging(CartesianMLPPotential(anisotropy=1.0).double(), group="E3")
    fa_st = FrameAveraging(CartesianMLPPotential(anisotropy=1.0).double(), group="E3", mode="stochastic",
                           generator=g)
    x = cloud(9)
    exact = fa_all(Z, x, BATCH)
    draws = torch.stack([fa_st(Z, x, BATCH) for _ in range(800)])
    assert (draws.std(0) > 1e-4).all()  # single draws differ: not invariant call by call
    assert torch.allclose(draws.mean(0), exact, atol=4 * float(draws.std(0).max()) / 800 ** 0.5)


def test_degenerate_covariance():
    # a square (two equal eigenvalues) plus a small out-of-plane offset along z
    sq = torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, 0.3]], dtype=torch.float64)
    z = torch.tensor([6, 6, 6, 6, 1])
    head = MultiHead().double()
    bb = lambda z, p, b: head(z, p, b)["energy"]  # noqa: E731  strongly anisotropic
    with pytest.warns(GeolieDegenerateFrameWarning, match="near-degenerate"):
        FrameAveraging(bb, group="E3")(z, sq)
    with pytest.raises(ValueError, match="near-degenerate"):
        FrameAveraging(bb, group="E3", degenerate="raise")(z, sq)
    _, _, _, gap = pca_frames(sq, None, 1, True, True)
    assert float(gap[0]) < 1e-12
    # the remedy: averaging over in-plane rotations of the frame makes the output nearly invariant
    R = geolie.SO3.random(8, torch.Generator().manual_seed(2))

    def spread(fa):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vals = torch.stack([fa(z, sq @ r.T) for r in R])
        return float((vals - vals.mean()).abs().max() / vals.abs().mean())

    plain = spread(FrameAveraging(bb, group="E3"))
    fixed = spread(FrameAveraging(bb, group="E3", degenerate="average", n_remedy=32))
    assert plain > 1e-3 and fixed < plain / 100


def test_error_grows_as_the_gap_closes():
    """A generic cloud squeezed to a near-degenerate covariance: exact to rounding, amplified like u / gap
    (measured: gap 1e-2 -> 4e-16, 1e-4 -> 2e-14, 1e-6 -> 2e-12, 1e-8 -> 4e-10, 0 -> 4e-3)."""
    head = MultiHead().double()
    bb = lambda z, p, b: head(z, p, b)["energy"]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    lam, V = torch.linalg.eigh(x.T @ x)
    x = x @ V @ torch.diag(lam.rsqrt())  # whitened: the covariance is the identity
    Q = geolie.SO3.random(1, g)[0]
    z = torch.full((12,), 6)
    errs = []
    for eps in (1e-2, 1e-5, 1e-8, 0.0):
        y = (x * torch.tensor([1 + eps, 1.0, 0.5], dtype=torch.float64)) @ Q.T
        fa = FrameAveraging(bb, group="E3", gap_threshold=0.0)
        rep = geolie.finite_equivariance_error(lambda p: fa(z, p), y, n=8, generator=torch.Generator().manual_seed(0))
        errs.append(rep.max_rel("rotation"))
    assert errs[0] < 1e-13 < errs[2] < 1e-7 and errs[0] < errs[1] < errs[2] < errs[3] and errs[3] > 1e-4


def test_single_frame_canonicalization_zero_lie_derivative_but_sign_flips():
    """One PCA frame with fixed signs: smooth near x (L = 0) yet not invariant under finite rotations."""
    bb = CartesianMLPPotential(anisotropy=1.0).double()
    z = Z[:4]

    def canon(p):
        c, F, _, _ = pca_frames(p, None, 1, True, True)
        return bb(z, (p - c[0]) @ F[0, 0].to(p))

    x = cloud(4, seed=4)
    L = geolie.lie_derivative(canon, x, method="jvp-loop")
    assert float(L.abs().max()) < 1e-10
    rep = geolie.finite_equivariance_error(canon, x, n=16, generator=torch.Generator().manual_seed(0))
    assert rep.max_rel("rotation") > 1e-3


def test_dense_clouds_with_mask(dtype):
    class Dense(torch.nn.Module):
        def forward(self, pos, mask):
            h = torch.tanh(pos @ torch.tensor([[1.0, 2, 0], [0, 1, 3], [1, 0, 1]], dtype=pos.dtype).T)
            h = h * mask[..., None]
            return {"logits": (h ** 3).sum(1), "flow": h}

    fa = FrameAveraging(Dense(), group="E3", out_rep={"logits": None, "flow": "vector"}, dense=True)
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 7, 3, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    out = fa(pos, mask)
    R = geolie.SO3.random(1, g)[0].to(dtype)
    out2 = fa(pos @ R.T + 2.0, mask)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    assert torch.allclose(out2["logits"], out["logits"], atol=tol * 10)
    assert torch.allclose(out2["flow"][mask], out["flow"][mask] @ R.T, atol=tol * 10)


def test_cells_rotate_with_the_frame():
    def backbone(z, pos, batch, cell):
        return (pos.sum(-1) ** 2).sum() * 0 + torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(
            0, batch, torch.tanh(pos[:, 0])) + cell[:, 0, 0]

    fa = FrameAveraging(backbone, group="SE3")
    g = torch.Generator().manual_seed(5)
    cell = 3 * torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = cloud(5)
    L = geolie.lie_derivative(lambda p, c: fa(Z[:5], p, None, c), (x, cell), in_rep=("point", "cell"))
    assert float(L.abs().max()) < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="group must be"):
        FrameAveraging(lambda *a: a, group="SU2")
    with pytest.raises(ValueError, match="mode must be"):
        FrameAveraging(lambda *a: a, mode="some")
    fa = FrameAveraging(MultiHead().double(), out_rep={"energy": None})
    with pytest.raises(ValueError, match="undeclared output"):
        fa(Z, cloud(9), BATCH)
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        fa(Z, torch.zeros(4, 2), None)


@pytest.mark.parametrize("group", ["E3", "SE3"])
def test_frames_in_groups_give_the_same_average(group, dtype):
    """``frames_per_call`` splits the frames over several backbone calls: the same outputs (every kind, graph and
    dense inputs, the degenerate remedy) as one folded call."""
    x = cloud(9, dtype=dtype)
    one = FrameAveraging(MultiHead().to(dtype), group=group, out_rep=OUT)(Z, x, BATCH)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    for G in (1, 3):
        calls = []
        bb = MultiHead().to(dtype)
        bb.register_forward_hook(lambda m, a, o: calls.append(a[1].shape[0]))
        out = FrameAveraging(bb, group=group, out_rep=OUT, frames_per_call=G)(Z, x, BATCH)
        K = 8 if group == "E3" else 4
        assert calls == [9 * min(G, K - k) for k in range(0, K, G)]  # ceil(K / G) calls of up to G frames
        for k in OUT:
            assert torch.allclose(out[k], one[k], rtol=tol, atol=tol), (G, k)
    # dense clouds
    dense = lambda pos, mask: {"e": (torch.tanh(pos[..., 0]) * mask).sum(1), "v": torch.tanh(pos)}  # noqa: E731
    pos = cloud(12, dtype=dtype).reshape(2, 6, 3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    spec = {"e": None, "v": "vector"}
    a = FrameAveraging(dense, group=group, out_rep=spec, dense=True)(pos, mask)
    b = FrameAveraging(dense, group=group, out_rep=spec, dense=True, frames_per_call=3)(pos, mask)
    assert all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in spec)
    # the in-plane remedy (K * n_remedy frames) in groups
    ang = torch.arange(3, dtype=torch.float64) * 2 * math.pi / 3
    top = torch.cat([torch.stack([ang.cos(), ang.sin(), torch.zeros(3, dtype=torch.float64)], 1),
                     torch.tensor([[0.0, 0.0, 0.8]], dtype=torch.float64)]).to(dtype)
    zz = torch.tensor([6, 6, 6, 8])
    mk = lambda G: FrameAveraging(CartesianMLPPotential(anisotropy=1.0).to(dtype), group=group,  # noqa: E731
                                  degenerate="average", frames_per_call=G)
    assert torch.allclose(mk(None)(zz, top), mk(5)(zz, top), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="frames_per_call"):
        FrameAveraging(bb, frames_per_call=0)


def test_frame_averaged_model_is_audited_like_any_potential():
    """geolie.audit calls a frame-averaged potential as forward(z, pos, batch) (its call_signature): exact in
    float64, its backbone broken."""
    mols = geolie.data.load("xtb-md/ethanol", "test")[:2]
    torch.manual_seed(0)
    plain = CartesianMLPPotential().double()
    fa = geolie.audit(FrameAveraging(plain, group="SE3"), mols, n_finite=1, progress=False)
    bare = geolie.audit(plain, mols, n_finite=1, progress=False)
    assert fa.verdicts()["forces"]["overall"] == "at floor"
    assert bare.verdicts()["forces"]["overall"] == "above floor"
