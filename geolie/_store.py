"""Where audit results go as they are computed: ``results.jsonl`` (one row per structure, the record) and
``structures.csv`` (one line per structure and output, derived from the rows), appended after each structure so
that an interruption loses at most the structure in progress; :meth:`ResultStore.resume` reads back what is there,
drops a line cut by an interruption, and rewrites both files from the rows it kept (the CSV always matches the
JSONL). One store per output folder: shards of a larger audit each write their own.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from ._metrics import iso_rotation

__all__ = ["ResultStore", "shard_indices", "parse_shard"]


class ResultStore:
    """Append-only per-structure results in ``folder`` (``results.jsonl``, ``structures.csv``, and ``audit.json``
    with what the rows were computed with)."""

    def __init__(self, folder: str, generator_names: Sequence[str]):
        self.folder = folder
        self.generator_names = list(generator_names)
        os.makedirs(folder, exist_ok=True)
        self.jsonl = os.path.join(folder, "results.jsonl")
        self.csv = os.path.join(folder, "structures.csv")

    def clear(self) -> None:
        """Start afresh: remove earlier results."""
        for p in (self.jsonl, self.csv):
            if os.path.exists(p):
                os.remove(p)

    def load(self) -> Dict[int, Dict[str, Any]]:
        """The rows stored, by structure index (read only; a line cut by an interruption is skipped)."""
        done: Dict[int, Dict[str, Any]] = {}
        if os.path.exists(self.jsonl):
            with open(self.jsonl) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by an interruption: that structure is computed again
                        done[r["index"]] = r
        return done

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

    def resume(self) -> Dict[int, Dict[str, Any]]:
        """The rows already stored, by structure index; both files are rewritten without any partial line."""
        done = self.load()
        self.clear()
        for r in sorted(done.values(), key=lambda r: r["index"]):
            self.append(r)
        return done

    def append(self, row: Dict[str, Any]) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        _append_csv(self.csv, row, self.generator_names)


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
            iso = float(iso_rotation(o["rel"], gens))
            w.writerow([row["index"], row["name"], row["atoms"], name, o.get("source", ""), row["method"]] + o["rel"]
                       + o["abs"] + o["floor"] + [iso, "" if o.get("ad_check") is None else o["ad_check"], fallback]
                       + ([cons.get("force_gap_rel", ""), cons.get("jacobian_asym_rel", "")] if name == "forces"
                          else ["", ""]))


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
