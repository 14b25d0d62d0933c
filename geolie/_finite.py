r"""Finite equivariance checks: the discrete companion of the Lie derivative.

For a group element ``g`` the error of an output is ``e(g) = ‖f(g·x) − ρ_out(g) f(x)‖₂`` and its relative value
``e(g) / ‖f(x)‖₂``. Families of ``g`` checked:

* ``rotation``: ``n`` Haar-random rotations (about the origin or each structure's centroid);
* ``translation``: ``n`` uniform translations in ``[-box, box]³`` (SE(3) only);
* ``inversion``: ``x -> 2c − x`` (``R = −I``), only with ``parity=True``: e3nn irreps carry their parity,
  ``"vector"`` flips sign, ``"pseudovector"`` and ``"tensor2"`` do not;
* ``permutation``: ``n`` random permutations of the atoms, for the inputs and outputs the caller marks as
  per-atom (``permutation={"inputs": (...), "outputs": ...}``, booleans with the structure of ``in_rep`` and
  ``out_rep``); with ``batch``, within each structure;
* ``repeat``: the same input twice (determinism): the floor under which nothing is measurable.

All these group elements are evaluated in one call when ``f`` is an :class:`geolie.Evaluation` that can stack
copies of its structures (``Evaluation.stack``: adapters that batch molecules), in chunks of at most ``stack_atoms``
atoms (the audit uses its batch budget, so that a model never sees more atoms per call than in its other passes):
the same numbers as one call per group element (tested), at the cost of one larger call.

Rank-2 outputs are also reported by irreducible part, ``name[l=0]``, ``name[l=2]`` (and ``name[l=1]`` when not
symmetric to rounding), relative to the whole tensor's norm (a part can vanish).

With ``batch`` (several structures in one call) every family also records each structure's own error,
``per_sample_max_rel`` (the structure's rows, relative to its own output): the same numbers as auditing it alone
with the same group elements.

The Lie derivative sees only the infinitesimal neighbourhood of the identity; finite checks also see
discontinuous breaks (frame sign flips, neighbour lists changing near the cutoff). A full audit reports both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ._evaluation import NotStackable
from ._groups import SE3, as_group
from ._io import Centers, check_outputs, flatten_outputs, leaf_name, pair_outputs, prepare_inputs
from ._reps import PointRep, Tensor2Rep, has_antisymmetric_part, tensor2_parts

__all__ = ["finite_equivariance_error", "FiniteReport"]


@dataclass
class FiniteReport:
    """``errors[output][family] = {"max_abs", "max_rel", "abs": [...]}``."""

    errors: Dict[str, Dict[str, Dict[str, Any]]]

    def max_rel(self, family: Optional[str] = None) -> float:
        vals = [fam["max_rel"] for out in self.errors.values() for name, fam in out.items()
                if family is None or name == family]
        return max(vals) if vals else 0.0

    def to_dict(self):
        return self.errors

    def table(self) -> str:
        fams = sorted({f for out in self.errors.values() for f in out})
        head = f"{'output':<14}" + "".join(f"{f:>14}" for f in fams)
        lines = ["finite equivariance error, max relative over trials", head, "-" * len(head)]
        for name, out in self.errors.items():
            lines.append(f"{name[:13]:<14}" + "".join(
                f"{out[f]['max_rel']:>14.2e}" if f in out else f"{'-':>14}" for f in fams))
        return "\n".join(lines)


def _flags(spec, n, what):
    if spec is None:
        return (False,) * n
    if isinstance(spec, bool):
        return (spec,) * n
    spec = tuple(spec)
    if len(spec) != n:
        raise ValueError(f"permutation[{what!r}] has {len(spec)} entries, expected {n}")
    return spec


def finite_equivariance_error(
    f: Any,
    x: Any = None,
    *,
    group=SE3,
    in_rep: Any = "point",
    out_rep: Any = "scalar",
    n: int = 8,
    parity: bool = False,
    permutation: Optional[Dict[str, Any]] = None,
    about: str = "origin",
    batch: Optional[torch.Tensor] = None,
    box: float = 1.0,
    generator: Optional[torch.Generator] = None,
    wrap: Optional[bool] = None,
    problem: Optional[Any] = None,
    stack_atoms: int = 512,
) -> FiniteReport:
    """Errors of ``f`` under finite group elements (see the module docstring for the families and definitions).

    ``permutation``: ``None`` (skip) or ``{"inputs": flags, "outputs": flags}`` where ``flags`` say which
    inputs/output leaves are per-atom (permuted along their first dimension); unmarked outputs must be invariant.
    ``f`` may be a :class:`geolie.Evaluation`: its inputs, representations, batch and per-atom flags are used.
    ``wrap``: translate periodic structures' atoms back into the cell after a finite translation (atoms that cross a
    cell face are replaced by their periodic image, ``x - floor(x C⁻¹) C``): a periodic model must not see the
    difference. On by default when an input has the ``"cell"`` representation.
    ``stack_atoms``: with an :class:`geolie.Evaluation` that stacks (``Evaluation.stack``), the group elements are
    evaluated together, at most this many atoms per call (0: one call per group element).
    Returns a :class:`FiniteReport`.
    """
    from ._evaluation import Evaluation

    stack = None
    if isinstance(f, Evaluation):
        ev = f
        f, x, in_rep, out_rep, batch = ev.fn, ev.inputs, ev.in_rep, ev.out_rep, ev.batch
        if ev.stack is not None and stack_atoms > 0 and all(ev.per_atom_inputs):
            stack = ev.stack
        if permutation is not None and permutation.get("inputs") is None:
            permutation = {"inputs": ev.per_atom_inputs, "outputs": ev.per_atom}
    group = as_group(group)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if problem is not None:
        if problem.centers.about != about:
            raise ValueError(f"problem was prepared with about={problem.centers.about!r}, not {about!r}")
        inputs, centers = problem.inputs, problem.centers
    else:
        inputs = prepare_inputs(x, in_rep)
        centers = Centers(inputs, about, batch)
    specs = tuple(in_rep) if isinstance(in_rep, (tuple, list)) else (in_rep,)
    cell_i = [i for i, sp in enumerate(specs) if isinstance(sp, str) and sp == "cell"]
    point_i = [i for i in inputs.moving if isinstance(inputs.reps[i], PointRep)]
    if wrap is None:
        wrap = bool(cell_i) and bool(point_i)
    if wrap and not (len(cell_i) == 1 and point_i and inputs.values[cell_i[0]].shape == (3, 3)):
        raise ValueError("wrap=True needs one [3, 3] input declared 'cell' and a 'point' input")

    def call(vals):
        # grad stays enabled: models that compute forces with torch.autograd.grad need it
        with torch.enable_grad():
            return [o.detach() if isinstance(o, torch.Tensor) else o for o in flatten_outputs(f(*inputs.call_args(vals)))]

    if problem is not None:
        leaves, y0 = problem.leaves, problem.y
    else:
        with torch.enable_grad():
            out0 = f(*inputs.call_args(list(inputs.values)))
        leaves, _ = pair_outputs(out0, out_rep)
        y0 = [t.detach() for t in check_outputs(flatten_outputs(out0), leaves)]
    names = [leaf_name(lf.path) for lf in leaves]
    errors: Dict[str, Dict[str, Dict[str, Any]]] = {nm: {} for nm in names}
    # rank-2 outputs are also checked by irreducible part (l = 0, 1 when not exactly symmetric, 2)
    split = {nm: has_antisymmetric_part(y) for nm, y, lf in zip(names, y0, leaves) if isinstance(lf.rep, Tensor2Rep)}
    for nm, with_l1 in split.items():
        for part in tensor2_parts(y0[names.index(nm)], with_l1=with_l1):
            errors[f"{nm}[{part}]"] = {}

    n_graphs = None if batch is None else int(batch.max()) + 1

    def _rel(a, ref):
        return a / ref if ref > 0 else (0.0 if a == 0 else float("inf"))

    def add(nm, family, diff, y):
        a = float(diff.double().norm())
        ref = float(y.double().norm())
        d = errors[nm].setdefault(family, {"abs": [], "max_abs": 0.0, "max_rel": 0.0})
        d["abs"].append(a)
        d["max_abs"] = max(d["max_abs"], a)
        d["max_rel"] = max(d["max_rel"], _rel(a, ref))
        if n_graphs is not None:  # per structure of the batch: its own rows, relative to its own output
            from ._metrics import _sample_slices

            masks, _ = _sample_slices(y, batch, n_graphs)
            if masks is not None:
                per = [_rel(float(diff[m].double().norm()), float(y[m].double().norm())) for m in masks]
                old = d.get("per_sample_max_rel")
                d["per_sample_max_rel"] = per if old is None else [max(u, v) for u, v in zip(old, per)]

    def record(family, outs, expected):
        outs = check_outputs(outs, leaves)
        for nm, o, e, y in zip(names, outs, expected, y0):
            diff = o.detach().to(e) - e
            add(nm, family, diff, y)
            if nm in split:
                for part, dpart in tensor2_parts(diff, with_l1=split[nm]).items():
                    add(f"{nm}[{part}]", family, dpart, y)  # relative to the whole tensor

    def transform(R, t):
        vals = list(inputs.values)
        for i in inputs.moving:
            v = vals[i]
            c = centers.for_tensor(v, inputs.reps[i], f"input x[{i}]")
            vals[i] = inputs.reps[i].act(v, R.to(v), None if t is None else t.to(v), c)
        if wrap and t is not None:  # atoms that left the cell come back as their periodic images
            cell = vals[cell_i[0]]
            for i in point_i:
                frac = vals[i] @ torch.linalg.inv(cell)
                vals[i] = vals[i] - torch.floor(frac) @ cell
        exp = [lf.rep.act(y, R.to(y), None if t is None else t.to(y), centers.for_tensor(y, lf.rep, lf.path))
               for y, lf in zip(y0, leaves)]
        return vals, exp

    # every group element's inputs and expected outputs first (the same random draws, in the same order, as one call
    # per element), then the calls: one per element, or stacked
    trials = [("repeat", list(inputs.values), y0)]
    R = group.random(n, generator) if not group.has_translations else group.random(n, generator, box=box)[0]
    for k in range(n):
        trials.append(("rotation", *transform(R[k], None)))
    if group.has_translations:
        _, T = group.random(n, generator, box=box)
        eye = torch.eye(3, dtype=torch.float64)
        for k in range(n):
            trials.append(("translation", *transform(eye, T[k])))
    if parity:
        trials.append(("inversion", *transform(-torch.eye(3, dtype=torch.float64), None)))
    if permutation is not None:
        pin = _flags(permutation.get("inputs"), len(inputs.values), "inputs")
        pout = _flags(permutation.get("outputs"), len(leaves), "outputs") if not isinstance(
            permutation.get("outputs"), dict) else tuple(bool(permutation["outputs"].get(nm, False)) for nm in names)
        rows = [inputs.values[i].shape[0] for i in range(len(pin)) if pin[i]]
        if not rows or len(set(rows)) != 1:
            raise ValueError("permutation: mark at least one per-atom input; all marked inputs need the same rows")
        for k in range(n):
            if batch is None:
                p = torch.randperm(rows[0], generator=generator)
            else:  # within each structure of the batch (a permutation across structures would change the input)
                if rows[0] != batch.shape[0]:
                    raise ValueError("permutation with batch: the per-atom inputs must have one row per atom")
                b = batch.cpu()
                p = torch.arange(rows[0])
                for g in range(n_graphs):
                    ids = torch.nonzero(b == g).flatten()
                    p[ids] = ids[torch.randperm(len(ids), generator=generator)]
            p = p.to(inputs.values[pin.index(True)].device)
            vals = [v[p] if flag else v for v, flag in zip(inputs.values, pin)]
            exp = [y[p.to(y.device)] if flag else y for y, flag in zip(y0, pout)]
            trials.append(("permutation", vals, exp))
    outs = _evaluate_trials(call, stack, [vals for _, vals, _ in trials], y0, stack_atoms)
    for (family, _, exp), o in zip(trials, outs):
        record(family, o, exp)
    for nm in errors:
        for fam in errors[nm].values():
            fam["n"] = len(fam["abs"])
    return FiniteReport(errors)


def _evaluate_trials(call, stack, trials, y0, stack_atoms: int):
    """Outputs (flattened leaves) of every trial's inputs: one call each, or ``stack``ed ``K`` at a time (at most
    ``stack_atoms`` atoms per call), split back into ``K`` outputs shaped like ``y0``.

    The first trial (``repeat``, the unmoved input) is always one plain call: determinism is measured as one call per
    element would measure it. The first stacked call also carries an unmoved copy, whose outputs must reproduce the
    unstacked ones to within ``STACK_TOL`` machine epsilons relative; a model that lets stacked copies interact (it
    takes a batch argument but sums over all atoms, or ignores it), is not deterministic, returns non-finite values or
    fails on the larger call fails this check and is evaluated one call per trial instead: stacking never changes a
    figure by more than rounding."""
    if stack is None or len(trials) < 3:
        return [call(v) for v in trials]
    outs: List[Any] = [call(trials[0])]
    rest = trials[1:]
    n_atoms = int(trials[0][0].shape[0])
    per = max(1, stack_atoms // max(n_atoms, 1))
    fns: Dict[int, Any] = {}
    start = 0
    while start < len(rest):
        check = start == 0  # the first stacked call carries the unmoved copy
        chunk = ([trials[0]] if check else []) + rest[start:start + per - (1 if check else 0)]
        k = len(chunk)
        parts = None
        if k > 1:
            try:
                if k not in fns:
                    fns[k] = stack(k)
                vals = [torch.cat([t[i] for t in chunk]) for i in range(len(chunk[0]))]
                with torch.enable_grad():
                    big = [o.detach() if isinstance(o, torch.Tensor) else o for o in flatten_outputs(fns[k](*vals))]
                if len(big) == len(y0) and all(isinstance(b, torch.Tensor) and b.numel() == k * y.numel()
                                               for b, y in zip(big, y0)):
                    parts = [b.reshape(k, *y.shape) for b, y in zip(big, y0)]
            except NotStackable:
                parts = None
            except Exception:  # noqa: BLE001 - a model failing on the larger call: one call per trial says its error
                parts = None
        if parts is not None and check and not _same_as_unstacked([p[0] for p in parts], y0):
            parts = None
        if parts is None:
            return outs + [call(v) for v in rest[start:]]
        outs += [[p[c] for p in parts] for c in range(1 if check else 0, k)]
        start += k - (1 if check else 0)
    return outs


#: stacked copies of the unmoved input must reproduce the unstacked outputs to this many machine epsilons (relative)
STACK_TOL = 10_000


def _same_as_unstacked(got: List[torch.Tensor], y0: List[torch.Tensor]) -> bool:
    for g, y in zip(got, y0):
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(y).all()):
            return False
        eps = torch.finfo(y.dtype).eps if y.is_floating_point() else 0.0
        scale = float(y.double().norm())
        if float((g.double() - y.double()).norm()) > STACK_TOL * eps * max(scale, 1e-300):
            return False
    return True
