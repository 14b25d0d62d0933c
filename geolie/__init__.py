"""geolie: how equivariant is your model? Lie derivatives under SO(3)/SE(3) for point clouds and molecules.

The public API is flat (small private modules re-exported here): groups (``SO3``, ``SE3``), representations
(``as_rep``, ``register_rep``), the adapter-to-engine hand-off (``Evaluation``), the engine (``lie_derivative``,
``conservative``, ``conservativeness``, ``measure``, ``finite_equivariance_error``), the audit (``audit``,
``AuditReport``, ``write_report``, ``layerwise_attribution``, ``hunt`` for the worst orientation,
``testing.assert_equivariant``), a training penalty (``losses.lie_penalty``), a
training monitor (``monitor.EquivarianceMonitor``) and data (``geolie.data``).
Baselines live in ``geolie.nn``, bundled models in ``geolie.models``, adapters in ``geolie.adapters``.

See the docs (docs/src/concepts/conventions.md) for the conventions (positions are rows, ``pos @ R.T + t``; generators ``rx ry rz tx ty tz``;
``L_X f(x) = d/dt|0 ρ_out(exp(tX))⁻¹ f(ρ_in(exp(tX)) x)``).
"""
from ._groups import LieGroup, SE3, SO3, as_group, hat, so3_exp, so3_log, vee
from ._reps import (
    IrrepsRep, PointRep, PseudovectorRep, Rep, ScalarRep, Tensor2Rep, VectorRep, as_rep, known_reps, register_rep,
    tensor2_parts,
)
from ._evaluation import Evaluation
from ._lie import GeolieADCheckWarning, GeolieFallbackWarning, LieResult, lie_derivative, lie_result
from ._conservative import conservative, conservativeness, lie_energy_from_forces, stress_gap
from ._metrics import OutputMetrics, Report, aggregate, measure
from ._finite import FiniteReport, finite_equivariance_error
from ._audit import audit
from ._report import AuditReport, merge, write_report
from ._layerwise import layerwise_attribution
from ._hunt import HuntResult, hunt
from . import data, losses, monitor, testing

__version__ = "0.1.0"

__all__ = [
    "LieGroup", "SO3", "SE3", "as_group", "hat", "vee", "so3_exp", "so3_log",
    "Rep", "ScalarRep", "VectorRep", "PseudovectorRep", "PointRep", "Tensor2Rep", "IrrepsRep", "as_rep", "known_reps",
    "register_rep", "tensor2_parts",
    "lie_derivative", "lie_result", "LieResult", "GeolieFallbackWarning", "GeolieADCheckWarning", "conservative",
    "conservativeness", "stress_gap",
    "lie_energy_from_forces", "Evaluation",
    "measure", "Report", "OutputMetrics", "aggregate", "finite_equivariance_error", "FiniteReport",
    "audit", "AuditReport", "write_report", "merge", "layerwise_attribution", "hunt", "HuntResult", "data", "losses", "monitor",
    "testing",
]
