r"""Metrics on Lie derivatives, with noise floors, and the :func:`measure` entry point.

For one sample (a structure) and generator ``k`` with output ``y`` (the sample's rows of an output tensor):

* absolute norm  ``abs = ‖L_k y‖₂`` (output units per radian, or per length unit for translations);
* relative norm  ``rel = ‖L_k y‖₂ / ‖y‖₂`` (= RMS of ``L_k y`` over the RMS of ``y``; 1/radian);
* per-atom norm  ``per_atom = ‖L_k y‖₂ / sqrt(N)`` for per-atom outputs such as forces (the RMS over atoms of
  the per-atom vector norm);
* isotropic rotation norm ``iso = sqrt(mean_{k∈{rx,ry,rz}} ‖L_k y‖²)``: the RMS Lie derivative about a uniformly
  random axis (because ``L`` is linear in the generator and ``E[n nᵀ] = I/3``).

Noise floor: every figure comes with the same norm applied to an elementwise error estimate ``δ``:

* finite differences: the Richardson error estimate of :mod:`geolie._lie`;
* automatic differentiation, when a reference evaluation in the other precision is possible (``f_ref``, a copy of
  an ``nn.Module`` cast to the other dtype, or ``f`` itself if it accepts the other dtype):
  ``δ = |L_float32 - L_float64|`` for a float32 measurement, and that difference scaled by ``u64/u32`` for a
  float64 one (never below the rounding estimate below, with ``1 u`` instead of ``16 u`` for float32);
* otherwise a rounding estimate ``δ = 16 u (|J dρ_in x| + |dρ_out f| + |f| / s)`` (``u`` the unit round-off,
  ``s`` = 1 radian or the RMS radius of the points for translations): the two terms whose cancellation gives zero
  for an equivariant model, plus the output itself (an invariant output cancels inside ``J dρ_in x``); and, since
  a model that runs in one precision only can have more noise than that, never below twice the measured
  difference between the accepted AD method and a second one that also passes the adjoint test
  (``floor_source`` names both).

Each sample's floor is the largest over the rotation generators (and, separately, over the translations): the noise
level does not depend on the axis, and one sample of it can be small by chance. A figure is *at the floor* when
``abs <= 2 floor`` (i.e. indistinguishable from zero at this precision).
Aggregates over samples: mean, median, p99 and max (never the mean alone).

Rank-2 tensors (stress, polarizability) are also reported by irreducible part, ``name[l=0]`` (trace, pressure),
``name[l=2]`` (symmetric traceless) and ``name[l=1]`` (antisymmetric, only when the tensor has such a part above
rounding) (:func:`geolie.tensor2_parts`); their relative figures and floors are those of the whole tensor (a part
can vanish, and an orthogonal projection does not raise the noise). Parity is not a continuous symmetry:
it has no Lie derivative, and the finite checks report inversion separately from rotations.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ._groups import SE3, as_group
from ._evaluation import Evaluation
from ._io import flatten_outputs, leaf_name
from ._reps import Tensor2Rep, has_antisymmetric_part, tensor2_parts
from ._lie import LieResult, lie_result, out_correction, second_opinion
from ._cost import part as cost_part
from ._verdict import FLOOR_FACTOR, at_floor, lie_floor, precision_scale, rounding_floor

__all__ = ["measure", "Report", "OutputMetrics", "aggregate", "iso_rotation"]


def aggregate(values) -> Dict[str, float]:
    """Mean, median, 99th percentile and max of a 1D array (NaNs ignored)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan, "max": math.nan}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def iso_rotation(values, names=None) -> np.ndarray:
    """The isotropic rotation norm: RMS over the rotation generators of per-generator norms ``[..., generators]``
    (``sqrt(mean_k v_k²)``, the RMS Lie derivative about a uniformly random axis). The rotation columns are the
    first three, or with ``names`` those whose name starts with ``r`` (``rx ry rz``; ``r~`` alone for the random
    estimator, whose square is an unbiased estimate of the squared isotropic norm)."""
    v = np.asarray(values, dtype=np.float64)
    cols = [k for k, g in enumerate(names) if g.startswith("r")] if names is not None else [0, 1, 2]
    return np.sqrt(np.mean(v[..., cols] ** 2, axis=-1))


@dataclass
class OutputMetrics:
    """Metrics of one output. Arrays are ``[samples, generators]`` unless stated."""

    name: str
    rep: str
    generator_names: List[str]
    abs: np.ndarray
    rel: np.ndarray
    floor: np.ndarray
    ynorm: np.ndarray
    per_atom: Optional[np.ndarray] = None
    floor_source: str = ""
    ad_check: Optional[float] = None  # the adjoint test's relative disagreement (None: not AD)
    source: str = ""  # where the output came from (see geolie.Evaluation)
    #: per sample, per atom (outputs with one row per atom): RMS over the rotation generators of ``‖L_X y_i‖``
    per_point: Optional[List[np.ndarray]] = field(default=None, repr=False)

    @property
    def floor_rel(self) -> np.ndarray:
        """The floor relative to ``‖y‖`` (the floor of :attr:`rel`)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.ynorm[:, None] > 0, self.floor / self.ynorm[:, None], np.nan)

    @property
    def iso_rotation(self) -> np.ndarray:
        """``[samples]``: RMS over the three rotation generators of ``abs``."""
        return iso_rotation(self.abs)

    @property
    def iso_rotation_rel(self) -> np.ndarray:
        return iso_rotation(self.rel)

    @property
    def at_floor(self) -> np.ndarray:
        """``[samples, generators]`` booleans: the Lie derivative is indistinguishable from zero."""
        return at_floor(self.abs, self.floor)

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "rep": self.rep, "generators": self.generator_names, "floor_source": self.floor_source,
            "ad_check": self.ad_check, "source": self.source,
            "abs": self.abs.tolist(), "rel": self.rel.tolist(), "floor": self.floor.tolist(),
            "iso_rotation": self.iso_rotation.tolist(),
            "aggregates": {
                g: {"abs": aggregate(self.abs[:, k]), "rel": aggregate(self.rel[:, k]),
                    "floor": aggregate(self.floor[:, k])}
                for k, g in enumerate(self.generator_names)
            },
        }
        if self.per_atom is not None:
            d["per_atom"] = self.per_atom.tolist()
        return d


@dataclass
class Report:
    """What :func:`measure` returns: per output :class:`OutputMetrics`, plus how they were obtained."""

    outputs: Dict[str, OutputMetrics]
    method: str
    dtype: str
    n_samples: int
    lie: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    notes: List[str] = field(default_factory=list)
    problem: Optional[Any] = field(default=None, repr=False)  # the engine's prepared problem (finite checks reuse it)

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "dtype": self.dtype, "n_samples": self.n_samples, "notes": self.notes,
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()}}

    def table(self, metric: str = "rel") -> str:
        """A plain-text table: one row per output, the median over samples of ``metric`` per generator."""
        gens = next(iter(self.outputs.values())).generator_names if self.outputs else []
        head = f"{'output':<14}{'rep':<10}" + "".join(f"{g:>11}" for g in gens) + f"{'floor':>11}{'at floor':>10}"
        lines = [f"{metric} Lie derivative (median over {self.n_samples} sample(s)), {self.method}, {self.dtype}",
                 head, "-" * len(head)]
        for name, m in self.outputs.items():
            vals = getattr(m, metric)
            floor = m.floor_rel if metric == "rel" else m.floor
            row = f"{name[:13]:<14}{m.rep[:9]:<10}" + "".join(f"{np.median(vals[:, k]):>11.2e}" for k in
                                                            range(len(gens)))
            row += f"{np.nanmedian(floor):>11.2e}{'yes' if m.at_floor.all() else 'no':>10}"
            lines.append(row)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def _sample_slices(t: torch.Tensor, batch: Optional[torch.Tensor], n_graphs: int):
    """Split an output tensor into samples: node-level rows by ``batch``, graph-level rows one each, else whole."""
    if batch is not None and t.dim() >= 1 and t.shape[0] == batch.shape[0] and batch.shape[0] != n_graphs:
        return [batch == b for b in range(n_graphs)], True
    if batch is not None and t.dim() >= 1 and t.shape[0] == n_graphs:
        return [torch.arange(n_graphs, device=t.device) == b for b in range(n_graphs)], False
    return None, t.dim() >= 2  # one sample; [N, 3]-like tensors are per-atom


def _norms(L: torch.Tensor, y: torch.Tensor, floor: torch.Tensor, batch, n_graphs, names=None):
    """Per (sample, generator) norms; ``L`` and ``floor`` are ``[K, *y.shape]``."""
    masks, per_atom_like = _sample_slices(y, batch, n_graphs)
    K = L.shape[0]
    if masks is None:
        Ls, fs, ys = [L.reshape(K, -1)], [floor.reshape(K, -1)], [y.reshape(-1)]
        n_atoms = [y.shape[0] if y.dim() >= 2 else 1]
    else:
        Ls = [L[:, m].reshape(K, -1) for m in masks]
        fs = [floor[:, m].reshape(K, -1) for m in masks]
        ys = [y[m].reshape(-1) for m in masks]
        n_atoms = [int(m.sum()) for m in masks]
    a = torch.stack([x.double().norm(dim=1) for x in Ls]).cpu().numpy()
    fl = torch.stack([x.double().norm(dim=1) for x in fs]).cpu().numpy()
    # a floor is one sample of the rounding (or difference) noise; the noise level is the same for every rotation
    # generator (and every translation): take the largest within each kind, so a lucky sample cannot hide it
    names = list(names) if names is not None else [("r" if k < 3 else "t") for k in range(fl.shape[1])]
    for kind in ("r", "t"):  # rotations and translations separately (``r~``/``t~`` for random directions)
        cols = [k for k, g in enumerate(names) if g.startswith(kind)]
        if cols:
            fl[:, cols] = fl[:, cols].max(axis=1, keepdims=True)
    yn = np.array([float(x.double().norm()) for x in ys])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(yn[:, None] > 0, a / yn[:, None], np.nan)
    per_atom = a / np.sqrt(np.array(n_atoms, dtype=np.float64))[:, None] if per_atom_like else None
    per_point = _per_point(L, masks, names) if per_atom_like else None
    return a, rel, fl, per_atom, yn, per_point


def _per_point(L: torch.Tensor, masks, names: List[str]) -> Optional[List[np.ndarray]]:
    """Per sample, per row of a per-atom output ``L`` (``[K, atoms, ...]``): the RMS over the rotation generators of
    ``‖L_X y_i‖``, absolute (what ``report.html`` colours atoms by). ``None`` without rotation generators."""
    rot = [k for k, g in enumerate(names) if g.startswith("r")]
    if not rot or L.dim() < 2:
        return None
    Lr = L[rot].double().reshape(len(rot), L.shape[1], -1)
    pp = Lr.pow(2).sum(-1).mean(0).sqrt().cpu().numpy()  # [atoms]
    return [pp] if masks is None else [pp[m.cpu().numpy()] for m in masks]


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float64 else torch.float64


def _reference(res: LieResult, f_ref, kw) -> Optional[LieResult]:
    """The same Lie derivative in the other precision, or ``None`` when it cannot be evaluated."""
    prob = res.problem
    dtype = prob.inputs.values[prob.inputs.moving[0]].dtype
    other = _other_dtype(dtype)
    if f_ref is None:
        f = prob.f
        f_ref = copy.deepcopy(f).to(other) if isinstance(f, torch.nn.Module) else f
    vals = list(prob.inputs.values)
    for i in prob.inputs.moving:
        vals[i] = vals[i].to(other)
    x = tuple(vals) if prob.inputs.is_tuple else vals[0]
    try:
        ref = lie_result(f_ref, x, **kw)
    except Exception:  # noqa: BLE001 - no reference in the other precision: fall back to the rounding estimate
        return None
    if any(v.dtype != other for v in ref.outputs):
        return None
    return ref


def _rounding_floor(res: LieResult, kappa: float = 16.0) -> List[torch.Tensor]:
    """:func:`geolie._verdict.rounding_floor` of a Lie result (``s_k`` = 1 rad or the RMS radius)."""
    from ._lie import length_scale

    prob = res.problem
    return rounding_floor(res.values, out_correction(prob, prob.y), prob.y, prob.group.generator_names,
                          length_scale(prob), kappa)


def measure(
    f: Any,
    x: Any = None,
    *,
    group=SE3,
    in_rep: Any = "point",
    out_rep: Any = "scalar",
    method: str = "auto",
    about: str = "origin",
    batch: Optional[torch.Tensor] = None,
    f_ref: Optional[Callable] = None,
    floor: bool = True,
) -> Report:
    """Lie derivatives of ``f`` at ``x`` reduced to metrics with noise floors (see the module docstring).

    Arguments are those of :func:`geolie.lie_derivative`, plus ``f_ref`` (the same function in the other
    precision, used for the noise floor; by default an ``nn.Module`` is copied and cast, and a plain function
    is tried with cast inputs) and ``floor`` (``False`` skips the reference evaluation).
    ``batch`` also defines the samples: per-atom outputs are split by it, per-graph outputs by row.
    ``f`` may be a :class:`geolie.Evaluation` (then ``x``, ``in_rep``, ``out_rep``, ``batch`` and ``method`` come
    from it, and ``f_ref`` may be one too).
    """
    sources: Dict[str, str] = {}
    notes: List[str] = []
    guess_reference = True
    precision = None
    if isinstance(f, Evaluation):  # its adapter knows the model's precisions: no reference unless f_ref is given
        guess_reference = f_ref is not None
        ev = f
        f, x, in_rep, out_rep, batch, method = ev.fn, ev.inputs, ev.in_rep, ev.out_rep, ev.batch, ev.method
        sources, notes, precision = ev.sources, list(ev.notes), ev.precision
        if isinstance(f_ref, Evaluation):
            f_ref = f_ref.fn
    group = as_group(group)
    kw = dict(group=group, in_rep=in_rep, out_rep=out_rep, method=method, about=about, batch=batch)
    res = lie_result(f, x, **kw)
    dtype = res.outputs[0].dtype if res.outputs else torch.float64
    with cost_part("floors"):  # the other precision, rounding estimates, call-to-call noise (geolie._cost)
        if res.fd_error is not None:
            floors, src = res.fd_error, "finite-difference error estimate"
        elif floor:
            ref = _reference(res, f_ref, kw) if guess_reference else None
            if ref is not None and ref.fd_error is None:
                other = ref.outputs[0].dtype if ref.outputs else _other_dtype(dtype)
                scale = precision_scale(dtype, other, precision)
                # never below the rounding estimate: one unit round-off of the terms for a measured float32 difference
                # (it can vanish by chance); 16 for float64, whose scaled float32 difference misses error sources that
                # do not scale with the precision (constants such as CG or Gaunt coefficients good to ~1e-15)
                kappa = 1.0 if dtype == torch.float32 else 16.0
                floors = lie_floor(res.values, ref.values, _rounding_floor(res, kappa=kappa), scale)
                src = "float32 vs float64" + (" (scaled by u64/u32)" if scale < 1 else
                                              (" (not scaled: the float64 copy keeps float32 constants)"
                                               if dtype == torch.float64 else ""))
            else:
                floors, src = _measured_floor(res)
        else:
            floors, src = _rounding_floor(res), "rounding estimate"
        if floor and res.fd_error is None:
            floors, nondeterministic = _with_call_noise(res, floors)
            if nondeterministic:
                src += ", plus the model's call-to-call noise"
    with cost_part("metrics and rows"):
        return _report(res, floors, src, batch, group, sources, notes)


def _report(res: LieResult, floors, src: str, batch, group, sources, notes) -> Report:
    """:func:`measure`'s norms, floors and sources per output (and per irreducible part of rank-2 outputs)."""
    dtype = res.outputs[0].dtype if res.outputs else torch.float64
    b = None if batch is None else torch.as_tensor(batch).long().cpu()
    n_graphs = 1 if b is None else int(b.max()) + 1
    outs: Dict[str, OutputMetrics] = {}
    n_samples = 1
    for L, y, fl, leaf in zip(res.values, res.outputs, floors, res.leaves):
        a, rel, flo, pa, yn, pp = _norms(L.detach().cpu(), y.detach().cpu(), fl.detach().cpu(), b, n_graphs,
                                         group.generator_names)
        name = leaf_name(leaf.path)
        chk = None if res.ad_check is None else res.ad_check.get(leaf.path)
        outs[name] = OutputMetrics(name, leaf.rep.name, list(group.generator_names), a, rel, flo, yn, pa, src, chk,
                                   sources.get(name, ""), pp)
        n_samples = max(n_samples, a.shape[0])
        if isinstance(leaf.rep, Tensor2Rep):  # the irreducible parts; L commutes with the projections
            Ld, yd = L.detach().cpu(), y.detach().cpu()
            for part, Lp in tensor2_parts(Ld, with_l1=has_antisymmetric_part(yd)).items():
                # relative to the whole tensor (a part can vanish: a traceless stress has no l = 0), with the whole
                # tensor's floor (an orthogonal projection does not raise the noise)
                a, rel, flo, pa, yn, _ = _norms(Lp, yd, fl.detach().cpu(), b, n_graphs, group.generator_names)
                pname = f"{name}[{part}]"
                outs[pname] = OutputMetrics(pname, f"{leaf.rep.name} {part}", list(group.generator_names), a, rel,
                                            flo, yn, pa, src, chk, sources.get(name, ""))
    return Report(outs, res.method, str(dtype).replace("torch.", ""), n_samples, res.values, notes + res.notes,
                  res.problem)


def _with_call_noise(res: LieResult, floors: List[torch.Tensor]):
    """Floors raised by the model's own call-to-call noise: one more call at ``x``, and ``|dρ_out(X)(f(x)′ − f(x))|``
    added (the part of a Lie derivative a non-deterministic output contributes; zero for deterministic models).
    Returns the floors and whether the two calls differed."""
    prob = res.problem
    try:
        with torch.enable_grad():
            again = [t.detach() if isinstance(t, torch.Tensor) else t for t in
                     flatten_outputs(prob.f(*prob.inputs.call_args(list(prob.inputs.values))))]
    except Exception:  # noqa: BLE001 - the base call worked; a failing second call leaves the floors as they are
        return floors, False
    if len(again) != len(prob.y) or not all(isinstance(a, torch.Tensor) and a.shape == y.shape
                                            for a, y in zip(again, prob.y)):
        return floors, False
    if all(torch.equal(a.to(y), y.detach()) for a, y in zip(again, prob.y)):
        return floors, False
    c1, c0 = out_correction(prob, [a.to(y) for a, y in zip(again, prob.y)]), out_correction(prob, prob.y)
    return [fl + (a - b).abs().to(fl) for fl, a, b in zip(floors, c1, c0)], True


def _measured_floor(res: LieResult):
    """No other precision to compare with: the rounding estimate, never below twice the difference between this AD
    result and a second AD method that passes the adjoint test (a measured sample of the arithmetic's noise)."""
    floors = _rounding_floor(res)
    alt = second_opinion(res)
    if alt is None:
        return floors, "rounding estimate"
    vals, name = alt
    floors = [torch.maximum(fl, 2 * (a - b.to(a)).abs()) for fl, a, b in zip(floors, res.values, vals)]
    return floors, f"rounding estimate and {res.method} vs {name} difference"
