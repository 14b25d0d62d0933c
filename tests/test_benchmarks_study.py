"""The learned-equivariance study (benchmarks/study) end to end in its --quick configuration, and resumed."""
import json
import os
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "benchmarks", "study")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    sys.path.insert(0, STUDY)
    import run

    out = str(tmp_path_factory.mktemp("study"))
    t0 = time.perf_counter()
    assert run.main(["--quick", "--out", out]) == 0
    return run, out, time.perf_counter() - t0


def test_quick_study_end_to_end(study):
    run, out, seconds = study
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    planned = [r["name"] for r in run.config(True)["runs"]]
    assert res["n_runs_finished"] == len(planned) == res["n_runs_planned"]
    runs = res["runs"]
    assert set(runs) == set(planned)
    for name, r in runs.items():
        if r["task"] != "md":
            assert 0 <= r["test"]["accuracy"] <= 1 and r["test"]["logits"]["rot_iso"]["median"] >= 0
            continue
        lie = r["lie_test"]["forces"]["rot_iso"]["median"]
        assert r["test"]["forces_mae"] > 0 and r["shift"]["forces_mae"] > 0 and r["n_parameters"] > 0
        if r["kind"] == "equivariant":  # exactly equivariant baselines sit at float64 rounding after training
            assert lie < 1e-12, name
        elif r["kind"] == "unconstrained":
            assert lie > 1e-6, name  # nothing made them equivariant in 30 steps
            lw = r["lie_test"]["layerwise"]
            assert abs(lw["__unattributed__"]) <= 1e-6 * max(abs(v) for v in lw.values()), name
    grid = sorted((r["resolution"][0], r["lie_test"]["forces"]["rot_iso"]["median"]) for r in runs.values()
                  if r["family"] == "grid")
    assert grid[0][1] > 1e3 * grid[-1][1]  # a coarse grid aliases far more than a fine one
    fa = runs["pointnet-fa-w16"]["test"]["logits"]["rot_iso"]["median"]
    assert fa < 1e-12 < runs["pointnet-w16-plain"]["test"]["logits"]["rot_iso"]["median"]
    for f in ("table.md", "findings.md", "lie_vs_error.png", "lie_vs_size.png", "lie_over_training.png",
              "lie_per_layer.png", "lie_vs_grid.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    findings = open(os.path.join(out, "findings.md")).read()
    for section in ("Is accuracy correlated", "Augmentation vs penalty", "equal training time", "off-distribution",
                    "Aliasing",
                    "Where in the network"):
        assert section in findings
    monitor = os.path.join(out, "runs", "mpnn-w8-penalty", "monitor", "monitor.csv")
    assert len(open(monitor).read().splitlines()) == 1 + 3 * 2  # steps 0, 15, 30 x energy, forces
    print(f"quick study: {seconds:.0f} s")  # measured, not asserted (timings are never asserted in tests)


def test_quick_study_resumes_without_retraining(study, capsys):
    run, out, _ = study
    before = os.path.getmtime(os.path.join(out, "runs", "e3nn", "result.json"))
    os.remove(os.path.join(out, "runs", "schnet", "result.json"))  # as if killed during that run
    assert run.main(["--quick", "--out", out, "--only", "e"]) == 0  # e3nn, gaunt, schnet, ... : one to redo
    assert "already done" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "runs", "e3nn", "result.json")) == before
    assert os.path.exists(os.path.join(out, "runs", "schnet", "result.json"))


def test_spearman_and_its_interval():
    sys.path.insert(0, STUDY)
    import analysis

    x = np.arange(20.0)
    c = analysis.spearman(x, x ** 3)
    assert c["rho"] == pytest.approx(1.0) and c["lo"] > 0.9
    c = analysis.spearman(x, -np.exp(x))
    assert c["rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    c = analysis.spearman(rng.normal(size=30), rng.normal(size=30))
    assert c["lo"] < 0 < c["hi"]  # independent samples: the interval covers 0
    assert np.isnan(analysis.spearman([1, 2, 3], [1, 2, 3])["rho"])  # too few


def _study_modules():
    sys.path.insert(0, STUDY)
    import analysis
    import study_stats

    return analysis, study_stats


def test_study_statistics_against_hand_computed_values():
    """Spearman's exact p (n = 4 monotone: 2 of 24 orderings as extreme), the recipe-factor slope against the
    within-group (demeaned) formula, the seed interval against the t formula, and the claim rule."""
    from scipy import stats as sst

    _, st = _study_modules()
    c = st.spearman_exact([1, 2, 3, 4], [10, 20, 30, 45])
    assert c["rho"] == pytest.approx(1.0) and c["p"] == pytest.approx(2 / 24)
    assert st.spearman_exact([1, 2, 3], [3, 2, 1])["p"] == pytest.approx(2 / 6)
    rng = np.random.default_rng(0)
    x = np.tile(np.log([1e3, 1e4, 1e5, 1e6]), 3)
    g = np.repeat(["a", "b", "c"], 4)
    y = -0.3 * x + np.repeat([1.0, 2.0, -1.0], 4) + rng.normal(scale=0.05, size=12)
    fit = st.factor_fit(y, x, g)
    xd = x - np.array([x[g == k].mean() for k in g])  # Frisch-Waugh-Lovell: the slope on group-demeaned data
    yd = y - np.array([y[g == k].mean() for k in g])
    b = (xd * yd).sum() / (xd ** 2).sum()
    dof = 12 - 1 - 3
    se = np.sqrt(((yd - b * xd) ** 2).sum() / dof / (xd ** 2).sum())
    assert fit["slope"] == pytest.approx(b, rel=1e-12) and fit["dof"] == dof
    assert fit["lo"] == pytest.approx(b - sst.t.ppf(0.975, dof) * se, rel=1e-10)
    assert fit["lo"] < fit["slope"] < fit["hi"] < 0 and abs(fit["slope"] + 0.3) < 0.05
    si = st.seed_interval([1.0, 2.0, 3.0])
    assert si["mean"] == 2.0 and si["hi"] - 2.0 == pytest.approx(sst.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    assert st.seed_interval([5.0])["lo"] is None
    assert st.claim(0.1, 0.2, "up", "down") == "up" and st.claim(-0.2, -0.1, "up", "down") == "down"
    assert st.claim(-0.1, 0.2, "up", "down") == "not distinguishable"


def test_committed_findings_follow_from_the_saved_results():
    """findings.md regenerated from the committed runs equals the committed file; its within-recipe slopes are
    recomputed independently (group-demeaned least squares) and each verdict word follows from its interval; the
    shift statement's counts and sign test are recomputed from the per-run numbers."""
    import json
    import re

    from scipy import stats as sst

    analysis, st = _study_modules()
    out = os.path.join(ROOT, "benchmarks", "results", "study")
    results = analysis.load_results(out)
    saved = json.load(open(os.path.join(out, "results.json")))
    base = st.label_baselines(saved["config"]["molecule"])
    assert base == pytest.approx(saved["label_baselines"], rel=1e-12)
    text = analysis.findings(results, analysis.correlations(results), analysis.mode_table(results),
                             analysis.layer_shares(results), base)
    assert text == open(os.path.join(out, "findings.md")).read()
    learned = [r for r in results.values() if r.get("task") == "md" and r["family"] == "mpnn"
               and r["test"]["forces_mae"] < 0.9 * base["forces_mae_zero"]]
    assert len(learned) == 20
    y = np.log([analysis.lie(r) for r in learned])
    g = np.array([r["mode"] for r in learned])
    for key, x, pos, neg in (("parameters", np.log([r["n_parameters"] for r in learned]),
                              "larger models have larger", "larger models are more equivariant"),
                             ("force MAE", np.log([r["test"]["forces_mae"] for r in learned]),
                              "more accurate models are more equivariant", "more accurate models are less")):
        xd = x - np.array([x[g == k].mean() for k in g])
        yd = y - np.array([y[g == k].mean() for k in g])
        b = (xd * yd).sum() / (xd ** 2).sum()
        se = np.sqrt(((yd - b * xd) ** 2).sum() / (len(y) - 1 - 5) / (xd ** 2).sum())
        lo, hi = b - sst.t.ppf(0.975, len(y) - 6) * se, b + sst.t.ppf(0.975, len(y) - 6) * se
        line = next(ln for ln in text.splitlines() if f"mpnn, pooled fit log L(F) = b·log({key})" in ln)
        assert f"b = {b:.2f}, 95% CI [{lo:.2f}, {hi:.2f}]" in line
        expect = pos if lo > 0 else neg if hi < 0 else "not distinguishable"
        assert expect in line, line
    line = next(ln for ln in text.splitlines() if ln.startswith("- shift/test ratio"))
    norm = base["force_norm_test_median"] / base["force_norm_shift_median"]
    ratios = [analysis.lie(r, "shift") / analysis.lie(r) for r in learned]
    above = sum(v > norm for v in ratios)
    p = sst.binomtest(above, len(ratios), 0.5).pvalue
    assert f"above it for {above} of {len(ratios)} (sign test p = {p:.3f})" in line
    assert ("weaker off-distribution beyond" in line) == (p < 0.05 and above > len(ratios) / 2)
    assert re.search(r"median ‖F‖ [\d.]+ test, [\d.]+ shift", line)
