r"""Noise floors and verdicts: the one place where geolie decides what a figure means.

Every figure geolie prints — a Lie derivative per generator, a finite check per family of group elements, the
hunt's worst orientation — comes with a **floor** and a **verdict**, computed here and nowhere else.

Floor
-----
A floor is the rounding of the model's own arithmetic *at the inputs in question*, measured, never derived from
an equivariance error and never a constant multiple of the unit round-off alone:

* **another precision** (the default wherever the model runs in float32 and float64): the distance between the
  model evaluated in its dtype and in the other dtype at the same inputs. A float32 figure's floor is that
  distance itself (float64 is the more precise evaluation); a float64 figure's floor is the distance times
  ``u64/u32`` (the same rounding, at float64's unit round-off), unless the float64 copy keeps constants of lower
  precision (:attr:`geolie.Evaluation.precision`), which bound its arithmetic: then it is not scaled.

  - Lie derivatives: ``δ = |L_dtype − L_other|`` elementwise (:func:`lie_floor`), never below the rounding
    estimate of the terms whose cancellation gives zero (:func:`rounding_floor`), plus the model's call-to-call
    noise ``|dρ_out(X)(f(x)′ − f(x))|`` (one more call; zero for deterministic models).
  - finite checks and the hunt, error ``e(g) = ‖f(g·x) − ρ(g) f(x)‖``: ``s (‖f(g·x) − f̃(g·x)‖ + ‖f(x) − f̃(x)‖)
    + ‖f(x) − f(x)′‖ + κ u ‖f(x)‖`` (:func:`finite_floor`): the two evaluations' distances to the other precision
    (``f̃``, with ``g·x`` moved in that precision, so the rounding of the moved input is counted), the model's own
    call-to-call noise (the ``repeat`` check: zero for deterministic models) and the rounding of ``ρ(g)``'s
    product (``4 u ‖f(x)‖``; ``16 u ‖f(x)‖`` for a scaled float64 figure, as the Lie floors, for error sources that
    do not scale with the precision). The ``repeat`` check itself (two calls at the same inputs, where only randomness or reductions in a
    varying order can differ) has the rounding estimate ``16 u ‖f(x)‖`` as its floor: above it, the model is not
    deterministic (a real finding: ASE's EMT keeps its neighbour list, with a skin, from earlier calls, so its output
    at the same input depends on what it evaluated before, by about 1e-14 relative on metal cells). For a float32 figure this bounds the error of an exactly equivariant model by the triangle
    inequality (the float64 model's own error, about 1e-16, aside): such a model is never "above floor".

* **two AD families** (models that run in one precision only): the rounding estimate, never below twice the
  difference between two differentiation methods of different families that both pass the adjoint test.
* **input-rounding measurement** (finite checks and hunts): the largest change of the output when the positions are
  perturbed by their rounding, ``2 u |x|`` per coordinate with random signs (two draws), plus the call-to-call
  noise and ``16 u ‖f(x)‖``: the model's own arithmetic at inputs that differ as a moved input does, measured in
  its own precision. The floor of a finite figure is never below it (a scaled float32 distance can undercut float64
  rounding by chance); for a model that runs in one precision only it is the floor, named as an estimate.
* **confirmation at the moved input** (every finite figure and the hunt, :func:`confirmed_floor`): two draws at the
  base input estimate the rounding; a trial whose error is above that floor is measured again at its own moved
  input ``g·x``, ``CONFIRM_DRAWS`` draws, and counts as above floor only when it is above that measurement too (not
  the ``repeat`` check, whose floor is no rounding estimate). Two
  draws let an exact model pass its floor by chance once in a few hundred trials (EMT on a metal cell, the hunt's
  few hundred orientations); trials at floor cost nothing more.
* **finite differences**: the Richardson error estimate.

Each row names how its floor was obtained (``floor_source``).

Verdict
-------
With ``FLOOR_FACTOR = 2``, a figure ``v`` with floor ``φ`` is

* ``"at floor"`` when ``v <= 2 φ``: indistinguishable from zero at this precision;
* ``"BREAKS"`` when ``v > 2 φ`` and ``v`` exceeds the user's threshold (``--fail-above``, ``rtol``);
* ``"above floor"`` otherwise: measurably non-zero, below the threshold (or no threshold given).

A figure made of several trials (a family of finite group elements) is at floor only when every trial is, and
breaks when one trial is both above its floor and above the threshold; ``max_above_floor`` (the largest error of a
trial above its floor, 0 when none) carries that into a row. :func:`gate` applies the verdict to every figure of an
audit's rows (Lie, finite, hunt) and names each failing one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["FLOOR_FACTOR", "AT_FLOOR", "ABOVE_FLOOR", "BREAKS", "verdict", "worst", "at_floor", "precision_scale",
           "finite_floor", "lie_floor", "rounding_floor", "input_roundings", "confirmed_floor", "CONFIRM_DRAWS",
           "Failure", "gate", "FIGURES", "DEFAULT_GATE", "orthonormal"]

FLOOR_FACTOR = 2.0
AT_FLOOR, ABOVE_FLOOR, BREAKS = "at floor", "above floor", "BREAKS"
_ORDER = {AT_FLOOR: 0, ABOVE_FLOOR: 1, BREAKS: 2}
#: the kinds of figure an audit computes, in the order the gate reports them. ``inversion`` (a finite check of
#: parity, which is not part of SO(3) or SE(3)) is reported with its own verdict and gated only when asked for.
FIGURES = ("lie", "finite", "hunt", "inversion")
DEFAULT_GATE = ("lie", "finite", "hunt")


# ---------------------------------------------------------------------------------------------------------- verdicts
def at_floor(value, floor):
    """``value <= FLOOR_FACTOR · floor`` (a NaN value is never at floor): a bool for numbers, elementwise booleans
    for arrays."""
    res = np.asarray(value) <= FLOOR_FACTOR * np.asarray(floor)
    return bool(res) if res.ndim == 0 else res


def verdict(value: float, floor: float, threshold: Optional[float] = None,
            above_floor: Optional[float] = None) -> str:
    """``"at floor"``, ``"above floor"`` or ``"BREAKS"`` (see the module docstring). ``above_floor``: for a figure
    made of several trials, the largest error of a trial above its own floor (0: none is), which then decides."""
    if above_floor is not None:
        if not above_floor > 0:
            return AT_FLOOR
        return BREAKS if threshold is not None and above_floor > threshold else ABOVE_FLOOR
    if at_floor(value, floor):
        return AT_FLOOR
    return BREAKS if threshold is not None and not value <= threshold else ABOVE_FLOOR


def lie_verdict(abs_value: float, floor: float, value: float, threshold: Optional[float] = None) -> str:
    """The verdict of one Lie derivative: its absolute norm against its floor, ``value`` (the relative norm, or the
    metric a gate chose) against the threshold."""
    if at_floor(abs_value, floor):
        return AT_FLOOR
    return BREAKS if threshold is not None and not value <= threshold else ABOVE_FLOOR


def worst(verdicts: Iterable[str]) -> str:
    """The most severe of several verdicts (``"at floor"`` for none)."""
    return max(verdicts, key=_ORDER.__getitem__, default=AT_FLOOR)


# ---------------------------------------------------------------------------------------------------------- floors
def precision_scale(dtype: torch.dtype, other: torch.dtype, precision: Optional[torch.dtype] = None) -> float:
    """The factor that turns a measured distance between the ``dtype`` and ``other`` evaluations into the floor of
    the ``dtype`` figure: 1 when ``dtype`` is the less precise one, ``u_dtype / u_other`` when it is the more precise
    one (unless its arithmetic is bounded by constants of precision ``precision``, then ``u_precision/u_other``)."""
    u, v = torch.finfo(dtype).eps, torch.finfo(other).eps
    if precision is not None:
        u = max(u, torch.finfo(precision).eps)
    return min(1.0, u / v)


def finite_floor(moved: torch.Tensor, moved_ref: Optional[torch.Tensor], base: torch.Tensor,
                 base_ref: Optional[torch.Tensor], scale: float, noise: float = 0.0) -> float:
    """The floor of ``‖f(g·x) − ρ(g) f(x)‖`` for one trial (see the module docstring): ``moved``/``base`` are the
    output at ``g·x`` and at ``x`` in the figure's dtype, ``*_ref`` the same in the other precision (``None``: no
    other precision, then only the rounding terms and ``noise``, and the caller adds an input-rounding estimate);
    ``noise``: the model's call-to-call difference at ``x``."""
    u = torch.finfo(base.dtype).eps
    # the rounding of ρ(g)'s product, and, for a scaled (more precise) figure, error sources that do not scale with
    # the precision (as for the Lie floors: 16 u of the output)
    kappa = 4.0 if scale >= 1 else 16.0
    fl = kappa * u * float(base.double().norm()) + noise
    if moved_ref is not None and base_ref is not None:
        fl += scale * (float((moved.double() - moved_ref.double()).norm())
                       + float((base.double() - base_ref.double()).norm()))
    return fl


def input_roundings(values: Sequence[torch.Tensor], moving: Sequence[int], draws: int = 2,
                    generator: Optional[torch.Generator] = None) -> List[List[torch.Tensor]]:
    """``draws`` copies of the inputs with the moving ones perturbed by their rounding, ``±2 u |x|`` per coordinate
    (random signs): the largest change of the output over them, plus ``16 u ‖f(x)‖``, is the floor estimate of a
    model that runs in one precision only (the input-rounding estimate)."""
    g = generator if generator is not None else torch.Generator().manual_seed(12345)
    out = []
    for _ in range(draws):
        vals = list(values)
        for i in moving:
            v = vals[i]
            sign = torch.randint(0, 2, tuple(v.shape), generator=g).to(v) * 2 - 1
            vals[i] = v + sign * 2 * torch.finfo(v.dtype).eps * v.abs()
        out.append(vals)
    return out


#: draws of the input rounding at a trial's own moved input (:func:`confirmed_floor`), and the seed of their signs
CONFIRM_DRAWS, CONFIRM_SEED = 8, 54321


def confirmed_floor(error: float, floor: float, at_moved: Callable[[], float]) -> float:
    """The floor of one trial, confirmed where its ``error`` is above ``floor`` (estimated from two rounding draws at
    the base input): then ``max(floor, at_moved())``, where ``at_moved`` measures the input rounding at the trial's
    own moved input (``CONFIRM_DRAWS`` draws, :func:`input_roundings` with the seed ``CONFIRM_SEED``), in the units
    of ``error``. A NaN error is never at floor and is not confirmed; an error at ``floor`` costs no call."""
    if error != error or at_floor(error, floor):
        return floor
    return max(floor, at_moved())


def rounding_floor(values: Sequence[torch.Tensor], corrections: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                   generator_names: Sequence[str], length_scale: float, kappa: float = 16.0) -> List[torch.Tensor]:
    """``kappa u (|J dρ_in x| + |dρ_out f| + |f| / s_k)`` elementwise per Lie derivative ``L`` (``values``):
    ``|J dρ_in x| = |L + dρ_out f|``, ``corrections`` are ``dρ_out f``, ``s_k`` = 1 rad for rotations or the RMS
    radius ``length_scale`` for translations."""
    K = len(generator_names)
    scale = torch.tensor([1.0 if g.startswith("r") else 1.0 / length_scale for g in generator_names],
                         dtype=torch.float64)
    out = []
    for L, c, y in zip(values, corrections, ys):
        u = torch.finfo(L.dtype).eps
        s = scale.to(y).reshape((K,) + (1,) * y.dim())
        out.append(kappa * u * ((L + c).abs() + c.abs() + s * y.abs()[None]))
    return out


def lie_floor(values: Sequence[torch.Tensor], ref_values: Sequence[torch.Tensor], rounding: Sequence[torch.Tensor],
              scale: float) -> List[torch.Tensor]:
    """Elementwise floors of Lie derivatives from a reference in the other precision: ``scale |L − L_ref|``, never
    below ``rounding`` (:func:`rounding_floor`)."""
    return [torch.maximum((a - b.to(a)).abs() * scale, r) for a, b, r in zip(values, ref_values, rounding)]


def orthonormal(R: torch.Tensor) -> torch.Tensor:
    """The rotation nearest to ``R`` (float64, ``‖R Rᵀ − I‖`` at rounding): the polar factor ``U Vᵀ`` of its SVD,
    with the sign that makes ``det = +1``."""
    R = R.detach().to(torch.float64)
    U, _, Vh = torch.linalg.svd(R)
    d = torch.sign(torch.det(U @ Vh))
    D = torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=torch.float64))
    return U @ D @ Vh


# ---------------------------------------------------------------------------------------------------------- the gate
@dataclass
class Failure:
    """One figure that breaks: which kind (``lie``, ``finite``, ``hunt``), output, what (generator or family),
    structure, its value and floor."""

    figure: str
    output: str
    what: str
    structure: Any
    name: str
    value: float
    floor: float

    def line(self, threshold: float) -> str:
        ratio = self.value / self.floor if self.floor > 0 else math.inf
        return (f"{self.figure} {self.what} of {self.output!r}, structure {self.structure} ({self.name}): "
                f"{self.value:.3e} > {threshold:.1e}, {ratio:.1e}x its noise floor {self.floor:.1e}")


def row_failures(row: Dict[str, Any], threshold: float, figures: Sequence[str] = DEFAULT_GATE,
                 outputs: Optional[Sequence[str]] = None, metric: str = "rel",
                 generator_names: Sequence[str] = ()) -> List[Failure]:
    """The figures of one audit row whose verdict is ``"BREAKS"`` at ``threshold`` (see :func:`gate`)."""
    fails: List[Failure] = []
    want = (lambda name: True) if not outputs else (lambda name: name in outputs or name.split("[")[0] in outputs)
    idx, nm = row.get("index"), row.get("name", "")
    if "lie" in figures:
        for name, o in row.get("outputs", {}).items():
            if not want(name):
                continue
            vals = o.get(metric) if metric != "rel" else o.get("rel")
            if vals is None:
                continue
            for k, (v, a, fl) in enumerate(zip(vals, o["abs"], o["floor"])):
                # the verdict compares the absolute figure with its floor; the threshold applies to the chosen metric
                if lie_verdict(a, fl, v, threshold) == BREAKS:
                    g = generator_names[k] if k < len(generator_names) else str(k)
                    rel_floor = fl * (v / a) if a > 0 else fl
                    fails.append(Failure("Lie derivative", name, g, idx, nm, float(v), float(rel_floor)))
    if "finite" in figures or "inversion" in figures:
        for name, fams in row.get("finite", {}).items():
            if not want(name):
                continue
            for fam, v in fams.items():
                if ("inversion" if fam == "inversion" else "finite") not in figures:
                    continue
                info = (row.get("finite_floor") or {}).get(name, {}).get(fam)
                if info is None:  # a row without floors (older geolie): the error alone decides
                    above, fl = (v if v == v and v > threshold else 0.0), 0.0
                else:
                    above, fl = info["above"], info["floor"]
                if verdict(v, fl, threshold, above_floor=above) == BREAKS:
                    fails.append(Failure("finite", name, fam, idx, nm, float(above), float(fl)))
    if "hunt" in figures:
        for name, h in ((row.get("hunt") or {}).get("outputs") or {}).items():
            if not want(name):
                continue
            above = h.get("max_above_floor", 0.0 if h["at_floor"] else h["worst_error"])
            if verdict(h["worst_error"], h["floor"], threshold, above_floor=above) == BREAKS:
                fails.append(Failure("hunt", name, "worst orientation", idx, nm, float(above), float(h["floor"])))
    return fails


def row_verdicts(row: Dict[str, Any], threshold: Optional[float] = None) -> Dict[str, Dict[str, str]]:
    """Per output of one audit row: the verdict of its Lie derivatives (worst over generators), of its finite checks
    (worst over families) and of its hunt, and ``"overall"`` (the worst of them)."""
    out: Dict[str, Dict[str, str]] = {}
    for name, o in row.get("outputs", {}).items():
        out[name] = {"lie": worst(lie_verdict(a, fl, r, threshold) for a, fl, r in zip(o["abs"], o["floor"], o["rel"]))}
    for name, fams in row.get("finite", {}).items():
        floors = (row.get("finite_floor") or {}).get(name, {})
        vs = {f: verdict(v, floors[f]["floor"], threshold, above_floor=floors[f]["above"]) for f, v in fams.items()
              if f in floors}
        if any(f != "inversion" for f in vs):
            out.setdefault(name, {})["finite"] = worst(v for f, v in vs.items() if f != "inversion")
        if "inversion" in vs:
            out.setdefault(name, {})["inversion"] = vs["inversion"]
    for name, h in ((row.get("hunt") or {}).get("outputs") or {}).items():
        above = h.get("max_above_floor", 0.0 if h["at_floor"] else h["worst_error"])
        out.setdefault(name, {})["hunt"] = verdict(h["worst_error"], h["floor"], threshold, above_floor=above)
    for v in out.values():  # parity is not part of the group: reported, not in the overall verdict
        v["overall"] = worst(x for k, x in v.items() if k != "inversion")
    return out


def gate(rows: Iterable[Dict[str, Any]], threshold: float, figures: Sequence[str] = DEFAULT_GATE,
         outputs: Optional[Sequence[str]] = None, metric: str = "rel",
         generator_names: Sequence[str] = ()) -> List[Failure]:
    """Every figure of ``rows`` (an audit's rows) whose verdict at ``threshold`` is ``"BREAKS"``: the Lie derivatives
    (``metric``: ``rel``, ``abs`` or ``per_atom`` against the threshold, the absolute figure against its floor), each
    family of finite checks and the hunt's worst orientation (relative errors). ``figures`` chooses among ``lie``,
    ``finite``, ``hunt`` (the default: all three) and ``inversion`` (parity: not part of SO(3) or SE(3), gated only
    when named); ``outputs`` restricts to those outputs (``stress`` includes its parts)."""
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise ValueError(f"gate: unknown figure(s) {bad}; choose among {list(FIGURES)}")
    out: List[Failure] = []
    for row in rows:
        out += row_failures(row, threshold, figures, outputs, metric, generator_names)
    return out
