"""Recipe: GFN2-xTB molecular-dynamics trajectories in the spirit of rMD17 (regenerates datasets/xtb-md/).

For each molecule: a starting geometry (ASE's g2 collection where it has it, otherwise RDKit from SMILES with
an MMFF pre-optimization; RDKit is needed only here), relaxed with GFN2-xTB (tblite, BFGS to fmax 0.01 eV/Å),
then Langevin dynamics in ASE: 0.5 fs time step, friction 0.01 / fs, velocities drawn from Maxwell-Boltzmann at
the target temperature, 1 ps of equilibration, then one frame every 20 steps (10 fs) to decorrelate.
Main temperature 500 K (1000 frames); a 300 K trajectory (200 frames) is the distribution-shift split.
Labels: energies in eV and forces in eV/Å from a fresh single-point GFN2-xTB calculation on each stored frame
with a tight SCF (tblite ``accuracy=0.01``, reproducible to ~1e-5 eV/Å; the MD itself runs at the default
accuracy, whose forces depend on the SCF history at the 1e-4 eV/Å level). ``--relabel`` re-labels finished files.

Resumable: frames are appended to ``NAME_TK.partial.extxyz`` with momenta; a rerun continues from the last
frame (with a fresh random stream ``seed + frames``: a resumed trajectory is statistically equivalent, not
bit-identical). Parallel over molecules (``--workers``). Finished files are ``NAME_TK.extxyz.gz``; the manifest
``manifest.json`` records checksums, provenance and the fixed splits.

    python datasets/xtb-md/make.py                     # all molecules
    python datasets/xtb-md/make.py --molecules ethanol --frames 50   # a quick test
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _manifest import sha256, splits  # noqa: E402

MOLECULES = {
    # name: (ASE g2 name or None, SMILES)
    "ethanol": ("CH3CH2OH", "CCO"),
    "malonaldehyde": (None, "OC=CC=O"),
    "benzene": ("C6H6", "c1ccccc1"),
    "toluene": (None, "Cc1ccccc1"),
    "uracil": (None, "O=C1C=CNC(=O)N1"),
    "aspirin": (None, "CC(=O)Oc1ccccc1C(=O)O"),
    "naphthalene": (None, "c1ccc2ccccc2c1"),
    "salicylic_acid": (None, "O=C(O)c1ccccc1O"),
}
SETTINGS = {"timestep_fs": 0.5, "friction_per_fs": 0.01, "equilibration_steps": 2000, "stride": 20,
            "temperatures_K": {"500": 1000, "300": 200}, "seed": 2026, "method": "GFN2-xTB",
            "relax_fmax_eV_per_A": 0.01, "label_accuracy": 0.01}


def _calc(accuracy: float = 1.0):
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0, accuracy=accuracy)


def label(frame):
    """Energy and forces of ``frame`` by a fresh, tightly converged GFN2-xTB single point (no SCF history)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    at = frame.copy()
    at.calc = _calc(SETTINGS["label_accuracy"])
    e, f = at.get_potential_energy(), at.get_forces()
    frame.calc = SinglePointCalculator(frame, energy=e, forces=f)
    return frame


def relabel(path: str):
    """Re-label every frame of a finished file in place (atomic replace)."""
    import ase.io
    from tqdm import tqdm

    frames = ase.io.read(path, ":")
    for fr in tqdm(frames, desc=f"relabel {os.path.basename(path)}", file=sys.stderr):
        label(fr)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt") as fh:
        ase.io.write(fh, frames, format="extxyz")
    os.replace(tmp, path)


def initial_geometry(name: str):
    from ase import Atoms
    from ase.build import molecule

    g2, smiles = MOLECULES[name]
    if g2 is not None:
        return molecule(g2), f"ase.build.molecule({g2!r})"
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=SETTINGS["seed"])
    AllChem.MMFFOptimizeMolecule(mol)
    pos = mol.GetConformer().GetPositions()
    return Atoms([a.GetSymbol() for a in mol.GetAtoms()], positions=pos), f"RDKit ETKDG+MMFF from SMILES {smiles}"


def relax(atoms):
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = _calc()
    BFGS(atoms, logfile=None).run(fmax=SETTINGS["relax_fmax_eV_per_A"], steps=500)
    return atoms


def _partial_path(name, T):
    return os.path.join(HERE, f"{name}_{T}K.partial.extxyz")


def _final_path(name, T):
    return os.path.join(HERE, f"{name}_{T}K.extxyz.gz")


def run_md(name: str, T: str, n_frames: int, position: int = 0):
    """Langevin MD at temperature T, appending frames to the partial file; resumes where it stopped."""
    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from tqdm import tqdm

    final = _final_path(name, T)
    if os.path.exists(final):
        return final
    part = _partial_path(name, T)
    done = ase.io.read(part, ":") if os.path.exists(part) else []
    seed = SETTINGS["seed"] + int(T) + 7919 * list(MOLECULES).index(name) + len(done)
    rng = np.random.RandomState(seed)
    if done:
        atoms = done[-1].copy()
        atoms.set_momenta(done[-1].arrays["momenta"])
    else:
        start, _ = initial_geometry(name)
        atoms = relax(start)
        MaxwellBoltzmannDistribution(atoms, temperature_K=float(T), rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
    atoms.calc = _calc()
    dyn = Langevin(atoms, timestep=SETTINGS["timestep_fs"] * units.fs, temperature_K=float(T),
                   friction=SETTINGS["friction_per_fs"] / units.fs, rng=rng)
    if not done:
        dyn.run(SETTINGS["equilibration_steps"])
    bar = tqdm(total=n_frames, initial=len(done), desc=f"{name} {T} K", position=position, leave=True,
               file=sys.stderr)
    with open(part, "a") as fh:
        for _ in range(n_frames - len(done)):
            dyn.run(SETTINGS["stride"])
            frame = atoms.copy()
            frame.set_momenta(atoms.get_momenta())
            label(frame)
            frame.info["temperature_K"] = int(T)
            ase.io.write(fh, frame, format="extxyz")
            fh.flush()
            bar.update(1)
    bar.close()
    frames = ase.io.read(part, ":")
    for fr in frames:  # momenta are only needed to resume
        del fr.arrays["momenta"]
    tmp = final + ".tmp"
    with gzip.open(tmp, "wt") as fh:
        ase.io.write(fh, frames, format="extxyz")
    os.replace(tmp, final)
    os.remove(part)
    return final


def _job(args):
    name, T, n, pos = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    path = run_md(name, T, n, pos)
    return name, T, path, time.time() - t0


def write_manifest(names, frames_override=None):
    import ase.io

    man_path = os.path.join(HERE, "manifest.json")
    manifest = json.load(open(man_path)) if os.path.exists(man_path) else {"molecules": {}}
    manifest["description"] = "GFN2-xTB Langevin MD trajectories (rMD17-like), energies in eV, forces in eV/Å"
    manifest["settings"] = SETTINGS
    manifest["versions"] = {p: metadata.version(p) for p in ("ase", "tblite", "numpy")}
    manifest["versions"]["python"] = platform.python_version()
    for name in names:
        entry = {"source": initial_geometry(name)[1], "files": {}}
        for T in SETTINGS["temperatures_K"]:
            path = _final_path(name, T)
            if not os.path.exists(path):
                continue
            frames = ase.io.read(path, ":")
            f = {"file": os.path.basename(path), "sha256": sha256(path), "frames": len(frames),
                 "atoms": len(frames[0]), "formula": frames[0].get_chemical_formula(), "temperature_K": int(T)}
            if T == "500":
                f["splits"] = splits(len(frames), SETTINGS["seed"])
            entry["files"][T] = f
        manifest["molecules"][name] = entry
    with open(man_path, "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description="Regenerate the xtb-md dataset (GFN2-xTB Langevin MD).")
    ap.add_argument("--molecules", nargs="+", default=list(MOLECULES), choices=list(MOLECULES))
    ap.add_argument("--frames", type=int, default=None, help="frames at 500 K (default 1000); 300 K gets a fifth")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--relabel", action="store_true", help="only re-label the finished files, then the manifest")
    args = ap.parse_args(argv)
    if args.relabel:
        for name in args.molecules:
            for T in SETTINGS["temperatures_K"]:
                if os.path.exists(_final_path(name, T)):
                    relabel(_final_path(name, T))
        write_manifest(args.molecules)
        return
    jobs = []
    for i, name in enumerate(args.molecules):
        for T, n in SETTINGS["temperatures_K"].items():
            if args.frames is not None:
                n = args.frames if T == "500" else max(1, args.frames // 5)
            jobs.append((name, T, n, len(jobs) % max(1, args.workers)))
    if args.workers > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(args.workers) as pool:
            for name, T, path, dt in pool.imap_unordered(_job, jobs):
                print(f"{name} {T} K done in {dt:.0f} s -> {os.path.basename(path)}", file=sys.stderr)
    else:
        for j in jobs:
            name, T, path, dt = _job(j)
            print(f"{name} {T} K done in {dt:.0f} s -> {os.path.basename(path)}", file=sys.stderr)
    write_manifest(args.molecules)


if __name__ == "__main__":
    main()
