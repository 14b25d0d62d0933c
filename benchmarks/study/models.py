r"""The study's unconstrained models (not built equivariant) and their size ladders.

* :class:`EdgeMPNN` — message passing on raw edge vectors: ``m_ij = MLP([h_i, h_j, rbf(r_ij), d_ij / r_c]) f_c(r_ij)``,
  ``h_i ← h_i + Σ_j m_ij``, ``E = Σ_i MLP(h_i)``. The Cartesian components of ``d_ij = x_j − x_i`` enter the MLP
  directly: translation invariant, rotation invariant only as far as it learns to be.
* :class:`RelTransformer` — a transformer whose tokens see relative geometry: ``t_i = emb(z_i) + Σ_j
  MLP([rbf(r_ij), d_ij / r_c]) f_c(r_ij)`` (a geometric tokenizer on raw edge vectors, like the MPNN's messages),
  then full attention within each structure (written out so that forces, and the penalty's third derivatives, can
  differentiate through it) with a per-head bias ``w_h · rbf(r_ij)`` from pair distances. The earlier study's
  transformer on centred coordinates (tokens ``emb(z_i) + W (x_i − x̄)``) never left the zero-force solution; this
  one reads the geometry the forces depend on.
* :class:`VectorMPNN` — the aliasing family: hidden features that transform, ``h_i`` (scalars) and ``v_i [C, 3]``
  (vectors). Messages read raw edge vectors as the MLP's input (not built equivariant, as the MPNN), vector messages
  are ``a_ij d̂_ij + b_ij v_j`` with gates from that MLP, a channel mix (:class:`VectorLinear`) then a vector
  nonlinearity: ``"pointwise"`` applies SiLU to each Cartesian component (Gruver et al.'s aliasing: a pointwise
  nonlinearity on features that rotate does not commute with the rotation) or ``"gated"`` multiplies each vector by
  ``sigmoid(a |v| + b)`` (commutes exactly). Scalars receive ``MLP(|v_i|²)``. Both variants break rotations at
  their input; only the pointwise one has a second source, and layer-wise attribution says which dominates.
* :class:`PointNetClassifier` — ``shapes`` classification from centred coordinates: a per-point MLP, max pooling,
  an MLP to 12 logits.

All take ``(z, pos, batch)`` (``batch`` may be ``None``) as the bundled potentials do, so that geolie's adapters,
frame averaging and the Lie-derivative penalty apply unchanged. :class:`Scaled` maps a model's output to eV.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from geolie.models._common import cosine_cutoff, edge_geometry, gaussian_rbf, sum_per_graph


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, o))


def _centred(pos: torch.Tensor, batch: Optional[torch.Tensor], n_graphs: int) -> torch.Tensor:
    if batch is None:
        return pos - pos.mean(0, keepdim=True)
    count = torch.zeros(n_graphs, dtype=pos.dtype, device=pos.device).index_add_(
        0, batch, torch.ones_like(pos[:, 0]))
    mean = torch.zeros(n_graphs, 3, dtype=pos.dtype, device=pos.device).index_add_(0, batch, pos) / count[:, None]
    return pos - mean[batch]


def _n_graphs(batch: Optional[torch.Tensor]) -> int:
    return 1 if batch is None else int(batch.max()) + 1


class EdgeMPNN(nn.Module):
    """Message passing on raw edge vectors (see the module docstring); ``forward(z, pos, batch) -> energy [B]``."""

    def __init__(self, width: int = 32, layers: int = 2, cutoff: float = 5.0, n_rbf: int = 16, seed: int = 0):
        super().__init__()
        self.cutoff, self.n_rbf = cutoff, n_rbf
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(100, width)
            self.messages = nn.ModuleList([_mlp(2 * width + n_rbf + 3, width, width) for _ in range(layers)])
            self.readout = _mlp(width, width, 1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, dst, vec, r = edge_geometry(pos, None, self.cutoff, batch)
        fc = cosine_cutoff(r, self.cutoff)[:, None]
        edge = torch.cat([gaussian_rbf(r, self.n_rbf, self.cutoff), vec / self.cutoff], -1)
        h = self.embed(z).to(pos.dtype)
        for mlp in self.messages:
            m = mlp(torch.cat([h[dst], h[src], edge], -1)) * fc
            h = h + torch.zeros_like(h).index_add(0, dst, m)
        return sum_per_graph(self.readout(h)[:, 0], batch, _n_graphs(batch))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, t: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, n, w = t.shape
        q, k, v = self.qkv(self.n1(t)).reshape(B, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(w // self.heads)
        if bias is not None:
            a = a + bias
        a = a.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        t = t + self.out((a @ v).transpose(1, 2).reshape(B, n, w))
        return t + self.ff(self.n2(t))


class RelTransformer(nn.Module):
    """A transformer on relative geometry (see the module docstring); ``forward(z, pos, batch) -> energy [B]``."""

    def __init__(self, width: int = 32, layers: int = 2, heads: int = 4, cutoff: float = 5.0, n_rbf: int = 16,
                 seed: int = 0):
        super().__init__()
        self.cutoff, self.n_rbf, self.heads = cutoff, n_rbf, heads
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(100, width)
            self.tokenizer = _mlp(n_rbf + 3, width, width)
            self.bias = nn.Linear(n_rbf, heads * layers)
            self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])
            self.readout = _mlp(width, width, 1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = _n_graphs(batch)
        b = torch.zeros_like(z) if batch is None else batch
        counts = torch.bincount(b, minlength=B)
        slot = torch.arange(len(z), device=z.device) - (torch.cumsum(counts, 0) - counts)[b]
        n = int(counts.max())
        x = pos.new_zeros(B, n, 3).index_put((b, slot), pos)
        mask = torch.zeros(B, n, dtype=torch.bool, device=z.device).index_put(
            (b, slot), torch.ones_like(b, dtype=torch.bool))
        pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=z.device)
        d = x[:, None, :, :] - x[:, :, None, :]  # d[b, i, j] = x_j - x_i
        r = torch.sqrt((d * d).sum(-1) + 1e-12)  # the diagonal is masked; the epsilon keeps its gradient finite
        rbf = gaussian_rbf(r, self.n_rbf, self.cutoff)
        w = (cosine_cutoff(r, self.cutoff) * pair)[..., None]
        t = self.embed(z).to(pos.dtype)
        dense = t.new_zeros(B, n, t.shape[-1]).index_put((b, slot), t)
        dense = dense + (self.tokenizer(torch.cat([rbf, d / self.cutoff], -1)) * w).sum(2)
        bias = self.bias(rbf).masked_fill(~pair[..., None], 0.0).permute(0, 3, 1, 2)  # [B, heads·layers, n, n]
        for k, blk in enumerate(self.blocks):
            dense = blk(dense, mask, bias[:, k * self.heads:(k + 1) * self.heads])
        return sum_per_graph(self.readout(dense[b, slot])[:, 0], batch, B)


class VectorLinear(nn.Module):
    """``v [N, C_in, 3] -> W v [N, C_out, 3]``: mixes channels, never components (commutes with rotations)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nck->nok", self.weight.to(v.dtype), v)


class NormGate(nn.Module):
    """``v -> v · sigmoid(a |v| + b)`` per channel (``|v|`` over the 3 components): commutes with rotations."""

    def __init__(self, channels: int):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt((v * v).sum(-1) + 1e-12)
        return v * torch.sigmoid(self.a.to(v.dtype) * norm + self.b.to(v.dtype))[..., None]


class VectorMPNN(nn.Module):
    """Scalar and vector hidden features (see the module docstring); ``forward(z, pos, batch) -> energy [B]``.

    ``nonlinearity``: ``"pointwise"`` (SiLU per Cartesian component of each vector: aliases) or ``"gated"``
    (:class:`NormGate`: equivariant). Both read raw edge vectors in the message MLP."""

    def __init__(self, width: int = 32, layers: int = 2, cutoff: float = 5.0, n_rbf: int = 16,
                 nonlinearity: str = "pointwise", seed: int = 0):
        super().__init__()
        if nonlinearity not in ("pointwise", "gated"):
            raise ValueError(f"VectorMPNN: nonlinearity must be 'pointwise' or 'gated', not {nonlinearity!r}")
        self.cutoff, self.n_rbf, self.nonlinearity, self.width = cutoff, n_rbf, nonlinearity, width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(100, width)
            self.messages = nn.ModuleList([_mlp(2 * width + n_rbf + 3, width, 3 * width) for _ in range(layers)])
            self.mix = nn.ModuleList([VectorLinear(width, width) for _ in range(layers)])
            self.act = nn.ModuleList([nn.SiLU() if nonlinearity == "pointwise" else NormGate(width)
                                      for _ in range(layers)])
            self.to_scalar = nn.ModuleList([_mlp(width, width, width) for _ in range(layers)])
            self.readout = _mlp(width, width, 1)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, dst, vec, r = edge_geometry(pos, None, self.cutoff, batch)
        fc = cosine_cutoff(r, self.cutoff)[:, None]
        unit = vec / r[:, None]
        edge = torch.cat([gaussian_rbf(r, self.n_rbf, self.cutoff), vec / self.cutoff], -1)
        h = self.embed(z).to(pos.dtype)
        v = h.new_zeros(len(z), self.width, 3)
        C = self.width
        for mlp, mix, act, sc in zip(self.messages, self.mix, self.act, self.to_scalar):
            m = mlp(torch.cat([h[dst], h[src], edge], -1)) * fc
            msg_v = m[:, C:2 * C, None] * unit[:, None, :] + m[:, 2 * C:, None] * v[src]
            h = h + torch.zeros_like(h).index_add(0, dst, m[:, :C])
            v = act(mix(v + torch.zeros_like(v).index_add(0, dst, msg_v)))
            h = h + sc((v * v).sum(-1))
        return sum_per_graph(self.readout(h)[:, 0], batch, _n_graphs(batch))


class PointNetClassifier(nn.Module):
    """``forward(z, pos, batch) -> logits [B, classes]`` from centred coordinates (``z`` is ignored)."""

    def __init__(self, width: int = 64, classes: int = 12, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.point = _mlp(3, width, width)
            self.head = _mlp(width, width, classes)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = _n_graphs(batch)
        h = self.point(_centred(pos, batch, B))
        b = torch.zeros(len(pos), dtype=torch.long, device=pos.device) if batch is None else batch
        pooled = h.new_full((B, h.shape[-1]), float("-inf")).index_reduce(0, b, h, "amax")
        return self.head(pooled)


class Scaled(nn.Module):
    """``E = shift · n_atoms + scale · model(z, pos, batch)`` (eV): the network works in O(1) units.

    ``edge_index_arg``: the model's signature is ``(z, pos, edge_index, batch)`` (geolie's e3nn and Gaunt potentials:
    they build their edges when given ``None``). Outputs ``[B, 1]`` (PyG's SchNet) are flattened."""

    def __init__(self, model: nn.Module, shift: float, scale: float, edge_index_arg: bool = False):
        super().__init__()
        self.model, self.edge_index_arg = model, edge_index_arg
        self.register_buffer("shift", torch.tensor(float(shift), dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = _n_graphs(batch)
        n = torch.bincount(torch.zeros_like(z) if batch is None else batch, minlength=B).to(pos.dtype)
        e = self.model(z, pos, None, batch) if self.edge_index_arg else self.model(z, pos, batch)
        return self.shift.to(pos.dtype) * n + self.scale.to(pos.dtype) * e.reshape(-1)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PyGNeighbours(nn.Module):
    """Calls a PyG model (SchNet) with geolie's pure-torch ``radius_graph`` in place of torch-cluster's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        from geolie.adapters.pyg import geolie_radius_graph

        with geolie_radius_graph():
            return self.model(z, pos, batch)
