import pytest
import torch
from e3nn import o3

import geolie
from geolie.nn import SphericalGridNonlinearity
from geolie.nn.spherical_harmonics import minimal_grid

IR = "4x0e+4x1o+4x2e"


def _x(dtype=torch.float64, n=3):
    return torch.randn(n, o3.Irreps(IR).dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def test_identity_activation_is_exact():
    layer = SphericalGridNonlinearity(IR, act=lambda f: f, resolution=minimal_grid(4)).double()
    x = _x()
    assert torch.allclose(layer(x), x, atol=1e-13)


def test_equivariance_improves_with_resolution():
    """Aliasing: the relative Lie derivative of a SiLU on the grid falls as the grid is refined."""
    x = _x()
    rels = []
    for deg in (4, 8, 16, 32):
        layer = SphericalGridNonlinearity(IR, resolution=minimal_grid(deg)).double()
        L = geolie.lie_derivative(layer, x, group="SO3", in_rep=IR, out_rep=IR)
        rels.append(float(L.norm() / layer(x).norm()))
    assert rels[0] > 1e-3 and rels[-1] < rels[0] / 10
    assert all(b < a for a, b in zip(rels, rels[1:]))


def test_mlp_variant_and_float32():
    layer = SphericalGridNonlinearity(IR, mlp_hidden=16).float()
    y = layer(_x(torch.float32))
    assert y.shape == (3, o3.Irreps(IR).dim) and y.dtype == torch.float32
    y.sum().backward()
    assert layer.mlp[0].weight.grad is not None


def test_rejects_pseudo_signals():
    with pytest.raises(ValueError, match="natural parity"):
        SphericalGridNonlinearity("2x0o+2x1e")
