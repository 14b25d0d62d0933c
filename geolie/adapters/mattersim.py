"""MatterSim models (``mattersim`` 1.2, Microsoft: M3GNet-based): ``geolie audit --model mattersim:PATH``.

A MatterSim model file is what ``Potential.save`` writes (and what MatterSim publishes, ``mattersim-v1.0.0-1M.pth``):
a dict with ``model_name`` (``"m3gnet"``), ``model_args`` (the ``M3Gnet`` constructor's arguments), ``model`` (its
state dict) and the training state. geolie builds ``M3Gnet(**model_args)``, loads the weights as
``Potential.from_checkpoint`` does (without its download-by-name shortcut) and wraps it in MatterSim's ``Potential``,
whose ``forward`` computes ``forces = −∂E/∂pos`` and ``stress = (1/V) ∂E/∂ε`` (in GPa, as MatterSim returns
it; MatterSim's calculator converts to eV/Å³ with the same factor) with ``torch.autograd.grad``; the model is put in
training mode (M3GNet has no dropout) so that it keeps its graph (``create_graph``): forward-over-reverse, exact.

The graph is MatterSim's own (its converter: the two-body radius graph and the three-body triplets within
``threebody_cutoff``), built once per structure and held fixed near the base geometry. MatterSim's converter wraps
positions into the cell, so the positions handed to the model are geolie's plus the integer lattice translations
that wrapping applied (differentiable in positions and cell). Molecules are placed by MatterSim in a cubic box larger
than the molecule plus five cutoffs (periodic images never interact); that box does not rotate with the molecule
and is a constant. M3GNet sees edge lengths and angles only: it is invariant by construction.

Precision: float32 only. ``M3Gnet.forward`` casts the lattice offsets to float32 (``pbc_offsets.float()``) and
``Potential.forward`` builds its strain identity in torch's default dtype, so a float64 copy fails ("expected scalar
type Float but found Double"); the floor is then measured from float32 alone (the audit's rule for single-precision
models).

Installing: ``mattersim`` 1.2 requires ``torchaudio`` and ``torchvision`` (which would replace a CPU torch with
another build) and a materials-workflow stack (atomate2, mp-api, phonopy) that audits do not use, so the extra
installs only what its force field imports and MatterSim goes in without its dependencies::

    pip install "geolie[mattersim]" && pip install --no-deps mattersim==1.2.3
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch

from .. import _evaluation as ev_mod
from ._graph import (MODEL_AUTOGRAD_STRESS, GraphPotentialAdapter, ModelFileError, atoms_per_structure, require,
                     torch_load)

FLOAT64_NOTE = ("MatterSim runs in float32 only: M3Gnet.forward casts the lattice offsets to float32 "
                "(pbc_offsets.float()), so a float64 copy fails")


class MatterSimAdapter(GraphPotentialAdapter):
    """A MatterSim ``Potential`` (M3GNet); see the module docstring."""

    package = "mattersim"
    extra = "mattersim"
    dtypes = (torch.float32,)
    dtype_note = FLOAT64_NOTE
    #: forward mode through MatterSim's modules disagrees with their reverse pass (the engine's adjoint test, measured
    #: on a random-init M3GNet in float32: 1e-4 on a cell, 2e-3..9e-3 on molecules; double-backward: 1e-8), so the
    #: reverse-mode method is used, as for Orb
    method = "double-backward"
    OUTPUTS = {"energy": ("scalar", False), "forces": ("vector", True), "stress": ("stress", False)}

    def __init__(self, potential: torch.nn.Module, path: str = "", name: str = ""):
        args = getattr(getattr(potential, "model", None), "model_args", None)
        if not args or getattr(potential, "model_name", "") != "m3gnet":
            raise ModelFileError(f"mattersim: {path or 'the module'} is not a MatterSim M3GNet Potential")
        super().__init__(potential, path=path, name=name, cutoff=float(args["cutoff"]),
                         elements=tuple(range(1, int(args.get("max_z", 94)) + 1)))
        self.threebody_cutoff = float(args["threebody_cutoff"])

    def _prepare(self, m):
        for p in m.parameters():
            p.requires_grad_(False)
        m.device = str(self.device)
        m.model.device = str(self.device)
        m.model.train()  # Potential.forward: create_graph=self.model.training (M3GNet has no dropout)
        return m

    def sources(self) -> Dict[str, str]:
        return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL_AUTOGRAD_FORCES, "stress": MODEL_AUTOGRAD_STRESS}

    def notes(self, dtype: torch.dtype) -> List[str]:
        return [f"MatterSim M3GNet; graph: MatterSim's own, radius {self.cutoff} Å, three-body within "
                f"{self.threebody_cutoff} Å; stress in GPa as MatterSim's Potential returns it"]

    def _graph(self, z, pos, cell, batch, dtype):
        import warnings

        from mattersim.datasets.utils.build import build_dataloader
        from mattersim.forcefield.potential import batch_to_dict

        atoms = atoms_per_structure(z, pos, cell, batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No PBC detected")  # molecules: MatterSim's box, said in docs
            loader = build_dataloader(atoms, model_type="m3gnet", cutoff=self.cutoff,
                                      threebody_cutoff=self.threebody_cutoff, batch_size=len(atoms),
                                      only_inference=True, shuffle=False)
            g = batch_to_dict(next(iter(loader)), device=self.device)
        # the integer lattice translations MatterSim's wrapping applied to each atom
        cells = g["cell"].double()[g["batch"]]
        shift = torch.linalg.solve(cells.transpose(1, 2), (g["atom_pos"].double() - pos.detach().double())[..., None])
        g["wrap"] = torch.round(shift[..., 0]).to(dtype)
        return g

    def _run(self, m, pos, cell, g, stress: bool) -> Dict[str, torch.Tensor]:
        inp = dict(g)
        wrap = inp.pop("wrap")
        cells = cell.reshape(1, 3, 3) if cell is not None else inp["cell"].to(pos.dtype)
        inp["cell"] = cells
        inp["atom_pos"] = pos + torch.einsum("ni,nij->nj", wrap, cells[inp["batch"]])
        out = m(inp, include_forces=True, include_stresses=stress)
        B = int(inp["num_graphs"])
        res = {"energy": out["total_energy"].reshape(B), "forces": out["forces"]}
        if stress and "stresses" in out:
            res["stress"] = out["stresses"].reshape(B, 3, 3)
        return res


def load(path: str) -> MatterSimAdapter:
    """A MatterSim model file (``Potential.save``); see the module docstring."""
    require("mattersim.forcefield.potential", "mattersim", "mattersim")
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.potential import Potential

    ckpt = torch_load(path, "mattersim")
    if not isinstance(ckpt, dict) or not {"model_name", "model_args", "model"} <= set(ckpt):
        what = f"a dict (keys {sorted(ckpt)[:6]})" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ModelFileError(f"mattersim: {path!r} holds {what}, not a MatterSim model file (Potential.save: "
                             "model_name, model_args, model)")
    if ckpt["model_name"] != "m3gnet":
        raise ModelFileError(f"mattersim: {path!r} holds a {ckpt['model_name']!r} model; only M3GNet runs in "
                             "MatterSim 1.2")
    try:
        model = M3Gnet(device="cpu", **ckpt["model_args"])
        # non-strict as Potential.from_checkpoint loads it, but a weight the file lacks is an error, not random init
        missing = model.load_state_dict(ckpt["model"], strict=False).missing_keys
    except Exception as e:  # noqa: BLE001 - weights that do not fit the architecture, with the cause
        raise ModelFileError(f"mattersim: cannot build the model in {path!r}: {type(e).__name__}: "
                             f"{str(e)[:400]}") from None
    if missing:
        raise ModelFileError(f"mattersim: {path!r} lacks {len(missing)} weight(s) of its architecture "
                             f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    return MatterSimAdapter(Potential(model.eval(), device="cpu"), path=path,
                            name=f"mattersim:{os.path.basename(path)}")
