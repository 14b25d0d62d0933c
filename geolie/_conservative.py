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

from ._torch_utils import segment_sum

from ._groups import SE3, as_group, hat
from ._io import centroids

__all__ = ["stress_gap", "conservative", "lie_energy_from_forces", "conservativeness"]


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
    return segment_sum(per_atom.T, batch, n).T


def _per_structure_sq(t: torch.Tensor, batch: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Squared norms of ``t [N, ...]`` summed per structure: ``[n]``."""
    sq = t.detach().double().reshape(t.shape[0], -1).pow(2).sum(-1)
    if batch is None:
        return sq.sum().reshape(1)
    return segment_sum(sq, batch, n)


def conservativeness(fn: Callable, inputs, *, batch: Optional[torch.Tensor] = None, n_probes: int = 3,
                     seed: int = 0, energy: str = "energy", forces: str = "forces"):
    r"""How far a model's forces are from a conservative field, per structure.

    ``fn(*inputs)`` returns a dict with an energy (one per structure) and forces ``[N, 3]``; ``inputs[0]`` are the
    positions. Returns ``{"force_gap_rel": [B], "jacobian_asym_rel": [B]}`` (numpy arrays) with

    * ``force_gap_rel = ‖F + ∇E‖ / ‖F‖``: the distance of the returned forces from ``-∇E`` (one reverse pass);
    * ``jacobian_asym_rel = ‖A‖_F / ‖J‖_F`` for the force Jacobian ``J = ∂F/∂x`` and its antisymmetric part
      ``A = (J − Jᵀ)/2``: zero for a conservative field (``J = −H`` is symmetric), at most 1. Estimated with
      ``n_probes`` Gaussian probes ``v`` (Hutchinson: ``E‖Mv‖² = ‖M‖_F²``) as
      ``sqrt(Σ‖A v‖² / Σ‖J v‖²)``; ``Jᵀv`` by one reverse pass, ``J v`` by double backward (two).

    With ``batch`` the structures must be independent (a block-diagonal Jacobian) and figures are per structure.
    """
    pos = inputs[0].detach().clone().requires_grad_(True)
    n = 1 if batch is None else int(batch.max()) + 1
    with torch.enable_grad():
        out = fn(pos, *inputs[1:])
        if energy not in out or forces not in out:
            raise ValueError(f"conservativeness: the function returned {sorted(out)}; it needs {energy!r} and "
                             f"{forces!r}")
        E, F = out[energy], out[forces]
        if F.shape != pos.shape:
            raise ValueError(f"conservativeness: forces have shape {list(F.shape)}, positions {list(pos.shape)}")
        gE = torch.autograd.grad(E.sum(), pos, retain_graph=True, allow_unused=True)[0]
        gE = torch.zeros_like(pos) if gE is None else gE
        fnorm = _per_structure_sq(F, batch, n).sqrt()
        gap = _per_structure_sq(F.detach() + gE, batch, n).sqrt()
        gen = torch.Generator().manual_seed(seed)
        num = torch.zeros(n, dtype=torch.float64, device=pos.device)
        den = torch.zeros_like(num)
        for _ in range(n_probes):
            v = torch.randn(tuple(pos.shape), generator=gen, dtype=torch.float64).to(pos)
            u = torch.zeros_like(F, requires_grad=True)
            JTu = torch.autograd.grad((F * u).sum(), pos, create_graph=True, allow_unused=True)[0]
            if JTu is None or not JTu.requires_grad:  # forces do not depend on positions: J = 0
                continue
            Jv = torch.autograd.grad((JTu * v).sum(), u, retain_graph=True, allow_unused=True)[0]
            JTv = torch.autograd.grad((F * v).sum(), pos, retain_graph=True, allow_unused=True)[0]
            Jv = torch.zeros_like(pos) if Jv is None else Jv
            JTv = torch.zeros_like(pos) if JTv is None else JTv
            num += _per_structure_sq(0.5 * (Jv - JTv), batch, n)
            den += _per_structure_sq(Jv, batch, n)
    rel = lambda a, b: torch.where(b > 0, a / b, torch.zeros_like(a)).cpu().numpy()  # noqa: E731
    return {"force_gap_rel": rel(gap, fnorm), "jacobian_asym_rel": rel(num.sqrt(), den.sqrt())}


def stress_gap(fn: Callable, inputs, *, cell_index: int = 2, energy: str = "energy", stress: str = "stress"):
    r"""How far a model's own stress head is from the strain derivative of its energy, for one periodic structure.

    ``fn(*inputs)`` returns a dict with an energy and a stress ``[3, 3]``; ``inputs[0]`` are the positions (rows) and
    ``inputs[cell_index]`` the cell (rows are lattice vectors). The strain derivative is
    ``σ_E = (1/V) ∂E/∂ε`` at ``ε = 0`` for ``x → x (I + ε)ᵀ``, ``C → C (I + ε)ᵀ`` with a symmetric ``ε`` (ASE's sign
    convention, as :func:`geolie.conservative`): one reverse pass. Returns ``‖σ − σ_E‖_F / ‖σ‖_F`` (0 for a stress
    that is the energy's strain derivative; the stress analogue of the force gap).
    """
    pos, cell = inputs[0].detach(), inputs[cell_index].detach()
    with torch.enable_grad():
        eps = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
        strain = torch.eye(3, dtype=pos.dtype, device=pos.device) + 0.5 * (eps + eps.T)
        args = list(inputs)
        args[0], args[cell_index] = pos @ strain.T, cell @ strain.T
        out = fn(*args)
        if energy not in out or stress not in out:
            raise ValueError(f"stress_gap: the function returned {sorted(out)}; it needs {energy!r} and {stress!r}")
        g = torch.autograd.grad(out[energy].sum(), eps, allow_unused=True)[0]
    g = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device) if g is None else g
    s_e = g / torch.linalg.det(cell).abs()
    with torch.enable_grad():
        s = fn(*inputs)[stress].detach().reshape(3, 3)
    n = float(s.double().norm())
    return float((s - s_e).double().norm()) / n if n > 0 else 0.0
