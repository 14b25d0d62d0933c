r"""Spherical-grid nonlinearity: project to a grid, act pointwise (or with an MLP over channels), project back.

For channel-wise signals ``f_c = Σ x_{c,lm} Y_lm`` (irreps ``C x (l, p)`` with natural parity, ``p = (-1)^l``):

.. math::

    z_{c,lm} = \sum_{g} w_g\, \sigma\big(f(\hat s_g)\big)_c\, Y_{lm}(\hat s_g),

on a Gauss–Legendre grid ``(n_beta, n_alpha)``. ``σ`` is a pointwise activation, or an MLP mixing the ``C``
channels at each grid point (as in Facet). Composing with a nonlinearity breaks band-limitation, so the projection
aliases: the layer is equivariant only approximately, with an error that falls as the grid is refined. Its Lie
derivative against the resolution is measured in ``benchmarks/grid_nonlinearity.py`` (the aliasing story of
Gruver et al., in 3D). With the identity activation and a grid exact for degree ``2L`` it is exactly the identity.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ._layout import Float64Buffers, IrrepsLayout
from .spherical_harmonics import gauss_legendre_grid, minimal_grid, spherical_harmonics

__all__ = ["SphericalGridNonlinearity"]


class SphericalGridNonlinearity(Float64Buffers):
    """``forward(x [..., irreps.dim]) -> [..., irreps.dim]``; see the module docstring.

    ``resolution``: ``(n_beta, n_alpha)``; default: the grid exact for degree ``3 L`` (a common compromise).
    ``act``: pointwise activation (default SiLU). ``mlp_hidden``: if given, an MLP ``C -> hidden -> C`` over
    channels at each grid point replaces the pointwise activation.
    """

    def __init__(self, irreps, act: Callable = torch.nn.functional.silu, resolution: Optional[Tuple[int, int]] = None,
                 mlp_hidden: Optional[int] = None):
        super().__init__()
        self.lay = IrrepsLayout(irreps, "irreps")
        self._register_layout("lay", self.lay)
        if any(pv != 1 for pv in self.lay.pvals):
            raise ValueError(f"SphericalGridNonlinearity needs natural parity (0e, 1o, 2e, ...), got {self.lay.irreps}:"
                             " a pointwise nonlinearity of a pseudo-signal is not parity equivariant")
        self.irreps = self.lay.irreps
        self.act = act
        L = self.lay.lmax
        self.resolution = tuple(resolution) if resolution is not None else minimal_grid(3 * L)
        xyz, w = gauss_legendre_grid(*self.resolution)
        Y = spherical_harmonics(L, xyz)[:, self.lay.comp_sh]  # [G, d]
        self.register_buffer("B", Y.T.contiguous())  # [d, G]
        self.register_buffer("P", (Y * w[:, None]).contiguous())  # [G, d]
        C = self.lay.mul
        self.mlp = nn.Sequential(nn.Linear(C, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, C)) if mlp_hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = self.lay.to_channels(x, self.lay_perm)  # [..., C, d]
        f = xc @ self._b('B', xc.dtype)  # [..., C, G]
        if self.mlp is not None:
            f = self.mlp(f.transpose(-1, -2)).transpose(-1, -2)
        else:
            f = self.act(f)
        return self.lay.from_channels(f @ self._b('P', f.dtype), self.lay_iperm)

    def extra_repr(self) -> str:
        return f"{self.irreps}, resolution={self.resolution}, {'mlp' if self.mlp is not None else 'pointwise'}"
