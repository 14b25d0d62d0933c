r"""``geolie.hunt``: search the group for the orientation where a model breaks worst.

Random finite rotations (every test suite in the field) and the Lie derivative at one orientation both miss breaks
that sit at special orientations: an edge aligned with a coordinate axis (eSCN-type gimbal lock), a molecular plane
in a coordinate plane, a pair distance at a hard cutoff, a frame flipping near a degenerate covariance. For each
structure and output ``y`` the hunt maximises the relative finite equivariance error

.. math::   e(g) = \| f(g\cdot x) - \rho_{out}(g) f(x) \|_2 \,/\, \| f(x) \|_2, \qquad g = (R, t),

over ``R ∈ SO(3)`` (and ``t`` for SE(3); rotations about the origin, positions are rows: ``x R^T + t``):

1. ``n_random`` Haar-random rotations: the error a random test sees (``random_error``, the max over them);
2. seeded candidates known to be dangerous: each of the ``max_pairs`` shortest interatomic vectors aligned with
   ``x``, ``y`` and ``z`` (3 per pair), and the principal axes of the structure aligned with the coordinate axes
   (12 proper rotations: 3 cyclic orders × 4 sign patterns), which also puts a planar structure's plane in each
   coordinate plane;
3. gradient ascent (Adam, ``steps`` steps, learning rate ``lr`` in radians) on ``Σ_y log(e_y² + tiny)`` from the
   ``n_starts`` best orientations found so far, with ``R = exp(ω̂) R₀`` (and ``t``): the gradient of the error with
   respect to ``ω`` is itself a Lie derivative. Models that cannot be differentiated skip this step (said in notes).

Rank-2 outputs are hunted whole and by irreducible part (``stress[l=0]``, ``stress[l=2]``, and ``[l=1]`` when not
symmetric to rounding), relative to the whole tensor's norm; only proper rotations are searched (inversion is reported by the finite checks, separately).
Every orientation evaluated updates each output's worst. The cost is bounded and reported (``model_calls``, the
calls made): ``1 + n_random + (3 max_pairs + 12) + n_starts·steps`` evaluations (the ascent's with a backward
pass), ``26`` per output for the discontinuity probes (around the worst orientation and around the identity), and
one audit measurement at each worst orientation; the same evaluations once more in the other precision (no ascent)
for the floor when the model runs in both. Where the model stacks copies of a structure (``Evaluation.stack``, as
the finite checks use it) the random and seeded orientations, the probes and each ascent step's starts go through
it together, up to ``stack_atoms`` atoms a call (default ``STACK_ATOMS``, 512; the audit passes its
``batch_atoms``): the numbers of one call per orientation (tested), in a fraction of the calls (SchNet on aspirin:
63 calls instead of 338, 2.3× faster).

Floor (:mod:`geolie._verdict`, the same as every finite check's): at each orientation evaluated in both
precisions (the random and seeded ones, and each output's worst), the distance between the model's outputs in its
dtype and in the other precision at the same moved inputs, plus the same at the base orientation and the model's
call-to-call noise (:func:`geolie._verdict.finite_floor`; scaled by ``u64/u32`` for a float64 hunt). It is never
derived from the equivariance error itself. A model that runs in one precision only gets the input-rounding estimate
(named in ``floor_source``). ``at_floor``: the worst error is within ``FLOOR_FACTOR`` times the floor at the worst
orientation; ``max_above_floor``: the largest error of an orientation above its own floor (0 when none). An error
above its floor is confirmed before it counts: the hunt takes the worst of hundreds of orientations, so each such
error is compared again with the input-rounding measurement at its own moved input
(:func:`geolie._verdict.confirmed_floor`, the rule the finite checks use too). Every
rotation is orthonormal to float64 rounding (:func:`geolie._verdict.orthonormal`), and the worst error is evaluated
again at the rotation as reported, so that auditing the written structure reproduces it.

Discontinuities: at each output's worst orientation, and at the identity (the base orientation: a distance that sits
exactly at a cutoff there flips under almost any rotation), the pulled-back output ``φ(g) = ρ(g)⁻¹ f(g·x)`` is compared with
its values at ``g·exp(±s X_k)`` (``s`` = δ and δ/10, ``δ`` = 1e-6 rad, the three rotation generators: 12 probes, so
that a jump caused by rounding, which flips either way with about even odds, is missed with odds of about 2⁻¹²). A smooth function moves by about
``δ ‖L_X f(g·x)‖``; a jump above ``(100 δ max(‖L_X f(g·x)‖/‖f(x)‖, 1) + 10 floor) ‖f(x)‖`` is reported as ``"discontinuous at"`` the two
orientations, with the pairs whose distance is within rounding (``1000 u r_c``) of the model's cutoff ``r_c`` when the
model declares one (``cutoff=``, or a ``cutoff`` attribute of its module): rotations cannot change a distance, only
its rounding, and a hard cutoff turns that into a jump.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._groups import SO3, as_group, hat, so3_log
from ._io import flatten_outputs, leaf_name, pair_outputs, prepare_inputs
from ._metrics import measure
from ._verdict import (CONFIRM_DRAWS, CONFIRM_SEED, at_floor, confirmed_floor, finite_floor, input_roundings,
                       orthonormal, precision_scale)
from ._reps import Tensor2Rep, has_antisymmetric_part, tensor2_parts

__all__ = ["hunt", "HuntResult"]

#: at most this many atoms in one stacked call of the hunt (the audit's default batch budget)
STACK_ATOMS = 512


@dataclass
class HuntResult:
    """What :func:`hunt` found for one structure: per output the worst orientation and what surrounds it."""

    structure: str
    group: str
    dtype: str
    outputs: Dict[str, Dict[str, Any]]
    model_calls: int
    seed: int
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"structure": self.structure, "group": self.group, "dtype": self.dtype, "outputs": self.outputs,
                "model_calls": self.model_calls, "seed": self.seed, "notes": self.notes}

    def table(self) -> str:
        head = (f"{'output':<10}{'worst':>10}{'random':>10}{'ratio':>10}{'floor':>10}  {'axis-angle (rad)':<28}"
                "found by")
        lines = [f"geolie hunt: {self.structure}, {self.group}, {self.dtype}, {self.model_calls} model calls; "
                 "relative finite error ‖f(g·x) − ρ(g) f(x)‖/‖f(x)‖", head, "-" * len(head)]
        for name, o in self.outputs.items():
            aa = "[" + ", ".join(f"{v:+.3f}" for v in o["axis_angle"]) + "]"
            ratio = o["worst_error"] / o["random_error"] if o["random_error"] > 0 else math.inf
            lines.append(f"{name[:9]:<10}{o['worst_error']:>10.2e}{o['random_error']:>10.2e}{ratio:>10.1e}"
                         f"{o['floor']:>10.1e}  {aa:<28}{o['found_by']}")
            d = o.get("discontinuous")
            if d:
                pairs = "; pairs at the cutoff: " + ", ".join(f"{i}-{j} ({r:.6f})" for i, j, r in d["pairs_at_cutoff"]) \
                    if d["pairs_at_cutoff"] else ""
                lines.append(f"  discontinuous at {_fmt_aa(d['at'][0])} / {_fmt_aa(d['at'][1])}: jump "
                             f"{d['jump']:.2e}{pairs}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt_aa(R) -> str:
    return "[" + ", ".join(f"{v:+.4g}" for v in so3_log(torch.as_tensor(R, dtype=torch.float64)).tolist()) + "]"


def _align(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The smallest rotation taking the unit vector ``a`` to the unit vector ``e``."""
    v, c = torch.linalg.cross(a, e), float(a @ e)
    s = float(v.norm())
    if s < 1e-12:
        if c > 0:
            return torch.eye(3, dtype=a.dtype)
        p = torch.linalg.cross(a, torch.eye(3, dtype=a.dtype)[int(torch.argmin(a.abs()))])
        p = p / p.norm()
        return 2 * torch.outer(p, p) - torch.eye(3, dtype=a.dtype)  # rotation by π about p ⟂ a
    V = hat(v)
    return torch.eye(3, dtype=a.dtype) + V + V @ V * ((1 - c) / s ** 2)


def _candidates(pos: np.ndarray, max_pairs: int) -> List[Tuple[str, torch.Tensor]]:
    x = torch.as_tensor(pos, dtype=torch.float64)
    out: List[Tuple[str, torch.Tensor]] = []
    n = x.shape[0]
    if n >= 2:
        d = torch.cdist(x, x)
        iu = torch.triu_indices(n, n, 1)
        order = torch.argsort(d[iu[0], iu[1]])[:max_pairs]
        for k in order.tolist():
            i, j = int(iu[0, k]), int(iu[1, k])
            a = (x[j] - x[i]) / (x[j] - x[i]).norm()
            for ax, e in zip("xyz", torch.eye(3, dtype=torch.float64)):
                out.append((f"pair {i}-{j} along {ax}", _align(a, e)))
    if n >= 3:
        xc = x - x.mean(0)
        _, V = torch.linalg.eigh(xc.T @ xc)
        base = V.T.clone()  # rows: principal axes (ascending variance); base @ v_k = e_k
        if torch.det(base) < 0:
            base[0] = -base[0]
        for shift in range(3):
            P = torch.roll(torch.eye(3, dtype=torch.float64), shift, 0)
            for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
                out.append((f"principal axes, order {shift}, signs {signs}",
                            torch.diag(torch.tensor(signs, dtype=torch.float64)) @ P @ base))
    return out


class _HuntTarget:
    """The model on one structure in one precision: finite errors of every output at a group element."""

    def __init__(self, ev):
        self.ev = ev
        self.inputs = prepare_inputs(ev.inputs, ev.in_rep)
        with torch.enable_grad():
            out0 = ev.fn(*self.inputs.call_args(list(self.inputs.values)))
        self.leaves, _ = pair_outputs(out0, ev.out_rep)
        y0 = [t.detach() for t in flatten_outputs(out0)]
        self.raw0 = y0  # the leaves as the model returns them at the base orientation
        self.joint_ok = True  # stacked copies reproduce one call each (else off for this target)
        self._stacked: Dict[int, Any] = {}
        # the quantities hunted: every output leaf, and the irreducible parts of rank-2 ones (stress l = 0, 2)
        self.items: List[Tuple[int, Optional[str]]] = []
        self.names: List[str] = []
        self.with_l1: Dict[int, bool] = {}
        for j, (lf, y) in enumerate(zip(self.leaves, y0)):
            self.items.append((j, None))
            self.names.append(leaf_name(lf.path))
            if isinstance(lf.rep, Tensor2Rep):
                self.with_l1[j] = has_antisymmetric_part(y)
                for part in tensor2_parts(y, with_l1=self.with_l1[j]):
                    self.items.append((j, part))
                    self.names.append(f"{leaf_name(lf.path)}[{part}]")
        self.y0 = self.quantities(y0)
        # relative to the whole output (a rank-2 tensor's part can vanish: a traceless stress has no l = 0)
        self.norms = [float(y0[j].double().norm()) for j, _ in self.items]
        self.calls = 1

    def quantities(self, leaves: List[torch.Tensor]) -> List[torch.Tensor]:
        parts = {j: tensor2_parts(leaves[j], with_l1=w) for j, w in self.with_l1.items()}
        return [leaves[j] if part is None else parts[j][part] for j, part in self.items]

    def pulled_back(self, R: torch.Tensor, t: Optional[torch.Tensor],
                    rounding: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """``φ(g) = ρ_out(g)⁻¹ f(g·x)`` per hunted quantity (differentiable in ``R``, ``t``). ``rounding``: the moved
        inputs are perturbed by their rounding, ``±2 u |g·x|`` per coordinate with signs drawn from it."""
        vals = self.moved(R, t)
        if rounding is not None:
            vals = input_roundings(vals, self.inputs.moving, draws=1, generator=rounding)[0]
        with torch.enable_grad():
            out = flatten_outputs(self.ev.fn(*self.inputs.call_args(vals)))
        self.calls += 1
        return self.pull(out, R, t)

    def moved(self, R: torch.Tensor, t: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """The inputs at ``g·x``."""
        vals = list(self.inputs.values)
        for i in self.inputs.moving:
            v = vals[i]
            vals[i] = self.inputs.reps[i].act(v, R.to(v), None if t is None else t.to(v), None)
        return vals

    def pulled_back_many(self, elements: List[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                         stack_atoms: int = STACK_ATOMS) -> List[List[torch.Tensor]]:
        """:meth:`pulled_back` at several group elements (no gradient): stacked ``K`` copies to a call, at most
        ``stack_atoms`` atoms, when the model stacks (``Evaluation.stack``, as the finite checks): the numbers of one
        call per element, checked on an unmoved copy in the first stacked call (else one call per element,
        :func:`geolie._finite._evaluate_trials`)."""
        from ._finite import _evaluate_trials

        ev = self.ev
        if ev.stack is None or not all(ev.per_atom_inputs) or len(elements) < 2 or not self.joint_ok:
            return [self.pulled_back(R, t) for R, t in elements]
        plain = []

        def call(vals):
            plain.append(1)
            return self._raw(vals)

        def stack(k):
            fn = ev.stack(k)

            def counted(*args):
                self.calls += 1
                return fn(*args)

            return counted

        outs = _evaluate_trials(call, stack, [list(self.inputs.values)] + [self.moved(R, t) for R, t in elements],
                                self.raw0, stack_atoms)
        if len(plain) > len(elements):  # every element went one call each: the stacked copies failed their check
            self.joint_ok = False
        return [self.pull(o, R, t) for o, (R, t) in zip(outs[1:], elements)]

    def pulled_back_joint(self, elements: List[Tuple[torch.Tensor, Optional[torch.Tensor]]], check: bool = False,
                          stack_atoms: int = STACK_ATOMS) -> List[List[torch.Tensor]]:
        """:meth:`pulled_back` at several group elements, differentiable: one stacked call (``Evaluation.stack``)
        when the model stacks and the copies fit in ``stack_atoms`` atoms, else one call each. ``check``: compare the
        stacked copies with one call each first (no gradient); copies that differ by more than ``STACK_TOL`` machine
        epsilons (a model whose stacked structures interact) turn stacking off for this target."""
        from ._finite import _same_as_unstacked, stacked_outputs

        ev, k = self.ev, len(elements)
        n_atoms = int(self.inputs.values[self.inputs.moving[0]].shape[0])
        if (k < 2 or ev.stack is None or not all(ev.per_atom_inputs) or k * n_atoms > stack_atoms
                or not self.joint_ok):
            return [self.pulled_back(R, t) for R, t in elements]
        try:
            if k not in self._stacked:
                self._stacked[k] = ev.stack(k)
            parts = stacked_outputs(self._stacked[k], [self.moved(R, t) for R, t in elements], self.raw0,
                                    detach=False)
            self.calls += 1
        except Exception:  # noqa: BLE001 - a model that cannot run stacked copies: one call each
            parts = None
        if parts is None:
            self.joint_ok = False
            return [self.pulled_back(R, t) for R, t in elements]
        if check:
            with torch.no_grad():
                for c, (R, t) in enumerate(elements):
                    if not _same_as_unstacked([p[c].detach() for p in parts],
                                              self._raw(self.moved(R.detach(), None if t is None else t.detach()))):
                        self.joint_ok = False
                        return [self.pulled_back(R_, t_) for R_, t_ in elements]
        return [self.pull([p[c] for p in parts], R, t) for c, (R, t) in enumerate(elements)]

    def _raw(self, vals: List[torch.Tensor]) -> List[torch.Tensor]:
        """The model's leaves at the inputs ``vals``, one plain call (counted), detached."""
        with torch.enable_grad():
            out = [o.detach() for o in flatten_outputs(self.ev.fn(*self.inputs.call_args(vals)))]
        self.calls += 1
        return out

    def pull(self, out: List[torch.Tensor], R: torch.Tensor, t: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """``ρ_out(g)⁻¹`` applied to the model's leaves at ``g·x``, per hunted quantity."""
        Rinv = R.transpose(-1, -2)
        res = []
        for o, lf in zip(out, self.leaves):
            tinv = None if t is None else -(t.to(o) @ R.to(o))
            res.append(lf.rep.act(o, Rinv.to(o), tinv, None))
        return self.quantities(res)

    def errors(self, R, t, pulled: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Relative finite errors per hunted quantity, ``‖φ(g) − f(x)‖ / ‖f(x)‖`` (``pulled``: ``φ(g)`` if known)."""
        pulled = self.pulled_back(R, t) if pulled is None else pulled
        return [(p - y.to(p)).norm() / (n if n > 0 else 1.0) for p, y, n in zip(pulled, self.y0, self.norms)]

    def noise(self, calls: int = 3) -> List[float]:
        """The call-to-call difference at the base orientation, per hunted quantity: the largest over ``calls`` more
        calls (the hunt compares many orientations, each with fresh noise; 0 for deterministic models)."""
        out = [0.0] * len(self.y0)
        with torch.no_grad():
            for _ in range(calls):
                again = self.pulled_back(torch.eye(3, dtype=torch.float64), None)
                out = [max(o, float((a.detach().double() - y.double()).norm())) for o, a, y in zip(out, again, self.y0)]
                if not any(out):
                    break  # deterministic: one more call says so
        return out

    def rounding_at(self, R: torch.Tensor, t: Optional[torch.Tensor], draws: int = CONFIRM_DRAWS,
                    seed: int = CONFIRM_SEED, ref: Optional[List[torch.Tensor]] = None) -> List[float]:
        """The input-rounding measurement at the moved input ``g·x`` (absolute, per hunted quantity): the largest
        change of ``φ(g)`` over ``draws`` perturbations of ``g·x`` by its rounding (signs drawn from ``seed``), plus
        ``16 u ‖f(x)‖``. ``ref``: ``φ(g)`` when already known (one call fewer)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ref = self.pulled_back(R, t) if ref is None else ref
            est = [16 * torch.finfo(y.dtype).eps * float(y.double().norm()) for y in self.y0]
            for _ in range(draws):
                out = self.pulled_back(R, t, rounding=gen)
                est = [max(e, float((o.double() - r.double()).norm()) + 16 * torch.finfo(y.dtype).eps
                           * float(y.double().norm())) for e, o, r, y in zip(est, out, ref, self.y0)]
        return est

    def rounding_estimate(self) -> List[float]:
        """The input-rounding floor estimate (absolute) per hunted quantity, for a model in one precision only: the
        measurement at the base orientation (the identity moves nothing: exact), two draws."""
        return self.rounding_at(torch.eye(3, dtype=torch.float64), None, draws=2, seed=12345, ref=self.y0)

def _structure(obj):
    from .adapters import Structure

    if isinstance(obj, Structure):
        return obj
    if hasattr(obj, "get_positions"):
        return Structure.from_atoms(obj)
    raise TypeError(f"hunt: expected an ase.Atoms or a geolie Structure, got {type(obj).__name__}")


def _declared_cutoff(adapter, cutoff):
    if cutoff is not None:
        return float(cutoff)
    mod = getattr(adapter, "_module", None)
    c = getattr(mod, "cutoff", None)
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None


def hunt(model, structure, *, group=SO3, dtype: torch.dtype = torch.float64, n_random: int = 16, n_starts: int = 3,
         steps: int = 25, lr: float = 0.05, max_pairs: int = 24, seed: int = 0, cutoff: Optional[float] = None,
         delta: float = 1e-6, out_dir: Optional[str] = None, tag: Optional[str] = None,
         stack_atoms: int = STACK_ATOMS) -> HuntResult:
    """Find, for each output of ``model`` on ``structure``, the group element with the largest relative finite
    equivariance error (see the module docstring for the search, the floor and the discontinuity test).

    ``model``: anything :func:`geolie.adapters.load_model` takes. ``structure``: an ``ase.Atoms`` or a
    :class:`geolie.adapters.Structure`. ``out_dir``: writes each output's worst orientation as
    ``hunt_<tag>_<output>.extxyz`` (``tag``: the structure's name unless given; the rotated, translated structure:
    auditing it reproduces the finding). ``stack_atoms``: the most atoms one stacked call holds (the audit passes its
    ``batch_atoms``: a model's memory is sized by it).
    Per output, :meth:`HuntResult.to_dict` holds ``"worst_error"`` (relative), ``"rotation"`` (3×3),
    ``"axis_angle"`` (radians), ``"translation"``, ``"random_error"``, ``"floor"``, ``"at_floor"``, ``"found_by"``,
    ``"lie_rel"`` (the relative Lie derivative per generator at the worst orientation) and ``"discontinuous"``
    (``None`` or ``{"at": [R1, R2], "jump", "pairs_at_cutoff": [[i, j, distance], ...]}``). Deterministic for a seed.
    """
    from .adapters import load_model

    group = as_group(group)
    if stack_atoms < 1:
        raise ValueError(f"hunt: stack_atoms must be >= 1, got {stack_atoms}")
    for name, v in (("n_random", n_random), ("n_starts", n_starts), ("steps", steps), ("max_pairs", max_pairs)):
        if v < 0:
            raise ValueError(f"hunt: {name} must be >= 0, got {v}")
    adapter = load_model(model)
    if dtype not in adapter.dtypes:
        raise ValueError(f"hunt: model {adapter.name!r} runs in {[str(d) for d in adapter.dtypes]} only, not {dtype}")
    st = _structure(structure)
    adapter.check(st, f"hunt on {st.name or 'structure'}")
    search = _Search(adapter, st, group, dtype, stack_atoms)
    gen = torch.Generator().manual_seed(seed)
    # 1. random orientations: what a random test sees
    Rs = group.random(n_random, gen) if not group.has_translations else group.random(n_random, gen)[0]
    Ts = group.random(n_random, gen)[1] if group.has_translations else None
    # 2. seeded candidates; both evaluated together (stacked calls where the model stacks), recorded in this order
    items = [("random", Rs[k], None if Ts is None else Ts[k]) for k in range(n_random)]
    items += [(label, R, None) for label, R in _candidates(st.positions, max_pairs)]
    errs = search.visit_many(items)
    random_err = [max([e[k] for e in errs[:n_random]], default=0.0) for k in range(search.K)]
    # 3. gradient ascent from the best orientations so far
    search.ascend(n_starts, steps, lr)
    # 4. per output: the worst orientation evaluated again as reported, its floor, Lie derivative, discontinuity, file
    outputs: Dict[str, Dict[str, Any]] = {}
    rc = _declared_cutoff(adapter, cutoff)
    for k, name in enumerate(search.prob.names):
        outputs[name] = search.report(k, random_err[k], delta, rc)
        if out_dir:
            _write(out_dir, tag or st.name or "structure", name, st, *search.best_element(k))
    calls = search.prob.calls + (search.ref.calls if search.ref is not None else 0)
    return HuntResult(st.name, group.name, str(dtype).replace("torch.", ""), outputs, calls, seed, search.notes)


class _Search:
    """The hunt's state on one structure: the model in its precision (``prob``) and the other (``ref``, for floors),
    each output's worst orientation so far with its floor, and the largest error of an orientation above its floor."""

    def __init__(self, adapter, st, group, dtype, stack_atoms: int = STACK_ATOMS):
        self.adapter, self.st, self.group, self.dtype, self.stack_atoms = adapter, st, group, dtype, stack_atoms
        self.prob = _HuntTarget(adapter.evaluation(st, dtype))
        other = torch.float32 if dtype == torch.float64 else torch.float64
        self.ref = _HuntTarget(adapter.evaluation(st, other)) if other in adapter.dtypes else None
        self.K = len(self.prob.names)
        self.noise = self.prob.noise()
        self.estimate = self.prob.rounding_estimate()  # measured in this precision; the reference never undercuts it
        if self.ref is not None:
            self.scale = precision_scale(dtype, other, self.prob.ev.precision)
            self.floor_source = "float32 vs float64 at the same moved inputs" + (
                " (scaled by u64/u32)" if self.scale < 1 else "")
        else:
            self.scale = 1.0
            self.floor_source = "input-rounding estimate (the model runs in one precision)"
        self.best: List[Dict[str, Any]] = [{"err": -1.0} for _ in range(self.K)]
        self.above = [0.0] * self.K
        self.tried: List[Tuple[float, str, torch.Tensor, Optional[torch.Tensor]]] = []
        self.notes: List[str] = []

    def floors(self, R, t, pulled, with_inputs: bool = True, hi: Optional[List[torch.Tensor]] = None) -> List[float]:
        """Relative floor per hunted quantity at ``g = (R, t)`` (``pulled``: this precision's ``φ(g)``).
        ``with_inputs=False`` leaves out the input-rounding measurement: the arithmetic's floor, against which the
        discontinuity test compares jumps (at a hard cutoff the input-rounding measurement is the jump itself)."""
        est = [(e + n) / (m or 1.0) for e, n, m in zip(self.estimate, self.noise, self.prob.norms)]
        if not with_inputs:
            est = [(16 * torch.finfo(y.dtype).eps * float(y.double().norm()) + n) / (m or 1.0)
                   for y, n, m in zip(self.prob.y0, self.noise, self.prob.norms)]
        if self.ref is None:
            return est
        hi = self.ref.pulled_back(R, t) if hi is None else hi
        return [max(a, finite_floor(p, q, y, yr, self.scale, n) / (m or 1.0))
                for a, p, q, y, yr, n, m in zip(est, pulled, hi, self.prob.y0, self.ref.y0, self.noise,
                                                self.prob.norms)]

    def visit(self, label, R, t) -> List[float]:
        """Evaluate ``g = (R, t)`` (``R`` made orthonormal), update each output's worst and the largest error above
        its floor; returns the relative errors."""
        return self.visit_many([(label, R, t)])[0]

    def visit_many(self, items: List[Tuple[str, torch.Tensor, Optional[torch.Tensor]]]) -> List[List[float]]:
        """:meth:`visit` for several labelled group elements, evaluated together in both precisions
        (:meth:`_HuntTarget.pulled_back_many`), then recorded in order."""
        els = [(orthonormal(R), None if t is None else t.detach().to(torch.float64)) for _, R, t in items]
        with torch.no_grad():
            pulled = self.prob.pulled_back_many(els, self.stack_atoms)
            his = self.ref.pulled_back_many(els, self.stack_atoms) if self.ref is not None else [None] * len(els)
        return [self._record(label, R, t, p, hi) for (label, _, _), (R, t), p, hi in zip(items, els, pulled, his)]

    def _record(self, label, R, t, pulled, hi) -> List[float]:
        with torch.no_grad():
            errs = [float(e) for e in self.prob.errors(R, t, pulled)]
            fls = self.floors(R, t, pulled, hi=hi)
        for k, (e, fl) in enumerate(zip(errs, fls)):
            if e > self.above[k] and not at_floor(e, self.confirmed_floor(k, R, t, e, fl)):
                self.above[k] = e
            if e > self.best[k]["err"]:
                self.best[k] = {"err": e, "R": R.clone(), "t": None if t is None else t.clone(), "label": label,
                                "floor": fl}
        self.tried.append((sum(math.log(e * e + 1e-300) for e in errs), label, R.clone(),
                           None if t is None else t.clone()))
        return errs

    def confirmed_floor(self, k: int, R, t, err: float, floor: float) -> float:
        """The floor of output ``k`` at ``g = (R, t)``, confirmed where the error is above it: the hunt takes the
        worst of hundreds of orientations, and a floor estimated from two samples of the rounding would let one of
        them pass it by chance (an exactly equivariant float64 model was "above floor" that way). An error above
        ``floor`` is compared again with the input-rounding measurement at ``g·x`` itself (8 draws); only an error
        above both counts. Errors at floor cost nothing more; a model that breaks is confirmed only when its error
        sets a new maximum."""
        return confirmed_floor(err, floor, lambda: self.prob.rounding_at(R, t)[k] / (self.prob.norms[k] or 1.0))

    def ascend(self, n_starts: int, steps: int, lr: float) -> None:
        """Adam on ``Σ log e²`` from the ``n_starts`` best orientations so far, ``R = exp(ω̂) R₀`` (and ``t``). The
        starts climb together: each step evaluates them in one stacked call where the model stacks
        (:meth:`_HuntTarget.pulled_back_joint`) and takes one backward pass of the sum of their objectives; each start
        has its own parameters and its own Adam (elementwise), so each follows the path it would follow alone."""
        starts = sorted(self.tried, key=lambda r: -r[0])[:n_starts]
        if not starts or steps == 0:
            return
        runs = []
        for _, label, R0, t0 in starts:
            omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            tau = (torch.zeros(3, dtype=torch.float64) if t0 is None else t0.clone()).requires_grad_(True)
            params = [omega, tau] if self.group.has_translations else [omega]
            runs.append((label, R0, omega, tau, params, torch.optim.Adam(params, lr=lr)))
        try:
            for step in range(steps):
                els = [(torch.linalg.matrix_exp(hat(omega)) @ R0, tau if self.group.has_translations else None)
                       for _, R0, omega, tau, _, _ in runs]
                pulled = self.prob.pulled_back_joint(els, check=step == 0, stack_atoms=self.stack_atoms)
                obj = 0.0
                for (label, *_), (R, t), p in zip(runs, els, pulled):
                    errs = self.prob.errors(R, t, p)
                    obj = obj + sum(torch.log(e.double() ** 2 + 1e-300) for e in errs)
                    for k, e in enumerate(errs):
                        if float(e.detach()) > self.best[k]["err"]:
                            self.best[k] = {"err": float(e.detach()), "R": R.detach().clone(),
                                            "t": None if t is None else t.detach().clone(),
                                            "label": f"ascent from {label}", "floor": None}
                for run in runs:
                    run[5].zero_grad()
                (-obj).backward()
                if not all(q.grad is not None and bool(torch.isfinite(q.grad).all()) for run in runs for q in run[4]):
                    raise RuntimeError("no finite gradient with respect to the orientation")
                for run in runs:
                    run[5].step()
        except Exception as e:  # noqa: BLE001 - a model that cannot be differentiated: candidates and random only
            msg = str(e).splitlines()[0][:120] if str(e) else ""
            self.notes.append(f"gradient ascent skipped ({type(e).__name__}: {msg}): worst orientations come from "
                              "the random and seeded candidates")

    def best_element(self, k: int):
        return self.best[k]["R"], self.best[k]["t"]

    def report(self, k: int, random_error: float, delta: float, rc) -> Dict[str, Any]:
        """Output ``k``'s worst orientation, evaluated again at the orthonormal rotation as reported (with its floor
        there), its Lie derivative and whether the output jumps near it."""
        b = self.best[k]
        R, t = orthonormal(b["R"]), b["t"]
        with torch.no_grad():
            pulled = self.prob.pulled_back(R, t)
            err = float(self.prob.errors(R, t, pulled)[k])
            floor = self.floors(R, t, pulled)[k]
            arith = self.floors(R, t, pulled, with_inputs=False)[k]
        floor = self.confirmed_floor(k, R, t, err, floor)
        if not at_floor(err, floor):
            self.above[k] = max(self.above[k], err)
        b.update(R=R, err=err)
        name = self.prob.names[k]
        st_g = _moved(self.st, R, t)
        lie = measure(self.adapter.evaluation(st_g, self.dtype), group=self.group, floor=False)
        lie_rel = lie.outputs[name].rel[0].tolist() if name in lie.outputs else None
        # on the scale of the base output (as the finite errors): ‖L_X f(g·x)‖ / ‖f(x)‖ over the rotations
        lie_base = (float(lie.outputs[name].abs[0][:3].max()) / (self.prob.norms[k] or 1.0)
                    if name in lie.outputs else None)
        u = torch.finfo(self.dtype).eps
        return {"worst_error": err, "rotation": R.tolist(), "axis_angle": so3_log(R).tolist(),
                "translation": None if t is None else t.tolist(), "random_error": random_error, "floor": floor,
                "floor_source": self.floor_source, "at_floor": at_floor(err, floor),
                "max_above_floor": self.above[k], "found_by": b["label"], "lie_rel": lie_rel,
                "discontinuous": _discontinuity(self.prob, k, R, t, delta, lie_base, arith, st_g, rc, u,
                                                self.stack_atoms)}


def _write(out_dir: str, tag: str, name: str, st, R: torch.Tensor, t: Optional[torch.Tensor]) -> None:
    """The worst orientation's structure as ``hunt_<tag>_<output>.extxyz``. The format rounds positions to 1e-8 Å;
    its ``info`` keeps the exact group element (``geolie_rotation``, 9 numbers row-major, and ``geolie_translation``)
    at full precision: ``base_positions @ R.T + t`` reproduces the reported error to rounding."""
    import ase.io

    os.makedirs(out_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    atoms = _moved(st, R, t).to_atoms()
    atoms.info["geolie_rotation"] = R.detach().double().reshape(-1).numpy()
    atoms.info["geolie_translation"] = (np.zeros(3) if t is None else t.detach().double().numpy())
    ase.io.write(os.path.join(out_dir, f"hunt_{safe}_{name}.extxyz"), atoms, format="extxyz")


def _moved(st, R: torch.Tensor, t: Optional[torch.Tensor]):
    from .adapters import Structure

    Rn = R.detach().numpy()
    pos = st.positions @ Rn.T + (0 if t is None else t.detach().numpy())
    cell = None if st.cell is None else st.cell @ Rn.T
    return Structure(st.numbers, pos, cell, st.name, dict(st.labels))


def _discontinuity(prob: _HuntTarget, k: int, R, t, delta: float, lie_base, floor: float, st_g, rc, u,
                   stack_atoms: int = STACK_ATOMS):
    """Compare the pulled-back output at ``g`` (and at the identity, the base orientation, which is as special as any)
    with its values a rotation ``±s`` away (see the module doc); the larger jump above the threshold, or ``None``."""
    scale = prob.norms[k] if prob.norms[k] > 0 else 1.0
    threshold = 100 * delta * max(lie_base if lie_base is not None else 1.0, 1.0) + 10 * floor
    worst = (0.0, None, None)
    with torch.no_grad():
        for Rc, tc in ((R, t), (torch.eye(3, dtype=torch.float64), None if t is None else torch.zeros_like(t))):
            base = prob.pulled_back(Rc, tc)[k]
            near = []
            for axis, sign, step in itertools.product(range(3), (1.0, -1.0), (delta, delta / 10)):
                w = torch.zeros(3, dtype=torch.float64)
                w[axis] = sign * step
                near.append((torch.linalg.matrix_exp(hat(w)) @ Rc, tc))
            for (R2, _), pulled in zip(near, prob.pulled_back_many(near, stack_atoms)):  # stacked where it stacks
                jump = float((pulled[k] - base).norm()) / scale
                if jump > worst[0]:
                    worst = (jump, Rc, R2)
    if worst[0] <= threshold:
        return None
    pairs = []
    if rc is not None:
        x = torch.as_tensor(st_g.positions, dtype=torch.float64)
        d = torch.cdist(x, x)
        tol = 1000 * u * rc
        for i, j in zip(*torch.nonzero(torch.triu((d - rc).abs() <= tol, 1), as_tuple=True)):
            pairs.append([int(i), int(j), float(d[i, j])])
    return {"at": [worst[1].tolist(), worst[2].tolist()], "jump": worst[0], "threshold": threshold,
            "pairs_at_cutoff": pairs}
