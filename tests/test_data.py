"""Bundled datasets: loaders, splits, checksums, labels re-computed with the reference methods, bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import geolie.data as gd

MOLECULES = ["ethanol", "malonaldehyde", "benzene", "toluene", "uracil", "aspirin", "naphthalene",
             "salicylic_acid"]


def test_available():
    names = gd.available()
    assert "emt-bulk" in names and "shapes" in names
    assert all(f"xtb-md/{m}" in names for m in MOLECULES)


@pytest.mark.parametrize("molecule", MOLECULES)
def test_xtb_md_splits_and_sizes(molecule):
    man = json.loads((gd.dataset_root() / "xtb-md" / "manifest.json").read_text())["molecules"][molecule]
    n = man["files"]["500"]["frames"]
    assert n >= 1000
    parts = {s: gd.load(f"xtb-md/{molecule}", s) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == n
    sp = man["files"]["500"]["splits"]
    assert not (set(sp["train"]) & set(sp["test"])) and not (set(sp["train"]) & set(sp["val"]))
    shift = gd.load(f"xtb-md/{molecule}", "shift")
    assert len(shift) == man["files"]["300"]["frames"] and shift[0].info["temperature_K"] == 300
    at = parts["test"][0]
    assert at.get_forces().shape == (len(at), 3) and np.isfinite(at.get_potential_energy())


@pytest.mark.parametrize("molecule", MOLECULES)
def test_xtb_labels_match_tblite(molecule):
    """Two frames per molecule re-labelled with GFN2-xTB at the recipe's SCF accuracy (0.01): energies to 1e-6 eV,
    forces to 2e-5 eV/Å (SCF reproducibility measured ~5e-6 eV/Å; stored text precision 1e-8)."""
    tblite = pytest.importorskip("tblite.ase")
    frames = gd.load(f"xtb-md/{molecule}", "test")
    for at in frames[:2]:
        ref = at.copy()
        ref.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0, accuracy=0.01)
        assert abs(ref.get_potential_energy() - at.get_potential_energy()) < 1e-6
        assert np.abs(ref.get_forces() - at.get_forces()).max() < 2e-5


def test_xtb_forces_are_energy_gradients():
    """Stored forces match central differences of GFN2-xTB energies (h = 1e-4 Å, error ~1e-5 eV/Å)."""
    tblite = pytest.importorskip("tblite.ase")
    at = gd.load("xtb-md/ethanol", "test")[0]
    calc = tblite.TBLite(method="GFN2-xTB", verbosity=0, accuracy=0.01)
    h = 1e-4
    fd = np.zeros((len(at), 3))
    for i in range(len(at)):
        for k in range(3):
            e = []
            for s in (h, -h):
                a = at.copy()
                a.positions[i, k] += s
                a.calc = calc
                e.append(a.get_potential_energy())
            fd[i, k] = -(e[0] - e[1]) / (2 * h)
    assert np.abs(fd - at.get_forces()).max() < 1e-4


def test_emt_bulk_labels_and_stress():
    from ase.calculators.emt import EMT

    frames = gd.load("emt-bulk", "all")
    assert len(frames) == 420 and all(a.pbc.all() for a in frames)
    for at in frames[::70]:
        ref = at.copy()
        ref.calc = EMT()
        assert abs(ref.get_potential_energy() - at.get_potential_energy()) < 1e-6
        assert np.abs(ref.get_forces() - at.get_forces()).max() < 1e-6
        assert np.abs(ref.get_stress() - at.get_stress()).max() < 1e-7
    at = frames[5].copy()  # forces = -dE/dx by central differences of EMT energies
    at.calc = EMT()
    f = at.get_forces()
    h = 1e-5
    for i, k in [(0, 0), (1, 2), (3, 1)]:
        e = []
        for s in (h, -h):
            a = at.copy()
            a.positions[i, k] += s
            a.calc = EMT()
            e.append(a.get_potential_energy())
        assert abs(-(e[0] - e[1]) / (2 * h) - f[i, k]) < 1e-6
    assert {a.info["lattice"] for a in frames} == {"fcc", "bcc", "hcp"}
    assert any(a.info["vacancies"] > 0 for a in frames)


def test_shapes_are_deterministic_and_canonical():
    import importlib.util

    root = gd.dataset_root() / "shapes"
    spec = importlib.util.spec_from_file_location("shapes_make", root / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pts, off, lab, cls = mod.generate(seed=mod.SEED, per_class=mod.PER_CLASS)
    items = gd.load("shapes", "all")
    assert len(items) == len(lab) and len(set(cls)) >= 10
    for i in (0, 123, len(items) - 1):
        assert torch.equal(items[i].points, torch.from_numpy(pts[off[i]:off[i + 1]]))
        assert 256 <= len(items[i].points) <= 1024
    disk = [s for s in items if s.name == "disk"][0].points  # canonical orientation: the disk lies in z = 0
    assert disk[:, 2].abs().mean() < 0.03 and disk[:, :2].abs().mean() > 0.2
    split = {s: len(gd.load("shapes", s)) for s in ("train", "val", "test")}
    assert sum(split.values()) == len(items)


def test_to_pyg():
    b = gd.to_pyg(gd.load("emt-bulk", "test")[:3])
    assert b.cell.shape == (3, 3, 3) and b.stress.shape == (3, 3, 3) and b.energy.shape == (3,)
    assert b.pos.dtype == torch.float64 and b.z.dtype == torch.long
    b = gd.to_pyg(gd.load("xtb-md/ethanol", "test")[:2], dtype=torch.float32)
    assert b.forces.shape == (18, 3) and not hasattr(b, "cell") and b.pos.dtype == torch.float32
    s = gd.to_pyg(gd.load("shapes", "test")[:4])
    assert s.y.shape == (4,)
    with pytest.raises(ValueError, match="empty list"):
        gd.to_pyg([])


def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'qm9'"):
        gd.load("qm9")
    with pytest.raises(ValueError, match="unknown xtb-md molecule 'caffeine'"):
        gd.load("xtb-md/caffeine")
    with pytest.raises(ValueError, match="unknown split"):
        gd.load("emt-bulk", "training")
    # a corrupted copy of the datasets folder: checksum mismatch, then a truncated file
    root = tmp_path / "datasets"
    shutil.copytree(gd.dataset_root() / "emt-bulk", root / "emt-bulk")
    monkeypatch.setenv("GEOLIE_DATASETS", str(root))
    f = root / "emt-bulk" / "emt_bulk.extxyz.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checksum mismatch"):
        gd.load("emt-bulk")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gd.load("emt-bulk", verify=False)
    # a file without labels
    p = tmp_path / "nolabels.xyz"
    p.write_text("2\n\nH 0 0 0\nH 0 0 0.74\n")
    assert len(gd.load(str(p))) == 1
    with pytest.raises(ValueError, match="structure 0 has no energy, forces label"):
        gd.read(p, require=("energy", "forces"))
    with pytest.raises(FileNotFoundError, match="datasets folder not found"):
        monkeypatch.setenv("GEOLIE_DATASETS", str(tmp_path / "nowhere"))
        gd.dataset_root()


def test_datasets_are_found_from_an_installed_wheel(tmp_path):
    """The bundled datasets ship inside the wheel (geolie._datasets): an installed geolie, imported away from the
    source checkout, finds and loads them."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), repo], check=True)
    whl = next(wheels.glob("geolie-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(whl)], check=True)
    code = ("import geolie; r = geolie.data.dataset_root(); print(geolie.__file__); print(r); "
            "print(len(geolie.data.load('xtb-md/ethanol', 'test')), len(geolie.data.load('emt-bulk', 'test')))")
    env = {k: v for k, v in os.environ.items() if k != "GEOLIE_DATASETS"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    n_mol, n_cells = map(int, out[2].split())
    assert n_mol == len(gd.load("xtb-md/ethanol", "test")) and n_cells > 0


def test_geolie_datasets_variable_must_point_at_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOLIE_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="datasets folder not found .*holds no geolie dataset"):
        gd.dataset_root()
