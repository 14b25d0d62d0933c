r"""The hand-off from adapters to the engine: one named :class:`Evaluation` instead of unnamed tuples.

An adapter (``geolie.adapters``) turns a model and a structure into an ``Evaluation``: the function the engine
differentiates, its inputs with their representations, the outputs' representations, which inputs and outputs are
per atom (permuted together in the finite checks), where each output comes from (the model's own head, or geolie's
``-∇E`` / strain derivative), and what limits its precision. The engine (:func:`geolie.measure`,
:func:`geolie.finite_equivariance_error`, :func:`geolie.conservativeness`) reads these fields and nothing else; it
knows nothing of ASE or PyG.

Where an output comes from (``sources``):

* ``"model"``: returned by the model's ``forward`` as is (a force head, a stress head, a dipole, ...);
* ``"-dE/dx (geolie)"``: forces that geolie computed as the negative gradient of the model's energy;
* ``"strain derivative (geolie)"``: stress ``σ = (1/V) ∂E/∂ε`` computed by geolie (ASE's sign convention);
* ``"-dE/dx (model autograd)"``: forces the model computes itself from its energy's gradient (SevenNet, CHGNet);
* ``"calculator"``: an ASE calculator's result (differentiated by finite differences).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Evaluation", "stacked_batch", "NotStackable", "check_known_outputs"]


class NotStackable(ValueError):
    """Raised by an ``Evaluation.stack`` function whose model did not return one result per stacked copy (it ignores
    its batch argument): the caller evaluates the copies one at a time instead."""

GEOLIE_FORCES = "-dE/dx (geolie)"
GEOLIE_STRESS = "strain derivative (geolie)"
MODEL = "model"
MODEL_AUTOGRAD_FORCES = "-dE/dx (model autograd)"
CALCULATOR = "calculator"


@dataclass
class Evaluation:
    """One model on one structure (or one batch of structures), ready for the engine.

    ``fn(*inputs)`` returns a dict of output tensors whose keys are those of ``out_rep``. ``inputs[0]`` are the
    positions ``[N, 3]``; ``in_rep`` declares each input (``None`` for invariant ones such as atomic numbers).
    ``batch`` (``[N]`` structure index) is set when several structures are evaluated at once.
    """

    fn: Callable[..., Dict[str, torch.Tensor]]
    inputs: Tuple[Any, ...]
    in_rep: Tuple[Any, ...]
    out_rep: Dict[str, Any]
    batch: Optional[torch.Tensor] = None
    per_atom_inputs: Tuple[bool, ...] = ()
    per_atom: Dict[str, bool] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    method: str = "auto"
    notes: List[str] = field(default_factory=list)
    #: ``stack(K)`` -> ``fn_K(pos_K, z_K)``: the same model on ``K`` copies of these structures in one call, for
    #: adapters that batch molecules (``None`` otherwise). Inputs are concatenated along their first dimension (``K``
    #: blocks of ``N`` atoms, each copy moved differently), outputs come back the same way (per-atom ones in ``K``
    #: blocks of ``N`` rows, per-structure ones in ``K`` blocks of :attr:`n_structures`). The finite checks evaluate
    #: all their group elements in one such call (:func:`geolie.finite_equivariance_error`).
    stack: Optional[Callable[[int], Callable[..., Dict[str, torch.Tensor]]]] = None
    #: the precision that bounds the model's arithmetic when it is lower than its inputs' dtype (a float64 copy that
    #: keeps float32 constants: :func:`geolie.adapters.cast_copy`); its floors are then not scaled to float64
    #: (:func:`geolie._verdict.precision_scale`). ``None``: the inputs' dtype.
    precision: Optional[torch.dtype] = None

    def __post_init__(self):
        if len(self.inputs) != len(self.in_rep):
            raise ValueError(f"Evaluation: {len(self.inputs)} inputs but {len(self.in_rep)} input representations")
        if not self.per_atom_inputs:
            # positions and atomic numbers move together under a permutation; a cell does not
            self.per_atom_inputs = tuple(i < 2 for i in range(len(self.inputs)))
        for name in self.out_rep:
            self.per_atom.setdefault(name, name == "forces")
            self.sources.setdefault(name, MODEL)

    @property
    def n_structures(self) -> int:
        return 1 if self.batch is None else int(self.batch.max()) + 1

    @property
    def has_model_stress(self) -> bool:
        """Energy and stress both returned by the model (a stress head), for one periodic structure: whether the
        stress is the energy's strain derivative is a question (:func:`geolie._conservative.stress_gap`)."""
        return ("energy" in self.out_rep and "stress" in self.out_rep and self.sources.get("stress") == MODEL
                and "cell" in self.in_rep and self.batch is None)

    @property
    def has_model_forces(self) -> bool:
        """Energy and forces both returned, the forces not computed by geolie: conservativeness is a question."""
        return "energy" in self.out_rep and "forces" in self.out_rep and self.sources.get("forces") != GEOLIE_FORCES


def stacked_batch(batch: Optional[torch.Tensor], n_atoms: int, k: int, device=None) -> torch.Tensor:
    """The ``batch`` vector of ``k`` copies of a structure set (``batch [N]``, or one structure when ``None``): copy
    ``c``'s structures are numbered after copy ``c − 1``'s."""
    if batch is None:
        return torch.arange(k, device=device).repeat_interleave(n_atoms)
    n_struct = int(batch.max()) + 1
    return torch.cat([batch + c * n_struct for c in range(k)])


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_known_outputs(out: Dict[str, Any], n_atoms: int, n_structures: int, where: str) -> None:
    """Refuse, before anything is differentiated, an ``energy``, ``forces`` or ``stress`` output of the wrong shape:
    an energy is one scalar per structure (``[]``, ``[1]``, ``[B]`` or ``[B, 1]``), forces are ``[N, 3]``, stress is
    ``[3, 3]`` per structure (``[3, 3]``, ``[1, 3, 3]`` or ``[B, 3, 3]``). A model returning a vector or per-atom
    values as its "energy" would otherwise be summed and audited as a scalar. The error names the output, the
    expected and the actual shape; per-atom energies are audited when declared under another name (``out_rep``)."""
    e = out.get("energy")
    if e is not None:
        if not isinstance(e, torch.Tensor) or e.numel() != n_structures:
            per_atom = isinstance(e, torch.Tensor) and e.dim() >= 1 and e.shape[0] == n_atoms and n_atoms > 1
            hint = (" (it has one value per atom: return their sum, or declare per-atom energies under another name "
                    "with out_rep={'atomic_energies': 'scalar'})" if per_atom else "")
            raise ValueError(f"{where}: output 'energy' must be one scalar per structure, shape [{n_structures}]"
                             f"{' or []' if n_structures == 1 else ''}; the model returned shape {_shape(e)}{hint}")
    f = out.get("forces")
    if f is not None and (not isinstance(f, torch.Tensor) or tuple(f.shape) != (n_atoms, 3)):
        raise ValueError(f"{where}: output 'forces' must have shape [{n_atoms}, 3] (one row per atom); the model "
                         f"returned shape {_shape(f)}")
    s = out.get("stress")
    if s is not None and (not isinstance(s, torch.Tensor) or s.numel() != 9 * n_structures
                          or tuple(s.shape[-2:]) != (3, 3)):
        raise ValueError(f"{where}: output 'stress' must be a [3, 3] tensor per structure, shape "
                         f"[{n_structures}, 3, 3]{' or [3, 3]' if n_structures == 1 else ''}; the model returned shape "
                         f"{_shape(s)} (Voigt 6-vectors are not read: return the full tensor)")
