r"""Frame averaging (Puny et al., ICLR 2022) with PCA frames, per structure, exactly equivariant.

For a structure with positions ``x [n, 3]`` the centroid ``c`` (E(3)/SE(3); the origin for O(3)/SO(3)) and the
covariance :math:`C = (x-c)^T (x-c)` (float64) give eigenvectors ``V`` (columns, ascending eigenvalues). The frames
are ``F_s = V diag(s)`` for the 8 sign vectors ``s`` (O(3), E(3)) or the 4 with ``det F_s = +1`` (SO(3), SE(3)).
Under ``x -> x Rᵀ + t`` the frames map to ``R F_s`` (as a set), so the canonical coordinates ``(x - c) F_s`` are
invariant, and for an output of representation ρ

.. math::

    \Phi(x) = \frac{1}{|\mathcal F|}\sum_{F \in \mathcal F(x)} \rho(F, c)\; \phi\big((x - c) F\big)

is exactly equivariant (``ρ(F, c)`` maps frame coordinates back: vectors ``v Fᵀ``, points ``v Fᵀ + c``, stress
``F σ Fᵀ``, irreps ``D(F)``; invariant outputs are simply averaged). All frames go through the backbone in one
batched call (frames folded into the batch). Periodic cells rotate with the positions (``cell F``); note that the
PCA frame is built from the atoms in the cell as given, so it depends on the choice of the cell.

Degenerate covariance (spheres, regular polyhedra, linear molecules, two atoms): with a repeated eigenvalue the
eigenvectors of that eigenspace are arbitrary, and frame averaging is no longer equivariant; no exact frame can be
continuous there (Dym et al., ICML 2024). Its error grows like the backbone's anisotropy times
``u / gap`` (``u`` the unit round-off, ``gap`` the relative eigengap ``min(λ_{i+1} - λ_i) / λ_max``). The module
computes the gap per structure and, below ``gap_threshold``: ``degenerate="warn"`` (default) warns naming the
structures, ``"raise"`` raises, ``"average"`` (the remedy) averages each degenerate structure's output over
``n_remedy`` frames rotated uniformly within the degenerate eigenplane, a quadrature of the residual SO(2)
symmetry whose error falls quickly with ``n_remedy`` for smooth backbones (a fully degenerate spectrum still warns).

``mode="stochastic"``: one frame drawn uniformly per structure (not per batch), equivariant in expectation only.
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from typing import Any, Optional

import torch

from .._torch_utils import segment_sum
from torch import nn

from .._io import flatten_outputs, pair_outputs

__all__ = ["FrameAveraging", "pca_frames", "GeolieDegenerateFrameWarning"]


class GeolieDegenerateFrameWarning(UserWarning):
    """A structure's covariance is (near-)degenerate: its PCA frame is ill-defined."""


_GROUPS = {"SO3": (False, True), "O3": (False, False), "SE3": (True, True), "E3": (True, False)}


_ALL_SIGNS = torch.tensor(list(itertools.product([1.0, -1.0], repeat=3)), dtype=torch.float64)
_SIGNS = {False: _ALL_SIGNS, True: _ALL_SIGNS[_ALL_SIGNS.prod(-1) > 0]}  # 8 sign vectors; the 4 with product +1


def _signs(proper: bool, device) -> torch.Tensor:
    return _SIGNS[proper].to(device)


def pca_frames(pos: torch.Tensor, batch: Optional[torch.Tensor], n_graphs: int, center: bool, proper: bool,
               solve_on: str = "device"):
    """Per structure: centroid ``[B, 3]`` and frames ``[B, K, 3, 3]`` (float64, on ``pos``'s device), eigenvalues
    ``[B, 3]`` and relative gap ``[B]`` (float64, on the CPU).

    Centroids and covariances are sums over atoms on ``pos``'s device. ``solve_on="device"`` (default) solves the
    ``B`` 3x3 eigenproblems there too; ``"host"`` copies the covariances to the CPU once and solves them there
    (differentiable both ways). On an H100 the two cost the same within noise at 32 structures (0.5-1.8 ms) and the
    device was faster at 256 (0.7-1.2 vs 1.0-1.9 ms; benchmarks/frame_averaging.py times both), hence the default;
    on the CPU they are the same."""
    if solve_on not in ("host", "device"):
        raise ValueError(f"solve_on must be 'host' or 'device', got {solve_on!r}")
    p = pos.to(torch.float64)
    b = torch.zeros(p.shape[0], dtype=torch.long, device=p.device) if batch is None else batch
    cnt = segment_sum(torch.ones_like(p[:, 0]), b, n_graphs)
    c = segment_sum(p, b, n_graphs) / cnt[:, None].clamp_min(1)
    if not center:
        c = torch.zeros_like(c)
    xc = p - c[b]
    cov = segment_sum(xc[:, :, None] * xc[:, None, :], b, n_graphs)
    if solve_on == "host":
        host = torch.cat([cnt[:, None], cov.reshape(n_graphs, 9)], 1).cpu()  # the one device -> host transfer
        cnt, cov = host[:, 0], host[:, 1:].reshape(n_graphs, 3, 3)
    if bool((cnt == 0).any()):
        raise ValueError(f"FrameAveraging: structure(s) {torch.nonzero(cnt == 0).flatten().tolist()} have no atoms")
    lam, V = torch.linalg.eigh(cov)
    gap = torch.minimum(lam[:, 1] - lam[:, 0], lam[:, 2] - lam[:, 1]) / lam[:, 2].abs().clamp_min(1e-300)
    if proper:  # eigh may return det(V) = -1: flip the last column then, so that the 'proper' signs give det +1
        d = (V[:, :, 0] * torch.linalg.cross(V[:, :, 1], V[:, :, 2])).sum(-1)  # det of orthonormal columns (±1)
        V = torch.cat([V[:, :, :2], V[:, :, 2:] * torch.where(d < 0, -1.0, 1.0).to(V)[:, None, None]], -1)
    s = _signs(proper, V.device)  # [K, 3]
    F = V[:, None, :, :] * s[None, :, None, :]  # column j times s_j
    return c, F.to(p.device), lam.detach().cpu(), gap.detach().cpu()


class FrameAveraging(nn.Module):
    """Wrap a backbone ``backbone(z, pos, batch[, cell]) -> outputs`` into an exactly equivariant model.

    Parameters
    ----------
    backbone: any module or callable with that signature (outputs a tensor, tuple or dict).
    group: ``"SO3"``, ``"O3"``, ``"SE3"`` or ``"E3"`` (``E``/``SE`` centre each structure; ``O``/``E`` include
        reflections: 8 frames; ``SO``/``SE``: 4 proper frames).
    mode: ``"all"`` (exact) or ``"stochastic"`` (one random frame per structure).
    out_rep: representation of each output (the structure of the backbone's output), as in
        :func:`geolie.lie_derivative`: ``"scalar"`` (averaged), ``"vector"``, ``"point"``, ``"tensor2"``, irreps.
    degenerate: ``"warn"``, ``"raise"`` or ``"average"`` for structures whose relative eigengap is below
        ``gap_threshold`` (see the module docstring); ``n_remedy`` in-plane frames for ``"average"``.
    dense: the backbone takes dense clouds ``backbone(pos [B, N, 3], mask [B, N])`` and ``forward(pos, mask)``.
    frames_per_call: ``None`` (default): all frames folded into one backbone call; an integer ``G``: the frames go
        through the backbone in groups of ``G`` (``ceil(K / G)`` calls, the same result). On a CPU the K-times
        folded batch can cost more than K calls (caches; benchmarks/frame_averaging.py measures both); on a GPU one
        call is faster.
    """

    def __init__(self, backbone, group: str = "SE3", mode: str = "all", out_rep: Any = "scalar",
                 degenerate: str = "warn", gap_threshold: float = 1e-3, n_remedy: int = 16, dense: bool = False,
                 generator: Optional[torch.Generator] = None, frames_per_call: Optional[int] = None):
        super().__init__()
        if frames_per_call is not None and (not isinstance(frames_per_call, int) or frames_per_call < 1):
            raise ValueError(f"frames_per_call must be None or a positive integer, got {frames_per_call!r}")
        if group not in _GROUPS:
            raise ValueError(f"group must be one of {list(_GROUPS)}, got {group!r}")
        if mode not in ("all", "stochastic"):
            raise ValueError(f"mode must be 'all' or 'stochastic', got {mode!r}")
        if degenerate not in ("warn", "raise", "average"):
            raise ValueError(f"degenerate must be 'warn', 'raise' or 'average', got {degenerate!r}")
        self.backbone = backbone
        self.group, self.mode, self.degenerate = group, mode, degenerate
        self.center, self.proper = _GROUPS[group]
        self.out_rep = out_rep
        self.gap_threshold, self.n_remedy, self.dense = gap_threshold, n_remedy, dense
        self.generator = generator
        self.frames_per_call = frames_per_call
        self.last_gap: Optional[torch.Tensor] = None  # relative eigengap per structure of the last call (CPU)

    @property
    def n_frames(self) -> int:
        return 4 if self.proper else 8

    # -------------------------------------------------------------------------------------------------------
    def _frames(self, pos, batch, n_graphs):
        c, F, lam, gap = pca_frames(pos, batch, n_graphs, self.center, self.proper)
        self.last_gap = gap
        bad = torch.nonzero(gap < self.gap_threshold).flatten().tolist()
        if bad:
            msg = (f"FrameAveraging: structure(s) {bad[:10]}{'...' if len(bad) > 10 else ''} have a near-degenerate "
                   f"covariance (relative eigengap {[f'{float(gap[i]):.1e}' for i in bad[:5]]} < "
                   f"{self.gap_threshold:g}): their PCA frames are ill-defined and the average is not equivariant")
            if self.degenerate == "raise":
                raise ValueError(msg)
            if self.degenerate == "warn":
                warnings.warn(msg, GeolieDegenerateFrameWarning, stacklevel=3)
        return c, F, lam, gap, bad

    def _remedy_frames(self, F, lam, gap, bad):
        """For degenerate structures: every sign frame rotated uniformly (``n_remedy`` angles) within the degenerate
        eigenplane, a quadrature of the residual O(2) average; ``[B, K * n_remedy, 3, 3]``."""
        n = self.n_remedy
        B, K = F.shape[:2]
        out = F.repeat_interleave(n, dim=1)  # non-degenerate structures keep their frames (not used)
        ang = 2 * math.pi * torch.arange(n, dtype=F.dtype, device=F.device) / n
        for i in bad:
            d = lam[i]
            scale = max(float(d[2].abs()), 1e-300)
            lo, hi = float(d[1] - d[0]) / scale, float(d[2] - d[1]) / scale
            if max(lo, hi) < self.gap_threshold:
                warnings.warn(f"FrameAveraging: structure {i} has a fully degenerate covariance; the in-plane "
                              "remedy does not apply and its output is not equivariant", GeolieDegenerateFrameWarning,
                              stacklevel=3)
            j = 0 if lo <= hi else 1  # the closer pair of eigenvalues spans the degenerate plane
            Rp = torch.eye(3, dtype=F.dtype, device=F.device).repeat(n, 1, 1)
            Rp[:, j, j], Rp[:, j, j + 1] = torch.cos(ang), -torch.sin(ang)
            Rp[:, j + 1, j], Rp[:, j + 1, j + 1] = torch.sin(ang), torch.cos(ang)
            out[i] = (F[i][:, None] @ Rp[None]).reshape(K * n, 3, 3)
        return out

    def call_signature(self) -> inspect.Signature:
        """The signature ``forward`` takes in this mode: ``(z, pos, batch=None, cell=None)`` for graphs,
        ``(pos, mask=None)`` for dense batches (how geolie's adapters know how to call a frame-averaged model)."""
        return inspect.signature(self._forward_dense if self.dense else self._forward_graph)

    def forward(self, *args, **kwargs):
        if self.dense:
            return self._forward_dense(*args, **kwargs)
        return self._forward_graph(*args, **kwargs)

    def _select(self, F, n_graphs, device):
        if self.mode == "all":
            return F
        idx = torch.randint(0, F.shape[1], (n_graphs,), generator=self.generator).to(device)
        return F[torch.arange(n_graphs, device=device), idx][:, None]

    def _forward_graph(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None,
                       cell: Optional[torch.Tensor] = None):
        if pos.dim() != 2 or pos.shape[-1] != 3:
            raise ValueError(f"FrameAveraging: pos must have shape [N, 3], got {list(pos.shape)}")
        if pos.shape[0] == 0:
            raise ValueError("FrameAveraging: empty structure (no atoms)")
        n_graphs = 1 if batch is None else int(batch.max()) + 1
        c, F, lam, gap, bad = self._frames(pos, batch, n_graphs)
        F = self._select(F, n_graphs, pos.device)
        out = self._average(z, pos, batch, cell, c, F, n_graphs)
        if bad and self.degenerate == "average":
            rem = self._average(z, pos, batch, cell, c, self._remedy_frames(F, lam, gap, bad), n_graphs)
            return self._merge(out, rem, bad, batch, n_graphs)
        return out

    def _groups(self, F, one_group):
        """The frame average as the weighted sum of the averages over groups of ``frames_per_call`` frames."""
        K = F.shape[1]
        G = self.frames_per_call or K
        if G >= K:
            return one_group(F)
        parts = [(one_group(F[:, k:k + G]), min(G, K - k) / K) for k in range(0, K, G)]
        return self._zip_outputs([p for p, _ in parts],
                                 lambda rep, *ts: sum(w * t for (_, w), t in zip(parts, ts)))

    def _average(self, z, pos, batch, cell, c, F, n_graphs):
        return self._groups(F, lambda Fg: self._average_group(z, pos, batch, cell, c, Fg, n_graphs))

    def _average_group(self, z, pos, batch, cell, c, F, n_graphs):
        K = F.shape[1]
        dtype = pos.dtype
        b = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device) if batch is None else batch
        F, c = F.to(dtype), c.to(dtype)
        xf = torch.einsum("nj,nkji->kni", pos - c[b], F[b])  # (x - c) F for every frame: [K, N, 3]
        pos_all = xf.reshape(-1, 3)
        z_all = z.repeat(K) if z is not None else None
        b_all = (b[None, :] + n_graphs * torch.arange(K, device=pos.device)[:, None]).reshape(-1)
        args = (z_all, pos_all, b_all)
        if cell is not None:
            cell_b = cell.reshape(-1, 3, 3).to(dtype)
            if cell_b.shape[0] != n_graphs:
                raise ValueError(f"FrameAveraging: {cell_b.shape[0]} cells for {n_graphs} structures")
            cf = torch.einsum("bij,bkjl->kbil", cell_b, F).reshape(-1, 3, 3)
            args = args + (cf,)
        out = self.backbone(*args)
        return self._map_back(out, F, c, b, n_graphs, K, pos.shape[0])

    def _zip_outputs(self, outs, fn):
        """Outputs of the backbone's structure (checked against ``out_rep`` by :func:`pair_outputs`) whose every
        tensor is ``fn(rep, t_1, ..., t_n)`` of the matching tensors of ``outs``."""
        leaves, rebuild = pair_outputs(outs[0], self.out_rep, "FrameAveraging backbone output")
        flat = [flatten_outputs(o) for o in outs]
        return rebuild([fn(leaf.rep, *ts) for leaf, *ts in zip(leaves, *flat)])

    @staticmethod
    def _average_rows(y, rep, Fr, cr):
        """``y [K, rows, ...]`` computed in frame coordinates, each row with its frames ``Fr [rows, K, 3, 3]`` and
        centre ``cr [rows, 3]``: map every frame's output back to the lab (``ρ(F, c)``) and average over frames."""
        K, rows = y.shape[:2]
        Rr = Fr.transpose(0, 1).reshape(-1, 3, 3)  # [K*rows, 3, 3]: frame -> lab rotation is F
        tr = None if rep.translation_invariant else cr[None].expand(K, -1, -1).reshape(-1, 3)
        mapped = rep.act_rows(y.reshape(K * rows, *y.shape[2:]), Rr, tr)
        return mapped.reshape(K, rows, *y.shape[2:]).mean(0)

    def _map_back(self, out, F, c, b, n_graphs, K, n_nodes):
        def leaf(rep, t):
            y = t.reshape(K, -1, *t.shape[1:]) if t.dim() >= 1 else t.reshape(K, 1)
            if y.shape[1] == n_nodes:
                idx = b
            elif y.shape[1] == n_graphs:
                idx = torch.arange(n_graphs, device=t.device)
            else:
                raise ValueError(f"FrameAveraging: output of shape {list(t.shape)} is neither per atom ({n_nodes} "
                                 f"rows per frame) nor per structure ({n_graphs})")
            return self._average_rows(y, rep, F[idx], c[idx])

        return self._zip_outputs([out], leaf)

    def _merge(self, base, rem, bad, batch, n_graphs):
        """Replace the outputs of the degenerate structures by the remedy's."""
        def pick(rep, a, r):
            b = torch.zeros(a.shape[0], dtype=torch.long, device=a.device) if batch is None else batch
            badt = torch.tensor(bad, device=a.device)
            rows = torch.arange(n_graphs, device=a.device) if a.shape[0] == n_graphs else b
            mask = torch.isin(rows, badt).reshape((-1,) + (1,) * (a.dim() - 1))
            return torch.where(mask, r, a)

        return self._zip_outputs([base, rem], pick)

    def _forward_dense(self, pos: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if pos.dim() != 3 or pos.shape[-1] != 3:
            raise ValueError(f"FrameAveraging(dense=True): pos must have shape [B, N, 3], got {list(pos.shape)}")
        B, N, _ = pos.shape
        mask = torch.ones(B, N, dtype=torch.bool, device=pos.device) if mask is None else mask.bool()
        flat = pos[mask]
        b = torch.arange(B, device=pos.device)[:, None].expand(B, N)[mask]
        c, F, lam, gap, bad = self._frames(flat, b, B)
        F, c = self._select(F, B, pos.device).to(pos.dtype), c.to(pos.dtype)

        def one_group(Fg):
            K = Fg.shape[1]
            xf = torch.einsum("bnj,bkji->kbni", pos - c[:, None, :], Fg) * mask[None, :, :, None]
            out = self.backbone(xf.reshape(K * B, N, 3), mask.repeat(K, 1))
            return self._map_back_dense(out, Fg, c, B, K)

        return self._groups(F, one_group)

    def _map_back_dense(self, out, F, c, B, K):
        return self._zip_outputs([out], lambda rep, t: self._average_rows(t.reshape(K, B, *t.shape[1:]), rep, F, c))
