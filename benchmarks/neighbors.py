"""Neighbour lists: ``geolie.neighbors.neighbor_list`` with vesin (its CPU default) and with geolie's own cell list,
against ASE's ``neighbor_list`` (the reference), measured in the same run (the three find the same pairs, tested).

Uniform random points at atomic density 0.1 Å⁻³, cutoff 5 Å, open and periodic (cubic box), N = 10³ … 10⁵;
warm-up 1, median of 3 (ASE: 1 run above 10⁴ atoms, it takes tens of seconds). CPU, float64. Writes
``benchmarks/results/neighbors.json`` and prints a Markdown table.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

from geolie.neighbors import neighbor_list  # noqa: E402


def main():
    from ase import Atoms
    from ase.neighborlist import neighbor_list as ase_nl

    rows = []
    rng = np.random.default_rng(0)
    for n in (1000, 10000, 100000):
        L = (n / 0.1) ** (1 / 3)
        x = rng.uniform(0, L, (n, 3))
        for periodic in (False, True):
            cell = torch.eye(3, dtype=torch.float64) * L if periodic else None
            pos = torch.tensor(x)
            pairs = int(neighbor_list(pos, 5.0, cell=cell)[0].numel())
            ours = timeit(lambda: neighbor_list(pos, 5.0, cell=cell, backend="geolie"), warmup=1, repeat=3)
            ves = timeit(lambda: neighbor_list(pos, 5.0, cell=cell, backend="vesin"), warmup=1, repeat=3)
            atoms = Atoms(numbers=np.ones(n, int), positions=x, cell=np.eye(3) * L,  # ASE bins by the cell
                          pbc=periodic)
            ref = timeit(lambda: ase_nl("ij", atoms, 5.0), warmup=0, repeat=1 if n > 10000 else 3)
            rows.append({"atoms": n, "periodic": periodic, "pairs": pairs, "geolie_s": ours["median_s"],
                         "vesin_s": ves["median_s"], "ase_s": ref["median_s"],
                         "speedup_vs_ase": ref["median_s"] / ours["median_s"],
                         "vesin_speedup_vs_geolie": ours["median_s"] / ves["median_s"]})
            print(rows[-1], file=sys.stderr)
    write_json(result_path("neighbors"), {"benchmark": "neighbors", "env": device_info("cpu"), "rows": rows})
    print("| atoms | periodic | pairs | vesin (s) | geolie cell list (s) | ASE (s) | vesin vs geolie |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['atoms']} | {'yes' if r['periodic'] else 'no'} | {r['pairs']} | {r['vesin_s']:.3f} | "
              f"{r['geolie_s']:.3f} | {r['ase_s']:.3f} | {r['vesin_speedup_vs_geolie']:.1f}x |")


if __name__ == "__main__":
    main()
