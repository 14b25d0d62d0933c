"""Pure-torch radius neighbour lists (no pyg-lib / torch-cluster needed).

``radius_graph(pos, r, batch)`` returns ``edge_index [2, E]`` with ``edge_index[0]`` the source ``j`` and
``edge_index[1]`` the target ``i`` for every ordered pair ``i != j`` of the same structure with
``|pos_i - pos_j| < r`` (PyG's ``flow="source_to_target"`` convention). Distances are computed blockwise,
``O(N²)`` work and ``O(N·block)`` memory: adequate for molecules and small cells. Written here because the
libraries that provide it (torch-cluster, pyg-lib) have no wheels on this platform; torch-cluster is used when
it is installed.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["radius_graph"]


def radius_graph(pos: torch.Tensor, r: float, batch: Optional[torch.Tensor] = None, loop: bool = False,
                 max_num_neighbors: Optional[int] = None, block: int = 4096) -> torch.Tensor:
    """Edges between points closer than ``r`` within the same structure; see the module docstring."""
    if pos.dim() != 2 or pos.shape[-1] != 3:
        raise ValueError(f"radius_graph: pos must have shape [N, 3], got {list(pos.shape)}")
    if not r > 0:
        raise ValueError(f"radius_graph: the cutoff must be positive, got {r}")
    n = pos.shape[0]
    p = pos.detach()
    b = torch.zeros(n, dtype=torch.long, device=pos.device) if batch is None else batch.to(pos.device).long()
    if b.shape != (n,):
        raise ValueError(f"radius_graph: batch must have shape [{n}], got {list(b.shape)}")
    if batch is not None and n > 0:
        counts = torch.bincount(b)
        nmax = int(counts.max())
        if counts.numel() > 1 and counts.numel() * nmax * nmax <= 4 * block * max(n, 1):
            return _padded(p, b, counts, nmax, r, loop, max_num_neighbors)
    src, dst = [], []
    for s in range(0, n, block):
        d2 = (p[s:s + block, None, :] - p[None, :, :]).pow(2).sum(-1)
        ok = (d2 < r * r) & (b[s:s + block, None] == b[None, :])
        if not loop:
            idx = torch.arange(s, min(s + block, n), device=pos.device)
            ok[idx - s, idx] = False
        i, j = ok.nonzero(as_tuple=True)
        dst.append(i + s)
        src.append(j)
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    return _limit(p, src_t, dst_t, max_num_neighbors)


def _padded(p, b, counts, nmax, r, loop, max_num_neighbors):
    """Many small structures: distances within each structure only, padded to ``[B, nmax, nmax]`` (no loop)."""
    B = counts.numel()
    order = torch.argsort(b, stable=True)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b.numel(), device=p.device) - start[b[order]]
    idx = torch.full((B, nmax), -1, dtype=torch.long, device=p.device)
    idx[b[order], rank] = order
    valid = idx >= 0
    xyz = p[idx.clamp_min(0)]  # [B, nmax, 3]
    d2 = (xyz[:, :, None, :] - xyz[:, None, :, :]).pow(2).sum(-1)
    ok = (d2 < r * r) & valid[:, :, None] & valid[:, None, :]
    if not loop:
        ok &= ~torch.eye(nmax, dtype=torch.bool, device=p.device)[None]
    g, i, j = ok.nonzero(as_tuple=True)
    dst, src = idx[g, i], idx[g, j]
    key = torch.argsort(dst * (b.numel() + 1) + src)  # the same order as the blockwise path
    return _limit(p, src[key], dst[key], max_num_neighbors)


def _limit(p, src_t, dst_t, max_num_neighbors):
    if max_num_neighbors is not None:
        d = (p[src_t] - p[dst_t]).norm(dim=-1)
        order = torch.argsort(dst_t * (d.max() + 1 if d.numel() else 1) + d)  # by target, then distance
        src_t, dst_t = src_t[order], dst_t[order]
        rank = torch.arange(len(dst_t), device=p.device) - torch.searchsorted(dst_t, dst_t)
        keep = rank < max_num_neighbors
        src_t, dst_t = src_t[keep], dst_t[keep]
    return torch.stack([src_t, dst_t])
