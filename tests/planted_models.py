"""Models for the audit tests: a planted symmetry break, NaN outputs, a wrong factory, an external field."""
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from geolie.models import PairMLPPotential


class PlantedField(torch.nn.Module):
    """An invariant pair potential plus a module that reads absolute coordinates (the planted break)."""

    def __init__(self):
        super().__init__()
        self.pair = PairMLPPotential()
        self.field = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(self.field.weight, 0.05)

    def forward(self, z, pos, batch=None):
        return self.pair(z, pos, batch) + self.field(pos).sum()


def planted():
    return PlantedField()


class NaNModel(torch.nn.Module):
    def forward(self, z, pos, batch=None):
        return (pos.sum() * float("nan")).reshape(1)


def nan_model():
    return NaNModel()


def not_a_model():
    return {"weights": [1, 2, 3]}


FIELD = np.array([0.3, -0.2, 0.5])


class ExternalField(Calculator):
    """E = -Σ q_i E·x_i with q = 1 for H, -1 otherwise: forces q E. Not rotation or translation invariant."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        q = np.where(atoms.numbers == 1, 1.0, -1.0)
        self.results = {"energy": float(-(q[:, None] * atoms.positions * FIELD).sum()),
                        "forces": q[:, None] * FIELD[None, :]}


def external_field():
    return ExternalField()


class OrientationBiasedClassifier(torch.nn.Module):
    """A PointNet-like classifier on raw centred coordinates: learns (here: has) an orientation bias."""

    def __init__(self, classes=12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W1 = torch.nn.Parameter(torch.randn(3, 32, generator=g) / 2)
        self.W2 = torch.nn.Parameter(torch.randn(32, classes, generator=g) / 6)

    def forward(self, pos):
        h = torch.tanh((pos - pos.mean(0)) @ self.W1.to(pos))
        return h.max(0).values @ self.W2.to(pos)


class InvariantClassifier(torch.nn.Module):
    """Logits from the sorted-free histogram of distances to the centroid: exactly invariant."""

    def forward(self, pos):
        r = (pos - pos.mean(0)).norm(dim=-1)
        centers = torch.linspace(0, 1.5, 12, dtype=pos.dtype)
        return torch.exp(-((r[:, None] - centers) / 0.2) ** 2).mean(0)


def biased_classifier():
    return OrientationBiasedClassifier()


def invariant_classifier():
    return InvariantClassifier()


class SideEffect:
    """A planted pickle: unpickling it calls :func:`touch`, which writes ``path`` (loading it is executing it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (touch, (self.path,))


def touch(path):
    open(path, "w").write("executed")
    return {}
