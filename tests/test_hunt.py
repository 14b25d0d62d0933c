"""geolie.hunt: planted breaks at special orientations (found where random rotations miss them), a hard cutoff
(reported as a discontinuity with the pair at the cutoff), exactly equivariant models (at their floor), determinism
and bounded cost, and the audit/CLI integration."""
import os
import sys

import numpy as np
import pytest
import torch

import geolie
from geolie.adapters import Structure, TorchAdapter

sys.path.insert(0, os.path.dirname(__file__))
from hunt_models import HardCutoffPairs, YAlignedEdge  # noqa: E402

MOL = geolie.data.load("xtb-md/ethanol", "test")[0]


def test_y_aligned_edge_break_is_found_where_random_rotations_miss_it(tmp_path):
    model = YAlignedEdge()
    fin = geolie.finite_equivariance_error(TorchAdapter(model).evaluation(Structure.from_atoms(MOL), torch.float64),
                                           group="SO3", n=16, generator=torch.Generator().manual_seed(0))
    random16 = fin.errors["energy"]["rotation"]["max_rel"]
    res = geolie.hunt(model, MOL, out_dir=str(tmp_path))
    e = res.to_dict()["outputs"]["energy"]
    assert e["worst_error"] >= 100 * max(random16, e["random_error"]) and e["worst_error"] > 0.1
    assert not e["at_floor"] and e["discontinuous"] is None  # a sharp but smooth break
    R = np.array(e["rotation"])
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.linalg.det(R) == pytest.approx(1.0)
    # at the worst orientation a bond is aligned with y (within the spike's width)
    x = MOL.positions @ R.T
    d = x[:, None] - x[None]
    r = np.linalg.norm(d, axis=-1)
    bonded = (r < 1.6) & (r > 0)
    cos_y = np.abs(d[..., 1]) / np.where(r > 0, r, 1)
    assert cos_y[bonded].max() > np.cos(0.03)
    # reproduced independently from the written structure: |E(R x) - E(x)| / |E(x)|
    import ase.io

    moved = ase.io.read(tmp_path / "hunt_C2H6O_energy.extxyz")
    assert np.allclose(moved.positions, x, atol=1e-10)
    z = torch.as_tensor(MOL.numbers)
    m64 = TorchAdapter(model).copy_for(torch.float64)
    e0 = float(m64(z, torch.as_tensor(MOL.positions)))
    e1 = float(m64(z, torch.as_tensor(moved.positions)))
    assert abs(e1 - e0) / abs(e0) == pytest.approx(e["worst_error"], rel=1e-6)
    assert e["lie_rel"] is not None and len(e["lie_rel"]) == 3


def test_hard_cutoff_is_reported_as_a_discontinuity_with_the_pair_at_the_cutoff():
    pos = torch.as_tensor(MOL.positions)
    rc = float((pos[1] - pos[0]).norm())  # pair 0-1 sits exactly at the cutoff
    res = geolie.hunt(HardCutoffPairs(rc), MOL, steps=0)
    e0 = float(HardCutoffPairs(rc)(None, pos))
    for name in ("energy", "forces"):
        d = res.outputs[name]["discontinuous"]
        assert d is not None, name
        assert [p[:2] for p in d["pairs_at_cutoff"]] == [[0, 1]]
        assert d["pairs_at_cutoff"][0][2] == pytest.approx(rc, rel=1e-12)
    # the energy jumps by one pair term, 1 + 0.1 r_c (closed form)
    assert res.outputs["energy"]["discontinuous"]["jump"] == pytest.approx((1 + 0.1 * rc) / abs(e0), rel=1e-9)
    assert "discontinuous at" in res.table()


@pytest.mark.parametrize("model,dtype", [("pair-mlp", torch.float64), ("pair-mlp", torch.float32),
                                         ("e3nn", torch.float64)])
def test_exactly_equivariant_models_stay_at_their_floor(model, dtype):
    res = geolie.hunt(model, MOL, dtype=dtype, steps=10)
    for name, o in res.outputs.items():
        assert o["at_floor"], (name, o["worst_error"], o["floor"])
        assert o["discontinuous"] is None, (name, o["discontinuous"])


def test_deterministic_for_a_seed_and_bounded_cost():
    kw = dict(n_random=8, n_starts=2, steps=5, max_pairs=6)
    a = geolie.hunt(YAlignedEdge(), MOL, seed=3, **kw).to_dict()
    b = geolie.hunt(YAlignedEdge(), MOL, seed=3, **kw).to_dict()
    assert a == b
    n_out = len(a["outputs"])
    per_precision = 1 + 8 + (3 * 6 + 12) + 2 * 5 + 26 * n_out
    assert a["model_calls"] <= 2 * per_precision  # both precisions (the other one without ascent)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        geolie.hunt(YAlignedEdge(), MOL, steps=-1)


def test_se3_hunt_moves_translations_too():
    sys.path.insert(0, os.path.dirname(__file__))
    from planted_models import PlantedField

    res = geolie.hunt(PlantedField(), MOL, group="SE3", n_starts=1, steps=10)
    e = res.outputs["energy"]
    assert e["translation"] is not None and np.linalg.norm(e["translation"]) > 0
    assert not e["at_floor"]


def test_audit_and_cli_with_hunt(tmp_path, capsys):
    from geolie.cli import main

    out = tmp_path / "audit"
    rc = main(["audit", "--model", "hunt_models:YAlignedEdge", "--data", "xtb-md/ethanol:test", "--limit", "2",
               "--out", str(out), "--n-finite", "1", "--group", "SO3", "--hunt"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "worst orientation found" in text
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["hunt"]["energy"]["above_floor"] == 2
    assert all("hunt" in s and "worst_error" in s["hunt"]["outputs"]["energy"] for s in rep["structures"])
    assert sorted(os.listdir(out / "hunt")) == ["hunt_0_C2H6O_energy.extxyz", "hunt_0_C2H6O_forces.extxyz",
                                                "hunt_1_C2H6O_energy.extxyz", "hunt_1_C2H6O_forces.extxyz"]


class _OneAtATime(torch.nn.Module):
    """The same model without a ``batch`` argument: geolie cannot stack copies of it (one call per orientation)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, z, pos):
        return self.m(z, pos)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stacked_hunt_equals_one_call_per_orientation(dtype):
    """The random and seeded orientations, the ascents' starts and the discontinuity probes go through the model
    stacked: the same worst orientations, errors (to rounding) and verdicts as one call each, in far fewer calls."""
    from truth_models import Morse, YBond

    kw = dict(dtype=dtype, n_random=8, n_starts=2, steps=4, max_pairs=6, seed=1)
    tol = {torch.float64: 1e-9, torch.float32: 1e-3}[dtype]
    for model in (YBond(), Morse()):
        stacked = geolie.hunt(model, MOL, **kw).to_dict()
        single = geolie.hunt(_OneAtATime(model), MOL, **kw).to_dict()
        assert stacked["model_calls"] < single["model_calls"] / 2, (stacked["model_calls"], single["model_calls"])
        for name, a in stacked["outputs"].items():
            b = single["outputs"][name]
            assert (a["at_floor"], a["found_by"]) == (b["at_floor"], b["found_by"]), name
            if not a["at_floor"]:  # a break: its size is the model's, whatever the calls
                assert a["worst_error"] == pytest.approx(b["worst_error"], rel=tol), name
        # the planted break is found both ways; the exact model is at its floor both ways
        assert stacked["outputs"]["energy"]["at_floor"] is not isinstance(model, YBond)


def test_hunt_stacking_budget_is_the_callers(monkeypatch):
    """``stack_atoms`` bounds every stacked call of the hunt: a budget below two copies of the molecule gives one call
    per orientation (the same numbers, in more than twice the calls), and the audit hands the hunt its own ``batch_atoms``."""
    from truth_models import YBond

    import geolie._audit as audit_mod

    kw = dict(n_random=6, n_starts=2, steps=3, max_pairs=4, seed=2)
    n = len(MOL)
    small = geolie.hunt(YBond(), MOL, stack_atoms=2 * n - 1, **kw).to_dict()
    default = geolie.hunt(YBond(), MOL, **kw).to_dict()
    assert small["model_calls"] > 2 * default["model_calls"]
    assert small["outputs"]["energy"]["worst_error"] == pytest.approx(default["outputs"]["energy"]["worst_error"],
                                                                       rel=1e-9)
    with pytest.raises(ValueError, match="stack_atoms"):
        geolie.hunt(YBond(), MOL, stack_atoms=0, **kw)
    seen = []
    real = audit_mod.hunt_orientation
    monkeypatch.setattr(audit_mod, "hunt_orientation", lambda *a, **k: seen.append(k["stack_atoms"]) or real(*a, **k))
    geolie.audit(YBond(), [MOL], hunt=dict(kw), batch_atoms=40, progress=False, n_finite=1)
    assert seen == [40]
