"""Small bundled models (deterministic initialisation, no downloads) used by the demo, tests and benchmarks.

Every model predicts energies per structure from ``(z, pos, ...)``; forces come from
:func:`geolie.conservative`. One model per file. ``CartesianMLPPotential`` doubles as the plain, non-equivariant
backbone that :class:`geolie.nn.FrameAveraging` wraps.
"""
from .pair_mlp import PairMLPPotential
from .cartesian_mlp import CartesianMLPPotential
from .e3nn_potential import E3nnPotential
from .gaunt_potential import GauntPotential

__all__ = ["PairMLPPotential", "CartesianMLPPotential", "E3nnPotential", "GauntPotential"]
