"""TorchSim models through ``torchsim:`` and ``ModelInterface`` objects (``geolie.adapters.torchsim``)."""
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import geolie
from geolie._verdict import AT_FLOOR, BREAKS, row_verdicts
from geolie.adapters import Structure, load_model
from planted_models import SideEffect

ts = pytest.importorskip("torch_sim")

MOLS = [molecule("CH4"), molecule("H2O"), molecule("CH3OH")]
for k, m in enumerate(MOLS):
    m.positions = m.positions * 1.6 + np.random.default_rng(k).normal(scale=0.02, size=m.positions.shape)


def _argon():
    ar = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    ar.rattle(0.05, seed=0)
    return ar


def test_lennard_jones_molecules_at_the_float64_floor_batched():
    """TorchSim's Lennard-Jones on molecules, through ``torchsim:`` (a factory taking dtype=, so floors are measured
    against float32), batched in one SimState: every figure at floor, the same rows as one structure per call. Its
    forces are the interface's own, and the conservativeness check finds them exactly twice the energy's gradient
    (torch-sim-atomistic 0.3.0, pbc=False: ``|F + dE/dx| / |F| = 0.5``, closed form of a factor 2)."""
    pot = load_model("torchsim:geolie.adapters.torchsim:lennard_jones")
    assert pot.dtypes == (torch.float32, torch.float64)
    rep = geolie.audit(pot, MOLS, dtype=torch.float64, n_finite=2, progress=False, threshold=1e-12, floor_sample=0)
    one = geolie.audit(pot, MOLS, dtype=torch.float64, n_finite=2, progress=False, batch_size=1, floor_sample=0)
    gap = rep.conservative_aggregates()["force_gap_rel"]
    assert gap["median"] == pytest.approx(0.5, abs=1e-12) and gap["max"] == pytest.approx(0.5, abs=1e-12)
    assert rep.verdict() == AT_FLOOR, rep.table()
    assert all(r["outputs"]["forces"]["source"] == "model" for r in rep.rows)
    assert rep.rows[0].get("batched", 1) > 1
    for a, b in zip(rep.rows, one.rows):
        np.testing.assert_allclose(a["outputs"]["forces"]["abs"], b["outputs"]["forces"]["abs"], atol=1e-9)


def test_lennard_jones_cells_stress_audited_and_the_rotated_cell_finding():
    """Periodic cells (stress included, TorchSim's column-vector cells converted): translations and permutations at
    the float64 floor, but torch-sim 0.3.0's pair models change their energy when positions and cell are rotated
    together (Ar fcc 2x2x2: -0.182 eV against -0.106 eV), which TorchSim's own ``atoms_to_state`` confirms: the
    audit says BREAKS for rotations, the finding and not an artefact of the adapter."""
    pot = load_model("torchsim:geolie.adapters.torchsim:lennard_jones")
    ar = _argon()
    rep = geolie.audit(pot, [ar], dtype=torch.float64, n_finite=2, progress=False, threshold=1e-6)
    row = rep.rows[0]
    assert {"energy", "forces", "stress", "stress[l=0]", "stress[l=2]"} <= set(row["outputs"])
    fin = row["finite_floor"]
    for out in ("energy", "forces", "stress"):
        assert fin[out]["translation"]["verdict"] == AT_FLOOR and fin[out]["permutation"]["verdict"] == AT_FLOOR
        assert fin[out]["rotation"]["verdict"] != AT_FLOOR
    assert row_verdicts(row, 1e-6)["energy"]["lie"] == BREAKS
    m = pot.model_for(torch.float64)
    b = ar.copy()
    b.rotate(37, (1, 2, 3), rotate_cell=True)
    e = [float(m(ts.io.atoms_to_state(a, torch.device("cpu"), torch.float64))["energy"]) for a in (ar, b)]
    assert abs(e[0] - e[1]) > 1e-2 * abs(e[0])  # TorchSim's own conversion shows the same break


class LabFrameLJ(torch.nn.Module):
    """A ModelInterface: Morse pairs plus ``ε Σ_i z_i²`` (a lab-frame term), forces by autograd (create_graph)."""

    eps = 1e-4

    def __new__(cls, *a, **k):
        from torch_sim.models.interface import ModelInterface

        class _M(ModelInterface):
            def __init__(self, dtype=torch.float64, device=None):
                super().__init__()
                self._dtype, self._device = dtype, torch.device("cpu")
                self._compute_forces, self._compute_stress = True, False

            def forward(self, state, **kw):
                pos = state.positions
                p = pos if pos.requires_grad else pos + torch.zeros((), dtype=pos.dtype, requires_grad=True)
                b = state.system_idx
                i, j = torch.triu_indices(len(p), len(p), 1)
                same = b[i] == b[j]
                i, j = i[same], j[same]
                r = (p[j] - p[i]).norm(dim=-1)
                n = int(b.max()) + 1
                e = torch.zeros(n, dtype=p.dtype).index_add(0, b[i], 0.2 * (1 - torch.exp(-1.5 * (r - 1.1))) ** 2)
                e = e + torch.zeros(n, dtype=p.dtype).index_add(0, b, cls.eps * p[:, 2] ** 2)
                f = -torch.autograd.grad(e.sum(), p, create_graph=True)[0]
                return {"energy": e, "forces": f}

        return _M(*a, **k)


def lab_frame(dtype=torch.float64, device=None):
    return LabFrameLJ(dtype=dtype, device=device)


def test_planted_lab_frame_term_at_its_closed_form():
    """A ModelInterface object and a factory: the planted ``ε Σ z²`` gives ``L_{tz} F = −2 ε ê_z`` on every atom, so
    ``‖L_{tz} F‖ = 2 ε √N`` (closed form), BREAKS; an object runs in its own dtype only and says so."""
    from geolie.adapters.torchsim import TorchSimAdapter

    pot = TorchSimAdapter(factory=lab_frame, name="lab-frame")
    st = MOLS[2]
    rep = geolie.audit(pot, [st], dtype=torch.float64, progress=False, threshold=1e-8)
    f = rep.rows[0]["outputs"]["forces"]
    k = rep.generator_names.index("tz")
    assert f["abs"][k] == pytest.approx(2 * LabFrameLJ.eps * np.sqrt(len(st)), rel=1e-9)
    assert row_verdicts(rep.rows[0], 1e-8)["forces"]["lie"] == BREAKS
    obj = load_model(lab_frame(torch.float64))
    assert isinstance(obj, TorchSimAdapter) and obj.dtypes == (torch.float64,)
    rep2 = geolie.audit(obj, [st], dtype=torch.float64, progress=False)
    assert rep2.rows[0]["outputs"]["forces"]["abs"][k] == pytest.approx(f["abs"][k], rel=1e-12)
    assert any("runs in the dtype it was built with" in n for n in rep2.notes())


def _same_route(direct, wrapped, n_finite: int):
    """The package adapter and its TorchSim wrapper on the same molecules: the same energies and forces to 1e-10, and
    the same verdict (at floor); returns both audits."""
    import warnings

    for st in (Structure.from_atoms(m) for m in MOLS[:2]):
        a, b = direct.evaluation(st, torch.float64), wrapped.evaluation(st, torch.float64)
        ya, yb = a.fn(*a.inputs), b.fn(*b.inputs)
        for k in ("energy", "forces"):
            np.testing.assert_allclose(yb[k].detach().numpy(), ya[k].detach().reshape(yb[k].shape).numpy(),
                                       rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra = geolie.audit(direct, MOLS[:2], dtype=torch.float64, n_finite=n_finite, progress=False)
        rb = geolie.audit(wrapped, MOLS[:2], dtype=torch.float64, n_finite=n_finite, progress=False)
    assert ra.verdict() == rb.verdict() == AT_FLOOR
    return ra, rb


def test_mace_through_torchsim_equals_the_mace_route(tmp_path):
    """A random-init MACE through TorchSim's MaceModel wrapper and through ``mace:``: the same energies and forces to
    float64 rounding on molecules, both at floor. The wrapper returns detached outputs, so that route is audited by
    finite differences (said in the notes) and agrees with the adapter's exact derivatives within their error
    estimate: prefer ``mace:`` (exact AD, floors against float32)."""
    pytest.importorskip("mace.modules")
    from torch_sim.models.mace import MaceModel

    from test_adapters_packages import _mace_model
    from geolie.adapters.torchsim import TorchSimAdapter

    path = tmp_path / "m.model"
    torch.save(_mace_model(torch.float64), path)
    direct = load_model(f"mace:{path}")
    wrapped = TorchSimAdapter(factory=lambda dtype, device=None: MaceModel(torch.load(path, weights_only=False),
                                                                           dtype=dtype, compute_stress=False),
                              name="mace-torchsim")
    ra, rb = _same_route(direct, wrapped, n_finite=0)
    # MaceModel returns detached outputs: the wrapper's route can only use finite differences, and says why
    assert all(r["method"].startswith("fd") for r in rb.rows) and not any(r["method"].startswith("fd") for r in ra.rows)
    assert any("not connected to the inputs' autograd graph" in n for n in rb.notes())
    for x, y in zip(ra.rows, rb.rows):  # the same Lie derivatives within the finite differences' error estimate
        fx, fy = x["outputs"]["forces"], y["outputs"]["forces"]
        assert all(abs(a - b) <= 2 * fl for a, b, fl in zip(fx["abs"], fy["abs"], fy["floor"]))


def test_weights_routes_do_not_unpickle_code(tmp_path, capsys):
    """``orb:ARCH:WEIGHTS`` takes a state dict: a planted pickle whose loading has a side effect is refused with
    one line and the side effect never happens; ``geolie models`` says that pickled model files run code."""
    from geolie.adapters._graph import ModelFileError, weights_only_load
    from geolie.cli import main

    flag = tmp_path / "flag"
    bad = tmp_path / "weights.ckpt"
    torch.save({"w": torch.zeros(2), "evil": SideEffect(str(flag))}, bad)
    with pytest.raises(ModelFileError, match="not a plain weights file"):
        weights_only_load(str(bad), "orb")
    assert not flag.exists()
    if __import__("importlib").util.find_spec("orb_models") is not None:
        with pytest.raises(ModelFileError, match="not a plain weights file"):
            load_model(f"orb:orb-v3-direct-20-omat:{bad}")
        assert not flag.exists()
    torch.load(bad, weights_only=False)  # the plant works: full unpickling would have run it
    assert flag.exists()
    assert main(["models"]) == 0
    assert "loading is executing" in capsys.readouterr().out


from test_adapters_packages import nequip_files  # noqa: E402,F401 - the NequIP checkpoints fixture


def test_nequip_through_torchsim_equals_the_nequip_route(nequip_files):  # noqa: F811
    """A random-init NequIP checkpoint through NequIP's own TorchSim wrapper (``NequIPTorchSimCalc``) and through
    ``nequip:``: the same energies and forces to float64 rounding on molecules, and the same verdict."""
    from nequip.integrations.torchsim import NequIPTorchSimCalc

    from geolie._torch_utils import default_dtype
    from geolie.adapters.nequip import nequip_global_state
    from geolie.adapters.torchsim import TorchSimAdapter

    path = nequip_files["float64"]
    with default_dtype(torch.float64), nequip_global_state():
        calc = NequIPTorchSimCalc._from_saved_model(path, device="cpu")
    wrapped, direct = TorchSimAdapter(calc, name="nequip-torchsim"), load_model(f"nequip:{path}")
    _same_route(direct, wrapped, n_finite=1)
