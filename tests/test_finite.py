import numpy as np
import pytest
import torch
from e3nn import o3

import geolie
from geolie.models import CartesianMLPPotential, PairMLPPotential
from test_lie_derivative import cloud

Z = torch.tensor([1, 6, 8, 1, 6, 1, 7])


def _ef(m):
    f = geolie.conservative(lambda p, z: m(z, p))
    return lambda p, z: dict(zip(("energy", "forces"), f(p, z)))


def test_equivariant_model_passes_every_family(dtype):
    m = PairMLPPotential().to(dtype)
    rep = geolie.finite_equivariance_error(
        _ef(m), (cloud(dtype=dtype), Z), in_rep=("point", None), out_rep={"energy": None, "forces": "vector"},
        n=4, parity=True, permutation={"inputs": (True, True), "outputs": {"forces": True}},
        generator=torch.Generator().manual_seed(0))
    assert set(rep.errors["forces"]) == {"repeat", "rotation", "translation", "inversion", "permutation"}
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    assert rep.max_rel() <= tol
    assert rep.errors["forces"]["rotation"]["n"] == 4
    assert "rotation" in rep.table()


def test_broken_model_is_flagged_by_rotations_only():
    m = CartesianMLPPotential(anisotropy=0.5).double()
    rep = geolie.finite_equivariance_error(_ef(m), (cloud(), Z), in_rep=("point", None),
                                           out_rep={"energy": None, "forces": "vector"}, n=4)
    assert rep.max_rel("rotation") > 1e-3
    assert rep.max_rel("translation") < 1e-12


def test_parity_of_irreps():
    """Spherical harmonics of points: 1o flips under inversion; declaring it 1e is caught."""
    f = lambda p: o3.spherical_harmonics("1o", p, normalize=False)  # noqa: E731
    x = cloud()
    ok = geolie.finite_equivariance_error(f, x, group="SO3", out_rep="1o", parity=True, n=2)
    bad = geolie.finite_equivariance_error(f, x, group="SO3", out_rep="1e", parity=True, n=2)
    assert ok.max_rel("inversion") < 1e-6 and bad.max_rel("inversion") > 1.0


def test_sign_flipping_frame_has_zero_lie_derivative_but_fails_finite_rotations():
    """A PCA canonicalization with fixed signs: smooth near x (L = 0) yet wrong under large rotations."""

    def frame_coords(p):
        c = p - p.mean(0)
        _, vecs = torch.linalg.eigh(c.T @ c)
        vecs = vecs * torch.sign(vecs[0:1, :])  # sign rule tied to the lab x-axis: not equivariant
        return (c @ vecs)[:, 0].sum() + (c @ vecs)[0, 1]

    x = cloud(8, seed=5)
    L = geolie.lie_derivative(frame_coords, x)
    assert float(L.abs().max()) < 1e-9 * float(x.norm())  # invariant to first order: no sign flips near x
    rep = geolie.finite_equivariance_error(frame_coords, x, n=16, generator=torch.Generator().manual_seed(1))
    assert rep.max_rel("rotation") > 0.1  # finite rotations cross the sign-flip boundary


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 1"):
        geolie.finite_equivariance_error(lambda p: p.sum(), cloud(), n=0)
    with pytest.raises(ValueError, match="permutation"):
        geolie.finite_equivariance_error(lambda p: p.sum(), cloud(), permutation={"inputs": (True, False)})


def test_reusing_the_engines_prepared_problem_changes_nothing_and_skips_the_base_call():
    from geolie.adapters import Structure, TorchAdapter
    from geolie.models import PairMLPPotential

    calls = []

    class Counting(PairMLPPotential):
        def forward(self, z, pos, batch=None):
            calls.append(1)
            return super().forward(z, pos, batch) + 0.05 * pos[:, 0].sum()  # a planted break, to be seen

    atoms = geolie.data.load("xtb-md/ethanol", "test")[0]
    ev = TorchAdapter(Counting()).evaluation(Structure.from_atoms(atoms), torch.float64)
    rep = geolie.measure(ev, floor=False)
    kw = dict(n=2, parity=True, permutation={}, about="origin")
    calls.clear()
    a = geolie.finite_equivariance_error(ev, generator=torch.Generator().manual_seed(0), **kw)
    fresh_calls = len(calls)
    calls.clear()
    b = geolie.finite_equivariance_error(ev, generator=torch.Generator().manual_seed(0), problem=rep.problem, **kw)
    assert len(calls) == fresh_calls - 1
    assert a.errors.keys() == b.errors.keys()
    for name in a.errors:
        for fam, v in a.errors[name].items():
            assert np.allclose(v["abs"], b.errors[name][fam]["abs"], rtol=1e-12, atol=1e-15), (name, fam)
    assert a.errors["energy"]["rotation"]["max_rel"] > 1e-4
    with pytest.raises(ValueError, match="prepared with about='origin'"):
        geolie.finite_equivariance_error(ev, problem=rep.problem, about="centroid")


class _AnisotropicPerStructure(torch.nn.Module):
    """E_b = Σ_{i∈b} (a·x_i + x_iᵀ A x_i) with A anisotropic: breaks rotations and translations, per structure (a
    batch of structures gives each its own energy)."""

    def __init__(self, ignore_batch=False, mix=False):
        super().__init__()
        self.ignore_batch, self.mix = ignore_batch, mix
        self.register_buffer("A", torch.tensor([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 2.0]],
                                               dtype=torch.float64))
        self.register_buffer("a", torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64))

    def forward(self, z, pos, batch=None):
        per_atom = pos @ self.a.to(pos) + ((pos @ self.A.to(pos)) * pos).sum(-1)
        if batch is None or self.ignore_batch:
            return per_atom.sum()[None]
        e = torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, per_atom)
        return e + 0.1 * pos.sum() ** 2 if self.mix else e  # mix: every structure sees all atoms of the batch


class _EdgeModel(torch.nn.Module):
    """forward(z, pos, edge_index, batch): an invariant pair energy over a neighbour list built outside."""

    def forward(self, z, pos, edge_index, batch=None):
        b = torch.zeros(len(pos), dtype=torch.long) if batch is None else batch
        d = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1)
        return torch.zeros(int(b.max()) + 1, dtype=pos.dtype).index_add(0, b[edge_index[0]], torch.exp(-d))


@pytest.mark.parametrize("batched", [False, True])
def test_stacked_finite_checks_equal_one_call_per_group_element(batched):
    """All group elements in one stacked call (the default for adapters that batch molecules) give the same finite
    errors as one call per element, per structure, for a model that breaks rotations and translations; in chunks
    too; and a model that ignores its batch argument falls back to one call per element with the same numbers."""
    from ase import Atoms

    from geolie.adapters import Structure, load_model

    sts = [Structure.from_atoms(Atoms("H4", positions=np.random.default_rng(k).normal(size=(4, 3)))) for k in (0, 1)]
    pot = load_model(_AnisotropicPerStructure())
    ev = pot.batch_evaluation(sts, torch.float64) if batched else pot.evaluation(sts[0], torch.float64)
    assert ev.stack is not None
    kw = dict(n=3, parity=True, permutation={}, generator=None)
    ref = geolie.finite_equivariance_error(ev, **{**kw, "generator": torch.Generator().manual_seed(1)}, stack_atoms=0)
    calls = []
    stack = ev.stack
    ev.stack = lambda k: (calls.append(k), stack(k))[1]
    for atoms in (4096, 12):  # all at once; chunks of 3 copies of 4 atoms (or 1 copy of 8)
        got = geolie.finite_equivariance_error(ev, **{**kw, "generator": torch.Generator().manual_seed(1)},
                                               stack_atoms=atoms)
        for name, fams in ref.errors.items():
            for fam, v in fams.items():
                assert v["max_rel"] > 1e-3 or fam in ("repeat", "permutation"), (name, fam)
                np.testing.assert_allclose(got.errors[name][fam]["abs"], v["abs"], rtol=1e-10, atol=1e-13)
                if batched:
                    np.testing.assert_allclose(got.errors[name][fam]["per_sample_max_rel"],
                                               v["per_sample_max_rel"], rtol=1e-10, atol=1e-13)
    # repeat, 3 rotations, 3 translations, inversion, 3 permutations, and the 2 input-rounding draws of the floors
    assert calls and max(calls) == 1 + 3 + 3 + 1 + 3 + 2
    lazy = load_model(_AnisotropicPerStructure(ignore_batch=True))
    ev2 = lazy.evaluation(sts[0], torch.float64)
    got = geolie.finite_equivariance_error(ev2, **{**kw, "generator": torch.Generator().manual_seed(1)})
    for name, fams in ref.errors.items():
        if not batched:
            for fam, v in fams.items():
                np.testing.assert_allclose(got.errors[name][fam]["abs"], v["abs"], rtol=1e-10, atol=1e-13)
    # a model whose structures in a batch interact: its stacked copies would too; the unmoved copy's outputs differ
    # from the unstacked ones, so the checks go one call per element, with the same numbers as stack_atoms=0
    mixing = load_model(_AnisotropicPerStructure(mix=True))
    ev3 = mixing.batch_evaluation(sts, torch.float64) if batched else mixing.evaluation(sts[0], torch.float64)
    one = geolie.finite_equivariance_error(ev3, **{**kw, "generator": torch.Generator().manual_seed(1)}, stack_atoms=0)
    got = geolie.finite_equivariance_error(ev3, **{**kw, "generator": torch.Generator().manual_seed(1)})
    for name, fams in one.errors.items():
        for fam, v in fams.items():
            np.testing.assert_allclose(got.errors[name][fam]["abs"], v["abs"], rtol=1e-12, atol=1e-14)


def test_stacked_edge_model_builds_each_copys_neighbour_list():
    """A forward(z, pos, edge_index, batch) module gets each moved copy's own neighbour list, stacked or one call per
    group element, so permuted copies are at the floor (the unpermuted structure's list, reused, put them at 0.2-1
    relative: a false break)."""
    from ase import Atoms

    from geolie.adapters import Structure, load_model

    pot = load_model(_EdgeModel())
    pot.cutoff = 5.0
    st = Structure.from_atoms(Atoms("H5", positions=np.random.default_rng(3).normal(size=(5, 3))))
    ev = pot.evaluation(st, torch.float64)
    for atoms in (4096, 0):
        rep = geolie.finite_equivariance_error(ev, n=2, permutation={}, generator=torch.Generator().manual_seed(0),
                                               stack_atoms=atoms)
        assert rep.max_rel() < 1e-13, rep.table()
