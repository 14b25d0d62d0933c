"""Audit throughput: structures per second for SchNet, an e3nn network and SevenNet-0 on molecules of 10-100 atoms.

For each model, size and dtype: ``geolie.audit`` with the six SE(3) Lie derivatives of energy and forces and their
float32/float64 noise floors (no finite checks), with and without layer-wise attribution; against a finite check
(8 Haar rotations of energy + forces per structure: ``geolie.finite_equivariance_error``). Reported: structures/s
and the median relative error each reaches on these exactly invariant models (its noise floor). Molecule-like
random clouds (density 0.1 / Å³, H C N O), 4 structures per size; SevenNet-0 (``pip install "geolie[sevenn]"``)
runs in float32 only (sizes 10 and 30; layer-wise at 10). ``--device cuda`` runs the models on a GPU. Writes
``benchmarks/results/audit[_cuda].json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from ase import Atoms

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, write_json  # noqa: E402
from lie_derivative import molecule_like  # noqa: E402

import geolie  # noqa: E402
from geolie.adapters import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["schnet", "e3nn", "sevenn-0"])
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for model in args.models:
        try:
            pot = load_model(model)
        except ValueError as e:  # an optional package that is not installed
            print(f"{model}: skipped ({e})", file=sys.stderr)
            continue
        pot.device = torch.device(args.device)
        # SevenNet-0 without a tensor-product accelerator is slow on 2 CPU cores: sizes 10 and 30, layer-wise at 10
        sizes = (10, 30) if model == "sevenn-0" else (10, 30, 100)
        for n in sizes:
            mols = []
            for s in range(4):
                z, pos = molecule_like(n, seed=100 * n + s, dtype=torch.float64)
                mols.append(Atoms(numbers=z.numpy(), positions=pos.numpy()))
            for dtype in pot.dtypes:
                row = {"model": model, "atoms": n, "dtype": str(dtype).replace("torch.", "")}
                geolie.audit(pot, mols[:1], dtype=dtype, n_finite=0, progress=False, device=args.device,
                             batch_size=1)  # warm-up
                for lw in (False, True):
                    if lw and model == "sevenn-0" and n > 10:
                        row["layerwise_structures_per_s"] = float("nan")
                        continue
                    t = time.perf_counter()
                    # one structure per call, floors on every structure: the per-structure cost (batched
                    # audits are measured in benchmarks/audit_scale.py)
                    rep = geolie.audit(pot, mols, dtype=dtype, n_finite=0, layerwise=lw, progress=False,
                                       device=args.device, batch_size=1, floor_sample=None)
                    dt = time.perf_counter() - t
                    key = "layerwise" if lw else "lie"
                    row[f"{key}_structures_per_s"] = len(mols) / dt
                    if not lw:
                        row["lie_median_rel_forces"] = float(np.median(rep.values("forces", "rel")))
                        row["lie_median_floor_rel_forces"] = float(np.median(rep.values("forces", "floor_rel")))
                t = time.perf_counter()
                errs = []
                for at in mols:
                    ev = pot.evaluation(geolie.adapters.Structure.from_atoms(at), dtype)
                    fin = geolie.finite_equivariance_error(ev, n=8)
                    errs.append(fin.errors["forces"]["rotation"]["max_rel"])
                row["finite_structures_per_s"] = len(mols) / (time.perf_counter() - t)
                row["finite_median_rel_forces"] = float(np.median(errs))
                rows.append(row)
                print(row, file=sys.stderr)
    write_json(result_path("audit", args.device), {"benchmark": "audit", "env": device_info(args.device), "rows": rows})
    print("| model | atoms | dtype | audit (structures/s) | + layer-wise | finite, 8 rotations | Lie rel. (floor) | "
          "finite rel. |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['atoms']} | {r['dtype']} | {r['lie_structures_per_s']:.2f} | "
              f"{r['layerwise_structures_per_s']:.2f} | {r['finite_structures_per_s']:.2f} | "
              f"{r['lie_median_rel_forces']:.1e} ({r['lie_median_floor_rel_forces']:.1e}) | "
              f"{r['finite_median_rel_forces']:.1e} |")


if __name__ == "__main__":
    main()
