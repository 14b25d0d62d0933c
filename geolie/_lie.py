r"""The Lie derivative of a function of point clouds under SO(3) or SE(3).

Definition
----------
For a group element ``g = exp(tX)``, an input representation :math:`\rho_{in}` and an output representation
:math:`\rho_{out}`,

.. math::

    L_X f(x) = \frac{d}{dt}\Big|_{t=0} \rho_{out}(e^{tX})^{-1} f(\rho_{in}(e^{tX})\,x)
             = J_f(x)\, d\rho_{in}(X)\, x \;-\; d\rho_{out}(X)\, f(x),

which is zero for every ``X`` when ``f`` is equivariant. Generators are the rows of :meth:`LieGroup.algebra_basis`
(``rx ry rz`` in radians, then ``tx ty tz`` in input length units), so the result has units of output per radian
or per length unit. Rotations act about the origin, or about each structure's centroid (``about="centroid"``).

Methods
-------
* ``"hvp"``: for ``f = geolie.conservative(energy_fn)`` of positions: energy and forces are computed once with
  their graph kept, and since the Jacobian of the forces is the (symmetric) Hessian,
  ``J_F v = -∇(∇E·v)`` costs one backward pass per generator (``"hvp-loop"``); ``J_E v = ∇E·v`` is free. Or all
  generators in one batched backward pass (``"hvp-batched"``: ``torch.autograd.grad(..., is_grads_batched=True)``,
  a vmap over the backward graph: fewer, larger kernels). Which of the two ``"hvp"`` runs is chosen by measurement
  per device and call size: :data:`HVP_BATCHED_UP_TO` holds, per device type, the largest call (atoms) for which
  ``benchmarks/lie_derivative.py`` and the audit measured the batched pass faster (CPU: 48 atoms; molecules one
  per call gain 1.25-1.5x, batches of hundreds of atoms lose as much); on a device type it does not name, the first
  problem per device, dtype and size class (atoms rounded up to a power of two) runs both, timed, and the faster is
  kept for the process (both pass the adjoint test; their values agree to the floor). A batched pass that fails
  (an op without a batching rule, out of memory) leaves the loop.
* ``"hvp-forces"``: for models whose forces are the autograd gradient of their energy, computed with its graph
  kept, as MACE computes them (the function declares it: ``fn._geolie_autograd_forces = ("energy", "forces")``, the
  package adapters set it; other outputs of the energy pass, such as MACE's per-atom energies, by forward mode
  through ``fn._geolie_energy_outputs``, the model without its forces, when the adapter provides it). Their Jacobian ``J_F = −H`` is symmetric, so ``J_F v = J_Fᵀ v``: one reverse pass through
  the forces' graph per tangent (3-5x faster than forward mode through the model's own ``autograd.grad``:
  ``benchmarks/potential_packages.py``), and ``J_E v = ∇E·v`` from one reverse pass. It holds only for a symmetric
  Jacobian: its adjoint test compares ``⟨u, Jᵀv⟩`` with ``⟨Jᵀu, v⟩``, a test of that symmetry, and the strategy is
  accepted only when they agree to :data:`SYMMETRY_TOLERANCE` (rounding); else forward mode runs.
* ``"jvp"``: forward-mode AD. One ``torch.autograd.forward_ad`` pass per generator (``"jvp-loop"``), which also
  runs through ``torch.autograd.grad(..., create_graph=True)`` inside the model (forces): forward-over-reverse;
  or all generators in one ``torch.func.vmap(torch.func.jvp)`` call (``"jvp-vmap"``), which cannot run models that
  call ``torch.autograd.grad`` or ``requires_grad_`` themselves (how MACE, NequIP and most potentials compute
  forces) and was 1.7-4x faster than the loop where both run (CPU, ``benchmarks/lie_derivative.py`` models through
  ``geolie.conservative``). ``"jvp"`` runs the faster of the two, measured on the first problem per device, dtype,
  size class and function (a variant that raises is out), with the other as its fallback.
* ``"double-backward"``: the trick of Gruver et al.'s lie-deriv (``grad`` of ``grad`` with a dummy cotangent),
  one generator at a time; kept as a fallback for ops without forward-mode formulas and for benchmarks.
* ``"fd"``: central differences of the *finite* group action with two Richardson extrapolations (steps
  ``h, h/2, h/4``), in float64 when the function accepts float64 inputs. Its error estimate is the extrapolation
  difference ``|R2 - R1|`` plus the function's own noise (estimated from the unit-norm combination of
  ``φ(s) = ρ_out(e^{sX})⁻¹ f(e^{sX} x)`` at the seven steps used that annihilates polynomials of degree 5,
  propagated to ``R2``, times 3) plus
  ``10 u max|φ| / (h/4)``. Works for functions that return numpy arrays or are not differentiable.
* ``"auto"``: ``hvp`` where it applies, then ``jvp`` (the measured variant, then the other), then double-backward,
  then ``fd`` with a warning saying why.

Self-check (dot-product or adjoint test)
---------------------------------------
Every AD result is verified before it is returned. For each output leaf ``y_j`` a random cotangent ``u_j`` is pulled
back by one reverse pass through the base evaluation, ``g_j = J_jᵀ u_j``; then for every tangent ``v`` pushed forward
(the generators' ``dρ_in(X_k) x`` and one extra probe ``w``) the two sides of

.. math::   \langle u_j, J_j v\rangle = \langle J_j^T u_j, v\rangle

must agree: ``|a − b| / (‖u_j‖‖J_j v‖ + ‖g_j‖‖v‖) <= tol`` (``tol`` = 1e-3 in float32 and float64, 3e-2 in
lower precisions; a wrong forward-mode formula or a lost tangent gives O(0.1..1)). In float64 a disagreement above
1e-9 that passes ``tol`` says that the model computes below float64 precision somewhere (float32 arithmetic inside
a model that returns float64): the result is used and a note says so. The probe ``w`` is a random
direction plus the normalised pull-backs ``g_j``: for an equivariant model the generators' sides are both ~0 and
could not reveal a tangent that was dropped, ``⟨g_j, w⟩`` is not. A method that fails the check is not used: geolie
warns (:class:`GeolieADCheckWarning`, naming the output and the disagreement), tries double backward, then finite
differences, and records the failure (:attr:`LieResult.notes`); the check's value for each output of the accepted
method is :attr:`LieResult.ad_check`. The check costs one reverse pass per output leaf and one tangent more. In
the ``hvp`` path the energy's pull-back is ``u ∇E`` from the gradient the base evaluation holds (no pass), so its
test compares a computation with itself and only the forces' is a test; the probe then runs only where the
generators' own sides of the forces' test are ~0 (:func:`_probe_needed`: an equilibrium structure), one
Hessian-vector product fewer elsewhere.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ._cost import part
from ._groups import LieGroup, SE3, as_group
from ._reps import PointRep
from ._torch_utils import segment_sum
from ._io import (
    Centers, Inputs, Leaf, _to_tensor, check_outputs, flatten_outputs, leaf_name, pair_outputs, prepare_inputs,
)

__all__ = ["lie_derivative", "lie_result", "LieResult", "HVP_BATCHED_UP_TO", "hvp_choice"]

METHODS = ("auto", "hvp", "hvp-loop", "hvp-batched", "hvp-forces", "jvp", "jvp-vmap", "jvp-loop", "double-backward",
           "fd")

#: per device type, the largest call (in atoms) for which ``"hvp"`` takes the batched pass, as measured
#: (``benchmarks/lie_derivative.py``, 2-core CPU, float32: batched 0.5-0.7x the loop's time at 10 atoms, 0.8-1.0x at
#: 30, 1.05-1.4x at 100; audit of 21-atom aspirin one per call 1.25x faster, of 500-atom batches 1.1-1.3x slower);
#: device types not named here are measured at run time (:func:`hvp_choice`)
HVP_BATCHED_UP_TO: Dict[str, int] = {"cpu": 48}
_HVP_MEASURED: Dict[Tuple[str, str, int], str] = {}


class GeolieFallbackWarning(UserWarning):
    """Emitted when ``method="auto"`` cannot use automatic differentiation and falls back to finite differences."""


class GeolieADCheckWarning(UserWarning):
    """Emitted when an AD method fails its dot-product (adjoint) test and geolie switches to another method."""


def ad_check_tolerance(dtype: torch.dtype) -> float:
    """Largest relative disagreement of the adjoint test accepted for an AD result in ``dtype``."""
    return {torch.float64: 1e-3, torch.float32: 1e-3}.get(dtype, 3e-2)


PRECISION_TOLERANCE = {torch.float64: 1e-9}  # above it (and below ad_check_tolerance): a note on the precision
#: ``"hvp-forces"`` is accepted when its adjoint test (then a test of the force Jacobian's symmetry) agrees to this
SYMMETRY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@dataclass
class Problem:
    """A prepared Lie-derivative problem: validated inputs with their representations, rotation centres, the
    output leaves and base outputs (``y``); shared with the finite checks, which need the same."""

    f: Callable
    inputs: Inputs
    group: LieGroup
    centers: Centers
    leaves: List[Leaf] = field(default_factory=list)
    rebuild: Optional[Callable] = None
    batch: Optional[torch.Tensor] = None
    y: List[torch.Tensor] = field(default_factory=list)
    not_differentiable: List[str] = field(default_factory=list)
    hvp_state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    # the base evaluation with its autograd graph: moving inputs that require grad and the raw output leaves
    base_inputs: List[torch.Tensor] = field(default_factory=list)
    base_raw: List[Any] = field(default_factory=list)
    probes: Optional[Tuple[List[torch.Tensor], List[List[torch.Tensor]], List[torch.Tensor]]] = None
    hvp_variant: str = "loop"  # the variant "hvp" ran: "loop" or "batched"
    jvp_variant: str = "loop"  # the variant "jvp" ran: "loop" or "vmap"
    jvp_ran: set = field(default_factory=set)  # forward-mode variants already run (or failed) for this problem

    def call(self, moving_values: Optional[List[torch.Tensor]] = None, inputs=None):
        vals = list((inputs or self.inputs).values)
        if moving_values is not None:
            for i, v in zip(self.inputs.moving, moving_values):
                vals[i] = v
        with torch.enable_grad():
            return self.f(*self.inputs.call_args(vals))


def _hvp_base(prob: Problem, batch) -> Optional[Any]:
    """For a :func:`geolie.conservative` function of positions alone: energy and forces with their graph kept."""
    energy_fn = getattr(prob.f, "_geolie_energy_fn", None)
    inputs = prob.inputs
    if energy_fn is None or inputs.moving != [0] or not isinstance(inputs.reps[0], PointRep):
        return None
    p = inputs.values[0].clone().requires_grad_(True)
    with torch.enable_grad():
        e = energy_fn(p, *inputs.values[1:])
        if not isinstance(e, torch.Tensor) or not e.requires_grad:
            return None
        g = torch.autograd.grad(e.sum(), p, create_graph=True)[0]
    n_graphs = None if batch is None else int(torch.as_tensor(batch).max()) + 1
    if e.numel() == 1 or (n_graphs is not None and e.shape == (n_graphs,)):
        prob.hvp_state = (p, e, g)
    prob.base_inputs = [p]
    if getattr(prob.f, "_geolie_as_dict", False):
        return {"energy": e, "forces": -g}
    return e, -g


def _setup(f, x, group, in_rep, out_rep, about, batch, method="auto") -> Problem:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    group = as_group(group)
    inputs = prepare_inputs(x, in_rep)
    if not inputs.moving:
        raise ValueError("in_rep declares every input invariant: there is nothing for the group to act on")
    prob = Problem(f, inputs, group, Centers(inputs, about, batch), batch=batch)
    with part("base evaluation"):
        out = _hvp_base(prob, batch) if method in ("auto", "hvp", "hvp-loop", "hvp-batched") else None
        if out is None:
            # the base call sees inputs that require grad: outputs that come back as numpy arrays, or detached from
            # them, cannot be differentiated by AD (a silent zero would look equivariant)
            prob.base_inputs = [inputs.values[i].clone().requires_grad_(True) for i in inputs.moving]
            out = prob.call(prob.base_inputs)
    prob.leaves, prob.rebuild = pair_outputs(out, out_rep)
    raw = flatten_outputs(out)
    prob.base_raw = raw
    prob.not_differentiable = [leaf.path for o, leaf in zip(raw, prob.leaves)
                               if not isinstance(o, torch.Tensor) or not o.requires_grad]
    prob.y = [t.detach() for t in check_outputs(raw, prob.leaves)]
    return prob


def _in_tangents(prob: Problem) -> List[torch.Tensor]:
    """``dρ_in(X_k) x`` for every moving input: each ``[K, *x.shape]``."""
    res = []
    for i in prob.inputs.moving:
        v, rep = prob.inputs.values[i], prob.inputs.reps[i]
        c = prob.centers.for_tensor(v, rep, f"input x[{i}]")
        res.append(prob.group.infinitesimal(rep, v, c))
    return res


def out_correction(prob: Problem, y: List[torch.Tensor]) -> List[torch.Tensor]:
    """``dρ_out(X_k) f(x)`` for every output leaf: each ``[K, *y.shape]``."""
    res = []
    for t, leaf in zip(y, prob.leaves):
        c = prob.centers.for_tensor(t, leaf.rep, leaf.path)
        res.append(prob.group.infinitesimal(leaf.rep, t, c))
    return res


def _flat_fn(prob: Problem):
    def fn(*moving):
        out = prob.call(list(moving))
        return tuple(_to_tensor(o, "output") for o in flatten_outputs(out))

    return fn


def _jvp_vmap(prob, primals, tangents, chunk_size=None):
    fn = _flat_fn(prob)

    def one(*ts):
        return torch.func.jvp(fn, tuple(primals), tuple(ts))[1]

    return list(torch.func.vmap(one, chunk_size=chunk_size)(*tangents))


def _jvp_forward_ad(prob, primals, tangents):
    fn = _flat_fn(prob)
    K = tangents[0].shape[0]
    per_k = []
    for k in range(K):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t[k]) for p, t in zip(primals, tangents)]
            per_k.append([_tangent_of(o) for o in fn(*duals)])
    return [torch.stack([per_k[k][j] for k in range(K)]) for j in range(len(per_k[0]))]


def _jvp_double_backward(prob, primals, tangents):
    """Gruver et al.'s trick: ``J v = d/du <u, J^T u... >``: grad of ``grad(<f, u>, x)`` with respect to ``u``."""
    K = tangents[0].shape[0]
    per_k = []
    for k in range(K):
        xs = [p.detach().requires_grad_(True) for p in primals]
        with torch.enable_grad():
            outs = _flat_fn(prob)(*xs)
            us = [torch.zeros_like(o, requires_grad=True) for o in outs]
            s = sum((o * u).sum() for o, u in zip(outs, us))
            gs = torch.autograd.grad(s, xs, create_graph=True, allow_unused=True)
            dot = sum((g * t[k]).sum() for g, t in zip(gs, tangents) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                per_k.append([torch.zeros_like(o) for o in outs])
                continue
            js = torch.autograd.grad(dot, us, allow_unused=True)
        per_k.append([torch.zeros_like(o) if j is None else j.detach() for o, j in zip(outs, js)])
    return [torch.stack([per_k[k][j] for k in range(K)]) for j in range(len(per_k[0]))]


def _jvp_hvp(prob: Problem, tangents, batched: bool = False):
    """Conservative fields: ``J_F v = -H v = -∇(∇E·v)`` (the Hessian is symmetric), through the graph of the forces,
    which is built once: one backward pass per generator, or all in one batched pass (``batched``); ``J_E v = ∇E·v``
    (per structure with ``batch``)."""
    p, e, g = prob.hvp_state
    v = tangents[0]
    if batched:
        if not g.requires_grad:
            hs = [None] * v.shape[0]
        else:
            H = torch.autograd.grad(g, p, grad_outputs=v.to(g.dtype), retain_graph=True, is_grads_batched=True,
                                    allow_unused=True)[0]
            hs = [None] * v.shape[0] if H is None else list(H)
    dE, dF = [], []
    for k in range(v.shape[0]):
        gv = g * v[k]
        s = gv.sum()
        if batched:
            h = hs[k]
        elif s.requires_grad:
            h = torch.autograd.grad(s, p, retain_graph=True, allow_unused=True)[0]
        else:
            h = None
        dF.append(torch.zeros_like(p) if h is None else -h)
        dE.append(_energy_tangent(prob, gv, e))
    return [torch.stack(dE), torch.stack(dF)]


def _energy_tangent(prob: Problem, gv: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``J_E v = ∇E·v`` from the products ``gv = ∇E ⊙ v`` ``[N, 3]``: one number, or one per structure (``batch``)."""
    gv = gv.detach()
    if e.numel() == 1:
        return gv.sum().reshape(e.shape).to(e.dtype)
    b = torch.as_tensor(prob.batch, device=gv.device).long()
    return segment_sum(gv.sum(-1), b, e.numel()).reshape(e.shape).to(e.dtype)


def _autograd_forces(prob: Problem) -> Optional[Tuple[int, int]]:
    """``(energy leaf, forces leaf)`` when ``"hvp-forces"`` applies: the function declares its forces the autograd
    gradient of its energy, positions are the one moving input, the outputs are exactly energy and forces, and the
    forces carry their graph."""
    spec = getattr(prob.f, "_geolie_autograd_forces", None)
    if spec is None or prob.inputs.moving != [0] or not isinstance(prob.inputs.reps[0], PointRep):
        return None
    names = [leaf_name(lf.path) for lf in prob.leaves]
    rest = [n for n in names if n not in spec]
    if not all(n in names for n in spec) or (rest and not set(rest) <= set(_energy_outputs(prob.f))):
        return None
    ie, i_f = names.index(spec[0]), names.index(spec[1])
    F = prob.base_raw[i_f]
    if not isinstance(F, torch.Tensor) or not F.requires_grad or F.shape != prob.base_inputs[0].shape:
        return None
    return ie, i_f


def _jvp_autograd_forces(prob: Problem, tangents):
    """``"hvp-forces"`` (see the module docstring): ``J_F v = J_Fᵀ v`` by one reverse pass through the forces' graph
    per tangent, ``J_E v = ∇E·v`` (per structure with ``batch``)."""
    ie, i_f = _autograd_forces(prob)
    p = prob.base_inputs[0]
    E, F = prob.base_raw[ie], prob.base_raw[i_f]
    gE = torch.autograd.grad(E.sum(), p, retain_graph=True, allow_unused=True)[0]
    gE = torch.zeros_like(p) if gE is None else gE.detach()
    v = tangents[0]
    dE, dF = [], []
    for k in range(v.shape[0]):
        h = torch.autograd.grad((F * v[k].to(F)).sum(), p, retain_graph=True, allow_unused=True)[0]
        dF.append(torch.zeros_like(F) if h is None else h.detach().to(F.dtype))
        dE.append(_energy_tangent(prob, gE * v[k], E))
    out: List[Any] = [None] * len(prob.base_raw)
    out[ie], out[i_f] = torch.stack(dE), torch.stack(dF)
    rest = [j for j in range(len(out)) if out[j] is None]
    if rest:  # other outputs of the energy pass (per-atom energies): forward mode through it, without the forces
        names = [leaf_name(prob.leaves[j].path) for j in rest]
        energy_outputs = getattr(prob.f, "_geolie_energy_outputs")
        args = list(prob.inputs.values)
        per_k = []
        for k in range(v.shape[0]):
            with fwAD.dual_level():
                dual = fwAD.make_dual(prob.inputs.values[0], v[k].to(p))
                res = energy_outputs(dual, *args[1:])
                per_k.append([_tangent_of(res[n]) for n in names])
        for i, j in enumerate(rest):
            out[j] = torch.stack([per_k[k][i] for k in range(v.shape[0])]).reshape(v.shape[0], *prob.y[j].shape)
    return out


def _energy_outputs(f) -> Tuple[str, ...]:
    """The outputs ``f._geolie_energy_outputs`` (an energy pass without the forces) returns, declared as
    ``f._geolie_energy_outputs.outputs``."""
    g = getattr(f, "_geolie_energy_outputs", None)
    return tuple(getattr(g, "outputs", ())) if g is not None else ()


def _tangent_of(o: torch.Tensor) -> torch.Tensor:
    t = fwAD.unpack_dual(o).tangent
    return torch.zeros_like(o).detach() if t is None else t.detach()


def _size_class(n_atoms: int) -> int:
    return 1 << max(0, int(n_atoms) - 1).bit_length()


def hvp_choice(device: torch.device, dtype: torch.dtype, n_atoms: int) -> Optional[str]:
    """The ``"hvp"`` variant (``"loop"`` or ``"batched"``) for a call of ``n_atoms`` atoms on ``device`` in ``dtype``:
    from :data:`HVP_BATCHED_UP_TO` for its device type, else the one measured in this process for its size class,
    else ``None`` (not measured yet)."""
    limit = HVP_BATCHED_UP_TO.get(device.type)
    if limit is not None:
        return "batched" if n_atoms <= limit else "loop"
    return _HVP_MEASURED.get((str(device), str(dtype), _size_class(n_atoms)))


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def _measure_variants(runs: Dict[str, Callable[[], Any]], device: torch.device):
    """Time each variant twice, alternating (the first call of either pays the warm-up); one that raises is out.
    Returns ``(fastest or None, its output, {failed variant: error})``."""
    best: Dict[str, Tuple[float, Any]] = {}
    failed: Dict[str, Exception] = {}
    for _ in range(2):
        for name, fn in runs.items():
            if name in failed:
                continue
            try:
                t, out = _timed(fn, device)
            except Exception as e:  # noqa: BLE001 - this variant does not run here (no batching rule, memory)
                failed[name] = e
                best.pop(name, None)
                continue
            if name not in best or t < best[name][0]:
                best[name] = (t, out)
        if len(best) <= 1:
            break  # nothing to compare
    if not best:
        return None, None, failed
    choice = min(best, key=lambda k: best[k][0])
    return choice, best[choice][1], failed


def _jvp_hvp_chosen(prob: Problem, tangents):
    """``"hvp"``: the variant chosen for the device and call size (measured on the first problem where not known)."""
    p = prob.hvp_state[0]
    choice = hvp_choice(p.device, p.dtype, p.shape[0])
    if choice is None:
        runs = {v: (lambda v=v: _jvp_hvp(prob, tangents, v == "batched")) for v in ("loop", "batched")}
        choice, out, _ = _measure_variants(runs, p.device)
        _HVP_MEASURED[(str(p.device), str(p.dtype), _size_class(p.shape[0]))] = choice or "loop"
        if choice is not None:
            prob.hvp_variant = choice
            return out
        choice = "loop"
    prob.hvp_variant = choice
    return _jvp_hvp(prob, tangents, choice == "batched")


#: forward mode's variant (``"loop"`` or ``"vmap"``) per device, dtype, size class and function code, measured
_JVP_MEASURED: Dict[Tuple[str, str, int, Any], str] = {}


def _jvp_key(prob: Problem, primals) -> Tuple[str, str, int, Any]:
    x = primals[0]
    code = getattr(prob.f, "__code__", None) or type(prob.f)
    return str(x.device), str(x.dtype), _size_class(x.shape[0] if x.dim() else 1), code


def _jvp_chosen(prob: Problem, primals, tangents, chunk_size=None):
    """``"jvp"``: forward mode, by the faster of the loop and the vmap for this device, dtype, call size and function
    (measured on the first such problem: ``vmap`` cannot run models that call ``torch.autograd.grad`` themselves, and
    is 1.7-4x faster where it runs). A variant that raises is left to the explicit fallbacks."""
    runs = {"loop": lambda: _jvp_forward_ad(prob, primals, tangents),
            "vmap": lambda: _jvp_vmap(prob, primals, tangents, chunk_size)}
    key = _jvp_key(prob, primals)
    choice = _JVP_MEASURED.get(key)
    if choice is None:
        choice, out, failed = _measure_variants(runs, primals[0].device)
        prob.jvp_ran.update(f"jvp-{v}" for v in failed)
        if choice is None:
            raise next(iter(failed.values()))
        _JVP_MEASURED[key] = choice
        prob.jvp_ran.add(f"jvp-{choice}")
        prob.jvp_variant = choice
        return out
    prob.jvp_ran.add(f"jvp-{choice}")
    prob.jvp_variant = choice
    return runs[choice]()


def _adjoint_probes(prob: Problem, primals):
    """Cotangents ``u_j``, their pull-backs ``g_j = J_jᵀ u_j`` (one reverse pass per output leaf, through the base
    evaluation's graph) and the extra probe tangent ``w`` (per moving input). Seeded: the same every call."""
    gen = torch.Generator().manual_seed(20231)
    us, gs = [], []
    for o in prob.base_raw:
        u = torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64).to(o)
        g = _energy_pullback(prob, o, u)
        if g is None:
            with torch.enable_grad():
                g = torch.autograd.grad((o * u).sum(), prob.base_inputs, retain_graph=True, allow_unused=True)
        us.append(u)
        gs.append([torch.zeros_like(x) if gi is None else gi.detach() for gi, x in zip(g, primals)])
    rnd = [torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64).to(p) for p in primals]
    w = [r / _norm(rnd) for r in rnd]
    for g in gs:
        n = _norm(g)
        if n > 0 and torch.isfinite(torch.tensor(n)):
            w = [wi + gi / n for wi, gi in zip(w, g)]
    return us, gs, w


def _energy_pullback(prob: Problem, o, u) -> Optional[List[torch.Tensor]]:
    """In the ``hvp`` path, the energy leaf's pull-back ``J_Eᵀ u = u_b ∇E`` (per structure ``b`` of a batch) from
    the gradient the base evaluation already holds (one reverse pass fewer); ``None`` for any other leaf."""
    if prob.hvp_state is None or o is not prob.hvp_state[1]:
        return None
    p, e, g = prob.hvp_state
    if e.numel() == 1:
        return [(u.reshape(()) * g).detach()]
    b = torch.as_tensor(prob.batch, device=p.device).long()
    return [(u.reshape(-1)[b][:, None] * g).detach()]


def _norm(ts) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in ts)) ** 0.5


def _adjoint_errors(prob: Problem, jv: List[torch.Tensor], tangents: List[torch.Tensor]) -> List[float]:
    """Per output leaf: the largest relative disagreement of ``<u, J v>`` and ``<Jᵀu, v>`` over the tangents."""
    us, gs, _ = prob.probes
    K = tangents[0].shape[0]
    t_norm = [_norm([t[k] for t in tangents]) for k in range(K)]
    errs = []
    for j, (u, g) in enumerate(zip(us, gs)):
        J = jv[j].detach().double()
        a = (u.double()[None] * J).reshape(K, -1).sum(1)
        b = sum((gi.double()[None] * t.double()).reshape(K, -1).sum(1) for gi, t in zip(g, tangents))
        scale = float(u.double().norm()) * J.reshape(K, -1).norm(dim=1) + _norm(g) * torch.tensor(t_norm).to(a)
        d = torch.where(scale > 0, (a - b).abs() / scale, (a - b).abs())
        errs.append(float(d.max()) if bool(torch.isfinite(d).all()) else float("nan"))
    return errs


def _ad(prob: Problem, method: str, chunk_size=None):
    """AD Lie derivatives that pass the adjoint test: ``(values, method name, {leaf path: check}, notes)``."""
    if prob.not_differentiable:
        raise _ADFailed(
            f"output(s) {prob.not_differentiable} are not connected to the inputs' autograd graph (numpy arrays, "
            "detached tensors or constants)"
        )
    primals = [prob.inputs.values[i] for i in prob.inputs.moving]
    tangents = _in_tangents(prob)
    K = tangents[0].shape[0]
    try:
        with part("adjoint test"):
            prob.probes = _adjoint_probes(prob, primals)
    except Exception as e:  # noqa: BLE001 - no reverse pass: AD cannot be verified, so it is not trusted
        raise _ADFailed(f"no reverse pass through the outputs to verify AD ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    errors, notes = [], []
    strategies = _strategies(prob, method, primals, chunk_size, errors)
    tried = set()
    while strategies:
        name, run = strategies.pop(0)
        if name in prob.jvp_ran:
            continue  # ran inside the measured "jvp" strategy already
        tried.add(name)
        ext = _tangents_for(prob, name, tangents)
        try:
            with part(f"tangents ({name})"):
                jv = run(ext)
        except Exception as e:  # noqa: BLE001 - any failure of a strategy means: try the next one
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        if name == "hvp" and prob.hvp_variant == "batched":
            name = "hvp-batched"
        if name == "jvp":
            name = f"jvp-{prob.jvp_variant}"
        with part("adjoint test"):
            checks = _adjoint_errors(prob, jv, ext)
        tol = ad_check_tolerance(jv[0].dtype if jv else torch.float64)
        bad = [(leaf.path, c) for leaf, c in zip(prob.leaves, checks) if not c <= tol]
        if bad:
            what = ", ".join(f"{p}: {c:.1e}" for p, c in bad)
            msg = (f"{name} failed its adjoint test (<u, J v> vs <J^T u, v>, relative disagreement {what} > "
                   f"{tol:.0e}); not used")
            notes.append(msg)
            warnings.warn(f"lie_derivative: {msg}", GeolieADCheckWarning, stacklevel=4)
            if "double-backward" not in tried and all(n != "double-backward" for n, _ in strategies):
                strategies.append(("double-backward", _strategy("double-backward", prob, primals, chunk_size)))
            continue
        sym = SYMMETRY_TOLERANCE.get(jv[0].dtype if jv else torch.float64, 0.0)
        if name == "hvp-forces" and not max(checks, default=0.0) <= sym:
            notes.append(f"hvp-forces not used: the force Jacobian is symmetric only to {max(checks):.1e} (more than "
                         f"{sym:.0e}): the forces are not exactly the energy's gradient; forward mode instead")
            continue
        soft = PRECISION_TOLERANCE.get(jv[0].dtype if jv else torch.float64)
        if soft is not None and max(checks, default=0.0) > soft:
            notes.append(f"{name}: its adjoint test agrees only to {max(checks):.1e} in "
                         f"{str(jv[0].dtype).replace('torch.', '')}: the model computes below that precision somewhere "
                         "(float32 arithmetic inside?), and its floor is at least of that order")
        corr = out_correction(prob, prob.y)
        vals = [j[:K].detach().to(c.dtype) - c for j, c in zip(jv, corr)]
        return vals, name, {leaf.path: c for leaf, c in zip(prob.leaves, checks)}, notes
    raise _ADFailed("; ".join(errors + notes), check_failed=bool(notes), notes=notes)


#: in the hvp path the probe runs unless a generator gives the forces' adjoint test a side of at least this size
#: relative to its scale (``|⟨J_Fᵀu, v_k⟩| / (‖J_Fᵀu‖ ‖v_k‖)``)
PROBE_UNLESS_ABOVE = 1e-3


def _tangents_for(prob: Problem, name: str, tangents: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tangents strategy ``name`` pushes forward: the generators' and the adjoint test's probe, except in the
    ``hvp`` path where the generators already test the forces (:func:`_probe_needed`): one Hessian-vector product
    fewer per call."""
    if name in ("hvp", "hvp-loop", "hvp-batched") and not _probe_needed(prob, tangents):
        return tangents
    return _with_probe(prob, tangents)


def _probe_needed(prob: Problem, tangents: List[torch.Tensor]) -> bool:
    """In the ``hvp`` path the energy's adjoint test compares a computation with itself (its tangents ``∇E·v`` and
    its pull-back ``u ∇E`` come from the same gradient), so the test sees the forces' Hessian-vector products only.
    The probe exists for outputs whose generator sides are all ~0 (an equilibrium structure: ``J_F X x = X F ≈ 0``,
    ``J_F t = 0``); it is needed unless some generator's side ``|⟨J_Fᵀu, v_k⟩|`` is at least
    :data:`PROBE_UNLESS_ABOVE` of its scale ``‖J_Fᵀu‖ ‖v_k‖`` for every other output."""
    _, gs, _ = prob.probes
    K = tangents[0].shape[0]
    for j, g in enumerate(gs):
        if prob.hvp_state is not None and prob.base_raw[j] is prob.hvp_state[1]:
            continue  # the energy: tested against itself
        gn = _norm(g)
        if not gn > 0:
            return True
        side = max(abs(float(sum((gi.double() * t[k].double()).sum() for gi, t in zip(g, tangents))))
                   / (gn * max(_norm([t[k] for t in tangents]), 1e-300)) for k in range(K))
        if not side >= PROBE_UNLESS_ABOVE:
            return True
    return False


def _with_probe(prob: Problem, tangents: List[torch.Tensor]) -> List[torch.Tensor]:
    """The generators' tangents with the adjoint test's probe ``w`` appended as one more row."""
    return [torch.cat([t, w[None]]) for t, w in zip(tangents, prob.probes[2])]


def _strategy(name: str, prob: Problem, primals, chunk_size) -> Callable:
    """``run(tangents) -> per-output J·tangents`` for one AD strategy."""
    return {
        "hvp": lambda ts: _jvp_hvp_chosen(prob, ts),
        "hvp-loop": lambda ts: _jvp_hvp(prob, ts),
        "hvp-batched": lambda ts: _jvp_hvp(prob, ts, batched=True),
        "hvp-forces": lambda ts: _jvp_autograd_forces(prob, ts),
        "jvp": lambda ts: _jvp_chosen(prob, primals, ts, chunk_size),
        "jvp-loop": lambda ts: _jvp_forward_ad(prob, primals, ts),
        "jvp-vmap": lambda ts: _jvp_vmap(prob, primals, ts, chunk_size),
        "double-backward": lambda ts: _jvp_double_backward(prob, primals, ts),
    }[name]


def _strategies(prob, method, primals, chunk_size, errors):
    names = []
    if method in ("auto", "hvp", "hvp-loop", "hvp-batched"):
        if prob.hvp_state is not None:
            names.append("hvp" if method == "auto" else method)
        elif method != "auto":
            errors.append(f"{method}: needs f = geolie.conservative(energy_fn) of positions alone, with one energy "
                          "(or one per structure and `batch`)")
    if method in ("jvp", "auto", "hvp-forces") and _autograd_forces(prob) is not None:
        names.append("hvp-forces")  # accepted only if the forces' Jacobian is symmetric to rounding (see _ad)
    elif method == "hvp-forces":
        errors.append("hvp-forces: needs a function that declares its forces the autograd gradient of its energy "
                      "(fn._geolie_autograd_forces), outputs energy and forces only, positions the one moving input")
    if method in ("jvp", "auto"):
        names += ["jvp", "jvp-loop", "jvp-vmap"]  # the measured choice; the explicit ones as fallbacks
    elif method in ("jvp-loop", "jvp-vmap"):
        names.append(method)
    if method in ("double-backward", "auto"):
        names.append("double-backward")
    return [(n, _strategy(n, prob, primals, chunk_size)) for n in names]


def second_opinion(res: "LieResult") -> Optional[Tuple[List[torch.Tensor], str]]:
    """The same Lie derivatives by another AD strategy that passes the adjoint test, or ``None``.

    Their difference from ``res`` is a measured sample of the model's own arithmetic noise (used as a floor where
    no evaluation in another precision is possible)."""
    prob = res.problem
    if prob is None or prob.probes is None or res.fd_error is not None:
        return None
    primals = [prob.inputs.values[i] for i in prob.inputs.moving]
    tangents = _in_tangents(prob)
    K = tangents[0].shape[0]
    ext = _with_probe(prob, tangents)
    for name, run in _strategies(prob, "auto", primals, None, []):
        if _family(name) == _family(res.method):  # another variant of the same AD: not a second opinion
            continue
        try:
            jv = run(ext)
        except Exception:  # noqa: BLE001 - this strategy does not run here: try the next
            continue
        tol = ad_check_tolerance(jv[0].dtype if jv else torch.float64)
        if all(c <= tol for c in _adjoint_errors(prob, jv, ext)):
            corr = out_correction(prob, prob.y)
            return [j[:K].detach().to(c.dtype) - c for j, c in zip(jv, corr)], name
    return None


def _family(method: str) -> str:
    """``hvp``, ``jvp``, ``double-backward`` or ``fd``: variants of one family give the same arithmetic."""
    return method.split("-")[0] if method.startswith(("hvp", "jvp")) else method


class _ADFailed(RuntimeError):
    def __init__(self, msg: str, check_failed: bool = False, notes: Optional[List[str]] = None):
        super().__init__(msg)
        self.check_failed = check_failed
        self.notes = notes or []


# -- finite differences ----------------------------------------------------------------------------------------
def length_scale(prob: Problem) -> float:
    scales = []
    for i in prob.inputs.moving:
        v, rep = prob.inputs.values[i], prob.inputs.reps[i]
        if isinstance(rep, PointRep):
            p = v.detach().reshape(-1, 3).double()
            scales.append(float((p - p.mean(0)).pow(2).sum(-1).mean().sqrt()))
    s = max(scales) if scales else 1.0
    return s if s > 0 else 1.0


def _try_float64(prob: Problem):
    """Inputs cast to float64 if ``f`` accepts them (and then returns finite float64 outputs), else ``None``."""
    if all(prob.inputs.values[i].dtype == torch.float64 for i in prob.inputs.moving) and all(
        t.dtype == torch.float64 for t in prob.y
    ):
        return None
    vals = list(prob.inputs.values)
    for i in prob.inputs.moving:
        vals[i] = vals[i].to(torch.float64)
    cand = Inputs(tuple(vals), prob.inputs.reps, prob.inputs.is_tuple)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = [_to_tensor(o, "output") for o in flatten_outputs(prob.call(inputs=cand))]
    except Exception:  # noqa: BLE001 - the function does not take float64: stay in its dtype
        return None
    if any(o.dtype != torch.float64 or not bool(torch.isfinite(o).all()) for o in out):
        return None
    return cand


def _noise_stencil():
    import numpy as np

    x = np.array([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])
    V = np.vstack([x ** p for p in range(6)])
    c = np.linalg.svd(V)[2][-1]  # the null vector: annihilates polynomials of degree <= 5, unit norm
    return c.tolist()


_NOISE_STENCIL = _noise_stencil()


def _fd(prob: Problem, step: Optional[float] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor], str]:
    """Richardson-extrapolated central differences of the finite action; returns (values, error estimates, name)."""
    inputs = _try_float64(prob) or prob.inputs
    dtype = inputs.values[inputs.moving[0]].dtype
    u = torch.finfo(dtype).eps
    h0 = step if step is not None else (0.02 if dtype == torch.float64 else 0.15)
    ell = length_scale(prob)
    K = prob.group.dim
    vals = [[] for _ in prob.leaves]
    errs = [[] for _ in prob.leaves]
    centers = {i: prob.centers.for_tensor(inputs.values[i], inputs.reps[i], f"input x[{i}]") for i in inputs.moving}
    phi0 = [o.detach().to(dtype) for o in check_outputs(flatten_outputs(prob.call(
        [inputs.values[i] for i in inputs.moving], inputs=inputs)), prob.leaves)]
    for k in range(K):
        hk = h0 * (ell if prob.group.generator_names[k].startswith("t") else 1.0)
        D, phis_at = [], {}
        for h in (hk, hk / 2, hk / 4):
            phis = []
            for s in (h, -h):
                xi = torch.zeros(K, dtype=torch.float64)
                xi[k] = s
                g = prob.group.exp(xi)
                R, t = g if isinstance(g, tuple) else (g, None)
                moved = []
                for i in inputs.moving:
                    v = inputs.values[i]
                    moved.append(inputs.reps[i].act(v, R.to(v), None if t is None else t.to(v), centers[i]))
                out = flatten_outputs(prob.call(moved, inputs=inputs))
                out = check_outputs(out, prob.leaves)
                phi = []
                for j, (o, leaf) in enumerate(zip(out, prob.leaves)):
                    o = o.detach().to(dtype)
                    Rinv = R.T.to(o)
                    tinv = None if t is None else -(t.to(o) @ R.to(o))
                    c = prob.centers.for_tensor(o, leaf.rep, leaf.path)
                    phi.append(leaf.rep.act(o, Rinv, tinv, c))
                phis.append(phi)
                phis_at[s] = phi
            D.append([(a - b) / (2 * h) for a, b in zip(*phis)])
        for j in range(len(prob.leaves)):
            r1a = (4 * D[1][j] - D[0][j]) / 3
            r1b = (4 * D[2][j] - D[1][j]) / 3
            r2 = (16 * r1b - r1a) / 15
            vals[j].append(r2)
            # the function's own noise: a combination of phi at s/q = -4, -2, -1, 0, 1, 2, 4 (q = h/4) that vanishes
            # on polynomials of degree <= 5 sees noise only (plus q^6 times the 6th derivative); with unit norm its
            # value estimates the noise delta, which reaches R2 as 4.07 delta / h; counted 3 times over
            pts = [phis_at[-hk][j], phis_at[-hk / 2][j], phis_at[-hk / 4][j], phi0[j], phis_at[hk / 4][j],
                   phis_at[hk / 2][j], phis_at[hk][j]]
            delta = sum(float(c) * v for c, v in zip(_NOISE_STENCIL, pts)).abs()
            noise = 3 * 4.07 * delta / hk
            rnd = 10 * u * float(phi0[j].abs().max()) / (hk / 4) if phi0[j].numel() else 0.0
            errs[j].append((r2 - r1b).abs() + noise + rnd)
    out_vals = [torch.stack(v).to(y.dtype) for v, y in zip(vals, prob.y)]
    out_errs = [torch.stack(e).to(y.dtype) for e, y in zip(errs, prob.y)]
    return out_vals, out_errs, "fd-float64" if dtype == torch.float64 else f"fd-{str(dtype).split('.')[-1]}"


@dataclass
class LieResult:
    """What the engine computed: per output leaf ``[dim, *shape]`` values, the outputs, and how."""

    values: List[torch.Tensor]
    outputs: List[torch.Tensor]
    leaves: List[Leaf]
    rebuild: Callable
    method: str
    fd_error: Optional[List[torch.Tensor]] = None
    problem: Optional[Problem] = None
    ad_check: Optional[Dict[str, float]] = None  # per leaf path: the accepted AD method's adjoint-test disagreement
    notes: List[str] = field(default_factory=list)  # AD methods that failed their check, fallbacks taken

    def structured(self):
        return self.rebuild(self.values)


def lie_result(f, x, *, group=SE3, in_rep="point", out_rep="scalar", method="auto", about="origin", batch=None,
               chunk_size=None, fd_step=None) -> LieResult:
    """:func:`lie_derivative` with everything it learnt: a :class:`LieResult` (per output leaf the values
    ``[group.dim, *shape]``, the outputs, the method used, the finite-difference error estimate when finite
    differences were used, the adjoint test's value per output and the notes on methods that failed it)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prob = _setup(f, x, group, in_rep, out_rep, about, batch, method)
    if method == "fd":
        with part("tangents (finite differences)"):
            vals, errs, name = _fd(prob, fd_step)
        return LieResult(vals, prob.y, prob.leaves, prob.rebuild, name, errs, prob)
    try:
        vals, name, checks, notes = _ad(prob, method, chunk_size)
        return LieResult(vals, prob.y, prob.leaves, prob.rebuild, name, None, prob, checks, notes)
    except _ADFailed as e:
        if method != "auto" and not e.check_failed:
            raise RuntimeError(f"lie_derivative(method={method!r}) failed: {e}") from None
        notes = e.notes
        warnings.warn(
            f"lie_derivative: automatic differentiation failed ({e}); falling back to finite differences",
            GeolieFallbackWarning,
            stacklevel=3,
        )
    with part("tangents (finite differences)"):
        vals, errs, name = _fd(prob, fd_step)
    return LieResult(vals, prob.y, prob.leaves, prob.rebuild, name, errs, prob, None,
                     notes + [f"finite differences used ({name}): no AD method passed"] if notes else [])


def lie_derivative(
    f: Callable,
    x: Any,
    *,
    group=SE3,
    in_rep: Any = "point",
    out_rep: Any = "scalar",
    method: str = "auto",
    about: str = "origin",
    batch: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    fd_step: Optional[float] = None,
):
    r"""Lie derivative :math:`L_X f(x) = \frac{d}{dt}|_0\, \rho_{out}(e^{tX})^{-1} f(\rho_{in}(e^{tX}) x)` for every generator.

    Parameters
    ----------
    f: callable taking ``x`` (or ``*x`` when ``x`` is a tuple) and returning a tensor, a tuple or a dict.
    x: a tensor or a tuple of tensors; invariant entries (atomic numbers, ``edge_index``, ``batch``) may be of
        any type and are passed through untouched.
    group: :data:`geolie.SO3` or :data:`geolie.SE3` (or their names).
    in_rep: representation of ``x`` (a tuple matching ``x``): ``"point"``, ``"vector"``, ``"cell"``,
        ``"tensor2"``, an e3nn irreps string, a :class:`geolie.Rep`, or ``None`` for invariant inputs.
    out_rep: representation(s) of the output, with the same structure (tensor / tuple / dict). Every dict key
        must be declared.
    method: ``"auto"``, ``"hvp"``, ``"jvp"``, ``"double-backward"`` or ``"fd"`` (see the module docstring);
        ``"jvp-vmap"`` and ``"jvp-loop"``, ``"hvp-loop"`` and ``"hvp-batched"`` force one variant (for benchmarks).
    about: ``"origin"``, or ``"centroid"`` to rotate each structure about its own centroid (per graph when
        ``batch`` is given), the usual meaning for models that are not translation invariant.
    batch: structure index of each row of the first point input (PyG's ``batch``), for ``about="centroid"``.
    chunk_size: passed to ``torch.func.vmap`` to bound memory.
    fd_step: base step of the finite differences (radians; times the RMS radius for translations).

    Returns
    -------
    The output structure with each tensor of shape ``[group.dim, *output.shape]``, generators in the order of
    ``group.generator_names`` (detached from the autograd graph). Zero (to rounding) for an equivariant ``f``.

    Raises
    ------
    ValueError: non-finite or empty inputs, shapes that do not fit their representation, unknown
        representation names, undeclared or mismatched outputs.
    """
    return lie_result(f, x, group=group, in_rep=in_rep, out_rep=out_rep, method=method, about=about, batch=batch,
                    chunk_size=chunk_size, fd_step=fd_step).structured()
