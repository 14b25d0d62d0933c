"""``geolie demo``: audits of bundled models on bundled molecules (no download).

Models: ``pair-mlp`` (exactly invariant pair potential), ``e3nn`` (e3nn message passing), ``gaunt`` (Gaunt grid
tensor products), ``schnet`` (PyG's SchNet on geolie's neighbour list) and ``cartesian-mlp`` (reads Cartesian
displacement components: breaks rotations on purpose), and the pretrained ANI-1x ensemble, SevenNet-0 and CHGNet
(float32) when ``torchani`` / ``sevenn`` / ``chgnet`` are installed, each on a few GFN2-xTB frames of ethanol and aspirin from ``datasets/xtb-md``, in float64 with float32
noise floors; then ASE's EMT on bundled metal cells (finite differences, with their error estimate as the floor).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np
import torch

MODELS = ("pair-mlp", "e3nn", "gaunt", "schnet", "cartesian-mlp")
#: the demo's threshold: a figure above its floor and above this relative size BREAKS (geolie._verdict)
THRESHOLD = 1e-6


def run_demo(n_structures: int = 3, out_dir: Optional[str] = None, stream=None):
    from ._audit import audit
    from ._report import write_report
    from .data import load

    stream = stream or sys.stdout
    torch.backends.cuda.matmul.allow_tf32 = False
    mols = load("xtb-md/ethanol", "test")[:n_structures] + load("xtb-md/aspirin", "test")[:n_structures]
    cells = load("emt-bulk", "test")[:n_structures]
    reports = {}
    for name in MODELS:
        reports[name] = audit(name, mols, dtype=torch.float64, n_finite=2, threshold=THRESHOLD)
    notes = []
    for name, dtype in (("ani1x", torch.float64), ("sevenn-0", torch.float32), ("chgnet", torch.float32)):
        try:  # pretrained potentials, when their optional packages are installed
            reports[name] = audit(name, mols, dtype=dtype, n_finite=2, threshold=THRESHOLD)
        except ValueError as e:
            notes.append(f"{name} skipped: {e}")
    reports["emt"] = audit("emt", cells, dtype=torch.float64, n_finite=2, threshold=THRESHOLD)
    print("\ngeolie demo: max over structures of the relative Lie derivative ‖L_X y‖/‖y‖ (float64; sevenn-0 and chgnet float32), "
          "its noise floor "
          "(float32 vs float64, or the finite-difference error), the worst finite-rotation error, and the verdict of "
          f"all its figures (Lie and finite; BREAKS: above the floor and above {THRESHOLD:g})", file=stream)
    gens = ["rx", "ry", "rz", "tx", "ty", "tz"]
    head = f"  {'model':<15}{'output':<13}" + "".join(f"{g:>9}" for g in gens) + f"{'floor':>9}{'finite':>9}  verdict"
    print(head + "\n  " + "-" * (len(head) - 2), file=stream)
    for name, rep in reports.items():
        for out in rep.outputs:
            rel = rep.values(out, "rel")
            fl = rep.values(out, "floor_rel")
            fin = max(r["finite"][out]["rotation"] for r in rep.rows)
            verdict = rep.verdicts().get(out, {}).get("overall", "")
            print(f"  {name:<15}{out:<13}" + "".join(f"{rel[:, k].max():>9.1e}" for k in range(len(gens)))
                  + f"{np.nanmax(fl):>9.1e}{fin:>9.1e}  {verdict}", file=stream)
        if out_dir:
            write_report(rep, os.path.join(out_dir, name))
    for n in notes:
        print(f"\n{n}", file=stream)
    if out_dir:
        print(f"\nreports and plots written under {out_dir}/", file=stream)
    return reports
