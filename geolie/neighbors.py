"""Radius neighbour lists (no pyg-lib / torch-cluster needed): vesin on the CPU, geolie's own cell list elsewhere.

``radius_graph(pos, r, batch)`` returns ``edge_index [2, E]`` with ``edge_index[0]`` the source ``j`` and
``edge_index[1]`` the target ``i`` for every ordered pair ``i != j`` of the same structure with
``|pos_i - pos_j| < r`` (PyG's ``flow="source_to_target"`` convention). Small inputs are computed blockwise
(``O(N²)`` work, ``O(N·block)`` memory, fastest for molecules); above ``CELL_LIST_FROM`` points the cell list below
is used (linear). Written here because the libraries that provide it (torch-cluster, pyg-lib) have no wheels on this
platform; torch-cluster is used when it is installed.

``neighbor_list`` is served by vesin (the list TorchSim and metatomic use, a dependency) for CPU tensors with
all-periodic or all-open boundaries (:func:`_vesin_serves`); geolie's own cell list below serves GPU tensors,
tensors inside ``torch.func`` transforms and mixed periodicity, and gives the same pairs (tested).

``neighbor_list(pos, cutoff, cell=None, pbc=None, batch=None)`` returns ASE's ``(i, j, S)``: every ordered pair
(and periodic image) with ``|pos[j] − pos[i] + S·cell| < cutoff`` (``S`` integer shifts along the lattice vectors,
the cell's rows), ``i == j`` only with a nonzero shift. It is a cell list, linear in the number of atoms: points are
binned into cubes of side ``cutoff / 2`` and only the 125 neighbouring cubes are searched; periodic structures are
wrapped into the cell and their images within the cutoff are generated along each periodic direction (as many
layers as the cutoff needs: ``ceil(cutoff / d_k)`` for the spacing ``d_k`` of lattice planes, so cutoffs larger than
the cell and skewed cells are exact). With ``batch`` (open structures), structures are binned apart: no pair across
structures is ever formed.
"""
from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch

__all__ = ["radius_graph", "neighbor_list"]

CELL_LIST_FROM = 3000  # points; below, the blockwise all-pairs search is faster


def _cell_pairs(P: torch.Tensor, Q: torch.Tensor, cutoff: float, bp: torch.Tensor, bq: torch.Tensor,
                chunk: int = 16384, split: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ``(p, q)`` with ``|Q[q] − P[p]| < cutoff`` and ``bp[p] == bq[q]``, by a cell list (``O(N + pairs)``):
    bins of side ``cutoff / split``, ``(2 split + 1)³`` neighbouring bins searched (``split = 2`` tests 42% fewer
    candidate pairs than bins of side ``cutoff``)."""
    dev = P.device
    if P.shape[0] == 0 or Q.shape[0] == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e
    lo = torch.minimum(P.min(0).values, Q.min(0).values)
    side = cutoff / split
    cp = torch.floor((P - lo) / side).long()
    cq = torch.floor((Q - lo) / side).long()
    dims = torch.maximum(cp.max(0).values, cq.max(0).values) + 1
    nx, ny, nz = (int(v) for v in dims)

    def key(c, b):
        return ((b * nx + c[..., 0]) * ny + c[..., 1]) * nz + c[..., 2]

    kq = key(cq, bq)
    order = torch.argsort(kq)
    sk = kq[order]
    Qs = Q[order]  # points stored in bin order: the candidates of one bin are contiguous in memory
    offsets = torch.tensor(list(itertools.product(range(-split, split + 1), repeat=3)), dtype=torch.long, device=dev)
    n_off = offsets.shape[0]
    out_p, out_q = [], []
    for s in range(0, P.shape[0], chunk):
        c = cp[s:s + chunk, None, :] + offsets[None]  # [n, n_off, 3]
        ok = ((c >= 0) & (c < dims)).all(-1)
        k = key(c, bp[s:s + chunk, None].expand(-1, n_off))
        start = torch.searchsorted(sk, k)
        cnt = (torch.searchsorted(sk, k, right=True) - start) * ok
        cnt, start = cnt.reshape(-1), start.reshape(-1)
        seg = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt)
        within = torch.arange(seg.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        qs = start[seg] + within
        p = seg // n_off + s
        close = (Qs[qs] - P[p]).pow(2).sum(-1) < cutoff * cutoff
        out_p.append(p[close])
        out_q.append(order[qs[close]])
    return torch.cat(out_p), torch.cat(out_q)


def neighbor_list(pos: torch.Tensor, cutoff: float, cell: Optional[torch.Tensor] = None, pbc=None,
                  batch: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i, j, S)`` of every neighbour pair within ``cutoff`` (see the module docstring), sorted by ``i``, then
    ``j``, then ``S``. ``cell``: ``[3, 3]`` rows are lattice vectors (one structure); ``pbc``: three booleans
    (default all periodic when a cell is given). Positions are not differentiated (the list is combinatorial).
    ``backend``: ``"auto"`` (vesin where it serves, else geolie's cell list), ``"vesin"`` or ``"geolie"``."""
    if backend not in ("auto", "vesin", "geolie"):
        raise ValueError(f"neighbor_list: backend must be 'auto', 'vesin' or 'geolie', got {backend!r}")
    if pos.dim() != 2 or pos.shape[-1] != 3:
        raise ValueError(f"neighbor_list: pos must have shape [N, 3], got {list(pos.shape)}")
    if not cutoff > 0:
        raise ValueError(f"neighbor_list: the cutoff must be positive, got {cutoff}")
    p = pos.detach().double()
    n, dev = p.shape[0], p.device
    if not bool(torch.isfinite(p).all()):
        raise ValueError("neighbor_list: positions contain NaN or inf")
    if backend == "vesin" or backend == "auto" and _vesin_serves(p, cell, pbc, batch):
        if backend == "vesin" and not _vesin_serves(p, cell, pbc, batch):
            raise ValueError("neighbor_list: vesin cannot serve this search (GPU tensors or mixed periodicity)")
        return _sorted(*_vesin_list(p, cutoff, cell, batch), n)
    if cell is None or pbc is not None and not any(bool(v) for v in pbc):
        b = torch.zeros(n, dtype=torch.long, device=dev) if batch is None else batch.to(dev).long()
        if b.shape != (n,):
            raise ValueError(f"neighbor_list: batch must have shape [{n}], got {list(b.shape)}")
        i, j = _cell_pairs(p, p, cutoff, b, b)
        keep = i != j
        i, j = i[keep], j[keep]
        S = torch.zeros(i.numel(), 3, dtype=torch.long, device=dev)
        return _sorted(i, j, S, n)
    if batch is not None and int(batch.max()) > 0:
        raise ValueError("neighbor_list: a cell describes one structure; call it per structure for periodic batches")
    C = torch.as_tensor(cell, dtype=torch.float64, device=dev)
    if C.shape != (3, 3) or abs(float(torch.linalg.det(C))) < 1e-12:
        raise ValueError(f"neighbor_list: the cell must be a non-degenerate [3, 3] matrix, got {C.tolist()}")
    per = torch.tensor([True] * 3 if pbc is None else [bool(v) for v in pbc], device=dev)
    inv = torch.linalg.inv(C)
    frac = p @ inv
    W = -torch.floor(frac) * per  # wrap the periodic directions into [0, 1)
    pw = p + W @ C
    spacing = 1.0 / inv.norm(dim=0)  # distance between lattice planes along each cell vector
    layers = [int(torch.ceil(cutoff / spacing[k])) if bool(per[k]) else 0 for k in range(3)]
    shifts = torch.tensor(list(itertools.product(*(range(-m, m + 1) for m in layers))), dtype=torch.float64,
                          device=dev)
    images = (pw[None] + (shifts @ C)[:, None]).reshape(-1, 3)  # [shifts * n, 3]
    owner = torch.arange(n, device=dev).repeat(shifts.shape[0])
    sidx = torch.arange(shifts.shape[0], device=dev).repeat_interleave(n)
    # only images within the cutoff of the cell can be neighbours of an atom in it: fractional coordinates within
    # cutoff / d_k of [0, 1) along each periodic direction
    fi = images @ inv
    pad = (cutoff / spacing).to(fi) * per
    near = ((fi >= -pad) & (fi < 1 + pad)).all(-1)
    images, owner, sidx = images[near], owner[near], sidx[near]
    zeros_p = torch.zeros(n, dtype=torch.long, device=dev)
    zeros_q = torch.zeros(images.shape[0], dtype=torch.long, device=dev)
    i, q = _cell_pairs(pw, images, cutoff, zeros_p, zeros_q)
    j, Sw = owner[q], shifts[sidx[q]].long()
    keep = (i != j) | (Sw != 0).any(-1)
    i, j, Sw = i[keep], j[keep], Sw[keep]
    S = Sw + W.long()[j] - W.long()[i]  # back to the unwrapped positions: D = pos[j] − pos[i] + S·cell
    return _sorted(i, j, S, n)


def _vesin_serves(p: torch.Tensor, cell, pbc, batch) -> bool:
    """vesin (the neighbour list TorchSim and metatomic use; a dependency) serves every search on the CPU with
    all-periodic or all-open boundaries. geolie's own cell list remains for what it cannot take: tensors on a GPU
    (vesin's Python package reads host memory), tensors inside ``torch.func`` transforms (a model that builds its
    neighbour list while geolie differentiates it with vmap/jvp: they have no memory to hand over) and mixed
    periodicity (a slab: periodic along some directions only)."""
    if p.device.type != "cpu":
        return False
    try:
        p.data_ptr()
    except RuntimeError:  # a torch.func wrapper: no storage
        return False
    if cell is not None and pbc is not None and len({bool(v) for v in pbc}) > 1:
        return False
    if cell is not None and batch is not None and batch.numel() and int(batch.max()) > 0:
        return False  # refused below with its own message
    try:
        import vesin  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency; a broken install still gets geolie's own list
        return False
    return True


def _vesin_list(p: torch.Tensor, cutoff: float, cell, batch):
    """``(i, j, S)`` from vesin's full list, per structure of ``batch`` for open structures."""
    import numpy as np
    from vesin import NeighborList

    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    x = p.numpy()
    if cell is not None:
        C = np.asarray(torch.as_tensor(cell, dtype=torch.float64).cpu(), dtype=np.float64)
        if C.shape != (3, 3) or abs(float(np.linalg.det(C))) < 1e-12:
            raise ValueError(f"neighbor_list: the cell must be a non-degenerate [3, 3] matrix, got {C.tolist()}")
        i, j, S = nl.compute(points=x, box=C, periodic=True, quantities="ijS")
    else:
        b = np.zeros(len(x), dtype=np.int64) if batch is None else batch.cpu().numpy().astype(np.int64)
        if b.shape != (len(x),):
            raise ValueError(f"neighbor_list: batch must have shape [{len(x)}], got {list(b.shape)}")
        parts = []
        for k in np.unique(b):
            idx = np.nonzero(b == k)[0]
            ii, jj = nl.compute(points=np.ascontiguousarray(x[idx]), box=np.zeros((3, 3)), periodic=False,
                                quantities="ij")
            parts.append((idx[ii], idx[jj]))
        i = np.concatenate([a for a, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
        j = np.concatenate([c for _, c in parts]) if parts else np.zeros(0, dtype=np.int64)
        S = np.zeros((len(i), 3), dtype=np.int64)
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return t(i), t(j), t(S).reshape(-1, 3)


def _sorted(i, j, S, n):
    if i.numel() == 0:
        return i, j, S
    m = int(S.abs().max()) * 2 + 1 if S.numel() else 1
    k = ((i * n + j) * m + (S[:, 0] + m // 2)) * m * m + (S[:, 1] + m // 2) * m + (S[:, 2] + m // 2)
    order = torch.argsort(k)
    return i[order], j[order], S[order]


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
    if (n >= CELL_LIST_FROM or _vesin_serves(p, None, None, b)) and r > 0:  # vesin on the CPU, a cell list if large
        i, j, _ = neighbor_list(p, r, batch=b)
        if loop:
            i, j = torch.cat([i, torch.arange(n, device=p.device)]), torch.cat([j, torch.arange(n, device=p.device)])
        key = torch.argsort(i * (n + 1) + j)  # by target, then source: the blockwise path's order
        return _limit(p, j[key], i[key], max_num_neighbors)
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
