"""NequIP and Allegro models (``nequip`` ≥ 0.7, ``allegro``) from their files: ``geolie audit --model nequip:PATH``.

``PATH`` is what the NequIP framework saves: a training checkpoint (``*.ckpt``, written by ``nequip-train``,
rebuilt through its Lightning module) or a package (``*.nequip.zip``, ``nequip-package``); both are read with
``nequip.model.saved_models.load_utils.load_saved_model``, eager mode. geolie builds the neighbour graph
(:mod:`geolie.adapters._graph`) and calls the ``GraphModel`` with NequIP's data dictionary (``pos``,
``edge_index`` as ``[center, neighbour]``, ``edge_cell_shift``, ``cell``, ``atom_types`` from the model's
``type_names``, and ``batch``/``num_atoms`` for several molecules). The model runs in training mode, which makes
its ``ForceStressOutput`` keep the autograd graph (``create_graph``): its forces and stress are differentiated
again, forward-over-reverse, exact. NequIP models have no dropout or batch statistics, so training mode changes
nothing else.

Precision: a NequIP model is built in its ``model_dtype`` (``float32`` or ``float64``); positions and energies are
float64 in NequIP's convention whatever the model dtype. A float32-built model cast to float64 keeps what ``.to()``
does not cast; the report's notes name such constants, and the audit's floor shows their precision (a regression
case in the tests).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

from ._graph import Graph, GraphPotentialAdapter, ModelFileError, check_file, require


class NequIPAdapter(GraphPotentialAdapter):
    """A NequIP-framework ``GraphModel`` (NequIP, Allegro); see the module docstring."""

    package = "nequip"
    extra = "nequip"
    OUTPUTS = {"energy": ("scalar", False), "forces": ("vector", True), "stress": ("stress", False),
               "atomic_energy": ("scalar", True)}

    def __init__(self, module: torch.nn.Module, path: str = "", name: str = ""):
        meta = getattr(module, "metadata", None)
        if not isinstance(meta, dict) or "r_max" not in meta or "type_names" not in meta:
            raise ModelFileError(f"nequip: {path or 'the module'} is not a NequIP GraphModel (no r_max/type_names "
                                 "metadata)")
        from ase.data import atomic_numbers

        self.type_names = list(module.type_names)
        unknown = [t for t in self.type_names if t not in atomic_numbers]
        if unknown:
            raise ValueError(f"nequip: the model's type names {unknown} are not chemical symbols; geolie maps atoms "
                             "to NequIP types by symbol")
        z = [atomic_numbers[t] for t in self.type_names]
        super().__init__(module, path=path, name=name, cutoff=float(meta["r_max"]), elements=z)
        self._index = torch.full((119,), -1, dtype=torch.long)
        self._index[torch.tensor(z)] = torch.arange(len(z))
        self.model_dtype = str(meta.get("model_dtype", ""))

    def _prepare(self, m):
        # NequIP modules cast their activations to a ``model_dtype`` / ``_output_dtype`` attribute (a torch.dtype,
        # which .to() leaves alone): a copy cast to another dtype computes in it only once these follow
        dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            for mod in m.modules():
                for attr in ("model_dtype", "_output_dtype"):
                    if isinstance(getattr(mod, attr, None), torch.dtype):
                        setattr(mod, attr, dtype)
        return m.train()  # ForceStressOutput uses create_graph=self.training; no dropout or batch statistics

    def notes(self, dtype: torch.dtype) -> List[str]:
        want = str(dtype).replace("torch.", "")
        if self.model_dtype and self.model_dtype != want:
            return [f"the NequIP model was built with model_dtype={self.model_dtype} and is audited as a {want} copy "
                    "(parameters cast with .to() and NequIP's model_dtype attributes set to it; tensor constants "
                    ".to() misses, if any, are named in another note)"]
        return []

    def _run(self, m, pos, cell, g: Graph, stress: bool) -> Dict[str, torch.Tensor]:
        data = {"pos": pos, "edge_index": torch.stack([g.i, g.j]),
                "atom_types": self._index.to(g.z.device)[g.z]}
        B = g.n_structures
        if cell is not None:
            data["cell"] = cell.reshape(1, 3, 3)
            data["edge_cell_shift"] = g.S
            data["pbc"] = torch.ones(1, 3, dtype=torch.bool, device=pos.device)
        if B > 1:
            data["batch"] = g.batch
            data["num_atoms"] = torch.bincount(g.batch, minlength=B)
        out = m(data)
        res = {"energy": out["total_energy"].reshape(B), "forces": out["forces"]}
        if stress and "stress" in out:
            res["stress"] = out["stress"].reshape(B, 3, 3)
        if "atomic_energy" in out:
            res["atomic_energy"] = out["atomic_energy"].reshape(-1)
        return res


def load(path: str) -> NequIPAdapter:
    """A NequIP checkpoint (``.ckpt``) or package (``.nequip.zip``) as a geolie potential."""
    require("nequip", "nequip")
    check_file(path, "nequip")
    from nequip.model.saved_models.load_utils import load_saved_model

    try:
        with nequip_global_state():
            model = load_saved_model(path)
    except Exception as e:  # noqa: BLE001 - a file nequip cannot read, said with its cause
        raise ModelFileError(f"nequip: cannot load model file {path!r} (a NequIP .ckpt or .nequip.zip): "
                             f"{type(e).__name__}: {e}") from None
    return NequIPAdapter(model, path=path)


@contextlib.contextmanager
def nequip_global_state():
    """NequIP's ``set_global_state`` inside the block, the caller's process state restored after it.

    NequIP builds models only after ``set_global_state``, which changes the whole process: torch's default dtype
    (float64), every random generator (``seed_everything(123)``), e3nn's optimisation defaults (which change how
    e3nn modules built later are compiled: geolie's own e3nn models then fail to copy) and the TorchScript fusion
    strategy. geolie restores all four when the block ends (the loaded model reads none of them)."""
    import random

    import numpy as np
    from nequip.utils.global_state import global_state_initialized, set_global_state

    import e3nn

    saved = (torch.get_default_dtype(), torch.get_rng_state(), np.random.get_state(), random.getstate(),
             dict(e3nn.get_optimization_defaults()))
    fusion = None
    try:
        if not global_state_initialized():
            fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])  # returns the caller's
            torch.jit.set_fusion_strategy(fusion)
            set_global_state(allow_tf32=False)
        yield
    finally:
        torch.set_default_dtype(saved[0])
        torch.set_rng_state(saved[1])
        np.random.set_state(saved[2])
        random.setstate(saved[3])
        e3nn.set_optimization_defaults(**saved[4])
        if fusion is not None:
            torch.jit.set_fusion_strategy(fusion)
