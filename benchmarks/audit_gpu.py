"""Batched audit throughput on a GPU (or the CPU): structures/s of ``geolie.audit`` against a batched energy+forces
of the same model, batch and device, measured in the same run.

Models: PyG SchNet (hidden 64, 3 interactions, geolie's neighbour search) and the bundled e3nn message-passing
potential. Data: ``aspirin`` (bundled GFN2-xTB frames, 21 atoms) and ``cu64`` (64-atom Cu fcc clusters cut from a
2x2x4 cubic cell with 0.05 Å random displacements: neither model reads periodic cells, so they are audited as
clusters). Both dtypes. Audits run with the default figures (six SE(3) generators of energy and forces, floors on the
default sample of 8 structures, finite companions with 4 rotations/translations/permutations, inversion, repeat),
batched by ``--batch-atoms`` (each budget a row). For each row: structures/s (median of ``--repeat`` timed audits
after a warm-up audit), the batched E+F rate of the same chunks, their ratio (the audit's cost in E+F-equivalents),
and the Lie-derivative method the audit chose at run time (``hvp-batched`` or ``hvp-loop``, measured per device,
dtype and size class). Writes ``benchmarks/results/audit_gpu[_cuda].json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

import geolie  # noqa: E402
from geolie.adapters import Structure, load_model  # noqa: E402


def cu64(n: int, seed: int = 0):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        at = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 4))
        at.pbc = False
        at.cell = None
        at.positions = at.positions + rng.normal(scale=0.05, size=at.positions.shape)
        out.append(at)
    return out


def data(name: str, n: int):
    if name == "aspirin":
        return geolie.data.load("xtb-md/aspirin", "all")[:n]
    if name == "cu64":
        return cu64(n)
    raise ValueError(name)


def ef_rate(pot, sts, batch_atoms, dtype, device) -> float:
    """Structures/s of one energy + forces evaluation over the audit's chunks (same batching)."""
    from geolie._audit import _chunks

    chunks = list(_chunks(list(enumerate(sts)), None, batch_atoms, pot))

    def run():
        for ch in chunks:
            ev = pot.batch_evaluation([s for _, s in ch], dtype) if len(ch) > 1 else pot.evaluation(ch[0][1], dtype)
            out = ev.fn(*ev.inputs)
            del out
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return len(sts) / timeit(run, warmup=2, repeat=5)["median_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["schnet", "e3nn"])
    ap.add_argument("--data", nargs="+", default=["aspirin", "cu64"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--batch-atoms", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--n", type=int, default=64, help="structures per timed audit")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.simplefilter("ignore")
    rows = []
    path = result_path("audit_gpu", args.device)
    for model in args.models:
        pot = load_model(model, device=args.device)
        for dname in args.data:
            mols = data(dname, args.n)
            sts = [Structure.from_atoms(a) for a in mols]
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                for budget in args.batch_atoms:
                    row = {"model": model, "data": dname, "atoms": len(mols[0]), "dtype": dt, "batch_atoms": budget,
                           "structures": len(mols)}
                    try:
                        geolie.audit(pot, mols[:8], dtype=dtype, progress=False, device=args.device,
                                     batch_atoms=budget)  # warm-up (and the run-time method choices)
                        res = {}

                        def run():
                            res["rep"] = geolie.audit(pot, mols, dtype=dtype, progress=False, device=args.device,
                                                      batch_atoms=budget)

                        t = timeit(run, warmup=0, repeat=args.repeat)
                        audit_rate = len(mols) / t["median_s"]
                        ef = ef_rate(pot, sts, budget, dtype, args.device)
                        rep = res["rep"]
                        row.update(audit_per_s=audit_rate, ef_per_s=ef, audit_over_ef=audit_rate / ef,
                                   ef_equivalents=ef / audit_rate,
                                   methods=sorted({r["method"] for r in rep.rows}),
                                   verdict=rep.verdict(), floor_rel_median={
                                       k: v["floor_rel_median"] for k, v in rep.aggregates().items()})
                    except Exception as e:  # noqa: BLE001 - recorded, the next configuration runs
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
                    write_json(path, {"benchmark": "audit_gpu", "env": device_info(args.device), "rows": rows})
    print("| model | data | dtype | batch atoms | audit /s | batched E+F /s | audit / E+F | method |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['data']} | {r['dtype']} | {r['batch_atoms']} | error: {r['error'][:60]} |||")
            continue
        print(f"| {r['model']} | {r['data']} | {r['dtype']} | {r['batch_atoms']} | {r['audit_per_s']:.1f} | "
              f"{r['ef_per_s']:.0f} | {r['audit_over_ef']:.3f} | {', '.join(r['methods'])} |")


if __name__ == "__main__":
    main()
