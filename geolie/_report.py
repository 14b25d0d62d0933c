"""The audit's report: aggregates over structures, tables, plots and ``report.json`` (no computing, no storage).

An :class:`AuditReport` holds the per-structure rows the audit computed (see :mod:`geolie._audit`) and derives
everything else from them: per output and generator the mean, median, p99 and max of the relative Lie derivative,
the isotropic rotation norm (:func:`geolie._metrics.iso_rotation`), the median floor, the worst finite errors, where
each output came from and its worst adjoint-test disagreement, the conservativeness aggregates and the notes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from array import array
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._gallery import Gallery, merged as merged_gallery
from ._metrics import aggregate, iso_rotation
from ._store import ResultStore, RowFile
from ._verdict import ABOVE_FLOOR, AT_FLOOR, BREAKS, row_verdicts, worst

__all__ = ["AuditReport", "write_report", "merge"]


class _Summary:
    """What the report derives from its rows, gathered in one pass over them (rows on disk are read once): per output
    the relative Lie derivatives and relative floors (8 bytes a figure), the finite errors' maxima, the first source,
    the worst adjoint test; the distinct notes, the conservativeness figures, the hunt and layer-wise summaries."""

    KINDS = ("rel", "floor_rel")

    def __init__(self, rows: Sequence[Dict[str, Any]], n_gen: int, threshold: Optional[float] = None):
        self.n_gen = n_gen
        self.verdicts: Dict[str, Dict[str, str]] = {}  # per output and figure (lie, finite, hunt, overall): the worst
        self.counts: Dict[str, Dict[str, int]] = {}  # per output: structures per overall verdict
        self.outputs: List[str] = []
        self.vals: Dict[Tuple[str, str], array] = {}
        self.finite: Dict[str, Dict[str, float]] = {}
        self.source: Dict[str, str] = {}
        self.checks: Dict[str, Optional[float]] = {}
        self.notes: List[str] = []
        seen_notes = set()
        self.cons: Dict[str, List[float]] = {}
        self.hunt: Dict[str, Dict[str, Any]] = {}
        self.layerwise: Dict[str, List[float]] = {}
        for r in rows:
            for name, o in r.get("outputs", {}).items():
                if name not in self.source:
                    self.outputs.append(name)
                    self.source[name] = o.get("source", "")
                    self.checks[name] = None
                for kind in self.KINDS:
                    if o.get(kind) is not None:
                        self.vals.setdefault((name, kind), array("d")).extend(o[kind])
                c = o.get("ad_check")
                if c is not None:
                    self.checks[name] = c if self.checks[name] is None else max(self.checks[name], c)
            for name, fams in r.get("finite", {}).items():
                acc = self.finite.setdefault(name, {})
                for fam, v in fams.items():
                    m = acc.get(fam)
                    acc[fam] = v if m is None or v != v or v > m else m  # NaN wins, as np.max
            for n in r.get("notes", []):
                if n not in seen_notes:
                    seen_notes.add(n)
                    self.notes.append(n)
            for k, v in (r.get("conservative") or {}).items():
                self.cons.setdefault(k, []).append(v)
            self._hunt(r)
            self._verdicts(r, threshold)
            for name, v in (r.get("layerwise") or {}).items():
                if name != "__total__":
                    self.layerwise.setdefault(name, []).append(
                        float(np.sqrt(np.mean(np.square(v["contribution"][:3])))))

    def _verdicts(self, r, threshold) -> None:
        for name, vs in row_verdicts(r, threshold).items():
            acc = self.verdicts.setdefault(name, {})
            for fig, v in vs.items():
                acc[fig] = worst([acc.get(fig, AT_FLOOR), v])
            c = self.counts.setdefault(name, {AT_FLOOR: 0, ABOVE_FLOOR: 0, BREAKS: 0})
            c[vs["overall"]] += 1

    def _hunt(self, r) -> None:
        for name, h in ((r.get("hunt") or {}).get("outputs") or {}).items():
            s = self.hunt.setdefault(name, {"worst_error": -1.0, "structure": None, "random_error": 0.0,
                                            "above_floor": 0, "discontinuous": 0, "n": 0})
            s["n"] += 1
            s["random_error"] = max(s["random_error"], h["random_error"])
            s["above_floor"] += not h["at_floor"]
            s["discontinuous"] += h["discontinuous"] is not None
            if h["worst_error"] > s["worst_error"]:
                s.update(worst_error=h["worst_error"], structure=r["index"], rotation=h["rotation"],
                         axis_angle=h["axis_angle"], found_by=h["found_by"])

    def values(self, output: str, kind: str) -> np.ndarray:
        return np.frombuffer(self.vals.get((output, kind), array("d")), dtype=np.float64).reshape(-1, self.n_gen)


@dataclass
class AuditReport:
    """Per-structure rows and aggregates; ``metric(output, kind)`` gives the value a gate compares.

    ``rows``: a list, or the :class:`geolie._store.RowFile` of an output folder (an audit with ``out_dir`` keeps its
    rows on disk: memory does not grow with them). The aggregates come from one pass over the rows (for rows on
    disk, made once and kept)."""

    model: str
    group: str
    dtype: str
    rows: Sequence[Dict[str, Any]]
    generator_names: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)
    #: the worst structures' atoms and per-atom figures, drawn by report.html (:mod:`geolie._gallery`)
    gallery: List[Dict[str, Any]] = field(default_factory=list)
    #: where the audit's time went (:mod:`geolie._cost`; ``None`` for merged reports)
    cost: Optional[Dict[str, Any]] = None
    _cache: Any = field(default=None, init=False, repr=False, compare=False)

    def _summary(self) -> _Summary:
        threshold = self.meta.get("threshold")
        if not isinstance(self.rows, RowFile):  # rows in memory may be edited: gathered afresh each time
            return _Summary(self.rows, len(self.generator_names), threshold)
        key = (id(self.rows), len(self.generator_names), threshold)  # rows on disk: read once
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _Summary(self.rows, len(self.generator_names), threshold))
        return self._cache[1]

    @property
    def outputs(self) -> List[str]:
        return list(self._summary().outputs)

    def values(self, output: str, kind: str = "rel", generators: Optional[Sequence[str]] = None) -> np.ndarray:
        """``[structures, generators]`` array of ``abs``, ``rel``, ``per_atom``, ``floor`` or ``floor_rel`` for
        ``output`` (structures without it left out)."""
        gens = list(generators or self.generator_names)
        idx = [self.generator_names.index(g) for g in gens]
        if kind in _Summary.KINDS:
            return self._summary().values(output, kind)[:, idx].copy()
        vals = array("d")
        for r in self.rows:
            o = r.get("outputs", {}).get(output)
            if o is None or o.get(kind) is None:
                continue
            vals.extend(o[kind][i] for i in idx)
        return np.frombuffer(vals, dtype=np.float64).reshape(-1, len(idx)).copy()

    def aggregates(self) -> Dict[str, Any]:
        s = self._summary()
        out = {}
        for name in s.outputs:
            rel = s.values(name, "rel")
            iso = iso_rotation(rel, self.generator_names) if rel.size else rel
            out[name] = {g: aggregate(rel[:, k]) for k, g in enumerate(self.generator_names)}
            out[name]["iso_rotation"] = aggregate(iso)
            out[name]["iso_rotation_rms"] = self._rms_with_error(name, iso)
            out[name]["floor_rel_median"] = float(np.nanmedian(s.values(name, "floor_rel"))) if rel.size else None
            out[name]["finite_max_rel"] = {fam: float(v) for fam, v in s.finite.get(name, {}).items()}
            out[name]["source"] = s.source[name]
            out[name]["ad_check_max"] = None if s.checks[name] is None else float(s.checks[name])
            out[name]["verdict"] = dict(s.verdicts.get(name, {}))
            out[name]["structures_by_verdict"] = dict(s.counts.get(name, {}))
        return out

    def verdicts(self) -> Dict[str, Dict[str, str]]:
        """Per output, the worst verdict over structures of each kind of figure (``lie``, ``finite``, ``hunt``) and
        ``overall`` (:mod:`geolie._verdict`; ``BREAKS`` needs the run's threshold, ``meta["threshold"]``)."""
        return {k: dict(v) for k, v in self._summary().verdicts.items()}

    def verdict(self) -> str:
        """The run's verdict: the worst over outputs."""
        return worst(v.get("overall", AT_FLOOR) for v in self._summary().verdicts.values())

    def _rms_with_error(self, name: str, iso: np.ndarray) -> Dict[str, float]:
        """The dataset's RMS isotropic rotation norm ``sqrt(mean_s iso_s²)`` and, for the random estimator, its
        standard error: one independent draw per structure, the standard error of the mean square from their spread,
        carried to the RMS by the delta method (``se/(2·rms)``)."""
        sq = iso ** 2
        if not sq.size:
            return {"value": float("nan"), "stderr": float("nan"), "draws": 0}
        rms = float(np.sqrt(sq.mean()))
        if "r~" not in self.generator_names:
            return {"value": rms, "stderr": 0.0, "draws": 0}
        se_sq = float(sq.std(ddof=1) / np.sqrt(len(sq))) if len(sq) > 1 else float("nan")
        return {"value": rms, "stderr": se_sq / (2 * rms) if rms > 0 else 0.0, "draws": int(len(sq))}

    def conservative_aggregates(self) -> Dict[str, Dict[str, float]]:
        """Aggregates over structures of the force gap and Jacobian asymmetry (models returning their own forces) and of
        the stress gap (models returning their own stress: ``‖σ − (1/V)∂E/∂ε‖/‖σ‖``)."""
        cons = self._summary().cons
        return {k: aggregate(cons[k]) for k in ("force_gap_rel", "jacobian_asym_rel", "stress_gap_rel")
                if cons.get(k)}

    def hunt_summary(self) -> Dict[str, Dict[str, Any]]:
        """Per output, over structures audited with ``hunt``: the worst orientation's error and where, the largest
        random-rotation error, how many structures are above their floor and which jump (discontinuities)."""
        return {k: dict(v) for k, v in self._summary().hunt.items()}

    def notes(self) -> List[str]:
        """Distinct notes of all rows (precision limits, AD methods that failed their check, fallbacks)."""
        return list(self._summary().notes)

    def metric(self, output: Optional[str] = None, kind: str = "rel") -> float:
        """Max over structures and generators (and outputs, when ``output`` is None) of ``kind``."""
        names = [output] if output else self.outputs
        vals = [self.values(n, kind) for n in names]
        vals = [v for v in vals if v.size]
        return float(max(np.nanmax(v) for v in vals)) if vals else 0.0

    def to_dict(self, structures: bool = True) -> Dict[str, Any]:
        """The report as ``report.json`` holds it; ``structures=False`` leaves the rows out (rows on disk are read
        into memory for ``True``)."""
        d = {"model": self.model, "group": self.group, "dtype": self.dtype, "generators": self.generator_names,
             "n_structures": len(self.rows), "verdict": self.verdict(), "threshold": self.meta.get("threshold"),
             "aggregates": self.aggregates(),
             "conservative": self.conservative_aggregates(), "hunt": self.hunt_summary(), "notes": self.notes(),
             "meta": self.meta, "cost": self.cost}
        if structures:
            d["structures"] = list(self.rows)
        return d

    def table(self) -> str:
        agg = self.aggregates()
        gens = self.generator_names
        nw = max([10] + [len(n) + 2 for n in agg])  # the output-name column fits the longest name
        head = (f"{'output':<{nw}}{'stat':<8}" + "".join(f"{g:>10}" for g in gens) + f"{'iso rot':>10}{'floor':>10}"
                + "  verdict (Lie / finite / hunt)")
        thr = self.meta.get("threshold")
        lines = [f"geolie audit: {self.model}, {len(self.rows)} structure(s), {self.group}, {self.dtype}; relative "
                 "Lie derivative ‖L_X y‖/‖y‖; verdict: at floor (indistinguishable from zero), above floor, BREAKS "
                 f"(above floor and above the threshold{f' {thr:g}' if thr is not None else ', none given'})",
                 head, "-" * len(head)]
        for name, a in agg.items():
            for stat in ("median", "max"):
                fl = a["floor_rel_median"]
                v = a["verdict"]
                say = "  " + " / ".join(v[k] for k in ("lie", "finite", "hunt") if k in v) if stat == "median" else ""
                lines.append(f"{name:<{nw}}{stat:<8}" + "".join(f"{a[g][stat]:>10.1e}" for g in gens)
                             + f"{a['iso_rotation'][stat]:>10.1e}" + (f"{fl:>10.1e}" if stat == "median" and
                                                                      fl is not None else f"{'':>10}") + say)
        lines.append("")
        lines.append("where each output comes from; adjoint test of its AD derivative (max relative disagreement):")
        for name, a in agg.items():
            chk = "n/a (finite differences)" if a["ad_check_max"] is None else f"{a['ad_check_max']:.1e}"
            lines.append(f"  {name:<{nw}}{a['source'] or '?':<36}adjoint {chk}")
        cons = self.conservative_aggregates()
        if cons:
            lines.append("")
            lines.append(f"{'conservativeness of the returned forces and stress (0 for derivatives of E):':<60}"
                         "median      max")
            labels = (("force_gap_rel", "|F + dE/dx| / |F|"), ("jacobian_asym_rel", "|antisym dF/dx| / |dF/dx|"),
                      ("stress_gap_rel", "|stress - (1/V) dE/dstrain| / |stress|"))
            for k, label in labels:
                if k in cons:
                    lines.append(f"  {label:<58}{cons[k]['median']:>8.1e} {cons[k]['max']:>8.1e}")
        fams = sorted({f for a in agg.values() for f in a["finite_max_rel"]})
        if fams:
            lines.append("")
            lines.append(f"{'finite':<18}" + "".join(f"{f:>13}" for f in fams) + "  verdict   (max relative error)")
            for name, a in agg.items():
                lines.append(f"{name[:17]:<18}" + "".join(
                    f"{a['finite_max_rel'].get(f, float('nan')):>13.1e}" for f in fams)
                    + f"  {a['verdict'].get('finite', '')}")
            inv = {n: a["verdict"]["inversion"] for n, a in agg.items() if a["verdict"].get("inversion", AT_FLOOR)
                   != AT_FLOOR}
            if inv:
                lines.append("  inversion (parity, not part of the group: not in the verdict; --gate inversion gates "
                             "it): " + ", ".join(f"{n} {v}" for n, v in inv.items()))
        hs = self.hunt_summary()
        if hs:
            lines.append("")
            lines.append("worst orientation found (geolie.hunt; relative finite error, max over structures):")
            lines.append(f"  {'output':<10}{'worst':>10}{'random':>10}  {'structure':<10}{'above floor':>12}"
                         f"{'discontinuous':>15}  {'verdict':<12}found by")
            for name, h in hs.items():
                lines.append(f"  {name[:9]:<10}{h['worst_error']:>10.2e}{h['random_error']:>10.2e}  "
                             f"{h['structure']!s:<10}{h['above_floor']:>7}/{h['n']:<4}{h['discontinuous']:>10}/"
                             f"{h['n']:<4}  {agg.get(name, {}).get('verdict', {}).get('hunt', ''):<12}"
                             f"{h.get('found_by', '')}")
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
        """Per layer, the mean over structures of its RMS contribution to the rotations' Lie derivative."""
        return {k: float(np.mean(v)) for k, v in self._summary().layerwise.items()}

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
            fl_med = float(np.nanmedian(fl)) if fl.size and not np.isnan(fl).all() else float("nan")
            if fl_med > 0:  # a zero floor (exact arithmetic) has no place on the log axis
                ax.axhline(fl_med, color="grey", ls="--", label="noise floor (median)")
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


def write_report(report: AuditReport, out_dir: str) -> List[str]:
    """``report.json``, ``report.html`` (:mod:`geolie._html`: self-contained, for a browser) and the plots in
    ``out_dir``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    p = os.path.join(out_dir, "report.json")
    head = json.dumps(report.to_dict(structures=False), indent=1)
    rows = report.rows
    with open(p, "wb") as fh:  # the rows are streamed, one per line: rows on disk are copied, not held
        fh.write(head[:-2].encode() + b',\n "structures": [')
        lines = rows.lines() if isinstance(rows, RowFile) else ((json.dumps(r) + "\n").encode() for r in rows)
        for k, line in enumerate(lines):
            fh.write((b",\n  " if k else b"\n  ") + line.rstrip(b"\n"))
        fh.write(b"\n ]\n}\n")
    from ._html import write_html

    page = write_html(report, os.path.join(out_dir, "report.html"))
    return [p, page] + report.plots(out_dir)


def _audit_folders(folders: Sequence[str]) -> List[str]:
    """Each folder that holds an ``audit.json``, or its direct subfolders that do (``OUT/shard-I-of-N``)."""
    found: List[str] = []
    for f in folders:
        if os.path.exists(os.path.join(f, "audit.json")):
            found.append(f)
            continue
        subs = sorted(os.path.join(f, d) for d in (os.listdir(f) if os.path.isdir(f) else [])
                      if os.path.exists(os.path.join(f, d, "audit.json")))
        if not subs:
            raise FileNotFoundError(f"merge: {f} holds no audit results (no audit.json in it or its subfolders)")
        found += subs
    return found


def merge(folders: Sequence[str], out_dir: Optional[str] = None, allow_partial: bool = False) -> AuditReport:
    """One report from the output folders of several audits of the same model and structures (shards, or runs
    interrupted and continued elsewhere): the rows are combined by structure index, and ``out_dir`` gets the same
    ``results.jsonl``, ``structures.csv``, ``report.json`` and plots as one run over everything.

    Errors name the folder: different models, groups, dtypes or data sets; one structure with different results in
    two folders; structures that no folder holds (unless ``allow_partial``)."""
    paths = _audit_folders(folders)
    first: Optional[Dict[str, Any]] = None
    key = ("model", "group", "dtype", "generators", "n_structures_total")
    parts: List[RowFile] = []
    for p in paths:
        store = ResultStore(p, [])
        meta = store.read_meta()
        if first is None:
            first = meta
        else:
            if (meta.get("identity") is None) != (first.get("identity") is None):
                raise ValueError(f"merge: {p} and {paths[0]}: one has a run identity and the other none (written by "
                                 "different geolie versions)")
            if meta.get("identity") is not None:
                from ._audit import identity_differences

                diff = identity_differences(first["identity"], meta["identity"])
                if diff:
                    raise ValueError(f"merge: {p} holds another run than {paths[0]}:\n  " + "\n  ".join(diff))
            for k in key:
                if meta.get(k) != first.get(k):
                    raise ValueError(f"merge: {p} has {k} = {meta.get(k)!r}, {paths[0]} has {first.get(k)!r}")
            how = ("batch_size", "batch_atoms", "threshold")  # these change no per-structure figure
            opts = {k: v for k, v in meta["meta"].items() if k not in how}
            if opts != {k: v for k, v in first["meta"].items() if k not in how}:
                raise ValueError(f"merge: {p} was audited with other options ({meta['meta']}) than {paths[0]} "
                                 f"({first['meta']})")
        parts.append(store.rows())
    assert first is not None
    merged = _combine(parts, paths)
    missing = np.setdiff1d(np.arange(first["n_structures_total"]), merged.indices)
    if missing.size and not allow_partial:
        shown = ", ".join(map(str, missing[:10].tolist())) + (" ..." if missing.size > 10 else "")
        raise ValueError(f"merge: {missing.size} structure(s) in no folder ({shown}): a shard is missing or not "
                         "finished (resume it), or pass allow_partial=True")
    if out_dir:
        out = ResultStore(out_dir, list(first["generators"]), first["meta"].get("threshold"))
        merged = out.write_from(merged)
        out.write_meta(dict(first, shard=None, indices=merged.indices.tolist()))
    report = AuditReport(first["model"], first["group"], first["dtype"], merged,
                         list(first["generators"]),
                         dict(first["meta"], merged_from=paths, identity=first.get("identity")), merged_gallery(paths))
    if out_dir:
        Gallery(report.generator_names, folder=out_dir).extend(report.gallery)
        write_report(report, out_dir)
    return report


def _combine(parts: List[RowFile], folders: List[str]) -> RowFile:
    """The rows of several folders by structure index, without reading them, except where one index is in two
    folders: those rows must be equal (else an error names the second folder)."""
    idx = np.concatenate([p.indices for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    fid = np.concatenate([np.full(len(p), k, dtype=np.int32) for k, p in enumerate(parts)]) if parts else idx
    off = np.concatenate([p._off for p in parts]) if parts else idx
    order = np.argsort(idx, kind="stable")  # equal indices keep the folders' order
    idx, fid, off = idx[order], fid[order], off[order]
    everything = RowFile([p.paths[0] for p in parts], idx, fid, off)
    dup = np.nonzero(idx[1:] == idx[:-1])[0]
    for j in dup:  # compared as stored (JSON text: NaN equals NaN there)
        if everything.line(int(j)) != everything.line(int(j) + 1):
            raise ValueError(f"merge: structure {idx[j]} has different results in two folders (the second: "
                             f"{folders[fid[j + 1]]})")
    keep = np.ones(len(idx), dtype=bool)
    keep[dup + 1] = False
    return RowFile(everything.paths, idx[keep], fid[keep], off[keep])
