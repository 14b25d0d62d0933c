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


def findings(results, corr, modes, shares) -> str:
    """Statements from the numbers, each with its evidence (training times exclude the monitor's measurements)."""
    L: List[str] = ["# Findings (generated from the runs' numbers)", ""]
    md = _md(results)
    L.append(f"{len(md)} potentials and {len(results) - len(md)} shape classifiers finished.")
    L.append("")
    L.append("## Is accuracy correlated with learned equivariance within a family?")
    for fam, c in corr.items():
        if not np.isfinite(c["rho"]):
            L.append(f"- {fam}: too few models ({c['n']}) for a rank correlation.")
            continue
        what = "test force MAE" if "size" not in fam else "parameter count"
        if c["lo"] > 0:
            verdict = "positive: models with lower " + ("error" if "size" not in fam else "parameter count") + \
                      " have smaller Lie derivatives"
        elif c["hi"] < 0:
            verdict = "negative: models with higher " + ("error" if "size" not in fam else "parameter count") + \
                      " have smaller Lie derivatives"
        else:
            verdict = "not distinguishable from zero"
        L.append(f"- {fam}: Spearman ρ({what}, L(F)) = {c['rho']:.2f}, 95% CI [{c['lo']:.2f}, {c['hi']:.2f}], "
                 f"n = {c['n']}: {verdict}.")
    L.append("")
    L.append("## Augmentation vs penalty vs equigrad (median over sizes; augment-x5 trains five times the steps)")
    for fam, d in modes.items():
        base = d.get("plain", {}).get("lie", math.nan)
        for mode, e in d.items():
            fac = base / e["lie"] if e["lie"] > 0 and np.isfinite(base) else math.nan
            L.append(f"- {fam} / {mode}: L(F) {e['lie']:.2e} ({fac:.1f}x below plain), force MAE {e['mae']:.3f} eV/Å, "
                     f"training {e['sec']:.0f} s, shift/test Lie ratio {e['ratio']:.2f} (n = {e['n']}).")
    for fam, d in modes.items():
        if "penalty" in d and "augment-x5" in d:
            p, a = d["penalty"], d["augment-x5"]
            better = "the penalty" if p["lie"] < a["lie"] else "augmentation"
            L.append(f"- {fam}, at about equal training time (penalty {p['sec']:.0f} s, augment-x5 {a['sec']:.0f} s): "
                     f"L(F) {p['lie']:.2e} with the penalty vs {a['lie']:.2e} with augmentation, force MAE "
                     f"{p['mae']:.3f} vs {a['mae']:.3f} eV/Å: {better} gives the smaller Lie derivative.")
    eq = {k: r for k, r in md.items() if r["kind"] == "equivariant"}
    if eq:
        worst = max(eq.items(), key=lambda kv: lie(kv[1]))
        maes = ", ".join(f"{k} {r['test']['forces_mae']:.3f}" for k, r in sorted(eq.items()))
        L.append(f"- exactly equivariant baselines: largest L(F) {lie(worst[1]):.1e} ({worst[0]}); "
                 f"force MAE {maes} eV/Å.")
    L.append("")
    L.append("## Does learned equivariance hold off-distribution (300 K shift vs 500 K test)?")
    ratios = [lie(r, "shift") / lie(r) for r in md.values() if r["kind"] == "unconstrained" and lie(r) > 0]
    if ratios:
        med = float(np.median(ratios))
        above = sum(r > 1 for r in ratios)
        verdict = ("learned equivariance is weaker off-distribution" if med > 1 else
                   "learned equivariance holds off-distribution")
        L.append(f"- shift/test ratio of L(F) over {len(ratios)} unconstrained models: median {med:.2f}, "
                 f"range [{min(ratios):.2f}, {max(ratios):.2f}], above 1 for {above} of {len(ratios)}: "
                 f"{verdict}.")
    L.append("")
    grid = sorted(((r["resolution"], lie(r)) for r in md.values() if r["family"] == "grid"),
                  key=lambda t: t[0][0] * t[0][1])
    if grid:
        L.append("## Aliasing against grid resolution (spherical-grid SiLU, trained)")
        L.append("- " + ", ".join(f"{a}x{b}: {v:.1e}" for (a, b), v in grid))
        mono = all(grid[i][1] >= grid[i + 1][1] for i in range(len(grid) - 1))
        L.append(f"- {'monotone' if mono else 'not monotone'}: finer grids {'alias less' if mono else 'do not always alias less'}.")
        L.append("")
    if shares:
        L.append("## Where in the network do the violations sit? (energy's rotational derivative, largest modules)")
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
    return "\n".join(L) + "\n"


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

    corr = correlations(results) if _md(results) else {}
    modes = mode_table(results)
    shares = layer_shares(results)
    summary = {"device": device_info(device), "config": {k: v for k, v in c.items() if k != "runs"},
               "n_runs_planned": len(c["runs"]), "n_runs_finished": len(results), "correlations": corr,
               "modes": modes, "layer_shares": shares,
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
        fh.write(findings(results, corr, modes, shares))
    paths.append(p)
    return paths + plots(out, results)
