"""Bundled models: exact equivariance where claimed (both dtypes), switchable tensor products agree in structure."""
import pytest
import torch
from ase.build import molecule

import geolie
from geolie.models import CartesianMLPPotential, E3nnPotential, GauntPotential, PairMLPPotential
from geolie.neighbors import radius_graph
from conftest import TOL

AT = molecule("CH3CH2OH")
Z = torch.tensor(AT.numbers)


def _ef(model, pos):
    ei = radius_graph(pos, 5.0)
    if isinstance(model, (E3nnPotential, GauntPotential)):
        return geolie.conservative(lambda p: model(Z, p, ei))
    return geolie.conservative(lambda p: model(Z, p))


@pytest.mark.parametrize("make", [PairMLPPotential, E3nnPotential, lambda: GauntPotential(tp="cg"),
                                  lambda: GauntPotential(tp="gaunt-grid"), lambda: GauntPotential(tp="gaunt-fourier")],
                         ids=["pair", "e3nn", "cg", "gaunt-grid", "gaunt-fourier"])
def test_equivariant_models(make, dtype):
    model = make().to(dtype)
    pos = torch.tensor(AT.positions, dtype=dtype)
    ef = _ef(model, pos)
    e, f = ef(pos)
    L = geolie.lie_derivative(ef, pos, out_rep=("scalar", "vector"))
    assert float(L[1].norm() / f.norm()) <= 10 * TOL[dtype]
    assert float(L[0].norm() / e.norm()) <= 10 * TOL[dtype]


def test_gaunt_grid_equals_fourier_model():
    pos = torch.tensor(AT.positions, dtype=torch.float64)
    e1 = _ef(GauntPotential(tp="gaunt-grid").double(), pos)(pos)[0]
    e2 = _ef(GauntPotential(tp="gaunt-fourier").double(), pos)(pos)[0]
    assert torch.allclose(e1, e2, rtol=1e-12)


def test_cartesian_model_breaks_rotations_only():
    pos = torch.tensor(AT.positions, dtype=torch.float64)
    ef = _ef(CartesianMLPPotential(anisotropy=0.5).double(), pos)
    L = geolie.lie_derivative(ef, pos, out_rep=("scalar", "vector"))
    assert float(L[1][:3].norm()) > 1e-3 and float(L[1][3:].norm()) == 0.0


def test_bad_tp_name():
    with pytest.raises(ValueError, match="tp must be"):
        GauntPotential(tp="fft")
