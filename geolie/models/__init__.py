"""Small bundled models (deterministic initialisation, no downloads) used by the demo, tests and benchmarks.

Every model predicts energies per structure from ``(z, pos, ...)``; forces come from
:func:`geolie.conservative`. One model per file.
"""
from .pair_mlp import PairMLPPotential
from .cartesian_mlp import CartesianMLPPotential
from .e3nn_potential import E3nnPotential

__all__ = ["PairMLPPotential", "CartesianMLPPotential", "E3nnPotential"]
