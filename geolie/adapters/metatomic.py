r"""Exported metatomic models (``metatomic-torch``): ``--model metatomic:PATH`` for an ``AtomisticModel`` file
(TorchScript, what PET-MAD and other universal potentials ship as; it runs unchanged in ASE, LAMMPS, i-PI, TorchSim).

The file is loaded with metatomic's own loader (``load_atomistic_model``: TorchScript, no unpickling of Python
objects). geolie reads its capabilities: the outputs it declares (an ``energy`` per structure is audited; forces are
``−∂E/∂x`` and, for periodic cells, stress the strain derivative, both computed by geolie through the model's graph),
its length and energy units (reported), its atomic types (refused elements are named) and its dtype (the model runs
in that one; floors are the one-precision estimates, :mod:`geolie._verdict`). Its neighbour-list requests are served
by vesin's metatomic helper (``vesin.metatomic.compute_requested_neighbors``) from the positions the engine moves, so
the pair vectors carry the derivatives.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .._evaluation import Evaluation, check_known_outputs
from ._graph import ModelFileError, check_file, require
from ._protocol import Adapter, Structure


def _mta():
    return require("metatomic.torch", "metatomic", "metatomic-torch")


class MetatomicAdapter(Adapter):
    """An exported metatomic ``AtomisticModel`` (see the module docstring)."""

    def __init__(self, model, path: str = "", name: str = ""):
        mta = _mta()
        if not isinstance(model, torch.nn.Module) or not mta.is_atomistic_model(model):
            raise TypeError(f"expected a metatomic AtomisticModel, got {type(model).__name__}")
        self._module = model
        caps = model.capabilities()
        self.capabilities = caps
        if "energy" not in caps.outputs:
            raise ValueError(f"metatomic:{path}: the model declares outputs {sorted(caps.outputs)}, no 'energy'; "
                             "geolie audits energy models (forces and stress follow from it)")
        self.dtypes = ({"float32": torch.float32, "float64": torch.float64}[caps.dtype],)
        self.elements = [int(t) for t in caps.atomic_types]
        out = caps.outputs["energy"]
        self.units = {"length": caps.length_unit, "energy": out.unit}
        self.dtype_note = (f"a metatomic model runs in its exported dtype ({caps.dtype}); units: length "
                           f"{caps.length_unit or '?'}, energy {out.unit or '?'}")
        self.name = name or f"metatomic:{path}"
        self.path = path

    def _energy_fn(self, st: Structure):
        mta = _mta()
        from vesin.metatomic import compute_requested_neighbors

        model, dtype = self._module, self.dtypes[0]
        periodic = st.cell is not None
        types = torch.as_tensor(st.numbers, dtype=torch.int32, device=self.device)
        options = mta.ModelEvaluationOptions(length_unit="angstrom",
                                             outputs={"energy": mta.ModelOutput(quantity="energy",
                                                                                unit=self.units["energy"],
                                                                                per_atom=False)})

        def energy(pos, z, cell=None):
            c = cell if periodic else torch.zeros(3, 3, dtype=dtype, device=pos.device)
            pbc = torch.tensor([periodic] * 3, device=pos.device)
            system = mta.System(types=types, positions=pos, cell=c, pbc=pbc)
            compute_requested_neighbors([system], system_length_unit="angstrom", model=model)
            out = model([system], options, check_consistency=False)
            e = out["energy"].block().values.reshape(-1)
            check_known_outputs({"energy": e}, pos.shape[0], 1, f"{st.name}: {self.name}")
            return e.sum()

        return energy

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        from .torch_module import _augmented

        if dtype not in self.dtypes:
            raise ValueError(f"{self.name}: the model runs in {self.dtypes[0]} only, not {dtype}")
        pos, z = self.inputs(st, dtype)
        energy = self._energy_fn(st)
        periodic = st.cell is not None
        keys = ["energy", "forces"] + (["stress"] if periodic else [])
        # forces and stress by torch.autograd.grad with create_graph (vesin's neighbour search reads the positions'
        # memory, which torch.func's wrapped tensors do not have: geolie.conservative cannot serve here)
        fn = _augmented(lambda p, zz, c=None: {"energy": energy(p, zz, c)}, keys, {"energy": None}, periodic, 1, False)
        reps = {"energy": "scalar", "forces": "vector", "stress": "stress"}
        sources = {"forces": "-dE/dx (geolie)", "stress": "strain derivative (geolie)"}
        if periodic:
            cell = torch.as_tensor(st.cell, dtype=dtype, device=self.device)
            return Evaluation(fn, (pos, z, cell), ("point", None, "cell"), {k: reps[k] for k in keys},
                              sources={k: sources[k] for k in keys if k in sources}, method=self.method,
                              notes=[self.dtype_note])
        return Evaluation(fn, (pos, z), ("point", None), {k: reps[k] for k in keys},
                          sources={"forces": sources["forces"]}, method=self.method, notes=[self.dtype_note])


def load(path: str) -> MetatomicAdapter:
    """``metatomic:PATH``: an exported ``AtomisticModel`` (TorchScript). A missing, corrupt or foreign file gives one
    :class:`ModelFileError` naming the file and what it is not."""
    mta = _mta()
    check_file(path, "metatomic")
    try:
        model = mta.load_atomistic_model(path)
    except Exception as e:  # noqa: BLE001 - not a metatomic export (another package's file, truncated, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"metatomic: {path!r} is not an exported metatomic model ({first})") from None
    return MetatomicAdapter(model, path=path)
