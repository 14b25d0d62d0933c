"""fairchem models (``fairchem-core`` 2.x, Meta FAIR Chemistry: UMA, eSEN): ``geolie audit --model fairchem:...``.

A fairchem model file is an *inference checkpoint* (``MLIPInferenceCheckpoint`` pickled with ``torch.save``: the
Hydra model config, the weights, the EMA weights and the task list), what fairchem publishes (``uma-s-1p1.pt``,
``esen_sm_conserving_all.pt``) and what ``convert_train_checkpoint_to_inference_checkpoint`` writes after training.
``--model fairchem:PATH`` loads it when it has one dataset; a multi-task model (UMA: ``omol``, ``omat``, ``oc20``,
``odac``, ``omc``) names the task: ``--model fairchem:TASK:PATH`` (the ``task_name`` of ``FAIRChemCalculator``).

geolie loads the file with fairchem's own ``MLIPPredictUnit`` (one per dtype: fairchem builds its non-persistent
buffers, SO(3) grids and coefficient maps, in the dtype asked for, so the float64 copy is built in float64, not cast
from float32), with external graphs on (``otf_graph=False``), activation checkpointing and MOLE merging off. The
neighbour graph is geolie's (:mod:`geolie.adapters._graph`) at the backbone's cutoff, held fixed near the base
geometry; fairchem's edge vector is ``pos[edge_index[0]] − pos[edge_index[1]] + cell_offsets · cell``, so
``edge_index = [j, i]`` and ``cell_offsets = S``. fairchem's own graph generation additionally caps each atom at
``max_neighbors`` neighbours (UMA: 300, which a 6 Å sphere does not reach in condensed matter); the report says when
an atom of the audited structure has more.

The outputs audited are the task's, as ``MLIPPredictUnit.predict`` returns them: the heads' outputs denormalised with
the task's normaliser, element references added back to the energy. For a conserving model (``MLP_EFS_Head``) forces
are ``−∂E/∂pos`` and stress the virial from the position and cell gradients, computed by the head with
``torch.autograd.grad``; the heads alone are put in training mode so that it keeps its graph (``create_graph``):
forward-over-reverse, exact. The backbone stays in eval mode (UMA's mixture of experts drops experts and
compositions at random in training mode). A direct model's forces come from their own head (not ``−∇E``).
``predict`` runs direct models under ``torch.no_grad``; geolie calls the same model without it. The task's charge and
spin are fairchem's defaults (``omol``: charge 0, spin multiplicity 1; others 0).

Layer-wise attribution (eSCN-MD backbones: eSEN, UMA): the units are each block's two normalisations and atom-wise
feed-forward, whose node features ``[N, (l_max+1)², C]`` are e3nn irreps on dimension -2 (fairchem's coefficients
are in e3nn's basis: tested). The edge-wise convolutions also read the Wigner matrices of the moving edges and are
not units; their part is unattributed. Other backbones get none (inferred as plain tensors, spherical-harmonic
features would look broken where they are equivariant).

:func:`random_checkpoint` writes a random-init eSCN-MD model as such a file (no weights can be downloaded here:
geolie's tests and study use it).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, List, Optional

import torch

from .. import _evaluation as ev_mod
from ._graph import (MODEL_AUTOGRAD_STRESS, GraphPotentialAdapter, ModelFileError, atoms_per_structure, build_graph,
                     check_file, require, torch_load)
from ._protocol import CopyCache, with_autograd


@contextlib.contextmanager
def _quiet_and_seedless():
    """fairchem's predict unit seeds torch, numpy and ``random`` for the whole process and logs its settings as
    warnings on every load and first prediction: the seeds are put back and the log kept to errors meanwhile."""
    import random

    import numpy as np

    root = logging.getLogger()
    level = root.level
    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        root.setLevel(level)


class FairchemAdapter(GraphPotentialAdapter):
    """A fairchem inference checkpoint (UMA, eSEN) on one of its tasks; see the module docstring."""

    package = "fairchem"
    extra = "fairchem"
    OUTPUTS = {"energy": ("scalar", False), "forces": ("vector", True), "stress": ("stress", False)}

    def __init__(self, path: str, task: Optional[str] = None, name: str = ""):
        unit = self._load_unit(path, "cpu", torch.float32)
        backbone = unit.model.module.backbone
        datasets = sorted(unit.dataset_to_tasks)
        if task is None:
            if len(datasets) != 1:
                raise ValueError(f"fairchem: {path!r} is a multi-task model; name the task: --model "
                                 f"fairchem:TASK:{path} with TASK one of {datasets}")
            task = datasets[0]
        if task not in datasets:
            raise ValueError(f"fairchem: {path!r} has tasks {datasets}, not {task!r}")
        self.task = task
        self.tasks = {t.property: t for t in unit.dataset_to_tasks[task]}
        if "energy" not in self.tasks:
            raise ModelFileError(f"fairchem: {path!r} has no energy task for {task!r} (properties "
                                 f"{sorted(self.tasks)})")
        self.direct = bool(backbone.regress_config.direct_forces)
        opts = [f"{k}={getattr(backbone, k)}" for k in ("lmax", "mmax", "ff_type", "act_type", "grid_resolution")
                if hasattr(backbone, k)]
        self.backbone = f"{type(backbone).__name__}({', '.join(opts)})"
        self.max_neighbors = int(getattr(backbone, "max_neighbors", 0) or 0)
        super().__init__(unit.model.module, path=path, name=name or f"fairchem:{task}:{os.path.basename(path)}",
                         cutoff=float(backbone.cutoff), elements=None)
        n_el = int(getattr(backbone, "max_num_elements", 0) or 0)
        self.elements = tuple(range(1, n_el)) if n_el else None
        # one MLIPPredictUnit per (device, dtype), built by fairchem from the file in that dtype (not cast)
        self._cache = CopyCache(unit.model.module, build=lambda device, dtype: (self._unit(device, dtype), []))
        self._cache.copies[("cpu", torch.float32)] = (unit, [])
        self._ready = set()

    # -- loading ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_unit(path: str, device: str, dtype: torch.dtype):
        from fairchem.core.units.mlip_unit.api.inference import InferenceSettings
        from fairchem.core.units.mlip_unit.predict import MLIPPredictUnit

        settings = InferenceSettings(tf32=False, activation_checkpointing=False, merge_mole=False, compile=False,
                                     external_graph_gen=True, base_precision_dtype=dtype, execution_mode="general",
                                     auto_add_default_untrained_tasks=True)  # fairchem's default: UMA's autograd stress
        with _quiet_and_seedless():
            try:
                return MLIPPredictUnit(path, device=device, inference_settings=settings)
            except Exception as e:  # noqa: BLE001 - a checkpoint fairchem cannot build, said with its cause
                raise ModelFileError(f"fairchem: cannot load {path!r}: {type(e).__name__}: {str(e)[:400]}") from None

    def _unit(self, device, dtype):
        return self._load_unit(self.path, "cuda" if torch.device(device).type == "cuda" else "cpu", dtype)

    def copy_for(self, dtype: torch.dtype) -> torch.nn.Module:
        return self._cache.get(self.device, dtype)[0].model.module

    # -- the graph potential protocol ---------------------------------------------------------------------------
    def check(self, st, where: str) -> None:
        super().check(st, where)
        if st.cell is None and len(st.numbers) == 1 and not getattr(self._module, "supports_single_atoms", True):
            raise ValueError(f"{where}: an isolated atom; fairchem answers it from a table of reference energies "
                             "without calling the model, so there is nothing to audit")

    def sources(self) -> Dict[str, str]:
        if self.direct:
            return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL, "stress": ev_mod.MODEL}
        return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL_AUTOGRAD_FORCES, "stress": MODEL_AUTOGRAD_STRESS}

    def notes(self, dtype: torch.dtype) -> List[str]:
        kind = "direct (forces from their own head)" if self.direct else \
            "conserving (forces and stress from the energy's gradient)"
        notes = [f"fairchem task {self.task!r}, {kind}, backbone {self.backbone}; neighbour graph: geolie's, radius "
                 f"{self.cutoff} Å"]
        if self.task == "omol":
            notes.append("omol: charge 0, spin multiplicity 1 (fairchem's defaults)")
        return notes + ([self._dense] if getattr(self, "_dense", "") else [])

    def _graph(self, z, pos, cell, batch, dtype):
        from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

        g = build_graph(z, pos, cell, batch, self.cutoff, dtype, self.device)
        self._dense = ""  # said by notes() for the structure whose base graph was built last
        if self.max_neighbors and g.i.numel():
            most = int(torch.bincount(g.i.cpu()).max())
            if most > self.max_neighbors:
                self._dense = (f"an atom has {most} neighbours within {self.cutoff} Å; fairchem's own graph keeps "
                                    f"at most {self.max_neighbors}: geolie audits the full radius graph")
        ptr = g.ptr.cpu()
        items = []
        unit = self._cache.get(self.device, torch.float32)[0]
        for k, at in enumerate(atoms_per_structure(z, pos, cell, batch)):
            a, b = int(ptr[k]), int(ptr[k + 1])
            sel = (g.i >= a) & (g.i < b)
            unit.validate_atoms_data(at, self.task)  # fairchem's defaults for charge and spin
            d = AtomicData.from_ase(at, task_name=self.task, r_edges=False, r_data_keys=["spin", "charge"],
                                    target_dtype=dtype)
            d.edge_index = torch.stack([g.j[sel] - a, g.i[sel] - a]).cpu()
            d.cell_offsets = g.S[sel].cpu().to(dtype)
            d.nedges = torch.tensor([int(sel.sum())], dtype=torch.long)
            items.append(d)
        return atomicdata_list_to_batch(items).to(self.device)

    def layerwise_target(self, st, dtype):
        """eSCN-MD backbones (fairchem's eSCN-MD and UMA), molecules: the model copy for ``dtype``, its energy as a
        function of the positions, and as units of attribution every block's two normalisations and atom-wise
        feed-forward and the final normalisation. Their node features ``[N, (l_max+1)², C]`` are declared as e3nn
        irreps ``0e + 1o + ... + l_max`` on dimension -2 (fairchem's coefficients are in e3nn's basis: tested).

        The edge-wise convolutions are not units: they also read the Wigner matrices of the moving edges, which a
        local Lie derivative of their node input alone would hold fixed. Their part, and the embeddings' and the
        heads', is in ``"__unattributed__"``. ``None`` for other backbones (their layouts are not read: no
        attribution rather than a wrong one) and for periodic structures (the cell would have to rotate too)."""
        from e3nn import o3

        from .._reps import IrrepsRep

        if st.cell is not None:
            return None
        module = self.copy_for(dtype)
        backbone = getattr(module, "backbone", None)
        if type(backbone).__name__ != "eSCNMDBackbone":
            return None
        lmax = int(backbone.lmax)
        rep = IrrepsRep(o3.Irreps.spherical_harmonics(lmax), axis=-2)
        units = [f"backbone.blocks.{k}.{part}" for k in range(len(backbone.blocks))
                 for part in ("norm_1", "norm_2", "atom_wise")] + ["backbone.norm"]
        ev = self.evaluation(st, dtype)
        z = ev.inputs[1]
        return module, (lambda p: ev.fn(p, z)["energy"].sum()), None, {
            "units": units, "reps": {u: (rep, rep) for u in units}}

    def _run(self, unit, pos, cell, data, stress: bool) -> Dict[str, torch.Tensor]:
        key = (str(self.device), pos.dtype)
        if key not in self._ready:  # fairchem's own lazy initialisation (moves, casts, prepares the model)
            with _quiet_and_seedless():
                unit.predict(data.clone())
            self._ready.add(key)
        model = unit.model.module
        for head in model.output_heads.values():
            # the heads' autograd.grad keeps its graph; their submodules and the backbone stay in eval mode
            head.training = True
        d = data.clone()
        d.pos = pos
        if cell is not None:
            d.cell = with_autograd(cell.reshape(1, 3, 3))
        elif not self.direct:
            d.cell = with_autograd(d.cell.to(pos.dtype))
        out = unit.model(d)
        B = int(d.natoms.numel())
        res = {}
        for prop, task in self.tasks.items():
            if task.name not in out:
                continue
            v = task.normalizer.denorm(out[task.name][task.property])
            if task.element_references is not None:
                v = task.element_references.undo_refs(d, v)
            if prop == "energy":
                res["energy"] = v.reshape(B)
            elif prop == "forces":
                res["forces"] = v.reshape(-1, 3)
            elif prop == "stress" and stress:
                res["stress"] = v.reshape(B, 3, 3)
        return res


def load(spec: str) -> FairchemAdapter:
    """``PATH`` or ``TASK:PATH``: a fairchem inference checkpoint; see the module docstring."""
    require("fairchem.core.units.mlip_unit.predict", "fairchem", "fairchem-core")
    task = None
    if not os.path.exists(spec) and ":" in spec:
        task, spec = spec.split(":", 1)
    check_file(spec, "fairchem")
    obj = torch_load(spec, "fairchem")
    if not all(hasattr(obj, k) for k in ("model_config", "ema_state_dict", "tasks_config")):
        what = f"a dict (keys {sorted(obj)[:6]})" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ModelFileError(f"fairchem: {spec!r} holds {what}, not a fairchem inference checkpoint "
                             "(MLIPInferenceCheckpoint: model_config, model_state_dict, ema_state_dict, tasks_config); "
                             "a training checkpoint is converted with fairchem's "
                             "convert_train_checkpoint_to_inference_checkpoint")
    del obj
    return FairchemAdapter(spec, task=task)


def random_checkpoint(path: str, *, channels: int = 16, lmax: int = 2, num_layers: int = 2, ff_type: str = "spectral",
                      grid_resolution: Optional[int] = None, act_type: str = "gate", direct: bool = False,
                      datasets=("omat",), seed: int = 0, rmsd: float = 1.0,
                      init_from: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write a random-init eSCN-MD model (the eSEN / UMA backbone, ``lmax = mmax``, 5 Å cutoff) as fairchem's inference
    checkpoint at ``path`` and return ``path``: the Hydra config, the weights (drawn after ``torch.manual_seed(seed)``;
    the caller's random state is put back), the same weights as EMA weights, and the tasks energy, forces and (for a
    conserving model) stress with a normaliser of mean 0 and ``rmsd``.

    ``direct``: energy and forces from separate heads (eSEN direct); else one ``MLP_EFS_Head`` whose forces and
    stress are the energy's autograd derivatives (eSEN conserving, UMA). ``ff_type`` ``"spectral"`` or ``"grid"``
    (fairchem's constructor default) with ``grid_resolution`` (``None``: fairchem's), ``act_type`` ``"gate"`` or
    ``"s2"``. ``init_from``: a state dict whose entries of matching name and shape replace the drawn weights (the same
    weights across variants that differ in a few modules)."""
    require("hydra", "fairchem")
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    uma = "fairchem.core.models.uma.escn_md."
    backbone = dict(model=uma + "eSCNMDBackbone", max_num_elements=100, sphere_channels=channels, lmax=lmax,
                    mmax=lmax, otf_graph=True, max_neighbors=300, cutoff=5.0, edge_channels=channels,
                    num_distance_basis=16, direct_forces=direct, regress_forces=True, regress_stress=not direct,
                    num_layers=num_layers, hidden_channels=channels, dataset_mapping={d: d for d in datasets},
                    use_dataset_embedding=True, always_use_pbc=False, ff_type=ff_type, act_type=act_type,
                    grid_resolution=grid_resolution)
    if direct:
        heads = {"energy": dict(module=uma + "MLP_Energy_Head"), "forces": dict(module=uma + "Linear_Force_Head")}
    else:
        heads = {"efs": dict(module=uma + "MLP_EFS_Head")}
    cfg = dict(_target_="fairchem.core.models.base.HydraModel", backbone=backbone, heads=heads,
               pass_through_head_outputs=not direct)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = hydra.utils.instantiate(cfg)
    finally:
        torch.random.set_rng_state(state)
    if init_from is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in init_from.items() if k in own and own[k].shape == v.shape},
                              strict=False)
    props = [("energy", "system", [1]), ("forces", "atom", [3])] + ([] if direct else [("stress", "system", [1, 9])])
    tasks = [dict(_target_="fairchem.core.units.mlip_unit.mlip_unit.Task", name=prop, level=level, property=prop,
                  datasets=list(datasets),
                  out_spec=dict(_target_="fairchem.core.units.mlip_unit.mlip_unit.OutputSpec", dim=dim,
                                dtype="float32"),
                  normalizer=dict(_target_="fairchem.core.modules.normalization.normalizer.Normalizer", mean=0.0,
                                  rmsd=rmsd))
             for prop, level, dim in props]
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save(MLIPInferenceCheckpoint(model_config=cfg, model_state_dict=model.state_dict(),
                                       ema_state_dict=ema.state_dict(), tasks_config=tasks), path)
    return str(path)
