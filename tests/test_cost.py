"""The cost account (geolie._cost): exclusive parts that add up to the wall time, E+F-equivalents against a reference
timed in the same run, in every audit's report and with ``geolie audit --profile``. No timing is asserted: the
arithmetic is checked with a fake clock, the audit's account by its structure."""
import json

import pytest
import torch

import geolie
from geolie import _cost
from geolie._cost import CostAccount, accounting, part, table


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_parts_are_exclusive_and_add_up(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_cost.time, "perf_counter", clock)
    with accounting() as acc:
        clock.t += 1.0  # other
        with part("a"):
            clock.t += 2.0
            with part("b"):
                clock.t += 3.0
            clock.t += 0.5
        with part("b"):
            clock.t += 1.0
        with part("floors"):  # absorbing: its inner parts are its own cost
            clock.t += 0.5
            with part("b"):
                clock.t += 0.25
        acc.reference(lambda: setattr(clock, "t", clock.t + 0.25), n_structures=5, repeat=3)  # 4 calls, excluded
    acc.close(n_structures=10)
    d = acc.to_dict()
    assert d["wall_seconds"] == pytest.approx(8.25)
    secs = {k: v["seconds"] for k, v in d["parts"].items()}
    assert secs == pytest.approx({"a": 2.5, "b": 4.0, "floors": 0.75, "other": 1.0})
    assert d["ef_seconds_per_structure"] == pytest.approx(0.05)
    assert d["parts"]["b"]["ef_equivalents_per_structure"] == pytest.approx(4.0 / 10 / 0.05)
    assert d["ef_equivalents_per_structure"] == pytest.approx(8.25 / 10 / 0.05)
    assert d["parts"]["b"]["calls"] == 2
    text = table(d)
    assert "E+F-equivalents per structure" in text and "b" in text


def test_reference_times_short_calls_for_long_enough(monkeypatch):
    """The E+F reference: a warm-up, then at least ``repeat`` calls, more until they add up to ``min_seconds`` (at
    most ``max_repeat``); the median per structure, none of it in the run's wall time."""
    clock = FakeClock()
    monkeypatch.setattr(_cost.time, "perf_counter", clock)
    calls = []

    def ef(dt):
        def call():
            calls.append(dt)
            clock.t += dt
        return call

    with accounting() as acc:
        acc.reference(ef(2.0 ** -6), n_structures=2, repeat=3, min_seconds=0.3)  # exact binary steps: 0.3 / 2^-6 = 19.2
    assert len(calls) == 1 + 20 and acc.ef_seconds_per_structure == pytest.approx(2.0 ** -7)
    calls.clear()
    with accounting() as acc:
        acc.reference(ef(2.0 ** -10), n_structures=1, repeat=3, min_seconds=0.3, max_repeat=50)
    assert len(calls) == 1 + 50  # capped
    calls.clear()
    with accounting() as acc:
        acc.reference(ef(1.0), n_structures=1, repeat=3, min_seconds=0.3)
        acc.close(n_structures=1)
    assert len(calls) == 1 + 3 and acc.to_dict()["wall_seconds"] == pytest.approx(0.0)


def test_part_outside_an_account_is_free():
    with part("nothing"):
        pass
    assert not _cost._ACTIVE


def test_audit_accounts_for_every_part(tmp_path):
    sts = geolie.data.load("xtb-md/ethanol", "test")[:3]
    rep = geolie.audit("pair-mlp", sts, out_dir=str(tmp_path), progress=False, profile=True, n_finite=1)
    c = rep.cost
    assert c["structures"] == 3 and c["ef_seconds_per_structure"] > 0
    for name in ("base evaluation", "adjoint test", "floors", "finite companions", "I/O", "metrics and rows",
                 "reading the data", "other"):
        assert name in c["parts"], name
    assert any(k.startswith("tangents (") for k in c["parts"])
    assert sum(v["seconds"] for v in c["parts"].values()) == pytest.approx(c["wall_seconds"], rel=1e-9)
    geolie.write_report(rep, str(tmp_path))
    assert json.load(open(tmp_path / "report.json"))["cost"] == json.loads(json.dumps(c))
    plain = geolie.audit("pair-mlp", sts[:1], progress=False, n_finite=0, hunt=True)  # no reference: seconds only
    assert plain.cost["ef_seconds_per_structure"] is None and "hunt" in plain.cost["parts"]
    assert "finite companions" not in plain.cost["parts"]


def test_cli_profile_prints_the_account(tmp_path, capsys):
    from geolie.cli import main

    assert main(["audit", "--model", "pair-mlp", "--data", "xtb-md/ethanol:test", "--limit", "2", "--n-finite", "1",
                 "--out", str(tmp_path), "--profile"]) == 0
    out = capsys.readouterr().out
    assert "cost account:" in out and "E+F-eq/structure" in out and "finite companions" in out


def test_benchmarks_page_states_the_saved_account():
    """The docs' account table (before → after) ends in the totals of ``benchmarks/results/audit_account.json``."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = json.load(open(os.path.join(root, "benchmarks", "results", "audit_account.json")))["modes"]
    page = open(os.path.join(root, "docs", "src", "benchmarks.md")).read()
    row = next(line for line in page.splitlines() if line.startswith("| **total** |") and "→" in line)
    after = [float(m) for m in re.findall(r"→ ([0-9.]+)\*\*", row)]
    assert after == [round(saved[m]["total"], 1) for m in ("default", "random, no finite", "hunt (4 structures)")]
