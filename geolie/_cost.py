"""The cost account of an audit: where its time goes, in seconds and in energy+forces evaluations.

An audit runs inside :func:`accounting`; the engine marks its parts with :func:`part` (a no-op outside an account):

* ``base evaluation``: the model's call at the structure with its autograd graph (outputs, forces by autograd);
* ``tangents (<method>)``: the Lie derivatives themselves, per AD strategy or finite differences;
* ``adjoint test``: the reverse passes that verify the AD result;
* ``floors``: the other precision's evaluation, the rounding estimates, the call-to-call noise, a second AD method;
* ``finite companions``: Haar rotations, translations, inversion, permutations, repeated calls, with their floors;
* ``conservativeness``, ``layer-wise attribution``, ``hunt``;
* ``I/O``: rows, CSV, report and plots written;
* ``other``: what no part claims (loading and converting structures, batching, bookkeeping).

Times are exclusive (a part inside another is counted once, in the inner one, except inside the parts that own
everything they call, :data:`ABSORBING`: the floors' own tangents are the floors' cost), so the parts add up to the
wall time of the run. With a reference (``geolie audit --profile``, ``audit(..., profile=True)``) the account also measures,
in the same run, one batched energy+forces call of the same model on the first call's structures (after a warm-up, the
median of at least 3 calls over at least :data:`REFERENCE_SECONDS`; forces by the model's autograd or geolie's
``-dE/dx``, as the audit gets them), and expresses every part per structure in **E+F-equivalents**: seconds per
structure divided by that call's seconds per structure.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = ["CostAccount", "accounting", "part", "table"]

_ACTIVE: List["CostAccount"] = []
#: the E+F reference is timed over at least this many seconds (:meth:`CostAccount.reference`)
REFERENCE_SECONDS = 0.5
#: parts that own everything inside them: the other precision's base evaluation, tangents and adjoint test are
#: the floors' cost; the finite companions', the hunt's and the conservativeness checks' model calls are theirs
ABSORBING = frozenset({"floors", "finite companions", "hunt", "conservativeness", "layer-wise attribution",
                       "reading the data"})


class CostAccount:
    """Exclusive seconds per part (see the module docstring)."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._stack: List[List[Any]] = []  # [name, start of the current uninterrupted stretch]
        self.t0 = time.perf_counter()
        self.wall: Optional[float] = None
        self.ef_seconds_per_structure: Optional[float] = None
        self.ef_structures: int = 0
        self.n_structures: int = 0
        self.excluded = 0.0  # the reference's own time: not part of the run's

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self._stack and self._stack[-1][0] in ABSORBING:  # e.g. the floors' own tangents are the floors' cost
            yield
            return
        now = time.perf_counter()
        if self._stack:  # the enclosing part pauses
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            yield
        finally:
            end = time.perf_counter()
            nm, start = self._stack.pop()
            self.seconds[nm] = self.seconds.get(nm, 0.0) + end - start
            if self._stack:
                self._stack[-1][1] = end  # the enclosing part resumes

    def reference(self, ef_call: Callable[[], Any], n_structures: int, repeat: int = 3,
                  min_seconds: float = REFERENCE_SECONDS, max_repeat: int = 50) -> None:
        """Time ``ef_call`` (one batched energy+forces call of ``n_structures`` structures): warm-up, then the median
        of at least ``repeat`` calls, more (up to ``max_repeat``) until they add up to ``min_seconds`` (every ratio of
        the account divides by this one figure: a short call timed three times is a noisy one). The account's
        E+F-equivalents are per structure against it. Not counted in any part."""
        start = time.perf_counter()
        ef_call()
        ts: List[float] = []
        while len(ts) < repeat or (sum(ts) < min_seconds and len(ts) < max_repeat):
            t = time.perf_counter()
            ef_call()
            ts.append(time.perf_counter() - t)
        self.ef_seconds_per_structure = statistics.median(ts) / max(n_structures, 1)
        self.ef_structures = n_structures
        self.excluded += time.perf_counter() - start

    def close(self, n_structures: int) -> None:
        self.wall = time.perf_counter() - self.t0 - self.excluded
        self.n_structures = n_structures
        claimed = sum(self.seconds.values())
        self.seconds["other"] = max(0.0, self.wall - claimed)

    def to_dict(self) -> Dict[str, Any]:
        ef = self.ef_seconds_per_structure
        n = max(self.n_structures, 1)
        parts = {k: {"seconds": v, "calls": self.calls.get(k, 0),
                     "ef_equivalents_per_structure": (v / n / ef) if ef else None}
                 for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        return {"wall_seconds": self.wall, "structures": self.n_structures, "parts": parts,
                "ef_seconds_per_structure": ef, "ef_reference_structures": self.ef_structures,
                "ef_equivalents_per_structure": (self.wall / n / ef) if ef and self.wall is not None else None}

def table(d: Dict[str, Any]) -> str:
    """A cost account (:meth:`CostAccount.to_dict`, ``report.json``'s ``cost``) as a table."""
    ef = d["ef_seconds_per_structure"]
    lines = [f"cost account: {d['wall_seconds']:.2f} s for {d['structures']} structure(s)"
             + (f"; one energy+forces call: {1e3 * ef:.2f} ms per structure (batched, {d['ef_reference_structures']}"
                f" structures); the audit: {d['ef_equivalents_per_structure']:.1f} E+F-equivalents per structure"
                if ef else " (geolie audit --profile measures E+F-equivalents)"),
             f"  {'part':<34}{'seconds':>9}{'share':>8}" + (f"{'E+F-eq/structure':>18}" if ef else "")]
    wall = d["wall_seconds"] or 1.0
    for k, v in d["parts"].items():
        lines.append(f"  {k:<34}{v['seconds']:>9.3f}{100 * v['seconds'] / wall:>7.1f}%"
                     + (f"{v['ef_equivalents_per_structure']:>18.2f}" if ef else ""))
    return "\n".join(lines)


@contextlib.contextmanager
def accounting() -> Iterator[CostAccount]:
    """Make a new :class:`CostAccount` the active one for the duration (nested audits get their own)."""
    acc = CostAccount()
    _ACTIVE.append(acc)
    try:
        yield acc
    finally:
        _ACTIVE.remove(acc)


def part(name: str):
    """Mark a part of the active account's time (a no-op when no account is active)."""
    return _ACTIVE[-1].part(name) if _ACTIVE else contextlib.nullcontext()
