"""A gate in your test suite: pytest fails when any figure breaks (above its floor and above rtol)."""
import pytest
from ase.build import molecule

import geolie.testing


def test_pair_mlp_is_equivariant():
    geolie.testing.assert_equivariant("pair-mlp", [molecule("H2O"), molecule("CH3OH")], rtol=1e-6)


def test_cartesian_mlp_breaks():
    with pytest.raises(AssertionError, match="not equivariant"):
        geolie.testing.assert_equivariant("cartesian-mlp", [molecule("H2O")], rtol=1e-6)
