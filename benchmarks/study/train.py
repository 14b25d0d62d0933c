r"""Training and measuring one model of the study (energies and forces on ``xtb-md``, or ``shapes`` classification).

Potentials are trained in float32 on the study's ``train`` split (:data:`study_stats.TIME_SPLITS`) with the loss
``[mean(ΔF²) + mean((ΔE/N)²)] / Var(F)`` (forces ``F = −∂E/∂x`` by double backward; the energy per atom weighs
like one force component, as in MACE/NequIP practice: a heavier energy term, 0.1·ΔE²/Var(E), kept every model here
at the zero-force solution) after the per-atom energy offset is set so that the initial mean prediction matches the
labels, and one of four modes:

* ``plain``;
* ``augment``: every structure of every batch rotated by a fresh Haar-random rotation (positions and forces);
* ``penalty``: ``+ λ · lie_penalty`` (:func:`geolie.losses.lie_penalty`, one random rotation axis per step, unbiased
  for the mean over the three generators) of the normalised energy ``E/σ_E`` and forces ``F/σ_F``, per atom; the
  forces' term is a third derivative of the energy;
* ``equigrad``: ``+ λ · equigrad²`` (Orb): ``‖∂E/∂G‖²`` for ``x → exp(G − Gᵀ) x``, i.e. ``6 ·`` the energy-only penalty
  over all generators (:mod:`geolie.losses`), of ``E/σ_E``, per structure.

With a validation split, training stops early on it (:func:`train_potential`). All the models are translation
invariant by construction (edge vectors, centred coordinates), so the penalties act on SO(3). Measured after
training: energy and force MAE on the ``time`` (500 K, held out by time) and ``shift`` (300 K) splits, the float64
audit (:func:`geolie.audit`, six generators, floors, finite rotations) of the trained function on both splits with
absolute, prediction-relative and label-relative Lie derivatives per structure, layer-wise attribution of the
energy's rotational Lie derivative, and throughput (energy + forces).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

import geolie
from geolie.losses import lie_penalty
from geolie.monitor import EquivarianceMonitor


def haar(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` Haar-random rotations ``[n, 3, 3]`` (QR of Gaussian matrices with the sign fix, det +1)."""
    A = torch.randn(n, 3, 3, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    Q[torch.det(Q) < 0, :, 0] *= -1
    return Q.to(dtype)


class MDData:
    """The frames of one molecule as stacked tensors: ``z [n]``, ``pos [F, n, 3]``, ``energy [F]``, ``forces``."""

    def __init__(self, frames):
        self.frames = frames
        self.z = torch.as_tensor(frames[0].numbers, dtype=torch.long)
        self.pos = torch.tensor(np.stack([a.positions for a in frames]), dtype=torch.float32)
        self.energy = torch.tensor([a.get_potential_energy() for a in frames], dtype=torch.float64)
        self.forces = torch.tensor(np.stack([a.get_forces() for a in frames]), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, idx: torch.Tensor):
        B, n = len(idx), len(self.z)
        z = self.z.repeat(B)
        batch = torch.arange(B).repeat_interleave(n)
        return z, self.pos[idx].reshape(-1, 3), batch, self.energy[idx], self.forces[idx].reshape(-1, 3)


def energy_forces(model, z, pos, batch, create_graph: bool):
    pos = pos.detach().requires_grad_(True)
    e = model(z, pos, batch)
    f = -torch.autograd.grad(e.sum(), pos, create_graph=create_graph)[0]
    return e, f


def _val_loss(model, data: "MDData", f_std: float, batch_size: int = 25) -> float:
    """The training loss's two terms on ``data`` (no augmentation, no penalty): the early-stopping criterion."""
    err = potential_errors(model, data, batch_size)
    return (err["forces_mse"] + err["energy_per_atom_mse"]) / f_std ** 2


def _penalty(model, mode: str, pos, z, batch, gen, e_std: float, f_std: float, batch_size: int) -> torch.Tensor:
    """The penalty term of ``penalty`` / ``equigrad`` training (see the module docstring)."""
    def ef(p, zz, bb):
        p = p if p.requires_grad else p.requires_grad_(True)
        en = model(zz, p, bb)
        fo = -torch.autograd.grad(en.sum(), p, create_graph=True)[0]
        return {"energy": en / e_std, "forces": fo / f_std}

    out_rep = {"energy": "scalar", "forces": "vector"}
    x = (pos.detach(), z, batch)
    if mode == "penalty":
        return lie_penalty(ef, x, group="SO3", in_rep=("point", None, None), out_rep=out_rep, generator=gen,
                           batch=batch) / len(z)
    return 6.0 * lie_penalty(ef, x, group="SO3", in_rep=("point", None, None), out_rep=out_rep, generators="all",
                             weights={"energy": 1.0, "forces": 0.0}, batch=batch) / batch_size


def train_potential(model, data: MDData, *, mode: str, steps: int, batch_size: int, lr: float, lam: float,
                    seed: int, val: MDData = None, eval_every: int = 200, patience: int = 5,
                    monitor: EquivarianceMonitor = None, log: Callable[[str], None] = print) -> Dict:
    """Train ``model`` (a :class:`Scaled` network) in place; returns the training record.

    With ``val``: the validation loss (the loss's two terms, no penalty) is measured every ``eval_every`` steps;
    the learning rate halves after 2 evaluations without improvement, training stops after ``patience`` of them
    (or at ``steps``, the cap), and the best evaluated weights are restored: ``converged`` says whether it stopped
    on the criterion rather than the cap. Without ``val``: ``steps`` steps on a cosine schedule (the quick mode)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    e_std = float(data.energy.std())
    f_std = float(data.forces.std())
    n_atoms = len(data.z)
    if hasattr(model, "shift"):  # start at the labels' mean energy: no early steps spent on a constant
        z, pos, batch, e_ref, _ = data.batch(torch.arange(min(32, len(data))))
        with torch.no_grad():
            model.shift += (e_ref.mean() - model(z, pos, batch).double().mean()) / n_atoms
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1) if val is not None
             else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))
    hist: List[Dict[str, float]] = []
    vals: List[Dict[str, float]] = []
    best = (math.inf, 0, None)
    stale, converged, last = 0, False, steps
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if monitor is not None:
            monitor.step(step)
        if val is not None and step % eval_every == 0:
            v = _val_loss(model, val, f_std)
            vals.append({"step": step, "val_loss": v, "lr": opt.param_groups[0]["lr"]})
            if v < best[0]:
                best, stale = (v, step, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
            sched.step(v)
            if stale >= patience:
                converged, last = True, step
                break
        if step == steps:
            break
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        z, pos, batch, e_ref, f_ref = data.batch(idx)
        if mode == "augment":
            R = haar(batch_size, gen)[batch]
            pos = (R @ pos[:, :, None])[..., 0]
            f_ref = (R @ f_ref[:, :, None])[..., 0]
        e, f = energy_forces(model, z, pos, batch, create_graph=True)
        loss = (((f - f_ref) ** 2).mean() + (((e.double() - e_ref) / n_atoms) ** 2).mean()) / f_std ** 2
        pen = torch.zeros((), dtype=torch.float64)
        if mode in ("penalty", "equigrad"):
            pen = _penalty(model, mode, pos, z, batch, gen, e_std, f_std, batch_size)
            loss = loss + lam * pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is None:
            sched.step()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"training diverged at step {step} (loss {float(loss)})")
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            hist.append({"step": step, "loss": float(loss.detach()), "penalty": float(pen.detach())})
            log(f"    step {step:>5}/{steps}  loss {float(loss.detach()):.4f}  penalty {float(pen.detach()):.3e}")
    if best[2] is not None:
        model.load_state_dict(best[2])
        log(f"    stopped at step {last} ({'converged' if converged else 'cap'}); best validation loss "
            f"{best[0]:.4f} at step {best[1]}")
    return {"train_seconds": time.perf_counter() - t0, "steps": steps, "history": hist, "e_std": e_std,
            "f_std": f_std, "validation": vals, "best_step": best[1], "stopped_step": last,
            "converged": converged}


def potential_errors(model, data: MDData, batch_size: int = 25) -> Dict[str, float]:
    """Energy MAE (eV), force MAE (eV/Å) and the loss's mean squares (force components; energy per atom) of
    ``model`` (float32) on ``data``."""
    de, df = [], []
    for s in range(0, len(data), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(data)))
        z, pos, batch, e_ref, f_ref = data.batch(idx)
        e, f = energy_forces(model, z, pos, batch, create_graph=False)
        de.append((e.detach().double() - e_ref).abs())
        df.append((f.detach() - f_ref).abs().double())
    de, df = torch.cat(de), torch.cat(df)
    n = len(data.z)
    return {"energy_mae": float(de.mean()), "forces_mae": float(df.mean()),
            "forces_mse": float((df ** 2).mean()), "energy_per_atom_mse": float(((de / n) ** 2).mean())}


def layerwise(model, frames, reps: Dict[str, Any]) -> Dict[str, float]:
    """Layer-wise attribution (:func:`geolie.layerwise_attribution`, float64 copy) of the energy's rotational Lie
    derivative: per module the RMS over the three rotations of its signed contribution, relative to ``|E|``, mean
    over ``frames``; ``__unattributed__`` is what no module explains (see geolie's docstring), ``reps`` declares
    module inputs (the MPNN's message MLPs read invariant features and a raw edge vector)."""
    from geolie.adapters import cast_copy

    m64, _ = cast_copy(model, "cpu", torch.float64)
    acc: Dict[str, List[float]] = {}
    for a in frames:
        z, pos = torch.as_tensor(a.numbers), torch.tensor(a.positions, dtype=torch.float64)
        e = float(m64(z, pos, None).sum().detach())
        res = geolie.layerwise_attribution(m64, lambda p: m64(z, p, None).sum(), pos, group="SO3", reps=reps)
        for name, v in res.items():
            if name != "__total__":
                acc.setdefault(name, []).append(float(np.sqrt(np.mean(np.square(v["contribution"][:3])))) / abs(e))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def audit_potential(model, frames, *, layerwise_frames: int = 2, n_finite: int = 2,
                    layer_reps: Dict[str, Any] = None) -> Dict[str, Any]:
    """The float64 audit of the trained function (a cast copy: the training run's float32 rounding is not what is
    measured). Per output and structure the isotropic rotational Lie derivative ``sqrt(mean_k ‖L_{r_k} y‖²)``:
    absolute (``per_structure_rot_abs``, eV or eV/Å), relative to the prediction's norm (``per_structure_rot_iso``)
    and, for forces, relative to the label forces' norm (``per_structure_rot_label``), with the label norms
    (``label_norm``); aggregates of the relative one (``rot_iso``), the largest translation norm, the median floor
    and the largest finite rotation error; with ``layerwise_frames``, the layer-wise attribution of the energy's
    rotational derivative."""
    rep = geolie.audit(model, frames, dtype=torch.float64, n_finite=n_finite, progress=False)
    agg = rep.aggregates()
    res: Dict[str, Any] = {}
    label = np.array([float(np.linalg.norm(a.get_forces())) for a in frames])
    for name in ("energy", "forces"):
        rel = rep.values(name, "rel")
        ab = rep.values(name, "abs")
        iso = np.sqrt(np.mean(rel[:, :3] ** 2, axis=1))
        iso_abs = np.sqrt(np.mean(ab[:, :3] ** 2, axis=1))
        trans = np.sqrt(np.mean(rel[:, 3:] ** 2, axis=1))
        res[name] = {"rot_iso": geolie.aggregate(iso), "trans_iso_max": float(trans.max()),
                     "floor_rel_median": agg[name]["floor_rel_median"],
                     "finite_rotation_max": agg[name]["finite_max_rel"].get("rotation"),
                     "per_structure_rot_iso": iso.tolist(), "per_structure_rot_abs": iso_abs.tolist()}
        if name == "forces":
            res[name]["label_norm"] = label.tolist()
            res[name]["per_structure_rot_label"] = (iso_abs / label).tolist()
    if layerwise_frames:
        res["layerwise"] = layerwise(model, frames[:layerwise_frames], layer_reps or {})
    return res


def throughput(model, data: MDData, batch_size: int = 32) -> float:
    """Structures per second of energy + forces (float32, one batch of ``batch_size``, median of 5)."""
    z, pos, batch, _, _ = data.batch(torch.arange(min(batch_size, len(data))))
    times = []
    for k in range(7):
        t0 = time.perf_counter()
        energy_forces(model, z, pos, batch, create_graph=False)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return len(torch.unique(batch)) / float(np.median(times))


# ---------------------------------------------------------------------------------------------------- shapes
class ShapeData:
    """``shapes`` point clouds (``points`` points each, a fixed subsample) stacked: ``pos [S, n, 3]``, ``y [S]``."""

    def __init__(self, samples, points: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pos = torch.stack([s.points[torch.randperm(len(s.points), generator=g)[:points]] for s in samples])
        self.y = torch.tensor([s.label for s in samples])

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx):
        B, n = len(idx), self.pos.shape[1]
        return (torch.zeros(B * n, dtype=torch.long), self.pos[idx].reshape(-1, 3).float(),
                torch.arange(B).repeat_interleave(n), self.y[idx])


def train_classifier(model, data: ShapeData, *, mode: str, steps: int, batch_size: int, lr: float, lam: float,
                     seed: int, log: Callable[[str], None] = print) -> Dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    hist = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        z, pos, batch, y = data.batch(idx)
        if mode == "augment":
            pos = (haar(batch_size, gen)[batch] @ pos[:, :, None])[..., 0]
        loss = torch.nn.functional.cross_entropy(model(z, pos, batch), y)
        pen = torch.zeros(())
        if mode == "penalty":
            pen = lie_penalty(lambda p, zz, bb: model(zz, p, bb), (pos, z, batch), group="SO3",
                              in_rep=("point", None, None), out_rep="scalar", generator=gen, batch=batch) / batch_size
            loss = loss + lam * pen
        elif mode == "equigrad":
            raise ValueError("equigrad is an energy penalty: not defined for a classifier")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            hist.append({"step": step, "loss": float(loss.detach()), "penalty": float(pen.detach())})
            log(f"    step {step:>5}/{steps}  loss {float(loss.detach()):.4f}  penalty {float(pen.detach()):.3e}")
    return {"train_seconds": time.perf_counter() - t0, "steps": steps, "history": hist}


def classifier_metrics(model, data: ShapeData, n_lie: int, seed: int = 0) -> Dict[str, Any]:
    """Accuracy in the canonical orientation and under Haar rotations; the float64 relative Lie derivative of the
    logits (rotations, isotropic norm) per shape on ``n_lie`` shapes."""
    from geolie.adapters import cast_copy

    gen = torch.Generator().manual_seed(seed)
    z, pos, batch, y = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        acc = float((model(z, pos, batch).argmax(-1) == y).float().mean())
        rot = (haar(len(data), gen)[batch] @ pos[:, :, None])[..., 0]
        acc_rot = float((model(z, rot, batch).argmax(-1) == y).float().mean())
    iso = []
    m64, _ = cast_copy(model, "cpu", torch.float64)
    for i in range(min(n_lie, len(data))):
        zi, pi, bi, _ = data.batch(torch.tensor([i]))
        r = geolie.measure(lambda p, zz: m64(zz, p, None), (pi.double(), zi), group="SO3", in_rep=("point", None),
                           out_rep="scalar")
        iso.append(float(next(iter(r.outputs.values())).iso_rotation_rel[0]))
    return {"accuracy": acc, "accuracy_rotated": acc_rot, "logits": {"rot_iso": geolie.aggregate(iso),
                                                                      "per_structure_rot_iso": iso}}
