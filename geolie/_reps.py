r"""Representations: how a tensor transforms under rotations, inversion and translations.

A :class:`Rep` describes the action :math:`\rho(g)` of a group element ``g = (R, t)`` of E(3) on a tensor, and
its infinitesimal action :math:`d\rho(X)` for a Lie algebra element ``X = (omega, v)``:

=====================  =========================================  ==========================================
name                   finite action ``g . x``                    infinitesimal action ``dρ(X) x``
=====================  =========================================  ==========================================
``"scalar"``/``None``  ``x``                                      ``0``
``"vector"``           ``x @ R.T`` (trailing dim 3)               ``x @ hat(omega).T``
``"cell"``             alias of ``"vector"`` (cell rows)
``"pseudovector"``     ``det(R) x @ R.T``                         ``x @ hat(omega).T``
``"point"``            ``(x - c) @ R.T + c + t``                  ``(x - c) @ hat(omega).T + v``
``"tensor2"``          ``R x R.T`` (trailing dims ``[3, 3]``)     ``hat(omega) x - x hat(omega)``
``"stress"``           alias of ``"tensor2"``
e3nn ``Irreps``        ``x @ D(R).T`` (trailing dim ``irreps.dim``) ``x @ (sum_k omega_k G_k).T``
=====================  =========================================  ==========================================

``c`` is the centre of rotation (the origin unless the caller rotates each structure about its centroid).
For e3nn irreps, ``D(R) = irreps.D_from_matrix(R)`` (inversion handled by each irrep's parity) and ``G_k`` are
``o3.so3_generators(l)`` in e3nn's basis; for ``1o``, ``D(R) = R``. An improper ``R`` (``det = -1``) is how
inversion and reflections are applied; translations act on points only.

Register your own with :func:`register_rep`.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ._torch_utils import default_dtype

from ._groups import hat

__all__ = [
    "Rep", "ScalarRep", "VectorRep", "PseudovectorRep", "PointRep", "Tensor2Rep", "IrrepsRep",
    "as_rep", "register_rep", "known_reps", "tensor2_parts",
]


class Rep:
    """Base class of representations. Subclasses implement :meth:`check`, :meth:`act`, :meth:`infinitesimal`.

    Attributes
    ----------
    name: short name used in reports.
    translation_invariant: ``False`` only for representations on which translations act (points).
    """

    name: str = "rep"
    translation_invariant: bool = True

    def check(self, x: torch.Tensor, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` if ``x`` has a shape this representation cannot act on."""

    def act(self, x: torch.Tensor, R: torch.Tensor, t: Optional[torch.Tensor] = None,
            center: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Finite action of ``g = (R, t)``; ``R [3, 3]`` may be improper (inversion, reflections)."""
        raise NotImplementedError

    def infinitesimal(self, x: torch.Tensor, omega: torch.Tensor, v: torch.Tensor,
                      center: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dρ(X_k) x`` for a stack of algebra elements ``omega [K, 3]``, ``v [K, 3]``; returns ``[K, *x.shape]``."""
        raise NotImplementedError

    def act_rows(self, x: torch.Tensor, R: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Finite action with one group element per leading row: ``R [n, 3, 3]`` (``t [n, 3]``), ``x [n, ...]``."""
        return torch.stack([self.act(x[i], R[i], None if t is None else t[i]) for i in range(x.shape[0])])

    def parity_sign(self) -> Optional[int]:
        """+1 or -1 when inversion multiplies the whole tensor by a sign, ``None`` otherwise."""
        return None

    def __repr__(self) -> str:
        return f"Rep({self.name})"


def _need_trailing(x: torch.Tensor, shape, where: str, name: str) -> None:
    k = len(shape)
    if x.dim() < k or tuple(x.shape[-k:]) != tuple(shape):
        raise ValueError(
            f"{where}: representation {name!r} needs trailing dimensions {list(shape)}, got shape {list(x.shape)}"
        )


class ScalarRep(Rep):
    """Invariant: ``g . x = x`` (energies, charges, class logits; also atomic numbers, ``edge_index``)."""

    name = "scalar"

    def act(self, x, R, t=None, center=None):
        return x

    def infinitesimal(self, x, omega, v, center=None):
        return x.new_zeros((omega.shape[0],) + tuple(x.shape))

    def act_rows(self, x, R, t=None):
        return x

    def parity_sign(self):
        return 1


class VectorRep(Rep):
    """Polar vector: ``v -> R v`` (rows: ``v @ R.T``), translation-invariant: forces, dipoles, velocities, cells."""

    name = "vector"

    def check(self, x, where):
        _need_trailing(x, (3,), where, self.name)

    def act(self, x, R, t=None, center=None):
        return x @ R.to(x).T

    def infinitesimal(self, x, omega, v, center=None):
        W = hat(omega.to(x))  # [K, 3, 3]
        return torch.einsum("...j,kij->k...i", x, W)

    def act_rows(self, x, R, t=None):
        return torch.einsum("n...j,nij->n...i", x, R.to(x))

    def parity_sign(self):
        return -1


class PseudovectorRep(VectorRep):
    """Axial vector: rotates as a vector, does not change sign under inversion (``det(R) R v``)."""

    name = "pseudovector"

    def act(self, x, R, t=None, center=None):
        R = R.to(x)
        return torch.linalg.det(R) * (x @ R.T)

    def act_rows(self, x, R, t=None):
        det = torch.linalg.det(R.to(x)).reshape((-1,) + (1,) * (x.dim() - 1))
        return det * super().act_rows(x, R, t)

    def parity_sign(self):
        return 1


class PointRep(VectorRep):
    """Position: ``x -> R (x - c) + c + t``, the only representation on which translations act."""

    name = "point"
    translation_invariant = False

    def act(self, x, R, t=None, center=None):
        R = R.to(x)
        y = x if center is None else x - center
        y = y @ R.T
        if center is not None:
            y = y + center
        if t is not None:
            y = y + t.to(x)
        return y

    def act_rows(self, x, R, t=None):
        y = super().act_rows(x, R)
        return y if t is None else y + t.to(x).reshape((t.shape[0],) + (1,) * (x.dim() - 2) + (3,))

    def infinitesimal(self, x, omega, v, center=None):
        y = x if center is None else x - center
        out = super().infinitesimal(y, omega, v)
        shape = (v.shape[0],) + (1,) * (x.dim() - 1) + (3,)
        return out + v.to(x).reshape(shape)

    def parity_sign(self):
        return None  # inversion about the centre: a sign only when the centre is the origin


class Tensor2Rep(Rep):
    """Rank-2 Cartesian tensor on the trailing ``[3, 3]``: ``σ -> R σ Rᵀ`` (stress, polarizability)."""

    name = "tensor2"

    def check(self, x, where):
        _need_trailing(x, (3, 3), where, self.name)

    def act(self, x, R, t=None, center=None):
        R = R.to(x)
        return R @ x @ R.T

    def act_rows(self, x, R, t=None):
        R = R.to(x)
        return torch.einsum("nij,n...jk,nlk->n...il", R, x, R)

    def infinitesimal(self, x, omega, v, center=None):
        W = hat(omega.to(x))
        Wb = W.reshape((W.shape[0],) + (1,) * (x.dim() - 2) + (3, 3))
        return Wb @ x - x @ Wb

    def parity_sign(self):
        return 1


def tensor2_parts(x: torch.Tensor, *, with_l1: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """The irreducible parts of rank-2 tensors on the trailing ``[3, 3]``: ``"l=0"`` (``tr(σ)/3 · I``, the pressure
    part of a stress), ``"l=1"`` (the antisymmetric part, ``(σ − σᵀ)/2``) and ``"l=2"`` (symmetric traceless). Each
    is an orthogonal, rotation-equivariant projection, so Lie derivatives and finite errors split the same way.
    ``"l=1"`` is left out when ``with_l1`` is False, or (``None``) when :func:`has_antisymmetric_part` says ``x`` is
    symmetric to rounding."""
    if with_l1 is None:
        with_l1 = has_antisymmetric_part(x)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    l0 = (x.diagonal(dim1=-2, dim2=-1).sum(-1) / 3)[..., None, None] * eye
    sym = 0.5 * (x + x.transpose(-1, -2))
    parts = {"l=0": l0}
    if with_l1:
        parts["l=1"] = x - sym
    parts["l=2"] = sym - l0
    return parts


def has_antisymmetric_part(x: torch.Tensor) -> bool:
    """Whether rank-2 tensors ``x [..., 3, 3]`` have an antisymmetric part above rounding (``1000 u ‖x‖``)."""
    a = float((x - x.transpose(-1, -2)).double().norm())
    return a > 1000 * torch.finfo(x.dtype).eps * float(x.double().norm())


class IrrepsRep(Rep):
    """Direct sum of O(3) irreps in e3nn's basis on the last dimension (``x @ D(R).T``), or on dimension ``axis``.

    ``axis=-2`` is the layout of spherical-channel models (eSCN, EquiformerV2, fairchem's eSCN-MD and UMA): features
    ``[N, (l_max+1)², C]`` with the coefficients of every channel along dimension ``-2``; for those models the
    coefficients are in e3nn's basis (checked for eSCN-MD in the tests: ``D(R)`` of ``"0e+1o+2e"`` maps a spectral
    block's input at ``x`` to its input at ``x @ R.T`` to rounding).
    """

    def __init__(self, irreps, axis: int = -1):
        from e3nn import o3

        if axis >= 0:
            raise ValueError(f"irreps action: axis counts from the end (-1 the last dimension), got {axis}")
        self.irreps = o3.Irreps(irreps)
        self.axis = int(axis)
        self.name = str(self.irreps) if axis == -1 else f"{self.irreps} on dim {axis}"
        self._gen_cache: Dict = {}

    def check(self, x, where):
        if self.axis == -1:
            _need_trailing(x, (self.irreps.dim,), where, f"irreps {self.name}")
        elif x.dim() < -self.axis or x.shape[self.axis] != self.irreps.dim:
            raise ValueError(f"{where}: irreps {self.name} need dimension {self.axis} of size {self.irreps.dim}, "
                             f"got shape {list(x.shape)}")

    def _last(self, x):
        return x if self.axis == -1 else x.movedim(self.axis, -1)

    def _back(self, x):
        return x if self.axis == -1 else x.movedim(-1, self.axis)

    def D(self, R: torch.Tensor) -> torch.Tensor:
        """``D(R) [dim, dim]`` as ``exp(sum_k omega_k G_k)`` with ``omega = log R``, times the parities if improper.

        e3nn's ``D_from_matrix`` goes through Euler angles, which lose accuracy near the identity (gimbal lock);
        the exponential of the generators is accurate for every angle.
        """
        from ._groups import so3_log

        R = R.to(torch.float64)
        det = torch.linalg.det(R)
        if not bool(torch.isclose(det.abs(), torch.ones_like(det), atol=1e-6)):
            raise ValueError(f"irreps action: R is not orthogonal (det = {float(det):.6g})")
        improper = bool(det < 0)
        omega = so3_log(-R if improper else R)
        G = self._generators(torch.float64, R.device)
        D = torch.linalg.matrix_exp(torch.einsum("c,cij->ij", omega, G))
        if improper:
            signs = torch.cat([torch.full((mul * ir.dim,), float(ir.p), dtype=torch.float64)
                               for mul, ir in self.irreps]) if len(self.irreps) else torch.ones(0)
            D = D * signs.to(D)[:, None]
        return D

    def act(self, x, R, t=None, center=None):
        return self._back(self._last(x) @ self.D(R).to(x).T)

    def D_batched(self, R: torch.Tensor) -> torch.Tensor:
        """``D(R_i)`` for ``R [n, 3, 3]`` (proper or improper): ``[n, dim, dim]``, float64."""
        from ._groups import so3_log

        R = R.to(torch.float64)
        det = torch.linalg.det(R)
        sign = torch.where(det < 0, -1.0, 1.0).to(R)
        omega = so3_log(R * sign[:, None, None])
        G = self._generators(torch.float64, R.device)
        D = torch.linalg.matrix_exp(torch.einsum("nc,cij->nij", omega, G))
        ps = torch.cat([torch.full((mul * ir.dim,), float(ir.p), dtype=torch.float64)
                        for mul, ir in self.irreps]).to(R.device)
        # improper: multiply each irrep block by its parity p
        fac = torch.where(det[:, None] < 0, ps[None, :], torch.ones_like(ps)[None, :])
        return D * fac[:, :, None]

    def act_rows(self, x, R, t=None):
        D = self.D_batched(R).to(x)
        return self._back(torch.einsum("n...j,nij->n...i", self._last(x), D))

    def _generators(self, dtype, device):
        key = (dtype, device)
        if key not in self._gen_cache:
            from e3nn import o3

            blocks = []
            with default_dtype(torch.float64):  # e3nn builds the generators in the default dtype
                for mul, ir in self.irreps:
                    blocks.extend([o3.so3_generators(ir.l).to(torch.float64)] * mul)
            dim = self.irreps.dim
            G = torch.zeros(3, dim, dim, dtype=torch.float64)
            i = 0
            for g in blocks:
                d = g.shape[-1]
                G[:, i:i + d, i:i + d] = g
                i += d
            self._gen_cache[key] = G.to(dtype=dtype, device=device)
        return self._gen_cache[key]

    def infinitesimal(self, x, omega, v, center=None):
        G = self._generators(x.dtype, x.device)
        A = torch.einsum("kc,cij->kij", omega.to(x), G)
        return self._back(torch.einsum("...j,kij->k...i", self._last(x), A))

    def parity_sign(self):
        # inversion multiplies an irrep (l, p) by p (e3nn's p is the full parity, 1o has p = -1)
        ps = {ir.p for _, ir in self.irreps} if len(self.irreps) else {1}
        return ps.pop() if len(ps) == 1 else None


_REGISTRY: Dict[str, Rep] = {}


def register_rep(name: str, rep: Rep) -> None:
    """Register a representation under ``name`` (lower-case), usable wherever a representation name is taken."""
    if not isinstance(rep, Rep):
        raise TypeError(f"register_rep: expected a geolie.Rep instance, got {type(rep).__name__}")
    _REGISTRY[name.lower()] = rep


def known_reps():
    """Names accepted by :func:`as_rep` (besides e3nn irreps strings)."""
    return sorted(_REGISTRY)


for _n, _r in [
    ("scalar", ScalarRep()), ("invariant", ScalarRep()), ("vector", VectorRep()), ("cell", VectorRep()),
    ("pseudovector", PseudovectorRep()), ("point", PointRep()), ("tensor2", Tensor2Rep()),
    ("stress", Tensor2Rep()),
]:
    register_rep(_n, _r)


def as_rep(spec: Union[None, str, Rep, "object"], where: str = "representation") -> Rep:
    """Turn ``None``, a registered name, an e3nn ``Irreps`` (object or string) or a :class:`Rep` into a :class:`Rep`."""
    if spec is None:
        return _REGISTRY["scalar"]
    if isinstance(spec, Rep):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _REGISTRY:
            return _REGISTRY[key]
        try:
            return IrrepsRep(spec)
        except Exception:
            raise ValueError(
                f"{where}: unknown representation {spec!r}; expected one of {known_reps()}, an e3nn Irreps "
                f"string such as '8x0e+4x1o', or a geolie.Rep"
            ) from None
    try:
        from e3nn import o3

        if isinstance(spec, o3.Irreps):
            return IrrepsRep(spec)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{where}: cannot interpret {spec!r} as a representation")
