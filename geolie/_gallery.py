"""The structures ``report.html`` draws: the ``k`` worst of an audit, kept aside from its rows.

A row holds a structure's figures (a few KB, whatever its size); drawing a structure needs its atoms and one Lie
derivative magnitude per atom, which would make rows grow with the structure. So the audit offers each finished row
to a :class:`Gallery`, which takes the per-atom magnitudes out of the row (rows keep their size) and keeps them, with
the structure's geometry, for the ``k`` rows with the largest relative rotational Lie derivative (any output). Memory
is bounded by ``k`` structures; with an output folder the gallery is ``gallery.json`` there, rewritten when it
changes, so a resumed run continues it and :func:`geolie.merge` combines the shards' galleries (the top ``k`` of
their union is the top ``k`` of the whole run).

An entry: ``index``, ``name``, ``atoms``, ``score`` (the ranking figure), ``geometry`` (``numbers``, ``positions``
in Å rounded to 1e-5 for display, ``cell`` rows or ``None``), ``outputs`` (per output with one row per atom: its
``per_point`` magnitudes ``sqrt(mean_k ‖L_{X_k} y_i‖²)`` over the rotation generators, absolute, 4 significant
digits, and the structure's ``floor`` per generator) and ``hunt`` (the row's hunt, when it was hunted).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Gallery", "GALLERY_SIZE"]

GALLERY_SIZE = 6
FILE = "gallery.json"


def score(row: Dict[str, Any], generator_names: Sequence[str]) -> float:
    """The largest relative rotational Lie derivative of ``row`` over its outputs (NaN ignored; 0 if none)."""
    best = 0.0
    for o in row.get("outputs", {}).values():
        for g, v in zip(generator_names, o.get("rel") or []):
            if g.startswith("r") and v is not None and not math.isnan(v):
                best = max(best, float(v))
    return best


def _geometry(st) -> Dict[str, Any]:
    return {"numbers": np.asarray(st.numbers).tolist(), "positions": np.round(st.positions, 5).tolist(),
            "cell": None if st.cell is None else np.asarray(st.cell).tolist()}


class Gallery:
    """The ``k`` worst structures of an audit (see the module docstring); ``folder``: keep ``gallery.json`` there."""

    def __init__(self, generator_names: Sequence[str], k: int = GALLERY_SIZE, folder: Optional[str] = None,
                 resume: bool = False):
        self.names, self.k = list(generator_names), k
        self.path = os.path.join(folder, FILE) if folder else None
        self.entries: List[Dict[str, Any]] = []
        if self.path and resume and os.path.exists(self.path):
            self.entries = self.read(self.path)
        elif self.path:
            self._write()

    @staticmethod
    def read(path: str) -> List[Dict[str, Any]]:
        with open(path) as fh:
            return json.load(fh)["structures"]

    def offer(self, row: Dict[str, Any], st) -> None:
        """Take the per-atom magnitudes out of ``row``; keep them and ``st``'s geometry if the row ranks in the top
        ``k``."""
        per_point = {name: o.pop("per_point", None) for name, o in row.get("outputs", {}).items()}
        s = score(row, self.names)
        if len(self.entries) >= self.k and s <= self.entries[-1]["score"]:
            return
        if any(e["index"] == row["index"] for e in self.entries):
            return
        outs = {name: {"per_point": pp, "floor": row["outputs"][name]["floor"]}
                for name, pp in per_point.items() if pp is not None}
        self.entries.append({"index": row["index"], "name": row.get("name", ""), "atoms": row.get("atoms"),
                             "score": s, "geometry": _geometry(st), "outputs": outs, "hunt": row.get("hunt")})
        self.entries = top(self.entries, self.k)
        self._write()

    def extend(self, entries: Sequence[Dict[str, Any]]) -> None:
        """Add finished entries (another folder's: :func:`geolie.merge`) and keep the top ``k``."""
        self.entries = top(self.entries + list(entries), self.k)
        self._write()

    def _write(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"k": self.k, "structures": self.entries}, fh)
        os.replace(tmp, self.path)


def top(entries: List[Dict[str, Any]], k: int) -> List[Dict[str, Any]]:
    """The ``k`` entries with the largest score (ties: the lower index first), one per structure index."""
    seen, out = set(), []
    for e in sorted(entries, key=lambda e: (-e["score"], e["index"])):
        if e["index"] not in seen:
            seen.add(e["index"])
            out.append(e)
    return out[:k]


def merged(folders: Sequence[str], k: int = GALLERY_SIZE) -> List[Dict[str, Any]]:
    """The top ``k`` of the galleries of several audit folders (folders without one contribute nothing)."""
    entries: List[Dict[str, Any]] = []
    for f in folders:
        p = os.path.join(f, FILE)
        if os.path.exists(p):
            entries += Gallery.read(p)
    return top(entries, k)
