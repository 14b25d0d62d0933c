"""Inputs and outputs with their declared representations: validation and flattening (private)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._torch_utils import segment_sum

from ._reps import PointRep, Rep, ScalarRep, as_rep


def _to_tensor(v: Any, where: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (np.ndarray, np.generic, float, int)):
        return torch.as_tensor(np.asarray(v))
    raise ValueError(f"{where}: expected a tensor (or numpy array), got {type(v).__name__}")


def check_finite(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            n = int(bad.sum())
            kind = "NaN" if bool(torch.isnan(t.detach()).any()) else "inf"
            raise ValueError(f"{where} contains {n} non-finite value(s) ({kind}): cannot differentiate there")


@dataclass
class Inputs:
    """The inputs ``x`` (one tensor or a tuple) with one representation each."""

    values: Tuple[torch.Tensor, ...]
    reps: Tuple[Rep, ...]
    is_tuple: bool

    @property
    def moving(self) -> List[int]:
        """Indices of inputs that the group moves (non-invariant, floating point)."""
        return [i for i, (v, r) in enumerate(zip(self.values, self.reps)) if not isinstance(r, ScalarRep)]

    def call_args(self, values: Sequence[torch.Tensor]):
        return tuple(values) if self.is_tuple else (values[0],)


def _is_leaf_spec(spec: Any) -> bool:
    """e3nn's ``Irreps`` is a tuple subclass: it declares one tensor, not a structure."""
    try:
        from e3nn import o3

        return isinstance(spec, (o3.Irreps, o3.Irrep))
    except ImportError:  # pragma: no cover
        return False


def _is_seq(spec: Any) -> bool:
    return isinstance(spec, (tuple, list)) and not _is_leaf_spec(spec)


def prepare_inputs(x: Any, in_rep: Any) -> Inputs:
    is_tuple = isinstance(x, (tuple, list))
    xs = tuple(x) if is_tuple else (x,)
    if is_tuple:
        if not _is_seq(in_rep):
            in_rep = (in_rep,) * len(xs) if in_rep is None else None
            if in_rep is None:
                raise ValueError(
                    f"in_rep: x is a tuple of {len(xs)} tensors, so in_rep must be a tuple of {len(xs)} "
                    "representations (None for invariant inputs such as atomic numbers or edge_index)"
                )
        if len(in_rep) != len(xs):
            raise ValueError(f"in_rep: x has {len(xs)} entries but in_rep has {len(in_rep)}")
    else:
        if _is_seq(in_rep):
            raise ValueError(f"in_rep: x is a single tensor but in_rep is a sequence of {len(in_rep)}")
        in_rep = (in_rep,)
    values, reps = [], []
    for i, (v, spec) in enumerate(zip(xs, in_rep)):
        where = f"input x[{i}]" if is_tuple else "input x"
        rep = as_rep(spec, where=f"in_rep for {where}")
        if isinstance(rep, ScalarRep):
            values.append(v)  # passed through untouched (may be an int tensor, a Data object, ...)
            reps.append(rep)
            continue
        v = _to_tensor(v, where)
        if not v.is_floating_point():
            raise ValueError(f"{where}: representation {rep.name!r} needs a floating-point tensor, got {v.dtype}")
        rep.check(v, where)
        if v.numel() == 0 or (v.dim() >= 2 and v.shape[0] == 0):
            raise ValueError(f"{where} is empty (shape {list(v.shape)}): nothing to transform")
        check_finite(v, where)
        values.append(v.detach())
        reps.append(rep)
    return Inputs(tuple(values), tuple(reps), is_tuple)


# ---------------------------------------------------------------------------------------------------------------
# outputs: a tensor, a (nested) tuple/list, or a dict, matched against out_rep of the same structure
@dataclass
class Leaf:
    path: str
    rep: Rep


def pair_outputs(out: Any, spec: Any, path: str = "output") -> Tuple[List[Leaf], Callable[[List[Any]], Any]]:
    """Match ``out`` with ``spec``; return the leaves and a function rebuilding the structure from new leaves."""
    if isinstance(out, dict):
        if not isinstance(spec, dict):
            raise ValueError(
                f"out_rep: {path} is a dict with keys {sorted(map(str, out))}, so out_rep must be a dict "
                f"declaring a representation for each key, got {spec!r}"
            )
        missing = [k for k in out if k not in spec]
        if missing:
            raise ValueError(
                f"out_rep: {path} has undeclared output(s) {missing}; declare each (None for invariant ones)"
            )
        keys = list(out)
        leaves, builders, counts = [], [], []
        for k in keys:
            lv, b = pair_outputs(out[k], spec[k], f"{path}[{k!r}]")
            leaves += lv
            builders.append(b)
            counts.append(len(lv))

        def rebuild_dict(new, keys=keys, builders=builders, counts=counts):
            res, i = {}, 0
            for k, b, c in zip(keys, builders, counts):
                res[k] = b(new[i:i + c])
                i += c
            return res

        return leaves, rebuild_dict
    if isinstance(out, (tuple, list)):
        if not _is_seq(spec) or len(spec) != len(out):
            raise ValueError(
                f"out_rep: {path} is a {type(out).__name__} of {len(out)} outputs, so out_rep must be a "
                f"tuple of {len(out)} representations, got {spec!r}"
            )
        leaves, builders, counts = [], [], []
        for i, (o, s) in enumerate(zip(out, spec)):
            lv, b = pair_outputs(o, s, f"{path}[{i}]")
            leaves += lv
            builders.append(b)
            counts.append(len(lv))
        kind = tuple if isinstance(out, tuple) else list

        def rebuild_seq(new, builders=builders, counts=counts, kind=kind):
            res, i = [], 0
            for b, c in zip(builders, counts):
                res.append(b(new[i:i + c]))
                i += c
            return kind(res)

        return leaves, rebuild_seq
    if _is_seq(spec) or isinstance(spec, dict):
        raise ValueError(f"out_rep: {path} is a single tensor but out_rep gives a {type(spec).__name__}")
    rep = as_rep(spec, where=f"out_rep for {path}")
    return [Leaf(path, rep)], lambda new: new[0]


def leaf_name(path: str) -> str:
    """``output['forces']`` -> ``forces``; a bare tensor output is ``output``."""
    return path.replace("output", "", 1).strip("[]'\"") or "output"


def flatten_outputs(out: Any) -> List[torch.Tensor]:
    """Leaves of ``out`` in the order used by :func:`pair_outputs` (dict insertion order, then sequence order)."""
    if isinstance(out, dict):
        res = []
        for k in out:
            res += flatten_outputs(out[k])
        return res
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res += flatten_outputs(o)
        return res
    return [out]


def check_outputs(values: List[Any], leaves: List[Leaf]) -> List[torch.Tensor]:
    res = []
    if len(values) != len(leaves):
        raise ValueError(f"the function returned {len(values)} outputs where {len(leaves)} were declared")
    for v, leaf in zip(values, leaves):
        t = _to_tensor(v, leaf.path)
        if not t.is_floating_point():
            raise ValueError(f"{leaf.path}: outputs must be floating point to differentiate, got {t.dtype}")
        leaf.rep.check(t, leaf.path)
        check_finite(t, leaf.path)
        res.append(t)
    return res


def centroids(pos: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-structure centroids ``[B, 3]`` of ``pos [N, 3]`` (``B = 1`` without a batch vector)."""
    pos = pos.detach().reshape(-1, 3)
    if batch is None:
        return pos.mean(0, keepdim=True)
    batch = torch.as_tensor(batch, device=pos.device).long()
    n = int(batch.max()) + 1 if batch.numel() else 0
    s = segment_sum(pos, batch, n)
    c = segment_sum(torch.ones_like(pos[:, 0]), batch, n)
    return s / c.clamp_min(1)[:, None]


class Centers:
    """Rotation centres for point-valued tensors: the origin, or each structure's centroid at the base point."""

    def __init__(self, inputs: Inputs, about: str, batch: Optional[torch.Tensor]):
        if about not in ("origin", "centroid"):
            raise ValueError(f"about must be 'origin' or 'centroid', got {about!r}")
        self.about = about
        self.batch = None if batch is None else torch.as_tensor(batch).long()
        self.c = None
        if about == "centroid":
            pts = [v for v, r in zip(inputs.values, inputs.reps) if isinstance(r, PointRep)]
            if not pts:
                raise ValueError("about='centroid' needs an input with representation 'point'")
            pos = pts[0]
            if self.batch is not None and (pos.dim() != 2 or self.batch.shape[0] != pos.shape[0]):
                raise ValueError(
                    f"batch has {self.batch.shape[0]} entries but the first point input has shape {list(pos.shape)}"
                )
            self.c = centroids(pos, self.batch)

    def for_tensor(self, t: torch.Tensor, rep: Rep, where: str) -> Optional[torch.Tensor]:
        if self.c is None or not isinstance(rep, PointRep):
            return None
        c = self.c.to(t)
        if self.batch is None:
            return c[0]
        if t.dim() == 2 and t.shape[0] == self.batch.shape[0]:
            return c[self.batch.to(t.device)]
        raise ValueError(
            f"{where}: about='centroid' with a batch vector needs point tensors of shape [N, 3] with N = "
            f"{self.batch.shape[0]}, got {list(t.shape)}"
        )
