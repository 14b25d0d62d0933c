r"""A NequIP/MACE-style potential whose tensor product is switchable: e3nn Clebsch–Gordan or Gaunt (grid/Fourier).

Node features ``h_i`` are ``C`` channels of natural-parity irreps ``0e + 1o + 2e + ...`` up to ``lmax``. Each
interaction layer sends messages ``m_ij = r(|r_ij|)_c · TP(h_j, Y(r̂_ij))`` with ``Y`` the edge harmonics and ``r`` a
radial MLP (per channel, times a cosine cutoff), sums them per node, mixes channels with an e3nn ``Linear``, and
applies a gate (SiLU on scalars, ``sigmoid(scalar) ×`` higher degrees), or with ``nonlinearity="grid"`` a
:class:`geolie.nn.SphericalGridNonlinearity` (SiLU on a sphere grid of ``grid_resolution``; only approximately
equivariant: it aliases, less on finer grids). The energy is a readout of the scalars.

``tp="cg"``: e3nn ``TensorProduct`` with one weight per path (``uvu``, all paths into the natural-parity output);
``tp="gaunt-grid"`` / ``"gaunt-fourier"``: :class:`geolie.nn.GauntTensorProduct` (per-degree weights). With natural
parity everywhere the two have the same paths; the Gaunt product ties their weights (rank one per degree).
``forward(z, pos, edge_index, batch=None) -> energy [B]``; edges come from :func:`geolie.neighbors.radius_graph`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._torch_utils import default_dtype, segment_sum
from e3nn import o3
from torch import nn

from ..nn.gaunt import GauntTensorProduct
from ..nn.grid_nonlinearity import SphericalGridNonlinearity
from ._common import cosine_cutoff, edge_geometry, gaussian_rbf, sum_per_graph


def _natural(mul: int, lmax: int) -> o3.Irreps:
    return o3.Irreps("+".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1)))


class GauntPotential(nn.Module):
    """Equivariant potential with a switchable tensor product; see the module docstring."""

    def __init__(self, tp: str = "gaunt-grid", channels: int = 8, lmax: int = 2, layers: int = 2,
                 cutoff: float = 5.0, n_rbf: int = 8, n_elements: int = 100, seed: int = 3,
                 nonlinearity: str = "gate", grid_resolution: Optional[Tuple[int, int]] = None):
        super().__init__()
        if tp not in ("cg", "gaunt-grid", "gaunt-fourier"):
            raise ValueError(f"tp must be 'cg', 'gaunt-grid' or 'gaunt-fourier', got {tp!r}")
        if nonlinearity not in ("gate", "grid"):
            raise ValueError(f"nonlinearity must be 'gate' or 'grid', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.cutoff, self.n_rbf, self.C, self.tp_kind = cutoff, n_rbf, channels, tp
        with default_dtype(torch.float64) as old:  # e3nn's CG buffers in float64
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.irreps = _natural(channels, lmax)
                self.irreps_sh = _natural(1, lmax)
                self.embed = nn.Embedding(n_elements, channels)
                self.tps, self.radials, self.lins, self.gates = (nn.ModuleList() for _ in range(4))
                for _ in range(layers):
                    if tp == "cg":
                        instr = [(i1, i2, i3, "uvu", True) for i1, (_, a) in enumerate(self.irreps)
                                 for i2, (_, b) in enumerate(self.irreps_sh) for i3, (_, c) in enumerate(self.irreps)
                                 if c in a * b]
                        self.tps.append(o3.TensorProduct(self.irreps, self.irreps_sh, self.irreps, instr))
                    else:
                        self.tps.append(GauntTensorProduct(self.irreps, self.irreps_sh, self.irreps,
                                                           method=tp.split("-")[1]))
                    self.radials.append(nn.Sequential(nn.Linear(n_rbf, 32), nn.SiLU(), nn.Linear(32, channels)))
                    self.lins.append(o3.Linear(self.irreps, self.irreps))
                    self.gates.append(nn.Linear(channels, channels * lmax) if nonlinearity == "gate" else
                                      SphericalGridNonlinearity(self.irreps, resolution=grid_resolution))
                self.readout = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
        self.lmax = lmax
        self.to(old)

    def _gate(self, h: torch.Tensor, gate: nn.Module) -> torch.Tensor:
        C = self.C
        s = h[..., :C]
        g = torch.sigmoid(gate(s))  # [N, C * lmax]
        parts, i = [torch.nn.functional.silu(s)], C
        for l in range(1, self.lmax + 1):
            n = C * (2 * l + 1)
            blk = h[..., i:i + n].reshape(*h.shape[:-1], C, 2 * l + 1)
            parts.append((blk * g[..., (l - 1) * C:l * C, None]).reshape(*h.shape[:-1], n))
            i += n
        return torch.cat(parts, -1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, edge_index: Optional[torch.Tensor] = None,
                batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, dst, vec, r = edge_geometry(pos, edge_index, self.cutoff, batch)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="integral")
        rbf = gaussian_rbf(r, self.n_rbf, self.cutoff) * cosine_cutoff(r, self.cutoff)[:, None]
        n, C = pos.shape[0], self.C
        h = torch.cat([self.embed(z).to(pos.dtype), pos.new_zeros(n, self.irreps.dim - C)], -1)
        for tp, rad, lin, gate in zip(self.tps, self.radials, self.lins, self.gates):
            m = tp(h[src], sh)  # [E, irreps.dim], channel-major blocks
            w = rad(rbf)  # [E, C]
            parts, i = [], 0
            for mul, ir in self.irreps:
                blk = m[:, i:i + mul * ir.dim].reshape(-1, mul, ir.dim) * w[:, :, None]
                parts.append(blk.reshape(-1, mul * ir.dim))
                i += mul * ir.dim
            m = torch.cat(parts, -1)
            agg = segment_sum(m, dst, n)
            h = h + (self._gate(lin(agg), gate) if self.nonlinearity == "gate" else gate(lin(agg)))
        return sum_per_graph(self.readout(h[:, :C])[:, 0], batch)
