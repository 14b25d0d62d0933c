"""ASE calculators (EMT, tblite, any ``Calculator``) as geolie potentials, differentiated by finite differences.

A calculator returns numpy arrays and is not differentiable, so its Lie derivatives are Richardson-extrapolated
central differences of the finite group action (``method="fd"``), in float64, with their error estimate as the
noise floor. Periodic structures pass their cell (rows rotate with the positions; stress is returned as
``[3, 3]`` and rotates as a tensor).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import _evaluation as ev_mod
from .._evaluation import Evaluation
from ._protocol import Adapter, Structure


class CalculatorAdapter(Adapter):
    """Wrap an ASE calculator (an instance, or a zero-argument factory for a fresh one per call)."""

    method = "fd"
    dtypes = (torch.float64,)
    dtype_note = "an ASE calculator returns float64 numpy arrays: differentiated by finite differences in float64"

    def __init__(self, calc, name: str = "", elements=None, stress: Optional[bool] = None):
        self._calc = calc
        self.name = name or type(calc).__name__
        self.elements = elements
        self.stress = stress

    def _new_calc(self):
        from ase.calculators.calculator import BaseCalculator

        return self._calc if isinstance(self._calc, BaseCalculator) else self._calc()

    def evaluation(self, st: Structure, dtype) -> Evaluation:
        periodic = st.cell is not None
        want_stress = periodic if self.stress is None else self.stress
        calc = self._new_calc()

        def fn(pos, z, cell=None):
            from ase import Atoms

            at = Atoms(numbers=np.asarray(z), positions=np.asarray(pos.detach().cpu(), dtype=np.float64),
                       cell=None if cell is None else np.asarray(cell.detach().cpu(), dtype=np.float64),
                       pbc=cell is not None)
            at.calc = calc
            out = {"energy": torch.tensor([at.get_potential_energy()], dtype=torch.float64),
                   "forces": torch.as_tensor(at.get_forces(), dtype=torch.float64)}
            if want_stress:
                out["stress"] = torch.as_tensor(at.get_stress(voigt=False), dtype=torch.float64)
            return out

        x = [torch.as_tensor(st.positions, dtype=torch.float64), torch.as_tensor(st.numbers)]
        in_rep = ["point", None]
        out_rep = {"energy": "scalar", "forces": "vector"}
        if periodic:
            x.append(torch.as_tensor(st.cell, dtype=torch.float64))
            in_rep.append("cell")
        if want_stress:
            out_rep["stress"] = "stress"
        return Evaluation(fn, tuple(x), tuple(in_rep), out_rep, sources={k: ev_mod.CALCULATOR for k in out_rep},
                          method=self.method, notes=[self.dtype_note])


EMT_ELEMENTS = (1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79)


def emt():
    """ASE's EMT (Al, Ni, Cu, Pd, Ag, Pt, Au; H, C, N, O experimental)."""
    from ase.calculators.emt import EMT

    return CalculatorAdapter(EMT, name="emt", elements=EMT_ELEMENTS)
