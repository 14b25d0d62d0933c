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
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._evaluation import NotStackable
from ._groups import SE3, as_group
from ._io import Centers, check_outputs, flatten_outputs, leaf_name, pair_outputs, prepare_inputs
from ._reps import PointRep, Tensor2Rep, has_antisymmetric_part, tensor2_parts
from ._verdict import (CONFIRM_DRAWS, CONFIRM_SEED, at_floor, confirmed_floor, finite_floor, input_roundings,
                       precision_scale, verdict)

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
    n_permutations: Optional[int] = None,
    about: str = "origin",
    batch: Optional[torch.Tensor] = None,
    box: float = 1.0,
    generator: Optional[torch.Generator] = None,
    wrap: Optional[bool] = None,
    problem: Optional[Any] = None,
    stack_atoms: int = 512,
    reference: Optional[Any] = None,
    floor: bool = True,
) -> FiniteReport:
    """Errors of ``f`` under finite group elements, each with its noise floor (see the module docstring for the
    families and definitions, :mod:`geolie._verdict` for the floor and verdict).

    ``permutation``: ``None`` (skip) or ``{"inputs": flags, "outputs": flags}`` where ``flags`` say which
    inputs/output leaves are per-atom (permuted along their first dimension); unmarked outputs must be invariant.
    ``f`` may be a :class:`geolie.Evaluation`: its inputs, representations, batch and per-atom flags are used.
    ``n_permutations``: how many random permutations (default ``n``). A model that is not permutation-equivariant
    (it reads atom indices or their order) differs under almost every permutation, and one random permutation of a
    structure moves all but about one of its atoms: the audit checks one.
    ``wrap``: translate periodic structures' atoms back into the cell after a finite translation (atoms that cross a
    cell face are replaced by their periodic image, ``x - floor(x C⁻¹) C``): a periodic model must not see the
    difference. On by default when an input has the ``"cell"`` representation.
    ``stack_atoms``: with an :class:`geolie.Evaluation` that stacks (``Evaluation.stack``), the group elements are
    evaluated together, at most this many atoms per call (0: one call per group element).
    ``reference``: the same model in the other precision (an :class:`geolie.Evaluation` of the same structures, or a
    function taking ``x`` cast to the other dtype): every group element is evaluated there too, moved in that
    precision, and each trial's floor is measured from the distance (:func:`geolie._verdict.finite_floor`). Without
    it (and with ``floor``), the floor is the input-rounding estimate (:func:`geolie._verdict.input_roundings`);
    ``floor=False`` skips floors (all zero).
    Returns a :class:`FiniteReport`: per output and family ``max_rel``, ``floor_rel`` (the floor of the worst
    trial), ``max_above_floor`` (the largest relative error of a trial above its floor, 0 when none), ``verdict``.
    """
    from ._evaluation import Evaluation

    stack, precision = None, None
    if isinstance(f, Evaluation):
        ev = f
        f, x, in_rep, out_rep, batch, precision = ev.fn, ev.inputs, ev.in_rep, ev.out_rep, ev.batch, ev.precision
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
    wrap = _wrap_inputs(in_rep, inputs, wrap)
    if problem is not None:
        leaves, y0 = problem.leaves, problem.y
    else:
        with torch.enable_grad():
            out0 = f(*inputs.call_args(list(inputs.values)))
        leaves, _ = pair_outputs(out0, out_rep)
        y0 = [t.detach() for t in check_outputs(flatten_outputs(out0), leaves)]
    n_perm = n if n_permutations is None else n_permutations
    if n_perm < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_perm}")
    elements = _group_elements(group, n, box, parity, permutation, inputs, leaves, batch, generator, n_perm)
    side = _Side(f, inputs, centers, leaves, y0, wrap)
    trials = [(fam, *side.trial(op)) for fam, op in elements]
    # the input-rounding perturbations (floors) ride in the same stacked calls as the trials
    perturbed = input_roundings(list(inputs.values), inputs.moving) if floor else []
    outs = _evaluate_trials(side.call, stack, [vals for _, vals, _ in trials] + perturbed, y0, stack_atoms)
    outs, rounded = outs[:len(trials)], outs[len(trials):]
    floors = _trial_floors(floor, reference, side, elements, rounded, stack_atoms, in_rep, out_rep, about, batch,
                           precision, inputs)
    at_moved = _AtMoved(side, stack, [vals for _, vals, _ in trials], outs, stack_atoms)
    return FiniteReport(_tabulate(leaves, y0, trials, outs, floors, batch, at_moved))


class _Side:
    """One precision's evaluation of the finite checks: the function, its inputs, and each group element applied to
    them (inputs moved, expected outputs transformed)."""

    def __init__(self, f, inputs, centers, leaves, y0, wrap):
        self.f, self.inputs, self.centers, self.leaves, self.y0, self.wrap = f, inputs, centers, leaves, y0, wrap

    def call(self, vals):
        # grad stays enabled: models that compute forces with torch.autograd.grad need it
        with torch.enable_grad():
            return [o.detach() if isinstance(o, torch.Tensor) else o
                    for o in flatten_outputs(self.f(*self.inputs.call_args(vals)))]

    def trial(self, op):
        """``(inputs, expected outputs)`` of one group element ``op`` (see :func:`_group_elements`)."""
        kind = op[0]
        if kind == "repeat":
            return list(self.inputs.values), self.y0
        if kind == "perm":
            _, p, pin, pout = op
            p = p.to(self.inputs.values[pin.index(True)].device)
            vals = [v[p] if flag else v for v, flag in zip(self.inputs.values, pin)]
            return vals, [y[p.to(y.device)] if flag else y for y, flag in zip(self.y0, pout)]
        _, R, t = op
        vals = list(self.inputs.values)
        for i in self.inputs.moving:
            v = vals[i]
            c = self.centers.for_tensor(v, self.inputs.reps[i], f"input x[{i}]")
            vals[i] = self.inputs.reps[i].act(v, R.to(v), None if t is None else t.to(v), c)
        if self.wrap is not None and t is not None:  # atoms that left the cell come back as their periodic images
            cell_i, point_i = self.wrap
            cell = vals[cell_i]
            for i in point_i:
                frac = vals[i] @ torch.linalg.inv(cell)
                vals[i] = vals[i] - torch.floor(frac) @ cell
        exp = [lf.rep.act(y, R.to(y), None if t is None else t.to(y), self.centers.for_tensor(y, lf.rep, lf.path))
               for y, lf in zip(self.y0, self.leaves)]
        return vals, exp


def _wrap_inputs(in_rep, inputs, wrap):
    """``(cell index, point indices)`` when periodic atoms are wrapped back into the cell, else ``None``."""
    specs = tuple(in_rep) if isinstance(in_rep, (tuple, list)) else (in_rep,)
    cell_i = [i for i, sp in enumerate(specs) if isinstance(sp, str) and sp == "cell"]
    point_i = [i for i in inputs.moving if isinstance(inputs.reps[i], PointRep)]
    if wrap is None:
        wrap = bool(cell_i) and bool(point_i)
    if wrap and not (len(cell_i) == 1 and point_i and inputs.values[cell_i[0]].shape == (3, 3)):
        raise ValueError("wrap=True needs one [3, 3] input declared 'cell' and a 'point' input")
    return (cell_i[0], point_i) if wrap else None


def _group_elements(group, n, box, parity, permutation, inputs, leaves, batch, generator, n_perm
                    ) -> List[Tuple[str, Any]]:
    """The trials' group elements, drawn once (the same random draws, in the same order, whatever the batching and
    precision): ``("repeat", ("repeat",))``, ``("rotation", ("move", R, None))``, ``("translation", ("move", I, t))``,
    ``("inversion", ("move", −I, None))``, ``("permutation", ("perm", p, input flags, output flags))``."""
    els: List[Tuple[str, Any]] = [("repeat", ("repeat",))]
    R = group.random(n, generator) if not group.has_translations else group.random(n, generator, box=box)[0]
    els += [("rotation", ("move", R[k], None)) for k in range(n)]
    if group.has_translations:
        _, T = group.random(n, generator, box=box)
        eye = torch.eye(3, dtype=torch.float64)
        els += [("translation", ("move", eye, T[k])) for k in range(n)]
    if parity:
        els.append(("inversion", ("move", -torch.eye(3, dtype=torch.float64), None)))
    if permutation is not None:
        names = [leaf_name(lf.path) for lf in leaves]
        pin = _flags(permutation.get("inputs"), len(inputs.values), "inputs")
        pout = _flags(permutation.get("outputs"), len(leaves), "outputs") if not isinstance(
            permutation.get("outputs"), dict) else tuple(bool(permutation["outputs"].get(nm, False)) for nm in names)
        rows = [inputs.values[i].shape[0] for i in range(len(pin)) if pin[i]]
        if not rows or len(set(rows)) != 1:
            raise ValueError("permutation: mark at least one per-atom input; all marked inputs need the same rows")
        for _ in range(n_perm):
            els.append(("permutation", ("perm", _permutation(rows[0], batch, generator), pin, pout)))
    return els


def _permutation(n_rows: int, batch, generator) -> torch.Tensor:
    if batch is None:
        return torch.randperm(n_rows, generator=generator)
    # within each structure of the batch (a permutation across structures would change the input)
    if n_rows != batch.shape[0]:
        raise ValueError("permutation with batch: the per-atom inputs must have one row per atom")
    b = batch.cpu()
    p = torch.arange(n_rows)
    for g in range(int(b.max()) + 1):
        ids = torch.nonzero(b == g).flatten()
        p[ids] = ids[torch.randperm(len(ids), generator=generator)]
    return p


def _trial_floors(floor, reference, side, elements, rounded, stack_atoms, in_rep, out_rep, about, batch, precision,
                  inputs):
    """What each trial's floor is measured from: ``("reference", outputs in the other precision per trial, their
    unmoved outputs, scale, perturbed outputs)`` or ``("rounding", perturbed outputs)`` (the input-rounding estimate
    alone), or ``None``. ``rounded``: the outputs at the input-rounding perturbations (:func:`input_roundings`), a
    direct measurement in the figure's own precision that the reference's scaled distance never undercuts."""
    from ._evaluation import Evaluation

    if not floor:
        return None
    dtype = side.y0[0].dtype if side.y0 else torch.float64
    if reference is not None:
        ref_stack = None
        if isinstance(reference, Evaluation):
            ref_f, ref_x = reference.fn, reference.inputs
            if reference.stack is not None and stack_atoms > 0 and all(reference.per_atom_inputs):
                ref_stack = reference.stack
        else:
            ref_f = reference
            other = torch.float32 if dtype == torch.float64 else torch.float64
            ref_x = tuple(v.to(other) if v.is_floating_point() else v for v in inputs.values)
            ref_x = ref_x if inputs.is_tuple else ref_x[0]
        ref_inputs = prepare_inputs(ref_x, in_rep)
        with torch.enable_grad():
            out0 = ref_f(*ref_inputs.call_args(list(ref_inputs.values)))
        leaves, _ = pair_outputs(out0, out_rep)
        y0 = [t.detach() for t in check_outputs(flatten_outputs(out0), leaves)]
        ref_side = _Side(ref_f, ref_inputs, Centers(ref_inputs, about, batch), leaves, y0, side.wrap)
        ref_outs = _evaluate_trials(ref_side.call, ref_stack, [ref_side.trial(op)[0] for _, op in elements], y0,
                                    stack_atoms)
        scale = precision_scale(dtype, y0[0].dtype if y0 else dtype, precision)
        return ("reference", ref_outs, y0, scale, rounded)
    return ("rounding", rounded)


class _AtMoved:
    """The outputs at ``CONFIRM_DRAWS`` rounding perturbations of each trial's own moved input, evaluated when a
    trial's error is above its floor (:func:`geolie._verdict.confirmed_floor`) and kept for the trial's other outputs
    and structures."""

    def __init__(self, side, stack, inputs, outs, stack_atoms):
        self.side, self.stack, self.inputs, self.outs, self.stack_atoms = side, stack, inputs, outs, stack_atoms
        self.cache: Dict[int, List[List[torch.Tensor]]] = {}

    def outputs(self, t: int) -> List[List[torch.Tensor]]:
        if t not in self.cache:
            vals = self.inputs[t]
            gen = torch.Generator().manual_seed(CONFIRM_SEED)
            perturbed = input_roundings(vals, self.side.inputs.moving, draws=CONFIRM_DRAWS, generator=gen)
            # the trial's own input leads (the stacked call's check reproduces its outputs), then the draws
            ys = [o.detach() for o in check_outputs(self.outs[t], self.side.leaves)]
            got = _evaluate_trials(self.side.call, self.stack, [vals] + perturbed, ys, self.stack_atoms)
            self.cache[t] = [check_outputs(o, self.side.leaves) for o in got[1:]]
        return self.cache[t]


def _tabulate(leaves, y0, trials, outs, floors, batch, at_moved) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per output (and rank-2 part) and family: the errors, their floors and the verdict's figures, for the whole
    call and (with ``batch``) per structure."""
    names = [leaf_name(lf.path) for lf in leaves]
    n_graphs = None if batch is None else int(batch.max()) + 1
    split = {nm: has_antisymmetric_part(y) for nm, y, lf in zip(names, y0, leaves) if isinstance(lf.rep, Tensor2Rep)}
    tab = _Table(n_graphs, batch)
    for nm in names:
        tab.errors[nm] = {}
    for nm, with_l1 in split.items():
        for part in tensor2_parts(y0[names.index(nm)], with_l1=with_l1):
            tab.errors[f"{nm}[{part}]"] = {}
    repeat = check_outputs(outs[0], leaves)
    noise = [(r.detach().to(y) - y) for r, y in zip(repeat, y0)]  # the model's call-to-call difference at x
    for t, ((family, _, expected), o) in enumerate(zip(trials, outs)):
        o = check_outputs(o, leaves)
        for j, (nm, oj, e, y) in enumerate(zip(names, o, expected, y0)):
            diff = oj.detach().to(e) - e
            fl = _FloorOf(floors, t, j, oj, y, noise[j] if family != "repeat" else None, at_moved)
            tab.add(nm, family, diff, y, fl)
            if nm in split:
                for part, dpart in tensor2_parts(diff, with_l1=split[nm]).items():
                    tab.add(f"{nm}[{part}]", family, dpart, y, fl)  # relative to (and the floor of) the whole tensor
    tab.fold()
    for nm in tab.errors:
        for fam in tab.errors[nm].values():
            fam["n"] = len(fam["abs"])
            fam["verdict"] = verdict(fam["max_rel"], fam["floor_rel"], above_floor=fam["max_above_floor"])
    return tab.errors


class _FloorOf:
    """The floor of one trial of one output, over a set of rows (the whole tensor, or one structure's)."""

    def __init__(self, floors, t, j, out, y, noise, at_moved):
        self.floors, self.t, self.j, self.out, self.y, self.noise = floors, t, j, out, y, noise
        self.at_moved = at_moved

    def __call__(self, mask=None) -> float:
        """The floor from the base input's rounding draws (and the other precision, when there is one)."""
        if self.floors is None:
            return 0.0
        sel = _rows(mask)
        if self.noise is None:  # the repeat check: two calls at the same inputs; a deterministic model gives 0
            return 16 * torch.finfo(self.y.dtype).eps * float(sel(self.y).double().norm())
        noise = float(sel(self.noise).double().norm())
        perturbed = self.floors[-1]
        est = max(float((sel(p[self.j]).double() - sel(self.y).double()).norm()) for p in perturbed)
        est += self._arithmetic(sel, noise)
        if self.floors[0] == "reference":
            _, ref_outs, ref_y0, scale, _ = self.floors
            return max(est, finite_floor(sel(self.out), sel(ref_outs[self.t][self.j]), sel(self.y),
                                         sel(ref_y0[self.j]), scale, noise))
        return est

    def confirmed(self, error: float, mask, fl: float) -> float:
        """The floor ``fl`` (this trial's, from :meth:`__call__`), confirmed at the trial's own moved input where
        ``error`` is above it (:func:`geolie._verdict.confirmed_floor`)."""
        if self.floors is None or self.noise is None:  # the repeat check's floor is no rounding estimate
            return fl
        sel = _rows(mask)

        def at_moved() -> float:
            outs = self.at_moved.outputs(self.t)
            noise = float(sel(self.noise).double().norm())
            return max(float((sel(p[self.j]).double() - sel(self.out).double()).norm()) for p in outs) + \
                self._arithmetic(sel, noise)

        return confirmed_floor(error, fl, at_moved)

    def _arithmetic(self, sel, noise: float) -> float:
        """The terms beside the measured rounding: ``ρ(g)``'s product, the call-to-call noise, ``16 u ‖f(x)‖``."""
        return finite_floor(sel(self.out), None, sel(self.y), None, 1.0, noise) + \
            16 * torch.finfo(self.y.dtype).eps * float(sel(self.y).double().norm())


def _rows(mask):
    return (lambda a: a) if mask is None else (lambda a: a[mask])


class _Table:
    """The errors of every trial gathered per output and family (and per structure of a batch), folded into the
    figures once all trials are in (:meth:`fold`)."""

    def __init__(self, n_graphs, batch):
        self.errors: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self.n_graphs, self.batch = n_graphs, batch
        # (output, family) -> structure (None: the whole call) -> [(error, reference norm, floor, rows)]
        self.trials: Dict[Tuple[str, str], Dict[Optional[int], List[Tuple[float, float, _FloorOf, Any]]]] = {}

    def add(self, nm, family, diff, y, floor_of) -> None:
        a = float(diff.double().norm())
        d = self.errors[nm].setdefault(family, {"abs": [], "max_abs": 0.0, "max_rel": 0.0, "floor_rel": 0.0,
                                                "max_above_floor": 0.0})
        d["abs"].append(a)
        d["max_abs"] = max(d["max_abs"], a)
        per = self.trials.setdefault((nm, family), {})
        per.setdefault(None, []).append((a, float(y.double().norm()), floor_of, None))
        if self.n_graphs is not None:  # per structure of the batch: its own rows, relative to its own output
            from ._metrics import _sample_slices

            masks, _ = _sample_slices(y, self.batch, self.n_graphs)
            if masks is not None:
                for b, m in enumerate(masks):
                    per.setdefault(b, []).append((float(diff[m].double().norm()), float(y[m].double().norm()),
                                                  floor_of, m))

    def fold(self) -> None:
        """Each family's figures: the largest error and the floor of that trial, and the largest error of a trial
        above its floor (0 when none), for the whole call and in the ``per_sample_*`` lists per structure. Trials
        are taken from the largest error down, so that only the ones that could set ``max_above_floor`` are
        confirmed at their moved input."""
        for (nm, family), per in self.trials.items():
            d = self.errors[nm][family]
            for b, items in per.items():
                worst, floor_rel, above = _fold(items)
                if b is None:
                    d["max_rel"], d["floor_rel"], d["max_above_floor"] = worst, floor_rel, above
                else:
                    for key, v in (("per_sample_max_rel", worst), ("per_sample_floor_rel", floor_rel),
                                   ("per_sample_above", above)):
                        lst = d.setdefault(key, [])
                        while len(lst) <= b:
                            lst.append(0.0)
                        lst[b] = v


def _rel(a: float, ref: float) -> float:
    return a / ref if ref > 0 else (0.0 if a == 0 else float("inf"))


def _fold(items) -> Tuple[float, float, float]:
    """``(largest relative error, its floor relative, largest relative error above its confirmed floor)`` of one
    family's trials (a NaN error is the largest, and never at floor)."""
    rels = [_rel(a, ref) for a, ref, _, _ in items]
    order = sorted(range(len(items)), key=lambda i: (rels[i] == rels[i], -rels[i] if rels[i] == rels[i] else 0.0))
    floors: Dict[int, float] = {}  # each visited trial's floor, confirmed where it was measured again
    above = 0.0
    for i in order:
        a, _, floor_of, m = items[i]
        floors[i] = floor_of(m)
        if a == a and at_floor(a, floors[i]):
            continue
        floors[i] = floor_of.confirmed(a, m, floors[i])
        if not at_floor(a, floors[i]):
            above = rels[i]
            break
    w = order[0]  # always visited
    return rels[w], _rel(floors[w], items[w][1]), above


def stacked_outputs(fn, chunk, y0, detach: bool = True) -> Optional[List[torch.Tensor]]:
    """One call of ``fn`` (an ``Evaluation.stack(K)`` function) on the ``K = len(chunk)`` inputs concatenated along
    their first dimension: per leaf of ``y0`` the outputs as ``[K, *y.shape]``, or ``None`` when the call's leaves do
    not have that shape. ``detach=False`` keeps the graph (the hunt's ascent differentiates through it)."""
    k = len(chunk)
    vals = [torch.cat([t[i] for t in chunk]) for i in range(len(chunk[0]))]
    with torch.enable_grad():
        big = flatten_outputs(fn(*vals))
    if detach:
        big = [o.detach() if isinstance(o, torch.Tensor) else o for o in big]
    if len(big) == len(y0) and all(isinstance(b, torch.Tensor) and b.numel() == k * y.numel()
                                   for b, y in zip(big, y0)):
        return [b.reshape(k, *y.shape) for b, y in zip(big, y0)]
    return None


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
                parts = stacked_outputs(fns[k], chunk, y0)
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
