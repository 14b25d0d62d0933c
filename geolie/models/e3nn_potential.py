r"""An E(3)-equivariant message-passing potential built from e3nn (NequIP-like, two interaction layers).

Edge ``j -> i`` carries spherical harmonics :math:`Y(\hat r_{ij})` (``l <= lmax``) and a radial MLP of Gaussian
features times a cosine cutoff; messages are ``TensorProduct(h_j, Y_ij; w(r_ij))`` summed over neighbours,
followed by an e3nn ``Gate``. The final layer keeps scalars only and sums them to an energy. Every operation is
e3nn-equivariant, so the energy is exactly invariant and forces equivariant (to rounding).

Edges are an input (``edge_index [2, E]``, source then target) so that they stay fixed while differentiating;
build them with :func:`geolie.neighbors.radius_graph`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._torch_utils import default_dtype, segment_sum
from e3nn import nn as enn
from e3nn import o3
from torch import nn

from ._common import cosine_cutoff, edge_geometry, gaussian_rbf, sum_per_graph


class E3nnPotential(nn.Module):
    """``forward(z [N], pos [N, 3], edge_index [2, E] | None, batch [N] | None) -> energy [B]``; without
    ``edge_index`` the edges are built with the cutoff (from detached positions)."""

    def __init__(self, cutoff: float = 5.0, mul: int = 8, lmax: int = 2, n_rbf: int = 8, n_elements: int = 100,
                 seed: int = 2):
        super().__init__()
        self.cutoff, self.n_rbf = cutoff, n_rbf
        # e3nn computes its Clebsch-Gordan buffers in the default dtype: build them in float64 so that a
        # float64 copy of the model is equivariant to float64 precision.
        with default_dtype(torch.float64) as old, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
            self.embed = nn.Embedding(n_elements, mul)
            scalars = o3.Irreps(f"{mul}x0e")
            gated = o3.Irreps("+".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(1, lmax + 1)))
            self.gate = enn.Gate(scalars, [torch.nn.functional.silu], o3.Irreps(f"{gated.num_irreps}x0e"),
                                 [torch.sigmoid], gated)
            self.tp1 = o3.FullyConnectedTensorProduct(scalars, self.irreps_sh, self.gate.irreps_in,
                                                      shared_weights=False)
            self.tp2 = o3.FullyConnectedTensorProduct(self.gate.irreps_out, self.irreps_sh, scalars,
                                                      shared_weights=False)
            self.radial1 = nn.Sequential(nn.Linear(n_rbf, 32), nn.SiLU(), nn.Linear(32, self.tp1.weight_numel))
            self.radial2 = nn.Sequential(nn.Linear(n_rbf, 32), nn.SiLU(), nn.Linear(32, self.tp2.weight_numel))
            self.readout = nn.Sequential(nn.Linear(mul, mul), nn.SiLU(), nn.Linear(mul, 1))
        self.to(old)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, edge_index: Optional[torch.Tensor] = None,
                batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, dst, vec, r = edge_geometry(pos, edge_index, self.cutoff, batch)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        rbf = gaussian_rbf(r, self.n_rbf, self.cutoff) * cosine_cutoff(r, self.cutoff)[:, None]
        h = self.embed(z).to(pos.dtype)
        n = pos.shape[0]
        m = self.tp1(h[src], sh, self.radial1(rbf))
        h1 = segment_sum(m, dst, n)
        h1 = self.gate(h1)
        m = self.tp2(h1[src], sh, self.radial2(rbf))
        h2 = h + segment_sum(m, dst, n)
        return sum_per_graph(self.readout(h2)[:, 0], batch)
