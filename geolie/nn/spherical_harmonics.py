r"""Real spherical harmonics of any degree in e3nn's basis, and exact quadrature grids on the sphere.

Normalization: ``"integral"`` (orthonormal, :math:`\int_{S^2} Y_{lm} Y_{l'm'} d\Omega = \delta_{ll'}\delta_{mm'}`), so
that :math:`G = \int Y_{l_1m_1} Y_{l_2m_2} Y_{l_3m_3} d\Omega` are the real Gaunt coefficients.

Degrees up to 12 come from ``e3nn.o3.spherical_harmonics``. e3nn stops there, so higher degrees are built here by
the recursion :math:`Y_l \propto C^{(1, l-1, l)} (Y_1 \otimes Y_{l-1})` with e3nn's own ``wigner_3j``: the top
component of a product of two harmonics is a harmonic of the summed degree, in the same basis, and the constant is
fixed by the addition theorem :math:`\sum_m Y_{lm}(x)^2 = (2l+1)/(4\pi)`. The basis is therefore e3nn's for every
degree (the tests check the recursion against e3nn up to l = 12 and equivariance beyond).

Gauss–Legendre grid: ``n_beta`` Gauss–Legendre nodes in :math:`\cos\beta` times ``n_alpha`` equispaced azimuths
integrates exactly every polynomial of degree ``<= min(2 n_beta - 1, n_alpha - 1)`` on the sphere; the minimal
exact grid for a product of degrees ``L1, L2`` projected on degree ``Lout`` is ``n_beta = ceil((D+1)/2)``,
``n_alpha = D+1`` with ``D = L1 + L2 + Lout``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

from .._torch_utils import default_dtype

__all__ = ["spherical_harmonics", "gauss_legendre_grid", "minimal_grid", "wigner_3j_float64"]

E3NN_LMAX = 12


@lru_cache(maxsize=None)
def wigner_3j_float64(l1: int, l2: int, l3: int) -> torch.Tensor:
    """e3nn's ``wigner_3j(l1, l2, l3)`` computed in float64 (cached)."""
    from e3nn import o3

    with default_dtype(torch.float64):
        return o3.wigner_3j(l1, l2, l3).to(torch.float64)


def spherical_harmonics(lmax: int, xyz: torch.Tensor, recursion_from: int = E3NN_LMAX) -> torch.Tensor:
    """``[..., (lmax+1)²]`` real SH (integral normalization, e3nn basis) of the unit vectors ``xyz [..., 3]``.

    Degrees ``<= recursion_from`` use e3nn; higher ones the recursion of the module docstring. Computed in
    float64.
    """
    from e3nn import o3

    x = xyz.to(torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    lo = min(lmax, recursion_from)
    ys = [o3.spherical_harmonics(l, x, normalize=False, normalization="integral") for l in range(lo + 1)]
    y1 = ys[1] if lmax >= 1 else None
    for l in range(lo + 1, lmax + 1):
        t = torch.einsum("ijk,...i,...j->...k", wigner_3j_float64(1, l - 1, l), y1, ys[l - 1])
        scale = math.sqrt((2 * l + 1) / (4 * math.pi)) / t.norm(dim=-1).mean()
        ys.append(t * scale)
    return torch.cat(ys, -1)


def gauss_legendre_grid(n_beta: int, n_alpha: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors ``[n_beta * n_alpha, 3]`` and quadrature weights (summing to 4π), float64."""
    if n_beta < 1 or n_alpha < 1:
        raise ValueError(f"grid sizes must be positive, got n_beta={n_beta}, n_alpha={n_alpha}")
    cb, wb = np.polynomial.legendre.leggauss(n_beta)
    alpha = 2 * np.pi * np.arange(n_alpha) / n_alpha
    sb = np.sqrt(1 - cb ** 2)
    xyz = np.stack([np.outer(sb, np.cos(alpha)), np.outer(sb, np.sin(alpha)), np.outer(cb, np.ones(n_alpha))], -1)
    w = np.outer(wb, np.full(n_alpha, 2 * np.pi / n_alpha))
    return torch.from_numpy(xyz.reshape(-1, 3)), torch.from_numpy(w.reshape(-1))


def minimal_grid(degree: int) -> Tuple[int, int]:
    """``(n_beta, n_alpha)`` of the smallest Gauss–Legendre grid exact for polynomials of ``degree``."""
    return (degree + 2) // 2, degree + 1
