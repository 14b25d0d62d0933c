"""Pretrained potentials whose weights ship inside their wheels and load offline (optional extras).

* ``ani1x``: the ANI-1x 8-model ensemble from ``torchani`` 2.2.4 (``pip install "geolie[pretrained]"``; it
  needs ``setuptools<81`` because torchani imports ``pkg_resources``). torchani's own ``ANI1x()`` tries to download
  its parameters; this loader reads the files inside the wheel (``resources/ani-1x_8x``): the AEV constants, the
  self-energies and the eight networks. Elements H, C, N, O; energies converted from Hartree to eV.

* ``sevenn-0``: SevenNet-0 (11Jul2024) from the ``sevenn`` wheel (``pip install "geolie[sevenn]"``), with its own
  forces (see :class:`SevenNetAdapter`).

* ``chgnet``: CHGNet 0.3.0 from the ``chgnet`` wheel (``pip install "geolie[chgnet]"``), molecules and crystals
  (see :class:`CHGNetAdapter`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._registry import install_hint

import numpy as np

from .. import _evaluation as ev_mod
from .._evaluation import Evaluation
from ._protocol import Adapter, with_autograd
from .torch_module import TorchAdapter

HARTREE_EV = 27.211386245988


def _near_base(pos, z, p0, z0, tol: float = 1e-3) -> bool:
    """At (or infinitesimally near) the structure the neighbour graph was built for: same atoms in the same order,
    positions within ``tol`` Å. Finite rotations, translations and permutations move farther and rebuild it."""
    return torch.equal(z.cpu(), z0) and float((pos.detach().cpu().double() - p0.double()).abs().max()) <= tol


def _require(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError as e:
        raise ValueError(f"the {package!r} package is needed for this model ({e}); install it with "
                         f"{install_hint(extra)}") from None


class ANIPotential(torch.nn.Module):
    """``forward(z, pos, batch=None) -> energy [B]`` in eV around a torchani model; several molecules (``batch``)
    are padded to one ``[B, n_max]`` call (torchani's padding species ``-1``)."""

    def __init__(self, model, species):
        super().__init__()
        self.model = model
        table = torch.full((119,), -1, dtype=torch.long)
        from ase.data import atomic_numbers

        for i, s in enumerate(species):
            table[atomic_numbers[s]] = i
        self.register_buffer("table", table)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        species = self.table[z]
        if bool((species < 0).any()):
            raise ValueError("ANI-1x handles H, C, N, O only")
        if batch is None:
            e = self.model((species[None], pos[None])).energies
            return (e * HARTREE_EV).to(pos.dtype).reshape(1)
        B = int(batch.max()) + 1
        counts = torch.bincount(batch, minlength=B)
        slot = torch.arange(len(z), device=z.device) - (torch.cumsum(counts, 0) - counts)[batch]
        n_max = int(counts.max())
        sp = torch.full((B, n_max), -1, dtype=species.dtype, device=z.device).index_put((batch, slot), species)
        xyz = pos.new_zeros(B, n_max, 3).index_put((batch, slot), pos)
        e = self.model((sp, xyz)).energies
        return (e * HARTREE_EV).to(pos.dtype).reshape(B)


def ani1x() -> TorchAdapter:
    """The ANI-1x ensemble as a geolie potential (energy in eV, forces by autograd)."""
    _require("setuptools", "pretrained")
    torchani = _require("torchani", "pretrained")
    d = os.path.join(os.path.dirname(torchani.__file__), "resources", "ani-1x_8x")
    if not os.path.isdir(d):
        raise ValueError(f"torchani's wheel has no {d}: install torchani==2.2.4 (pip install 'geolie[pretrained]')")
    consts = torchani.neurochem.Constants(os.path.join(d, "rHCNO-5.2R_16-3.5A_a4-8.params"))
    model = torchani.nn.Sequential(
        torchani.AEVComputer(**consts),
        torchani.neurochem.load_model_ensemble(consts.species, os.path.join(d, "train"), 8),
        torchani.neurochem.load_sae(os.path.join(d, "sae_linfit.dat")),
    )
    pot = TorchAdapter(ANIPotential(model, consts.species), name="ani1x")
    pot.elements = (1, 6, 7, 8)
    return pot


class SevenNetAdapter(TorchAdapter):
    """SevenNet-0 (``sevenn``, an e3nn NequIP-style model) with its own forces.

    The deployed model takes edge vectors (``data["edge_vec"]``) and computes forces from their gradient with
    ``torch.autograd.grad`` inside (``create_graph`` follows ``model.training``). geolie builds the neighbour graph
    once per structure with sevenn's own ``unlabeled_atoms_to_graph`` (held fixed; a call with reordered atoms
    rebuilds it), recomputes the edge vectors from the positions it differentiates, and runs the model in training
    mode (it has no dropout or batch statistics) so that its forces can be differentiated: forward-over-reverse,
    exact.
    """

    def __init__(self, name: str = "sevenn-0", checkpoint: str = "7net-0"):
        _require("sevenn", "sevenn")
        from sevenn.calculator import SevenNetCalculator

        calc = SevenNetCalculator(checkpoint, device="cpu")
        super().__init__(calc.model, name=name, cutoff=float(calc.cutoff), kind="sevenn")
        self.method = "jvp"
        self.dtypes = (torch.float32,)
        self.dtype_note = ("float32 only: e3nn's generated code inside the SevenNet-0 checkpoint holds float32 "
                           "constants and a float64 copy fails ('both inputs should have same dtype'); the floor is "
                           "measured in float32 (rounding estimate and the difference of two AD methods)")

    def _prepare(self, m):
        return m.train()  # create_graph=True in its force computation: its forces can be differentiated

    def _graph(self, numbers, positions, dtype):
        from ase import Atoms
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        at = Atoms(numbers=numbers, positions=positions)
        data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(at, self.cutoff, with_shift=False))
        for k, v in data.items():
            if isinstance(v, torch.Tensor):
                data[k] = v.to(device=self.device, dtype=dtype if v.is_floating_point() else v.dtype)
        src, dst = data["edge_index"]
        if not torch.allclose(data["pos"][dst] - data["pos"][src], data["edge_vec"], atol=1e-5):
            raise RuntimeError("sevenn's edge_vec convention is not pos[dst] - pos[src] (periodic shifts?)")
        return data

    @staticmethod
    def _with_pos(data, pos):
        data = data.clone()
        src, dst = data["edge_index"]
        data["pos"] = pos
        data["edge_vec"] = pos[dst] - pos[src]
        return data

    def _fn(self, st, dtype):
        m = self.copy_for(dtype)
        base = self._graph(st.numbers, st.positions, dtype)
        z0, p0 = torch.as_tensor(st.numbers), torch.as_tensor(st.positions)

        def fn(pos, z):
            data = base if _near_base(pos, z, p0, z0) else self._graph(z.cpu().numpy(), pos.detach().cpu().numpy(), dtype)
            out = m(self._with_pos(data, with_autograd(pos)))
            return {"energy": out["inferred_total_energy"].reshape(1), "forces": out["inferred_force"]}

        return fn

    def evaluation(self, st, dtype):
        notes = self._cache.get(self.device, dtype)[1] + [self.dtype_note]
        return Evaluation(self._fn(st, dtype), self.inputs(st, dtype), ("point", None),
                          {"energy": "scalar", "forces": "vector"},
                          sources={"energy": ev_mod.MODEL, "forces": ev_mod.MODEL_AUTOGRAD_FORCES},
                          method=self.method, notes=notes)

    def layerwise_target(self, st, dtype):
        fn, pos = self._fn(st, dtype), self.inputs(st, dtype)
        return self.copy_for(dtype), (lambda p: fn(p, pos[1])["energy"].sum()), None


def sevenn0() -> SevenNetAdapter:
    """SevenNet-0 (11Jul2024) from the ``sevenn`` wheel, offline."""
    return SevenNetAdapter()


class CHGNetAdapter(Adapter):
    """CHGNet (``chgnet``, invariant crystal-graph network) with its own autograd forces (and stress).

    CHGNet builds a crystal graph (atom and bond graphs with periodic images) from a pymatgen ``Structure`` and
    takes positions as fractional coordinates times the lattice. geolie builds the graph once per structure (held
    fixed near the base geometry; finite moves and reordered atoms rebuild it) and feeds ``frac = pos · cell⁻¹`` with the lattice as differentiable inputs,
    so the Lie derivative runs forward-over-reverse through CHGNet's ``create_graph=True`` forces. Molecules are put
    in a 40 Å box (no periodic image within the 6 Å cutoff). Energies are totals in eV (CHGNet's per-atom energy
    times the atom count), forces eV/Å, stress GPa. float32 only (CHGNet's graph code hard-codes float32).
    """

    name = "chgnet"
    method = "jvp"
    dtypes = (torch.float32,)
    dtype_note = ("float32 only: CHGNet's graph code hard-codes float32; the floor is measured in float32 (rounding "
                  "estimate and the difference of two AD methods)")
    BOX = 40.0

    def __init__(self):
        _require("chgnet", "chgnet")
        from chgnet.model import CHGNet

        self._model = CHGNet.load(verbose=False)
        self._model.eval()

    def _graph(self, numbers, positions, cell):
        from pymatgen.core import Lattice
        from pymatgen.core import Structure as PmgStructure

        s = PmgStructure(Lattice(np.asarray(cell, dtype=np.float64)), [int(z) for z in numbers],
                         np.asarray(positions, dtype=np.float64), coords_are_cartesian=True)
        return self._model.graph_converter(s)

    def evaluation(self, st, dtype):
        import copy

        periodic = st.cell is not None
        box = np.eye(3) * self.BOX
        base = self._graph(st.numbers, st.positions, st.cell if periodic else box)
        z0 = torch.as_tensor(st.numbers)
        p0 = torch.as_tensor(st.positions)
        fixed_cell = torch.as_tensor(box, dtype=torch.float32)
        model = self._model

        def fn(pos, z, cell=None):
            lat = (cell if cell is not None else fixed_cell.to(pos)).to(torch.float32)
            if _near_base(pos, z, p0, z0):
                g = copy.copy(base)
            else:
                g = self._graph(z.cpu().numpy(), pos.detach().cpu().numpy(), lat.detach().cpu().numpy())
            pos = with_autograd(pos)
            g.atom_frac_coord = pos.to(torch.float32) @ torch.linalg.inv(lat)
            g.lattice = lat
            out = model([g], task="efs" if cell is not None else "ef")
            n = pos.shape[0]
            e = out["e"][0] * (n if model.is_intensive else 1)
            res = {"energy": e.reshape(1).to(pos.dtype), "forces": out["f"][0].to(pos.dtype)}
            if cell is not None:
                res["stress"] = out["s"][0].reshape(3, 3).to(pos.dtype)
            return res

        x = [torch.as_tensor(st.positions, dtype=dtype), torch.as_tensor(st.numbers, dtype=torch.long)]
        in_rep, out_rep = ["point", None], {"energy": "scalar", "forces": "vector"}
        if periodic:
            x.append(torch.as_tensor(st.cell, dtype=dtype))
            in_rep.append("cell")
            out_rep["stress"] = "stress"
        sources = {k: ev_mod.MODEL_AUTOGRAD_FORCES if k == "forces" else ev_mod.MODEL for k in out_rep}
        if periodic:
            sources["stress"] = "strain derivative (model autograd)"
        return Evaluation(fn, tuple(x), tuple(in_rep), out_rep, sources=sources, method=self.method,
                          notes=[self.dtype_note])


def chgnet() -> CHGNetAdapter:
    """CHGNet 0.3.0 from the ``chgnet`` wheel, offline."""
    return CHGNetAdapter()
