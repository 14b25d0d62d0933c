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
from typing import Any, Dict, Sequence

from ._metrics import iso_rotation

__all__ = ["ResultStore"]


class ResultStore:
    """Append-only per-structure results in ``folder`` (``results.jsonl`` and ``structures.csv``)."""

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

    def resume(self) -> Dict[int, Dict[str, Any]]:
        """The rows already stored, by structure index; both files are rewritten without any partial line."""
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
            iso = float(iso_rotation(o["rel"]))
            w.writerow([row["index"], row["name"], row["atoms"], name, o.get("source", ""), row["method"]] + o["rel"]
                       + o["abs"] + o["floor"] + [iso, "" if o.get("ad_check") is None else o["ad_check"], fallback]
                       + ([cons.get("force_gap_rel", ""), cons.get("jacobian_asym_rel", "")] if name == "forces"
                          else ["", ""]))
