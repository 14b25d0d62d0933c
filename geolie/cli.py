"""The ``geolie`` command line: ``geolie demo``, ``geolie audit``, ``geolie merge`` and ``geolie models``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _audit_parser(sub):
    a = sub.add_parser("audit", help="audit a model's equivariance on structures; write report.json, a CSV, plots")
    a.add_argument("--model", required=True,
                   help="short name (pair-mlp, e3nn, gaunt, cartesian-mlp, schnet, emt, ...; see geolie models), a "
                        "potential package's model file (mace:PATH, nequip:PATH, orb:ARCH:WEIGHTS or orb:PATH, "
                        "fairchem:[TASK:]PATH, mattersim:PATH) "
                        "or package.module:factory returning an nn.Module or an ASE Calculator")
    a.add_argument("--data", required=True,
                   help="a file ase.io reads, or a bundled dataset with optional split (xtb-md/aspirin:test, "
                        "emt-bulk:test)")
    a.add_argument("--out", required=True, help="output folder (results are appended as they are computed)")
    a.add_argument("--group", default="SE3", choices=["SO3", "SE3"])
    a.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    a.add_argument("--layerwise", action="store_true", help="layer-wise attribution of the energy's Lie derivative")
    a.add_argument("--n-finite", type=int, default=4, help="finite Haar rotations/translations per structure")
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
                   help="exit with status 1 when the metric (max over structures and generators) exceeds this")
    a.add_argument("--metric", default="rel", choices=["rel", "abs", "per_atom"])
    a.add_argument("--output", default=None, help="gate on this output only (energy, forces, stress, output)")
    a.add_argument("--out-rep", default="scalar",
                   help="for point-cloud models (forward(pos)): the output's representation (scalar, vector, point, "
                        "an e3nn irreps string); default scalar (invariant logits)")
    a.add_argument("--per-atom", action="store_true", help="for point-cloud models: the output has one row per point (atom)")
    return a


def main(argv: Optional[List[str]] = None) -> int:
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
    print("\ninstall an extra with: pip install 'geolie[EXTRA]' (then, without their pins: mace: pip install "
          "--no-deps mace-torch==0.3.16; mattersim: pip install --no-deps mattersim==1.2.3)")
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
    try:
        if args.shard is not None:
            from ._store import parse_shard

            shard = parse_shard(args.shard)
            out = os.path.join(args.out, f"shard-{shard[0]}-of-{shard[1]}")
        model = load_model(args.model, out_rep=args.out_rep, per_atom=args.per_atom)
        report = audit(model, args.data, group=args.group, dtype=getattr(torch, args.dtype),
                       layerwise=args.layerwise, n_finite=args.n_finite, out_dir=out, resume=args.resume,
                       limit=args.limit, device=args.device, batch_size=args.batch_size, batch_atoms=args.batch_atoms,
                       hunt=args.hunt, shard=shard, estimator=args.estimator, floor_sample=args.floor_sample)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"geolie audit: error: {e}", file=sys.stderr)
        return 2
    files = write_report(report, out)
    print(report.table())
    print(f"\nwritten: {', '.join(os.path.relpath(f) for f in files + [os.path.join(out, 'structures.csv')])}")
    if args.fail_above is not None:
        value = report.metric(args.output, args.metric)
        what = f"max {args.metric} Lie derivative" + (f" of {args.output}" if args.output else "")
        if value > args.fail_above:
            print(f"FAIL: {what} = {value:.3e} > {args.fail_above:.3e}")
            return 1
        print(f"PASS: {what} = {value:.3e} <= {args.fail_above:.3e}")
    with open(os.path.join(out, "command.json"), "w") as fh:
        json.dump(vars(args), fh, indent=1)
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
                           estimator=args.estimator, floor_sample=args.floor_sample, progress=rank == 0)
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
            if args.fail_above is not None and merged.metric(args.output, args.metric) > args.fail_above:
                status = 1
        flag = torch.tensor([status], device=device if backend == "nccl" else "cpu")
        td.broadcast(flag, src=0)  # every rank exits with the gate's verdict
        return int(flag)
    finally:
        td.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
