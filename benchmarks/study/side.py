r"""The study's side rows (``python benchmarks/study/side.py escn|pretrained [--out DIR] [--quick]``).

* ``escn`` — a real architecture whose nonlinearity aliases: fairchem's eSCN-MD backbone (the UMA/eSEN backbone) with
  ``ff_type="grid"`` (its constructor's default) applies its feed-forward pointwise on a finite sphere grid, with
  ``ff_type="spectral"`` it does not. Random-init models (no weights can be fetched) of the same size and seed at
  several ``grid_resolution`` values and the spectral twin, audited in float64 on the study's audited aspirin
  frames. geolie's layer-wise attribution does not read fairchem's feature layout (see
  :mod:`geolie.adapters.fairchem`), so where the break sits is answered by intervention: the grid refined with every
  weight fixed, and the grid feed-forward replaced by the spectral one with every other weight fixed
  (:func:`escn_checkpoint`).
  Writes ``OUT/escn.json``.
* ``pretrained`` — ANI-1x, SevenNet-0 and CHGNet (weights inside their wheels; ``geolie[pretrained,sevenn,chgnet]``)
  audited on the same frames as the study's models (float64 for ANI-1x; SevenNet-0 and CHGNet in float32, the
  precision their packages run in), with their force MAE against the GFN2-xTB labels (a different level of theory:
  not a measure of their quality). A model whose package is missing gets a row that says so. Writes
  ``OUT/pretrained.json``.

The analysis (:mod:`analysis`) reads both files into ``findings.md`` as descriptive sections.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import study_stats  # noqa: E402

#: the eSCN-MD variants: (label, ff_type, grid_resolution); ``None`` is fairchem's default grid for lmax = 2
ESCN_VARIANTS = [("grid, default resolution", "grid", None), ("grid, resolution 8", "grid", 8),
                 ("grid, resolution 12", "grid", 12), ("grid, resolution 18", "grid", 18),
                 ("grid, resolution 24", "grid", 24), ("spectral (same weights but the feed-forward)", "spectral", None)]


def escn_checkpoint(path: str, ff_type: str, grid_resolution: Optional[int], seed: int = 0,
                    channels: int = 32) -> str:
    """A random-init eSCN-MD conserving model (energy head, forces and stress from its gradient), saved as
    fairchem's inference checkpoint (:func:`geolie.adapters.fairchem.random_checkpoint`). Every weight the variants
    share is the grid model's of the same ``seed`` (the grid feed-forward's weights do not depend on the
    resolution); the spectral variant differs only in its feed-forward modules, which have weights of their own."""
    from geolie.adapters.fairchem import random_checkpoint

    ref = random_checkpoint(path, ff_type="grid", channels=channels, seed=seed)
    shared = torch.load(ref, weights_only=False).model_state_dict
    return random_checkpoint(path, ff_type=ff_type, grid_resolution=grid_resolution, channels=channels, seed=seed,
                             init_from=shared)


def _audit_row(pot, frames, dtype=torch.float64, attribution: int = 0) -> Dict[str, Any]:
    """The audit's medians over ``frames`` (rotations), how many structure × rotation figures of the forces are
    above their floors, the worst verdicts; with ``attribution`` > 0, layer-wise attribution on that many frames."""
    import geolie

    rep = geolie.audit(pot, frames, dtype=dtype, n_finite=1, progress=False)
    row: Dict[str, Any] = {"n": len(frames)}
    for name in ("energy", "forces"):
        rel = rep.values(name, "rel")
        row[f"lie_{name}_median"] = float(np.median(np.sqrt(np.mean(rel[:, :3] ** 2, axis=1))))
        row[f"{name}_floor_rel_median"] = rep.aggregates()[name]["floor_rel_median"]
        flags = [bool(a) for r in rep.rows for a in r["outputs"][name]["at_floor"][:3]]
        row[f"{name}_above_floor"] = [flags.count(False), len(flags)]
    row["verdicts"] = {k: v.get("overall") for k, v in rep.verdicts().items()}
    if attribution:
        at_floor = {r["index"]: r["outputs"]["energy"]["at_floor"][:3] for r in rep.rows}
        row["attribution"] = [dict(_attribution(pot, a, dtype), energy_at_floor=at_floor[i])
                              for i, a in enumerate(frames[:attribution])]
    return row


#: the parts of an eSCN-MD block that attribution names (unit name suffixes), the rest is outside the units
ESCN_PARTS = {"atom-wise feed-forwards": (".atom_wise",), "normalisations": (".norm_1", ".norm_2", "backbone.norm")}


def _attribution(pot, atoms, dtype) -> Dict[str, Any]:
    """Layer-wise attribution of the energy's rotational Lie derivative on one frame through the adapter's target
    (eSCN-MD: the blocks' normalisations and atom-wise feed-forwards as units, the rest outside them): the direct
    ``L_X E`` per rotation generator, each unit's signed contribution, and the share of the summed ``|contribution|``
    in each part of :data:`ESCN_PARTS` and outside the units."""
    import geolie
    from geolie.adapters import Structure

    st = Structure.from_atoms(atoms)
    module, f, _, kw = pot.layerwise_target(st, dtype)
    pos = pot.inputs(st, dtype)[0]
    lw = geolie.layerwise_attribution(module, f, pos, **kw)
    contrib = {k: v["contribution"] for k, v in lw.items() if k != "__total__"}
    absum = {k: sum(abs(c) for c in v) for k, v in contrib.items()}
    tot = sum(absum.values())
    shares = {part: sum(a for k, a in absum.items() if k.endswith(suffixes)) / tot if tot > 0 else math.nan
              for part, suffixes in ESCN_PARTS.items()}
    shares["outside the units"] = absum["__unattributed__"] / tot if tot > 0 else math.nan
    return {"total": lw["__total__"]["contribution"], "energy": float(f(pos).detach()),
            "contributions": contrib, "shares": shares}


def escn(frames, quick: bool) -> Dict[str, Any]:
    from geolie.adapters import load_model

    rows: List[Dict[str, Any]] = []
    variants = ESCN_VARIANTS[:1] + ESCN_VARIANTS[-1:] if quick else ESCN_VARIANTS
    with tempfile.TemporaryDirectory() as d:
        for label, ff, res in variants:
            path = escn_checkpoint(os.path.join(d, "m.pt"), ff, res, channels=8 if quick else 32)
            row = _audit_row(load_model(f"fairchem:{path}"), frames, attribution=1 if quick else 2)
            rows.append(dict(row, label=label, ff_type=ff, grid_resolution=res))
            print(f"escn: {label}: L(F) median {row['lie_forces_median']:.1e}", flush=True)
    return {"what": "random-init eSCN-MD (lmax = mmax = 2, 2 layers), same weights, float64 audit", "rows": rows}


def _trainable(pot, frames):
    """The float32 HydraModel inside a fairchem adapter, unfrozen (fairchem's predict unit freezes it and
    prepares it lazily on the first call, which is made first)."""
    from geolie.adapters import Structure

    ev = pot.batch_evaluation([Structure.from_atoms(frames[0])], torch.float32)
    ev.fn(*ev.inputs)
    return pot.copy_for(torch.float32).requires_grad_(True)


def _forces_call(pot, frames):
    """The adapter's float32 forces on ``frames`` in one batched call ``[sum N, 3]`` (differentiable in the
    model's weights)."""
    from geolie.adapters import Structure

    ev = pot.batch_evaluation([Structure.from_atoms(a) for a in frames], torch.float32)
    return ev.fn(*ev.inputs)["forces"]


def train_escn(pot, train_frames, val_frames, steps: int, batch_size: int = 4, lr: float = 2e-3, seed: int = 0,
               eval_every: int = 50, patience: int = 5) -> Dict[str, Any]:
    """Train the adapter's float32 model in place on forces only (``mean ΔF² / Var F``; a random-init model's energy
    offset is arbitrary and the study's headline is the forces), Adam, with the study's stopping rule: the
    validation force MAE every ``eval_every`` steps, the learning rate halved after 2 evaluations without
    improvement, stopped after ``patience`` of them or at ``steps`` (the cap), best weights restored."""
    module = _trainable(pot, train_frames)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    gen = np.random.default_rng(seed)
    labels = {id(a): torch.tensor(a.get_forces(), dtype=torch.float32) for a in train_frames + val_frames}
    var = float(torch.cat([labels[id(a)] for a in train_frames]).var())

    def val_mae():
        with torch.enable_grad():  # the heads' forces are an autograd gradient
            f = _forces_call(pot, val_frames).detach()
        return float((f - torch.cat([labels[id(a)] for a in val_frames])).abs().mean())

    best = (val_mae(), 0, copy.deepcopy(module.state_dict()))
    hist = [{"step": 0, "val_forces_mae": best[0]}]
    stale, converged, last = 0, False, steps
    for step in range(1, steps + 1):
        batch = [train_frames[i] for i in gen.choice(len(train_frames), batch_size, replace=False)]
        f = _forces_call(pot, batch)
        loss = ((f - torch.cat([labels[id(a)] for a in batch])) ** 2).mean() / var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            v = val_mae()
            sched.step(v)
            hist.append({"step": step, "val_forces_mae": v, "loss": float(loss.detach()),
                         "lr": opt.param_groups[0]["lr"]})
            print(f"escn training: step {step}/{steps}, validation force MAE {v:.3f} eV/Å", flush=True)
            if v < best[0]:
                best, stale = (v, step, copy.deepcopy(module.state_dict())), 0
            else:
                stale += 1
                if stale >= patience:
                    converged, last = True, step
                    break
    module.load_state_dict(best[2])
    return {"steps": steps, "stopped_step": last, "converged": converged, "best_step": best[1],
            "val_forces_mae": best[0], "history": hist, "state_dict": module.state_dict()}


def _with_weights(source: str, path: str, state_dict, grid_resolution: Optional[int]) -> str:
    """``source``'s checkpoint written to ``path`` with trained weights (also as its EMA weights, which fairchem
    loads) and the given grid resolution."""
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    ck = torch.load(source, weights_only=False)
    cfg = copy.deepcopy(ck.model_config)
    cfg["backbone"]["grid_resolution"] = grid_resolution
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    ema = {"n_averaged": torch.tensor(1), **{"module." + k: v for k, v in sd.items()}}
    torch.save(MLIPInferenceCheckpoint(model_config=cfg, model_state_dict=sd, ema_state_dict=ema,
                                       tasks_config=ck.tasks_config), path)
    return path


def escn_trained(frames, quick: bool, molecule: str) -> Dict[str, Any]:
    """The default-grid eSCN-MD trained on the study's aspirin train split (forces), then audited with its trained
    weights at each grid resolution (the grid feed-forward's weights do not depend on it)."""
    from geolie.adapters import load_model

    channels = 8 if quick else 32
    sp = study_stats.study_splits(molecule)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        path = escn_checkpoint(os.path.join(d, "m.pt"), "grid", None, channels=channels)
        pot = load_model(f"fairchem:{path}")
        import run

        rec = train_escn(pot, sp["train"], run._spread(sp["val"], 4 if quick else 12), steps=4 if quick else 3000,
                         eval_every=2 if quick else 50)
        labels = np.concatenate([a.get_forces() for a in frames])
        with torch.enable_grad():
            in_memory = _forces_call(pot, frames).detach().double().numpy()
        for label, ff, res in [v for v in ESCN_VARIANTS if v[1] == "grid"][:2 if quick else None]:
            p = _with_weights(path, os.path.join(d, f"t{res}.pt"), rec["state_dict"], res)
            trained = load_model(f"fairchem:{p}")
            row = _audit_row(trained, frames, attribution=1 if quick else 2)
            with torch.enable_grad():
                pred = _forces_call(trained, frames).detach().double().numpy()
            if res is None and not np.allclose(pred, in_memory, rtol=1e-4, atol=1e-5):  # the file holds the weights
                raise RuntimeError("escn-trained: the saved checkpoint does not reproduce the trained model")
            mae = float(np.abs(pred - labels).mean())
            rows.append(dict(row, label=f"trained, {label}", ff_type=ff, grid_resolution=res, forces_mae=mae))
            print(f"escn trained: {label}: L(F) median {row['lie_forces_median']:.1e}", flush=True)
    rec.pop("state_dict")
    return {"what": f"eSCN-MD ({channels} channels) trained on forces in batches of 4 frames with the study's "
                    f"stopping rule (cap {rec['steps']} steps), best validation weights, audited at each grid "
                    "resolution", "training": rec, "rows": rows}


def pretrained(frames, quick: bool) -> Dict[str, Any]:
    from geolie.adapters import load_model

    rows = []
    labels = np.stack([a.get_forces() for a in frames])
    for name, dtype in (("ani1x", torch.float64), ("sevenn-0", torch.float32), ("chgnet", torch.float32)):
        try:
            pot = load_model(name)
        except (ValueError, ImportError) as e:
            rows.append({"model": name, "ok": False, "why": str(e).splitlines()[0]})
            continue
        row = _audit_row(pot, frames, dtype)
        pred = _forces(pot, frames, dtype)
        rows.append(dict(row, model=name, ok=True, dtype=str(dtype).replace("torch.", ""),
                         forces_mae=float(np.abs(pred - labels).mean())))
        print(f"pretrained: {name}: L(F) median {row['lie_forces_median']:.1e}", flush=True)
    return {"what": "pretrained potentials on the study's audited frames of the time split", "rows": rows}


def _forces(pot, frames, dtype) -> np.ndarray:
    """The adapter's forces on each frame (its :class:`geolie.Evaluation`, one call each)."""
    from geolie.adapters import Structure

    out = []
    for a in frames:
        ev = pot.evaluation(Structure.from_atoms(a), dtype)
        out.append(ev.fn(*ev.inputs)["forces"].detach().double().cpu().numpy())
    return np.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["escn", "escn-trained", "pretrained"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results", "study"))
    ap.add_argument("--quick", action="store_true", help="two variants, small channels, two frames")
    ap.add_argument("--molecule", default="aspirin")
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args(argv)
    import run

    time_split = study_stats.study_splits(args.molecule)["time"]
    frames = run._spread(time_split, 2 if args.quick else args.frames)
    if args.what == "escn":
        res = escn(frames, args.quick)
    elif args.what == "escn-trained":
        res = escn_trained(frames, args.quick, args.molecule)
    else:
        res = pretrained(frames, args.quick)
    res["molecule"] = args.molecule
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.what.replace('-', '_')}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(f"side: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
