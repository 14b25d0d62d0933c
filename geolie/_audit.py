"""``geolie.audit``: how equivariant is a model on a set of structures, where does it break, does it pass a gate.

For every structure: the Lie derivatives of each output along the group's generators (absolute, relative,
per atom, with noise floors, via :func:`geolie.measure`), the finite companions (Haar rotations, translations,
inversion, atom permutations, repeated calls: :func:`geolie.finite_equivariance_error`), and on request the
layer-wise attribution of the energy's Lie derivative (:mod:`geolie._layerwise`). Aggregates over structures:
mean, median, p99, max. With an output folder, each structure's result is appended to ``results.jsonl`` and
``structures.csv`` as soon as it is computed; ``resume=True`` skips the structures already there.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._conservative import conservativeness, stress_gap
from ._cost import accounting, part
from ._finite import finite_equivariance_error
from ._gallery import Gallery
from ._groups import SE3, PerStructureDirections, as_group, random_directions
from ._hunt import hunt as hunt_orientation
from ._lie import GeolieADCheckWarning, GeolieFallbackWarning
from ._metrics import measure
from ._report import AuditReport
from ._store import ResultStore, RowFile, shard_indices
from ._verdict import at_floor, precision_scale, verdict
from .adapters._protocol import Adapter, NotBatchableError

__all__ = ["audit"]


def _as_structure(s, i: int):
    """One input structure as a :class:`geolie.adapters.Structure`: an ASE ``Atoms``, a ``Structure``, a
    ``geolie.data.ShapeSample``, or a graph with ``pos`` ``[N, 3]`` and ``z`` (or ``atomic_numbers``) ``[N]`` and an
    optional ``cell`` (``[3, 3]`` or PyG's ``[1, 3, 3]``, rows are lattice vectors; periodic unless ``pbc`` is all
    false), such as a torch-geometric ``Data`` (read by duck typing: no torch-geometric import here)."""
    from .adapters import Structure

    if isinstance(s, Structure):
        return s
    if hasattr(s, "get_positions"):
        return Structure.from_atoms(s)
    if hasattr(s, "points") and hasattr(s, "label"):  # a geolie.data.ShapeSample
        p = s.points.detach().double().numpy()
        return Structure(np.zeros(len(p), dtype=np.int64), p, None, f"{s.name}#{i}")
    z = getattr(s, "z", None)
    z = getattr(s, "atomic_numbers", None) if z is None else z
    pos = getattr(s, "pos", None)
    if pos is not None and z is not None:
        pos = torch.as_tensor(pos).detach().cpu().double().numpy()
        z = torch.as_tensor(z).detach().cpu().long().reshape(-1).numpy()
        if pos.ndim != 2 or pos.shape[1] != 3 or len(z) != len(pos):
            raise ValueError(f"structure {i}: pos must be [N, 3] and z [N], got {list(pos.shape)} and {list(z.shape)}")
        cell = getattr(s, "cell", None)
        pbc = getattr(s, "pbc", None)
        if cell is not None:
            cell = torch.as_tensor(cell).detach().cpu().double().reshape(-1)
            if cell.numel() != 9:
                raise ValueError(f"structure {i}: cell must be [3, 3] (or [1, 3, 3]), got {cell.numel()} numbers")
            periodic = pbc is None or bool(torch.as_tensor(pbc).any())
            cell = cell.reshape(3, 3).numpy() if periodic else None
        return Structure(z, pos, cell, str(getattr(s, "name", "") or f"{type(s).__name__}#{i}"))
    raise TypeError(f"structure {i}: expected ase.Atoms, a geolie Structure, a ShapeSample or a graph with pos and z "
                    f"(torch-geometric Data), got {type(s).__name__}")


def _as_structures(structures) -> List:
    if isinstance(structures, str):
        from .data import load

        name, _, split = structures.partition(":")
        structures = load(name, split or "all")
    out = [_as_structure(s, i) for i, s in enumerate(structures)]
    if not out:
        raise ValueError("audit: no structures given")
    return out


def _checked_counts(counts: List[int], what: str) -> List[int]:
    """Atom counts of a lazily read source, refused when it holds no structure or an empty one (``what`` names it)."""
    if not counts:
        raise ValueError(f"{what}: contains no structures")
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"{what}: structure {empty[0]} is empty (no atoms)")
    return counts


class _Fingerprint:
    """A hash of structures (atomic numbers, positions, cell), fed one structure at a time; ``add`` returns its atom
    count."""

    def __init__(self):
        import hashlib

        self.h = hashlib.sha256()

    def add(self, st) -> int:
        self.h.update(np.ascontiguousarray(st.numbers, dtype=np.int64).tobytes())
        self.h.update(np.ascontiguousarray(st.positions, dtype=np.float64).tobytes())
        if st.cell is not None:
            self.h.update(np.ascontiguousarray(st.cell, dtype=np.float64).tobytes())
        return len(st.numbers)

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


#: the fields of a run's identity: ``--resume`` and ``merge`` refuse a folder whose identity differs in any of them
IDENTITY_FIELDS = ("model", "model_fingerprint", "data", "data_fingerprint", "dtype", "group", "generators",
                   "estimator", "seed", "geolie_version")


def run_identity(pot, structures, src, group, dtype, names, estimator: str, seed: int) -> Dict[str, Any]:
    """What a run's rows depend on: model (name and weights' fingerprint), data (what was given and a fingerprint of
    the structures audited), dtype, group, generators, estimator, seed and geolie's version."""
    from . import __version__

    data = str(structures) if isinstance(structures, (str, os.PathLike)) else type(structures).__name__
    return {"model": pot.name, "model_fingerprint": pot.fingerprint(),
            "data": data, "data_fingerprint": src.fingerprint,
            "dtype": str(dtype).replace("torch.", ""), "group": group.name, "generators": list(names),
            "estimator": estimator, "seed": seed, "geolie_version": __version__}


def identity_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """One line per identity field that differs (``old``: a folder's ``identity``, ``new``: this run's)."""
    return [f"{k}: the folder has {old.get(k)!r}, this run has {new.get(k)!r}" for k in IDENTITY_FIELDS
            if old.get(k) != new.get(k)]


class _IndexedSource:
    """A dataset read item by item (``len`` and ``[i]``: a torch-geometric dataset, a torch ``Dataset``): one pass at
    the start counts atoms, later each item is converted when the audit reaches it (bounded memory for datasets that
    load items on demand)."""

    def __init__(self, data):
        self.data = data
        fp = _Fingerprint()
        self.counts = _checked_counts([fp.add(_as_structure(data[i], i)) for i in range(len(data))],
                                      f"audit: the dataset ({type(data).__name__})")
        self.fingerprint = fp.hexdigest()

    def iterate(self, indices):
        for i in indices:
            yield i, _as_structure(self.data[i], i)


class _FileSource:
    """Structures of a file read lazily with ``ase.io.iread`` (bounded memory whatever the file's size): one pass
    at the start counts each structure's atoms (for totals and atom-balanced shards), later passes yield the
    structures asked for, one at a time."""

    def __init__(self, path: str):
        from .adapters import Structure

        self.path = path
        fp = _Fingerprint()
        self.counts = _checked_counts([fp.add(Structure.from_atoms(at)) for at in self._iread()], path)
        self.fingerprint = fp.hexdigest()

    def _iread(self):
        import ase.io

        try:
            if self.path.endswith((".xyz.gz", ".extxyz.gz")):
                import gzip

                with gzip.open(self.path, "rt") as fh:
                    yield from ase.io.iread(fh, index=":", format="extxyz")
            else:
                yield from ase.io.iread(self.path, index=":")
        except Exception as e:  # noqa: BLE001 - any parse failure: one clear error naming the file
            raise ValueError(f"{self.path}: cannot be read by ase.io ({type(e).__name__}: {e}); is it truncated or "
                             "corrupt?") from None

    def iterate(self, indices):
        """``(index, structure)`` for increasing ``indices`` (any iterable: nothing is materialised)."""
        from .adapters import Structure

        it = iter(indices)
        want = next(it, None)
        for i, at in enumerate(self._iread()):
            if want is None:
                return
            if want < i:
                raise ValueError(f"internal: structure indices must increase ({want} after {i - 1})")
            if i == want:
                yield i, Structure.from_atoms(at)
                want = next(it, None)


class _ListSource:
    """Structures already in memory (a list, or a bundled dataset)."""

    def __init__(self, structures):
        self.items = _as_structures(structures)
        fp = _Fingerprint()
        self.counts = [fp.add(s) for s in self.items]
        self.fingerprint = fp.hexdigest()

    def iterate(self, indices):
        for i in indices:
            yield i, self.items[i]


def _source(structures):
    """A file path that is not a bundled dataset name is streamed, a dataset object (``len`` and ``[i]``, not a list)
    is read item by item; a list or a bundled dataset's name is held in memory."""
    if isinstance(structures, (str, os.PathLike)) and os.path.isfile(str(structures)):
        return _FileSource(str(structures))
    if hasattr(structures, "get_positions"):  # one ase.Atoms
        return _ListSource([structures])
    if (not isinstance(structures, (str, list, tuple)) and hasattr(structures, "__len__")
            and hasattr(structures, "__getitem__")):
        return _IndexedSource(structures)
    return _ListSource(structures)


def _sample(m, b: int) -> Dict[str, Any]:
    """One sample's figures of an :class:`OutputMetrics`, as stored in a row."""
    return {"rep": m.rep, "source": m.source, "abs": m.abs[b].tolist(), "rel": m.rel[b].tolist(),
            "floor": m.floor[b].tolist(), "floor_rel": m.floor_rel[b].tolist(),
            "per_atom": None if m.per_atom is None else m.per_atom[b].tolist(), "at_floor": m.at_floor[b].tolist(),
            "floor_source": m.floor_source, "ad_check": m.ad_check, "norm": float(m.ynorm[b]),
            # per atom, for report.html: taken out of the row by the gallery (geolie._gallery) before it is stored
            "per_point": None if m.per_point is None else [float(f"{v:.4g}") for v in m.per_point[b].tolist()]}


def _measure(ev, ev_ref, group, where, floors: bool = True):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeolieADCheckWarning)
            warnings.simplefilter("always", GeolieFallbackWarning)
            rep = measure(ev, group=group, f_ref=ev_ref, floor=floors and (ev_ref is not None or ev.method != "fd"))
    except NotBatchableError:
        raise
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for w in caught:  # said once more, naming the structure; the notes keep them in the report
        if issubclass(w.category, (GeolieADCheckWarning, GeolieFallbackWarning)):
            warnings.warn(f"{where}: {w.message}", w.category, stacklevel=3)
            msg = str(w.message)
            if not any(n and n in msg for n in rep.notes):  # no silent fallback: the row says why (once)
                rep.notes.append(msg)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rep


def _conservative_figures(ev, n_structures: int, method: str = "") -> Optional[Dict[str, List[float]]]:
    """Force gap and Jacobian asymmetry (:func:`geolie.conservativeness`) for models that return forces themselves
    (not for outputs automatic differentiation cannot reach: the Lie derivatives then fell back to finite
    differences, ``method``, and the row's notes say why)."""
    if ev.method == "fd" or method.startswith("fd"):
        return None
    out: Dict[str, List[float]] = {}
    if ev.has_model_forces:
        c = conservativeness(ev.fn, ev.inputs, batch=ev.batch)
        out.update({k: [float(v) for v in c[k][:n_structures]] for k in c})
    if ev.has_model_stress:  # one periodic structure per call
        out["stress_gap_rel"] = [stress_gap(ev.fn, ev.inputs, cell_index=ev.in_rep.index("cell"))]
    return out or None


def _figures(pot, evaluate, where, group, dtype, n_finite, seed, n_structures, permutation, floors=True,
             stack_atoms=512):
    """What one call of the model yields, one structure or a batch: the evaluation, its :class:`Report` (the other
    precision as reference when the model runs in it, unless ``floors`` is False: then only the rounding estimate,
    to be raised to the sampled floor), the conservativeness figures and the finite errors (their group elements
    stacked into calls of at most ``stack_atoms`` atoms, the audit's batch budget: a model's memory is sized by it)."""
    with part("preparing the call"):
        ev = evaluate(dtype)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    with part("floors"):
        ref = evaluate(other) if floors and other in pot.dtypes else None
    rep = _measure(ev, ref, group, where, floors)
    with part("conservativeness"):
        cons = _conservative_figures(ev, n_structures, rep.method)
    finite: List[Dict[str, Any]] = [{"finite": {}} for _ in range(n_structures)]
    if n_finite > 0:
        with part("finite companions"):
            finite = _finite_figures(ev, ref, group, n_finite, seed, permutation, rep.problem, stack_atoms,
                                     n_structures, floors, other)
    return ev, rep, cons, finite


def _finite_figures(ev, ref, group, n_finite, seed, permutation, problem, stack_atoms, n_structures, floors, other
                    ) -> List[Dict[str, Any]]:
    """Per structure, the finite errors (``finite[output][family]``: max relative error) and their floors and
    verdicts (``finite_floor[output][family]``: ``floor`` (relative, of the worst trial), ``above`` (the largest
    relative error of a trial above its floor), ``verdict``), measured against the other precision (``ref``) or the
    input-rounding estimate; with ``floors`` False none (zero: the audit raises them to the sampled floor)."""
    fin = finite_equivariance_error(ev, group=group, n=n_finite, parity=True, permutation=permutation,
                                    n_permutations=1, generator=torch.Generator().manual_seed(seed), problem=problem,
                                    stack_atoms=stack_atoms, reference=ref if floors else None, floor=floors)
    if not floors:
        src = "none (raised to the sampled floor)"
    elif ref is not None:
        scaled = precision_scale(ev.inputs[0].dtype, other, ev.precision) < 1
        src = "float32 vs float64 at the same moved inputs" + (" (scaled by u64/u32)" if scaled else "")
    else:
        src = "input-rounding estimate (the model runs in one precision)"

    def per(v, key, whole, b):
        return v[key][b] if key in v else v[whole]

    out = []
    for b in range(n_structures):  # each structure's own figures (a batch's per-structure rows)
        maxrel, floor = {}, {}
        for name, fams in fin.errors.items():
            maxrel[name] = {fam: per(v, "per_sample_max_rel", "max_rel", b) for fam, v in fams.items()}
            floor[name] = {}
            for fam, v in fams.items():
                fl, above = per(v, "per_sample_floor_rel", "floor_rel", b), per(v, "per_sample_above",
                                                                                "max_above_floor", b)
                floor[name][fam] = {"floor": fl, "above": above,
                                    "verdict": verdict(maxrel[name][fam], fl, above_floor=above)}
        out.append({"finite": maxrel, "finite_floor": floor, "finite_floor_source": src})
    return out


#: a model whose repeated identical calls differ by more than this many machine epsilons is called non-deterministic
NONDETERMINISM_EPS = 1000


def nondeterminism_notes(finite: Dict[str, Dict[str, float]], dtype: torch.dtype) -> List[str]:
    """A note for each output whose ``repeat`` figure (the same input twice) exceeds :data:`NONDETERMINISM_EPS`
    machine epsilons: the model draws random numbers (or reduces in a varying order) inside its call, so finite
    errors below that level measure the randomness, and the adjoint test, which compares two calls, is bounded by it."""
    eps = torch.finfo(dtype).eps
    notes = []
    for name, fams in finite.items():
        r = fams.get("repeat")
        if r is not None and r > NONDETERMINISM_EPS * eps:
            notes.append(f"{name}: not deterministic, two identical calls differ by more than {NONDETERMINISM_EPS} "
                         "machine epsilons (each row's finite 'repeat'): finite errors below that measure the model's "
                         "randomness, and the adjoint test, comparing two calls, is limited by it")
    return notes


def _row_of(i, st, rep, b: int, cons, finite, dtype: torch.dtype = torch.float64) -> Dict[str, Any]:
    """One structure's row; ``finite``: its ``finite``, ``finite_floor`` and ``finite_floor_source`` entries."""
    notes = list(rep.notes) + nondeterminism_notes(finite["finite"], dtype)
    row: Dict[str, Any] = {"index": i, "name": st.name, "atoms": int(len(st.numbers)), "method": rep.method,
                           "outputs": {name: _sample(m, b) for name, m in rep.outputs.items()}, "notes": notes}
    if cons is not None:
        row["conservative"] = {k: v[b] for k, v in cons.items()}
    row.update(finite)
    return row


def _row(pot, st, index, group, dtype, n_finite, layerwise, seed, floors=True, stack_atoms=512):
    where = f"structure {index} ({st.name})"
    pot.check(st, where)
    # atoms are permuted within the structure (per-atom flags from the evaluation)
    ev, rep, cons, finite = _figures(pot, lambda d: pot.evaluation(st, d), where, group, dtype, n_finite,
                                     seed, 1, {}, floors, stack_atoms)
    with part("metrics and rows"):
        row = _row_of(index, st, rep, 0, cons, finite[0], dtype)
    if layerwise:
        target = pot.layerwise_target(st, dtype)
        if target is None:
            row["layerwise"] = None
        else:
            from ._layerwise import layerwise_attribution

            module, f, out_rep, *more = target
            kw = dict(more[0]) if more else {}
            if out_rep is not None:
                kw["out_rep"] = out_rep
            with part("layer-wise attribution"):
                row["layerwise"] = layerwise_attribution(module, f, ev.inputs[0], group=group, **kw)
    return row


def _rows_batched(pot, chunk, group, dtype, n_finite, seed, floors=True, stack_atoms=512):
    """Rows for several molecules evaluated in one batched call: per-structure Lie derivatives, floors and finite
    errors (the batch is rotated, translated and permuted within structures at once, with the same group elements
    as a structure audited alone), the same figures as one call per structure (tested)."""
    idx = [i for i, _ in chunk]
    sts = [st for _, st in chunk]
    for i, st in chunk:
        pot.check(st, f"structure {i} ({st.name})")
    _, rep, cons, finite = _figures(pot, lambda d: pot.batch_evaluation(sts, d), f"structures {idx[0]}-{idx[-1]}",
                                    group, dtype, n_finite, seed, len(chunk), {}, floors, stack_atoms)
    with part("metrics and rows"):
        return [dict(_row_of(i, st, rep, b, cons, finite[b], dtype), batched=len(chunk))
                for b, (i, st) in enumerate(chunk)]


def floor_sample_indices(n_total: int, k: int) -> List[int]:
    """``k`` structures evenly spread over all ``n_total`` (global indices: every shard samples the same ones)."""
    if k <= 0 or n_total <= k:
        return list(range(n_total))
    return sorted({int(round(v)) for v in np.linspace(0, n_total - 1, k)})


def _sampled_floor(rows: List[Dict[str, Any]]) -> Dict[Any, Any]:
    """Per output and generator, the median relative floor measured on the sampled structures, and per output and
    finite family the median relative floor of its checks (key ``("finite", output, family)``). The median, not the
    largest: a floor set too high could call a real break "at floor", the one error an audit must not make; one
    set a little low only flags noise (and a finite figure above it is measured again, :func:`_confirm_finite`)."""
    vals: Dict[Any, List] = {}
    for r in rows:
        for name, o in r["outputs"].items():
            vals.setdefault(name, []).append([x if x == x else float("nan") for x in o["floor_rel"]])
        for name, fams in (r.get("finite_floor") or {}).items():
            for fam, info in fams.items():
                vals.setdefault(("finite", name, fam), []).append([info["floor"]])
    out: Dict[Any, Any] = {}
    for key, v in vals.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaNs (zero outputs) gives NaN
            med = np.nanmedian(np.array(v, dtype=np.float64), axis=0)
        med = [0.0 if m != m else float(m) for m in med]
        out[key] = med[0] if isinstance(key, tuple) else med
    return out


def _apply_sampled_floor(row: Dict[str, Any], sampled: Dict[Any, Any], indices: List[int]) -> bool:
    """A structure outside the floor sample: its Lie floor is its own rounding estimate, raised to the sample's median
    relative floor times its own norm; its finite floors are the sample's median relative floors; ``at_floor`` and
    the verdicts follow. Returns whether a finite figure is above that floor (then it is measured at this
    structure's own inputs, :func:`_confirm_finite`, so that "above floor" always rests on a measurement)."""
    for name, o in row["outputs"].items():
        rel_floor = sampled.get(name)
        if rel_floor is None:
            continue
        fl = [max(f, rf * o["norm"]) for f, rf in zip(o["floor"], rel_floor)]
        o["floor"] = fl
        o["floor_rel"] = [f / o["norm"] if o["norm"] > 0 else float("nan") for f in fl]
        o["at_floor"] = [at_floor(a, f) for a, f in zip(o["abs"], fl)]
        o["floor_source"] = (f"{o['floor_source']}, raised to the median relative floor measured on the "
                             f"{len(indices)} sampled structures")
    row["floor_sampled"] = False
    above = False
    for name, fams in row.get("finite", {}).items():
        for fam, v in fams.items():
            fl = sampled.get(("finite", name, fam), 0.0)
            up = 0.0 if at_floor(v, fl) else v
            row.setdefault("finite_floor", {}).setdefault(name, {})[fam] = {
                "floor": fl, "above": up, "verdict": verdict(v, fl, above_floor=up)}
            above |= up > 0
    if "finite_floor" in row:
        row["finite_floor_source"] = f"median relative floor measured on the {len(indices)} sampled structures"
    return above


def _confirm_finite(pot, st, row, group, dtype, n_finite, seed, stack_atoms) -> None:
    """Measure the finite checks' floors at this structure's own inputs (the same group elements as its row's), for a
    row whose finite figures are above the sampled floor: its ``finite_floor`` is replaced by the measured one."""
    other = torch.float32 if dtype == torch.float64 else torch.float64
    with part("finite companions"):
        ev = pot.evaluation(st, dtype)
        ref = pot.evaluation(st, other) if other in pot.dtypes else None
        figs = _finite_figures(ev, ref, group, n_finite, seed, {}, None, stack_atoms, 1, True, other)[0]
    row["finite_floor"] = figs["finite_floor"]
    row["finite_floor_source"] = figs["finite_floor_source"] + " (measured: above the sampled floor)"


def _chunks(todo, batch_size: Optional[int], batch_atoms: int, pot):
    """The calls of an audit, lazily from an iterator of ``(index, structure)``: ``batch_size`` structures each when
    given; else consecutive structures that ``pot`` can batch, up to ``batch_atoms`` atoms per call (one structure
    per call where ``pot`` is ``None`` or cannot)."""
    cur: List = []
    atoms = 0
    for item in todo:
        if batch_size is not None:
            cur.append(item)
            if len(cur) == batch_size:
                yield cur
                cur = []
            continue
        n = len(item[1].numbers)
        if pot is None or not pot.can_batch(item[1]):
            if cur:
                yield cur
            yield [item]
            cur, atoms = [], 0
            continue
        if cur and atoms + n > batch_atoms:
            yield cur
            cur, atoms = [], 0
        cur.append(item)
        atoms += n
    if cur:
        yield cur


def audit(model, structures, *, group=SE3, dtype: torch.dtype = torch.float64, layerwise: bool = False,
          n_finite: int = 4, out_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
          seed: int = 0, limit: Optional[int] = None, device: Optional[str] = None,
          batch_size: Optional[int] = None, hunt: Any = False, shard: Optional[Tuple[int, int]] = None,
          estimator: str = "exact", batch_atoms: int = 512, floor_sample: Optional[int] = 8,
          threshold: Optional[float] = None, profile: bool = False) -> AuditReport:
    """Audit ``model`` on ``structures``; see the module docstring.

    ``n_finite``: Haar rotations (and translations) per structure for the finite companions, with one random
    permutation within each structure, the inversion and a repeated call (the same group elements for every
    structure, drawn from ``seed``); 0 skips them.
    Batching: by default (``batch_size=None``) consecutive molecules share one call up to ``batch_atoms`` atoms (the
    finite companions' group elements are stacked into calls of the same budget,
    :func:`geolie.finite_equivariance_error`), for
    adapters that can batch them (torch models with a ``batch`` argument; periodic cells, layer-wise attribution and
    hunts go one by one); ``batch_size=N`` takes N molecules per call instead, ``batch_size=1`` none. Every
    per-structure figure (Lie derivatives, floors, finite errors, conservativeness) is the same whatever the
    batching, to the floor (tested). ``device``: where torch models run (``"cpu"``, ``"cuda"``; calculators stay on the CPU).
    ``hunt``: also search each structure for its worst orientation (:func:`geolie.hunt`; ``True``, or a dict of its
    options); the rotated structures go to ``out_dir/hunt/``.
    ``shard=(I, N)``: audit only shard ``I`` of ``N`` (balanced by atom count, :func:`geolie._store.shard_indices`);
    structures keep their global indices, and :func:`geolie.merge` combines the shards' folders into the report of
    one run over everything.
    ``floor_sample``: the noise floor (the other precision's evaluation, or a second AD method) is measured on this
    many structures, evenly spread over the data set (the same in every shard), and reused: every other structure's
    floor is its own rounding estimate raised to the sample's median relative floor times its norm (rows say
    which: ``floor_sampled``). ``None`` or 0 measures it on every structure. The finite checks' floors likewise: the
    sampled structures measure them against the other precision, the others take the sample's median relative floor,
    and a structure whose finite error is above that floor is measured at its own inputs (its row says so).
    ``threshold``: the user's threshold (``--fail-above``): figures above their floor and above it are ``BREAKS`` in
    the CSV, the table and ``report.json`` (:mod:`geolie._verdict`); gate with :func:`geolie._verdict.gate`.
    With ``out_dir`` the folder records the run's identity (:func:`run_identity`); ``resume`` refuses a folder whose
    identity differs (a ``ValueError`` naming each field) and changes nothing in it.
    ``estimator``: ``"exact"`` (default: every generator, ``rx ry rz [tx ty tz]``) or ``"random"``: one uniformly random
    rotation axis ``r~`` (and translation direction ``t~`` for SE(3)) per structure, also within a batch
    (:class:`geolie._groups.PerStructureDirections`), drawn from ``seed`` and the structure's index (batch-, resume-
    and shard-invariant). Its square is an unbiased estimate of the squared isotropic norm (``Directions``): aggregates
    (``iso_rotation_rms`` with its standard error) at one or two directional derivatives per structure instead of
    three or six. Each row records its ``direction``.
    ``model``: a :class:`geolie.adapters.Adapter`, an ``nn.Module``, an ASE calculator or a model spec string
    (:func:`geolie.adapters.load_model`). ``structures``: ASE ``Atoms`` (one, or a list), a dataset name with
    optional split (``"xtb-md/aspirin:test"``), a file path, or a dataset object read item by item (``len`` and
    ``[i]``: a torch-geometric dataset of ``Data`` with ``pos`` and ``z``, optional ``cell``). A file is streamed
    (``ase.io.iread``: one pass counts atoms, the audit then reads structures as it goes): its structures are never
    all in memory. With ``out_dir`` the rows are not held either: each call's rows are appended to ``results.jsonl``
    and the report reads them from there (:class:`geolie._store.RowFile`), so memory grows by the few figures per
    structure the aggregates keep, not by the rows (2 to 6 KB each); without it the rows are returned in memory.
    Errors name the structure and the cause.
    ``profile``: also time one batched energy+forces call of the model in the same run (first call's structures), so
    that the cost account (``report.cost``: seconds per part of the audit, :mod:`geolie._cost`, always kept; in
    ``report.json``) gives each part in E+F-equivalents per structure.
    """
    with accounting() as acc:
        report = _audit(acc if profile else None, model, structures, group=group, dtype=dtype, layerwise=layerwise,
                        n_finite=n_finite, out_dir=out_dir, resume=resume, progress=progress, seed=seed, limit=limit,
                        device=device, batch_size=batch_size, hunt=hunt, shard=shard, estimator=estimator,
                        batch_atoms=batch_atoms, floor_sample=floor_sample, threshold=threshold)
    acc.close(len(report.rows))
    report.cost = acc.to_dict()
    return report


def _audit(profile_account, model, structures, *, group, dtype, layerwise, n_finite, out_dir, resume, progress, seed,
           limit, device, batch_size, hunt, shard, estimator, batch_atoms, floor_sample, threshold) -> AuditReport:
    """:func:`audit`'s work (its account active); ``profile_account``: time the E+F reference on the first call."""
    from tqdm import tqdm

    from .adapters import load_model

    group = as_group(group)
    if estimator not in ("exact", "random"):
        raise ValueError(f"estimator must be 'exact' or 'random', got {estimator!r}")
    if estimator == "random" and hunt:
        raise ValueError("hunt searches orientations with every generator: use estimator='exact' with hunt")
    names = group.generator_names if estimator == "exact" else random_directions(group).generator_names
    pot = load_model(model, device=device)
    _check_options(pot, dtype, batch_size, batch_atoms, layerwise)
    with part("reading the data"):
        src = _source(structures)
    counts = src.counts if limit is None else src.counts[:limit]
    n_total = len(counts)
    # which structures are this run's, done, to skip: arrays of a few bytes per structure, not Python sets
    mine = np.arange(n_total) if shard is None else np.asarray(shard_indices(counts, *shard), dtype=np.int64)
    done = RowFile.empty()  # rows from an earlier run (resume), on disk
    store = ResultStore(out_dir, names, threshold) if out_dir else None
    run_meta = {"n_finite": n_finite, "layerwise": layerwise, "batch_size": batch_size, "batch_atoms": batch_atoms,
                "dtype_note": pot.dtype_note, "threshold": threshold,
                "hunt": bool(hunt), "seed": seed, "estimator": estimator, "floor_sample": floor_sample or 0}
    identity = run_identity(pot, structures, src, group, dtype, names, estimator, seed)
    if store is not None:
        done = _open_store(store, resume, identity, {
            "model": pot.name, "group": group.name, "dtype": str(dtype).replace("torch.", ""),
            "generators": list(names), "meta": run_meta, "identity": identity, "n_structures_total": n_total,
            "shard": None if shard is None else list(shard), "indices": mine.tolist()})
    is_mine = np.zeros(n_total, dtype=bool)
    is_mine[mine] = True
    is_done = np.zeros(n_total, dtype=bool)
    d = done.indices
    is_done[d[(d >= 0) & (d < n_total)]] = True  # rows past a changed --limit are kept on disk, not counted
    n_done = int((is_done & is_mine).sum())
    bar = tqdm(total=len(mine), initial=n_done, desc=f"audit {pot.name}", file=sys.stderr, disable=not progress)
    run = _Rows(pot, group, dtype, n_finite, seed, batch_atoms, batch_size, layerwise, estimator, hunt, out_dir,
                store, bar, Gallery(names, folder=out_dir, resume=resume))
    if profile_account is not None and len(mine):  # the E+F reference: the first call's structures, batched
        first = next(_chunks(src.iterate(int(i) for i in mine[:256]), batch_size, batch_atoms, pot))
        profile_account.reference(_ef_call(pot, [st for _, st in first], dtype), len(first))
    sample: List[int] = floor_sample_indices(n_total, floor_sample) if floor_sample else []
    sampled_floor = _floor_sample(run, src, done, sample, is_done, is_mine) if sample else None
    skip = is_done.copy()
    skip[sample] = True
    todo = src.iterate(int(i) for i in mine[~skip[mine]])  # lazily: a file is read as the audit goes
    for chunk in _chunks(todo, batch_size, batch_atoms, pot if not (layerwise or hunt) else None):
        new = run.compute(chunk, not sample)
        for row, (_, st) in zip(new, chunk):
            if sample and _apply_sampled_floor(row, sampled_floor, sample):
                _confirm_finite(pot, st, row, group, dtype, n_finite, seed, batch_atoms)
        run.finish(new, [st for _, st in chunk])
    bar.close()
    kept_rows = store.rows(keep=mine) if store is not None else [run.rows[i] for i in sorted(run.rows)]
    return AuditReport(pot.name, group.name, str(dtype).replace("torch.", ""), kept_rows, list(names),
                       dict(run_meta, identity=identity), run.gallery.entries)


def _ef_call(pot, sts, dtype):
    """One energy+forces call of ``pot`` on ``sts`` (batched where it can), as the audit gets them: for the cost
    account's reference (:mod:`geolie._cost`)."""
    ev = pot.batch_evaluation(sts, dtype) if len(sts) > 1 else pot.evaluation(sts[0], dtype)

    def call():
        with torch.enable_grad():
            out = ev.fn(*ev.inputs)
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    return call


class _Rows:
    """An audit's rows as they are made: ``compute`` a call's rows (batched where the model can, one draw of the
    random estimator per structure), ``finish`` them (hunts) and store them (the folder, or ``rows`` in memory)."""

    def __init__(self, pot, group, dtype, n_finite, seed, batch_atoms, batch_size, layerwise, estimator, hunt,
                 out_dir, store, bar, gallery: Gallery):
        self.gallery = gallery  # the worst structures' atoms and per-atom figures, for report.html
        self.pot, self.group, self.dtype, self.n_finite, self.seed = pot, group, dtype, n_finite, seed
        self.batch_atoms, self.batch_size, self.layerwise, self.estimator = batch_atoms, batch_size, layerwise, estimator
        self.hunt, self.out_dir, self.store, self.bar = hunt, out_dir, store, bar
        self.rows: Dict[int, Dict] = {}  # without out_dir: the rows, in memory (with it, they stay on disk)
        self.unbatchable = False

    def _directions(self, chunk):
        """The group each structure is differentiated along: the group, or one random draw per structure (from the
        seed and its index, whatever the batching) stacked for a batch."""
        if self.estimator != "random":
            return self.group, {}
        draws = {i: random_directions(self.group, torch.Generator().manual_seed(1_000_003 * self.seed + i))
                 for i, _ in chunk}
        g = draws[chunk[0][0]]
        if len(chunk) > 1:
            counts_ = torch.tensor([len(st.numbers) for _, st in chunk])
            g = PerStructureDirections(self.group, torch.stack([draws[i].C for i, _ in chunk]),
                                       torch.repeat_interleave(torch.arange(len(chunk)), counts_), g.generator_names)
        return g, draws

    def compute(self, chunk, floors: bool) -> List[Dict[str, Any]]:
        g, draws = self._directions(chunk)
        new = None
        if len(chunk) > 1 and not self.unbatchable:
            try:
                new = _rows_batched(self.pot, chunk, g, self.dtype, self.n_finite, self.seed, floors, self.batch_atoms)
            except NotBatchableError:
                if self.batch_size is not None:  # the user asked for batches: say why there are none
                    raise
                self.unbatchable = True  # geolie chose to batch: go one structure per call from here on
        if new is None:
            new = [_row(self.pot, st, i, draws.get(i, g), self.dtype, self.n_finite, self.layerwise, self.seed,
                        floors, self.batch_atoms) for i, st in chunk]
        for row in new:
            if draws:
                row["direction"] = draws[row["index"]].C.tolist()
        return new

    def finish(self, new_rows, sts) -> None:
        """A call's rows, finished (hunts) and stored together (a batch's rows are computed together anyway)."""
        for row, st in zip(new_rows, sts):
            if self.hunt:
                opts = dict(self.hunt) if isinstance(self.hunt, dict) else {}
                opts.setdefault("seed", self.seed + row["index"])
                opts.setdefault("tag", f"{row['index']}_{row['name']}")
                with part("hunt"):
                    opts.setdefault("stack_atoms", self.batch_atoms)  # one memory budget for every stacked call
                    res = hunt_orientation(self.pot, st, group=self.group, dtype=self.dtype,
                                           out_dir=os.path.join(self.out_dir, "hunt") if self.out_dir else None,
                                           **opts)
                row["hunt"] = res.to_dict()
            with part("I/O"):
                self.gallery.offer(row, st)
            if self.store is None:
                self.rows[row["index"]] = row
        if self.store is not None:
            with part("I/O"):
                self.store.extend(new_rows)
        self.bar.update(len(new_rows))


def _floor_sample(run: "_Rows", src, done: RowFile, sample: List[int], is_done, is_mine) -> Dict[Any, Any]:
    """The floor sample first, batched as the run batches (the same calls in every shard; rows of an earlier run
    reused): its measured floors, pooled (:func:`_sampled_floor`). Its rows that are this run's are stored."""
    kept = [done.row(i) for i in sample if is_done[i]]
    sample_rows = [r for r in kept if r.get("floor_sampled")]
    have = {r["index"] for r in sample_rows}
    todo = src.iterate([i for i in sample if i not in have])
    for chunk in _chunks(todo, run.batch_size, run.batch_atoms, run.pot if not (run.layerwise or run.hunt) else None):
        rows = run.compute(chunk, True)
        for row in rows:
            row["floor_sampled"] = True
        sample_rows += rows
        mine = [(row, st) for row, (i, st) in zip(rows, chunk) if is_mine[i] and not is_done[i]]
        if mine:
            run.finish([r for r, _ in mine], [st for _, st in mine])
    return _sampled_floor(sample_rows)


def _check_options(pot, dtype, batch_size, batch_atoms, layerwise) -> None:
    """Refuse options the model or each other rule out, before anything is computed."""
    if dtype not in pot.dtypes:
        raise ValueError(f"model {pot.name!r} runs in {[str(d) for d in pot.dtypes]} only, not {dtype}"
                         + (f" ({pot.dtype_note})" if pot.dtype_note else ""))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_atoms < 1:
        raise ValueError(f"batch_atoms must be >= 1, got {batch_atoms}")
    if batch_size is not None and batch_size > 1 and layerwise:
        raise ValueError("layer-wise attribution needs batch_size=1")
    if batch_size is not None and batch_size > 1 and type(pot).batch_evaluation is Adapter.batch_evaluation:
        raise ValueError(f"{pot.name}: this model cannot evaluate several structures per call; use batch_size=1")


def _open_store(store: ResultStore, resume: bool, identity: Dict[str, Any], meta: Dict[str, Any]) -> RowFile:
    """The output folder made ready: with ``resume`` its identity checked (another run's folder is refused, untouched)
    and its rows kept, else emptied; the run's ``audit.json`` written. Returns the rows already there."""
    done = RowFile.empty()
    if resume:
        _check_resumable(store, identity)
        done = store.resume()
    else:
        store.clear()
    store.write_meta(meta)
    return done


def _check_resumable(store: ResultStore, identity: Dict[str, Any]) -> None:
    """Refuse to resume into a folder holding another run (before anything in it is touched)."""
    if not os.path.exists(store.meta_path):
        if os.path.exists(store.jsonl):
            raise ValueError(f"--resume: {store.folder} holds results without an audit.json: cannot tell which run "
                             "they belong to; audit into a new folder")
        return
    old = store.read_meta().get("identity")
    if old is None:
        raise ValueError(f"--resume: {store.folder} was written by an older geolie without a run identity; audit into "
                         "a new folder")
    diff = identity_differences(old, identity)
    if diff:
        raise ValueError(f"--resume: {store.folder} holds another run; nothing was changed. Differences:\n  "
                         + "\n  ".join(diff))
