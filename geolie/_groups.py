r"""The groups SO(3) and SE(3): generators, exponential map, Haar sampling.

Conventions (used everywhere in geolie)
---------------------------------------
* Positions are rows: a point cloud ``pos`` has shape ``[N, 3]`` and a group element ``g = (R, t)`` acts as
  ``pos @ R.T + t``.
* The Lie algebra so(3) has the basis :math:`X_x, X_y, X_z` with :math:`(X_k)_{ij} = -\epsilon_{kij}`, so that
  :math:`\exp(\theta X_z)` is the counter-clockwise rotation by :math:`\theta` radians about :math:`z`.
  These are also e3nn's ``o3.so3_generators(1)``.
* se(3) coordinates are ``xi = (omega, v)`` with ``omega`` the rotation part (radians) and ``v`` the translation
  part (input length units), so the six generators are named ``rx ry rz tx ty tz``.
  :math:`\exp` of ``xi`` is the group exponential: ``R = exp(hat(omega))``, ``t = V(omega) v`` with
  :math:`V = I + \frac{1-\cos\theta}{\theta^2}\hat\omega + \frac{\theta-\sin\theta}{\theta^3}\hat\omega^2`.
  For a single generator (``xi = s e_k``) this is the pure rotation or the pure translation by ``s``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ["LieGroup", "SO3", "SE3", "hat", "vee", "so3_exp", "so3_log", "as_group"]


def hat(omega: torch.Tensor) -> torch.Tensor:
    r"""Map ``omega [..., 3]`` to the skew matrix :math:`\hat\omega = \sum_k \omega_k X_k` ``[..., 3, 3]``.

    :math:`\hat\omega v = \omega \times v`.
    """
    if omega.shape[-1] != 3:
        raise ValueError(f"hat: expected a trailing dimension of 3, got shape {tuple(omega.shape)}")
    x, y, z = omega.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2
    )


def vee(A: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` on the skew part: ``A [..., 3, 3] -> omega [..., 3]``."""
    return 0.5 * torch.stack(
        [A[..., 2, 1] - A[..., 1, 2], A[..., 0, 2] - A[..., 2, 0], A[..., 1, 0] - A[..., 0, 1]], -1
    )


def _sinc_terms(theta2: torch.Tensor):
    """Return ``sin(θ)/θ``, ``(1-cos θ)/θ²`` and ``(θ-sin θ)/θ³`` with Taylor series near 0 (θ² given)."""
    small = theta2 < 1e-6
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2**2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2**2 / 720, (1 - torch.cos(t)) / t2)
    c = torch.where(small, 1.0 / 6 - theta2 / 120 + theta2**2 / 5040, (t - torch.sin(t)) / (t2 * t))
    return a, b, c


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    r"""Rodrigues' formula: ``R = exp(hat(omega))`` for ``omega [..., 3]`` (radians), returns ``[..., 3, 3]``.

    :math:`R = I + \frac{\sin\theta}{\theta}\hat\omega + \frac{1-\cos\theta}{\theta^2}\hat\omega^2`, with series
    expansions near :math:`\theta = 0` so that the map is smooth (and differentiable) at the identity.
    """
    W = hat(omega)
    a, b, _ = _sinc_terms((omega * omega).sum(-1))
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(W.shape)
    return eye + a[..., None, None] * W + b[..., None, None] * (W @ W)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`so3_exp` on proper rotations: ``R [..., 3, 3] -> omega [..., 3]`` with ``|omega| <= π``.

    Goes through the unit quaternion (Shepperd's branch choice), ``omega = 2 atan2(|q_v|, q_w) q_v / |q_v|``,
    which is accurate at small angles (unlike ``acos`` of the trace) and near π.
    """
    m = R
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + 2 * m[..., 0, 0] - tr, m[..., 0, 1] + m[..., 1, 0],
                     m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 + 2 * m[..., 1, 1] - tr,
                     m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 + 2 * m[..., 2, 2] - tr], -1),
    ], -2)  # [..., 4, 4]: each row is 4 q_j q (for j = w, x, y, z)
    diag = torch.stack([1 + tr, 1 + 2 * m[..., 0, 0] - tr, 1 + 2 * m[..., 1, 1] - tr, 1 + 2 * m[..., 2, 2] - tr], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0).to(q)
    qv = q[..., 1:]
    s = qv.norm(dim=-1)
    angle = 2 * torch.atan2(s, q[..., 0])
    scale = torch.where(s > 1e-12, angle / s.clamp_min(1e-300), 2.0 / q[..., 0].clamp_min(1e-300))
    return qv * scale[..., None]


def _random_rotations(n: int, generator, dtype, device) -> torch.Tensor:
    """Haar-uniform rotations from uniformly distributed unit quaternions (Shoemake)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)
    return R.to(dtype=dtype, device=device)


class LieGroup:
    """A matrix Lie group acting on 3D space: SO(3) (``dim = 3``) or SE(3) (``dim = 6``).

    Use the module-level instances :data:`geolie.SO3` and :data:`geolie.SE3`.
    """

    def __init__(self, name: str, translations: bool):
        self.name = name
        self.has_translations = translations
        self.generator_names: Tuple[str, ...] = ("rx", "ry", "rz") + (("tx", "ty", "tz") if translations else ())
        self.dim = len(self.generator_names)

    def __repr__(self) -> str:
        return f"geolie.{self.name}"

    def __reduce__(self):
        return (as_group, (self.name,))

    # -- algebra -----------------------------------------------------------------------------------------------
    def algebra_basis(self, dtype=torch.float64, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(omega [dim, 3], v [dim, 3])``: rotation and translation parts of each generator, in order."""
        eye = torch.eye(3, dtype=dtype, device=device)
        zero = torch.zeros(3, 3, dtype=dtype, device=device)
        if not self.has_translations:
            return eye, zero
        return torch.cat([eye, zero]), torch.cat([zero, eye])

    def infinitesimal(self, rep, v: torch.Tensor, center=None) -> torch.Tensor:
        """``dρ(X_k) v`` for every generator, ``[dim, *v.shape]`` (``rep``: a :class:`geolie.Rep`)."""
        omega, trans = self.algebra_basis(dtype=v.dtype, device=v.device)
        return rep.infinitesimal(v, omega, trans, center)

    def generators(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """The generators as matrices: ``[3, 3, 3]`` skew matrices for SO(3), ``[6, 4, 4]`` homogeneous for SE(3).

        SE(3) matrices act on homogeneous column vectors ``(x, 1)``: ``[[hat(omega), v], [0, 0]]``.
        """
        omega, v = self.algebra_basis(dtype, device)
        W = hat(omega)
        if not self.has_translations:
            return W
        G = torch.zeros(self.dim, 4, 4, dtype=dtype, device=device)
        G[:, :3, :3] = W
        G[:, :3, 3] = v
        return G

    # -- group -------------------------------------------------------------------------------------------------
    def exp(self, xi: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Exponential map from algebra coordinates ``xi [..., dim]``.

        SO(3): returns ``R [..., 3, 3]``. SE(3): returns ``(R [..., 3, 3], t [..., 3])`` (see module docstring).
        """
        xi = torch.as_tensor(xi)
        if not xi.is_floating_point():
            xi = xi.to(torch.get_default_dtype())
        if xi.shape[-1] != self.dim:
            raise ValueError(f"{self.name}.exp: expected xi with trailing dimension {self.dim}, got {tuple(xi.shape)}")
        omega = xi[..., :3]
        R = so3_exp(omega)
        if not self.has_translations:
            return R
        W = hat(omega)
        _, b, c = _sinc_terms((omega * omega).sum(-1))
        eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(W.shape)
        V = eye + b[..., None, None] * W + c[..., None, None] * (W @ W)
        t = (V @ xi[..., 3:, None])[..., 0]
        return R, t

    def random(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        *,
        box: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``n`` Haar-uniform rotations ``[n, 3, 3]``; SE(3) adds translations uniform in ``[-box, box]^3``."""
        if n < 0:
            raise ValueError(f"{self.name}.random: n must be >= 0, got {n}")
        R = _random_rotations(n, generator, dtype, device)
        if not self.has_translations:
            return R
        t = (2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1) * box
        return R, t.to(dtype=dtype, device=device)


SO3 = LieGroup("SO3", translations=False)
SE3 = LieGroup("SE3", translations=True)


class Directions(LieGroup):
    r"""The one-parameter subgroups of ``base`` along given algebra directions: ``C [m, base.dim]``, row ``j`` the
    generator ``Y_j = Σ_k C_jk X_k``.

    The engine differentiates along ``Y_j`` exactly as along the base generators (``L`` is linear in the generator:
    ``L_{Y_j} = Σ_k C_jk L_{X_k}``); ``exp(xi) = base.exp(xi @ C)``; finite checks (``random``) act with the whole
    base group. :func:`random_directions` draws the audit's ``--estimator random`` rows: one unit rotation axis
    ``n`` (uniform on the sphere) and, for SE(3), one unit translation direction ``m``, named ``r~`` and ``t~``.
    Since ``E[n nᵀ] = I/3``, ``E‖L_{n·X} y‖² = (1/3) Σ_k ‖L_{X_k} y‖²``: the squared isotropic norm, unbiased.
    """

    def __init__(self, base: LieGroup, C: torch.Tensor, names: Tuple[str, ...]):
        C = torch.as_tensor(C, dtype=torch.float64)
        if C.dim() != 2 or C.shape[1] != base.dim or C.shape[0] != len(names):
            raise ValueError(f"Directions: C must be [{len(names)}, {base.dim}], got {list(C.shape)}")
        self.base, self.C = base, C
        self.name = base.name
        self.has_translations = base.has_translations
        self.generator_names = tuple(names)
        self.dim = len(names)

    def __repr__(self) -> str:
        return f"geolie.Directions({self.base.name}, {self.C.tolist()})"

    def __reduce__(self):
        return (Directions, (self.base, self.C, self.generator_names))

    def algebra_basis(self, dtype=torch.float64, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        omega, v = self.base.algebra_basis(torch.float64)
        return (self.C @ omega).to(dtype=dtype, device=device), (self.C @ v).to(dtype=dtype, device=device)

    def exp(self, xi: torch.Tensor):
        xi = torch.as_tensor(xi)
        return self.base.exp(xi.to(torch.float64) @ self.C)

    def random(self, n: int, generator=None, **kw):
        return self.base.random(n, generator, **kw)


class PerStructureDirections(Directions):
    r"""Each structure of a batch along its own directions: ``C [B, m, base.dim]`` and ``batch [N]`` (which atom
    belongs to which structure). The tangent of a per-atom tensor ``v [N, ...]`` along direction ``j`` is
    ``Σ_k C[batch[a], j, k] dρ(X_k) v_a`` row by row, of a per-structure tensor ``[B, ...]`` the same with row ``b``'s
    own coefficients: since each structure's outputs depend on its own atoms only, every structure gets exactly its
    Lie derivative along its own directions, as if it were audited alone. Finite group elements along such
    directions are not one element of the group: :meth:`exp` refuses (finite differences need one structure per
    call)."""

    def __init__(self, base: LieGroup, C: torch.Tensor, batch: torch.Tensor, names: Tuple[str, ...]):
        C = torch.as_tensor(C, dtype=torch.float64)
        if C.dim() != 3 or C.shape[2] != base.dim or C.shape[1] != len(names):
            raise ValueError(f"PerStructureDirections: C must be [B, {len(names)}, {base.dim}], got {list(C.shape)}")
        super().__init__(base, C[0], names)
        self.C_all, self.batch = C, batch

    def __reduce__(self):
        return (PerStructureDirections, (self.base, self.C_all, self.batch, self.generator_names))

    def algebra_basis(self, dtype=torch.float64, device=None):
        raise ValueError("PerStructureDirections: each structure has its own directions; there is no common basis")

    def exp(self, xi):
        raise ValueError("finite differences along per-structure directions need one structure per call "
                         "(batch_size=1)")

    def infinitesimal(self, rep, v: torch.Tensor, center=None) -> torch.Tensor:
        omega, trans = self.base.algebra_basis(dtype=v.dtype, device=v.device)
        T = rep.infinitesimal(v, omega, trans, center)  # [d, *v.shape]
        B, n = self.C_all.shape[0], self.batch.shape[0]
        if v.dim() >= 1 and v.shape[0] == n:
            coef = self.C_all.to(v.device)[self.batch.to(v.device)]
        elif v.dim() >= 1 and v.shape[0] == B:
            coef = self.C_all.to(v.device)
        else:
            raise ValueError(f"PerStructureDirections: a tensor of shape {list(v.shape)} is neither per atom ({n} "
                             f"rows) nor per structure ({B} rows)")
        out = torch.einsum("ajk,kar->jar", coef.to(T.dtype), T.reshape(T.shape[0], v.shape[0], -1))
        return out.reshape((self.dim,) + tuple(v.shape))


def random_directions(base: LieGroup, generator: Optional[torch.Generator] = None) -> Directions:
    """One uniformly random rotation axis (and translation direction for SE(3)); see :class:`Directions`."""
    d = base.dim
    n = torch.randn(3, generator=generator, dtype=torch.float64)
    rows = [torch.cat([n / n.norm(), torch.zeros(d - 3, dtype=torch.float64)])]
    names = ["r~"]
    if base.has_translations:
        m = torch.randn(3, generator=generator, dtype=torch.float64)
        rows.append(torch.cat([torch.zeros(3, dtype=torch.float64), m / m.norm()]))
        names.append("t~")
    return Directions(base, torch.stack(rows), tuple(names))


def as_group(group: Union[str, LieGroup]) -> LieGroup:
    """Accept a :class:`LieGroup` or one of the names ``"SO3"``, ``"SE3"`` (case-insensitive)."""
    if isinstance(group, LieGroup):
        return group
    if isinstance(group, str):
        key = group.upper().replace("(", "").replace(")", "")
        if key == "SO3":
            return SO3
        if key == "SE3":
            return SE3
    raise ValueError(f"unknown group {group!r}: expected geolie.SO3, geolie.SE3, 'SO3' or 'SE3'")
