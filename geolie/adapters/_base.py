"""Potential adapters for torch modules, and model specs (``package.module:factory`` or short names)."""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .._conservative import conservative


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


class Potential:
    """A model mapping one structure to ``{"energy", "forces"[, "stress"]}`` (see ``geolie.adapters``)."""

    name = "potential"
    method = "auto"
    device = torch.device("cpu")  # where models and inputs live; set by audit(device=...)
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    elements: Optional[Sequence[int]] = None  # supported atomic numbers (None: any)

    def check(self, st: Structure, where: str) -> None:
        if self.elements is not None:
            bad = sorted(set(int(z) for z in st.numbers) - set(self.elements))
            if bad:
                from ase.data import chemical_symbols

                raise ValueError(f"{where}: model {self.name!r} cannot handle element(s) "
                                 f"{[chemical_symbols[z] for z in bad]} (supported: "
                                 f"{[chemical_symbols[z] for z in self.elements]})")

    def function(self, st: Structure, dtype: torch.dtype):
        """``(fn, x, in_rep, out_rep)`` with ``x = (pos, z[, cell])``; ``fn(*x) -> dict`` of outputs."""
        raise NotImplementedError

    def module(self) -> Optional[torch.nn.Module]:
        """The torch module (for layer-wise attribution), or ``None``."""
        return None

    def batch_function(self, sts, dtype):
        """Several structures in one call (see :meth:`TorchPotential.batch_function`); not all models can."""
        raise ValueError(f"{self.name}: this model cannot evaluate several structures per call; use batch_size=1")

    def inputs(self, st: Structure, dtype: torch.dtype):
        """``(pos, z)`` on this potential's device."""
        return (torch.as_tensor(st.positions, dtype=dtype, device=self.device),
                torch.as_tensor(st.numbers, dtype=torch.long, device=self.device))


def _energy_of(out):
    """The energy in a model's output: the tensor itself, ``out["energy"]``, or the first entry of a tuple (PyG's
    ViSNet returns ``(energy, forces or None)``)."""
    if isinstance(out, dict):
        return out["energy"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _signature_kind(module: torch.nn.Module) -> str:
    params = list(inspect.signature(module.forward).parameters)
    if "edge_index" in params:
        return "edges"
    if len(params) >= 2 and params[0] in ("z", "numbers", "atomic_numbers") and params[1] in ("pos", "positions"):
        return "zpb"
    if params and params[0] in ("pos", "positions", "x"):
        return "pos"
    raise TypeError(f"cannot tell how to call {type(module).__name__}.forward{inspect.signature(module.forward)}: "
                    "expected forward(z, pos, batch), forward(z, pos, edge_index, batch) or forward(pos)")


class TorchPotential(Potential):
    """A torch module predicting an energy (forces by autograd, through :func:`geolie.conservative`).

    Call conventions, detected from ``forward``'s parameters: ``forward(z, pos, batch)`` (PyG style: SchNet,
    DimeNet++, ViSNet; their ``radius_graph`` is served by :mod:`geolie.neighbors` while geolie calls them),
    ``forward(z, pos, edge_index, batch)`` (edges built by geolie with ``cutoff`` and held fixed), or
    ``forward(pos)``. The module may return the energy (any shape with one element per structure), a dict with
    ``"energy"``, or a tuple whose first entry is the energy (PyG's ViSNet). Copies are cast to each dtype the audit needs; the caller's module is not modified.
    """

    def __init__(self, module: torch.nn.Module, name: str = "", cutoff: float = 5.0, kind: Optional[str] = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchPotential needs a torch.nn.Module, got {type(module).__name__}")
        self._module = module.eval()
        self.name = name or type(module).__name__
        self.cutoff = cutoff
        self.kind = kind or _signature_kind(module)
        self._copies: Dict[torch.dtype, torch.nn.Module] = {}

    def module(self):
        return self._module

    def copy_for(self, dtype):
        if dtype not in self._copies:
            self._copies[dtype] = copy.deepcopy(self._module).to(device=self.device, dtype=dtype)
        return self._copies[dtype]

    def energy_fn(self, st: Structure, dtype, module=None) -> Callable:
        m = module if module is not None else self.copy_for(dtype)
        if st.cell is not None:
            raise ValueError(f"{self.name}: periodic structures are not supported by this adapter "
                             "(the module takes no cell); audit it on molecules or wrap it yourself")
        kind = self.kind
        edges = None
        if kind == "edges":
            from ..neighbors import radius_graph

            edges = radius_graph(torch.as_tensor(st.positions, device=self.device), self.cutoff)

        def energy(pos, z):
            from .pyg import geolie_radius_graph

            with geolie_radius_graph():
                if kind == "zpb":
                    out = m(z, pos, torch.zeros_like(z))
                elif kind == "edges":
                    out = m(z, pos, edges, None)
                else:
                    out = m(pos)
            return _energy_of(out).reshape(-1).sum()

        return energy

    def batch_function(self, sts: Sequence[Structure], dtype: torch.dtype):
        """Several molecules in one call: ``(fn, (pos, z), batch, in_rep, out_rep)`` with per-structure energies."""
        if self.kind not in ("zpb", "edges") or any(st.cell is not None for st in sts):
            raise ValueError(f"{self.name}: batched audits need a forward(z, pos, batch) or forward(z, pos, "
                             "edge_index, batch) module and molecules; use batch_size=1")
        m = self.copy_for(dtype)
        pos = torch.as_tensor(np.concatenate([st.positions for st in sts]), dtype=dtype, device=self.device)
        z = torch.as_tensor(np.concatenate([st.numbers for st in sts]), dtype=torch.long, device=self.device)
        batch = torch.cat([torch.full((len(st.numbers),), i, dtype=torch.long) for i, st in enumerate(sts)]).to(
            self.device)
        kind, n = self.kind, len(sts)
        if kind == "edges":
            from ..neighbors import radius_graph

            edges = radius_graph(pos, self.cutoff, batch)

        def energy(p, zz):
            from .pyg import geolie_radius_graph

            with geolie_radius_graph():
                out = m(zz, p, batch) if kind == "zpb" else m(zz, p, edges, batch)
            return _energy_of(out).reshape(n)

        fn = conservative(energy, as_dict=True)
        return fn, (pos, z), batch, ("point", None), {"energy": "scalar", "forces": "vector"}

    def function(self, st, dtype):
        fn = conservative(self.energy_fn(st, dtype), as_dict=True)
        return fn, self.inputs(st, dtype), ("point", None), {"energy": "scalar", "forces": "vector"}


# ---------------------------------------------------------------------------------------------------------------
SHORT_NAMES = {
    "pair-mlp": "geolie.models:PairMLPPotential",
    "e3nn": "geolie.models:E3nnPotential",
    "cartesian-mlp": "geolie.models:CartesianMLPPotential",
    "gaunt": "geolie.models:GauntPotential",
    "schnet": "geolie.adapters.pyg:schnet",
    "emt": "geolie.adapters.ase_calc:emt",
    "ani1x": "geolie.adapters.pretrained:ani1x",
    "sevenn-0": "geolie.adapters.pretrained:sevenn0",
    "gate-points": "geolie.adapters.e3nn_models:gate_points",
    "chgnet": "geolie.adapters.pretrained:chgnet",
}


def load_model(spec: Any) -> Potential:
    """A :class:`Potential` from a short name (``pair-mlp``, ``e3nn``, ``cartesian-mlp``, ``gaunt``, ``schnet``,
    ``emt``, ``ani1x``, ``sevenn-0``, ``chgnet``), a ``package.module:factory`` string (the factory returns an
    ``nn.Module`` or an ASE ``Calculator``), or such an object directly. A module whose ``forward`` takes positions
    only is a :class:`PointCloudModel` with an invariant output (wrap it yourself to declare another)."""
    from .ase_calc import CalculatorPotential

    if isinstance(spec, Potential):
        return spec
    name = None
    if isinstance(spec, str):
        name = spec
        target = SHORT_NAMES.get(spec, spec)
        if ":" not in target:
            raise ValueError(f"unknown model {spec!r}: use a short name {sorted(SHORT_NAMES)} or "
                             "'package.module:factory'")
        mod_name, attr = target.split(":", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model {spec!r}: cannot import {mod_name!r} ({e})") from None
        if not hasattr(mod, attr):
            raise ValueError(f"model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        factory = getattr(mod, attr)
        obj = factory() if callable(factory) else factory
    else:
        obj = spec
    if isinstance(obj, Potential):
        return obj
    if isinstance(obj, torch.nn.Module):
        if _signature_kind(obj) == "pos":  # a model on one point cloud: invariant output unless declared
            return PointCloudModel(obj, name=name or type(obj).__name__)
        return TorchPotential(obj, name=name or type(obj).__name__)
    try:
        from ase.calculators.calculator import BaseCalculator

        if isinstance(obj, BaseCalculator):
            return CalculatorPotential(obj, name=name or type(obj).__name__)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"model {spec!r}: the factory returned a {type(obj).__name__}; expected a torch.nn.Module, an "
                    "ASE Calculator or a geolie.adapters.Potential")


class PointCloudModel(Potential):
    """A module on one point cloud, ``forward(pos [N, 3]) -> output``, with a declared output representation.

    For point-cloud classifiers (``out_rep="scalar"``: logits are invariant), segmenters (per-point scalars) and
    models predicting vectors or points. ``per_point=True`` says the output's first dimension follows the points
    (permuted with them in the finite checks). The output is reported as ``"output"``.
    """

    def __init__(self, module: Callable, out_rep: Any = "scalar", name: str = "", per_point: bool = False):
        self._module = module
        self.out_rep = out_rep
        self.per_point = per_point
        self.name = name or type(module).__name__
        self._copies: Dict[torch.dtype, Any] = {}

    def module(self):
        return self._module if isinstance(self._module, torch.nn.Module) else None

    def copy_for(self, dtype):
        if dtype not in self._copies:
            m = self._module
            self._copies[dtype] = copy.deepcopy(m).to(device=self.device, dtype=dtype) \
                if isinstance(m, torch.nn.Module) else m
        return self._copies[dtype]

    def function(self, st, dtype):
        m = self.copy_for(dtype)

        def fn(pos, z):
            return {"output": m(pos)}

        return fn, self.inputs(st, dtype), ("point", None), {"output": self.out_rep}
