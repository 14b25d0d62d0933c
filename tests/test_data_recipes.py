"""The dataset recipes' resume path: an interrupted xtb-md run continues from its partial file and loses nothing."""
import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("tblite")
ase_io = pytest.importorskip("ase.io")

RECIPE = os.path.join(os.path.dirname(__file__), "..", "datasets", "xtb-md", "make.py")


def _recipe(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("xtb_md_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # a short run in a temporary folder: 5 equilibration steps, a frame every 2 steps
    monkeypatch.setattr(mod, "SETTINGS", dict(mod.SETTINGS, equilibration_steps=5, stride=2))
    monkeypatch.setattr(mod, "_partial_path", lambda name, T: str(tmp_path / f"{name}_{T}K.partial.extxyz"))
    monkeypatch.setattr(mod, "_final_path", lambda name, T: str(tmp_path / f"{name}_{T}K.extxyz.gz"))
    return mod


def test_interrupted_md_resumes_from_its_partial_file(tmp_path, monkeypatch):
    mod = _recipe(tmp_path, monkeypatch)
    real_label, calls = mod.label, []

    def failing_label(frame):  # the run is killed while labelling its third frame
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_label(frame)

    monkeypatch.setattr(mod, "label", failing_label)
    with pytest.raises(KeyboardInterrupt):
        mod.run_md("ethanol", "300", 4)
    part = tmp_path / "ethanol_300K.partial.extxyz"
    kept = ase_io.read(part, ":")
    assert len(kept) == 2 and "momenta" in kept[-1].arrays  # finished frames are on disk, with momenta to resume
    assert not (tmp_path / "ethanol_300K.extxyz.gz").exists()

    monkeypatch.setattr(mod, "label", real_label)
    final = mod.run_md("ethanol", "300", 4)
    frames = ase_io.read(final, ":")
    assert len(frames) == 4 and not part.exists()
    for a, b in zip(frames[:2], kept):  # the first frames are the interrupted run's, unchanged
        assert np.allclose(a.positions, b.positions, atol=1e-8)
        assert np.allclose(a.get_forces(), b.get_forces(), atol=1e-8)
    # the resumed frames continue the trajectory (a 2-step stride moves atoms by far less than a bond) and carry
    # fresh labels: energies and forces equal a new tight single point
    assert np.abs(frames[2].positions - kept[-1].positions).max() < 0.3
    check = real_label(frames[3].copy())
    assert abs(check.get_potential_energy() - frames[3].get_potential_energy()) < 1e-6
    assert np.allclose(check.get_forces(), frames[3].get_forces(), atol=2e-5)
    # a finished file is not recomputed
    assert mod.run_md("ethanol", "300", 4) == final
