r"""The study's analysis: statistics, tables, findings and plots from the finished runs' ``result.json`` files.

The headline number of a potential is the *relative isotropic rotational Lie derivative of its forces*,
``L(F) = sqrt(mean_k ‖L_{r_k} F‖²) / ‖F‖`` (float64, median over the audited structures of a split): 0 for an
equivariant model, measured against its floor (~1e-15). Beside it, per structure: the absolute
``sqrt(mean_k ‖L_{r_k} F‖²)`` (eV/Å) and the same relative to the *label* forces' norm (which does not move with the
model), so that a change of ``L(F)`` can be told apart from a change of the normalising norm.

Analysis as the study was designed (:mod:`study_stats`):

* a configuration is (molecule, family, width, recipe); it is trained from several seeds, and a configuration's
  numbers are given with a 95% t-interval over its seeds;
* a potential *learned the forces* when its force MAE on the held-out-by-time split is at least 10% below predicting
  zero forces; trends and remedies are read over these runs only, the others are listed;
* trends with size and accuracy are read within each training recipe: a pooled fit ``log L(F) = b log x + c_recipe``
  (seeds as replicates) with the slope's interval, and per recipe Spearman's ρ of the seed means across widths;
* a remedy's effect is the paired ratio (same width and seed) of ``L(F)`` to the plain recipe's, with its interval;
* off-distribution (300 K shift against the 500 K time split): the paired per-run ratio of absolute ``L(F)``, of
  ``L(F)`` relative to the label forces, and of ``L(F)`` relative to the predictions;
* aliasing: the vector family's pointwise nonlinearity against its norm-gated twin (paired by seed and recipe),
  and the share of the energy's rotational derivative that layer-wise attribution puts on the nonlinearities.

Every statement of ``findings.md`` is a :class:`Claim` (value, interval, n, verdict); the verdict is the claim's
positive or negative reading only when the interval excludes the null (:func:`study_stats.claim`), otherwise "not
distinguishable". The claims are saved in ``results.json`` beside the numbers they come from, and a test
recomputes them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import study_stats as stats

#: a potential learned the forces when its force MAE is at least this fraction below the zero-force baseline
LEARNED_MARGIN = 0.1


@dataclass
class Claim:
    """One statement of the findings: ``text`` with its estimate, 95% interval, n and verdict."""

    key: str
    text: str
    estimate: float
    lo: Optional[float]
    hi: Optional[float]
    n: int
    verdict: str
    unit: str = ""
    #: the null value on the displayed scale (0 for a slope or a difference, 1 for a factor, 0.5 for a share)
    null: float = 0.0

    def line(self) -> str:
        iv = ("no interval" if self.lo is None or self.hi is None
              else f"95% CI [{_fmt(self.lo)}, {_fmt(self.hi)}]")
        return f"- {self.text}: {_fmt(self.estimate)}{self.unit} ({iv}, n = {self.n}): {self.verdict}."


def _fmt(v: Optional[float]) -> str:
    if v is None or not np.isfinite(v):
        return "nan"
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------------- reading runs
def load_results(out: str) -> Dict[str, Dict[str, Any]]:
    res = {}
    runs = os.path.join(out, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        p = os.path.join(runs, name, "result.json")
        if os.path.exists(p):
            with open(p) as fh:
                res[name] = json.load(fh)
    return res


def _rank(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):
        m = a == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Spearman's ρ of ``x`` and ``y`` and a 95% percentile bootstrap interval (resampling pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 4:
        return {"rho": math.nan, "lo": math.nan, "hi": math.nan, "n": n}

    def rho(a, b):
        ra, rb = _rank(a), _rank(b)
        if ra.std() == 0 or rb.std() == 0:
            return math.nan
        return float(np.corrcoef(ra, rb)[0, 1])

    rng = np.random.default_rng(seed)
    boots = [rho(x[i], y[i]) for i in (rng.integers(0, n, n) for _ in range(n_boot))]
    boots = np.array([b for b in boots if np.isfinite(b)])
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (math.nan, math.nan))
    return {"rho": rho(x, y), "lo": float(lo), "hi": float(hi), "n": n}


def lie(r: Dict[str, Any], split: str = "test", output: str = "forces", stat: str = "median") -> float:
    """The relative isotropic rotational Lie derivative (median over the split's audited structures)."""
    v = r.get(f"lie_{split}", {}).get(output, {}).get("rot_iso", {}).get(stat)
    return math.nan if v is None else float(v)


def lie_per(r: Dict[str, Any], split: str, kind: str) -> float:
    """Median over structures of the forces' rotational Lie derivative: ``kind`` = ``"abs"`` (eV/Å), ``"label"``
    (relative to the label forces) or ``"iso"`` (relative to the predictions)."""
    v = r.get(f"lie_{split}", {}).get("forces", {}).get(f"per_structure_rot_{kind}")
    return float(np.median(v)) if v else math.nan


def train_seconds(r: Dict[str, Any]) -> float:
    """Training wall time without the monitor's measurements (taken inside the training loop)."""
    mon = {m["step"]: m["seconds"] for m in r.get("monitor") or []}
    return float(r["training"]["train_seconds"]) - sum(mon.values())


def _md(results, molecule: Optional[str] = None):
    return {k: r for k, r in results.items() if r.get("task") == "md"
            and (molecule is None or r["molecule"] == molecule)}


def learned(r: Dict[str, Any], base: Dict[str, float]) -> bool:
    """Learned the forces: time-split force MAE at least 10% below predicting zero forces."""
    return r["test"]["forces_mae"] < (1 - LEARNED_MARGIN) * base["forces_mae_zero"]


def configurations(results) -> Dict[tuple, List[Dict[str, Any]]]:
    """Runs grouped by configuration ``(molecule, family, width, mode)`` (or ``("shapes", ...)``), seeds together."""
    out: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results.values():
        key = (r.get("molecule", "shapes"), r["family"], r["width"], r["mode"]) + (
            (tuple(r["resolution"]),) if "resolution" in r else ())
        out.setdefault(key, []).append(r)
    return out


def _log_interval(values: Sequence[float]) -> Dict[str, Any]:
    """Geometric mean over seeds with the 95% t-interval of the mean of ``log10``."""
    si = stats.seed_interval([math.log10(v) for v in values if v > 0 and np.isfinite(v)])
    g = (lambda x: None if x is None else 10 ** x)
    return {"mean": g(si["mean"]) if np.isfinite(si["mean"]) else math.nan, "lo": g(si["lo"]), "hi": g(si["hi"]),
            "n": si["n"]}


# ---------------------------------------------------------------------------------------------------- claims
def trend_claims(results, molecule: str, family: str, base) -> List[Claim]:
    """Within-recipe trends of ``log L(F)`` with size and with accuracy (pooled fit, recipe as a factor)."""
    ok = [r for r in _md(results, molecule).values() if r["family"] == family and learned(r, base)]
    if len({r["width"] for r in ok}) < 2:
        return []
    ly = [math.log10(lie(r)) for r in ok]
    grp = [r["mode"] for r in ok]
    out = []
    for key, x, pos, neg in (
            ("size", [math.log10(r["n_parameters"]) for r in ok], "larger models have larger Lie derivatives",
             "larger models are more equivariant"),
            ("mae", [math.log10(r["test"]["forces_mae"]) for r in ok], "more accurate models are more equivariant",
             "more accurate models are less equivariant")):
        fit = stats.factor_fit(ly, x, grp)
        what = "parameters" if key == "size" else "force MAE"
        out.append(Claim(f"trend/{molecule}/{family}/{key}",
                         f"{molecule}, {family}: slope b of log L(F) = b·log({what}) + c_recipe, within recipe "
                         f"({fit['groups']} recipes, seeds as replicates)", fit["slope"], fit["lo"], fit["hi"],
                         fit["n"], "within a recipe, " + stats.claim(fit["lo"], fit["hi"], pos, neg)))
    return out


def per_recipe_rho(results, molecule: str, family: str, base) -> List[str]:
    """Per recipe Spearman's ρ (exact p) of the seed means across widths: descriptive lines, not claims."""
    ok = [r for r in _md(results, molecule).values() if r["family"] == family and learned(r, base)]
    lines = []
    for mode in sorted({r["mode"] for r in ok}):
        widths = sorted({r["width"] for r in ok if r["mode"] == mode})
        if len(widths) < 3:
            continue
        rs = {w: [r for r in ok if r["mode"] == mode and r["width"] == w] for w in widths}
        params = [rs[w][0]["n_parameters"] for w in widths]
        ly = [float(np.mean([math.log10(lie(r)) for r in rs[w]])) for w in widths]
        lm = [float(np.mean([math.log10(r["test"]["forces_mae"]) for r in rs[w]])) for w in widths]
        a, b = stats.spearman_exact(params, ly), stats.spearman_exact(lm, ly)
        lines.append(f"{mode}: ρ(parameters, L) = {a['rho']:.2f} (exact p = {a['p']:.3f}), ρ(force MAE, L) = "
                     f"{b['rho']:.2f} (p = {b['p']:.3f}), n = {a['n']} widths (the smallest p possible at this n: "
                     f"{2 / math.factorial(a['n']):.3f})")
    return lines


def _paired(rs: List[Dict], key_fn, a_sel, b_sel, value) -> tuple:
    """Pairs ``(value(a), value(b))`` of runs matched by ``key_fn`` (width and seed)."""
    A = {key_fn(r): r for r in rs if a_sel(r)}
    B = {key_fn(r): r for r in rs if b_sel(r)}
    keys = sorted(set(A) & set(B))
    return [value(A[k]) for k in keys], [value(B[k]) for k in keys]


def _factor_claim(key: str, text: str, a: Sequence[float], b: Sequence[float], larger: str, smaller: str) -> Claim:
    """The paired factor ``a_i / b_i`` (geometric mean, :func:`study_stats.log_ratio`) as a claim against 1."""
    lr = stats.log_ratio(a, b)
    return Claim(key, text, lr["factor"], lr["factor_lo"], lr["factor_hi"], lr["n"],
                 stats.claim(lr["lo"], lr["hi"], larger, smaller), null=1.0)


def remedy_claims(results, molecule: str, family: str, base) -> List[Claim]:
    """Each recipe against plain (paired by width and seed, both learned): the factor on ``L(F)`` and on the force
    MAE; the penalty against augmentation the same way."""
    rs = [r for r in _md(results, molecule).values() if r["family"] == family and learned(r, base)]
    key = (lambda r: (r["width"], r["seed"]))
    out = []
    modes = sorted({r["mode"] for r in rs} - {"plain"})
    pairs = [(m, "plain") for m in modes] + ([("penalty", "augment")] if {"penalty", "augment"} <= set(modes) else [])
    for a, b in pairs:
        def paired(value, a=a, b=b):
            return _paired(rs, key, lambda r: r["mode"] == a, lambda r: r["mode"] == b, value)

        out.append(_factor_claim(f"remedy/{molecule}/{family}/{a}-vs-{b}/lie",
                                 f"{molecule}, {family}: L(F) of {a} over {b} (paired by width and seed; factor)",
                                 *paired(lie), f"{a} has the larger Lie derivative", f"{a} lowers the Lie derivative"))
        out.append(_factor_claim(f"remedy/{molecule}/{family}/{a}-vs-{b}/mae",
                                 f"{molecule}, {family}: force MAE of {a} over {b} (paired; factor)",
                                 *paired(lambda r: r["test"]["forces_mae"]), f"{a} has the larger force error",
                                 f"{a} has the smaller force error"))
    return out


def shift_claims(results, molecule: str, base) -> List[Claim]:
    """Off-distribution: per learned unconstrained run, shift over time split of the forces' rotational Lie
    derivative, absolute, relative to the label forces and relative to the predictions; and of the force MAE."""
    rs = [r for r in _md(results, molecule).values() if r["kind"] == "unconstrained" and learned(r, base)]
    out = []
    for kind, what in (("abs", "absolute L(F) (eV/Å)"), ("label", "L(F) relative to the label forces"),
                       ("iso", "L(F) relative to the predicted forces")):
        out.append(_factor_claim(f"shift/{molecule}/{kind}", f"{molecule}: {what}, 300 K shift over 500 K time split "
                                 "(per learned unconstrained run; factor)", [lie_per(r, "shift", kind) for r in rs],
                                 [lie_per(r, "test", kind) for r in rs], "larger off-distribution",
                                 "smaller off-distribution"))
    out.append(_factor_claim(f"shift/{molecule}/mae", f"{molecule}: force MAE, shift over time split (factor)",
                             [r["shift"]["forces_mae"] for r in rs], [r["test"]["forces_mae"] for r in rs],
                             "larger off-distribution", "smaller off-distribution"))
    return out


#: module-name patterns of the vector family's parts, for attribution shares
PARTS = {"nonlinearities": ("model.act.",), "input layers": ("model.messages.", "__unattributed__"),
         "channel mixes": ("model.mix.",)}


def part_share(lw: Dict[str, float], part: str) -> float:
    """Share of the summed ``|contribution|`` of layer-wise attribution in the modules of ``part``; the input layers
    include what no module explains (the raw edge vector is concatenated outside the modules)."""
    tot = sum(abs(v) for v in lw.values())
    if tot == 0:
        return math.nan
    return sum(abs(v) for k, v in lw.items() if any(k.startswith(p) or k == p for p in PARTS[part])) / tot


def aliasing_claims(results, molecule: str, base) -> List[Claim]:
    """Pointwise against norm-gated vector nonlinearities, per recipe (paired by seed): the factor on ``L(F)``; and
    per nonlinearity the share of attribution on the nonlinearities, against one half."""
    rs = [r for r in _md(results, molecule).values() if r["family"].startswith("vector-")]
    out = []
    for mode in sorted({r["mode"] for r in rs}):
        x, y = _paired(rs, lambda r: r["seed"], lambda r: r["family"] == "vector-pointwise" and r["mode"] == mode,
                       lambda r: r["family"] == "vector-gated" and r["mode"] == mode, lie)
        out.append(_factor_claim(f"aliasing/{molecule}/{mode}/lie", f"{molecule}, vector features, {mode}: L(F) "
                                 "pointwise over norm-gated nonlinearity (paired by seed; factor)", x, y,
                                 "the pointwise nonlinearity breaks more", "the pointwise nonlinearity breaks less"))
        for fam in ("vector-pointwise", "vector-gated"):
            shares = [part_share(r["lie_test"]["layerwise"], "nonlinearities") for r in rs
                      if r["family"] == fam and r["mode"] == mode and r["lie_test"].get("layerwise")]
            si = stats.seed_interval(shares, bounds=(0.0, 1.0))  # a share: its interval stays in [0, 1]
            out.append(Claim(f"aliasing/{molecule}/{mode}/{fam}/share",
                             f"{molecule}, {fam}, {mode}: share of the energy's rotational derivative attributed to "
                             "the nonlinearities (seed mean)", si["mean"], si["lo"], si["hi"], si["n"],
                             stats.claim(si["lo"], si["hi"], "most of it sits in the nonlinearities",
                                         "most of it sits elsewhere (the input layers)", null=0.5), null=0.5))
    return out


def best_forces_claim(results, molecule: str) -> List[Claim]:
    """The configuration with the lowest seed-mean force MAE, against the runner-up (unpaired difference)."""
    cfg = {k: v for k, v in configurations(_md(results, molecule)).items() if len(v) >= 2}
    if len(cfg) < 2:
        return []
    mean = {k: float(np.mean([r["test"]["forces_mae"] for r in v])) for k, v in cfg.items()}
    first, second = sorted(mean, key=mean.get)[:2]
    a = [r["test"]["forces_mae"] for r in cfg[first]]
    b = [r["test"]["forces_mae"] for r in cfg[second]]
    from scipy import stats as sst

    t = sst.ttest_ind(b, a, equal_var=False)
    ci = t.confidence_interval(0.95)
    name = (lambda k: f"{k[1]} w{k[2]} {k[3]}")
    return [Claim(f"best/{molecule}", f"{molecule}: lowest mean force MAE {name(first)} ({mean[first]:.3f} eV/Å), "
                  f"runner-up {name(second)} ({mean[second]:.3f}); difference runner-up minus best", float(
                      np.mean(b) - np.mean(a)), float(ci.low), float(ci.high), len(a) + len(b),
                  stats.claim(float(ci.low), float(ci.high), f"{name(first)} has the best forces",
                              f"{name(second)} has the best forces"), " eV/Å")]


def all_claims(results, molecules: Sequence[str], bases: Dict[str, Dict[str, float]]) -> List[Claim]:
    out: List[Claim] = []
    for mol in molecules:
        if not _md(results, mol):
            continue
        out += trend_claims(results, mol, "mpnn", bases[mol])
        out += remedy_claims(results, mol, "mpnn", bases[mol])
    main = molecules[0]
    if _md(results, main):
        out += remedy_claims(results, main, "reltransformer", bases[main])
        out += shift_claims(results, main, bases[main])
        out += aliasing_claims(results, main, bases[main])
        out += best_forces_claim(results, main)
    return [c for c in out if c.n > 0]  # a comparison with no finished pair yet states nothing


# ---------------------------------------------------------------------------------------------------- findings
def _training_lines(results, mol: str, base) -> List[str]:
    md = _md(results, mol)
    L = [f"- {mol}: predicting the training-mean energy gives energy MAE {base['energy_mae_constant']:.3f} eV on the "
         f"time split ({base['energy_mae_constant_shift']:.3f} on shift); zero forces give force MAE "
         f"{base['forces_mae_zero']:.3f} eV/Å ({base['forces_mae_zero_shift']:.3f} on shift); median label ‖F‖ "
         f"{base['force_norm_test_median']:.2f} (time), {base['force_norm_shift_median']:.2f} (shift) eV/Å."]
    for fam in sorted({r["family"] for r in md.values()}):
        rs = [r for r in md.values() if r["family"] == fam]
        conv = sum(bool(r["training"].get("converged")) for r in rs)
        ok = sum(learned(r, base) for r in rs)
        e_ok = sum(r["test"]["energy_mae"] < base["energy_mae_constant"] for r in rs)
        mae = stats.seed_interval([r["test"]["forces_mae"] for r in rs])
        L.append(f"  - {fam}: {len(rs)} run{'s' if len(rs) != 1 else ''}; {conv} stopped on the validation criterion (the others at the "
                 f"step cap); {ok} learned the forces; {e_ok} beat the constant energy predictor; force MAE mean "
                 f"{mae['mean']:.3f} eV/Å over its runs.")
    failed = sorted(k for k, r in md.items() if not learned(r, base))
    if failed:
        L.append(f"  - did not learn the forces (left out of trends, remedies and the shift test): {', '.join(failed)}.")
    return L


def findings(results, claims: List[Claim], bases: Dict[str, Dict[str, float]], molecules: Sequence[str],
             extra: Optional[Dict[str, Any]] = None, planned: Optional[int] = None) -> str:
    """The findings page: the training summary against the label baselines, then every claim as one line, grouped;
    descriptive lines (per-recipe ρ, grid resolution, shapes, eSCN, pretrained) carry no verdict."""
    md = _md(results)
    n_seeds = sorted({r.get("seed", 0) for r in results.values()})
    L = ["# Findings (generated from the runs' numbers)", "",
         f"{len(md)} potentials and {len(results) - len(md)} shape classifiers finished (seeds {n_seeds})"
         + (f", {len(results)} of the {planned} planned runs: a partial study, every statement below is about the "
            "finished runs only" if planned is not None and len(results) < planned else "")
         + ". Each line gives the estimate, its 95% interval and n; a verdict is stated only when the interval "
         "excludes the null, otherwise \"not distinguishable\".", "",
         "## Did the models learn the task? (time split: the last 2 ps of the 500 K trajectory)"]
    for mol in molecules:
        if _md(results, mol):
            L += _training_lines(results, mol, bases[mol])
    L.append("")
    groups = [("Is accuracy correlated with learned equivariance? (within recipe)", "trend/"),
              ("Augmentation vs penalty vs equigrad", "remedy/"),
              ("Does learned equivariance hold off-distribution (300 K shift vs 500 K time split)?", "shift/"),
              ("Aliasing: do pointwise nonlinearities on vector features break equivariance?", "aliasing/"),
              ("Best forces", "best/")]
    for title, prefix in groups:
        L.append(f"## {title}")
        L += [c.line() for c in claims if c.key.startswith(prefix)] or ["- no runs for this question yet."]
        if prefix == "trend/":
            for mol in molecules:
                for ln in per_recipe_rho(results, mol, "mpnn", bases.get(mol, {})) if _md(results, mol) else []:
                    L.append(f"- {mol}, mpnn, per recipe (seed means across widths; descriptive): {ln}.")
        L.append("")
    L += _descriptive(results, molecules, extra or {})
    return "\n".join(L) + "\n"


def _descriptive(results, molecules, extra) -> List[str]:
    L: List[str] = []
    main = molecules[0]
    eq = [r for r in _md(results, main).values() if r["kind"] == "equivariant"]
    if eq:
        L.append("## Exactly equivariant baselines")
        for fam in sorted({r["family"] for r in eq}):
            rs = [r for r in eq if r["family"] == fam]
            mae = stats.seed_interval([r["test"]["forces_mae"] for r in rs])
            L.append(f"- {fam}: largest L(F) {max(lie(r) for r in rs):.1e} (floor level); force MAE "
                     f"{mae['mean']:.3f} eV/Å, n = {mae['n']}.")
        L.append("")
    grid = [r for r in _md(results, main).values() if r["family"] == "grid"]
    if grid:
        L.append("## Spherical-grid SiLU against grid resolution (quadrature accuracy, not learned equivariance)")
        for res in sorted({tuple(r["resolution"]) for r in grid}, key=lambda t: t[0] * t[1]):
            g = _log_interval([lie(r) for r in grid if tuple(r["resolution"]) == res])
            L.append(f"- {res[0]}x{res[1]}: L(F) geometric mean {g['mean']:.1e} over {g['n']} seeds.")
        L.append("")
    sh = [r for r in results.values() if r.get("task") == "shapes"]
    if sh:
        L.append("## Shapes (classification in canonical orientation; seed means)")
        for key, rs in sorted(configurations({r["name"]: r for r in sh}).items()):
            acc = np.mean([r["test"]["accuracy"] for r in rs])
            rot = np.mean([r["test"]["accuracy_rotated"] for r in rs])
            lg = _log_interval([r["test"]["logits"]["rot_iso"]["median"] for r in rs])
            L.append(f"- {key[1]} w{key[2]} {key[3]}: accuracy {acc:.2f} canonical, {rot:.2f} rotated; L(logits) "
                     f"geometric mean {lg['mean']:.1e} (n = {len(rs)}).")
        L.append("")
    for name, lines in extra.items():
        L.append(f"## {name}")
        L += lines
        L.append("")
    return L


# ---------------------------------------------------------------------------------------------------- table, plots
def table(results, bases: Optional[Dict[str, Dict[str, float]]] = None) -> str:
    """One row per configuration (seed means; geometric means with the 95% interval over seeds for Lie
    derivatives), with each molecule's label baselines above and, per row, how many seeds learned the forces and
    beat the constant energy predictor."""
    bases = bases or {}
    lines = [f"- {mol}: constant energy predictor {b['energy_mae_constant']:.3f} eV, zero forces "
             f"{b['forces_mae_zero']:.3f} eV/Å (time split); {b['energy_mae_constant_shift']:.3f} eV, "
             f"{b['forces_mae_zero_shift']:.3f} eV/Å (shift)" for mol, b in bases.items()]
    head = ("| configuration | n seeds | params | E MAE time | F MAE time | F MAE shift | learned F | E < const | "
            "L(F) time | L(F) shift | abs L(F) time (eV/Å) | L(F)/‖F_label‖ time | converged | train s |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for key, rs in sorted(configurations(_md(results)).items(), key=lambda kv: tuple(map(str, kv[0]))):
        def mean(f):
            return float(np.mean([f(r) for r in rs]))

        def g(f):
            v = _log_interval([f(r) for r in rs])
            ci = "" if v["lo"] is None else f" [{v['lo']:.1e}, {v['hi']:.1e}]"
            return f"{v['mean']:.1e}{ci}"

        b = bases.get(key[0])
        ok = f"{sum(learned(r, b) for r in rs)}/{len(rs)}" if b else "?"
        e_ok = f"{sum(r['test']['energy_mae'] < b['energy_mae_constant'] for r in rs)}/{len(rs)}" if b else "?"
        res = f" {key[4][0]}x{key[4][1]}" if len(key) > 4 else ""
        lines.append(f"| {key[0]} {key[1]} w{key[2]} {key[3]}{res} | {len(rs)} | {rs[0]['n_parameters']} | "
                     f"{mean(lambda r: r['test']['energy_mae']):.3f} | {mean(lambda r: r['test']['forces_mae']):.3f} | "
                     f"{mean(lambda r: r['shift']['forces_mae']):.3f} | {ok} | {e_ok} | {g(lie)} | "
                     f"{g(lambda r: lie(r, 'shift'))} | {g(lambda r: lie_per(r, 'test', 'abs'))} | "
                     f"{g(lambda r: lie_per(r, 'test', 'label'))} | "
                     f"{sum(bool(r['training'].get('converged')) for r in rs)}/{len(rs)} | "
                     f"{mean(train_seconds):.0f} |")
    return "\n".join(lines)


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_MARK = {"plain": "o", "augment": "s", "penalty": "^", "equigrad": "D"}


def plots(out: str, results, molecule: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = _md(results, molecule)
    paths: List[str] = []
    if not md:
        return paths
    fams = sorted({r["family"] for r in md.values()})
    col = {f: f"C{i % 10}" for i, f in enumerate(fams)}
    floor = 1e-16

    def scatter(xf, fname, xlabel):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in md.values():
            ax.scatter(xf(r), max(lie(r), floor), c=col[r["family"]], marker=_MARK.get(r["mode"], "o"),
                       label=r["family"], s=22, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("L(F), time split (median over structures)")
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, title="o plain  s augment  ^ penalty  D equigrad",
                  title_fontsize=7)
        ax.set_title(f"{molecule}: every run (one point per seed)", fontsize=9)
        return _save(fig, out, fname)

    paths.append(scatter(lambda r: r["test"]["forces_mae"], "lie_vs_error.png", "force MAE, time split (eV/Å)"))
    paths.append(scatter(lambda r: r["n_parameters"], "lie_vs_size.png", "parameters"))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in md.values():
        if r["kind"] == "equivariant":
            continue
        ax.scatter(lie_per(r, "test", "abs"), lie_per(r, "shift", "abs"), c=col[r["family"]],
                   marker=_MARK.get(r["mode"], "o"), s=22, label=r["family"])
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("absolute L(F), time split (eV/Å)")
    ax.set_ylabel("absolute L(F), 300 K shift (eV/Å)")
    h, lab = ax.get_legend_handles_labels()
    ax.legend(dict(zip(lab, h)).values(), dict(zip(lab, h)).keys(), fontsize=7)
    paths.append(_save(fig, out, "lie_shift.png"))
    vec = [r for r in md.values() if r["family"].startswith("vector-") and r["lie_test"].get("layerwise")]
    if vec:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        labels = sorted({(r["family"], r["mode"]) for r in vec})
        for i, (fam, mode) in enumerate(labels):
            rs = [r for r in vec if (r["family"], r["mode"]) == (fam, mode)]
            left = 0.0
            for j, part in enumerate(PARTS):
                s = float(np.mean([part_share(r["lie_test"]["layerwise"], part) for r in rs]))
                ax.barh(i, s, left=left, color=f"C{j}", label=part if i == 0 else None)
                left += s
        ax.set_yticks(range(len(labels)), [f"{f} {m}" for f, m in labels], fontsize=7)
        ax.set_xlabel("share of |attributed contribution| (seed mean)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out, "lie_per_layer.png"))
    grid = [r for r in md.values() if r["family"] == "grid"]
    if grid:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in grid:
            a, b = r["resolution"]
            ax.scatter(a * b, max(lie(r), floor), c="C0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("grid points")
        ax.set_ylabel("L(F) median (one point per seed)")
        paths.append(_save(fig, out, "lie_vs_grid.png"))
    return paths


def extra_sections(out: str) -> Dict[str, List[str]]:
    """Descriptive sections from side studies saved beside the runs (``escn.json``, ``escn_trained.json``,
    ``pretrained.json``: :mod:`side`)."""
    secs: Dict[str, List[str]] = {}
    for fname, fn in (("escn.json", _escn_lines), ("escn_trained.json", _escn_trained_lines),
                      ("pretrained.json", _pretrained_lines)):
        p = os.path.join(out, fname)
        if os.path.exists(p):
            with open(p) as fh:
                title, lines = fn(json.load(fh))
            secs[title] = lines
    return secs


def _verdict(row) -> str:
    """The floor, how many structure × rotation figures of the forces are above it, and the audit's worst verdict,
    as the side row saved them."""
    if "verdicts" not in row:
        return ""
    above = row.get("forces_above_floor")
    count = f"L(F) above its floor in {above[0]} of {above[1]} structure × rotation figures; " if above else ""
    return (f" (floor median {row.get('forces_floor_rel_median', math.nan):.1e}; {count}the audit's worst verdict on "
            f"the forces over structures, generators and finite checks: {row['verdicts'].get('forces')})")


def _frames(n: int) -> str:
    return f"{n} frame" + ("" if n == 1 else "s")


def _attribution_text(row) -> str:
    """Where layer-wise attribution puts the energy's rotational Lie derivative (mean share of the summed
    ``|contribution|`` over the attributed frames whose L(E) is above its floor), or why no share is stated."""
    att = row.get("attribution")
    if not att:
        return ""
    live = [a for a in att if not all(a["energy_at_floor"])]
    if not live:
        return f"; attribution: L(E) at its floor on the {_frames(len(att))} attributed, no share stated"
    shares = {k: float(np.mean([a["shares"][k] for a in live])) for k in live[0]["shares"]}
    return (f"; attribution of L(E) ({_frames(len(live))} above floor, mean share of |contribution|): "
            + ", ".join(f"{100 * v:.1f}% {k}" for k, v in shares.items()))


def _escn_lines(d):
    lines = []
    for row in d.get("rows", []):
        lines.append(f"- {row['label']}: L(F) median {row['lie_forces_median']:.1e}, L(E) median "
                     f"{row['lie_energy_median']:.1e} over {row['n']} structures{_verdict(row)}"
                     f"{_attribution_text(row)}.")
    return "fairchem eSCN-MD: grid against spectral feed-forward, Lie derivative against grid resolution", lines


def _escn_trained_lines(d):
    tr = d.get("training", {})
    how = "on the validation criterion" if tr.get("converged") else "at the cap"
    stop = f"stopped at step {tr['stopped_step']} ({how})" if "stopped_step" in tr else "a fixed budget, no early stopping"
    lines = [f"- {d.get('what', '')}: best validation force MAE {tr.get('val_forces_mae', math.nan):.3f} eV/Å at "
             f"step {tr.get('best_step')}; {stop} (the zero-force baseline is in the first section)."]
    lines += [f"- {row['label']}: L(F) median {row['lie_forces_median']:.1e}, L(E) median "
              f"{row['lie_energy_median']:.1e}, force MAE {row['forces_mae']:.3f} eV/Å over {row['n']} "
              f"structures{_verdict(row)}{_attribution_text(row)}." for row in d.get("rows", [])]
    return "fairchem eSCN-MD after training, against grid resolution", lines


def _pretrained_lines(d):
    lines = [f"- {row['model']}" + (f" ({row['dtype']})" if row.get("dtype") else "") + f": L(F) median {row['lie_forces_median']:.1e} (time split)"
             f"{_verdict(row)}; force MAE against GFN2-xTB {row['forces_mae']:.3f} eV/Å (a different level of "
             f"theory), n = {row['n']} structures."
             if row.get("ok") else f"- {row['model']}: not audited ({row['why']})." for row in d.get("rows", [])]
    return "Pretrained models on the same frames", lines


def analyse(out: str, results, c: Dict[str, Any]):
    """``(claims, findings text, label baselines)`` of the finished runs ``results`` in ``out`` under config ``c``:
    what :func:`write_all` saves, and what the tests regenerate to compare with the saved files."""
    molecules = [c["molecule"]] + list(c.get("molecules_extra", []))
    bases = {m: stats.label_baselines(m) for m in molecules}
    claims = all_claims(results, molecules, bases)
    return claims, findings(results, claims, bases, molecules, extra_sections(out), len(c["runs"])), bases


def write_all(out: str, results, c: Dict[str, Any], device: str = "cpu") -> List[str]:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from _common import device_info

    claims, text, bases = analyse(out, results, c)
    summary = {"device": device_info(device), "config": {k: v for k, v in c.items() if k != "runs"},
               "n_runs_planned": len(c["runs"]), "n_runs_finished": len(results), "label_baselines": bases,
               "claims": [asdict(cl) for cl in claims],
               "runs": {k: {kk: vv for kk, vv in r.items() if kk != "monitor"} for k, r in results.items()}}
    paths = []
    p = os.path.join(out, "results.json")
    with open(p, "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    paths.append(p)
    p = os.path.join(out, "table.md")
    with open(p, "w") as fh:
        fh.write(table(results, bases) + "\n")
    paths.append(p)
    p = os.path.join(out, "findings.md")
    with open(p, "w") as fh:
        fh.write(text)
    paths.append(p)
    return paths + plots(out, results, c["molecule"])
