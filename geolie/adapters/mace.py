"""MACE models (``mace-torch``) from the files MACE saves: ``geolie audit --model mace:PATH``.

A MACE model file is the whole module pickled with ``torch.save`` (what ``mace_run_train`` writes as
``*.model``, and what ``MACECalculator(model_paths=...)`` reads). geolie loads it, builds the neighbour graph
itself (:mod:`geolie.adapters._graph`) and calls the module with MACE's own data dictionary (``positions``,
one-hot ``node_attrs`` over ``model.atomic_numbers``, ``edge_index`` as ``[sender, receiver]``, ``shifts =
unit_shifts · cell``, ``cell``, ``batch``, ``ptr``, ``head``) and ``training=True``, which makes MACE's
``torch.autograd.grad`` keep its graph (``create_graph``) so that its forces and stress can be differentiated
again: forward-over-reverse, exact. The outputs audited are those MACE returns: ``energy``, ``forces``,
``stress`` (periodic; MACE's ``σ = (1/V) ∂E/∂ε``, ASE's sign) and ``node_energy`` (per-atom energies).

Installing next to geolie: ``mace-torch`` 0.3.16 pins ``e3nn==0.4.4`` while geolie needs e3nn ≥ 0.5. MACE's
models build and run with e3nn 0.6 (tested here: energies, forces, stress equal to ``MACECalculator``'s, float64
floor 1e-15), so the extra installs MACE's dependencies and MACE itself without its pin::

    pip install "geolie[mace]" && pip install --no-deps mace-torch==0.3.16

(``geolie[mace]`` lists MACE's dependencies other than e3nn.) cuEquivariance (``enable_cueq``) is a GPU path that
MACE converts models to; a converted model file is audited the same way.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ._graph import Graph, GraphPotentialAdapter, ModelFileError, require, torch_load


class MACEAdapter(GraphPotentialAdapter):
    """A MACE model (any of ``mace.modules.models``' energy models) from its file; see the module docstring."""

    package = "mace"
    extra = "mace"
    OUTPUTS = {"energy": ("scalar", False), "forces": ("vector", True), "stress": ("stress", False),
               "node_energy": ("scalar", True)}

    def __init__(self, module: torch.nn.Module, path: str = "", name: str = "", head: Optional[str] = None):
        if not hasattr(module, "atomic_numbers") or not hasattr(module, "r_max"):
            raise ModelFileError(f"mace: {path or 'the module'} is not a MACE model (a {type(module).__name__} "
                                 "without atomic_numbers and r_max)")
        z = [int(v) for v in module.atomic_numbers]
        super().__init__(module, path=path, name=name, cutoff=float(module.r_max), elements=z)
        self._index = torch.full((119,), -1, dtype=torch.long)
        self._index[torch.tensor(z)] = torch.arange(len(z))
        heads = list(getattr(module, "heads", None) or ["Default"])
        if head is not None and head not in heads:
            raise ValueError(f"mace: the model has heads {heads}, not {head!r}")
        self.head = heads.index(head) if head is not None else len(heads) - 1
        self.heads = heads

    def notes(self, dtype: torch.dtype) -> List[str]:
        return [f"MACE head {self.heads[self.head]!r}"] if len(self.heads) > 1 else []

    def _energy_pass_outputs(self) -> set:
        return {"node_energy"}

    def _run_energy(self, m, pos, g: Graph) -> Dict[str, torch.Tensor]:
        out = m(self._data(pos, None, g), training=True, compute_force=False)
        return {"node_energy": out["node_energy"]}

    def _run(self, m, pos, cell, g: Graph, stress: bool) -> Dict[str, torch.Tensor]:
        out = m(self._data(pos, cell, g), training=True, compute_force=True, compute_stress=stress)
        res = {k: out.get(k) for k in ("energy", "forces", "stress", "node_energy")}
        return {k: v for k, v in res.items() if v is not None}

    def _data(self, pos, cell, g: Graph) -> Dict[str, torch.Tensor]:
        """MACE's input dict for ``pos``, ``cell`` (or ``None``) and the graph."""
        n_el = len(self.elements)
        idx = self._index.to(g.z.device)[g.z]
        node_attrs = torch.nn.functional.one_hot(idx, n_el).to(pos.dtype)
        B = g.n_structures
        if cell is not None:
            cells = cell.reshape(1, 3, 3).expand(B, 3, 3).reshape(-1, 3)
            shifts = g.S @ cell.reshape(3, 3)
        else:
            cells = torch.zeros(3 * B, 3, dtype=pos.dtype, device=pos.device)
            shifts = torch.zeros_like(g.S)
        return {"positions": pos, "node_attrs": node_attrs, "edge_index": torch.stack([g.i, g.j]),
                "shifts": shifts, "unit_shifts": g.S, "cell": cells, "batch": g.batch, "ptr": g.ptr,
                "head": torch.full((B,), self.head, dtype=torch.long, device=pos.device)}


def load(path: str, head: Optional[str] = None) -> MACEAdapter:
    """A MACE model file (``torch.save`` of the module, as MACE writes it) as a geolie potential."""
    require("mace.modules", "mace", "mace-torch")
    obj = torch_load(path, "mace")
    if isinstance(obj, dict):
        raise ModelFileError(f"mace: {path!r} holds a dict (keys {sorted(obj)[:6]}), not a pickled MACE model: a "
                             "training checkpoint or another package's file; MACE model files are torch.save(model)")
    if not isinstance(obj, torch.nn.Module):
        raise ModelFileError(f"mace: {path!r} holds a {type(obj).__name__}, not a MACE model")
    return MACEAdapter(obj, path=path, head=head)
