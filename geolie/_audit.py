"""``geolie.audit``: how equivariant is a model on a set of structures, where does it break, does it pass a gate.

For every structure: the Lie derivatives of each output along the group's generators (absolute, relative,
per atom, with noise floors, via :func:`geolie.measure`), the finite companions (Haar rotations, translations,
inversion, atom permutations, repeated calls: :func:`geolie.finite_equivariance_error`), and on request the
layer-wise attribution of the energy's Lie derivative (:mod:`geolie._layerwise`). Aggregates over structures:
mean, median, p99, max. With an output folder, each structure's result is appended to ``results.jsonl`` and
``structures.csv`` as soon as it is computed; ``resume=True`` skips the structures already there.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ._conservative import conservativeness
from ._finite import finite_equivariance_error
from ._groups import SE3, as_group
from ._lie import GeolieADCheckWarning, GeolieFallbackWarning
from ._metrics import aggregate, measure

__all__ = ["audit", "AuditReport"]


@dataclass
class AuditReport:
    """Per-structure rows and aggregates; ``metric(output, kind)`` gives the value a gate compares."""

    model: str
    group: str
    dtype: str
    rows: List[Dict[str, Any]]
    generator_names: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> List[str]:
        names: List[str] = []
        for r in self.rows:
            for k in r.get("outputs", {}):
                if k not in names:
                    names.append(k)
        return names

    def values(self, output: str, kind: str = "rel", generators: Optional[Sequence[str]] = None) -> np.ndarray:
        """``[structures, generators]`` array of ``abs``, ``rel``, ``per_atom`` or ``floor`` for ``output``."""
        gens = list(generators or self.generator_names)
        idx = [self.generator_names.index(g) for g in gens]
        vals = []
        for r in self.rows:
            o = r.get("outputs", {}).get(output)
            if o is None or o.get(kind) is None:
                continue
            vals.append([o[kind][i] for i in idx])
        return np.array(vals, dtype=np.float64).reshape(-1, len(idx))

    def aggregates(self) -> Dict[str, Any]:
        out = {}
        for name in self.outputs:
            rel = self.values(name, "rel")
            iso = np.sqrt(np.mean(rel[:, :3] ** 2, axis=1)) if rel.size else rel
            out[name] = {g: aggregate(rel[:, k]) for k, g in enumerate(self.generator_names)}
            out[name]["iso_rotation"] = aggregate(iso)
            out[name]["floor_rel_median"] = float(np.nanmedian(self.values(name, "floor_rel"))) if rel.size else None
            fin: Dict[str, List[float]] = {}
            for r in self.rows:
                for fam, v in r.get("finite", {}).get(name, {}).items():
                    fin.setdefault(fam, []).append(v)
            out[name]["finite_max_rel"] = {fam: float(np.max(v)) for fam, v in fin.items()}
            out[name]["source"] = next((r["outputs"][name].get("source", "") for r in self.rows
                                        if name in r.get("outputs", {})), "")
            checks = [r["outputs"][name].get("ad_check") for r in self.rows if name in r.get("outputs", {})]
            checks = [c for c in checks if c is not None]
            out[name]["ad_check_max"] = float(max(checks)) if checks else None
        return out

    def conservative_aggregates(self) -> Dict[str, Dict[str, float]]:
        """Aggregates over structures of the force gap and Jacobian asymmetry (models returning their own forces)."""
        keys = ("force_gap_rel", "jacobian_asym_rel")
        vals = {k: [r["conservative"][k] for r in self.rows if r.get("conservative")] for k in keys}
        return {k: aggregate(v) for k, v in vals.items() if v}

    def notes(self) -> List[str]:
        """Distinct notes of all rows (precision limits, AD methods that failed their check, fallbacks)."""
        seen: List[str] = []
        for r in self.rows:
            for n in r.get("notes", []):
                if n not in seen:
                    seen.append(n)
        return seen

    def metric(self, output: Optional[str] = None, kind: str = "rel") -> float:
        """Max over structures and generators (and outputs, when ``output`` is None) of ``kind``."""
        names = [output] if output else self.outputs
        vals = [self.values(n, kind) for n in names]
        vals = [v for v in vals if v.size]
        return float(max(np.nanmax(v) for v in vals)) if vals else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "group": self.group, "dtype": self.dtype, "generators": self.generator_names,
                "n_structures": len(self.rows), "aggregates": self.aggregates(),
                "conservative": self.conservative_aggregates(), "notes": self.notes(), "meta": self.meta,
                "structures": self.rows}

    def table(self) -> str:
        agg = self.aggregates()
        gens = self.generator_names
        head = f"{'output':<10}{'stat':<8}" + "".join(f"{g:>10}" for g in gens) + f"{'iso rot':>10}{'floor':>10}"
        lines = [f"geolie audit: {self.model}, {len(self.rows)} structure(s), {self.group}, {self.dtype}; relative "
                 "Lie derivative ‖L_X y‖/‖y‖", head, "-" * len(head)]
        for name, a in agg.items():
            for stat in ("median", "max"):
                fl = a["floor_rel_median"]
                lines.append(f"{name[:9]:<10}{stat:<8}" + "".join(f"{a[g][stat]:>10.1e}" for g in gens)
                             + f"{a['iso_rotation'][stat]:>10.1e}" + (f"{fl:>10.1e}" if stat == "median" and
                                                                      fl is not None else f"{'':>10}"))
        lines.append("")
        lines.append("where each output comes from; adjoint test of its AD derivative (max relative disagreement):")
        for name, a in agg.items():
            chk = "n/a (finite differences)" if a["ad_check_max"] is None else f"{a['ad_check_max']:.1e}"
            lines.append(f"  {name:<10}{a['source'] or '?':<30}adjoint {chk}")
        cons = self.conservative_aggregates()
        if cons:
            lines.append("")
            lines.append("conservativeness of the returned forces (0 for F = -dE/dx):  median      max")
            for k, label in (("force_gap_rel", "|F + dE/dx| / |F|"), ("jacobian_asym_rel", "|antisym dF/dx| / |dF/dx|")):
                if k in cons:
                    lines.append(f"  {label:<58}{cons[k]['median']:>8.1e} {cons[k]['max']:>8.1e}")
        fams = sorted({f for a in agg.values() for f in a["finite_max_rel"]})
        if fams:
            lines.append("")
            lines.append(f"{'finite':<18}" + "".join(f"{f:>13}" for f in fams) + "   (max relative error)")
            for name, a in agg.items():
                lines.append(f"{name[:17]:<18}" + "".join(
                    f"{a['finite_max_rel'].get(f, float('nan')):>13.1e}" for f in fams))
        notes = self.notes()
        if notes:
            lines.append("")
            lines.append("notes:")
            lines += [f"  - {n}" for n in notes]
        lw = self.layerwise_summary()
        if lw:
            lines.append("")
            lines.append("layer-wise attribution (rotations, mean over structures; |signed contribution| for an energy, "
                         "Hutchinson norms for other outputs):")
            for name, v in sorted(lw.items(), key=lambda kv: -kv[1])[:10]:
                lines.append(f"  {name:<40}{v:>12.3e}")
        return "\n".join(lines)

    def layerwise_summary(self) -> Dict[str, float]:
        acc: Dict[str, List[float]] = {}
        for r in self.rows:
            for name, v in (r.get("layerwise") or {}).items():
                if name == "__total__":
                    continue
                acc.setdefault(name, []).append(float(np.sqrt(np.mean(np.square(v["contribution"][:3])))))
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def plots(self, folder: str) -> List[str]:
        """PNG plots in ``folder``: per output, the distribution of per-structure relative norms per generator;
        the layer-wise bars when present. Returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        for name in self.outputs:
            rel = self.values(name, "rel")
            if not rel.size:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            data = [np.clip(rel[:, k], 1e-18, None) for k in range(rel.shape[1])]
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(self.generator_names) + 1), self.generator_names)
            ax.set_yscale("log")
            fl = self.values(name, "floor_rel")
            if fl.size:
                ax.axhline(float(np.nanmedian(fl)), color="grey", ls="--", label="noise floor (median)")
                ax.legend()
            ax.set_ylabel("‖L_X y‖ / ‖y‖ (exact zeros drawn at 1e-18)")
            ax.set_title(f"{self.model}: {name}, {len(rel)} structures")
            fig.tight_layout()
            p = os.path.join(folder, f"lie_{name}.png")
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(p)
        lw = self.layerwise_summary()
        if lw:
            items = sorted(lw.items(), key=lambda kv: -kv[1])[:15]
            fig, ax = plt.subplots(figsize=(6, 0.35 * len(items) + 1.2))
            ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
            ax.set_xlabel("|contribution to L_X E| (rotations, mean)")
            ax.set_title("layer-wise attribution")
            fig.tight_layout()
            p = os.path.join(folder, "layerwise.png")
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(p)
        return paths


def _as_structures(structures) -> List:
    from .adapters import Structure

    if isinstance(structures, str):
        from .data import load

        name, _, split = structures.partition(":")
        structures = load(name, split or "all")
    out = []
    for i, s in enumerate(structures):
        if isinstance(s, Structure):
            out.append(s)
        elif hasattr(s, "get_positions"):
            out.append(Structure.from_atoms(s))
        elif hasattr(s, "points") and hasattr(s, "label"):  # a geolie.data.ShapeSample
            p = s.points.detach().double().numpy()
            out.append(Structure(np.zeros(len(p), dtype=np.int64), p, None, f"{s.name}#{i}"))
        else:
            raise TypeError(f"structure {i}: expected ase.Atoms, a geolie Structure or a ShapeSample, got "
                            f"{type(s).__name__}")
    if not out:
        raise ValueError("audit: no structures given")
    return out


def _sample(m, b: int) -> Dict[str, Any]:
    """One sample's figures of an :class:`OutputMetrics`, as stored in a row."""
    return {"rep": m.rep, "source": m.source, "abs": m.abs[b].tolist(), "rel": m.rel[b].tolist(),
            "floor": m.floor[b].tolist(), "floor_rel": m.floor_rel[b].tolist(),
            "per_atom": None if m.per_atom is None else m.per_atom[b].tolist(), "at_floor": m.at_floor[b].tolist(),
            "floor_source": m.floor_source, "ad_check": m.ad_check, "norm": float(m.ynorm[b])}


def _measure(pot, ev, ev_ref, group, where):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeolieADCheckWarning)
            warnings.simplefilter("always", GeolieFallbackWarning)
            rep = measure(ev, group=group, f_ref=ev_ref, floor=ev_ref is not None or ev.method != "fd")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for w in caught:  # said once more, naming the structure; the notes keep them in the report
        if issubclass(w.category, (GeolieADCheckWarning, GeolieFallbackWarning)):
            warnings.warn(f"{where}: {w.message}", w.category, stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rep


def _conservative_figures(ev, n_structures: int) -> Optional[Dict[str, List[float]]]:
    """Force gap and Jacobian asymmetry (:func:`geolie.conservativeness`) for models that return forces themselves."""
    if not ev.has_model_forces or ev.method == "fd":
        return None
    c = conservativeness(ev.fn, ev.inputs, batch=ev.batch)
    return {k: [float(v) for v in c[k][:n_structures]] for k in c}


def _row(pot, st, index, group, dtype, n_finite, layerwise, seed):
    where = f"structure {index} ({st.name})"
    pot.check(st, where)
    ev = pot.evaluation(st, dtype)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    ev_ref = pot.evaluation(st, other) if other in pot.dtypes else None
    rep = _measure(pot, ev, ev_ref, group, where)
    row: Dict[str, Any] = {"index": index, "name": st.name, "atoms": int(len(st.numbers)), "method": rep.method,
                           "outputs": {name: _sample(m, 0) for name, m in rep.outputs.items()}, "notes": rep.notes}
    cons = _conservative_figures(ev, 1)
    if cons is not None:
        row["conservative"] = {k: v[0] for k, v in cons.items()}
    row["finite"] = {}
    if n_finite > 0:
        fin = finite_equivariance_error(ev, group=group, n=n_finite, parity=True, permutation={},
                                        generator=torch.Generator().manual_seed(seed + index))
        row["finite"] = {name: {fam: v["max_rel"] for fam, v in fams.items()} for name, fams in fin.errors.items()}
    if layerwise:
        target = pot.layerwise_target(st, dtype)
        if target is None:
            row["layerwise"] = None
        else:
            from ._layerwise import layerwise_attribution

            module, f, out_rep = target
            kw = {} if out_rep is None else {"out_rep": out_rep}
            row["layerwise"] = layerwise_attribution(module, f, ev.inputs[0], group=group, **kw)
    return row


def _rows_batched(pot, chunk, group, dtype, n_finite, seed):
    """Rows for several molecules evaluated in one batched call (per-structure Lie derivatives and floors; the
    finite checks rotate the whole batch at once, so their errors are per batch)."""
    idx = [i for i, _ in chunk]
    sts = [st for _, st in chunk]
    for i, st in chunk:
        pot.check(st, f"structure {i} ({st.name})")
    ev = pot.batch_evaluation(sts, dtype)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    ev_ref = pot.batch_evaluation(sts, other) if other in pot.dtypes else None
    rep = _measure(pot, ev, ev_ref, group, f"structures {idx[0]}-{idx[-1]}")
    cons = _conservative_figures(ev, len(chunk))
    finite = {}
    if n_finite > 0:
        fin = finite_equivariance_error(ev, group=group, n=n_finite, parity=True,
                                        generator=torch.Generator().manual_seed(seed + idx[0]))
        finite = {name: {fam: v["max_rel"] for fam, v in fams.items()} for name, fams in fin.errors.items()}
    rows = []
    for b, (i, st) in enumerate(chunk):
        row = {"index": i, "name": st.name, "atoms": int(len(st.numbers)), "method": rep.method,
               "outputs": {name: _sample(m, b) for name, m in rep.outputs.items()}, "notes": rep.notes,
               "finite": finite, "batched": len(chunk)}
        if cons is not None:
            row["conservative"] = {k: v[b] for k, v in cons.items()}
        rows.append(row)
    return rows


def audit(model, structures, *, group=SE3, dtype: torch.dtype = torch.float64, layerwise: bool = False,
          n_finite: int = 4, out_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
          seed: int = 0, limit: Optional[int] = None, device: Optional[str] = None,
          batch_size: int = 1) -> AuditReport:
    """Audit ``model`` on ``structures``; see the module docstring.

    ``n_finite``: Haar rotations (and translations, permutations) per structure for the finite companions; 0 skips
    them. ``batch_size > 1`` evaluates that many molecules per call (torch models with a ``batch`` argument; finite
    checks are then per batch). ``device``: where torch models run (``"cpu"``, ``"cuda"``; calculators stay on the CPU).
    ``model``: a :class:`geolie.adapters.Potential`, an ``nn.Module``, an ASE calculator or a model spec string
    (:func:`geolie.adapters.load_model`). ``structures``: ASE ``Atoms`` (a list), or a dataset name with optional
    split (``"xtb-md/aspirin:test"``) or a file path. Errors name the structure and the cause.
    """
    from tqdm import tqdm

    from .adapters import load_model

    group = as_group(group)
    pot = load_model(model, device=device)
    if dtype not in pot.dtypes:
        raise ValueError(f"model {pot.name!r} runs in {[str(d) for d in pot.dtypes]} only, not {dtype}"
                         + (f" ({pot.dtype_note})" if pot.dtype_note else ""))
    sts = _as_structures(structures)
    if limit is not None:
        sts = sts[:limit]
    done: Dict[int, Dict] = {}
    jsonl = csv_path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        jsonl, csv_path = os.path.join(out_dir, "results.jsonl"), os.path.join(out_dir, "structures.csv")
        if resume and os.path.exists(jsonl):
            with open(jsonl) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by an interruption: recomputed below
                        done[r["index"]] = r
            with open(jsonl, "w") as fh:  # rewrite without any partial line
                for r in sorted(done.values(), key=lambda r: r["index"]):
                    fh.write(json.dumps(r) + "\n")
        elif not resume:
            for p in (jsonl, csv_path):
                if os.path.exists(p):
                    os.remove(p)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > 1 and layerwise:
        raise ValueError("layer-wise attribution needs batch_size=1")
    rows = {i: r for i, r in done.items() if i < len(sts)}
    todo = [(i, s) for i, s in enumerate(sts) if i not in done]
    chunks = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(sts), initial=len(rows), desc=f"audit {pot.name}", file=sys.stderr, disable=not progress)
    for chunk in chunks:
        if batch_size == 1:
            new = [_row(pot, chunk[0][1], chunk[0][0], group, dtype, n_finite, layerwise, seed)]
        else:
            new = _rows_batched(pot, chunk, group, dtype, n_finite, seed)
        for row in new:
            rows[row["index"]] = row
            if jsonl:
                with open(jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                _append_csv(csv_path, row, group.generator_names)
        bar.update(len(new))
    bar.close()
    rows = [rows[i] for i in sorted(rows)]
    return AuditReport(pot.name, group.name, str(dtype).replace("torch.", ""), rows, list(group.generator_names),
                       {"n_finite": n_finite, "layerwise": layerwise, "batch_size": batch_size,
                        "dtype_note": pot.dtype_note})


def _append_csv(path, row, gens):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["index", "name", "atoms", "output", "source", "method"] + [f"rel_{g}" for g in gens]
                       + [f"abs_{g}" for g in gens] + [f"floor_{g}" for g in gens]
                       + ["iso_rotation_rel", "ad_check", "ad_fallback", "force_gap_rel", "jacobian_asym_rel"])
        cons = row.get("conservative") or {}
        fallback = " | ".join(n for n in row.get("notes", []) if "adjoint test" in n or "finite differences used" in n)
        for name, o in row["outputs"].items():
            iso = math.sqrt(sum(v * v for v in o["rel"][:3]) / 3)
            w.writerow([row["index"], row["name"], row["atoms"], name, o.get("source", ""), row["method"]] + o["rel"]
                       + o["abs"] + o["floor"] + [iso, "" if o.get("ad_check") is None else o["ad_check"], fallback]
                       + ([cons.get("force_gap_rel", ""), cons.get("jacobian_asym_rel", "")] if name == "forces"
                          else ["", ""]))


def write_report(report: AuditReport, out_dir: str) -> List[str]:
    """``report.json`` and the plots in ``out_dir``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    p = os.path.join(out_dir, "report.json")
    with open(p, "w") as fh:
        json.dump(report.to_dict(), fh, indent=1)
    return [p] + report.plots(out_dir)
