import os
import sys

from geolie.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--structures", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    rows = {tuple(ln.split()[:2]): ln for ln in text.splitlines() if ln.startswith("  ") and "e+" not in ln[:20]}
    for model in ("pair-mlp", "e3nn", "gaunt", "schnet"):
        for out in ("energy", "forces"):
            assert rows[(model, out)].endswith("at floor"), rows[(model, out)]
    assert rows[("cartesian-mlp", "forces")].endswith("BREAKS")
    assert rows[("emt", "stress")].endswith("at floor")
    assert (tmp_path / "e3nn" / "report.json").exists() and (tmp_path / "emt" / "lie_stress.png").exists()


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "audit" in out


def test_torchrun_two_processes_merge_into_the_single_run(tmp_path):
    """torchrun --nproc-per-node 2 geolie audit: each rank audits its shard (gloo), rank 0 merges; the report and
    CSV equal one process's bit for bit (one structure per call in both, as in the shard test)."""
    import json
    import subprocess

    args = ["audit", "--model", "pair-mlp", "--data", "xtb-md/ethanol:test", "--limit", "5", "--n-finite", "1",
            "--batch-size", "1"]
    single = tmp_path / "single"
    assert main(args + ["--out", str(single)]) == 0
    multi = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "geolie.cli"] + args + ["--out", str(multi)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merged 2 shards" in res.stdout
    assert sorted(p.name for p in multi.iterdir() if p.is_dir()) == ["shard-0-of-2", "shard-1-of-2"]
    a = json.loads((single / "report.json").read_text())
    b = json.loads((multi / "report.json").read_text())
    assert a["structures"] == b["structures"] and a["aggregates"] == b["aggregates"]
    assert (single / "structures.csv").read_text() == (multi / "structures.csv").read_text()
