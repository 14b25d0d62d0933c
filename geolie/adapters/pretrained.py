"""Pretrained potentials whose weights ship inside their wheels and load offline (optional extras).

* ``ani1x``: the ANI-1x 8-model ensemble from ``torchani`` 2.2.4 (``pip install "geolie[pretrained]"``; it
  needs ``setuptools<81`` because torchani imports ``pkg_resources``). torchani's own ``ANI1x()`` tries to download
  its parameters; this loader reads the files inside the wheel (``resources/ani-1x_8x``): the AEV constants, the
  self-energies and the eight networks. Elements H, C, N, O; energies converted from Hartree to eV.

SevenNet-0 (``sevenn``) and CHGNet (``chgnet``) also ship their weights, but are not wired here yet.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._base import TorchPotential

HARTREE_EV = 27.211386245988


def _require(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError as e:
        raise ValueError(f"the {package!r} package is needed for this model ({e}); install it with "
                         f"pip install 'geolie[{extra}]'") from None


class ANIPotential(torch.nn.Module):
    """``forward(z, pos, batch=None) -> energy [1]`` in eV for one structure, around a torchani model."""

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
        e = self.model((species[None], pos[None])).energies
        return (e * HARTREE_EV).to(pos.dtype).reshape(1)


def ani1x() -> TorchPotential:
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
    pot = TorchPotential(ANIPotential(model, consts.species), name="ani1x")
    pot.elements = (1, 6, 7, 8)
    return pot
