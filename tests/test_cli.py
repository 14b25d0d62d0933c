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
