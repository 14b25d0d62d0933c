"""Planted models with closed-form truth for the truth matrix (tests/test_truth_matrix.py).

Each is a Morse pair potential (exactly invariant: it reads pair distances only) plus, for the broken ones, one
planted term whose size is known in closed form:

* :class:`Morse`: exact (every figure at floor, in both dtypes);
* :class:`GlobalBreak`: ``+ ε Σ_i z_i²`` (a lab-frame harmonic well along z), ``ε`` = 1e-5 by default: a smooth
  break of every rotation about x and y and of translations along z, relative size 1e-5 to 1e-4 on energy and forces
  (ten times the float32 floors of finite checks; ``GlobalBreak(1e-7)``, ~1e-6 relative, is resolved in float32 by
  the Lie derivative alone, whose float32 floor is ~1e-7);
* :class:`YBond` (``tests/hunt_models.YAlignedEdge`` on a Morse base): a bump on bonds within a few σ = 0.01 rad
  of the y axis, zero to far below rounding elsewhere (exp(−100) at 0.1 rad): every random orientation is exact,
  the hunt finds relative errors of order 1;
* :class:`BiasedForces`: direct forces ``−∇E + b`` with a constant bias vector ``|b|`` = 1e-3 eV/Å: rotations
  break the forces by ``|b − R b|`` (the Lie derivative ``−X b``), the energy is exact;
* :class:`Float32Basis`: pair distances read through a rotation matrix ``Q`` held as a plain float32 attribute
  (``Module.to`` does not cast it): ``|Q d|`` equals ``|d|`` only to float32 rounding, so the float64 copy's
  arithmetic is bounded by float32 constants and its figures sit at that (unscaled) floor;
* :class:`NoisyForces`: direct forces ``−∇E`` plus fresh Gaussian noise of relative size 1e-5 at every call (a
  non-deterministic model): repeated calls differ (``repeat`` above floor); everything else is at its floor, which
  includes that noise.
"""
import math

import torch

D, A, R0 = 0.2, 1.5, 1.1


def _pairs(pos, batch):
    n = pos.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=pos.device)
    if batch is not None:
        same = batch[i] == batch[j]
        i, j = i[same], j[same]
    return i, j


def _energy(pairs_e, i, batch, n_struct, like):
    """Per-structure sums of pair energies (``[B]``; ``[1]`` without a batch)."""
    b = torch.zeros_like(i) if batch is None else batch[i]
    return torch.zeros(n_struct, dtype=like.dtype, device=like.device).index_add(0, b, pairs_e)


def _n_struct(batch):
    return 1 if batch is None else int(batch.max()) + 1


class Morse(torch.nn.Module):
    """``E = Σ_{i<j} D (1 − exp(−a (r_ij − r0)))²``: exactly invariant under rotations, translations, permutations."""

    def pair_distances(self, pos, i, j):
        return (pos[j] - pos[i]).norm(dim=-1)

    def energy(self, pos, batch):
        i, j = _pairs(pos, batch)
        r = self.pair_distances(pos, i, j)
        return _energy(D * (1 - torch.exp(-A * (r - R0))) ** 2, i, batch, _n_struct(batch), pos)

    def forward(self, z, pos, batch=None):
        return self.energy(pos, batch)


class GlobalBreak(Morse):
    """Morse ``+ ε Σ_i z_i²``: a smooth break everywhere (closed form: ``F_extra = −2 ε z_i ê_z``)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, z, pos, batch=None):
        e = self.energy(pos, batch)
        b = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device) if batch is None else batch
        return e + torch.zeros_like(e).index_add(0, b, self.eps * pos[:, 2] ** 2)


class AtomWells(Morse):
    """Morse ``+ ε Σ_{i ∈ atoms} z_i²`` (``i``: the index within each structure): a lab-frame well on chosen atoms
    only, so the forces break on those atoms and nowhere else (closed form: ``F_i,extra = −2 ε z_i ê_z``; the
    per-atom Lie derivative of the other atoms' forces is zero). For ``report.html``'s coloured atoms."""

    def __init__(self, atoms=(0, 3), eps: float = 1e-3):
        super().__init__()
        self.atoms, self.eps = tuple(atoms), eps

    def forward(self, z, pos, batch=None):
        e = self.energy(pos, batch)
        b = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device) if batch is None else batch
        start = torch.cumsum(torch.bincount(b), 0) - torch.bincount(b)
        local = torch.arange(pos.shape[0], device=pos.device) - start[b]
        mask = torch.zeros_like(local, dtype=torch.bool)
        for a in self.atoms:
            mask |= local == a
        return e + torch.zeros_like(e).index_add(0, b[mask], self.eps * pos[mask, 2] ** 2)


class YBond(Morse):
    """Morse ``+ Σ_bonds exp(−(1 − (û·ŷ)²)/σ²)`` over pairs closer than 1.6 Å (σ = 0.01): a break only near one
    orientation per bond."""

    sigma = 0.01

    def forward(self, z, pos, batch=None):
        i, j = _pairs(pos, batch)
        d = pos[j] - pos[i]
        r2 = (d ** 2).sum(-1)
        spike = torch.exp(-(1 - d[:, 1] ** 2 / r2) / self.sigma ** 2) * (r2 < 1.6 ** 2)
        return self.energy(pos, batch) + _energy(spike, i, batch, _n_struct(batch), pos)


BIAS = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) / math.sqrt(5.25) * 1e-3


class BiasedForces(Morse):
    """Direct forces ``−∇E + b``, ``|b|`` = 1e-3 (closed form: the force Lie derivative along ``X_k`` is ``−X_k b``)."""

    def forward(self, z, pos, batch=None):
        p = pos if pos.requires_grad else pos + torch.zeros((), dtype=pos.dtype, requires_grad=True)
        e = self.energy(p, batch)
        f = -torch.autograd.grad(e.sum(), p, create_graph=True)[0]
        return {"energy": e, "forces": f + BIAS.to(f)}


class Float32Basis(Morse):
    """Pair distances ``|Q d|`` through a rotation ``Q`` kept as a plain float32 attribute (not cast by ``.to``)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        self.Q = q.float()  # a plain attribute: Module.to leaves it in float32

    def pair_distances(self, pos, i, j):
        return ((pos[j] - pos[i]) @ self.Q.to(pos).T).norm(dim=-1)


class NoisyForces(Morse):
    """Direct forces ``−∇E`` plus fresh noise of relative size ``sigma`` at every call (not deterministic)."""

    sigma = 1e-5

    def __init__(self):
        super().__init__()
        self.rng = torch.Generator().manual_seed(11)  # fresh noise at every call, the same sequence in every test run

    def forward(self, z, pos, batch=None):
        p = pos if pos.requires_grad else pos + torch.zeros((), dtype=pos.dtype, requires_grad=True)
        e = self.energy(p, batch)
        f = -torch.autograd.grad(e.sum(), p, create_graph=True)[0]
        scale = f.detach().norm() / f.numel() ** 0.5  # the RMS force component: the same at every orientation
        noise = torch.randn(f.shape, generator=self.rng, dtype=f.dtype).to(f.device) * self.sigma * scale
        return {"energy": e, "forces": f + noise}


MODELS = {"exact": Morse, "global-break": GlobalBreak, "y-bond": YBond, "biased-forces": BiasedForces,
          "float32-constants": Float32Basis, "noisy": NoisyForces}


# no-argument factories for ``--model truth_models:make_<name>`` (the classes themselves)
make_exact, make_global_break, make_y_bond = Morse, GlobalBreak, YBond
make_biased_forces, make_float32_constants, make_noisy = BiasedForces, Float32Basis, NoisyForces


class FlipFrame(torch.nn.Module):
    """``E = Σ_i z_i (x_i − c)·v₁`` with ``v₁`` the principal axis of largest variance, its sign fixed by ``v₁[0] > 0``
    (a lab-frame rule): invariant near every orientation (zero Lie derivative), but a finite rotation that turns
    ``v₁``'s x component negative flips the energy's sign. Only finite checks see it."""

    def forward(self, z, pos, batch=None):
        xc = pos - pos.mean(0)
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        v = vecs[:, -1]
        v = v * torch.sign(v[0])
        return (z.to(pos) * (xc @ v)).sum().reshape(1)


make_flip_frame = FlipFrame
