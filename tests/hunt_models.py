"""Planted models for the orientation hunt: breaks that sit at special orientations, with known locations."""
import torch

from geolie.models import PairMLPPotential


class YAlignedEdge(torch.nn.Module):
    """An invariant pair energy plus ``ε Σ_bonds exp(−(1 − (û_ij·ŷ)²) / σ²)`` over pairs closer than 1.6 Å: zero
    to machine precision unless a bond lies within a few σ (radians) of the y axis, like eSCN's gimbal lock."""

    def __init__(self, eps=1.0, sigma=0.01):
        super().__init__()
        self.pair = PairMLPPotential()
        self.eps, self.sigma = eps, sigma

    def forward(self, z, pos, batch=None):
        d = pos[:, None] - pos[None]
        r = d.pow(2).sum(-1)
        n = pos.shape[0]
        iu = torch.triu_indices(n, n, 1)
        r, d = r[iu[0], iu[1]], d[iu[0], iu[1]]
        bonded = r < 1.6 ** 2
        cos2 = d[:, 1] ** 2 / r
        spike = torch.exp(-(1 - cos2) / self.sigma ** 2) * bonded
        return self.pair(z, pos, batch) + self.eps * spike.sum()


class HardCutoffPairs(torch.nn.Module):
    """``E = Σ_{i<j, r_ij < r_c} (1 + 0.1 r_ij)``: a radius graph with a hard cutoff (the energy jumps by
    ``1 + 0.1 r_c`` when a pair crosses it); ``cutoff`` is declared."""

    def __init__(self, cutoff):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, z, pos, batch=None):
        n = pos.shape[0]
        iu = torch.triu_indices(n, n, 1)
        r = (pos[iu[1]] - pos[iu[0]]).norm(dim=-1)
        return ((r < self.cutoff).to(pos) * (1 + 0.1 * r)).sum()
