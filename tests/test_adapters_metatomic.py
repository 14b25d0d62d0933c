"""Exported metatomic models through ``metatomic:PATH`` (``geolie.adapters.metatomic``)."""
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import geolie
from geolie._verdict import AT_FLOOR, BREAKS, row_verdicts
from geolie.adapters import load_model
from geolie.adapters._graph import ModelFileError
from planted_models import SideEffect

mta = pytest.importorskip("metatomic.torch")
pytest.importorskip("vesin.metatomic")
from metatensor.torch import Labels, TensorBlock, TensorMap  # noqa: E402

LAB = 1e-4


class PairModel(torch.nn.Module):
    """A smooth Morse pair energy over metatomic's half neighbour list (cutoff 4 Å, cosine switch), plus
    ``lab · Σ_i z_i²`` (a planted lab-frame term when ``lab`` > 0)."""

    def __init__(self, lab: float = 0.0):
        super().__init__()
        self.nl = mta.NeighborListOptions(cutoff=4.0, full_list=False, strict=True)
        self.lab = lab

    def requested_neighbor_lists(self) -> List[mta.NeighborListOptions]:
        return [self.nl]

    def forward(self, systems: List[mta.System], outputs: Dict[str, mta.ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        energies = []
        for s in systems:
            d = s.get_neighbor_list(self.nl).values.reshape(-1, 3)
            r = torch.sqrt((d ** 2).sum(-1))
            switch = 0.5 + 0.5 * torch.cos(3.141592653589793 * r / 4.0)
            e = (0.2 * (1 - torch.exp(-1.5 * (r - 2.2))) ** 2 * switch).sum()
            energies.append(e + self.lab * (s.positions[:, 2] ** 2).sum())
        block = TensorBlock(values=torch.stack(energies).reshape(-1, 1),
                            samples=Labels("system", torch.arange(len(systems)).reshape(-1, 1)),
                            components=[], properties=Labels("energy", torch.tensor([[0]])))
        return {"energy": TensorMap(Labels("_", torch.tensor([[0]])), [block])}


def export(path, lab: float = 0.0) -> str:
    caps = mta.ModelCapabilities(outputs={"energy": mta.ModelOutput(quantity="energy", unit="eV", per_atom=False)},
                                 atomic_types=[1, 6, 8, 29], interaction_range=4.0, length_unit="angstrom",
                                 supported_devices=["cpu"], dtype="float64")
    mta.AtomisticModel(PairModel(lab).eval(), mta.ModelMetadata(), caps).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import warnings

    d = tmp_path_factory.mktemp("metatomic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"exact": export(d / "pair.pt"), "lab": export(d / "lab.pt", LAB)}


MOLS = [molecule("CH3OH"), molecule("H2O")]


def _cell():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=3)
    return cu


def test_exported_exact_model_at_floor_molecules_and_cell(files):
    """An exact pair model exported as a metatomic AtomisticModel: every figure at its floor on molecules and on a
    periodic cell (stress by geolie's strain derivative, neighbour lists served by vesin); units and dtype said."""
    pot = load_model(f"metatomic:{files['exact']}")
    assert pot.dtypes == (torch.float64,) and pot.units == {"length": "angstrom", "energy": "eV"}
    rep = geolie.audit(pot, MOLS + [_cell()], dtype=torch.float64, n_finite=2, progress=False, threshold=1e-10)
    assert rep.verdict() == AT_FLOOR, rep.table()
    assert "stress" in rep.rows[-1]["outputs"]
    assert any("units: length angstrom, energy eV" in n for n in rep.notes())


def test_planted_break_at_its_closed_form(files):
    """``lab · Σ z²`` gives forces ``−2 lab z_i ê_z``: ``‖L_{tz} F‖ = 2 lab √N`` (closed form), BREAKS."""
    rep = geolie.audit(f"metatomic:{files['lab']}", MOLS[:1], dtype=torch.float64, progress=False, threshold=1e-8)
    f = rep.rows[0]["outputs"]["forces"]
    k = rep.generator_names.index("tz")
    assert f["abs"][k] == pytest.approx(2 * LAB * np.sqrt(len(MOLS[0])), rel=1e-10)
    assert row_verdicts(rep.rows[0], 1e-8)["forces"]["lie"] == BREAKS


def test_bad_files_give_one_line_errors_and_nothing_is_unpickled(tmp_path):
    """A missing file, a corrupt one, another package's file (a torch.save'd module) and a planted pickle with a
    side effect: one ModelFileError line each, and the planted side effect never runs (metatomic's own loader reads
    TorchScript, it does not unpickle Python objects)."""
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(f"metatomic:{tmp_path / 'missing.pt'}")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match="is not an exported metatomic model"):
        load_model(f"metatomic:{bad}")
    other = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), other)
    with pytest.raises(ModelFileError, match="is not an exported metatomic model"):
        load_model(f"metatomic:{other}")
    flag = tmp_path / "flag"
    planted = tmp_path / "planted.pt"
    torch.save({"evil": SideEffect(str(flag))}, planted)
    with pytest.raises(ModelFileError, match="is not an exported metatomic model"):
        load_model(f"metatomic:{planted}")
    assert not flag.exists()
