r"""The learned-equivariance study: Gruver et al.'s question in 3D (``python benchmarks/study/run.py [--quick]``).

Do models that are not built equivariant learn to be, and what buys it: size, accuracy, augmentation, a
Lie-derivative penalty, Orb's equigrad, or the architecture? Every model of the configuration is trained
(:mod:`train`), measured and written to ``OUT/runs/<name>/result.json``; a run whose result exists is skipped, so
the study resumes where it stopped (``--fresh`` starts over). Training curves of the Lie derivative go to
``OUT/runs/<name>/monitor/`` (:class:`geolie.monitor.EquivarianceMonitor`). When every run of the configuration is
done (or with ``--analyse-only``), :mod:`analysis` writes ``OUT/results.json``, ``OUT/table.md``,
``OUT/findings.md`` and the plots.

Families (``kind``): unconstrained (``mpnn``: message passing on raw edge vectors; ``transformer``: attention
over centred coordinates; ``pointnet`` for ``shapes``) in several sizes × modes ``plain``/``augment``/``penalty``/
``equigrad`` (and ``augment-x5``: five times the steps, about the penalty's cost); exactly equivariant (``e3nn`` CG potential, ``gaunt`` grid potential, ``fa-all`` and
``fa-stochastic``: frame averaging around the transformer, ``schnet``); approximately equivariant (``grid``: the
Gaunt potential with a spherical-grid SiLU at several grid resolutions).

Options: ``--quick`` (tiny models, a few dozen steps, ethanol: end to end in under 2 minutes; a test),
``--out DIR`` (default ``benchmarks/results/study`` or ``.../study_quick``), ``--only SUBSTRING`` (runs whose name
contains it), ``--device``, ``--threads``, ``--max-runs N`` (stop after N new runs: chunks for a time budget).
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

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.append(os.path.dirname(os.path.dirname(HERE)))  # the repository root: runs from a source tree too

import analysis  # noqa: E402
import train  # noqa: E402
from models import EdgeMPNN, PointNetClassifier, PointTransformer, PyGNeighbours, Scaled, n_parameters  # noqa: E402

MODES = ("plain", "augment", "penalty", "equigrad")


def config(quick: bool) -> Dict[str, Any]:
    """The study's settings and its list of runs."""
    if quick:
        c = dict(molecule="ethanol", steps=30, batch_size=4, lr=2e-3, lam=1.0, n_audit=3, n_finite=1,
                 layerwise_frames=1, monitor_every=15, monitor_frames=2, widths=[8, 16], shape_steps=20,
                 shape_points=64, shape_widths=[16], shape_batch=8, n_shape_lie=4, grid_res=[(3, 5), (6, 11)],
                 baseline_width=8, transformer_modes=("plain",))
    else:
        c = dict(molecule="aspirin", steps=1000, batch_size=8, lr=1e-3, lam=10.0, n_audit=30, n_finite=2,
                 layerwise_frames=2, monitor_every=150, monitor_frames=4, widths=[16, 32, 64, 128],
                 shape_steps=600, shape_points=256, shape_widths=[32, 128], shape_batch=16, n_shape_lie=48,
                 grid_res=[(3, 5), (4, 7), (6, 11), (12, 23)], baseline_width=32, transformer_modes=MODES)
    runs: List[Dict[str, Any]] = []
    for w in c["widths"]:
        for mode in MODES:
            runs.append(dict(name=f"mpnn-w{w}-{mode}", task="md", family="mpnn", kind="unconstrained", width=w,
                             mode=mode))
        for mode in c["transformer_modes"]:
            runs.append(dict(name=f"transformer-w{w}-{mode}", task="md", family="transformer",
                             kind="unconstrained", width=w, mode=mode))
        # augmentation at about the penalty's cost per run (a penalty step costs ~5 plain steps, docs/src/tutorials/training.md)
        runs.append(dict(name=f"mpnn-w{w}-augment-x5", task="md", family="mpnn", kind="unconstrained", width=w,
                         mode="augment-x5"))
    bw = c["baseline_width"]
    runs += [dict(name="e3nn", task="md", family="e3nn", kind="equivariant", width=8, mode="plain"),
             dict(name="gaunt", task="md", family="gaunt", kind="equivariant", width=8, mode="plain"),
             dict(name=f"fa-all-w{bw}", task="md", family="fa-all", kind="equivariant", width=bw, mode="plain"),
             dict(name=f"fa-stochastic-w{bw}", task="md", family="fa-stochastic", kind="equivariant", width=bw,
                  mode="plain"),
             dict(name="schnet", task="md", family="schnet", kind="equivariant", width=2 * bw, mode="plain")]
    for res in c["grid_res"]:
        runs.append(dict(name=f"grid-{res[0]}x{res[1]}", task="md", family="grid", kind="approximate", width=8,
                         mode="plain", resolution=list(res)))
    for w in c["shape_widths"]:
        for mode in ("plain", "augment", "penalty"):
            runs.append(dict(name=f"pointnet-w{w}-{mode}", task="shapes", family="pointnet", kind="unconstrained",
                             width=w, mode=mode))
    runs.append(dict(name=f"pointnet-fa-w{c['shape_widths'][-1]}", task="shapes", family="pointnet-fa",
                     kind="equivariant", width=c["shape_widths"][-1], mode="plain"))
    c["runs"] = runs
    return c


def build(run: Dict[str, Any], shift: float, scale: float, train_mode: bool = True) -> torch.nn.Module:
    """The run's model. ``fa-stochastic`` trains with one random frame per structure and is measured with all four
    (``train_mode=False``): a model that draws a frame per call is not a function to differentiate."""
    from geolie.models import E3nnPotential, GauntPotential
    from geolie.nn import FrameAveraging

    fam, w = run["family"], run["width"]
    if fam == "pointnet":
        return PointNetClassifier(width=w)
    if fam == "pointnet-fa":
        return FrameAveraging(PointNetClassifier(width=w), group="SE3", mode="all")
    if fam == "mpnn":
        return Scaled(EdgeMPNN(width=w), shift, scale)
    if fam == "transformer":
        return Scaled(PointTransformer(width=w), shift, scale)
    if fam in ("fa-all", "fa-stochastic"):
        mode = "stochastic" if fam == "fa-stochastic" and train_mode else "all"
        return Scaled(FrameAveraging(PointTransformer(width=w), group="SE3", mode=mode), shift, scale)
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


def run_one(run: Dict[str, Any], c: Dict[str, Any], data: Dict[str, Any], folder: str, log) -> Dict[str, Any]:
    import geolie
    from geolie.monitor import EquivarianceMonitor

    t0 = time.perf_counter()
    if run["task"] == "shapes":
        model = build(run, 0.0, 1.0)
        rec = train.train_classifier(model, data["shapes_train"], mode=run["mode"], steps=c["shape_steps"],
                                     batch_size=c["shape_batch"], lr=c["lr"], lam=c["lam"], seed=0, log=log)
        model.eval()
        res = dict(run, n_parameters=n_parameters(model), training=rec,
                   test=train.classifier_metrics(model, data["shapes_test"], c["n_shape_lie"]))
    else:
        tr = data["train"]
        shift = float(tr.energy.mean()) / len(tr.z)
        scale = float(tr.forces.std())
        model = build(run, shift, scale)
        mon = EquivarianceMonitor(model, data["monitor_frames"], os.path.join(folder, "monitor"),
                                  every=c["monitor_every"], group="SO3", n_finite=0, resume=False)
        mode, steps = run["mode"], c["steps"]
        if mode.startswith("augment-x"):  # more augmented steps, to compare with the penalty at equal cost
            mode, steps = "augment", steps * int(mode[len("augment-x"):])
        rec = train.train_potential(model, tr, mode=mode, steps=steps, batch_size=c["batch_size"],
                                    lr=c["lr"], lam=c["lam"], seed=0, monitor=mon, log=log)
        if run["family"] == "fa-stochastic":
            trained = model
            model = build(run, shift, scale, train_mode=False)
            model.load_state_dict(trained.state_dict())
        model.eval()
        res = dict(run, n_parameters=n_parameters(model), training=rec,
                   test=train.potential_errors(model, data["test"]), shift=train.potential_errors(model, data["shift"]),
                   throughput=train.throughput(model, data["test"]))
        lw = c["layerwise_frames"] if run["kind"] == "unconstrained" else 0
        reps = {}
        if run["family"] == "mpnn":  # message MLPs read [h_i, h_j, rbf(r_ij)] (invariant) and the raw edge vector
            inner = model.model
            width = inner.embed.embedding_dim
            reps = {f"model.messages.{k}.0": (f"{2 * width + inner.n_rbf}x0e + 1x1o", "scalar")
                    for k in range(len(inner.messages))}
        res["lie_test"] = train.audit_potential(model, data["audit_test"], layerwise_frames=lw,
                                                n_finite=c["n_finite"], layer_reps=reps)
        res["lie_shift"] = train.audit_potential(model, data["audit_shift"], layerwise_frames=0,
                                                 n_finite=c["n_finite"])
        res["monitor"] = EquivarianceMonitor.read_csv(mon.csv_path)
    res["seconds"] = time.perf_counter() - t0
    res["geolie"] = geolie.__version__
    return res


def load_data(c: Dict[str, Any]) -> Dict[str, Any]:
    import geolie

    mol = f"xtb-md/{c['molecule']}"
    d = {"train": train.MDData(geolie.data.load(mol, split="train")),
         "test": train.MDData(geolie.data.load(mol, split="test")),
         "shift": train.MDData(geolie.data.load(mol, split="shift"))}
    d["audit_test"] = d["test"].frames[:c["n_audit"]]
    d["audit_shift"] = d["shift"].frames[:c["n_audit"]]
    d["monitor_frames"] = d["test"].frames[-c["monitor_frames"]:]
    d["shapes_train"] = train.ShapeData(geolie.data.load("shapes", split="train"), c["shape_points"])
    d["shapes_test"] = train.ShapeData(geolie.data.load("shapes", split="test"), c["shape_points"], seed=1)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configuration, under 2 minutes (a test)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/study[_quick])")
    ap.add_argument("--only", default=None, help="only runs whose name contains this")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    ap.add_argument("--analyse-only", action="store_true", help="write the analysis of the finished runs only")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu only for now (see docs/src/study.md)")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("the study trains on the CPU: the models are small and the runs are serial")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(HERE), "results", "study_quick" if args.quick else "study")
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    c = config(args.quick)
    runs = [r for r in c["runs"] if args.only is None or args.only in r["name"]]
    todo = [r for r in runs if not os.path.exists(os.path.join(out, "runs", r["name"], "result.json"))]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, results in {out}", flush=True)
    if todo and not args.analyse_only:
        data = load_data(c)
        from tqdm import tqdm

        done = 0
        bar = tqdm(todo, desc="study", unit="run", file=sys.stdout)
        for run in bar:
            if args.max_runs is not None and done >= args.max_runs:
                break
            bar.set_postfix_str(run["name"])
            folder = os.path.join(out, "runs", run["name"])
            os.makedirs(folder, exist_ok=True)
            logf = open(os.path.join(folder, "log.txt"), "w")

            def log(msg, _f=logf):
                _f.write(msg + "\n")
                _f.flush()

            try:
                res = run_one(run, c, data, folder, log)
            except Exception:  # noqa: BLE001 - one failing run must not lose the others; its traceback is kept
                log(traceback.format_exc())
                logf.close()
                print(f"study: run {run['name']} failed, see {folder}/log.txt", flush=True)
                if args.quick:
                    raise
                continue
            logf.close()
            tmp = os.path.join(folder, "result.json.tmp")
            with open(tmp, "w") as fh:
                json.dump(res, fh, indent=1)
            os.replace(tmp, os.path.join(folder, "result.json"))  # atomic: a killed run leaves no half file
            done += 1
    results = analysis.load_results(out)
    complete = len([r for r in runs if r["name"] in results]) == len(runs)
    paths = analysis.write_all(out, results, c, device=args.device)
    print(f"study: {len(results)} of {len(c['runs'])} runs finished{'' if complete else ' (partial analysis)'}; "
          f"wrote {', '.join(os.path.basename(p) for p in paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
