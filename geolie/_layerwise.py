r"""Layer-wise attribution of equivariance breaking (Gruver et al., generalized to 3D), for a scalar output.

For an energy ``E = F(x)`` computed through leaf modules ``f_i``, the chain rule splits its Lie derivative into
per-module terms

.. math::

    L_X E = \sum_i \Big\langle \frac{\partial E}{\partial y_i},\; L_X f_i(u_i) \Big\rangle,
    \qquad L_X f_i(u) = J_{f_i}(u)\, d\rho_{in}(X) u - d\rho_{out}(X) f_i(u),

where ``u_i, y_i`` are the module's input and output and ``L_X f_i`` its *local* Lie derivative from the
representations of its input and output; operations outside leaf modules (indexing, differences) are assumed
equivariant. One backward pass gives every ``∂E/∂y_i``; the signed contributions then sum to the total (tested).

Representations: declared per module name (``reps={"name": (in_rep, out_rep)}``), else e3nn's ``irreps_in`` /
``irreps_out`` attributes, else *inferred* for the input from how it actually moves (one forward-mode pass per
generator from the positions: no motion → scalar; ``v -> X v`` on a trailing 3 → vector; ``x -> X x + t`` →
point, i.e. absolute coordinates) with an invariant output
(hidden features of invariant models are scalars). A module whose input moves in a way no representation explains
is reported as ``"receives broken input"``: the break happened upstream.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ._groups import SO3, as_group, hat
from ._lie import lie_derivative
from ._reps import PointRep, ScalarRep, VectorRep, as_rep

__all__ = ["layerwise_attribution"]


def _leaves(module: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n and len(list(m.children())) == 0]


def layerwise_attribution(module: torch.nn.Module, energy: Callable[[torch.Tensor], torch.Tensor],
                          pos: torch.Tensor, *, group=SO3, reps: Optional[Dict] = None, tol: float = 1e-6
                          ) -> Dict[str, Dict]:
    """Per leaf module of ``module``: signed contribution ``[group.dim]`` to ``L_X E``, and how its reps were set.

    ``energy(pos)`` must run ``module`` and return a scalar. Returns ``{name: {"contribution": [...],
    "in_rep": str, "out_rep": str, "status": "ok" | "receives broken input" | "invariant"}}`` plus the key
    ``"__total__"`` with the directly computed ``L_X E`` for comparison.
    """
    group = as_group(group)
    reps = reps or {}
    leaves = _leaves(module)
    pos = pos.detach()
    K = group.dim
    omega, trans = group.algebra_basis(dtype=pos.dtype, device=pos.device)

    # 1) forward with hooks: inputs and outputs of every leaf call; gradients of E w.r.t. each output
    calls: Dict[str, Dict] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inp, out):
            if name in calls or not isinstance(out, torch.Tensor):
                return
            if out.requires_grad:
                out.retain_grad()
            calls[name] = {"inputs": tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inp),
                           "output": out}
        return hook

    for name, m in leaves:
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        p = pos.clone().requires_grad_(True)
        with torch.enable_grad():
            E = energy(p)
            E.backward()
    finally:
        for h in handles:
            h.remove()
    # 2) how each module's (first floating) input actually moves under each generator (forward mode)
    tangents: Dict[str, List[Optional[torch.Tensor]]] = {n: [] for n in calls}
    for k in range(K):
        tcalls: Dict[str, Optional[torch.Tensor]] = {}

        def thook(name):
            def hook(mod, inp, out):
                if name in tcalls:
                    return
                t = None
                for i in inp:
                    if isinstance(i, torch.Tensor) and i.is_floating_point():
                        t = fwAD.unpack_dual(i).tangent
                        t = torch.zeros_like(i) if t is None else t.detach()
                        break
                tcalls[name] = t
            return hook

        hs = [m.register_forward_hook(thook(n)) for n, m in leaves]
        try:
            tangent = pos @ hat(omega[k]).T + trans[k]
            with fwAD.dual_level(), torch.enable_grad():
                energy(fwAD.make_dual(pos.clone(), tangent))
        finally:
            for h in hs:
                h.remove()
        for n in calls:
            tangents[n].append(tcalls.get(n))
    # 3) local Lie derivatives, contracted with dE/dy
    result: Dict[str, Dict] = {}
    for name, m in leaves:
        if name not in calls:
            continue
        c = calls[name]
        out, grad = c["output"], c["output"].grad
        fl = [i for i in c["inputs"] if isinstance(i, torch.Tensor) and i.is_floating_point()]
        if grad is None or not fl:
            continue
        u = fl[0]
        if name in reps:
            in_rep, out_rep = (as_rep(r) for r in reps[name])
            status = "declared"
        elif hasattr(m, "irreps_in") and hasattr(m, "irreps_out"):
            in_rep, out_rep = as_rep(m.irreps_in), as_rep(m.irreps_out)
            status = "e3nn irreps"
        else:
            out_rep = ScalarRep()
            scale = float(u.norm()) + 1e-300
            moved = [t for t in tangents[name] if t is not None]
            rot = moved[:3]
            if all(float(t.norm()) <= tol * scale for t in moved):
                in_rep, status = ScalarRep(), "invariant"
            elif u.shape[-1] == 3 and all(
                    float((t - VectorRep().infinitesimal(u, omega[k:k + 1], trans[k:k + 1])[0]).norm()) <= tol * scale
                    for k, t in enumerate(rot)) and all(float(t.norm()) <= tol * scale for t in moved[3:]):
                in_rep, status = VectorRep(), "vector input"
            elif u.shape[-1] == 3 and len(moved) == K and all(
                    float((t - PointRep().infinitesimal(u, omega[k:k + 1], trans[k:k + 1])[0]).norm()) <= tol * scale
                    for k, t in enumerate(moved)):
                in_rep, status = PointRep(), "point input (absolute coordinates)"
            else:
                result[name] = {"contribution": [0.0] * K, "in_rep": "?", "out_rep": out_rep.name,
                                "status": "receives broken input"}
                continue
        if isinstance(in_rep, ScalarRep):
            L = torch.zeros((K,) + tuple(out.shape), dtype=out.dtype) - out_rep.infinitesimal(
                out.detach(), omega.to(out.dtype), trans.to(out.dtype))
        else:
            args = c["inputs"]
            idx = args.index(u) if any(a is u for a in args) else 0
            rest = [a for j, a in enumerate(args) if j != idx]

            def f_local(v, m=m, idx=idx, rest=rest):
                a = list(rest)
                a.insert(idx, v)
                return m(*a)

            L = lie_derivative(f_local, u, group=group, in_rep=in_rep, out_rep=out_rep, method="jvp")
        contrib = (grad.detach()[None] * L).reshape(K, -1).sum(-1)
        result[name] = {"contribution": contrib.tolist(), "in_rep": in_rep.name, "out_rep": out_rep.name,
                        "status": status}
    total = lie_derivative(energy, pos, group=group, method="jvp")
    result["__total__"] = {"contribution": total.reshape(K).tolist(), "status": "direct L_X E"}
    return result
