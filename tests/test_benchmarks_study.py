"""The learned-equivariance study (benchmarks/study) end to end in its --quick configuration, and resumed."""
import json
import os
import sys
import time

import numpy as np
import pytest

STUDY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "study")


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
