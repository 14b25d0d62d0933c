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
