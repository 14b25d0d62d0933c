r"""An exactly E(3)-invariant pair potential: :math:`E = \frac12\sum_{i\ne j} \phi(r_{ij}, z_i, z_j)\, f_c(r_{ij})`.

``φ`` is an MLP of Gaussian radial features modulated by learned element embeddings; ``f_c`` is the cosine
cutoff. It depends on interatomic distances only, so its energy is invariant and its forces equivariant under
rotations, translations, reflections and permutations: the reference "equivariant" model of the demo.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._common import cosine_cutoff, gaussian_rbf, pair_mask, sum_per_graph


class PairMLPPotential(nn.Module):
    """Distance-MLP pair potential. ``forward(z [N], pos [N, 3], batch [N] | None) -> energy [B]``."""

    def __init__(self, cutoff: float = 5.0, n_rbf: int = 16, hidden: int = 32, n_elements: int = 100,
                 seed: int = 0):
        super().__init__()
        self.cutoff, self.n_rbf = cutoff, n_rbf
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(n_elements, n_rbf)
            nn.init.uniform_(self.embed.weight, 0.5, 1.5)
            self.mlp = nn.Sequential(nn.Linear(n_rbf, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 1))
            self.atom_ref = nn.Embedding(n_elements, 1)
            nn.init.normal_(self.atom_ref.weight, std=0.1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = pos.shape[0]
        mask = pair_mask(n, batch, pos.device)
        d = pos[:, None, :] - pos[None, :, :]
        r = torch.sqrt((d * d).sum(-1) + (~mask).to(pos.dtype))  # 1 on excluded pairs: no sqrt(0) gradient
        e = self.embed(z).to(pos.dtype)
        feat = gaussian_rbf(r, self.n_rbf, self.cutoff) * e[:, None, :] * e[None, :, :]
        phi = self.mlp(feat)[..., 0] * cosine_cutoff(r, self.cutoff) * mask.to(pos.dtype)
        per_atom = 0.5 * phi.sum(1) + self.atom_ref(z)[:, 0].to(pos.dtype)
        return sum_per_graph(per_atom, batch)
