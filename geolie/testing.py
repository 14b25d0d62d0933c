"""pytest-friendly equivariance assertions for pipelines that gate on geolie's numbers."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._audit import audit
from ._groups import SE3
from ._verdict import FIGURES, gate

__all__ = ["assert_equivariant"]


def assert_equivariant(model, structures, *, group=SE3, dtype: torch.dtype = torch.float64, rtol: float = 1e-6,
                       finite: bool = True, n_finite: int = 2, outputs: Optional[list] = None,
                       limit: Optional[int] = None, hunt=False, figures: Optional[Sequence[str]] = None) -> None:
    """Raise ``AssertionError`` when any figure of an audit of ``model`` on ``structures`` *breaks*: is above its
    measured noise floor and above ``rtol`` (the verdict ``"BREAKS"`` of :mod:`geolie._verdict`, the same verdict the
    CLI's ``--fail-above`` and every report use). The figures are the relative Lie derivatives (each structure,
    output and generator), with ``finite`` the finite checks (rotations, translations, inversion, permutations,
    repeated calls; each against its own floor, measured in the other precision), and with ``hunt`` (``True`` or the
    hunt's options) each structure's worst orientation. ``figures`` chooses explicitly among ``lie``, ``finite`` and
    ``hunt``.

    The message names each failing figure, output, structure, value and floor. ``structures`` and ``model`` are as
    in :func:`geolie.audit`; ``limit`` audits only the first structures.
    """
    if figures is None:
        figures = [f for f in FIGURES if f == "lie" or (f == "finite" and finite) or (f == "hunt" and hunt)]
    # parity (the inversion check) is gated only when named in ``figures``
    rep = audit(model, structures, group=group, dtype=dtype, n_finite=n_finite if "finite" in figures else 0,
                progress=False, limit=limit, hunt=hunt if "hunt" in figures else False, threshold=rtol)
    fails = gate(rep.rows, rtol, figures, outputs, "rel", rep.generator_names)
    if fails:
        more = f"\n... and {len(fails) - 20} more" if len(fails) > 20 else ""
        raise AssertionError(f"{rep.model} is not equivariant within rtol={rtol:g} (above the noise floor):\n  "
                             + "\n  ".join(f.line(rtol) for f in fails[:20]) + more)
