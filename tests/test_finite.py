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


class _Planted:
    """A trial's floor with closed-form values: ``base`` from the base input's two draws, ``moved`` measured at the
    trial's own moved input (counted)."""

    def __init__(self, base, moved):
        self.base, self.moved, self.measured = base, moved, 0

    def __call__(self, mask=None):
        return self.base

    def confirmed(self, error, mask, fl):
        from geolie._verdict import confirmed_floor

        def at_moved():
            self.measured += 1
            return self.moved

        return confirmed_floor(error, fl, at_moved)


def test_a_trial_above_its_base_floor_counts_only_above_its_moved_input_rounding_too():
    """Largest error first: 5 is above its base floor (1) but within 2× its moved input's (4): at floor; 3 is above
    both: the family's max above floor is 3, and the trial of 1 (at its base floor) is never measured again."""
    from geolie._finite import _fold

    fl = [_Planted(1.0, 4.0), _Planted(1.0, 1.0), _Planted(1.0, 100.0)]
    worst, floor_rel, above = _fold([(5.0, 1.0, fl[0], None), (1.0, 1.0, fl[2], None), (3.0, 1.0, fl[1], None)])
    assert (worst, floor_rel, above) == (5.0, 4.0, 3.0)
    assert [f.measured for f in fl] == [1, 1, 0]
    # every trial at floor once confirmed: nothing above
    fl = [_Planted(1.0, 4.0), _Planted(1.0, 3.0)]
    assert _fold([(5.0, 2.0, fl[0], None), (4.0, 2.0, fl[1], None)]) == (2.5, 2.0, 0.0)
    # a NaN error is the worst and above any floor, with no measurement
    fl = [_Planted(1.0, 1e9), _Planted(1.0, 1e9)]
    worst, _, above = _fold([(0.5, 1.0, fl[0], None), (float("nan"), 1.0, fl[1], None)])
    assert worst != worst and above != above and fl[1].measured == 0


def test_exact_calculator_on_metal_cells_is_at_floor_in_every_family():
    """Case 7 (found by ``geolie demo``): ASE's EMT is exactly invariant, but on emt-bulk test cell 1 one finite
    rotation of the stress (7.5e-14 relative) was 2.3× a floor estimated from two rounding draws at the base input.
    With the confirmation at the moved input, every family but ``repeat`` is at floor on the demo's cells (``repeat``
    is EMT's own history: its neighbour list, kept from earlier calls, may hold other pairs)."""
    rep = geolie.audit("emt", geolie.data.load("emt-bulk", "test")[:3], dtype=torch.float64, n_finite=2)
    for row in rep.rows:
        for out, fams in row["finite_floor"].items():
            for fam, f in fams.items():
                if fam != "repeat":
                    assert f["verdict"] == "at floor", (row["index"], out, fam, f)


def test_a_breaking_model_is_confirmed_once_per_family():
    """A model that breaks rotations by far: each output's worst rotation is measured again at its moved input (the
    trial's input and 8 draws, one stacked call when the model stacks), the smaller ones are not."""
    m = CartesianMLPPotential(anisotropy=0.5).double()
    calls = []
    f = _ef(m)

    def counted(p, z):
        calls.append(1)
        return f(p, z)

    kw = dict(in_rep=("point", None), out_rep={"energy": None, "forces": "vector"}, n=4,
              generator=torch.Generator().manual_seed(0))
    rep = geolie.finite_equivariance_error(counted, (cloud(), Z), **kw)
    # base, repeat, 4 rotations, 4 translations, 2 rounding draws; then 1 + 8 at each output's worst rotation
    worst = {int(np.argmax(rep.errors[out]["rotation"]["abs"])) for out in ("energy", "forces")}
    assert len(calls) == 1 + 1 + 4 + 4 + 2 + 9 * len(worst)
    for out in ("energy", "forces"):
        assert rep.errors[out]["rotation"]["max_above_floor"] == rep.errors[out]["rotation"]["max_rel"] > 1e-3
    assert rep.errors["energy"]["translation"]["verdict"] == "at floor"
