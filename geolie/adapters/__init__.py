"""Adapters at the edge: models of other libraries behind one interface, :class:`Adapter`.

The engine (``lie_derivative``, ``measure``, ``finite_equivariance_error``) knows nothing of ASE or PyG; the audit
uses these adapters. A :class:`Adapter` maps a structure to a :class:`geolie.Evaluation` (the function the engine
differentiates, its inputs and their representations, the outputs as the model returns them and where each comes
from): ``adapter.evaluation(structure, dtype)``, ``adapter.batch_evaluation(structures, dtype)``.

One file per adapter family: ``_protocol`` (:class:`Structure`, :class:`Adapter`, :func:`cast_copy`),
``torch_module`` (torch modules), ``ase_calc`` (ASE calculators), ``pyg`` (PyG models), ``e3nn_models``,
``pretrained`` (potentials whose weights ship in their wheels), and one file per potential package whose model files
geolie reads (``mace``, ``nequip``, ``orb``, on the shared ``_graph`` base); ``_registry`` resolves model specs
(:data:`FILE_PACKAGES`: adding a package is one file and one line there).
"""
from ._protocol import Adapter, Structure, cast_copy
from ._graph import GraphPotentialAdapter, ModelFileError
from ._registry import FILE_PACKAGES, SHORT_NAMES, available_models, load_model
from .ase_calc import CalculatorAdapter
from .pyg import PyGAdapter
from .torch_module import PointCloudAdapter, TorchAdapter

__all__ = ["Adapter", "TorchAdapter", "PyGAdapter", "PointCloudAdapter", "CalculatorAdapter", "Structure", "load_model",
           "cast_copy", "SHORT_NAMES", "FILE_PACKAGES", "available_models", "GraphPotentialAdapter", "ModelFileError"]
