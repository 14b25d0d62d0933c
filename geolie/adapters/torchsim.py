r"""TorchSim models (``torch-sim-atomistic``): any ``torch_sim.models.interface.ModelInterface``, audited through the
interface pipelines already hold it behind, without knowing the package behind it.

A ``ModelInterface`` is called as ``model(SimState)`` (positions ``[N, 3]``, ``cell`` ``[B, 3, 3]`` in TorchSim's
*column* convention, ``cell[b][:, i]`` the i-th lattice vector — geolie's rows transposed —, ``pbc``, atomic numbers,
``system_idx``) and returns ``energy [B]``, ``forces [N, 3]`` and, with ``compute_stress``, ``stress [B, 3, 3]``.
geolie audits those outputs as returned (``sources``: the interface's own heads, ``"model"``); the engine
differentiates through the call and its adjoint test decides the method (a model whose forces come from
``torch.autograd.grad`` without ``create_graph`` cannot be differentiated again: the report says which method was
used and why, never a silent fallback).

Molecules are passed with ``pbc=False`` and a cubic box (``MOLECULE_BOX`` Å) that does not rotate with them: a
model that reads the box of a non-periodic system is not invariant, and the audit shows it. Several molecules go in
one ``SimState`` (one system each) within the audit's atom budget; the finite checks stack their copies the same way.

A ``ModelInterface`` fixes its dtype when it is built. ``TorchSimAdapter(factory=...)`` (and ``--model
torchsim:pkg.module:factory`` where the factory takes ``dtype=`` and ``device=``) builds one model per dtype, so the
floors are measured against the other precision; an object passed as it is runs in its own dtype only, and its floors
are the one-precision estimates (:mod:`geolie._verdict`).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .._evaluation import Evaluation, NotStackable, check_known_outputs, stacked_batch
from ._protocol import Adapter, Structure

#: edge of the (non-rotating) cubic box a molecule is placed in, with pbc=False
MOLECULE_BOX = 100.0


def _torch_sim():
    from ._graph import require

    return require("torch_sim", "torchsim", "torch-sim-atomistic")


def _accepts_dtype(factory: Callable) -> bool:
    try:
        return "dtype" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


class TorchSimAdapter(Adapter):
    """A TorchSim ``ModelInterface`` (see the module docstring). Give ``model`` (runs in its own dtype) or
    ``factory`` (called as ``factory(dtype=..., device=...)`` for each dtype the audit needs)."""

    def __init__(self, model: Any = None, *, factory: Optional[Callable[..., Any]] = None, name: str = ""):
        _torch_sim()
        if (model is None) == (factory is None):
            raise ValueError("TorchSimAdapter: give a ModelInterface (model=) or a factory taking dtype= (factory=)")
        self._factory = factory
        self._models: Dict[Any, Any] = {}
        if model is not None:
            self._check_interface(model)
            self._module = model
            self.dtypes = (model.dtype,)
            self.dtype_note = (f"a TorchSim model runs in the dtype it was built with ({str(model.dtype)[6:]}); pass a "
                               "factory taking dtype= to measure floors against the other precision")
            self._models[model.dtype] = model
        else:
            self.dtypes = (torch.float32, torch.float64)
            self._module = None
        self.name = name or type(model if model is not None else factory).__name__

    @staticmethod
    def _check_interface(model) -> None:
        from torch_sim.models.interface import ModelInterface

        if not isinstance(model, ModelInterface):
            raise TypeError(f"expected a torch_sim ModelInterface, got {type(model).__name__}")

    def model_for(self, dtype: torch.dtype):
        if dtype not in self._models:
            kw = {"dtype": dtype}
            if "device" in inspect.signature(self._factory).parameters:
                kw["device"] = self.device
            m = self._factory(**kw)
            self._check_interface(m)
            if m.dtype != dtype:
                raise ValueError(f"{self.name}: the factory was asked for {dtype} and built a {m.dtype} model")
            self._models[dtype] = m
            if self._module is None:
                self._module = m
        return self._models[dtype]

    def fingerprint(self) -> str:
        self._module = self._module if self._module is not None else self.model_for(self.dtypes[-1])
        return super().fingerprint()

    # -- calling the interface ------------------------------------------------------------------------------------
    def _caller(self, m, n_struct: int, batch: torch.Tensor, periodic: bool):
        import torch_sim as ts

        def call(pos, z, cell=None):
            if periodic:
                c = cell.reshape(-1, 3, 3).transpose(-1, -2)  # geolie's rows -> TorchSim's columns
            else:
                c = torch.eye(3, dtype=pos.dtype, device=pos.device).expand(n_struct, 3, 3) * MOLECULE_BOX
            state = ts.SimState(positions=pos, masses=torch.ones(pos.shape[0], dtype=pos.dtype, device=pos.device),
                                cell=c, pbc=periodic, atomic_numbers=z, system_idx=batch)
            return m(state)

        return call

    def _keys(self, m, periodic: bool) -> List[str]:
        keys = ["energy"]
        if getattr(m, "compute_forces", True):
            keys.append("forces")
        if periodic and getattr(m, "compute_stress", False):
            keys.append("stress")
        return keys

    def _fn(self, call, keys, n_struct: int, n_atoms: int, where: str, strict: bool = True):
        def fn(pos, z, cell=None):
            out = call(pos, z, cell)
            missing = [k for k in keys if k not in out]
            if missing:
                raise ValueError(f"{where}: TorchSim model {self.name!r} returned {sorted(out)}, without {missing}")
            if strict:
                check_known_outputs(out, n_atoms, n_struct, f"{where}: TorchSim model {self.name!r}")
            elif out["energy"].numel() != n_struct:
                raise NotStackable(f"{self.name}: {out['energy'].numel()} energies for {n_struct} stacked systems")
            res = {"energy": out["energy"].reshape(n_struct)}
            if "forces" in keys:
                res["forces"] = out["forces"]
            if "stress" in keys:
                res["stress"] = out["stress"].reshape(3, 3) if n_struct == 1 else out["stress"]
            return res

        return fn

    def _evaluation(self, pos, z, cell, batch, dtype, where: str) -> Evaluation:
        m = self.model_for(dtype)
        n_struct = 1 if batch is None else int(batch.max()) + 1
        b = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device) if batch is None else batch
        periodic = cell is not None
        keys = self._keys(m, periodic)
        fn = self._fn(self._caller(m, n_struct, b, periodic), keys, n_struct, pos.shape[0], where)
        x = (pos, z, cell) if periodic else (pos, z)
        in_rep = ("point", None, "cell") if periodic else ("point", None)
        reps = {"energy": "scalar", "forces": "vector", "stress": "stress"}
        stack = None if periodic else self._stacker(m, pos.shape[0], batch, n_struct, keys, where)
        return Evaluation(fn, x, in_rep, {k: reps[k] for k in keys}, batch=batch, sources={k: "model" for k in keys},
                          method=self.method, notes=[self.dtype_note] if self.dtype_note else [], stack=stack)

    def _stacker(self, m, n_atoms: int, batch, n_struct: int, keys, where):
        def stack(k: int):
            bk = stacked_batch(batch, n_atoms, k, self.device)
            return self._fn(self._caller(m, k * n_struct, bk, False), keys, k * n_struct, k * n_atoms, where,
                            strict=False)

        return stack

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        pos, z = self.inputs(st, dtype)
        return self._evaluation(pos, z, self.cell(st, dtype), None, dtype, st.name or "structure")

    def can_batch(self, st: Structure) -> bool:
        return st.cell is None

    def batch_evaluation(self, sts: Sequence[Structure], dtype: torch.dtype) -> Evaluation:
        if not all(self.can_batch(st) for st in sts):
            raise ValueError(f"{self.name}: batched audits take molecules; periodic cells go one per call")
        pos, z, batch = self.batch_inputs(sts, dtype)
        return self._evaluation(pos, z, None, batch, dtype, f"batch of {len(sts)}")


def load(spec: str) -> TorchSimAdapter:
    """``torchsim:pkg.module:factory``: the factory returns a ``ModelInterface``; when it takes ``dtype=`` it is
    called once per dtype (floors against the other precision), else once."""
    import importlib

    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"torchsim:{spec}: expected torchsim:package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"torchsim:{spec}: cannot import {mod_name}:{attr} ({e})") from None
    if _accepts_dtype(factory):
        return TorchSimAdapter(factory=factory, name=spec)
    return TorchSimAdapter(factory(), name=spec)


def lennard_jones(dtype: torch.dtype = torch.float64, device=None):
    """TorchSim's Lennard-Jones (σ = 2.0 Å, ε = 0.01 eV, cutoff 5 Å, forces and stress): an exact reference model
    for ``--model torchsim:geolie.adapters.torchsim:lennard_jones``."""
    from torch_sim.models.lennard_jones import LennardJonesModel

    return LennardJonesModel(sigma=2.0, epsilon=0.01, cutoff=5.0, dtype=dtype, device=device, compute_forces=True,
                             compute_stress=True)
