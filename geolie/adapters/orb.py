"""Orb models (``orb-models`` 0.5, Orbital Materials): ``geolie audit --model orb:...``.

Orb v3 models are *not* built equivariant: a graph network on raw edge vectors, trained with rotation augmentation
(and, for the conservative models, Orb's "equigrad" penalty on the energy's rotational gradient). Two kinds:

* ``orb-v3-direct-*``: energy, forces and stress from separate heads (direct forces, not ``−∇E``);
* ``orb-v3-conservative-*``: forces and stress from the energy's gradient (``grad_forces``, ``grad_stress``), plus
  the model's ``confidence`` logits (per-atom scalars).

Model files, as Orb saves them: ``orb:ARCHITECTURE:WEIGHTS`` loads a state dict (a ``.ckpt`` as Orb publishes
and fine-tunes them) into the architecture named like Orb's pretrained loaders (``orb-v3-direct-20-omat``,
``orb-v3-conservative-inf-mpa``, ...; the architecture fixes the cutoff and neighbour limit) with Orb's own
``orb_models.forcefield.pretrained.<name>(weights_path=...)``; ``orb:PATH`` loads a whole model saved with
``torch.save(model)``. No download is attempted.

geolie builds the graph with Orb's own ``ase_atoms_to_atom_graphs`` (its k-nearest-neighbour limit included,
``wrap=False`` so that lattice shifts refer to the positions geolie differentiates), holds it fixed near the base
geometry, and feeds the positions and cell as differentiable inputs: the direct model's edge vectors are
recomputed from them; the conservative model recomputes them itself and runs in training mode so that its
``torch.autograd.grad`` keeps the graph (``create_graph``; Orb has no dropout). Outputs are those of
``model.predict`` (denormalised, the units of Orb's calculator), stress converted from Voigt to ``[3, 3]``.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import _evaluation as ev_mod
from .._torch_utils import default_dtype
from ._graph import (MODEL_AUTOGRAD_STRESS, GraphPotentialAdapter, ModelFileError, atoms_per_structure,
                     require, torch_load, weights_only_load)

_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def voigt_to_full(v: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` Voigt stress (ASE's order xx, yy, zz, yz, xz, xy) to ``[..., 3, 3]`` (differentiable)."""
    rows = [[None] * 3 for _ in range(3)]
    for k, (a, b) in enumerate(_VOIGT):
        rows[a][b] = rows[b][a] = v[..., k]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


class OrbAdapter(GraphPotentialAdapter):
    """An Orb v3 direct or conservative model; see the module docstring."""

    package = "orb"
    extra = "orb"
    # Orb's ``confidence`` head reads detached node features (a constant for autograd): not audited
    OUTPUTS = {"energy": ("scalar", False), "forces": ("vector", True), "stress": ("stress", False)}

    #: forward mode through Orb's modules disagrees with their reverse pass (the engine's adjoint test, measured on
    #: direct and conservative v3 models: relative disagreement 1e-3..4e-1), so the reverse-mode method is used
    method = "double-backward"

    def __init__(self, module: torch.nn.Module, path: str = "", name: str = ""):
        cfg = getattr(module, "system_config", None)
        if cfg is None or not hasattr(module, "heads"):
            raise ModelFileError(f"orb: {path or 'the module'} is not an Orb forcefield model (a "
                                 f"{type(module).__name__} without system_config and heads)")
        self.conservative = hasattr(module, "grad_forces_name")
        super().__init__(module, path=path, name=name, cutoff=float(cfg.radius), elements=None)
        self.system_config = cfg

    def _prepare(self, m):
        for p in m.parameters():
            p.requires_grad_(False)
        # the conservative model's autograd.grad keeps its graph only in training mode (Orb has no dropout)
        return m.train() if self.conservative else m.eval()

    def sources(self) -> Dict[str, str]:
        if self.conservative:
            return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL_AUTOGRAD_FORCES, "stress": MODEL_AUTOGRAD_STRESS}
        return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL, "stress": ev_mod.MODEL}

    def notes(self, dtype: torch.dtype) -> List[str]:
        kind = "conservative (forces and stress from the energy's gradient)" if self.conservative else \
            "direct (forces and stress from their own heads)"
        return [f"Orb {kind}; neighbour graph: Orb's own, radius {self.cutoff} Å, at most "
                f"{self.system_config.max_num_neighbors} neighbours"]

    def _graph(self, z, pos, cell, batch, dtype):
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs
        from orb_models.forcefield.base import batch_graphs

        graphs = [ase_atoms_to_atom_graphs(at, self.system_config, wrap=False, output_dtype=dtype,
                                           graph_construction_dtype=torch.float64)
                  for at in atoms_per_structure(z, pos, cell, batch)]
        g = graphs[0] if len(graphs) == 1 else batch_graphs(graphs)
        return g.to(self.device)

    def _run(self, m, pos, cell, g, stress: bool) -> Dict[str, torch.Tensor]:
        B = int(g.n_node.numel())
        g = g.clone()
        g.node_features["positions"] = pos
        if cell is not None:
            g.system_features["cell"] = cell.reshape(1, 3, 3)
        cells = g.system_features["cell"].to(pos.dtype)
        if not self.conservative:
            idx = torch.repeat_interleave(torch.arange(B, device=pos.device), g.n_edge)
            shifts = torch.bmm(g.edge_features["unit_shifts"].to(pos.dtype).unsqueeze(1), cells[idx]).squeeze(1)
            g.edge_features["vectors"] = pos[g.receivers] - pos[g.senders] + shifts
        with default_dtype(pos.dtype):  # Orb makes some tensors in torch's default dtype (its stress solve)
            out = m.predict(g)
        if self.conservative:
            res = {"energy": out[m.energy_name], "forces": out[m.grad_forces_name]}
            st = out.get(m.grad_stress_name)
        else:
            res = {"energy": out["energy"], "forces": out.get("forces")}
            st = out.get("stress")
        if stress and st is not None:
            res["stress"] = voigt_to_full(st.reshape(B, 6))
        res["energy"] = res["energy"].reshape(B)
        return {k: v for k, v in res.items() if v is not None}


def load(spec: str) -> OrbAdapter:
    """``ARCHITECTURE:WEIGHTS`` (a state dict loaded by Orb's pretrained loader of that name) or ``PATH`` (a
    ``torch.save`` of the whole model); see the module docstring."""
    require("orb_models.forcefield.pretrained", "orb", "orb-models")
    from orb_models.forcefield import pretrained

    head, _, rest = spec.partition(":")
    arch = head.replace("-", "_")
    if rest and arch.startswith("orb_"):
        fn = getattr(pretrained, arch, None)
        if fn is None or arch.endswith("_architecture"):
            names = sorted(n.replace("_", "-") for n in dir(pretrained) if n.startswith("orb_v") and
                           not n.endswith("_architecture"))
            raise ValueError(f"orb: unknown architecture {head!r}; Orb's loaders: {names}")
        weights_only_load(rest, "orb")  # a state dict: checked without unpickling code before Orb's loader opens it
        try:
            model = fn(weights_path=rest, device="cpu", precision="float32-highest", compile=False)
        except Exception as e:  # noqa: BLE001 - a state dict Orb cannot load into that architecture, with its cause
            raise ModelFileError(f"orb: cannot load weights {rest!r} into {head}: {type(e).__name__}: "
                                 f"{str(e)[:400]}") from None
        return OrbAdapter(model, path=rest, name=f"orb:{head}")
    obj = torch_load(spec, "orb")
    if isinstance(obj, dict):
        raise ModelFileError(f"orb: {spec!r} holds a state dict; name its architecture: "
                             f"--model orb:ARCHITECTURE:{spec} (e.g. orb-v3-direct-20-omat)")
    if not isinstance(obj, torch.nn.Module):
        raise ModelFileError(f"orb: {spec!r} holds a {type(obj).__name__}, not an Orb model")
    return OrbAdapter(obj, path=spec)
