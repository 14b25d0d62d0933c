r"""Learned equivariance over training: measure a model's Lie derivatives on a held-out set every ``N`` steps.

:class:`EquivarianceMonitor` is called from any training loop (``monitor.step(step)`` after each optimiser step, or
``monitor.measure(step)`` when you choose). Each measurement appends one CSV row per output to
``out_dir/monitor.csv`` with

* ``rot_iso_median``, ``rot_iso_p99``, ``rot_iso_max``: the isotropic rotation norm of the *relative* Lie
  derivative ``‖L_X y‖ / ‖y‖`` (RMS over the three rotation generators, i.e. the RMS about a uniformly random axis;
  :func:`geolie._metrics.iso_rotation`) over the held-out samples;
* ``trans_median``, ``trans_max``: the same over the translation generators (SE(3));
* ``floor_rel_median``: the dtype's own noise, relative, median over samples (what "zero" means);
* ``finite_rotation_max``, ``finite_translation_max``: the largest relative finite error
  ``‖f(g·x) − ρ(g) f(x)‖ / ‖f(x)‖`` over ``n_finite`` Haar rotations (translations) per sample;
* ``verdict``: ``at floor`` or ``above floor``, the worst over samples of the Lie derivatives and finite checks
  (:mod:`geolie._verdict`, the same verdict as every report);
* ``seconds``: the measurement's wall time,

and redraws ``out_dir/monitor.png`` (each output's median and max rotational Lie derivative over steps, with its
floor). Rows are flushed as they are written: a killed run keeps every finished measurement, and a new monitor on
the same folder continues the file (``resume=True``, the default).

Two kinds of held-out data:

* interatomic potentials: ASE ``Atoms`` (a list), a dataset name or a file, measured by :func:`geolie.audit` (the
  model's outputs as returned: energy, forces from its head or ``-dE/dx``, stress), in ``dtype``;
* any other function: ``data`` is its input (a tensor or a tuple) with ``in_rep``, ``out_rep`` and ``batch`` as in
  :func:`geolie.measure` (for example a point-cloud classifier's logits, ``out_rep="scalar"``).

A measurement never changes the model: parameters stay untouched (their ``requires_grad`` flags are switched off
while it runs, so no ``.grad`` is accumulated, then restored), the model is put in ``eval()`` mode and its
training flag restored, and the global RNG states (torch CPU and CUDA, numpy, ``random``) are saved and restored,
so a training run with a monitor draws the same random numbers as one without (tested).

:func:`lightning_callback` wraps the monitor as a PyTorch Lightning ``Callback`` when ``lightning`` is installed.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ._groups import SE3, as_group
from ._metrics import aggregate, iso_rotation
from ._verdict import ABOVE_FLOOR, AT_FLOOR, worst

__all__ = ["EquivarianceMonitor", "lightning_callback", "MONITOR_COLUMNS"]

MONITOR_COLUMNS = ("step", "output", "rot_iso_median", "rot_iso_p99", "rot_iso_max", "trans_median", "trans_max",
                   "floor_rel_median", "finite_rotation_max", "finite_translation_max", "verdict", "n_samples",
                   "seconds")


@contextlib.contextmanager
def _untouched(model: Optional[torch.nn.Module]) -> Iterator[None]:
    """Run a measurement without changing ``model`` or the global RNG streams (see the module docstring)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    flags: List = []
    training = None
    if isinstance(model, torch.nn.Module):
        training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        for p, flag in flags:
            p.requires_grad_(flag)
        if training is not None:
            model.train(training)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


class EquivarianceMonitor:
    """Measure ``model``'s Lie derivatives on held-out ``data`` every ``every`` steps (see the module docstring).

    Arguments: ``out_dir`` (``monitor.csv`` and ``monitor.png`` go there), ``every`` (measure when
    ``step % every == 0``), ``group`` (``"SE3"`` or ``"SO3"``), ``dtype`` (potentials only: the precision the audit
    runs in; ``float32`` measures the model as trained, ``float64`` a cast copy with floors near 1e-15),
    ``n_finite`` (finite rotations/translations per sample; 0 skips them), ``in_rep``, ``out_rep``, ``batch``
    (generic functions), ``plot`` (redraw the PNG after each measurement), ``resume`` (continue an existing CSV;
    ``False`` starts a new one), ``seed`` (the finite checks' rotations: the same every time, so that curves compare
    like with like), ``max_samples`` (potentials: measure this many structures of the held-out set, evenly spread
    over it and the same at every measurement; ``None`` measures all of them). The default, 16 structures, keeps one
    measurement at a few seconds on a CPU (the docs' training tutorial measures it).
    """

    def __init__(self, model, data, out_dir: str, *, every: int = 100, group=SE3, dtype: torch.dtype = torch.float64,
                 n_finite: int = 2, in_rep: Any = None, out_rep: Any = None, batch: Optional[torch.Tensor] = None,
                 plot: bool = True, resume: bool = True, seed: int = 0, max_samples: Optional[int] = 16):
        if every < 1:
            raise ValueError(f"EquivarianceMonitor: every must be >= 1, got {every}")
        self.model, self.data, self.out_dir = model, data, out_dir
        self.every, self.group, self.dtype, self.n_finite = every, as_group(group), dtype, n_finite
        self.in_rep, self.out_rep, self.batch, self.plot, self.seed = in_rep, out_rep, batch, plot, seed
        self.generic = in_rep is not None or out_rep is not None
        if self.generic and (in_rep is None or out_rep is None):
            raise ValueError("EquivarianceMonitor: a generic function needs both in_rep and out_rep (potentials need "
                             "neither: their outputs are declared by their adapter)")
        if not self.generic:
            from ._audit import _as_structures

            if hasattr(data, "__len__") and len(data) == 0:
                raise ValueError("EquivarianceMonitor: the held-out set is empty")
            self.data = _as_structures(data)
            if max_samples is not None:
                if max_samples < 1:
                    raise ValueError(f"EquivarianceMonitor: max_samples must be >= 1 or None, got {max_samples}")
                if len(self.data) > max_samples:
                    from ._audit import floor_sample_indices

                    self.data = [self.data[i] for i in floor_sample_indices(len(self.data), max_samples)]
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "monitor.csv")
        self.png_path = os.path.join(out_dir, "monitor.png")
        if not resume and os.path.exists(self.csv_path):
            os.remove(self.csv_path)
        self.history: List[Dict[str, Any]] = self.read_csv(self.csv_path) if os.path.exists(self.csv_path) else []

    # ------------------------------------------------------------------ measuring
    def step(self, step: int) -> Optional[List[Dict[str, Any]]]:
        """Measure if ``step % every == 0`` (returns the rows), else do nothing (returns ``None``)."""
        if step % self.every:
            return None
        return self.measure(step)

    def measure(self, step: int) -> List[Dict[str, Any]]:
        """Measure now, append the rows to the CSV (flushed) and redraw the plot; returns the rows."""
        t0 = time.perf_counter()
        module = self.model if isinstance(self.model, torch.nn.Module) else getattr(self.model, "module", None)
        with _untouched(module):
            rows = self._measure_generic() if self.generic else self._measure_potential()
        seconds = time.perf_counter() - t0
        for r in rows:
            r["step"], r["seconds"] = int(step), seconds
        self._append(rows)
        self.history.extend(rows)
        if self.plot:
            self.plot_history()
        return rows

    def _summarise(self, name: str, rel: np.ndarray, floor_rel: np.ndarray, finite: Dict[str, List[float]],
                   n: int, verdict: str) -> Dict[str, Any]:
        rot = aggregate(iso_rotation(rel)) if rel.size else aggregate([])
        trans = aggregate(np.sqrt(np.mean(rel[:, 3:] ** 2, axis=-1))) if rel.shape[1] > 3 else aggregate([])
        return {"output": name, "rot_iso_median": rot["median"], "rot_iso_p99": rot["p99"], "rot_iso_max": rot["max"],
                "trans_median": trans["median"], "trans_max": trans["max"],
                "floor_rel_median": float(np.nanmedian(floor_rel)) if np.isfinite(floor_rel).any() else math.nan,
                "finite_rotation_max": max(finite.get("rotation", [math.nan])),
                "finite_translation_max": max(finite.get("translation", [math.nan])), "verdict": verdict,
                "n_samples": n}

    def _measure_potential(self) -> List[Dict[str, Any]]:
        from ._audit import audit

        rep = audit(self.model, self.data, group=self.group, dtype=self.dtype, n_finite=self.n_finite,
                    progress=False, seed=self.seed)
        rows = []
        for name in rep.outputs:
            fin: Dict[str, List[float]] = {}
            for r in rep.rows:
                for fam, v in r.get("finite", {}).get(name, {}).items():
                    fin.setdefault(fam, []).append(v)
            rel = rep.values(name, "rel")
            rows.append(self._summarise(name, rel, rep.values(name, "floor_rel"), fin, rel.shape[0],
                                        rep.verdicts().get(name, {}).get("overall", "")))
        return rows

    def _measure_generic(self) -> List[Dict[str, Any]]:
        from ._finite import finite_equivariance_error
        from ._metrics import measure

        report = measure(self.model, self.data, group=self.group, in_rep=self.in_rep, out_rep=self.out_rep,
                         batch=self.batch)
        fin_rep = None
        if self.n_finite:
            g = torch.Generator().manual_seed(self.seed)
            fin_rep = finite_equivariance_error(self.model, self.data, group=self.group, in_rep=self.in_rep,
                                                out_rep=self.out_rep, n=self.n_finite, batch=self.batch, generator=g)
        rows = []
        for name, m in report.outputs.items():
            fin = {}
            verdicts = [AT_FLOOR if m.at_floor.all() else ABOVE_FLOOR]
            if fin_rep is not None and name in fin_rep.errors:
                fin = {fam: [v["max_rel"]] for fam, v in fin_rep.errors[name].items()}
                verdicts += [v["verdict"] for v in fin_rep.errors[name].values()]
            rows.append(self._summarise(name, m.rel, m.floor_rel, fin, report.n_samples, worst(verdicts)))
        return rows

    # ------------------------------------------------------------------ storing and plotting
    def _append(self, rows: Sequence[Dict[str, Any]]) -> None:
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=MONITOR_COLUMNS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(r.get(k, math.nan)) for k in MONITOR_COLUMNS})
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def read_csv(path: str) -> List[Dict[str, Any]]:
        """The rows of a ``monitor.csv`` (numbers as floats, ``step`` and ``n_samples`` as ints, blanks as NaN)."""
        out = []
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                row: Dict[str, Any] = {}
                for k, v in r.items():
                    if k in ("output", "verdict"):
                        row[k] = v
                    elif k in ("step", "n_samples"):
                        row[k] = int(v)
                    else:
                        row[k] = float(v) if v != "" else math.nan
                out.append(row)
        return out

    def plot_history(self, path: Optional[str] = None) -> str:
        """Draw each output's median (solid) and max (dotted) rotational Lie derivative over steps, and its median
        floor (dashed), on a log scale; returns the file written."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = path or self.png_path
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, name in enumerate(dict.fromkeys(r["output"] for r in self.history)):
            rows = sorted((r for r in self.history if r["output"] == name), key=lambda r: r["step"])
            steps = [r["step"] for r in rows]
            color = f"C{k}"
            ax.plot(steps, [r["rot_iso_median"] for r in rows], "-o", color=color, ms=3, label=f"{name} median")
            ax.plot(steps, [r["rot_iso_max"] for r in rows], ":", color=color, label=f"{name} max")
            ax.plot(steps, [r["floor_rel_median"] for r in rows], "--", color=color, alpha=0.5, lw=1,
                    label=f"{name} floor")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("relative rotational Lie derivative (iso)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def lightning_callback(monitor: EquivarianceMonitor, attribute: Optional[str] = None):
    """A PyTorch Lightning ``Callback`` that calls ``monitor.step(trainer.global_step)`` after each training batch.

    ``monitor.model`` is replaced by the ``LightningModule`` being trained (or its ``attribute``, e.g. ``"model"``,
    when the module wraps the network). Needs ``lightning`` (``pip install lightning``) or ``pytorch_lightning``.
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("geolie.monitor.lightning_callback needs PyTorch Lightning: pip install lightning") \
                from None

    class GeolieEquivarianceCallback(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D401 - Lightning hook
            monitor.model = getattr(pl_module, attribute) if attribute else pl_module
            monitor.step(int(trainer.global_step))

    return GeolieEquivarianceCallback()
