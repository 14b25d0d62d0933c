r"""The learned-equivariance study: Gruver et al.'s question in 3D (``python benchmarks/study/run.py [--quick]``).

Do models that are not built equivariant learn to be, and what buys it: size, accuracy, augmentation, a
Lie-derivative penalty, Orb's equigrad, or the architecture? Every run of the configuration is trained
(:mod:`train`), measured and written to ``OUT/runs/<name>/result.json``; a run whose result exists is skipped, so
the study resumes where it stopped (``--fresh`` starts over), and several processes may share one configuration
(each run is claimed by one process). When the runs are done (or with ``--analyse-only``), :mod:`analysis` writes
``OUT/results.json``, ``OUT/table.md``, ``OUT/findings.md`` and the plots; :mod:`side` adds fairchem's eSCN-MD and
the pretrained potentials.

Design. A configuration is (molecule, family, width, recipe), trained from three seeds (model initialisation and
batch order). Data: ``xtb-md`` trajectories split by time (:data:`study_stats.TIME_SPLITS`: train on the first 6 ps
at 500 K, stop early on frames 620-719, test on the last 2 ps) and the 300 K trajectory as the shift split. Training
runs to convergence on the validation split (learning rate halved on a plateau, stopped after five evaluations
without improvement, best weights restored) with a step cap. Families (``kind``):

* unconstrained: ``mpnn`` (message passing on raw edge vectors) on aspirin at four widths × ``plain``/``augment``
  and three widths (8, 16, 32) × ``penalty``/``equigrad``; on ethanol and uracil at two widths × ``plain``/``augment``
  and width 16 × ``penalty``; ``reltransformer`` (tokens from relative geometry, attention biased by distances);
  the aliasing family ``vector-pointwise`` and ``vector-gated`` (vector hidden features with a per-component SiLU or
  a norm gate), ``plain`` and ``augment``;
* exactly equivariant, seed 0 (their L(F) is at the floor by construction): ``e3nn`` (CG potential), ``gaunt``,
  ``schnet``, ``fa-all`` (frame averaging around the relative transformer);
* approximately equivariant, seed 0: ``grid`` (the Gaunt potential with a spherical-grid SiLU at three resolutions);
* ``shapes``: a PointNet (plain, augment, penalty) and its frame average.

Budget. The penalty recipes cost 5-10 plain steps per step (a Lie derivative of the forces inside every loss), so
they run at the widths where that fits: measured on the first seed (one core each, two workers), a width-64
penalty run takes about an hour and a vector-model run 15-25 minutes. From those timings the 124 runs are about
20 core-hours (10 hours of two workers), more than the six hours first planned; the runs resume across sessions.

Options: ``--quick`` (ethanol, tiny models, a few dozen steps, two seeds: every code path, a test), ``--out DIR``
(default ``benchmarks/results/study`` or ``.../study_quick``), ``--only SUBSTRING...`` (runs whose name contains one of them),
``--max-runs N`` (stop after N new runs), ``--no-analysis`` (a worker beside another process), ``--threads``,
``--status`` (which runs are done, running in a live process, or pending, and about how many core-hours the rest
will take by the finished runs' times: :func:`remaining_estimate`; changes nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from typing import Any, Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.append(os.path.dirname(os.path.dirname(HERE)))  # the repository root: runs from a source tree too

import analysis  # noqa: E402
import study_stats  # noqa: E402
import train  # noqa: E402
from models import (EdgeMPNN, PointNetClassifier, PyGNeighbours, RelTransformer, Scaled, VectorMPNN,  # noqa: E402
                    n_parameters)

MODES = ("plain", "augment", "penalty", "equigrad")


def config(quick: bool) -> Dict[str, Any]:
    """The study's settings and its list of runs, in the order they are trained (see the module docstring)."""
    if quick:
        c = dict(molecule="ethanol", molecules_extra=["uracil"], seeds=[0, 1], steps=30, eval_every=10,
                 patience=2, batch_size=4, lr=2e-3, lam=1.0, n_audit=2, n_finite=1, layerwise_frames=1,
                 monitor_every=15, monitor_frames=2, widths=[8, 16], modes=("plain", "penalty"),
                 extra_widths=[8], extra_modes=("plain",), vector_width=8, vector_modes=("augment",),
                 rel_widths=[8], rel_modes=("plain",), baselines=("schnet",), baseline_width=8,
                 grid_res=[(3, 5), (6, 11)], grid_seeds=[0], shape_steps=20, shape_points=64, shape_widths=[16],
                 shape_batch=8, n_shape_lie=4, shape_modes=("plain",), n_val=12)
    else:
        c = dict(molecule="aspirin", molecules_extra=["ethanol", "uracil"], seeds=[0, 1, 2], steps=10000,
                 eval_every=200, patience=5, batch_size=8, lr=3e-3, lam=10.0, n_audit=24, n_finite=1,
                 layerwise_frames=2, monitor_every=1000, monitor_frames=4, widths=[8, 16, 32, 64], modes=MODES,
                 costly_widths=[8, 16, 32], extra_widths=[16, 64], extra_modes=("plain", "augment", "penalty"),
                 extra_costly_widths=[16], vector_width=32, vector_modes=("plain", "augment"), rel_widths=[16, 64],
                 rel_modes=("plain", "augment"), baselines=("e3nn", "gaunt", "schnet", "fa-all"), baseline_seeds=[0],
                 baseline_width=32, grid_res=[(3, 5), (6, 11), (12, 23)], grid_seeds=[0], shape_steps=600,
                 shape_points=256,
                 shape_widths=[32, 128], shape_batch=16, n_shape_lie=48, shape_modes=("plain", "augment", "penalty"),
                 n_val=None)
    runs: List[Dict[str, Any]] = []
    for seed in c["seeds"]:
        runs += _md_runs(c, c["molecule"], seed, c["widths"], c["modes"], c.get("costly_widths"), main=True)
        for mol in c["molecules_extra"]:
            runs += _md_runs(c, mol, seed, c["extra_widths"], c["extra_modes"], c.get("extra_costly_widths"),
                             main=False)
        for w in c["shape_widths"]:
            for mode in c["shape_modes"]:
                runs.append(dict(name=f"shapes-pointnet-w{w}-{mode}-s{seed}", task="shapes", family="pointnet",
                                 kind="unconstrained", width=w, mode=mode, seed=seed))
        w = c["shape_widths"][-1]
        runs.append(dict(name=f"shapes-pointnet-fa-w{w}-s{seed}", task="shapes", family="pointnet-fa",
                         kind="equivariant", width=w, mode="plain", seed=seed))
    for seed in c["grid_seeds"]:
        for res in c["grid_res"]:
            runs.append(_md(c["molecule"], "grid", "approximate", 8, "plain", seed, resolution=list(res),
                            tag=f"grid-{res[0]}x{res[1]}"))
    c["runs"] = runs
    return c


def _md(mol, family, kind, width, mode, seed, tag=None, **extra) -> Dict[str, Any]:
    tag = tag or f"{family}-w{width}-{mode}"
    return dict(name=f"{mol}-{tag}-s{seed}", task="md", molecule=mol, family=family, kind=kind, width=width,
                mode=mode, seed=seed, **extra)


#: recipes with a Lie derivative inside every loss: 5-10 plain steps each, trained at ``costly_widths`` only
COSTLY = ("penalty", "equigrad")


def _md_runs(c, mol, seed, widths, modes, costly_widths, main: bool) -> List[Dict[str, Any]]:
    runs = [_md(mol, "mpnn", "unconstrained", w, mode, seed) for w in widths for mode in modes
            if mode not in COSTLY or costly_widths is None or w in costly_widths]
    if not main:
        return runs
    for nl in ("pointwise", "gated"):
        for mode in c["vector_modes"]:
            runs.append(_md(mol, "vector-" + nl, "unconstrained", c["vector_width"], mode, seed,
                            nonlinearity=nl))
    runs += [_md(mol, "reltransformer", "unconstrained", w, mode, seed) for w in c["rel_widths"]
             for mode in c["rel_modes"]]
    bw = c["baseline_width"]
    widths = {"e3nn": 8, "gaunt": 8, "schnet": 2 * bw, "fa-all": bw}
    if seed in c.get("baseline_seeds", [seed]):
        runs += [_md(mol, fam, "equivariant", widths[fam], "plain", seed, tag=fam) for fam in c["baselines"]]
    return runs


def build(run: Dict[str, Any], shift: float, scale: float) -> torch.nn.Module:
    """The run's model, initialised from the run's seed."""
    from geolie.models import E3nnPotential, GauntPotential
    from geolie.nn import FrameAveraging

    fam, w, seed = run["family"], run["width"], run.get("seed", 0)
    torch.manual_seed(seed)  # for the constructors without a seed argument
    if fam == "pointnet":
        return PointNetClassifier(width=w, seed=seed)
    if fam == "pointnet-fa":
        return FrameAveraging(PointNetClassifier(width=w, seed=seed), group="SE3", mode="all")
    if fam == "mpnn":
        return Scaled(EdgeMPNN(width=w, seed=seed), shift, scale)
    if fam.startswith("vector-"):
        return Scaled(VectorMPNN(width=w, nonlinearity=run["nonlinearity"], seed=seed), shift, scale)
    if fam == "reltransformer":
        return Scaled(RelTransformer(width=w, seed=seed), shift, scale)
    if fam == "fa-all":
        return Scaled(FrameAveraging(RelTransformer(width=w, seed=seed), group="SE3", mode="all"), shift, scale)
    if fam == "e3nn":
        return Scaled(E3nnPotential(mul=w), shift, scale, edge_index_arg=True)
    if fam == "gaunt":
        return Scaled(GauntPotential(channels=w), shift, scale, edge_index_arg=True)
    if fam == "grid":
        return Scaled(GauntPotential(channels=w, nonlinearity="grid", grid_resolution=tuple(run["resolution"])),
                      shift, scale, edge_index_arg=True)
    if fam == "schnet":
        from geolie.adapters.pyg import schnet

        return Scaled(PyGNeighbours(schnet(hidden_channels=w, num_interactions=3)), shift, scale)
    raise ValueError(f"unknown family {fam!r}")


def layer_reps(model: torch.nn.Module, run: Dict[str, Any]) -> Dict[str, Any]:
    """Declared input representations for layer-wise attribution: the message MLPs (and the relative transformer's
    tokenizer) read invariant features followed by a raw edge vector; the vector family's channel mixes and
    nonlinearities act on vectors ``[N, C, 3]``."""
    inner = model.model
    fam = run["family"]
    if fam == "mpnn" or fam.startswith("vector-"):
        width = inner.embed.embedding_dim
        reps = {f"model.messages.{k}.0": (f"{2 * width + inner.n_rbf}x0e + 1x1o", "scalar")
                for k in range(len(inner.messages))}
        if fam.startswith("vector-"):
            for k in range(len(inner.messages)):
                reps[f"model.mix.{k}"] = ("vector", "vector")
                reps[f"model.act.{k}"] = ("vector", "vector")
        return reps
    if fam == "reltransformer":
        return {"model.tokenizer.0": (f"{inner.n_rbf}x0e + 1x1o", "scalar")}
    return {}


def run_md(run: Dict[str, Any], c: Dict[str, Any], data: Dict[str, Any], folder: str, log) -> Dict[str, Any]:
    """Train one potential to convergence on the validation split and measure it on the time and shift splits."""
    from geolie.monitor import EquivarianceMonitor

    tr = data["train"]
    model = build(run, float(tr.energy.mean()) / len(tr.z), float(tr.forces.std()))
    mon = EquivarianceMonitor(model, data["monitor_frames"], os.path.join(folder, "monitor"),
                              every=c["monitor_every"], group="SO3", n_finite=0, resume=False)
    rec = train.train_potential(model, tr, mode=run["mode"], steps=c["steps"], batch_size=c["batch_size"],
                                lr=c["lr"], lam=c["lam"], seed=run["seed"], val=data["val"],
                                eval_every=c["eval_every"], patience=c["patience"], monitor=mon, log=log)
    model.eval()
    res = dict(run, n_parameters=n_parameters(model), training=rec,
               test=train.potential_errors(model, data["time"]), shift=train.potential_errors(model, data["shift"]),
               throughput=train.throughput(model, data["time"]))
    lw = c["layerwise_frames"] if run["kind"] == "unconstrained" else 0
    res["lie_test"] = train.audit_potential(model, data["audit_time"], layerwise_frames=lw, n_finite=c["n_finite"],
                                            layer_reps=layer_reps(model, run))
    res["lie_shift"] = train.audit_potential(model, data["audit_shift"], layerwise_frames=0, n_finite=c["n_finite"])
    res["monitor"] = EquivarianceMonitor.read_csv(mon.csv_path)
    return res


def run_one(run: Dict[str, Any], c: Dict[str, Any], data: Dict[str, Any], folder: str, log) -> Dict[str, Any]:
    import geolie

    t0 = time.perf_counter()
    if run["task"] == "shapes":
        model = build(run, 0.0, 1.0)
        rec = train.train_classifier(model, data["shapes_train"], mode=run["mode"], steps=c["shape_steps"],
                                     batch_size=c["shape_batch"], lr=c["lr"], lam=c["lam"], seed=run["seed"],
                                     log=log)
        model.eval()
        res = dict(run, n_parameters=n_parameters(model), training=rec,
                   test=train.classifier_metrics(model, data["shapes_test"], c["n_shape_lie"]))
    else:
        res = run_md(run, c, data[run["molecule"]], folder, log)
    res["seconds"] = time.perf_counter() - t0
    res["geolie"] = geolie.__version__
    return res


def _spread(frames, n: int):
    """``n`` frames evenly spaced over ``frames`` (the audited structures)."""
    idx = np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int))
    return [frames[i] for i in idx]


def load_molecule(mol: str, c: Dict[str, Any]) -> Dict[str, Any]:
    """The time splits of the 500 K trajectory and the 300 K trajectory (``shift``) of ``xtb-md/<mol>``
    (:func:`study_stats.study_splits`), with the audited and monitored frames."""
    sp = study_stats.study_splits(mol)
    if c.get("n_val"):  # the quick mode validates on a few frames: its steps are as cheap as a validation pass
        sp["val"] = _spread(sp["val"], c["n_val"])
    d = {k: train.MDData(v) for k, v in sp.items()}
    d["audit_time"] = _spread(d["time"].frames, c["n_audit"])
    d["audit_shift"] = _spread(d["shift"].frames, c["n_audit"])
    d["monitor_frames"] = d["val"].frames[-c["monitor_frames"]:]
    return d


def load_data(c: Dict[str, Any]) -> Dict[str, Any]:
    import geolie

    d = {mol: load_molecule(mol, c) for mol in [c["molecule"]] + list(c["molecules_extra"])}
    d["shapes_train"] = train.ShapeData(geolie.data.load("shapes", split="train"), c["shape_points"])
    d["shapes_test"] = train.ShapeData(geolie.data.load("shapes", split="test"), c["shape_points"], seed=1)
    return d


def _holder(path: str):
    """The pid holding the claim file ``path`` while its process lives, ``"gone"`` when that process has ended,
    ``"writing"`` while the file is still empty (its creator is writing its pid)."""
    text = open(path).read().strip()
    if not text.isdigit():
        return "writing"
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # another user's live process
    return int(text)


def _claim(folder: str) -> bool:
    """Take the run for this process (a ``claim`` file with its pid, created exclusively), so that several
    processes can share one configuration; a claim whose process is gone is taken over."""
    path = os.path.join(folder, "claim")
    if os.path.exists(path):
        holder = _holder(path)
        if holder != "gone":
            return holder == os.getpid()  # a claim being written ("writing") or a live process's
        os.remove(path)  # its process is gone: the run is free again
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def _run_and_save(run: Dict[str, Any], c: Dict[str, Any], data: Dict[str, Any], folder: str) -> bool:
    """One run with its log in ``folder/log.txt``; the result is written atomically (a killed run leaves no half
    file). A failing run keeps its traceback in the log and returns False: it must not lose the others."""
    with open(os.path.join(folder, "log.txt"), "w") as logf:
        def log(msg):
            logf.write(msg + "\n")
            logf.flush()

        try:
            res = run_one(run, c, data, folder, log)
        except Exception:  # noqa: BLE001 - kept in the log, reported by the caller
            log(traceback.format_exc())
            return False
    tmp = os.path.join(folder, "result.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, os.path.join(folder, "result.json"))
    return True


def train_all(todo: List[Dict[str, Any]], c: Dict[str, Any], out: str, max_runs=None, strict: bool = False) -> int:
    """Train the runs of ``todo`` that no other process has claimed, in order, with a progress bar; returns how
    many finished. ``strict`` re-raises a failure (the quick mode: a test)."""
    from tqdm import tqdm

    data = load_data(c)
    done = 0
    bar = tqdm(todo, desc="study", unit="run", file=sys.stdout)
    for run in bar:
        if max_runs is not None and done >= max_runs:
            break
        folder = os.path.join(out, "runs", run["name"])
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, "result.json")) or not _claim(folder):
            continue  # finished or taken by another process since the list was made
        bar.set_postfix_str(run["name"])
        try:
            ok = _run_and_save(run, c, data, folder)
        finally:
            os.remove(os.path.join(folder, "claim"))
        if not ok:
            print(f"study: run {run['name']} failed, see {folder}/log.txt", flush=True)
            if strict:
                raise RuntimeError(open(os.path.join(folder, "log.txt")).read())
            continue
        done += 1
    return done


def status(runs: List[Dict[str, Any]], out: str) -> Dict[str, List[str]]:
    """The runs of the configuration by state: ``done`` (a result), ``running`` (claimed by a live process),
    ``pending`` (never started, failed, or claimed by a process that is gone); read only, nothing is claimed."""
    states: Dict[str, List[str]] = {"done": [], "running": [], "pending": []}
    for r in runs:
        folder = os.path.join(out, "runs", r["name"])
        if os.path.exists(os.path.join(folder, "result.json")):
            states["done"].append(r["name"])
            continue
        claim = os.path.join(folder, "claim")
        alive = os.path.exists(claim) and isinstance(_holder(claim), int)
        states["running" if alive else "pending"].append(r["name"])
    return states


def remaining_estimate(runs: List[Dict[str, Any]], out: str, names: List[str]) -> Dict[str, Any]:
    """Core-seconds the runs ``names`` will take, by the finished runs' own times (``seconds`` in their results):
    each run gets the mean of the finished runs of its family, recipe and width (any molecule, any seed), else of its
    family and recipe; runs with neither are counted in ``unknown``. Finished runs ran beside other work, so this is
    what the runs took on this machine as it was used, not a benchmark."""
    took: Dict[Any, List[float]] = {}
    for r in runs:
        path = os.path.join(out, "runs", r["name"], "result.json")
        if os.path.exists(path):
            with open(path) as fh:
                sec = json.load(fh).get("seconds")
            if isinstance(sec, (int, float)):
                for key in ((r["family"], r["mode"], r.get("width")), (r["family"], r["mode"])):
                    took.setdefault(key, []).append(float(sec))
    by_name = {r["name"]: r for r in runs}
    seconds, unknown = 0.0, []
    for n in names:
        r = by_name[n]
        ts = took.get((r["family"], r["mode"], r.get("width"))) or took.get((r["family"], r["mode"]))
        if ts:
            seconds += sum(ts) / len(ts)
        else:
            unknown.append(n)
    return {"seconds": seconds, "runs": len(names) - len(unknown), "unknown": unknown}


def _print_status(runs: List[Dict[str, Any]], out: str) -> None:
    st = status(runs, out)
    print(f"study: {len(st['done'])} done, {len(st['running'])} running, {len(st['pending'])} pending of "
          f"{len(runs)} runs")
    left = remaining_estimate(runs, out, st["running"] + st["pending"])
    print(f"  still to run: about {left['seconds'] / 3600:.1f} core-hours for {left['runs']} of them (the mean time of "
          f"finished runs of the same family, recipe and width, or of family and recipe)"
          + (f"; {len(left['unknown'])} with no finished run of their family and recipe" if left["unknown"] else ""))
    by_name = {r["name"]: r for r in runs}
    groups: Dict[str, Dict[str, int]] = {}
    for state, names in st.items():
        for n in names:
            r = by_name[n]
            key = f"{r.get('molecule', 'shapes')} {r['family']} {r['mode']}"
            groups.setdefault(key, {"done": 0, "running": 0, "pending": 0})[state] += 1
    for key, g in sorted(groups.items()):
        print(f"  {key:<36} done {g['done']:>2}  running {g['running']:>2}  pending {g['pending']:>2}")
    for n in st["running"]:
        print(f"  running: {n}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configuration (a test)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/study[_quick])")
    ap.add_argument("--only", nargs="+", default=None,
                    help="only runs whose name contains one of these (order stays the configuration's)")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    ap.add_argument("--analyse-only", action="store_true", help="write the analysis of the finished runs only")
    ap.add_argument("--no-analysis", action="store_true", help="train only (a worker beside another process)")
    ap.add_argument("--status", action="store_true",
                    help="print which runs are done, running and pending, and the time left; no work")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu only for now (see docs/src/study.md)")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("the study trains on the CPU: the models are small and the runs are serial")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(HERE), "results", "study_quick" if args.quick else "study")
    c = config(args.quick)
    runs = [r for r in c["runs"] if args.only is None or any(o in r["name"] for o in args.only)]
    if args.status:  # before --fresh and the folder's creation: looking changes nothing
        _print_status(runs, out)
        return 0
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    todo = [r for r in runs if not os.path.exists(os.path.join(out, "runs", r["name"], "result.json"))]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, results in {out}", flush=True)
    if todo and not args.analyse_only:
        train_all(todo, c, out, args.max_runs, strict=args.quick)
    if args.no_analysis:
        return 0
    results = analysis.load_results(out)
    complete = len([r for r in runs if r["name"] in results]) == len(runs)
    paths = analysis.write_all(out, results, c, device=args.device)
    print(f"study: {len(results)} of {len(c['runs'])} runs finished{'' if complete else ' (partial analysis)'}; "
          f"wrote {', '.join(os.path.basename(p) for p in paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
