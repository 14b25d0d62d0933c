r"""A deliberately non-equivariant potential: pair terms that read Cartesian displacement components.

:math:`E = \frac12\sum_{i\ne j} [\phi(r_{ij}) + a\,\psi(\mathbf{d}_{ij}/r_c)]\, f_c(r_{ij})` with
:math:`\mathbf{d}_{ij} = x_i - x_j`. Translation invariant (displacements only) but not rotation invariant unless
``anisotropy = 0``: the reference "non-equivariant" model of the demo and the planted break of the tests
(the module ``aniso`` is where equivariance breaks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._common import cosine_cutoff, gaussian_rbf, pair_mask, sum_per_graph


class CartesianMLPPotential(nn.Module):
    """``forward(z [N], pos [N, 3], batch [N] | None) -> energy [B]``; ``anisotropy`` scales the breaking term."""

    def __init__(self, cutoff: float = 5.0, n_rbf: int = 16, hidden: int = 32, anisotropy: float = 0.1,
                 n_elements: int = 100, seed: int = 1):
        super().__init__()
        self.cutoff, self.n_rbf, self.anisotropy = cutoff, n_rbf, anisotropy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.radial = nn.Sequential(nn.Linear(n_rbf, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            self.aniso = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            self.atom_ref = nn.Embedding(n_elements, 1)
            nn.init.normal_(self.atom_ref.weight, std=0.1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = pos.shape[0]
        mask = pair_mask(n, batch, pos.device)
        d = pos[:, None, :] - pos[None, :, :]
        r = torch.sqrt((d * d).sum(-1) + (~mask).to(pos.dtype))
        phi = self.radial(gaussian_rbf(r, self.n_rbf, self.cutoff))[..., 0]
        phi = phi + self.anisotropy * self.aniso(d / self.cutoff)[..., 0]
        phi = phi * cosine_cutoff(r, self.cutoff) * mask.to(pos.dtype)
        per_atom = 0.5 * phi.sum(1) + self.atom_ref(z)[:, 0].to(pos.dtype)
        return sum_per_graph(per_atom, batch)
