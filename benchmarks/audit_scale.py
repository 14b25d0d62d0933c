"""Audit at dataset scale: structures per second of ``geolie.audit`` on bundled aspirin frames (21 atoms), by mode.

Model: PyG SchNet (hidden 64, 3 interactions; geolie's neighbour search), float64. Modes, all in one run so that the
ratios compare like with like:

* ``one per call``: ``batch_size=1``, default figures (six SE(3) generators of energy and forces, float32 floors,
  finite companions with 4 rotations/translations/permutations, inversion, repeat) — the old default;
* ``batched (B atoms)``: the default since issue 12, consecutive molecules up to ``batch_atoms`` per call, same
  figures, for several budgets (scaling with batch size);
* ``batched, no finite``: the Lie derivatives and floors only;
* ``random estimator``: one random rotation axis and translation direction per structure, with floors and finite
  companions;
* ``random, no finite``.

For each mode: structures/s (median of ``--repeat`` runs after a warm-up) and the cost per structure as a multiple
of one energy + forces evaluation of the same batch (measured in the same run). ``--processes`` adds one process
with 1 and 2 threads against ``torchrun --nproc-per-node 2`` (1 thread each, gloo) on ``--n-large`` structures,
wall time including start-up and merge. ``--against REF`` times the default, the random-no-finite and the one-per-call
modes with geolie at git revision ``REF`` and at the working tree, alternating A/B runs in fresh processes (median of
``--repeat`` each): the before/after of a change, measured in one run. ``--account`` prints the cost account
(:mod:`geolie._cost`, ``profile=True``) of the default, the random-no-finite and the hunted audits: per part, E+F-
equivalents per structure against one batched E+F call timed in the same run (median of ``--repeat``), and of the
default with ``n_finite`` 2 and 1. Writes
``benchmarks/results/audit_scale[_cuda].json`` (``audit_scale_ab.json`` for ``--against``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

import geolie  # noqa: E402
from geolie.adapters import Structure, load_model  # noqa: E402


def _ef_per_structure(pot, sts, batch_atoms, dtype, device) -> float:
    """Seconds per structure of one energy + forces evaluation, batched as the audit batches."""
    from audit_gpu import ef_rate

    return 1.0 / ef_rate(pot, sts, batch_atoms, dtype, device)


_AB_CODE = """
import sys, time, json, torch, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import geolie
from geolie.adapters import load_model
kw = json.loads(sys.argv[3]); n = int(sys.argv[2])
mols = geolie.data.load("xtb-md/aspirin", "all")[:n]
pot = load_model("schnet")
geolie.audit(pot, mols[:8], dtype=torch.float64, progress=False)
t = time.perf_counter()
geolie.audit(pot, mols, dtype=torch.float64, progress=False, **kw)
print(json.dumps({"geolie": geolie.__file__, "structures_per_s": n / (time.perf_counter() - t)}))
"""


def _ab(ref: str, n: int, repeat: int):
    """Before/after: structures/s of three modes at git revision ``ref`` and at the working tree, A/B alternating in
    fresh processes (each: import, warm-up on 8 structures, one timed audit of ``n``)."""
    import json
    import statistics

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp()
    old = os.path.join(tmp, "before")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", old, ref], check=True, capture_output=True)
    modes = [("batched (512), default figures", {}), ("random, no finite (512)", {"estimator": "random", "n_finite": 0}),
             ("one per call", {"batch_size": 1})]
    rows = []
    try:
        for name, kw in modes:
            got = {"before": [], "after": []}
            for _ in range(repeat):
                for label, tree in (("before", old), ("after", root)):
                    res = subprocess.run([sys.executable, "-c", _AB_CODE, tree, str(n), json.dumps(kw)],
                                         capture_output=True, text=True, check=True)
                    out = json.loads(res.stdout.strip().splitlines()[-1])
                    assert out["geolie"].startswith(tree), out  # the tree asked for, not an installed copy
                    got[label].append(out["structures_per_s"])
            row = {"mode": name, **kw, "before_per_s": statistics.median(got["before"]),
                   "after_per_s": statistics.median(got["after"]), "runs": got}
            row["after_over_before"] = row["after_per_s"] / row["before_per_s"]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", old], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(result_path("audit_scale_ab", "cpu"), {"benchmark": "audit_scale_ab", "env": device_info("cpu"),
                                                        "before": ref, "model": "schnet", "dtype": "float64",
                                                        "structures": n, "repeat": repeat, "rows": rows})
    print(f"| mode | before ({ref}) /s | after /s | after / before |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['before_per_s']:.1f} | {r['after_per_s']:.1f} | {r['after_over_before']:.2f} |")


def _accounts(n: int, repeat: int, device: str):
    """Per mode, the median over ``repeat`` runs of each part's E+F-equivalents per structure (geolie._cost)."""
    import statistics

    mols = geolie.data.load("xtb-md/aspirin", "all")[:n]
    pot = load_model("schnet", device=device)
    # n_finite 2 and 1: what the default would cost with fewer finite rotations and translations per structure (the
    # sensitivity the ≤ 15 target would trade; see docs/src/benchmarks.md)
    modes = [("default", dict(), mols), ("n_finite 2", dict(n_finite=2), mols), ("n_finite 1", dict(n_finite=1), mols),
             ("random, no finite", dict(estimator="random", n_finite=0), mols),
             ("hunt (4 structures)", dict(hunt=True), mols[:4])]
    geolie.audit(pot, mols[:8], progress=False, device=device)  # warm-up
    out = {}
    for name, kw, data in modes:
        runs = [geolie.audit(pot, data, progress=False, device=device, profile=True, **kw).cost for _ in range(repeat)]
        parts = sorted({p for r in runs for p in r["parts"]})
        out[name] = {"total": statistics.median(r["ef_equivalents_per_structure"] for r in runs),
                     "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
                     "ef_ms_per_structure": 1e3 * statistics.median(r["ef_seconds_per_structure"] for r in runs),
                     "parts": {p: statistics.median(r["parts"].get(p, {}).get("ef_equivalents_per_structure", 0.0)
                                                    for r in runs) for p in parts}}
        print(name, out[name], file=sys.stderr, flush=True)
    write_json(result_path("audit_account", device), {"benchmark": "audit_account", "env": device_info(device),
                                                      "model": "schnet", "dtype": "float64", "structures": n,
                                                      "repeat": repeat, "modes": out})
    names = list(out)
    parts = sorted({p for m in out.values() for p in m["parts"]}, key=lambda p: -out[names[0]]["parts"].get(p, 0.0))
    print("| part (E+F-equivalents per structure) | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for p in parts:
        print(f"| {p} | " + " | ".join(f"{out[m]['parts'].get(p, 0.0):.2f}" for m in names) + " |")
    print("| **total** | " + " | ".join(f"**{out[m]['total']:.1f}**" for m in names) + " |")
    print("| one E+F call, ms per structure | " + " | ".join(f"{out[m]['ef_ms_per_structure']:.2f}" for m in names)
          + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=100, help="structures per timed audit")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--processes", action="store_true", help="also time one process against torchrun with two")
    ap.add_argument("--n-large", type=int, default=2400, help="structures of the process runs (frames cycled)")
    ap.add_argument("--account", action="store_true", help="the cost account per part, by mode, then stop")
    ap.add_argument("--against", default=None, metavar="REF",
                    help="before/after: time three modes at git revision REF and at the working tree (CPU)")
    args = ap.parse_args(argv)
    if args.against:
        return _ab(args.against, args.n, args.repeat)
    if args.account:
        return _accounts(args.n, args.repeat, args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float64
    frames = geolie.data.load("xtb-md/aspirin", "all")
    mols = frames[:args.n]
    pot = load_model("schnet", device=args.device)
    sts = [Structure.from_atoms(a) for a in mols]
    modes = [("one per call", dict(batch_size=1))]
    modes += [(f"batched ({b} atoms)", dict(batch_atoms=b)) for b in args.budgets]
    modes += [("batched (512), no finite", dict(batch_atoms=512, n_finite=0)),
              ("random estimator (512)", dict(batch_atoms=512, estimator="random")),
              ("random, no finite (512)", dict(batch_atoms=512, estimator="random", n_finite=0))]
    rows = []
    geolie.audit(pot, mols[:8], dtype=dtype, progress=False, device=args.device)  # warm-up
    for name, kw in modes:
        t = timeit(lambda: geolie.audit(pot, mols, dtype=dtype, progress=False, device=args.device, **kw),
                   warmup=0, repeat=args.repeat)
        per = t["median_s"] / len(mols)
        ef = _ef_per_structure(pot, sts, 1 if kw.get("batch_size") == 1 else kw.get("batch_atoms", 512), dtype,
                               args.device)
        row = {"mode": name, **{k: v for k, v in kw.items()}, "structures_per_s": 1.0 / per,
               "cost_x_energy_forces": per / ef, "energy_forces_per_s": 1.0 / ef}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    procs = []
    if args.processes:
        big = [frames[k % len(frames)] for k in range(args.n_large)]  # cycled past the bundled frames
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "big.extxyz")
        import ase.io

        ase.io.write(path, big)
        base = [sys.executable, "-m", "geolie.cli", "audit", "--model", "schnet", "--data", path, "--n-finite", "4",
                "--device", args.device]
        runs = [("1 process, 1 thread", base, "1"), ("1 process, 2 threads", base, "2"),
                ("torchrun, 2 processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", "2"] + base[1:], "1")]
        for name, cmd, threads in runs:
            out = os.path.join(tmp, "out")
            shutil.rmtree(out, ignore_errors=True)
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            t0 = time.perf_counter()
            res = subprocess.run(cmd + ["--out", out], env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if res.returncode != 0:
                raise RuntimeError(f"{name} failed: {res.stderr[-2000:]}")
            procs.append({"run": name, "structures": len(big), "seconds": dt, "structures_per_s": len(big) / dt})
            print(procs[-1], file=sys.stderr, flush=True)
        for p in procs:
            p["speedup_vs_1_process_1_thread"] = procs[0]["seconds"] / p["seconds"]
            p["speedup_vs_1_process_2_threads"] = procs[1]["seconds"] / p["seconds"]
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(result_path("audit_scale", args.device),
               {"benchmark": "audit_scale", "env": device_info(args.device), "model": "schnet", "dtype": "float64",
                "structures": len(mols), "atoms": 21, "rows": rows, "processes": procs})
    print("| mode | structures/s | audit cost (x one E+F of the same batch) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['structures_per_s']:.1f} | {r['cost_x_energy_forces']:.1f} |")
    if procs:
        print("\n| processes | structures/s | speed-up vs 1 process 1 thread | vs 1 process 2 threads |\n|---|---|---|---|")
        for p in procs:
            print(f"| {p['run']} | {p['structures_per_s']:.1f} | {p['speedup_vs_1_process_1_thread']:.2f} | "
                  f"{p['speedup_vs_1_process_2_threads']:.2f} |")


if __name__ == "__main__":
    main()
