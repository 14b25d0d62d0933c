"""Shared pieces of geolie's spherical-signal layers (:class:`~geolie.nn.GauntTensorProduct`,
:class:`~geolie.nn.SphericalGridNonlinearity`): the per-channel layout of an irreps, and a module base class that
keeps float64 master copies of its constant buffers."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["IrrepsLayout", "Float64Buffers"]


class IrrepsLayout:
    """An irreps ``C x (l, p)`` laid out as ``[..., C * dim]`` (e3nn) and as ``[..., C, d]`` per channel."""

    def __init__(self, irreps, name: str):
        from e3nn import o3

        self.irreps = o3.Irreps(irreps)
        if len(self.irreps) == 0:
            raise ValueError(f"{name}: empty irreps")
        muls = {mul for mul, _ in self.irreps}
        if len(muls) != 1:
            raise ValueError(f"{name}: a Gaunt product is channel-wise, every irrep needs the same multiplicity; got "
                             f"{self.irreps}")
        self.mul = muls.pop()
        keys = [(ir.l, ir.p) for _, ir in self.irreps]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: repeated irrep in {self.irreps}; merge them (irreps.simplify())")
        self.ls = [ir.l for _, ir in self.irreps]
        self.pvals = [ir.p * (-1) ** ir.l for _, ir in self.irreps]  # the signal's value parity
        self.d = sum(2 * l + 1 for l in self.ls)
        self.lmax = max(self.ls)
        # per-channel component -> (irrep index, m index), and the row in the full SH vector (l², l² + 2l)
        self.comp_irrep = [i for i, l in enumerate(self.ls) for _ in range(2 * l + 1)]
        self.comp_sh = [l * l + m for l in self.ls for m in range(2 * l + 1)]
        self.signals = sorted(set(self.pvals), reverse=True)  # +1 first
        self.blocks = [(mul, ir.dim) for mul, ir in self.irreps]  # plain ints: torch.compile-friendly
        self.dim = self.irreps.dim
        # one gather each way between the e3nn layout [C x (2l+1) blocks] and the channel layout [C, d]
        perm, start = [], 0
        offs = []
        for mul, d in self.blocks:
            offs.append(start)
            start += mul * d
        for c in range(self.mul):
            for (mul, d), o in zip(self.blocks, offs):
                perm.extend(range(o + c * d, o + (c + 1) * d))
        self.perm = torch.tensor(perm)
        self.inv_perm = torch.argsort(self.perm)
        self.identity = bool(torch.equal(self.perm, torch.arange(len(perm))))

    def to_channels(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``[..., C * dim]`` -> ``[..., C, d]``; ``perm``: this layout's ``perm`` on ``x``'s device (the owning
        module keeps it as a buffer, see ``Float64Buffers._register_layout``)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected a last dimension of {self.dim} ({self.irreps}), got {x.shape[-1]}")
        if not self.identity:
            x = x[..., perm]
        return x.reshape(*x.shape[:-1], self.mul, self.d)

    def from_channels(self, xc: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
        x = xc.reshape(*xc.shape[:-2], -1)
        return x if self.identity else x[..., inv_perm]

    def sh_rows(self, pval: int) -> List[int]:
        """Components belonging to the signal of value parity ``pval``."""
        return [c for c, i in enumerate(self.comp_irrep) if self.pvals[i] == pval]


class Float64Buffers(nn.Module):
    """Keeps float64 master copies of its floating buffers through ``.to(dtype)`` / ``.float()`` (only the device
    follows), so that a float32 model can be cast back to float64 without losing precision; ``_b(name, dtype)``
    returns a cached cast for the forward pass."""

    def _apply(self, fn, recurse=True):
        saved = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float64}
        super()._apply(fn, recurse)
        for n, b in saved.items():
            self._buffers[n] = b.to(device=fn(b[:0]).device)
        self._cast_cache = {}
        return self

    def _register_layout(self, key: str, lay: IrrepsLayout) -> None:
        """``lay``'s index permutations as buffers ``<key>_perm`` / ``<key>_iperm``: they follow the module's
        device like every other constant (not saved in the state dict)."""
        self.register_buffer(f"{key}_perm", lay.perm, persistent=False)
        self.register_buffer(f"{key}_iperm", lay.inv_perm, persistent=False)

    def _b(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._buffers[name]
        if torch.compiler.is_compiling():  # traced: the cast is part of the graph (no Python-side cache)
            return t if t.dtype == dtype else t.to(dtype)
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (name, dtype)
        if key not in cache or cache[key].device != t.device:
            cache[key] = t if t.dtype == dtype else t.to(dtype)
        return cache[key]
