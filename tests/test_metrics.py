import re

import numpy as np
import torch

import geolie
from geolie.models import CartesianMLPPotential, PairMLPPotential
from test_lie_derivative import cloud


def _ef(m, z, batch=None):
    f = geolie.conservative(lambda p: m(z, p, batch))
    return lambda p: dict(zip(("energy", "forces"), f(p)))


def test_metric_definitions():
    m = CartesianMLPPotential(anisotropy=0.5).double()
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    x = cloud()
    f = _ef(m, z)
    rep = geolie.measure(f, x, out_rep={"energy": None, "forces": "vector"})
    L = geolie.lie_derivative(f, x, out_rep={"energy": None, "forces": "vector"})
    y = f(x)
    fo = rep.outputs["forces"]
    assert fo.abs.shape == (1, 6)
    for k in range(6):
        assert np.isclose(fo.abs[0, k], float(L["forces"][k].norm()))
        assert np.isclose(fo.rel[0, k], float(L["forces"][k].norm() / y["forces"].norm()))
        assert np.isclose(fo.per_atom[0, k], float(L["forces"][k].norm()) / np.sqrt(7))
    assert np.isclose(fo.iso_rotation[0], np.sqrt(np.mean(fo.abs[0, :3] ** 2)))
    assert rep.outputs["energy"].per_atom is None
    assert not fo.at_floor[0, :3].any() and fo.at_floor[0, 3:].all()


def test_isotropic_norm_is_rms_over_random_axes():
    """iso = sqrt(mean_k |L_k|²) equals the RMS of |L_n| over uniformly random unit axes n (Monte Carlo)."""
    m = CartesianMLPPotential(anisotropy=0.5).double()
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    x = cloud()
    f = _ef(m, z)
    L = geolie.lie_derivative(f, x, out_rep={"energy": None, "forces": "vector"})["forces"][:3]
    n = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True)
    Ln = torch.einsum("ak,kij->aij", n, L).flatten(1).norm(dim=1)
    iso = float(L.flatten(1).norm(dim=1).pow(2).mean().sqrt())
    assert abs(float(Ln.pow(2).mean().sqrt()) - iso) / iso < 0.02


def test_floor_separates_zero_from_small(dtype):
    """Equivariant model: at its floor in both dtypes. A break of 1e-6 relative is above the float64 floor."""
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7])
    x = cloud(dtype=dtype)
    eq = PairMLPPotential().to(dtype)
    other = PairMLPPotential().to(torch.float32 if dtype == torch.float64 else torch.float64)
    rep = geolie.measure(_ef(eq, z), x, out_rep={"energy": None, "forces": "vector"}, f_ref=_ef(other, z))
    assert "float32 vs float64" in rep.outputs["forces"].floor_source
    for o in rep.outputs.values():
        assert o.at_floor.all(), o.name
    if dtype == torch.float64:
        small = CartesianMLPPotential(anisotropy=1e-6).double()
        rep = geolie.measure(_ef(small, z), x, out_rep={"energy": None, "forces": "vector"})
        assert not rep.outputs["forces"].at_floor[0, :3].any()
        assert rep.outputs["forces"].rel[0, :3].max() < 1e-5


def test_per_sample_split_and_aggregates():
    m = CartesianMLPPotential(anisotropy=0.5).double()
    z = torch.tensor([1, 6, 8, 1, 6, 1, 7, 8, 8])
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    x = cloud(9)
    rep = geolie.measure(_ef(m, z, batch), x, out_rep={"energy": None, "forces": "vector"}, batch=batch)
    assert rep.n_samples == 2
    assert rep.outputs["energy"].abs.shape == (2, 6) and rep.outputs["forces"].abs.shape == (2, 6)
    L = geolie.lie_derivative(_ef(m, z, batch), x, out_rep={"energy": None, "forces": "vector"})
    assert np.isclose(rep.outputs["forces"].abs[1, 0], float(L["forces"][0, 4:].norm()))
    agg = geolie.aggregate([1.0, 2.0, 3.0, 100.0])
    assert agg["max"] == 100.0 and agg["median"] == 2.5 and set(agg) == {"mean", "median", "p99", "max"}
    d = rep.to_dict()
    assert set(d["outputs"]["forces"]["aggregates"]["rx"]["abs"]) == {"mean", "median", "p99", "max"}
    assert "forces" in rep.table() and "energy" in rep.table("abs")


def test_fd_floor_is_error_estimate():
    rep = geolie.measure(lambda p: (p[:, 0] ** 2).sum(), cloud(), method="fd")
    assert rep.outputs["output"].floor_source == "finite-difference error estimate"
    assert rep.outputs["output"].floor.max() < 1e-8


def test_module_is_copied_for_the_reference():
    class EnergyModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = PairMLPPotential()
            self.register_buffer("z", torch.tensor([1, 6, 8, 1, 6, 1, 7]))

        def forward(self, pos):
            return self.m(self.z, pos)

    mod = EnergyModule()
    rep = geolie.measure(mod, cloud(dtype=torch.float32))
    assert rep.outputs["output"].floor_source == "float32 vs float64"
    assert next(mod.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert rep.outputs["output"].at_floor.all()
    rep = geolie.measure(lambda p: mod(p), cloud(dtype=torch.float32))  # float64 inputs fail: measured float32 noise
    # forward mode (the faster of loop and vmap, measured) against another AD family
    assert re.fullmatch(r"rounding estimate and jvp-(loop|vmap) vs double-backward difference",
                        rep.outputs["output"].floor_source)
