r"""Training losses: a differentiable Lie-derivative penalty.

For generators ``X_k`` of the group (``k = 1..d``, :meth:`LieGroup.algebra_basis`) and the outputs ``y_j`` of ``f``
with their representations,

.. math::

    P_{all} = \frac{1}{d} \sum_k \sum_j w_j \, \frac{\| L_{X_k} y_j \|^2}{s_j}, \qquad
    P_{random} = \frac{1}{|G|} \sum_{X \in G} \sum_j w_j \, \frac{\| L_X y_j \|^2}{s_j},

with ``s_j = 1`` (absolute) or ``s_j = ‖y_j‖²`` (``relative=True``, detached: the penalty does not shrink outputs),
and for ``"random"`` ``G = {n·X_rot}`` (one rotation axis ``n`` uniform on the sphere), plus ``{m·X_trans}`` (one
translation direction) for SE(3). Since ``L`` is linear in the generator and ``E[n nᵀ] = I/3``,
``E[‖L_{n·X} y‖²] = (1/3) Σ_k ‖L_{X_k} y‖²``: ``P_random`` is an unbiased estimate of ``P_all`` at the cost of one or
two directional derivatives instead of ``d``. With ``batch`` the same draw serves the whole batch (still unbiased).

Gradient path: ``L_X y = J_f(x) dρ_in(X) x − dρ_out(X) y`` is computed by double backward with ``create_graph``
(``J v = ∂/∂u ⟨Jᵀu, v⟩``), so the penalty is differentiable with respect to the model's parameters. On forces of a
conservative model (``F = −∇E``) that is a third derivative of the energy: two extra backward passes per direction,
and one more for the parameter gradient.

Orb's *equigrad* (``‖∂E/∂G‖_F`` for ``x → exp(G − Gᵀ) x`` at ``G = 0``) is the special case
``equigrad² = 2 Σ_k (L_{r_k} E)² = 6 · lie_penalty(energy only, SO3, generators="all")`` (tested).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ._groups import SE3, as_group
from ._io import Centers, flatten_outputs, leaf_name, pair_outputs, prepare_inputs

__all__ = ["lie_penalty"]


def _directions(group, generators: str, gen: Optional[torch.Generator]):
    """Coefficient rows ``C [m, d]`` over the group's generators, and each row's weight."""
    d = group.dim
    if generators == "all":
        return torch.eye(d, dtype=torch.float64), torch.full((d,), 1.0 / d, dtype=torch.float64)
    if generators != "random":
        raise ValueError(f"lie_penalty: generators must be 'all' or 'random', got {generators!r}")
    rows = []
    n = torch.randn(3, generator=gen, dtype=torch.float64)
    rows.append(torch.cat([n / n.norm(), torch.zeros(d - 3, dtype=torch.float64)]))
    if group.has_translations:
        m = torch.randn(3, generator=gen, dtype=torch.float64)
        rows.append(torch.cat([torch.zeros(3, dtype=torch.float64), m / m.norm()]))
    C = torch.stack(rows)
    # E[‖L_{n·X}‖²] = (1/3) Σ_k ‖L_k‖²: each sampled kind stands for its 3 generators, out of d
    w = torch.full((len(rows),), 3.0 / d, dtype=torch.float64)
    return C, w


def lie_penalty(f: Callable, x: Any, *, group=SE3, in_rep: Any = "point", out_rep: Any = "scalar",
                generators: str = "random", relative: bool = False, weights: Optional[Dict[str, float]] = None,
                generator: Optional[torch.Generator] = None, about: str = "origin",
                batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Lie-derivative penalty of ``f`` at ``x`` (see the module docstring): a scalar tensor differentiable with
    respect to ``f``'s parameters.

    Arguments as in :func:`geolie.lie_derivative`; ``generators``: ``"random"`` (default: one random rotation axis,
    and one translation direction for SE(3); unbiased for ``"all"``) or ``"all"``; ``relative``: divide each output's
    squared norm by its own (detached) squared norm; ``weights``: per-output weights by name (``"energy"``,
    ``"forces"``, ...; default 1); ``generator``: the random draw's ``torch.Generator``.
    """
    group = as_group(group)
    inputs = prepare_inputs(x, in_rep)
    if not inputs.moving:
        raise ValueError("lie_penalty: in_rep declares every input invariant: there is nothing for the group to act on")
    centers = Centers(inputs, about, batch)
    C, w = _directions(group, generators, generator)
    xs = [inputs.values[i].clone().requires_grad_(True) for i in inputs.moving]
    vals = list(inputs.values)
    for i, v in zip(inputs.moving, xs):
        vals[i] = v
    with torch.enable_grad():
        out = f(*inputs.call_args(vals))
        leaves, _ = pair_outputs(out, out_rep)
        ys = flatten_outputs(out)
        names = [leaf_name(lf.path) for lf in leaves]
        unknown = set(weights or {}) - set(names)
        if unknown:
            raise ValueError(f"lie_penalty: weights name outputs {sorted(unknown)} that f does not return ({names})")
        us = [torch.zeros_like(y, requires_grad=True) for y in ys]
        pull = torch.autograd.grad(sum((y * u).sum() for y, u in zip(ys, us)), xs, create_graph=True,
                                   allow_unused=True)
        total = torch.zeros((), dtype=torch.float64, device=xs[0].device)
        for r in range(C.shape[0]):
            # the direction's tangent on every moving input and its action on every output (linear in the generator)
            omega_b, trans_b = group.algebra_basis(dtype=torch.float64)
            omega, trans = (C[r] @ omega_b)[None], (C[r] @ trans_b)[None]
            dot = 0
            for i, x_i, g_i in zip(inputs.moving, xs, pull):
                if g_i is None:
                    continue
                rep = inputs.reps[i]
                c = centers.for_tensor(x_i, rep, f"input x[{i}]")
                t = rep.infinitesimal(x_i.detach(), omega.to(x_i), trans.to(x_i), c)[0]
                dot = dot + (g_i * t).sum()
            if isinstance(dot, torch.Tensor) and dot.requires_grad:
                jv = torch.autograd.grad(dot, us, create_graph=True, allow_unused=True)
            else:
                jv = [None] * len(us)
            for y, j, lf, name in zip(ys, jv, leaves, names):
                c = centers.for_tensor(y, lf.rep, lf.path)
                corr = lf.rep.infinitesimal(y, omega.to(y), trans.to(y), c)[0]
                L = (torch.zeros_like(y) if j is None else j) - corr
                sq = L.double().pow(2).sum()
                if relative:
                    sq = sq / y.detach().double().pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
                total = total + w[r] * (1.0 if weights is None else float(weights.get(name, 1.0))) * sq
    return total
