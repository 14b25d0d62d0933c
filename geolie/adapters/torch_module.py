"""Torch modules as potentials and point-cloud models, audited through the outputs they really return.

:class:`TorchAdapter` calls the module as its ``forward`` asks (detected from the parameter names):

* ``forward(z, pos, batch)`` (PyG style: SchNet, DimeNet++, ViSNet; :class:`geolie.adapters.pyg.PyGAdapter`
  serves their ``radius_graph`` from :mod:`geolie.neighbors` while geolie calls them),
  ``forward(z, pos, batch, cell)`` (periodic: ``cell [3, 3]``, rows are lattice vectors), ``forward(z, pos, edge_index, batch)`` (edges built by geolie with ``cutoff`` and held
  fixed), ``forward(data)`` (a PyG ``Data`` with ``z``, ``pos``, ``batch`` and, for periodic structures,
  ``cell [1, 3, 3]``), or ``forward(pos)`` (:class:`PointCloudAdapter`).

What the module returns is what is audited:

* a tensor: the energy (one element per structure); forces are ``-∂E/∂x`` and, with a cell, stress the strain
  derivative ``σ = (1/V) ∂E/∂ε`` (both by :func:`geolie.conservative`, so the fast Hessian-vector-product path
  applies);
* a tuple ``(energy, forces or None)`` (PyG's ViSNet);
* a dict: every entry. ``"energy"`` (scalar), ``"forces"`` (vector, per atom: the model's own force head, a *direct*
  force model) and ``"stress"`` (``[3, 3]`` tensor) are known; any other key must be declared with ``out_rep=`` (e.g.
  ``{"dipole": "vector", "charges": "scalar", "features": "8x0e+4x1o"}``). Forces and stress the dict lacks are
  computed by geolie from the energy. ``Evaluation.sources`` says for each output where it came from.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import _evaluation as ev_mod
from .._conservative import conservative
from .._evaluation import Evaluation, NotStackable, check_known_outputs, stacked_batch
from ._protocol import Adapter, CopyCache, NotBatchableError, Structure, with_autograd

KNOWN = {"energy": "scalar", "forces": "vector", "stress": "stress"}


def signature_kind(module: torch.nn.Module) -> str:
    """How to call ``module``: ``"zpb"``, ``"zpbc"``, ``"zp"``, ``"edges"``, ``"data"`` or ``"pos"`` (see the
    module doc)."""
    sig = module.call_signature() if callable(getattr(module, "call_signature", None)) else \
        inspect.signature(module.forward)  # a module whose forward takes *args declares its call this way
    params = list(sig.parameters)
    if "edge_index" in params:
        return "edges"
    if len(params) >= 2 and params[0] in ("z", "numbers", "atomic_numbers") and params[1] in ("pos", "positions"):
        if len(params) == 2:  # forward(z, pos): one structure per call
            return "zp"
        return "zpbc" if "cell" in params else "zpb"
    if params and params[0] in ("pos", "positions", "x"):
        return "pos"
    if params and params[0] in ("data", "batch", "graph"):
        return "data"
    raise TypeError(f"cannot tell how to call {type(module).__name__}.forward{sig}: "
                    "expected forward(z, pos, batch[, cell]), forward(z, pos, edge_index, batch), forward(data) "
                    "or forward(pos)")


def as_output_dict(out: Any) -> Dict[str, Any]:
    """A model's return value as a dict: a tensor is the energy; a tuple is ``(energy, forces or None)``."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (tuple, list)):
        if not 1 <= len(out) <= 2:
            raise ValueError(f"the model returned a {type(out).__name__} of {len(out)} entries; geolie reads tuples "
                             "as (energy, forces or None): return a dict naming each output instead")
        d = {"energy": out[0]}
        if len(out) == 2 and out[1] is not None:
            d["forces"] = out[1]
        return d
    if isinstance(out, torch.Tensor):
        return {"energy": out}
    raise ValueError(f"the model returned a {type(out).__name__}; expected a tensor (the energy), a tuple or a dict")


class TorchAdapter(Adapter):
    """A torch module on structures; see the module docstring for call conventions and outputs.

    ``out_rep``: representations of outputs beyond energy, forces and stress. ``per_atom``: names of outputs whose
    first dimension follows the atoms (permuted with them in the finite checks); by default forces, and any
    declared output whose first dimension equals the number of atoms. Copies are cast to each dtype the audit needs
    (:func:`geolie.adapters.cast_copy`); the caller's module is not modified.
    """

    def __init__(self, module: torch.nn.Module, name: str = "", cutoff: float = 5.0, kind: Optional[str] = None,
                 out_rep: Optional[Dict[str, Any]] = None, per_atom: Sequence[str] = ()):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchAdapter needs a torch.nn.Module, got {type(module).__name__}")
        self._module = module.eval()
        self._cache = CopyCache(self._module, self._prepare)
        self.name = name or type(module).__name__
        self.cutoff = cutoff
        self.kind = kind or signature_kind(module)
        self.extra_rep = dict(out_rep or {})
        self.per_atom_names = set(per_atom)
        self._energy_only: Optional[bool] = None  # learnt from the first call: a model's output keys do not change

    def _prepare(self, m):
        return m

    def call_context(self):
        """A context every call of the module runs in (library-specific adapters override it)."""
        return contextlib.nullcontext()

    def copy_for(self, dtype):
        return self._cache.get(self.device, dtype)[0]

    # -- calling the module -------------------------------------------------------------------------------------
    def _caller(self, m, n_atoms_total: int, batch: Optional[torch.Tensor], base_pos: torch.Tensor, periodic: bool):
        """``call(pos, z, cell) -> raw output`` for this module's call convention."""
        kind = self.kind
        if periodic and kind not in ("zpbc", "data"):
            raise ValueError(f"{self.name}: periodic structures need forward(z, pos, batch, cell) or forward(data) "
                             f"(this module's forward takes no cell); audit it on molecules or wrap it")
        edges = None
        if kind == "edges":
            from ..neighbors import radius_graph

            base = base_pos.detach()
            edges = radius_graph(base, self.cutoff, batch)

            def edges_for(pos):
                # the base geometry's list at (and infinitesimally near) it; finite moves (a permutation reorders the
                # atoms) get their own, as the model would build it
                p = pos.detach()
                if p.shape == base.shape and float((p - base).abs().max()) <= 1e-3:
                    return edges
                return radius_graph(p, self.cutoff, batch)
        b = batch if batch is not None else torch.zeros(n_atoms_total, dtype=torch.long, device=base_pos.device)

        def call(pos, z, cell=None):
            with self.call_context():
                if kind == "zp":
                    return m(z, pos)
                if kind == "zpb":
                    return m(z, pos, b)
                if kind == "zpbc":
                    return m(z, pos, b, cell)
                if kind == "edges":
                    return m(z, pos, edges_for(pos), batch)
                if kind == "data":
                    from torch_geometric.data import Data

                    d = Data(z=z, atomic_numbers=z, pos=pos, batch=b, natoms=torch.bincount(b))
                    if cell is not None:
                        d.cell = cell.reshape(1, 3, 3)
                    return m(d)
                return m(pos)

        return call

    def _declare(self, keys, n_atoms: int, out0: Dict[str, Any], where: str):
        undeclared = [k for k in keys if k not in KNOWN and k not in self.extra_rep]
        if undeclared:
            raise ValueError(f"{where}: model {self.name!r} returned output(s) {undeclared} whose representation is "
                             "not declared; pass out_rep={name: rep} (e.g. 'scalar', 'vector', 'tensor2', an e3nn "
                             "irreps string) to TorchAdapter")
        reps = {k: self.extra_rep.get(k, KNOWN.get(k)) for k in keys}
        per_atom = {k: (k == "forces" or k in self.per_atom_names or (
            k not in KNOWN and isinstance(out0.get(k), torch.Tensor) and out0[k].dim() >= 1
            and out0[k].shape[0] == n_atoms and n_atoms > 1)) for k in keys}
        return reps, per_atom

    def _evaluation(self, pos, z, cell, batch, dtype, where: str) -> Evaluation:
        m, notes = self._cache.get(self.device, dtype)
        periodic = cell is not None
        n_struct = 1 if batch is None else int(batch.max()) + 1
        call = self._caller(m, pos.shape[0], batch, pos, periodic)
        if self._energy_only:
            out0 = {"energy": None}
        else:
            with torch.enable_grad():
                out0 = as_output_dict(call(pos, z, cell))
            e0 = out0.get("energy")
            if batch is not None and isinstance(e0, torch.Tensor) and e0.numel() != n_struct:
                raise NotBatchableError(f"{where}: model {self.name!r} takes a batch argument but returned "
                                        f"{e0.numel()} energies for {n_struct} structures: it does not batch; "
                                        "use batch_size=1")
            check_known_outputs(out0, pos.shape[0], n_struct, f"{where}: model {self.name!r}")
            self._energy_only = set(out0) == {"energy"}
        if "energy" not in out0 and ("forces" in out0 or "stress" in out0):
            raise ValueError(f"{where}: model {self.name!r} returns {sorted(out0)} without an 'energy'")
        keys = list(out0)
        if "energy" in out0:
            keys = ["energy"] + [k for k in keys if k != "energy"]
            for k in ("forces",) + (("stress",) if periodic else ()):
                if k not in keys:
                    keys.append(k)
        reps, per_atom = self._declare(keys, pos.shape[0], out0, where)
        sources = {k: ev_mod.MODEL for k in keys}
        if "forces" in keys and "forces" not in out0:
            sources["forces"] = ev_mod.GEOLIE_FORCES
        if "stress" in keys and "stress" not in out0:
            sources["stress"] = ev_mod.GEOLIE_STRESS

        if set(out0) == {"energy"}:  # energy only: geolie's conservative wrapper (the HVP path applies)
            def energy_fn(p, zz, cell=None):
                e = as_output_dict(call(p, zz, cell))["energy"]
                if batch is not None and e.numel() != n_struct:
                    raise NotBatchableError(f"{where}: model {self.name!r} takes a batch argument but returned "
                                            f"{e.numel()} energies for {n_struct} structures: it does not batch; "
                                            "use batch_size=1")
                if batch is None:
                    check_known_outputs({"energy": e}, p.shape[0], 1, f"{where}: model {self.name!r}")
                return e.reshape(n_struct) if batch is not None else e.reshape(-1).sum()

            cons = conservative(energy_fn, as_dict=True)
            fn = (lambda p, zz, c: cons(p, zz, cell=c)) if periodic else cons
        else:
            fn = _augmented(call, keys, out0, periodic, n_struct, batch is not None)
        x = (pos, z, cell) if periodic else (pos, z)
        in_rep = ("point", None, "cell") if periodic else ("point", None)
        stack = None
        if not periodic and self.kind in ("zpb", "zpbc", "edges", "data"):
            stack = self._stacker(m, pos.shape[0], batch, n_struct, keys, out0)
        return Evaluation(fn, x, in_rep, reps, batch=batch, per_atom=per_atom, sources=sources, method=self.method,
                          notes=list(notes) + ([self.dtype_note] if self.dtype_note else []), stack=stack,
                          precision=self._cache.precision(self.device, dtype))

    def _stacker(self, m, n_atoms: int, batch, n_struct: int, keys, out0):
        """``Evaluation.stack`` for molecules: ``K`` copies as one batch of ``K · n_struct`` structures (a neighbour
        list, for ``forward(z, pos, edge_index, batch)`` modules, built from the copies' own positions)."""

        def stack(k: int):
            bk = stacked_batch(batch, n_atoms, k, self.device)
            n_k = k * n_struct

            def call_k(p, zz, cell=None):
                out = self._caller(m, p.shape[0], bk, p, False)(p, zz)
                e = as_output_dict(out).get("energy")
                if isinstance(e, torch.Tensor) and e.numel() != n_k:
                    raise NotStackable(f"{self.name}: {e.numel()} energies for {n_k} stacked structures")
                return out

            if set(out0) == {"energy"}:
                return conservative(lambda p, zz: as_output_dict(call_k(p, zz))["energy"].reshape(-1), as_dict=True)
            return _augmented(call_k, keys, out0, False, n_k, True)

        return stack

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        pos, z = self.inputs(st, dtype)
        return self._evaluation(pos, z, self.cell(st, dtype), None, dtype, st.name or "structure")

    def can_batch(self, st: Structure) -> bool:
        return self.kind in ("zpb", "zpbc", "edges", "data") and st.cell is None

    def batch_evaluation(self, sts: Sequence[Structure], dtype: torch.dtype) -> Evaluation:
        """Several molecules in one call (``batch`` says which atom belongs to which); per-structure energies."""
        if not all(self.can_batch(st) for st in sts):
            raise ValueError(f"{self.name}: batched audits need a forward(z, pos, batch), forward(z, pos, "
                             "edge_index, batch) or forward(data) module and molecules; use batch_size=1")
        pos, z, batch = self.batch_inputs(sts, dtype)
        return self._evaluation(pos, z, None, batch, dtype, f"batch of {len(sts)}")

    def layerwise_target(self, st: Structure, dtype: torch.dtype):
        if st.cell is not None:
            return None
        m = self.copy_for(dtype)
        pos, z = self.inputs(st, dtype)
        call = self._caller(m, pos.shape[0], None, pos, False)
        return m, (lambda p: as_output_dict(call(p, z))["energy"].reshape(-1).sum()), None


def _augmented(call: Callable, keys, out0, periodic: bool, n_struct: int, batched: bool) -> Callable:
    """``fn(pos, z[, cell]) -> dict``: the model's outputs as returned, plus ``-∂E/∂x`` and the strain derivative
    where the model returns no forces or stress (autograd with ``create_graph``: forward-over-reverse applies)."""
    need_f = "forces" in keys and "forces" not in out0
    need_s = periodic and "stress" in keys and "stress" not in out0

    def fn(pos, z, cell=None):
        p, c, eps = (with_autograd(pos) if need_f else pos), cell, None
        pos_in, cell_in = p, c
        if need_s:
            eps = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
            strain = torch.eye(3, dtype=pos.dtype, device=pos.device) + 0.5 * (eps + eps.T)
            pos_in, cell_in = p @ strain.T, c @ strain.T
        out = as_output_dict(call(pos_in, z, cell_in))
        res: Dict[str, torch.Tensor] = {}
        for k in keys:
            if k in out:
                res[k] = out[k]
        if "energy" in res:
            res["energy"] = res["energy"].reshape(n_struct) if batched else res["energy"].reshape(1)
        if "stress" in out:
            res["stress"] = out["stress"].reshape(3, 3)
        if need_f or need_s:
            wrt = ([p] if need_f else []) + ([eps] if need_s else [])
            gs = torch.autograd.grad(res["energy"].sum(), wrt, create_graph=True, allow_unused=True)
            gs = [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]
            if need_f:
                res["forces"] = -gs[0]
            if need_s:
                res["stress"] = gs[-1] / torch.linalg.det(c).abs()
        return {k: res[k] for k in keys}

    return fn


class PointCloudAdapter(Adapter):
    """A module on one point cloud, ``forward(pos [N, 3]) -> output``, with a declared output representation.

    For point-cloud classifiers (``out_rep="scalar"``: logits are invariant), segmenters (per-point scalars) and
    models predicting vectors or points. ``per_atom=True`` says the output's first dimension follows the points
    (permuted with them in the finite checks). The output is reported as ``"output"``.
    """

    def __init__(self, module: Callable, out_rep: Any = "scalar", name: str = "", per_atom: bool = False):
        self._module = module
        self._cache = CopyCache(module) if isinstance(module, torch.nn.Module) else None
        self.out_rep = out_rep
        self.per_atom = per_atom
        self.name = name or type(module).__name__

    def copy_for(self, dtype):
        return self._cache.get(self.device, dtype)[0] if self._cache is not None else self._module

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        notes = self._cache.get(self.device, dtype)[1] if self._cache is not None else []
        m = self.copy_for(dtype)

        def fn(pos, z):
            return {"output": m(pos)}

        return Evaluation(fn, self.inputs(st, dtype), ("point", None), {"output": self.out_rep},
                          per_atom={"output": self.per_atom}, method=self.method, notes=list(notes))

    def layerwise_target(self, st: Structure, dtype: torch.dtype):
        if not isinstance(self._module, torch.nn.Module):
            return None
        m = self.copy_for(dtype)
        return m, (lambda p: m(p)), self.out_rep
