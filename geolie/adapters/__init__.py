"""Adapters at the edge: turn models of other libraries into geolie's uniform *potential* interface.

The engine (``lie_derivative``, ``measure``, ``finite_equivariance_error``) knows nothing of ASE or PyG; the audit
uses these adapters. A :class:`Potential` maps one structure to its outputs:

``potential.function(structure, dtype) -> (fn, x, in_rep, out_rep)`` where ``fn(*x)`` returns a dict
``{"energy": [1], "forces": [N, 3], "stress": [3, 3]}`` (the keys the model provides), ``x`` is ``(pos,)`` or
``(pos, cell)`` for periodic structures, and ``in_rep``/``out_rep`` declare how they transform.
"""
from ._base import PointCloudModel, Potential, Structure, TorchPotential, load_model
from .ase_calc import CalculatorPotential

__all__ = ["Potential", "TorchPotential", "PointCloudModel", "CalculatorPotential", "Structure", "load_model"]
