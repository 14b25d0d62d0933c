"""pytest-friendly equivariance assertions for pipelines that gate on geolie's numbers."""
from __future__ import annotations

from typing import Optional

import torch

from ._audit import audit
from ._groups import SE3
from ._metrics import FLOOR_FACTOR

__all__ = ["assert_equivariant"]


def assert_equivariant(model, structures, *, group=SE3, dtype: torch.dtype = torch.float64, rtol: float = 1e-6,
                       floor_factor: float = FLOOR_FACTOR, finite: bool = True, n_finite: int = 2,
                       outputs: Optional[list] = None, limit: Optional[int] = None) -> None:
    """Raise ``AssertionError`` unless every output's relative Lie derivative (each structure, each generator) is
    below ``rtol`` or within ``floor_factor`` times its noise floor (by default the factor that defines "at floor" in
    every report, :data:`geolie._metrics.FLOOR_FACTOR`, so that the gate and the report agree), and (with ``finite``) the finite rotation,
    translation and permutation errors are below ``rtol``.

    The message names the output, the generator, the structure, the value and how far above the floor it is.
    ``structures`` and ``model`` are as in :func:`geolie.audit`; ``limit`` audits only the first structures.
    """
    rep = audit(model, structures, group=group, dtype=dtype, n_finite=n_finite, progress=False, limit=limit)
    problems = []
    for row in rep.rows:
        for name, o in row["outputs"].items():
            if outputs and name not in outputs:
                continue
            for k, g in enumerate(rep.generator_names):
                rel, fl = o["rel"][k], o["floor_rel"][k]
                if rel > rtol and not rel <= floor_factor * fl:
                    ratio = rel / fl if fl > 0 else float("inf")
                    problems.append(f"output {name!r}, generator {g}, structure {row['index']} ({row['name']}): "
                                    f"relative Lie derivative {rel:.3e} > rtol {rtol:.1e}, {ratio:.1e}x its noise "
                                    f"floor {fl:.1e}")
        if finite:
            for name, fams in row.get("finite", {}).items():
                if outputs and name not in outputs:
                    continue
                for fam in ("rotation", "translation", "permutation"):
                    if fam in fams and fams[fam] > rtol:
                        problems.append(f"output {name!r}, finite {fam}s, structure {row['index']} ({row['name']}): "
                                        f"max relative error {fams[fam]:.3e} > rtol {rtol:.1e}")
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"{rep.model} is not equivariant within rtol={rtol:g}:\n  " + "\n  ".join(problems[:20])
                             + more)
