"""Where audit results go as they are computed: ``results.jsonl`` (one row per structure, the record) and
``structures.csv`` (one line per structure and output, derived from the rows), appended after each structure so
that an interruption loses at most the structure in progress; :meth:`ResultStore.resume` reads back what is there,
drops a line cut by an interruption, and rewrites both files from the rows it kept (the CSV always matches the
JSONL). One store per output folder: shards of a larger audit each write their own.

Rows stay on disk: :class:`RowFile` is the sequence of a folder's rows in structure-index order, read when used. It
holds, per row, its index, its file and where its line starts (20 bytes), not the row (2 to 6 KB of JSON), so an
audit, a resume and a merge keep memory bounded by that however many structures they cover.
"""
from __future__ import annotations

import csv
import json
import os
from collections import abc
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._metrics import iso_rotation

__all__ = ["ResultStore", "RowFile", "shard_indices", "parse_shard"]

_PREFIX = b'{"index": '  # every row starts with its index (``_audit._row_of`` builds it first)


def _scan(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(indices, offsets)`` of the complete rows of a ``results.jsonl``, in file order. A line without its final
    newline was cut by an interruption and is left out; so is a line that is not a row."""
    idx: List[int] = []
    off: List[int] = []
    if os.path.exists(path):
        with open(path, "rb") as fh:
            pos = 0
            for line in fh:
                start, pos = pos, pos + len(line)
                if not line.endswith(b"\n") or not line.strip():
                    continue
                i = _index_of(line)
                if i is not None:
                    idx.append(i)
                    off.append(start)
    return np.asarray(idx, dtype=np.int64), np.asarray(off, dtype=np.int64)


def _index_of(line: bytes) -> Optional[int]:
    """The structure index of a row's JSON line (from its first key; the whole line parsed otherwise), or None."""
    if line.startswith(_PREFIX):
        head = line[len(_PREFIX):len(_PREFIX) + 24].split(b",", 1)[0]
        if head.isdigit():
            return int(head)
    try:
        return int(json.loads(line)["index"])
    except (ValueError, KeyError, TypeError):
        return None


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class RowFile(abc.Sequence):
    """Audit rows (dicts) kept in ``results.jsonl`` files and read when used, in increasing structure index; one row
    per index. ``len``, iteration, ``rows[k]`` (the k-th row), ``row(index)`` and ``has(index)`` (by structure index)
    and ``indices`` work without holding the rows: about 20 bytes per row (index, file, offset) against 2 to 6 KB for
    the row itself. Rows are parsed each time they are read."""

    def __init__(self, paths: Sequence[str], indices: np.ndarray, files: np.ndarray, offsets: np.ndarray):
        self.paths = list(paths)
        self._idx = np.asarray(indices, dtype=np.int64)
        self._fid = np.asarray(files, dtype=np.int32)
        self._off = np.asarray(offsets, dtype=np.int64)
        self._ident = [_identity(p) for p in self.paths]  # a file replaced since (a resume, a new audit) is refused

    @classmethod
    def scan(cls, path: str, keep: Optional[Sequence[int]] = None) -> "RowFile":
        """The rows of one ``results.jsonl``: where an index occurs twice the later line counts (as when appending
        after a resume); ``keep``: only these structure indices."""
        idx, off = _scan(path)
        order = np.argsort(idx, kind="stable")
        idx, off = idx[order], off[order]
        last = np.ones(len(idx), dtype=bool)
        last[:-1] = idx[:-1] != idx[1:]  # the last of equal indices is the latest line (stable sort)
        idx, off = idx[last], off[last]
        if keep is not None:
            sel = np.isin(idx, np.asarray(keep, dtype=np.int64))
            idx, off = idx[sel], off[sel]
        return cls([path], idx, np.zeros(len(idx), dtype=np.int32), off)

    @classmethod
    def empty(cls) -> "RowFile":
        z = np.zeros(0, dtype=np.int64)
        return cls([], z, z.astype(np.int32), z)

    @property
    def indices(self) -> np.ndarray:
        """The structure indices held, increasing."""
        return self._idx

    def __len__(self) -> int:
        return len(self._idx)

    def _open(self, f: int):
        fh = open(self.paths[f], "rb")
        st = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) != self._ident[f]:
            fh.close()
            raise ValueError(f"{self.paths[f]} was replaced since its rows were read (a resume or a new audit in that "
                             "folder): read the folder again (ResultStore.rows(), geolie.merge)")
        return fh

    def _line(self, fh, k: int) -> bytes:
        """The k-th row's line, checked to be the row of its structure (an output that is not the one computed
        must not reach a report)."""
        fh.seek(int(self._off[k]))
        line = fh.readline()
        if _index_of(line) != int(self._idx[k]):
            raise ValueError(f"{self.paths[self._fid[k]]}: the line at byte {self._off[k]} is no longer the row of "
                             f"structure {self._idx[k]}: the file changed after it was read")
        return line

    def _parse(self, line: bytes, k: int) -> Dict[str, Any]:
        try:
            return json.loads(line)
        except ValueError as e:
            raise ValueError(f"{self.paths[self._fid[k]]}: row of structure {self._idx[k]} at byte {self._off[k]} is "
                             f"not valid JSON any more ({e}): the file changed after it was read") from None

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"row {k} of {len(self)}")
        return self._parse(self.line(k), k)

    def line(self, k: int) -> bytes:
        """The k-th row's JSON line as stored."""
        with self._open(int(self._fid[k])) as fh:
            return self._line(fh, k)

    def has(self, index: int) -> bool:
        k = int(np.searchsorted(self._idx, index))
        return k < len(self._idx) and int(self._idx[k]) == index

    def row(self, index: int) -> Dict[str, Any]:
        """The row of structure ``index``."""
        if not self.has(index):
            raise KeyError(f"structure {index} has no row here")
        return self[int(np.searchsorted(self._idx, index))]

    def lines(self) -> Iterator[bytes]:
        """The rows' JSON lines as stored (with their newline), in order: for copying without parsing."""
        handles: Dict[int, Any] = {}
        try:
            for k in range(len(self)):
                f = int(self._fid[k])
                if f not in handles:
                    handles[f] = self._open(f)
                yield self._line(handles[f], k)
        finally:
            for fh in handles.values():
                fh.close()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for k, line in enumerate(self.lines()):
            yield self._parse(line, k)

    def __repr__(self) -> str:
        return f"RowFile({len(self)} rows in {self.paths})"


class ResultStore:
    """Append-only per-structure results in ``folder`` (``results.jsonl``, ``structures.csv``, and ``audit.json``
    with what the rows were computed with)."""

    def __init__(self, folder: str, generator_names: Sequence[str], threshold: Optional[float] = None):
        self.folder = folder
        self.threshold = threshold  # the user's threshold: the CSV's verdicts say BREAKS above it
        self.generator_names = list(generator_names)
        os.makedirs(folder, exist_ok=True)
        self.jsonl = os.path.join(folder, "results.jsonl")
        self.csv = os.path.join(folder, "structures.csv")

    def clear(self) -> None:
        """Start afresh: remove earlier results."""
        for p in (self.jsonl, self.csv):
            if os.path.exists(p):
                os.remove(p)

    def rows(self, keep: Optional[Sequence[int]] = None) -> RowFile:
        """The rows stored, in index order, read from disk when used (a line cut by an interruption is skipped:
        that structure is computed again)."""
        return RowFile.scan(self.jsonl, keep)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.folder, "audit.json")

    def write_meta(self, meta: Dict[str, Any]) -> None:
        """What a merge needs to rebuild the report: model, group, dtype, generators, options, shard."""
        with open(self.meta_path, "w") as fh:
            json.dump(meta, fh, indent=1)

    def read_meta(self) -> Dict[str, Any]:
        if not os.path.exists(self.meta_path):
            raise FileNotFoundError(f"{self.folder}: no audit.json (not an audit output folder, or written by an older "
                                    "geolie)")
        with open(self.meta_path) as fh:
            return json.load(fh)

    def resume(self) -> RowFile:
        """The rows already stored, in index order; both files are rewritten (row by row, through temporary files
        that replace them) in index order without any partial line."""
        return self.write_from(self.rows())

    def write_from(self, rows: RowFile) -> RowFile:
        """Replace both files by ``rows`` (copied line by line; the CSV derived from each); returns the rows as they
        now lie in this folder (their new offsets, counted while writing)."""
        tmp_j, tmp_c = self.jsonl + ".tmp", self.csv + ".tmp"
        offsets = np.zeros(len(rows), dtype=np.int64)
        pos = 0
        with open(tmp_j, "wb") as fj, open(tmp_c, "w", newline="") as fc:
            w = csv.writer(fc)
            _csv_header(w, self.generator_names)
            for k, line in enumerate(rows.lines()):
                offsets[k] = pos
                pos += fj.write(line)
                _csv_rows(w, rows._parse(line, k), self.generator_names, self.threshold)
        os.replace(tmp_j, self.jsonl)
        os.replace(tmp_c, self.csv)
        return RowFile([self.jsonl], rows.indices, np.zeros(len(rows), dtype=np.int32), offsets)

    def append(self, row: Dict[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Append rows (each file opened once; every line is written whole, with its newline last)."""
        with open(self.jsonl, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        new = not os.path.exists(self.csv)
        with open(self.csv, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                _csv_header(w, self.generator_names)
            for r in rows:
                _csv_rows(w, r, self.generator_names, self.threshold)


def _csv_header(w, gens) -> None:
    w.writerow(["index", "name", "atoms", "output", "source", "method"] + [f"rel_{g}" for g in gens]
               + [f"abs_{g}" for g in gens] + [f"floor_{g}" for g in gens]
               + ["iso_rotation_rel", "ad_check", "ad_fallback", "force_gap_rel", "jacobian_asym_rel", "stress_gap_rel",
                  "verdict_lie", "verdict_finite", "verdict_hunt", "verdict", "verdict_inversion"])


def _csv_rows(w, row, gens, threshold: Optional[float] = None) -> None:
    """One CSV line per output of ``row``, with its verdicts (:func:`geolie._verdict.row_verdicts`)."""
    from ._verdict import row_verdicts

    verdicts = row_verdicts(row, threshold)
    cons = row.get("conservative") or {}
    fallback = " | ".join(n for n in row.get("notes", []) if "adjoint test" in n or "finite differences used" in n)
    for name, o in row["outputs"].items():
        iso = float(iso_rotation(o["rel"], gens))
        w.writerow([row["index"], row["name"], row["atoms"], name, o.get("source", ""), row["method"]] + o["rel"]
                   + o["abs"] + o["floor"] + [iso, "" if o.get("ad_check") is None else o["ad_check"], fallback]
                   + ([cons.get("force_gap_rel", ""), cons.get("jacobian_asym_rel", "")] if name == "forces"
                      else ["", ""]) + [cons.get("stress_gap_rel", "") if name == "stress" else ""]
                   + [verdicts.get(name, {}).get(k, "") for k in ("lie", "finite", "hunt", "overall", "inversion")])


def shard_indices(atom_counts: Sequence[int], shard: int, n_shards: int) -> List[int]:
    """The structures of shard ``shard`` (0-based) of ``n_shards``, balanced by atom count: structures are taken
    largest first and each goes to the shard with the fewest atoms so far (ties: the lowest shard). Deterministic;
    every structure is in exactly one shard."""
    if not (n_shards >= 1 and 0 <= shard < n_shards):
        raise ValueError(f"shard {shard} of {n_shards}: need 0 <= I < N (written I/N with I from 0)")
    loads = [0] * n_shards
    mine: List[int] = []
    for i in sorted(range(len(atom_counts)), key=lambda i: (-atom_counts[i], i)):
        k = min(range(n_shards), key=lambda k: (loads[k], k))
        loads[k] += int(atom_counts[i])
        if k == shard:
            mine.append(i)
    return sorted(mine)


def parse_shard(spec: str, environ=None) -> Tuple[int, int]:
    """``"I/N"`` (I from 0), or ``"slurm"``: I and N from a Slurm array job (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN``, and ``SLURM_ARRAY_TASK_COUNT``)."""
    env = os.environ if environ is None else environ
    if spec == "slurm":
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ValueError("--shard slurm: not inside a Slurm array job (SLURM_ARRAY_TASK_ID / _COUNT are unset)")
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return i, int(env["SLURM_ARRAY_TASK_COUNT"])
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected I/N (e.g. 0/4) or 'slurm'") from None
    shard_indices([], i, n)  # validates the range
    return i, n
