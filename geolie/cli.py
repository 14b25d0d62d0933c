"""The ``geolie`` command line: ``geolie demo``, ``geolie audit``, ``geolie merge`` and ``geolie models``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional


def _audit_parser(sub):
    a = sub.add_parser("audit", help="audit a model's equivariance on structures; write report.json, a CSV, plots")
    a.add_argument("--model", required=True,
                   help="short name (pair-mlp, e3nn, gaunt, cartesian-mlp, schnet, emt, ...; see geolie models), a "
                        "potential package's model file (mace:PATH, nequip:PATH, orb:ARCH:WEIGHTS or orb:PATH, "
                        "fairchem:[TASK:]PATH, mattersim:PATH) "
                        "or package.module:factory returning an nn.Module or an ASE Calculator; torchsim:pkg.module:"
                        "factory for a TorchSim ModelInterface. Loading is executing: files that hold pickled modules "
                        "(mace:, fairchem:, mattersim:, orb:PATH) run code from the file when loaded, as do "
                        "package.module specs; open only files you trust (orb:ARCH:WEIGHTS state dicts are checked "
                        "without unpickling code)")
    a.add_argument("--data", required=True,
                   help="a file ase.io reads, or a bundled dataset with optional split (xtb-md/aspirin:test, "
                        "emt-bulk:test)")
    a.add_argument("--out", required=True, help="output folder (results are appended as they are computed)")
    a.add_argument("--group", default="SE3", choices=["SO3", "SE3"])
    a.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    a.add_argument("--layerwise", action="store_true", help="layer-wise attribution of the energy's Lie derivative")
    a.add_argument("--n-finite", type=int, default=4, help="finite Haar rotations/translations per structure (with one permutation, the inversion, a repeat)")
    a.add_argument("--limit", type=int, default=None, help="audit only the first N structures")
    a.add_argument("--batch-size", type=int, default=None,
                   help="molecules per call (default: batched by --batch-atoms where the model can batch; 1: none)")
    a.add_argument("--batch-atoms", type=int, default=512,
                   help="atom budget of one batched call (default 512); per-structure results do not depend on it")
    a.add_argument("--device", default=None, help="where torch models run: cpu (default), cuda, cuda:1, ...")
    a.add_argument("--hunt", action="store_true",
                   help="also search each structure for the orientation where the model breaks worst (geolie.hunt; "
                        "rotated structures written to OUT/hunt/)")
    a.add_argument("--shard", default=None,
                   help="audit one shard: I/N (I from 0; balanced by atom count) or 'slurm' (I and N from a Slurm "
                        "array job); results go to OUT/shard-I-of-N, combine them with geolie merge OUT --out DIR")
    a.add_argument("--floor-sample", type=int, default=8,
                   help="measure the noise floor on this many structures spread over the data and reuse it "
                        "(default 8); 0: on every structure")
    a.add_argument("--estimator", default="exact", choices=["exact", "random"],
                   help="exact: every generator (default); random: one random rotation axis (and translation "
                        "direction) per structure, unbiased for the isotropic norm, with its standard error")
    a.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out")
    a.add_argument("--fail-above", type=float, default=None,
                   help="exit with status 1 when any figure the run computed BREAKS: above its noise floor and above "
                        "this threshold (Lie derivatives, finite checks, the hunt; see --gate); each failing figure is "
                        "named")
    a.add_argument("--gate", default="lie,finite,hunt",
                   help="which figures --fail-above gates, comma-separated among lie, finite, hunt, inversion "
                        "(default: lie,finite,hunt; inversion, parity, is not part of SO(3)/SE(3) and is gated only "
                        "when named)")
    a.add_argument("--metric", default="rel", choices=["rel", "abs", "per_atom"],
                   help="the Lie derivatives' figure compared with --fail-above (finite and hunt errors are relative)")
    a.add_argument("--output", default=None, help="gate on this output only (energy, forces, stress, output)")
    a.add_argument("--out-rep", default="scalar",
                   help="for point-cloud models (forward(pos)): the output's representation (scalar, vector, point, "
                        "an e3nn irreps string); default scalar (invariant logits)")
    a.add_argument("--profile", action="store_true",
                   help="print where the audit's time went (base evaluation, tangents, adjoint test, floors, finite "
                        "companions, hunt, I/O) in seconds and in E+F-equivalents per structure, against one batched "
                        "energy+forces call timed in the same run (also in report.json's cost)")
    a.add_argument("--per-atom", action="store_true", help="for point-cloud models: the output has one row per point (atom)")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    # package.module:factory specs resolve against the current directory too, as with python -m
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = argparse.ArgumentParser(prog="geolie", description="Measure how equivariant a model is (Lie derivatives "
                                     "under SO(3)/SE(3)).")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="audit bundled equivariant and non-equivariant models on bundled molecules "
                          "(no download)")
    demo.add_argument("--out", default=None, help="also write each audit's report and plots here")
    demo.add_argument("--structures", type=int, default=3, help="structures per molecule and per crystal set (default 3)")
    _audit_parser(sub)
    m = sub.add_parser("merge", help="combine audit output folders (shards) into one report")
    m.add_argument("folders", nargs="+", help="audit output folders, or folders holding shard-I-of-N subfolders")
    m.add_argument("--out", required=True, help="where the merged results, report.json and plots go")
    m.add_argument("--allow-partial", action="store_true", help="merge even when some structures are in no folder")
    ms = sub.add_parser("models", help="list the model short names and file prefixes, the extra each needs, and "
                        "which import now")
    ms.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "models":
        return _list_models(args.json)
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(n_structures=args.structures, out_dir=args.out)
        return 0
    if args.command == "audit":
        return _run_audit(args, parser)
    if args.command == "merge":
        from ._report import merge

        try:
            report = merge(args.folders, out_dir=args.out, allow_partial=args.allow_partial)
        except (ValueError, FileNotFoundError) as e:
            print(f"geolie merge: error: {e}", file=sys.stderr)
            return 2
        print(report.table())
        print(f"\nmerged {len(report.rows)} structure(s) into {args.out}")
        return 0
    parser.print_help()
    return 0


def _list_models(as_json: bool) -> int:
    from .adapters._registry import available_models

    rows = available_models()
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"{'model':<{w}}  {'kind':<10}  {'extra':<13}  importable  what")
    for r in rows:
        extra = f"[{r['extra']}]" if r["extra"] else "-"
        ok = "yes" if r["importable"] else "no"
        print(f"{r['name']:<{w}}  {r['kind']:<10}  {extra:<13}  {ok:<10}  {r['what']}")
    from .adapters._registry import install_hint

    print("\nloading is executing: model files that hold pickled modules (mace:, fairchem:, mattersim:, orb:PATH) "
          "run code from the file when geolie loads them; open only files you trust. orb:ARCH:WEIGHTS state dicts "
          "are checked with torch.load(weights_only=True) first.")
    print("\ninstall an extra, in a clone of geolie:")
    for extra in sorted({r["extra"] for r in rows if r["extra"]}):
        print(f"  {extra:<10} {install_hint(extra).split(' (')[0]}")
    return 0


def _run_audit(args, parser) -> int:
    import torch

    from ._audit import audit
    from ._report import write_report

    from .adapters import load_model

    shard, out = None, args.out
    dist = _torchrun()
    if dist is not None:
        if args.shard is not None:
            print("geolie audit: error: under torchrun each rank takes its own shard: drop --shard", file=sys.stderr)
            return 2
        return _run_audit_distributed(args, dist)
    figures = _gate_figures(args.gate)
    if figures is None:
        return 2
    try:
        if args.shard is not None:
            from ._store import parse_shard

            shard = parse_shard(args.shard)
            out = os.path.join(args.out, f"shard-{shard[0]}-of-{shard[1]}")
        model = load_model(args.model, out_rep=args.out_rep, per_atom=args.per_atom)
        report = audit(model, args.data, group=args.group, dtype=getattr(torch, args.dtype),
                       layerwise=args.layerwise, n_finite=args.n_finite, out_dir=out, resume=args.resume,
                       limit=args.limit, device=args.device, batch_size=args.batch_size, batch_atoms=args.batch_atoms,
                       hunt=args.hunt, shard=shard, estimator=args.estimator, floor_sample=args.floor_sample,
                       threshold=args.fail_above, profile=args.profile)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"geolie audit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_saved(out)} structures saved in {out}; rerun with --resume", file=sys.stderr)
        return 130
    t0 = time.perf_counter()
    files = write_report(report, out)
    print(report.table())
    if args.profile:
        from ._cost import table

        print("\n" + table(report.cost) + f"\n  (then report.json, report.html and plots: {time.perf_counter() - t0:.2f} s)")
    print(f"\nwritten: {', '.join(os.path.relpath(f) for f in files + [os.path.join(out, 'structures.csv')])}")
    with open(os.path.join(out, "command.json"), "w") as fh:
        json.dump(vars(args), fh, indent=1)
    if args.fail_above is not None:
        return _gate(report, args, figures)
    return 0


def _gate_figures(spec: str) -> Optional[List[str]]:
    from ._verdict import FIGURES

    figures = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in figures if f not in FIGURES]
    if bad or not figures:
        print(f"geolie audit: error: --gate {spec!r}: choose among {', '.join(FIGURES)}", file=sys.stderr)
        return None
    return figures


def _saved(folder: str) -> int:
    from ._store import RowFile

    path = os.path.join(folder, "results.jsonl")
    return len(RowFile.scan(path)) if os.path.exists(path) else 0


def _gate(report, args, figures) -> int:
    """``--fail-above``: status 1 when a gated figure BREAKS (:func:`geolie._verdict.gate`), each named."""
    from ._verdict import gate

    outputs = [args.output] if args.output else None
    fails = gate(report.rows, args.fail_above, figures, outputs, args.metric, report.generator_names)
    what = f"{'/'.join(figures)} figures" + (f" of {args.output}" if args.output else "")
    floor = max((a.get("floor_rel_median") or 0.0) for a in report.aggregates().values()) if report.outputs else 0.0
    if floor > args.fail_above:
        print(f"note: the median noise floor ({floor:.1e}) is above --fail-above {args.fail_above:.1e}: figures below "
              f"the floor cannot be resolved in {report.dtype}")
    if fails:
        print(f"FAIL: {len(fails)} {what} break (above their floor and above {args.fail_above:.1e}):")
        for f in fails[:20]:
            print(f"  {f.line(args.fail_above)}")
        if len(fails) > 20:
            print(f"  ... and {len(fails) - 20} more")
        return 1
    print(f"PASS: no {what} above its floor and above {args.fail_above:.1e}")
    return 0


def _torchrun():
    """``(rank, world_size, local_rank)`` when started by ``torchrun`` with more than one process, else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _run_audit_distributed(args, dist) -> int:
    """``torchrun --nproc-per-node K geolie audit ...``: rank ``r`` audits shard ``r/K`` into ``OUT/shard-r-of-K``
    (resumable as any shard), all ranks meet at a barrier (``gloo`` on CPU, ``nccl`` on GPUs, each rank on GPU
    ``LOCAL_RANK``), and rank 0 merges the shards into ``OUT`` (the same files as one process over everything)."""
    from datetime import timedelta

    import torch
    import torch.distributed as td

    from ._audit import audit
    from ._report import merge, write_report
    from .adapters import load_model

    rank, world, local = dist
    device = args.device
    if device in ("cuda", "gpu"):
        device = f"cuda:{local}"
    backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(device.split(":")[1]))
    # the barrier waits for the slowest shard: a long audit must not time out there
    td.init_process_group(backend, timeout=timedelta(days=7))
    status = 0
    try:
        out = os.path.join(args.out, f"shard-{rank}-of-{world}")
        try:
            model = load_model(args.model, out_rep=args.out_rep, per_atom=args.per_atom)
            report = audit(model, args.data, group=args.group, dtype=getattr(torch, args.dtype),
                           layerwise=args.layerwise, n_finite=args.n_finite, out_dir=out, resume=args.resume,
                           limit=args.limit, device=device, batch_size=args.batch_size,
                           batch_atoms=args.batch_atoms, hunt=args.hunt, shard=(rank, world),
                           estimator=args.estimator, floor_sample=args.floor_sample, progress=rank == 0,
                           threshold=args.fail_above)
            write_report(report, out)
        except (ValueError, TypeError, FileNotFoundError) as e:
            print(f"geolie audit (rank {rank}): error: {e}", file=sys.stderr)
            status = 2
        flag = torch.tensor([status], device=device if backend == "nccl" else "cpu")
        td.all_reduce(flag, op=td.ReduceOp.MAX)  # also the barrier: every shard is finished
        if int(flag) != 0:
            return 2
        if rank == 0:
            merged = merge([os.path.join(args.out, f"shard-{r}-of-{world}") for r in range(world)], out_dir=args.out)
            print(merged.table())
            print(f"\nmerged {world} shards into {args.out}")
            with open(os.path.join(args.out, "command.json"), "w") as fh:
                json.dump(dict(vars(args), torchrun_world_size=world), fh, indent=1)
            if args.fail_above is not None:
                status = _gate(merged, args, _gate_figures(args.gate) or ["lie", "finite", "hunt"])
        flag = torch.tensor([status], device=device if backend == "nccl" else "cpu")
        td.broadcast(flag, src=0)  # every rank exits with the gate's verdict
        return int(flag)
    finally:
        td.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
