r"""Conservative force fields from an energy, built for exact Lie derivatives.

For an energy :math:`E(x)` of positions ``x [N, 3]`` (and optionally a cell ``[3, 3]`` whose rows are the lattice
vectors), :func:`conservative` returns ``(E, F)`` with :math:`F = -\partial E / \partial x`, and with a cell also the
stress :math:`\sigma = \frac{1}{V} \frac{\partial E}{\partial \varepsilon}\big|_{\varepsilon=0}` for the symmetric
strain ``x -> x (I+ε)ᵀ``, ``cell -> cell (I+ε)ᵀ`` and ``V = |det cell|`` (ASE's sign convention). The gradients are
taken with ``torch.func.grad_and_value``, so the result composes with ``torch.func.jvp`` and ``vmap``:
Lie derivatives of forces and stress are exact forward-over-reverse derivatives, all generators at once.

Identities (the energy's Lie derivatives are free once forces are known):

.. math::

    L_{r_k} E = -\sum_i F_i \cdot (X_k (x_i - c)), \qquad L_{t_k} E = -\sum_i F_{ik}.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._groups import SE3, as_group, hat
from ._structure import centroids

__all__ = ["conservative", "lie_energy_from_forces"]


def conservative(energy_fn: Callable[..., torch.Tensor], as_dict: bool = False) -> Callable:
    """Wrap ``energy_fn(pos, *args, **kwargs) -> E`` into ``fn(pos, *args, cell=None, **kwargs)``.

    Returns ``(energy, forces)`` (a dict ``{"energy", "forces"[, "stress"]}`` with ``as_dict=True``); when ``cell`` is
    given (a ``[3, 3]`` tensor, rows are lattice vectors) it is
    passed on as ``energy_fn(pos, *args, cell=cell, **kwargs)`` and ``(energy, forces, stress)`` is returned.
    ``energy_fn`` may return a scalar or one energy per structure ``[B]``: forces are the gradient of their sum;
    stress needs a single structure. ``energy_fn`` must be written with differentiable torch operations; it must
    not call ``torch.autograd.grad`` itself.
    """

    def energy_forces(pos: torch.Tensor, *args, cell: Optional[torch.Tensor] = None, **kwargs):
        if not isinstance(pos, torch.Tensor) or pos.shape[-1:] != (3,):
            raise ValueError(f"conservative: pos must be a tensor of shape [N, 3], got {getattr(pos, 'shape', pos)}")
        if cell is None:

            def total(p):
                e = energy_fn(p, *args, **kwargs)
                return e.sum(), e

            g, e = torch.func.grad(total, has_aux=True)(pos)
            return {"energy": e, "forces": -g} if as_dict else (e, -g)
        if cell.shape != (3, 3):
            raise ValueError(f"conservative: cell must have shape [3, 3], got {list(cell.shape)}")

        def strained(p, eps):
            eps = 0.5 * (eps + eps.T)
            F = torch.eye(3, dtype=p.dtype, device=p.device) + eps
            e = energy_fn(p @ F.T, *args, cell=cell @ F.T, **kwargs)
            if e.numel() != 1:
                raise ValueError("conservative: stress needs an energy_fn returning one energy (a single cell)")
            return e.sum(), e

        eps0 = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device)
        (gp, ge), e = torch.func.grad(strained, argnums=(0, 1), has_aux=True)(pos, eps0)
        volume = torch.linalg.det(cell).abs()
        if as_dict:
            return {"energy": e, "forces": -gp, "stress": ge / volume}
        return e, -gp, ge / volume

    energy_forces.__wrapped__ = energy_fn
    energy_forces._geolie_energy_fn = energy_fn  # lets lie_derivative take the Hessian-vector-product path
    energy_forces._geolie_as_dict = as_dict
    energy_forces.__doc__ = f"Energy, forces (and stress) of {getattr(energy_fn, '__name__', 'energy_fn')}."
    return energy_forces


def lie_energy_from_forces(pos: torch.Tensor, forces: torch.Tensor, *, group=SE3, about: str = "origin",
                           batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The energy's Lie derivatives from the forces alone: ``[group.dim]`` (or ``[group.dim, B]`` with ``batch``).

    :math:`L_{r_k} E = -\sum_i F_i\cdot(X_k (x_i - c))` and :math:`L_{t_k} E = -\sum_i F_{ik}`, exact for a
    conservative field :math:`F = -\nabla E` (``c`` is the origin, or each structure's centroid with
    ``about="centroid"``). Comparing these with the Lie derivative of the energy computed directly checks that the
    forces really are the energy's gradient.
    """
    group = as_group(group)
    if pos.shape != forces.shape or pos.shape[-1] != 3:
        raise ValueError(f"pos {list(pos.shape)} and forces {list(forces.shape)} must both have shape [N, 3]")
    if about not in ("origin", "centroid"):
        raise ValueError(f"about must be 'origin' or 'centroid', got {about!r}")
    x = pos
    if about == "centroid":
        c = centroids(pos, batch)
        x = pos - (c[batch] if batch is not None else c[0])
    omega, v = group.algebra_basis(dtype=pos.dtype, device=pos.device)
    W = hat(omega)  # [K, 3, 3]
    tang = torch.einsum("nj,kij->kni", x, W) + v[:, None, :]  # dρ(X_k) x, [K, N, 3]
    per_atom = -(tang * forces[None]).sum(-1)  # [K, N]
    if batch is None:
        return per_atom.sum(-1)
    batch = torch.as_tensor(batch, device=pos.device).long()
    n = int(batch.max()) + 1
    return torch.zeros(group.dim, n, dtype=pos.dtype, device=pos.device).index_add_(1, batch, per_atom)
