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
    if max_num_neighbors is not None:
        d = (p[src_t] - p[dst_t]).norm(dim=-1)
        order = torch.argsort(dst_t * (d.max() + 1 if d.numel() else 1) + d)  # by target, then distance
        src_t, dst_t = src_t[order], dst_t[order]
        rank = torch.arange(len(dst_t), device=pos.device) - torch.searchsorted(dst_t, dst_t)
        keep = rank < max_num_neighbors
        src_t, dst_t = src_t[keep], dst_t[keep]
    return torch.stack([src_t, dst_t])
