"""Pieces shared by the bundled models (private)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._torch_utils import segment_sum


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smooth cutoff ``0.5 (cos(π r / r_c) + 1)`` for ``r < r_c``, else 0 (C¹ at ``r_c``)."""
    return torch.where(r < cutoff, 0.5 * (torch.cos(math.pi * r / cutoff) + 1), torch.zeros_like(r))


def gaussian_rbf(r: torch.Tensor, n: int, cutoff: float) -> torch.Tensor:
    """``n`` Gaussians of width ``cutoff / n`` centred on ``[0, cutoff]``: ``[..., n]``."""
    mu = torch.linspace(0, cutoff, n, dtype=r.dtype, device=r.device)
    w = cutoff / n
    return torch.exp(-((r[..., None] - mu) / w) ** 2)


def pair_mask(n: int, batch: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[N, N]`` boolean: distinct atoms of the same structure."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if batch is None:
        return ~eye
    return (batch[:, None] == batch[None, :]) & ~eye


def sum_per_graph(x: torch.Tensor, batch: Optional[torch.Tensor], n_graphs: Optional[int] = None) -> torch.Tensor:
    """Sum per-atom values ``[N]`` into per-structure values ``[B]`` (``B = 1`` without ``batch``)."""
    if batch is None:
        return x.sum(0, keepdim=True)
    n = int(batch.max()) + 1 if n_graphs is None else n_graphs
    return segment_sum(x, batch, n)


def edge_geometry(pos: torch.Tensor, edge_index: Optional[torch.Tensor], cutoff: float,
                  batch: Optional[torch.Tensor] = None):
    """``(src, dst, vec = pos[dst] - pos[src], r = |vec|)``; without ``edge_index`` the edges are built with the
    cutoff from detached positions (held fixed while geolie differentiates)."""
    if edge_index is None:
        from ..neighbors import radius_graph

        edge_index = radius_graph(pos, cutoff, batch)
    src, dst = edge_index[0], edge_index[1]
    vec = pos[dst] - pos[src]
    return src, dst, vec, torch.sqrt((vec * vec).sum(-1))
