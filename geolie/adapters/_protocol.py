"""The adapter protocol: :class:`Structure`, :class:`Adapter`, and the one helper that copies a model to a dtype."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._evaluation import Evaluation


class NotBatchableError(ValueError):
    """A model that takes a ``batch`` argument but does not return one value per structure (the audit then goes one
    structure per call when it chose to batch, and reports the error when the user asked for batches)."""


@dataclass
class Structure:
    """One structure: atomic numbers, positions (Å), optional cell (rows) for periodic systems, a name."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: Optional[np.ndarray] = None
    name: str = ""
    labels: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_atoms(cls, atoms, name: str = "") -> "Structure":
        cell = np.asarray(atoms.cell, dtype=np.float64) if atoms.pbc.any() else None
        return cls(np.asarray(atoms.numbers), np.asarray(atoms.positions, dtype=np.float64), cell,
                   name or atoms.get_chemical_formula())

    def to_atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell,
                     pbc=self.cell is not None)


def cast_copy(module: torch.nn.Module, device, dtype: torch.dtype) -> Tuple[torch.nn.Module, List[str]]:
    """A deep copy of ``module`` on ``device`` in ``dtype``, and notes on floating-point tensors the cast missed.

    ``Module.to`` casts parameters and buffers only; constants held as plain tensor attributes (e3nn's generated
    code, hand-written caches) keep their dtype. Such leftovers limit the copy's precision: a float64 copy with
    float32 constants computes with float32-rounded coefficients, and its Lie derivatives show it. The notes name them.
    """
    m = copy.deepcopy(module).to(device=device, dtype=dtype)
    left = [f"{name} ({str(d).replace('torch.', '')})" for name, d in leftover_constants(m, dtype)]
    notes = []
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        notes.append(f"the {str(dtype).replace('torch.', '')} copy keeps {len(left)} constant tensor(s) of another "
                     f"dtype that .to() does not cast: {shown}; the floor is that of those constants")
    return m, notes


def leftover_constants(module: torch.nn.Module, dtype: torch.dtype) -> List[Tuple[str, torch.dtype]]:
    """Floating-point tensors held as plain attributes of ``module``'s submodules in a dtype other than ``dtype``
    (``Module.to`` does not cast them): ``(name, dtype)`` each."""
    left: List[Tuple[str, torch.dtype]] = []
    for mod_name, mod in module.named_modules():
        for attr, v in vars(mod).items():
            if attr in ("_parameters", "_buffers") or not isinstance(v, torch.Tensor):
                continue
            if v.is_floating_point() and v.dtype != dtype:
                left.append((f"{mod_name + '.' if mod_name else ''}{attr}", v.dtype))
    return left


def bounding_precision(module: torch.nn.Module, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The lowest precision among ``module``'s left-over constants when it is below ``dtype`` (it bounds the
    arithmetic of a copy cast to ``dtype``), else ``None``."""
    u = torch.finfo(dtype).eps
    low = [d for _, d in leftover_constants(module, dtype) if torch.finfo(d).eps > u]
    return max(low, key=lambda d: torch.finfo(d).eps) if low else None


def with_autograd(pos: torch.Tensor) -> torch.Tensor:
    """``pos`` connected to autograd, for models that compute forces with ``torch.autograd.grad`` inside: ``pos``
    itself when it already requires grad, else ``pos`` plus a zero that does. Not ``detach().requires_grad_()``:
    that would drop a forward-mode tangent riding on ``pos``, and the Lie derivative with it."""
    if pos.requires_grad:
        return pos
    return pos + torch.zeros((), dtype=pos.dtype, device=pos.device, requires_grad=True)


class Adapter:
    """What the audit needs of a model (the adapter protocol).

    * ``name``, ``dtypes`` (the precisions it runs in), ``elements`` (supported atomic numbers or ``None``),
      ``device`` (set with :meth:`to`), ``method`` (the engine's differentiation method);
    * :meth:`evaluation` one structure, :meth:`batch_evaluation` several at once (not every model can);
    * :meth:`layerwise_target` the module and the function of positions for layer-wise attribution (or ``None``);
    * ``dtype_note``: why the model runs only in ``dtypes`` (said in reports), empty otherwise.
    """

    name = "model"
    method = "auto"
    device = torch.device("cpu")
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    elements: Optional[Sequence[int]] = None
    dtype_note = ""

    def to(self, device) -> "Adapter":
        """Run on ``device`` from now on."""
        self.device = torch.device(device)
        return self

    def check(self, st: Structure, where: str) -> None:
        if len(st.numbers) == 0:
            raise ValueError(f"{where}: empty structure")
        if self.elements is not None:
            bad = sorted(set(int(z) for z in st.numbers) - set(self.elements))
            if bad:
                from ase.data import chemical_symbols

                raise ValueError(f"{where}: model {self.name!r} cannot handle element(s) "
                                 f"{[chemical_symbols[z] for z in bad]} (supported: "
                                 f"{[chemical_symbols[z] for z in self.elements]})")

    def fingerprint(self) -> str:
        """A short hash of what the model computes with, for a run's identity: its module's parameters and buffers
        (names, shapes, values) where it has one (``_module``), else its class and ``parameters`` (ASE calculators)."""
        import hashlib

        h = hashlib.sha256(type(self).__name__.encode())
        mod = getattr(self, "_module", None)
        if isinstance(mod, torch.nn.Module):
            for k, v in mod.state_dict().items():
                if isinstance(v, torch.Tensor):
                    h.update(k.encode() + str(tuple(v.shape)).encode())
                    h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(sorted((getattr(getattr(self, "calc", None), "parameters", None) or {}).items())).encode())
        return h.hexdigest()[:16]

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        raise NotImplementedError

    def batch_evaluation(self, sts: Sequence[Structure], dtype: torch.dtype) -> Evaluation:
        raise ValueError(f"{self.name}: this model cannot evaluate several structures per call; use batch_size=1")

    def can_batch(self, st: Structure) -> bool:
        """Whether ``st`` may share a :meth:`batch_evaluation` call with other structures (the audit batches by
        default where this holds)."""
        return False

    def layerwise_target(self, st: Structure, dtype: torch.dtype):
        """``(module, f(pos) -> output, out_rep)`` for layer-wise attribution, or ``None`` when not supported; a fourth
        element, when present, holds more keyword arguments of :func:`geolie.layerwise_attribution` (``reps``,
        ``units``) for modules whose representations geolie cannot infer."""
        return None

    def inputs(self, st: Structure, dtype: torch.dtype):
        """``(pos, z)`` on this adapter's device."""
        return (torch.as_tensor(st.positions, dtype=dtype, device=self.device),
                torch.as_tensor(st.numbers, dtype=torch.long, device=self.device))

    def cell(self, st: Structure, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The structure's cell ``[3, 3]`` (rows are lattice vectors) on this adapter's device, or ``None``."""
        return None if st.cell is None else torch.as_tensor(st.cell, dtype=dtype, device=self.device)

    def batch_inputs(self, sts: Sequence[Structure], dtype: torch.dtype):
        """``(pos, z, batch)`` of several structures concatenated, on this adapter's device (``batch [N]``: which
        structure each atom belongs to)."""
        pos = torch.as_tensor(np.concatenate([st.positions for st in sts]), dtype=dtype, device=self.device)
        z = torch.as_tensor(np.concatenate([st.numbers for st in sts]), dtype=torch.long, device=self.device)
        batch = torch.cat([torch.full((len(st.numbers),), k, dtype=torch.long) for k, st in enumerate(sts)]).to(
            self.device)
        return pos, z, batch


class CopyCache:
    """Per-(device, dtype) copies of a module (see :func:`cast_copy`), with the notes each cast produced; ``build``
    (``(device, dtype) -> (copy, notes)``) replaces the cast for models a package must rebuild in each dtype."""

    def __init__(self, module: torch.nn.Module, prepare: Optional[Callable[[torch.nn.Module], Any]] = None,
                 build: Optional[Callable[[Any, torch.dtype], Tuple[Any, List[str]]]] = None):
        self.module = module
        self.prepare = prepare
        self.build = build or (lambda device, dtype: cast_copy(self.module, device, dtype))
        self.copies: Dict[Tuple[str, torch.dtype], Tuple[torch.nn.Module, List[str]]] = {}
        self.precisions: Dict[Tuple[str, torch.dtype], Optional[torch.dtype]] = {}

    def get(self, device, dtype) -> Tuple[torch.nn.Module, List[str]]:
        key = (str(device), dtype)
        if key not in self.copies:
            m, notes = self.build(device, dtype)
            if self.prepare is not None:
                m = self.prepare(m) or m
            self.copies[key] = (m, notes)
            self.precisions[key] = bounding_precision(m, dtype) if isinstance(m, torch.nn.Module) else None
        return self.copies[key]

    def precision(self, device, dtype) -> Optional[torch.dtype]:
        """The precision bounding the copy's arithmetic when below ``dtype`` (:func:`bounding_precision`)."""
        self.get(device, dtype)
        return self.precisions[(str(device), dtype)]
