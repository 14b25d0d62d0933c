"""Recipe: periodic metal cells labelled by ASE's EMT with energy, forces and stress (regenerates emt-bulk/).

Metals Al, Cu, Ni, Pd, Ag, Pt, Au (EMT's parametrized elements) in fcc, bcc and hcp lattices (lattice constants
from ASE for fcc; bcc and hcp at the fcc atomic volume), as 2-atom to 54-atom supercells. Each structure is
randomly strained (symmetric strain, components up to ±3 %), rattled (Gaussian, σ = 0.02-0.10 Å), and a quarter of
them lose one or two atoms (vacancies). 20 structures per metal and lattice: 420 in all. Energies in eV, forces in
eV/Å, stress in eV/Å³ (ASE's convention, Voigt order expanded to 3x3 when loaded). Deterministic for the seed.

    python datasets/emt-bulk/make.py
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _manifest import sha256, splits  # noqa: E402

METALS = ["Al", "Cu", "Ni", "Pd", "Ag", "Pt", "Au"]
LATTICES = ["fcc", "bcc", "hcp"]
PER = 20
SEED = 7
FILE = "emt_bulk.extxyz.gz"


def structures():
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from tqdm import tqdm

    rng = np.random.RandomState(SEED)
    out = []
    jobs = [(m, lat, k) for m in METALS for lat in LATTICES for k in range(PER)]
    for metal, lat, k in tqdm(jobs, desc="emt-bulk", file=sys.stderr):
        a_fcc = bulk(metal, "fcc").cell.lengths()[0] * np.sqrt(2)  # conventional cubic constant
        vol = a_fcc ** 3 / 4  # volume per atom
        if lat == "fcc":
            atoms = bulk(metal, "fcc", a=a_fcc, cubic=True)
        elif lat == "bcc":
            atoms = bulk(metal, "bcc", a=(2 * vol) ** (1 / 3), cubic=True)
        else:
            a = (2 * vol / (np.sqrt(3) / 2 * 1.633)) ** (1 / 3)
            atoms = bulk(metal, "hcp", a=a, c=1.633 * a)
        reps = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 3, 3) if lat != "fcc" else (2, 2, 2)]
        atoms = atoms.repeat(reps[rng.randint(len(reps))])
        eps = rng.uniform(-0.03, 0.03, (3, 3))
        eps = 0.5 * (eps + eps.T)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + eps).T, scale_atoms=True)
        atoms.rattle(stdev=rng.uniform(0.02, 0.10), seed=int(rng.randint(1 << 30)))
        n_vac = 0
        if rng.rand() < 0.25 and len(atoms) > 4:
            n_vac = int(rng.randint(1, 3))
            for idx in sorted(rng.choice(len(atoms), n_vac, replace=False), reverse=True):
                del atoms[int(idx)]
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info.update({"metal": metal, "lattice": lat, "vacancies": n_vac, "index": k})
        out.append(atoms)
    return out


def main():
    import ase.io

    frames = structures()
    path = os.path.join(HERE, FILE)
    with gzip.open(path + ".tmp", "wt") as fh:
        ase.io.write(fh, frames, format="extxyz")
    os.replace(path + ".tmp", path)
    manifest = {
        "description": "EMT-labelled periodic metal cells: energy (eV), forces (eV/Å), stress (eV/Å³)",
        "method": "ase.calculators.emt.EMT", "seed": SEED, "metals": METALS, "lattices": LATTICES,
        "per_metal_and_lattice": PER,
        "versions": {"ase": metadata.version("ase"), "numpy": metadata.version("numpy"),
                     "python": platform.python_version()},
        "files": {"all": {"file": FILE, "sha256": sha256(path), "frames": len(frames),
                          "atoms_min": min(map(len, frames)), "atoms_max": max(map(len, frames)),
                          "splits": splits(len(frames), SEED)}},
    }
    with open(os.path.join(HERE, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)


if __name__ == "__main__":
    main()
