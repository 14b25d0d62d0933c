r"""Statistics that match the study's design (issue: "the study says what its data say").

The study trains each architecture family at several widths under several training *recipes* (plain, augment,
penalty, equigrad). A trend across widths must be read within a recipe (Gruver et al. colour their plots
by training method): pooling recipes mixes the recipe's effect into the trend. Helpers:

* :func:`spearman_exact` — Spearman's ρ with its exact two-sided permutation p-value (all ``n!`` orderings, for
  ``n <= 8``): at ``n = 4`` the smallest possible p is ``2/24 = 0.083``, so four widths per recipe can never show a
  rank correlation at the 5% level, whatever the data;
* :func:`factor_fit` — the pooled least-squares fit ``log L = b · log x + c_recipe`` (one intercept per recipe, a
  common slope), with the slope's 95% t-interval (``n − 1 − #recipes`` degrees of freedom): the within-recipe trend
  with an interval, the recipe as a factor;
* :func:`seed_interval` — mean and 95% t-interval over seeds of one configuration (``None`` interval with one seed);
* :func:`label_baselines` — the errors a model must beat: predicting the training-mean energy (energy MAE) and zero
  forces (force MAE), and the label force norms per split (relative Lie derivatives are normalised by forces).

A statement is made only when its interval excludes the null (:func:`claim`); otherwise it says "not
distinguishable" and gives the interval.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=float)
    for v in np.unique(a):
        m = a == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def spearman_exact(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    """Spearman's ρ and its exact two-sided permutation p-value (``n <= 8``; ``p`` NaN for larger ``n``)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3:
        return {"rho": math.nan, "p": math.nan, "n": n}
    rho = _rho(x, y)
    if n > 8:
        return {"rho": rho, "p": math.nan, "n": n}
    perms = [_rho(x, y[list(p)]) for p in itertools.permutations(range(n))]
    p = sum(abs(r) >= abs(rho) - 1e-12 for r in perms) / len(perms)
    return {"rho": rho, "p": float(p), "n": n}


def factor_fit(y: Sequence[float], x: Sequence[float], groups: Sequence[Any]) -> Dict[str, Any]:
    """Least squares ``y = b x + c_g`` (a common slope, one intercept per group) and the slope's 95% t-interval.
    ``y`` and ``x`` are used as given (pass logarithms for a log-log fit)."""
    from scipy import stats

    y, x = np.asarray(y, float), np.asarray(x, float)
    ok = np.isfinite(x) & np.isfinite(y)
    y, x = y[ok], x[ok]
    g = [gr for gr, k in zip(groups, ok) if k]
    levels = sorted(set(g), key=str)
    A = np.column_stack([x] + [np.array([gi == lv for gi in g], float) for lv in levels])
    n, k = A.shape
    dof = n - k
    if dof < 1:
        return {"slope": math.nan, "lo": math.nan, "hi": math.nan, "n": n, "groups": len(levels), "dof": dof}
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(A.T @ A)
    se = math.sqrt(float(cov[0, 0]))
    t = float(stats.t.ppf(0.975, dof))
    b = float(coef[0])
    return {"slope": b, "lo": b - t * se, "hi": b + t * se, "se": se, "n": n, "groups": len(levels), "dof": dof}


def seed_interval(values: Sequence[float], bounds: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
    """Mean and 95% t-interval over seeds (``lo``/``hi`` None with a single seed).

    ``bounds``: the quantity's range (``(0, 1)`` for a share); the t-interval is cut to it, which keeps its coverage
    (the true value lies inside the range) and says no more than the data: a share's interval never reaches past 1."""
    from scipy import stats

    v = np.asarray([a for a in values if a is not None and np.isfinite(a)], float)
    if len(v) == 0:
        return {"mean": math.nan, "lo": None, "hi": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "lo": None, "hi": None, "n": 1}
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    lo, hi = float(v.mean()) - h, float(v.mean()) + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": len(v)}


def claim(lo: Optional[float], hi: Optional[float], positive: str, negative: str, null: float = 0.0) -> str:
    """``positive`` when the interval lies above ``null``, ``negative`` below it, else "not distinguishable"."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "not distinguishable (no interval)"
    if lo > null:
        return positive
    if hi < null:
        return negative
    return "not distinguishable"


def log_ratio(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Paired comparison of positive quantities: mean of ``log10(a_i / b_i)`` with its 95% t-interval over the
    pairs, and the factor ``10^mean`` with ``10^lo``, ``10^hi`` (pairs with a non-finite or non-positive member are
    dropped)."""
    d = [math.log10(x / y) for x, y in zip(a, b)
         if x is not None and y is not None and np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0]
    si = seed_interval(d)
    out = {"log_mean": si["mean"], "lo": si["lo"], "hi": si["hi"], "n": si["n"], "factor": 10 ** si["mean"]
           if np.isfinite(si["mean"]) else math.nan}
    out["factor_lo"] = None if si["lo"] is None else 10 ** si["lo"]
    out["factor_hi"] = None if si["hi"] is None else 10 ** si["hi"]
    return out


#: the study's own splits of each 500 K trajectory (frames 10 fs apart, in time order; half-open frame ranges):
#: train on the first 6 ps, stop early on frames 620-719, test on the last 2 ps (800 fs after the last training
#: frame); the 300 K trajectory is the ``shift`` split
TIME_SPLITS = {"train": (0, 600), "val": (620, 720), "time": (800, 1000)}


def study_splits(molecule: str) -> Dict[str, list]:
    """The frames of each study split of ``xtb-md/<molecule>`` (``train``, ``val``, ``time``, ``shift``)."""
    import geolie

    traj = geolie.data.load(f"xtb-md/{molecule}", split="all")
    out = {k: traj[a:b] for k, (a, b) in TIME_SPLITS.items()}
    out["shift"] = geolie.data.load(f"xtb-md/{molecule}", split="shift")
    return out


def label_baselines(molecule: str) -> Dict[str, float]:
    """From the bundled data the study trains on (:func:`study_splits`): the ``time``-split energy MAE of predicting
    the training-mean energy, its force MAE of predicting zero forces (the mean absolute force component), the same
    two on the ``shift`` split, and the median per-structure label force norm ``‖F‖`` on ``time`` (500 K) and
    ``shift`` (300 K)."""
    sp = study_splits(molecule)
    e = {k: np.array([a.get_potential_energy() for a in v]) for k, v in sp.items()}
    f = {k: [a.get_forces() for a in v] for k, v in sp.items()}
    mean = e["train"].mean()
    return {"energy_mae_constant": float(np.abs(e["time"] - mean).mean()),
            "forces_mae_zero": float(np.mean([np.abs(x).mean() for x in f["time"]])),
            "energy_mae_constant_shift": float(np.abs(e["shift"] - mean).mean()),
            "forces_mae_zero_shift": float(np.mean([np.abs(x).mean() for x in f["shift"]])),
            "force_norm_test_median": float(np.median([np.linalg.norm(x) for x in f["time"]])),
            "force_norm_shift_median": float(np.median([np.linalg.norm(x) for x in f["shift"]]))}
