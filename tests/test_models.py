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


def test_grid_nonlinearity_potential_aliases_less_on_finer_grids(dtype):
    """nonlinearity='grid': the forces' rotational Lie derivative falls with the grid resolution (aliasing), down to
    the dtype's floor on a grid far finer than the band limit; the Lie derivative agrees with finite rotations."""
    pos = torch.tensor(AT.positions, dtype=dtype)
    rel = []
    for res in [(3, 5), (6, 11), (16, 31)]:
        model = GauntPotential(nonlinearity="grid", grid_resolution=res).to(dtype)
        ef = _ef(model, pos)
        L = geolie.lie_derivative(ef, pos, out_rep=("scalar", "vector"))
        rel.append(float(L[1][:3].norm() / ef(pos)[1].norm()))
        if res == (3, 5):  # a small finite rotation about z: (F(R x) R − F(x)) / t ≈ L_z F
            t = 1e-4 if dtype == torch.float64 else 1e-2
            R = geolie.so3_exp(torch.tensor([0.0, 0.0, t], dtype=dtype))
            fd = (ef(pos @ R.T)[1] @ R - ef(pos)[1]) / t
            assert torch.allclose(fd, L[1][2], rtol=0, atol=(1e-3 if dtype == torch.float64 else 5e-2) * float(
                L[1][2].abs().max()))
    assert rel[0] > 1e-4 and rel[0] > 10 * rel[1] and rel[2] < 10 * TOL[dtype]


def test_bad_nonlinearity_name():
    with pytest.raises(ValueError, match="nonlinearity must be"):
        GauntPotential(nonlinearity="relu")
