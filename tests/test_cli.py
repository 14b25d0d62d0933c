import json
import subprocess
import sys

from geolie.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--molecules", "H2O", "CH4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("H2O", "CH4"))]
    assert len(lines) == 3 * 2 * 2  # 3 models x 2 molecules x (energy, forces)
    eq = [ln for ln in text.split("cartesian-mlp")[0].splitlines() if ln.strip().startswith(("H2O", "CH4"))]
    assert all(ln.endswith("at floor") for ln in eq)
    broken = text.split("cartesian-mlp")[1]
    assert "BREAKS" in broken
    data = json.loads(out.read_text())
    assert data["pair-mlp (equivariant)"]["H2O"]["outputs"]["forces"]["rep"] == "vector"


def test_unknown_molecule_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "geolie.cli", "demo", "--molecules", "Unobtainium"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown molecule" in r.stderr
