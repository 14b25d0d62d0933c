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
    """Every planned run finishes with the numbers the analysis reads: per-structure absolute and relative Lie
    derivatives and the label force norms; exact models at the float64 floor, unconstrained ones above it; the
    vector family's attribution puts nothing on the norm gate (equivariant) and something on the pointwise SiLU;
    a coarse sphere grid aliases far more than a fine one."""
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
        f = r["lie_test"]["forces"]
        lie = f["rot_iso"]["median"]
        assert r["test"]["forces_mae"] > 0 and r["shift"]["forces_mae"] > 0 and r["n_parameters"] > 0
        n = len(f["per_structure_rot_iso"])
        assert n == len(f["per_structure_rot_abs"]) == len(f["label_norm"]) == len(f["per_structure_rot_label"])
        assert np.allclose(np.array(f["per_structure_rot_abs"]) / np.array(f["label_norm"]),
                           f["per_structure_rot_label"], rtol=1e-12)
        assert r["training"]["validation"] and r["training"]["best_step"] <= r["training"]["stopped_step"]
        if r["kind"] == "equivariant":  # exactly equivariant baselines sit at float64 rounding after training
            assert lie < 1e-12, name
        elif r["kind"] == "unconstrained":
            assert lie > 1e-6, name  # nothing made them equivariant in 30 steps
            lw = r["lie_test"]["layerwise"]
            if r["family"] == "mpnn":  # declared reps: the raw edge vector's break is in the message MLPs' term
                assert abs(lw["__unattributed__"]) <= 1e-6 * max(abs(v) for v in lw.values()), name
            if r["family"] == "vector-gated":
                assert all(v < 1e-12 * max(lw.values()) for k, v in lw.items() if k.startswith("model.act.")), lw
            if r["family"] == "vector-pointwise":
                assert max(v for k, v in lw.items() if k.startswith("model.act.")) > 1e-3 * max(lw.values()), lw
    grid = sorted((r["resolution"][0], r["lie_test"]["forces"]["rot_iso"]["median"]) for r in runs.values()
                  if r["family"] == "grid")
    assert grid[0][1] > 1e3 * grid[-1][1]  # a coarse grid aliases far more than a fine one
    fa = runs["shapes-pointnet-fa-w16-s0"]["test"]["logits"]["rot_iso"]["median"]
    assert fa < 1e-12 < runs["shapes-pointnet-w16-plain-s0"]["test"]["logits"]["rot_iso"]["median"]
    for f in ("table.md", "findings.md", "lie_vs_error.png", "lie_vs_size.png", "lie_shift.png", "lie_per_layer.png",
              "lie_vs_grid.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    findings = open(os.path.join(out, "findings.md")).read()
    for section in ("Did the models learn the task", "within recipe", "Augmentation vs penalty", "off-distribution",
                    "Aliasing", "Best forces", "Exactly equivariant baselines", "grid resolution", "Shapes"):
        assert section in findings, section
    monitor = os.path.join(out, "runs", "ethanol-mpnn-w8-penalty-s0", "monitor", "monitor.csv")
    assert len(open(monitor).read().splitlines()) >= 1 + 2  # step 0 at least, energy and forces
    _check_claims(out)
    print(f"quick study: {seconds:.0f} s")  # measured, not asserted (timings are never asserted in tests)


def _check_claims(out):
    """Each saved claim is a line of findings.md, and its verdict follows from its interval and null."""
    res = json.load(open(os.path.join(out, "results.json")))
    text = open(os.path.join(out, "findings.md")).read()
    sys.path.insert(0, STUDY)
    import analysis

    for c in res["claims"]:
        assert analysis.Claim(**c).line() in text, c["key"]
        decided = c["lo"] is not None and (c["lo"] > c["null"] or c["hi"] < c["null"])
        assert decided == ("not distinguishable" not in c["verdict"]), c


def test_quick_study_resumes_without_retraining(study, capsys):
    run, out, _ = study
    before = os.path.getmtime(os.path.join(out, "runs", "ethanol-mpnn-w8-plain-s0", "result.json"))
    os.remove(os.path.join(out, "runs", "ethanol-schnet-s1", "result.json"))  # as if killed during that run
    assert run.main(["--quick", "--out", out, "--only", "s1"]) == 0  # the seed-1 runs: one to redo
    assert "already done" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "runs", "ethanol-mpnn-w8-plain-s0", "result.json")) == before
    assert os.path.exists(os.path.join(out, "runs", "ethanol-schnet-s1", "result.json"))
    assert not os.path.exists(os.path.join(out, "runs", "ethanol-schnet-s1", "claim"))  # released


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
    # a share's interval is the t-interval cut to [0, 1]: 0.9 ± 12.706 · 0.1/√2 reaches past 1 uncut
    cut, free = st.seed_interval([0.8, 1.0], bounds=(0.0, 1.0)), st.seed_interval([0.8, 1.0])
    h = sst.t.ppf(0.975, 1) * np.std([0.8, 1.0], ddof=1) / np.sqrt(2)
    assert free["hi"] == pytest.approx(0.9 + h) and free["hi"] > 1 and cut["hi"] == 1.0
    assert free["lo"] == pytest.approx(0.9 - h) and free["lo"] < 0
    assert cut["lo"] == 0.0 and cut["mean"] == pytest.approx(0.9)
    narrow = st.seed_interval([0.50, 0.51, 0.52], bounds=(0.0, 1.0))
    assert narrow["lo"] == pytest.approx(st.seed_interval([0.50, 0.51, 0.52])["lo"])  # inside: unchanged
    assert st.claim(0.1, 0.2, "up", "down") == "up" and st.claim(-0.2, -0.1, "up", "down") == "down"
    assert st.claim(-0.1, 0.2, "up", "down") == "not distinguishable"


def _planted_runs():
    """Synthetic runs with closed-form truth: L(F) = 1e-3 · (params/1e3)^-0.5 · recipe factor · seed noise; the
    penalty lowers L(F) by 10x; off-distribution the absolute L(F) doubles; forces MAE 0.3 · (params/1e3)^-0.1."""
    rng = np.random.default_rng(1)
    runs = {}
    for w, params in ((8, 1e3), (16, 4e3), (32, 1.6e4), (64, 6.4e4)):
        for mode, fac in (("plain", 1.0), ("penalty", 0.1)):
            for seed in range(3):
                noise = float(np.exp(rng.normal(scale=0.05)))
                lie_t = 1e-3 * (params / 1e3) ** -0.5 * fac * noise
                absolute = [lie_t * 10.0] * 3
                per = {"test": {"forces": {"rot_iso": {"median": lie_t}, "per_structure_rot_abs": absolute,
                                           "per_structure_rot_label": [a / 10.0 for a in absolute],
                                           "per_structure_rot_iso": [lie_t] * 3}},
                       "shift": {"forces": {"rot_iso": {"median": 2 * lie_t},
                                            "per_structure_rot_abs": [2 * a for a in absolute],
                                            "per_structure_rot_label": [2 * a / 8.0 for a in absolute],
                                            "per_structure_rot_iso": [2 * lie_t] * 3}}}
                name = f"ethanol-mpnn-w{w}-{mode}-s{seed}"
                runs[name] = dict(name=name, task="md", molecule="ethanol", family="mpnn", kind="unconstrained",
                                  width=w, mode=mode, seed=seed, n_parameters=int(params),
                                  test={"forces_mae": 0.3 * (params / 1e3) ** -0.1 * noise, "energy_mae": 0.1},
                                  shift={"forces_mae": 0.2, "energy_mae": 0.1}, training={"converged": True},
                                  lie_test=per["test"], lie_shift=per["shift"])
    return runs


def test_claims_on_planted_runs_recover_the_planted_truth():
    """The analysis's claims on synthetic runs recover what was planted, with intervals that cover it: the size
    slope -0.5 within recipe, the penalty's 10x, the shift's 2x in absolute L(F) (and 2·10/8 relative to the label
    forces); each verdict follows from its interval."""
    analysis, st = _study_modules()
    runs = _planted_runs()
    base = {"forces_mae_zero": 1.0}
    claims = {c.key: c for c in analysis.all_claims(runs, ["ethanol"], {"ethanol": base})}
    size = claims["trend/ethanol/mpnn/size"]
    assert size.lo < -0.5 < size.hi and size.hi < 0 and "more equivariant" in size.verdict and size.n == 24
    pen = claims["remedy/ethanol/mpnn/penalty-vs-plain/lie"]
    assert pen.estimate == pytest.approx(0.1, rel=0.05) and pen.lo < 0.1 < pen.hi and pen.n == 12
    assert "lowers" in pen.verdict
    sh = claims["shift/ethanol/abs"]
    assert sh.estimate == pytest.approx(2.0, rel=1e-9) and sh.n == 24
    assert claims["shift/ethanol/label"].estimate == pytest.approx(2.0 * 10 / 8, rel=1e-9)
    # a paired ratio recomputed by hand: the mean of log10 ratios and its t-interval
    from scipy import stats as sst

    d = [np.log10(runs[f"ethanol-mpnn-w{w}-penalty-s{s}"]["lie_test"]["forces"]["rot_iso"]["median"]
                  / runs[f"ethanol-mpnn-w{w}-plain-s{s}"]["lie_test"]["forces"]["rot_iso"]["median"])
         for w in (8, 16, 32, 64) for s in range(3)]
    h = sst.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
    assert pen.lo == pytest.approx(10 ** (np.mean(d) - h), rel=1e-12)
    for c in claims.values():
        decided = c.lo is not None and (c.lo > c.null or c.hi < c.null)
        assert decided == ("not distinguishable" not in c.verdict), c


def test_committed_findings_follow_from_the_saved_results():
    """findings.md regenerated from the committed runs equals the committed file; every claim is one of its lines
    with a verdict that follows from its interval; the within-recipe slopes are recomputed independently
    (group-demeaned least squares, seeds as replicates) and the shift factors from the per-structure numbers."""
    from scipy import stats as sst

    analysis, st = _study_modules()
    sys.path.insert(0, STUDY)
    import run

    out = os.path.join(ROOT, "benchmarks", "results", "study")
    results = analysis.load_results(out)
    if not results:
        pytest.skip("no committed study runs")
    saved = json.load(open(os.path.join(out, "results.json")))
    c = run.config(False)
    claims, text, bases = analysis.analyse(out, results, c)
    assert text == open(os.path.join(out, "findings.md")).read()
    for mol, b in bases.items():
        assert b == pytest.approx(saved["label_baselines"][mol], rel=1e-12), mol
    assert [analysis.asdict(cl) for cl in claims] == saved["claims"]
    _check_claims(out)
    by_key = {cl.key: cl for cl in claims}
    for mol in [c["molecule"]] + c["molecules_extra"]:
        ok = [r for r in results.values() if r.get("molecule") == mol and r["family"] == "mpnn"
              and r["test"]["forces_mae"] < 0.9 * bases[mol]["forces_mae_zero"]]
        if f"trend/{mol}/mpnn/size" not in by_key:
            continue
        y = np.log10([analysis.lie(r) for r in ok])
        g = np.array([r["mode"] for r in ok])
        x = np.log10([r["n_parameters"] for r in ok])
        xd = x - np.array([x[g == k].mean() for k in g])
        yd = y - np.array([y[g == k].mean() for k in g])
        b = (xd * yd).sum() / (xd ** 2).sum()
        dof = len(y) - 1 - len(set(g))
        se = np.sqrt(((yd - b * xd) ** 2).sum() / dof / (xd ** 2).sum())
        cl = by_key[f"trend/{mol}/mpnn/size"]
        assert cl.estimate == pytest.approx(b, rel=1e-9) and cl.n == len(y)
        assert cl.lo == pytest.approx(b - sst.t.ppf(0.975, dof) * se, rel=1e-9)
    main = c["molecule"]
    if f"shift/{main}/abs" in by_key:
        learned = [r for r in results.values() if r.get("molecule") == main and r["kind"] == "unconstrained"
                   and r["test"]["forces_mae"] < 0.9 * bases[main]["forces_mae_zero"]]
        d = [np.log10(np.median(r["lie_shift"]["forces"]["per_structure_rot_abs"])
                      / np.median(r["lie_test"]["forces"]["per_structure_rot_abs"])) for r in learned]
        assert by_key[f"shift/{main}/abs"].estimate == pytest.approx(10 ** np.mean(d), rel=1e-9)
        assert by_key[f"shift/{main}/abs"].n == len(d)


def test_escn_variants_share_their_weights(tmp_path):
    """The eSCN side study compares feed-forwards with the rest of the model fixed: the grid checkpoints of one seed
    hold identical tensors whatever ``grid_resolution``, and the spectral one shares every tensor except its
    feed-forward modules (``atom_wise``), which a grid model does not have."""
    pytest.importorskip("fairchem.core.units.mlip_unit.api.inference")
    import torch

    sys.path.insert(0, STUDY)
    import side

    def load(name, ff, res):
        return torch.load(side.escn_checkpoint(str(tmp_path / name), ff, res, channels=8), weights_only=False)

    grid, fine, spec = load("g.pt", "grid", None), load("f.pt", "grid", 12), load("s.pt", "spectral", None)
    a, b = grid.model_state_dict, fine.model_state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = spec.model_state_dict
    common = set(a) & set(c)
    assert {k for k in set(a) ^ set(c)} and all(".atom_wise." in k for k in set(a) ^ set(c))
    assert all(torch.equal(a[k], c[k]) for k in common) and len(common) > 20
    assert grid.model_config["backbone"]["ff_type"] == "grid" and spec.model_config["backbone"]["ff_type"] == "spectral"
    assert fine.model_config["backbone"]["grid_resolution"] == 12


def test_side_rows_are_read_into_findings(tmp_path):
    """escn.json and pretrained.json, when present beside the runs, become descriptive sections of the findings,
    with each row's numbers as saved; a model that could not be loaded says why."""
    analysis, _ = _study_modules()
    live = {"shares": {"atom-wise feed-forwards": 0.98, "normalisations": 0.0, "outside the units": 0.02},
            "energy_at_floor": [False, True, False]}
    dead = dict(live, energy_at_floor=[True, True, True])
    json.dump({"rows": [{"label": "grid, resolution 8", "lie_forces_median": 1.24e-3, "lie_energy_median": 2e-5,
                         "n": 8},
                        {"label": "grid, resolution 12", "lie_forces_median": 2e-8, "lie_energy_median": 1e-9, "n": 8,
                         "forces_floor_rel_median": 5e-15, "forces_above_floor": [20, 24],
                         "verdicts": {"forces": "above floor"}, "attribution": [live, dead, dict(live, shares={
                             "atom-wise feed-forwards": 0.90, "normalisations": 0.0, "outside the units": 0.10})]},
                        {"label": "spectral", "lie_forces_median": 4e-16, "lie_energy_median": 1e-17, "n": 8,
                         "attribution": [dead]}]}, open(tmp_path / "escn.json", "w"))
    json.dump({"what": "eSCN-MD trained", "training": {"val_forces_mae": 0.1, "best_step": 450, "stopped_step": 700,
                                                       "converged": True}, "rows": []},
              open(tmp_path / "escn_trained.json", "w"))
    json.dump({"rows": [{"model": "ani1x", "ok": True, "lie_forces_median": 3e-16, "forces_mae": 0.512, "n": 8},
                        {"model": "chgnet", "ok": False, "why": "chgnet is not installed"}]},
              open(tmp_path / "pretrained.json", "w"))
    secs = analysis.extra_sections(str(tmp_path))
    text = "\n".join(sum(secs.values(), []))
    assert "grid, resolution 8: L(F) median 1.2e-03" in text and "over 8 structures" in text
    # the above-floor count, and attribution's shares averaged over the frames whose L(E) is above its floor only
    assert "L(F) above its floor in 20 of 24 structure × rotation figures" in text
    assert "attribution of L(E) (2 frames above floor, mean share of |contribution|): 94.0% atom-wise feed-forwards, " \
           "0.0% normalisations, 6.0% outside the units" in text
    assert "spectral: L(F) median 4.0e-16" in text and "at its floor on the 1 frame attributed, no share stated" in text
    assert "best validation force MAE 0.100 eV/Å at step 450; stopped at step 700 (on the validation criterion)" in text
    assert "ani1x: L(F) median 3.0e-16" in text and "0.512 eV/Å" in text
    assert "chgnet: not audited (chgnet is not installed)" in text


@pytest.mark.parametrize("page, heading", [(("docs", "src", "study.md"), "## What the committed runs say so far"),
                                           (("README.md",), "## The learned-equivariance study")])
def test_study_pages_quote_the_committed_findings(page, heading):
    """Every finding the docs' study page and the README's study section state is a line of the committed
    findings.md, verbatim: neither can say more than the runs do."""
    text = open(os.path.join(ROOT, *page)).read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    findings = open(os.path.join(ROOT, "benchmarks", "results", "study", "findings.md")).read().splitlines()
    quoted = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert quoted, "no finding quoted"
    for ln in quoted:
        assert ln in findings, ln


@pytest.mark.parametrize("page, heading", [(("docs", "src", "study.md"), "## What the committed runs say so far"),
                                           (("README.md",), "## The learned-equivariance study")])
def test_study_pages_prose_has_no_number_the_findings_lack(page, heading):
    """The prose around the quoted lines (the status, the reading) states only numbers that findings.md states: a
    hand-derived figure ("about 33×") would go stale when the runs change."""
    import re

    text = open(os.path.join(ROOT, *page)).read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    findings = open(os.path.join(ROOT, "benchmarks", "results", "study", "findings.md")).read()
    prose = "\n".join(ln for ln in section.splitlines() if not ln.startswith("- "))
    prose = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|\b3D\b", "", prose)  # code, links, "3D"
    token = r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?"
    stated = set(re.findall(token, findings))
    missing = [x for x in re.findall(token, prose) if x not in stated]
    assert not missing, missing


@pytest.mark.parametrize("name", ["EdgeMPNN", "RelTransformer", "VectorMPNN-pointwise", "VectorMPNN-gated"])
def test_study_models_batch_like_one_structure_at_a_time(name):
    """The study trains on batches: each model's energy of a structure is the same in a batch of two different
    molecules (padded attention, per-structure sums) as alone, in float64 to rounding; the norm gate commutes with
    rotations (its local Lie derivative is zero), the per-component SiLU does not."""
    import torch

    sys.path.insert(0, STUDY)
    import models

    cls, _, nl = name.partition("-")
    m = (getattr(models, cls)(width=8, nonlinearity=nl) if nl else getattr(models, cls)(width=8)).double()
    g = torch.Generator().manual_seed(0)
    za, zb = torch.tensor([6, 6, 8, 1, 1, 1, 1, 1, 1]), torch.tensor([8, 1, 1])
    pa = torch.randn(9, 3, generator=g, dtype=torch.float64) * 1.3
    pb = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.9 + 10.0
    both = m(torch.cat([za, zb]), torch.cat([pa, pb]), torch.tensor([0] * 9 + [1] * 3))
    alone = torch.stack([m(za, pa, None)[0], m(zb, pb, None)[0]])
    assert torch.allclose(both, alone, rtol=1e-12, atol=1e-12)
    if nl:
        v = torch.randn(5, 8, 3, generator=g, dtype=torch.float64)
        act = m.act[0]
        Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        commutes = torch.allclose(act(v @ Q.T), act(v) @ Q.T, atol=1e-12)
        assert commutes == (nl == "gated")


def test_run_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    """Several workers share one configuration: a run claimed by a live process is skipped, a claim being written
    (empty) is left alone, a claim whose process is gone is taken over, and a free run is claimed once."""
    import subprocess

    sys.path.insert(0, STUDY)
    import run

    free = tmp_path / "free"
    free.mkdir()
    assert run._claim(str(free)) and (free / "claim").read_text() == str(os.getpid())
    assert run._claim(str(free))  # this process's own claim
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        taken = tmp_path / "taken"
        taken.mkdir()
        (taken / "claim").write_text(str(live.pid))
        assert not run._claim(str(taken))
    finally:
        live.kill()
        live.wait()
    assert run._claim(str(taken))  # its process is gone
    writing = tmp_path / "writing"
    writing.mkdir()
    (writing / "claim").write_text("")
    assert not run._claim(str(writing))


def test_status_estimates_what_is_left_from_finished_runs(tmp_path):
    """The remaining time: the mean of finished runs of the same family, recipe and width, else of family and
    recipe; a run with neither is named as unknown, never guessed."""
    sys.path.insert(0, STUDY)
    import run

    def r(name, family, mode, width):
        return {"name": name, "molecule": "aspirin", "family": family, "mode": mode, "width": width}

    runs = [r("a", "mpnn", "plain", 8), r("b", "mpnn", "plain", 8), r("c", "mpnn", "plain", 64),
            r("d", "mpnn", "plain", 8), r("e", "mpnn", "plain", 16), r("f", "mpnn", "penalty", 8)]
    for name, sec in (("a", 100.0), ("b", 300.0), ("c", 1000.0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps({"seconds": sec}))
    est = run.remaining_estimate(runs, str(tmp_path), ["d", "e", "f"])
    # d: width 8's mean (200); e: no width-16 run, so plain's mean over widths (1400 / 3); f: nothing to go by
    assert est["seconds"] == pytest.approx(200.0 + 1400.0 / 3) and est["runs"] == 2 and est["unknown"] == ["f"]


def test_status_tells_done_running_and_pending_runs(tmp_path, capsys):
    """``--status``: a run with a result is done, one claimed by a live process is running, one claimed by a process
    that is gone, one with an empty claim and one never started are pending; nothing is claimed by looking."""
    import subprocess

    sys.path.insert(0, STUDY)
    import run

    runs = [{"name": n, "molecule": "ethanol", "family": "mpnn", "mode": "plain"}
            for n in ("done", "live", "gone", "writing", "never")]
    for n in ("done", "live", "gone", "writing"):
        (tmp_path / "runs" / n).mkdir(parents=True)
    (tmp_path / "runs" / "done" / "result.json").write_text("{}")
    (tmp_path / "runs" / "writing" / "claim").write_text("")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "runs" / "gone" / "claim").write_text(str(dead.pid))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "runs" / "live" / "claim").write_text(str(live.pid))
        st = run.status(runs, str(tmp_path))
        run._print_status(runs, str(tmp_path))
    finally:
        live.kill()
        live.wait()
    assert st == {"done": ["done"], "running": ["live"], "pending": ["gone", "writing", "never"]}
    assert (tmp_path / "runs" / "gone" / "claim").read_text() == str(dead.pid)  # looking claims nothing
    out = capsys.readouterr().out
    assert "1 done, 1 running, 3 pending of 5 runs" in out and "running: live" in out
