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

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ._groups import SO3, as_group, hat
from ._lie import lie_derivative
from ._reps import PointRep, ScalarRep, VectorRep, as_rep

__all__ = ["layerwise_attribution"]


def _leaves(module: torch.nn.Module, units: Optional[Sequence[str]] = None) -> List[Tuple[str, torch.nn.Module]]:
    """The modules attributed: the leaf modules, or the named ``units`` (each one unit, its submodules with it)."""
    if units is None:
        return [(n, m) for n, m in module.named_modules() if n and len(list(m.children())) == 0]
    named = dict(module.named_modules())
    missing = [u for u in units if u not in named or not u]
    if missing:
        raise ValueError(f"layerwise_attribution: units {missing} are not submodules of {type(module).__name__}")
    nested = [(a, b) for a in units for b in units if a != b and b.startswith(a + ".")]
    if nested:
        raise ValueError(f"layerwise_attribution: unit {nested[0][1]!r} is inside unit {nested[0][0]!r}; "
                         "a module is attributed once")
    return [(u, named[u]) for u in units]


def layerwise_attribution(module: torch.nn.Module, energy: Callable[[torch.Tensor], torch.Tensor],
                          pos: torch.Tensor, *, group=SO3, reps: Optional[Dict] = None, tol: float = 1e-6,
                          out_rep="scalar", n_probes: int = 100, seed: int = 0,
                          units: Optional[Sequence[str]] = None) -> Dict[str, Dict]:
    """Per leaf module of ``module``: its contribution to ``L_X y`` per generator, and how its reps were set.

    ``units`` (module names) attributes those modules instead of the leaves, each as one unit with its submodules
    (a block whose inside has no representation geolie reads, such as a grid nonlinearity): what happens outside
    them is in ``"__unattributed__"``. Each unit's first floating input must be the only one that moves with the
    positions (its local Lie derivative moves that input alone).

    ``energy(pos)`` runs ``module`` and returns the output ``y``. A scalar ``y`` (an energy) gets exact signed
    contributions ``⟨∂y/∂y_i, L_X f_i⟩`` (one backward pass) that sum to ``L_X y``. Any other output (declared by
    ``out_rep``, e.g. per-point vectors of a point-cloud model) gets Hutchinson estimates of the norms
    ``‖J_{>i} L_X f_i‖`` from ``n_probes`` Rademacher probes ``z`` (``E[(zᵀ J_{>i} L_X f_i)²] = ‖J_{>i} L_X f_i‖²``);
    norms do not add up (cross terms). Returns ``{name: {"contribution": [...], "in_rep", "out_rep", "status"}}``
    (``"kind"``: ``"signed"`` or ``"norm (Hutchinson, n probes)"``) plus ``"__total__"``, computed directly.
    """
    group = as_group(group)
    reps = reps or {}
    leaves = _leaves(module, units)
    pos = pos.detach()
    K = group.dim
    basis = group.algebra_basis(dtype=pos.dtype, device=pos.device)
    calls, Y = _record_calls(leaves, energy, pos)  # 1) every leaf call's inputs and output
    scalar = Y.numel() == 1
    cot = _cotangents(Y, calls, n_probes, seed)  # the output's sensitivity to each module's output
    kind = "signed" if scalar else f"norm (Hutchinson, {n_probes} probes)"
    tangents = _input_tangents(leaves, calls, energy, pos, basis)  # 2) how each module's input moves
    result: Dict[str, Dict] = {}
    for name, m in leaves:  # 3) local Lie derivatives, contracted with the cotangents
        c = calls.get(name)
        fl = [i for i in c["inputs"] if isinstance(i, torch.Tensor) and i.is_floating_point()] if c else []
        if name not in cot or not fl:
            continue
        u = fl[0]
        m_in, m_out, status = _module_reps(name, m, u, reps, tangents[name], basis, tol)
        if m_in is None:
            result[name] = {"contribution": [0.0] * K, "in_rep": "?", "out_rep": m_out.name,
                            "status": status, "kind": kind}
            continue
        L = _local_lie(m, c, u, m_in, m_out, group, basis)
        per_probe = torch.stack([(g[None] * L).reshape(K, -1).sum(-1) for g in cot[name]])  # [P, K]
        contrib = per_probe[0] if scalar else per_probe.pow(2).mean(0).sqrt()
        result[name] = {"contribution": contrib.tolist(), "in_rep": m_in.name, "out_rep": m_out.name,
                        "status": status, "kind": kind}
    total = lie_derivative(energy, pos, group=group, out_rep="scalar" if scalar else out_rep, method="jvp")
    tot = total.reshape(K) if scalar else total.reshape(K, -1).norm(dim=-1)
    result["__total__"] = {"contribution": tot.tolist(), "status": "direct L_X y", "kind": kind}
    if scalar:
        result["__unattributed__"] = _unattributed(result, tot, kind)
    return result


def _record_calls(leaves, energy, pos) -> Tuple[Dict[str, Dict], torch.Tensor]:
    """One forward pass with hooks: each leaf's first call's inputs (detached) and output (in the graph), and ``y``."""
    calls: Dict[str, Dict] = {}

    def make_hook(name):
        def hook(mod, inp, out):
            if name in calls or not isinstance(out, torch.Tensor):
                return
            calls[name] = {"inputs": tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inp),
                           "output": out}
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in leaves]
    try:
        p = pos.clone().requires_grad_(True)
        with torch.enable_grad():
            Y = energy(p)
    finally:
        for h in handles:
            h.remove()
    return calls, Y


def _cotangents(Y: torch.Tensor, calls: Dict[str, Dict], n_probes: int, seed: int) -> Dict[str, List[torch.Tensor]]:
    """Per module output in the graph: ``∂y/∂y_i`` for a scalar ``y``, else ``∂(zᵀy)/∂y_i`` per Rademacher probe."""
    names = [n for n in calls if calls[n]["output"].requires_grad]
    outs = [calls[n]["output"] for n in names]
    gen = torch.Generator().manual_seed(seed)
    probes = [None] if Y.numel() == 1 else [
        (torch.randint(0, 2, Y.shape, generator=gen) * 2 - 1).to(Y) for _ in range(n_probes)]
    cot: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    for z in probes:
        s = Y.sum() if z is None else (z * Y).sum()
        gs = torch.autograd.grad(s, outs, retain_graph=True, allow_unused=True) if outs else []
        for n, g in zip(names, gs):
            cot[n].append(torch.zeros_like(calls[n]["output"]) if g is None else g.detach())
    return cot


def _input_tangents(leaves, calls, energy, pos, basis) -> Dict[str, List[Optional[torch.Tensor]]]:
    """Per module and generator, the forward-mode tangent of its first floating input as the positions move."""
    omega, trans = basis
    tangents: Dict[str, List[Optional[torch.Tensor]]] = {n: [] for n in calls}
    for k in range(len(omega)):
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
    return tangents


def _module_reps(name, m, u, reps, moved_all, basis, tol):
    """``(in_rep, out_rep, status)`` of a module: declared, from e3nn irreps, or inferred from how its input ``u``
    moves (``in_rep`` ``None`` when no representation explains it: "receives broken input")."""
    if name in reps:
        m_in, m_out = (as_rep(r) for r in reps[name])
        return m_in, m_out, "declared"
    if hasattr(m, "irreps_in") and hasattr(m, "irreps_out"):
        return as_rep(m.irreps_in), as_rep(m.irreps_out), "e3nn irreps"
    omega, trans = basis
    K = len(omega)
    scale = float(u.norm()) + 1e-300
    moved = [t for t in moved_all if t is not None]

    def explained(rep, ts, offset=0):
        return all(float((t - rep.infinitesimal(u, omega[k:k + 1], trans[k:k + 1])[0]).norm()) <= tol * scale
                   for k, t in enumerate(ts, start=offset))

    if all(float(t.norm()) <= tol * scale for t in moved):
        return ScalarRep(), ScalarRep(), "invariant"
    if u.shape[-1] == 3 and explained(VectorRep(), moved[:3]) and all(float(t.norm()) <= tol * scale
                                                                    for t in moved[3:]):
        return VectorRep(), ScalarRep(), "vector input"
    if u.shape[-1] == 3 and len(moved) == K and explained(PointRep(), moved):
        return PointRep(), ScalarRep(), "point input (absolute coordinates)"
    return None, ScalarRep(), "receives broken input"


def _local_lie(m, c, u, m_in, m_out, group, basis) -> torch.Tensor:
    """``L_X f_i`` of one module at its recorded call, ``[K, *out.shape]`` (a scalar input: ``−dρ_out(X) f_i``)."""
    out = c["output"]
    omega, trans = basis
    if isinstance(m_in, ScalarRep):
        return torch.zeros((len(omega),) + tuple(out.shape), dtype=out.dtype, device=out.device) - \
            m_out.infinitesimal(out.detach(), omega.to(out), trans.to(out))
    args = c["inputs"]
    idx = args.index(u) if any(a is u for a in args) else 0
    rest = [a for j, a in enumerate(args) if j != idx]

    def f_local(v):
        a = list(rest)
        a.insert(idx, v)
        return m(*a)

    return lie_derivative(f_local, u, group=group, in_rep=m_in, out_rep=m_out, method="jvp")


def _unattributed(result: Dict[str, Dict], tot: torch.Tensor, kind: str) -> Dict[str, Any]:
    """``L_X y`` minus the modules' contributions: what no module explains, and where the break entered."""
    K = len(tot)
    parts = sum((torch.tensor(v["contribution"], dtype=torch.float64) for k, v in result.items()
                 if k != "__total__"), torch.zeros(K, dtype=torch.float64))
    broken = [k for k, v in result.items() if v.get("status") == "receives broken input"]
    return {"contribution": (tot.detach().double().cpu() - parts).tolist(), "kind": kind,
            "status": "outside the attributed modules" + (
                f", upstream of {broken[0]} (receives broken input: declare its input representation with reps=)"
                if broken else "")}
