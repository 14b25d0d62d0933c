r"""The study's analysis: statistics, tables, findings and plots from the finished runs' ``result.json`` files.

The headline number of a potential is the *relative isotropic rotational Lie derivative of its forces*,
``sqrt(mean_k ‖L_{r_k} F‖² ) / ‖F‖`` (float64, median over the audited test structures): 0 for an equivariant
model, measured against its floor (~1e-15). Statistics:

* rank correlation (Spearman's ρ) between test force MAE and that Lie derivative within a family, with a 95%
  percentile bootstrap interval (2000 resamples of the models); a finding is stated as a correlation only when
  the interval excludes 0;
* per family and training mode: the median over sizes of the Lie derivative, the force MAE and the training time;
* off-distribution: the ratio of the Lie derivative on the 300 K ``shift`` split to the 500 K ``test`` split;
* aliasing: the grid models' Lie derivative against the grid resolution;
* where violations sit: the layer-wise attribution's largest modules (share of the summed contributions).

Findings are written from the numbers (``findings.md``): nothing is claimed that the numbers do not show.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np


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
    # average ranks over ties
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
    v = r.get(f"lie_{split}", {}).get(output, {}).get("rot_iso", {}).get(stat)
    return math.nan if v is None else float(v)


def train_seconds(r: Dict[str, Any]) -> float:
    """Training wall time without the monitor's measurements (taken inside the training loop)."""
    mon = {m["step"]: m["seconds"] for m in r.get("monitor") or []}
    return float(r["training"]["train_seconds"]) - sum(mon.values())


def _md(results):
    return {k: r for k, r in results.items() if r.get("task") == "md"}


def correlations(results) -> Dict[str, Dict[str, float]]:
    out = {}
    md = _md(results)
    for fam in sorted({r["family"] for r in md.values() if r["kind"] == "unconstrained"}):
        rs = [r for r in md.values() if r["family"] == fam]
        out[fam] = spearman([r["test"]["forces_mae"] for r in rs], [lie(r) for r in rs])
        out[fam + " (size)"] = spearman([r["n_parameters"] for r in rs], [lie(r) for r in rs])
    rs = [r for r in md.values() if r["kind"] == "unconstrained"]
    out["all unconstrained"] = spearman([r["test"]["forces_mae"] for r in rs], [lie(r) for r in rs])
    return out


def _median(v):
    v = [x for x in v if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def mode_table(results) -> Dict[str, Dict[str, Dict[str, float]]]:
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for r in _md(results).values():
        if r["kind"] != "unconstrained":
            continue
        out.setdefault(r["family"], {}).setdefault(r["mode"], {"lie": [], "mae": [], "shift_mae": [], "sec": [],
                                                                "ratio": []})
        e = out[r["family"]][r["mode"]]
        e["lie"].append(lie(r))
        e["mae"].append(r["test"]["forces_mae"])
        e["shift_mae"].append(r["shift"]["forces_mae"])
        e["sec"].append(train_seconds(r))
        e["ratio"].append(lie(r, "shift") / lie(r) if lie(r) > 0 else math.nan)
    return {f: {m: {k: _median(v) for k, v in e.items()} | {"n": len(e["lie"])} for m, e in d.items()}
            for f, d in out.items()}


def layer_shares(results, top: int = 3) -> Dict[str, List[Tuple[str, float]]]:
    out = {}
    for name, r in _md(results).items():
        lw = r.get("lie_test", {}).get("layerwise")
        if not lw:
            continue
        tot = sum(abs(v) for v in lw.values()) or 1.0
        out[name] = [(k, v / tot) for k, v in sorted(lw.items(), key=lambda kv: -kv[1])[:top]]
    return out


def table(results) -> str:
    head = ("| model | kind | mode | params | E MAE test | F MAE test | F MAE shift | L(F) test median | L(F) p99 | "
            "L(F) shift median | L(E) median | finite rot max (F) | train s | structures/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in sorted(_md(results).items(), key=lambda kv: (kv[1]["kind"], kv[1]["family"], kv[0])):
        fin = r["lie_test"]["forces"].get("finite_rotation_max")
        lines.append(f"| {name} | {r['kind']} | {r['mode']} | {r['n_parameters']} | {r['test']['energy_mae']:.3f} | "
                     f"{r['test']['forces_mae']:.3f} | {r['shift']['forces_mae']:.3f} | {lie(r):.2e} | "
                     f"{lie(r, stat='p99'):.2e} | {lie(r, 'shift'):.2e} | {lie(r, output='energy'):.2e} | "
                     f"{fin if fin is None else format(fin, '.1e')} | {train_seconds(r):.0f} | "
                     f"{r['throughput']:.0f} |")
    sh = {k: r for k, r in results.items() if r.get("task") == "shapes"}
    if sh:
        lines += ["", "| shapes model | mode | params | accuracy | accuracy rotated | L(logits) median | L p99 | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in sorted(sh.items()):
            t = r["test"]
            lines.append(f"| {name} | {r['mode']} | {r['n_parameters']} | {t['accuracy']:.3f} | "
                         f"{t['accuracy_rotated']:.3f} | {t['logits']['rot_iso']['median']:.2e} | "
                         f"{t['logits']['rot_iso']['p99']:.2e} | {r['training']['train_seconds']:.0f} |")
    return "\n".join(lines)


#: a potential learned the forces when its test force MAE is at least this fraction below the zero-force baseline
LEARNED_MARGIN = 0.1


def _learned(r, base) -> bool:
    """A potential that learned the forces: test force MAE at least 10% below predicting zero forces (the trends of
    L(F) are read over these; the energy is judged against the constant predictor separately)."""
    return r["test"]["forces_mae"] < (1 - LEARNED_MARGIN) * base["forces_mae_zero"]


def within_recipe(results, family: str, base) -> Dict[str, Any]:
    """The family's trends read within each training recipe: the pooled fits ``log L(F) = b log x + c_recipe`` for
    ``x`` = parameters and ``x`` = test force MAE (:func:`stats.factor_fit`), over the runs that learned the task, and
    per recipe Spearman's ρ with its exact p-value (:func:`stats.spearman_exact`)."""
    import study_stats as stats

    rs = [r for r in _md(results).values() if r["family"] == family and r["kind"] == "unconstrained"]
    ok = [r for r in rs if _learned(r, base)]
    out: Dict[str, Any] = {"n_runs": len(rs), "n_learned": len(ok)}
    if ok:
        ly = [math.log(lie(r)) for r in ok]
        grp = [r["mode"] for r in ok]
        out["size"] = stats.factor_fit(ly, [math.log(r["n_parameters"]) for r in ok], grp)
        out["mae"] = stats.factor_fit(ly, [math.log(r["test"]["forces_mae"]) for r in ok], grp)
    out["per_recipe"] = {}
    for mode in sorted({r["mode"] for r in ok}):
        m = [r for r in ok if r["mode"] == mode]
        out["per_recipe"][mode] = {"size": stats.spearman_exact([r["n_parameters"] for r in m], [lie(r) for r in m]),
                                   "mae": stats.spearman_exact([r["test"]["forces_mae"] for r in m],
                                                               [lie(r) for r in m])}
    return out


def shift_test(results, base) -> Dict[str, Any]:
    """Off-distribution: per unconstrained model that learned the forces the ratio of L(F) on the shift split to the test split, against
    the ratio of the splits' median label force norms (a relative Lie derivative scales as 1/‖F‖: with equal absolute
    derivatives the ratio would be about that), with a two-sided sign test of "ratio above the normalisation"."""
    from scipy import stats as sst

    ratios = [lie(r, "shift") / lie(r) for r in _md(results).values()
              if r["kind"] == "unconstrained" and lie(r) > 0 and _learned(r, base)]
    norm = base["force_norm_test_median"] / base["force_norm_shift_median"]
    above = sum(x > norm for x in ratios)
    p = float(sst.binomtest(above, len(ratios), 0.5).pvalue) if ratios else math.nan
    return {"ratios": ratios, "median": float(np.median(ratios)) if ratios else math.nan, "norm_ratio": norm,
            "above_norm": above, "n": len(ratios), "sign_p": p}


def findings(results, corr, modes, shares, base: Dict[str, float]) -> str:
    """Statements from the numbers, each with its interval and n, analysed as the study was designed (within
    recipe); a claim only where its interval excludes the null (training times exclude the monitor's measurements).
    ``base``: the label baselines (:func:`stats.label_baselines`)."""
    import study_stats as stats

    L: List[str] = ["# Findings (generated from the runs' numbers)", ""]
    md = _md(results)
    L.append(f"{len(md)} potentials and {len(results) - len(md)} shape classifiers finished; one seed per "
             "configuration (no seed intervals: a configuration's spread over seeds is not measured).")
    L.append("")
    L.append("## Did the models learn the task? (label baselines, test split)")
    L.append(f"- predicting the training-mean energy: energy MAE {base['energy_mae_constant']:.3f} eV; predicting zero "
             f"forces: force MAE {base['forces_mae_zero']:.3f} eV/Å.")
    learned = sorted(k for k, r in md.items() if _learned(r, base))
    failed = sorted(k for k in md if k not in learned)
    e_ok = sorted(k for k, r in md.items() if r["test"]["energy_mae"] < base["energy_mae_constant"])
    L.append(f"- forces: {len(learned)} of {len(md)} potentials are at least {100 * LEARNED_MARGIN:.0f}% below the "
             f"zero-force error; the others did not learn the forces and are left out of the trends: "
             f"{', '.join(failed) if failed else 'none'}.")
    L.append(f"- energies: {len(e_ok)} of {len(md)} beat the constant predictor: {', '.join(e_ok) or 'none'}; "
             "1000 steps of 8 frames is about ten epochs: most models are not converged.")
    L.append("")
    L.append("## Is accuracy correlated with learned equivariance within a family? (read within each recipe)")
    for fam in sorted({r["family"] for r in md.values() if r["kind"] == "unconstrained"}):
        w = within_recipe(results, fam, base)
        if not w["n_learned"]:
            L.append(f"- {fam}: none of its {w['n_runs']} runs learned the task: its Lie derivatives are not "
                     "interpreted.")
            continue
        sz, ma = w["size"], w["mae"]
        L.append(f"- {fam}, pooled fit log L(F) = b·log(parameters) + c_recipe over {sz['n']} runs in {sz['groups']} "
                 f"recipes: b = {sz['slope']:.2f}, 95% CI [{sz['lo']:.2f}, {sz['hi']:.2f}]: " + stats.claim(
                     sz["lo"], sz["hi"], "within a recipe, larger models have larger Lie derivatives",
                     "within a recipe, larger models are more equivariant") + ".")
        L.append(f"- {fam}, pooled fit log L(F) = b·log(force MAE) + c_recipe over {ma['n']} runs: b = "
                 f"{ma['slope']:.2f}, 95% CI [{ma['lo']:.2f}, {ma['hi']:.2f}]: " + stats.claim(
                     ma["lo"], ma["hi"], "within a recipe, more accurate models are more equivariant",
                     "within a recipe, more accurate models are less equivariant") + ".")
        per = "; ".join(f"{mode} ρ(params, L) = {v['size']['rho']:.2f} (p = {v['size']['p']:.3f}), ρ(MAE, L) = "
                        f"{v['mae']['rho']:.2f} (p = {v['mae']['p']:.3f}), n = {v['size']['n']}"
                        for mode, v in w["per_recipe"].items())
        L.append(f"- {fam}, per recipe (exact permutation p; with n = 4 no ρ can reach p < 0.05): {per}.")
    for fam, c in corr.items():
        if "size" in fam or not np.isfinite(c["rho"]):
            continue
        L.append(f"- pooled across recipes, not the design's reading (the recipe moves L(F) without moving the "
                 f"error): {fam} ρ(force MAE, L(F)) = {c['rho']:.2f}, bootstrap 95% CI [{c['lo']:.2f}, "
                 f"{c['hi']:.2f}], n = {c['n']}.")
    L.append("")
    L += _remedies(md, modes, base)
    L.append("## Does learned equivariance hold off-distribution (300 K shift vs 500 K test)?")
    sh = shift_test(results, base)
    if sh["n"]:
        verdict = ("weaker off-distribution beyond the normalisation" if sh["sign_p"] < 0.05 and sh["above_norm"] > sh["n"] / 2
                   else "not distinguishable from the normalisation by the label force norms")
        L.append(f"- shift/test ratio of the relative L(F) over the {sh['n']} unconstrained models that learned the "
                 f"forces: median "
                 f"{sh['median']:.2f}, range [{min(sh['ratios']):.2f}, {max(sh['ratios']):.2f}]; the label force "
                 f"norms alone give {sh['norm_ratio']:.2f} (median ‖F‖ {base['force_norm_test_median']:.1f} test, "
                 f"{base['force_norm_shift_median']:.1f} shift); above it for {sh['above_norm']} of {sh['n']} "
                 f"(sign test p = {sh['sign_p']:.3f}): {verdict}. The normalisation is accounted for only through the "
                 "splits' median label force norms: absolute Lie derivatives were not saved by these runs.")
    L.append("")
    L += _aliasing_and_layers(md, shares, results)
    return "\n".join(L) + "\n"


def _remedies(md, modes, base) -> List[str]:
    L = ["## Augmentation vs penalty vs equigrad (median over sizes; augment-x5 trains five times the steps)"]
    for fam, d in modes.items():
        if not any(_learned(r, base) for r in md.values() if r["family"] == fam):
            L.append(f"- {fam}: no run learned the forces (force MAE {min(e['mae'] for e in d.values()):.3f} at best, "
                     f"zero-force {base['forces_mae_zero']:.3f} eV/Å): its Lie derivatives are not interpreted.")
            continue
        base_l = d.get("plain", {}).get("lie", math.nan)
        for mode, e in d.items():
            fac = base_l / e["lie"] if e["lie"] > 0 and np.isfinite(base_l) else math.nan
            L.append(f"- {fam} / {mode}: L(F) {e['lie']:.2e} ({fac:.1f}x below plain), force MAE {e['mae']:.3f} eV/Å "
                     f"(zero-force {base['forces_mae_zero']:.3f}), training {e['sec']:.0f} s (n = {e['n']}).")
        facs = [base_l / e["lie"] for m, e in d.items() if m != "plain" and e["lie"] > 0]
        if facs and np.isfinite(base_l):
            L.append(f"- {fam}: every remedy lowers the median L(F), by {min(facs):.1f}x to {max(facs):.1f}x "
                     f"(one seed, n = 4 sizes per recipe: no interval)." if min(facs) > 1 else
                     f"- {fam}: not every remedy lowers the median L(F) (factors {min(facs):.1f}x to {max(facs):.1f}x).")
    for fam, d in modes.items():
        if "penalty" in d and "augment-x5" in d:
            p, a = d["penalty"], d["augment-x5"]
            better = "the penalty" if p["lie"] < a["lie"] else "augmentation"
            L.append(f"- {fam}, at about equal training time (penalty {p['sec']:.0f} s, augment-x5 {a['sec']:.0f} s): "
                     f"L(F) {p['lie']:.2e} with the penalty vs {a['lie']:.2e} with augmentation, force MAE "
                     f"{p['mae']:.3f} vs {a['mae']:.3f} eV/Å: {better} gives the smaller Lie derivative (medians "
                     "of one seed each).")
    eq = {k: r for k, r in md.items() if r["kind"] == "equivariant"}
    if eq:
        worst = max(eq.items(), key=lambda kv: lie(kv[1]))
        maes = ", ".join(f"{k} {r['test']['forces_mae']:.3f}" for k, r in sorted(eq.items()))
        L.append(f"- exactly equivariant baselines: largest L(F) {lie(worst[1]):.1e} ({worst[0]}); "
                 f"force MAE {maes} eV/Å.")
    best = min(md.items(), key=lambda kv: kv[1]["test"]["forces_mae"])
    L.append(f"- best test forces of all potentials: {best[0]} ({best[1]['test']['forces_mae']:.3f} eV/Å).")
    L.append("")
    return L


def _aliasing_and_layers(md, shares, results) -> List[str]:
    L: List[str] = []
    grid = sorted(((r["resolution"], lie(r)) for r in md.values() if r["family"] == "grid"),
                  key=lambda t: t[0][0] * t[0][1])
    if grid:
        L.append("## Aliasing against grid resolution (spherical-grid SiLU, trained)")
        L.append("- " + ", ".join(f"{a}x{b}: {v:.1e}" for (a, b), v in grid))
        mono = all(grid[i][1] >= grid[i + 1][1] for i in range(len(grid) - 1))
        L.append(f"- {'monotone' if mono else 'not monotone'}: finer grids {'alias less' if mono else 'do not always alias less'}. "
                 "This is the quadrature accuracy of a purpose-built equivariant layer, not a test of whether "
                 "learned models break equivariance in their nonlinearities (Gruver et al.'s aliasing claim).")
        L.append("")
    if shares:
        L.append("## Where in the network do the violations sit? (energy's rotational derivative, largest modules)")
        L.append("- the unconstrained families' hidden features are invariant scalars: pointwise nonlinearities "
                 "cannot break rotations there, so attribution lands on the layers that read coordinates by "
                 "construction; the aliasing question needs hidden features that transform.")
        for name, top in sorted(shares.items()):
            L.append(f"- {name}: " + ", ".join(f"{k} {100 * s:.0f}%" for k, s in top))
        L.append("")
    sh = {k: r for k, r in results.items() if r.get("task") == "shapes"}
    if sh:
        L.append("## Shapes (classification in canonical orientation)")
        for name, r in sorted(sh.items()):
            t = r["test"]
            L.append(f"- {name}: accuracy {t['accuracy']:.2f} canonical, {t['accuracy_rotated']:.2f} rotated; "
                     f"L(logits) median {t['logits']['rot_iso']['median']:.1e}.")
    return L


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_MARK = {"plain": "o", "augment": "s", "augment-x5": "P", "penalty": "^", "equigrad": "D"}


def plots(out: str, results) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = _md(results)
    paths = []
    fams = sorted({r["family"] for r in md.values()})
    col = {f: f"C{i}" for i, f in enumerate(fams)}
    floor = 1e-16

    def scatter(xkey, fname, xlabel):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, r in md.items():
            x = r["test"]["forces_mae"] if xkey == "mae" else r["n_parameters"]
            ax.scatter(x, max(lie(r), floor), c=col[r["family"]], marker=_MARK.get(r["mode"], "o"),
                       label=f"{r['family']}" if r["mode"] == "plain" else None, s=30)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative rotational Lie derivative of forces (median)")
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, title="o plain  s augment  P augment-x5  ^ penalty  D equigrad",
                  title_fontsize=7)
        return _save(fig, out, fname)

    if md:
        paths.append(scatter("mae", "lie_vs_error.png", "test force MAE (eV/Å)"))
        paths.append(scatter("params", "lie_vs_size.png", "parameters"))
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, r in md.items():
            if r["kind"] != "unconstrained" or not r.get("monitor"):
                continue
            rows = [m for m in r["monitor"] if m["output"] == "forces"]
            ax.plot([m["step"] for m in rows], [max(m["rot_iso_median"], floor) for m in rows],
                    color=col[r["family"]], marker=_MARK.get(r["mode"], "o"), ms=3, lw=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("L(F) on held-out frames (median)")
        ax.set_title("Lie derivative over training (colour: family, marker: mode)", fontsize=9)
        paths.append(_save(fig, out, "lie_over_training.png"))
        shares = layer_shares(results, top=6)
        if shares:
            big = sorted(shares, key=lambda n: -md[n]["n_parameters"])[:4]
            fig, axes = plt.subplots(1, len(big), figsize=(4 * len(big), 3.5), squeeze=False)
            for ax, n in zip(axes[0], big):
                ks, vs = zip(*shares[n])
                ax.barh(range(len(ks)), vs)
                ax.set_yticks(range(len(ks)), [k[-28:] for k in ks], fontsize=6)
                ax.set_title(n, fontsize=8)
                ax.set_xlabel("share of |contribution|", fontsize=7)
            paths.append(_save(fig, out, "lie_per_layer.png"))
        grid = sorted(((r["resolution"], lie(r)) for r in md.values() if r["family"] == "grid"),
                      key=lambda t: t[0][0] * t[0][1])
        if grid:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot([a * b for (a, b), _ in grid], [max(v, floor) for _, v in grid], "o-")
            for (a, b), v in grid:
                ax.annotate(f"{a}x{b}", (a * b, max(v, floor)), fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("grid points")
            ax.set_ylabel("L(F) median")
            paths.append(_save(fig, out, "lie_vs_grid.png"))
    return paths


def write_all(out: str, results, c: Dict[str, Any], device: str = "cpu") -> List[str]:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from _common import device_info

    import study_stats as stats

    corr = correlations(results) if _md(results) else {}
    modes = mode_table(results)
    shares = layer_shares(results)
    base = stats.label_baselines(c["molecule"])
    summary = {"device": device_info(device), "config": {k: v for k, v in c.items() if k != "runs"},
               "n_runs_planned": len(c["runs"]), "n_runs_finished": len(results), "correlations": corr,
               "modes": modes, "layer_shares": shares, "label_baselines": base,
               "runs": {k: {kk: vv for kk, vv in r.items() if kk != "monitor"} for k, r in results.items()}}
    paths = []
    p = os.path.join(out, "results.json")
    with open(p, "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    paths.append(p)
    p = os.path.join(out, "table.md")
    with open(p, "w") as fh:
        fh.write(table(results) + "\n")
    paths.append(p)
    p = os.path.join(out, "findings.md")
    with open(p, "w") as fh:
        fh.write(findings(results, corr, modes, shares, base))
    paths.append(p)
    return paths + plots(out, results)
