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

For a scalar output the part of ``L_X E`` that no module explains is reported as ``"__unattributed__"``
(``L_X E − Σ_i`` contributions): breaks in operations outside leaf modules (a raw edge vector concatenated into an
MLP's input, indexing with absolute coordinates) and everything upstream of a module that receives broken input.
It is never dropped: a break that no module explains must not read as "every layer at zero". Declaring the
receiving module's input representation (for example ``"40x0e + 1x1o"`` for invariant features followed by a raw
vector) moves it into that module's local term.
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
                          pos: torch.Tensor, *, group=SO3, reps: Optional[Dict] = None, tol: float = 1e-6,
                          out_rep="scalar", n_probes: int = 100, seed: int = 0) -> Dict[str, Dict]:
    """Per leaf module of ``module``: its contribution to ``L_X y`` per generator, and how its reps were set.

    ``energy(pos)`` runs ``module`` and returns the output ``y``. A scalar ``y`` (an energy) gets exact signed
    contributions ``⟨∂y/∂y_i, L_X f_i⟩`` (one backward pass) that sum to ``L_X y``. Any other output (declared by
    ``out_rep``, e.g. per-point vectors of a point-cloud model) gets Hutchinson estimates of the norms
    ``‖J_{>i} L_X f_i‖`` from ``n_probes`` Rademacher probes ``z`` (``E[(zᵀ J_{>i} L_X f_i)²] = ‖J_{>i} L_X f_i‖²``);
    norms do not add up (cross terms). Returns ``{name: {"contribution": [...], "in_rep", "out_rep", "status"}}``
    (``"kind"``: ``"signed"`` or ``"norm (Hutchinson, n probes)"``) plus ``"__total__"``, computed directly.
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
            calls[name] = {"inputs": tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inp),
                           "output": out}
        return hook

    for name, m in leaves:
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        p = pos.clone().requires_grad_(True)
        with torch.enable_grad():
            Y = energy(p)
    finally:
        for h in handles:
            h.remove()
    scalar = Y.numel() == 1
    names = [n for n in calls if calls[n]["output"].requires_grad]
    outs = [calls[n]["output"] for n in names]
    # cotangents at every module output: the exact gradient for a scalar, one per Rademacher probe otherwise
    gen = torch.Generator().manual_seed(seed)
    probes = [None] if scalar else [
        (torch.randint(0, 2, Y.shape, generator=gen) * 2 - 1).to(Y) for _ in range(n_probes)]
    cot: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    for z in probes:
        s = Y.sum() if z is None else (z * Y).sum()
        gs = torch.autograd.grad(s, outs, retain_graph=True, allow_unused=True) if outs else []
        for n, g in zip(names, gs):
            cot[n].append(torch.zeros_like(calls[n]["output"]) if g is None else g.detach())
    kind = "signed" if scalar else f"norm (Hutchinson, {n_probes} probes)"
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
    # 3) local Lie derivatives, contracted with the cotangents
    result: Dict[str, Dict] = {}
    for name, m in leaves:
        if name not in calls:
            continue
        c = calls[name]
        out = c["output"]
        fl = [i for i in c["inputs"] if isinstance(i, torch.Tensor) and i.is_floating_point()]
        if name not in cot or not fl:
            continue
        u = fl[0]
        if name in reps:
            m_in, m_out = (as_rep(r) for r in reps[name])
            status = "declared"
        elif hasattr(m, "irreps_in") and hasattr(m, "irreps_out"):
            m_in, m_out = as_rep(m.irreps_in), as_rep(m.irreps_out)
            status = "e3nn irreps"
        else:
            m_out = ScalarRep()
            scale = float(u.norm()) + 1e-300
            moved = [t for t in tangents[name] if t is not None]
            rot = moved[:3]
            if all(float(t.norm()) <= tol * scale for t in moved):
                m_in, status = ScalarRep(), "invariant"
            elif u.shape[-1] == 3 and all(
                    float((t - VectorRep().infinitesimal(u, omega[k:k + 1], trans[k:k + 1])[0]).norm()) <= tol * scale
                    for k, t in enumerate(rot)) and all(float(t.norm()) <= tol * scale for t in moved[3:]):
                m_in, status = VectorRep(), "vector input"
            elif u.shape[-1] == 3 and len(moved) == K and all(
                    float((t - PointRep().infinitesimal(u, omega[k:k + 1], trans[k:k + 1])[0]).norm()) <= tol * scale
                    for k, t in enumerate(moved)):
                m_in, status = PointRep(), "point input (absolute coordinates)"
            else:
                result[name] = {"contribution": [0.0] * K, "in_rep": "?", "out_rep": m_out.name,
                                "status": "receives broken input", "kind": kind}
                continue
        if isinstance(m_in, ScalarRep):
            L = torch.zeros((K,) + tuple(out.shape), dtype=out.dtype, device=out.device) - m_out.infinitesimal(
                out.detach(), omega.to(out), trans.to(out))
        else:
            args = c["inputs"]
            idx = args.index(u) if any(a is u for a in args) else 0
            rest = [a for j, a in enumerate(args) if j != idx]

            def f_local(v, m=m, idx=idx, rest=rest):
                a = list(rest)
                a.insert(idx, v)
                return m(*a)

            L = lie_derivative(f_local, u, group=group, in_rep=m_in, out_rep=m_out, method="jvp")
        per_probe = torch.stack([(g[None] * L).reshape(K, -1).sum(-1) for g in cot[name]])  # [P, K]
        contrib = per_probe[0] if scalar else per_probe.pow(2).mean(0).sqrt()
        result[name] = {"contribution": contrib.tolist(), "in_rep": m_in.name, "out_rep": m_out.name,
                        "status": status, "kind": kind}
    total = lie_derivative(energy, pos, group=group, out_rep="scalar" if scalar else out_rep, method="jvp")
    tot = total.reshape(K) if scalar else total.reshape(K, -1).norm(dim=-1)
    result["__total__"] = {"contribution": tot.tolist(), "status": "direct L_X y", "kind": kind}
    if scalar:
        parts = sum((torch.tensor(v["contribution"], dtype=torch.float64) for k, v in result.items()
                     if k != "__total__"), torch.zeros(K, dtype=torch.float64))
        broken = [k for k, v in result.items() if v.get("status") == "receives broken input"]
        result["__unattributed__"] = {
            "contribution": (tot.detach().double().cpu() - parts).tolist(), "kind": kind,
            "status": "outside leaf modules" + (f", upstream of {broken[0]} (receives broken input: declare its input "
                                                "representation with reps=)" if broken else "")}
    return result
