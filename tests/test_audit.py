"""geolie.audit, the CLI, layer-wise attribution and geolie.testing."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import geolie
from geolie.cli import main

HERE = os.path.dirname(__file__)
MOLS = "xtb-md/ethanol:test"


def test_planted_break_is_flagged_and_attributed():
    sys.path.insert(0, HERE)
    rep = geolie.audit("planted_models:planted", MOLS, limit=2, layerwise=True, progress=False)
    assert rep.values("energy", "rel")[:, :3].max() > 1e-4  # rotations break
    assert rep.values("energy", "rel")[:, 3:].max() > 1e-4  # translations break too (absolute coordinates)
    lw = rep.layerwise_summary()
    assert max(lw, key=lw.get) == "field"
    row = rep.rows[0]["layerwise"]
    assert row["field"]["status"].startswith("point input")
    total = np.array(row["__total__"]["contribution"])
    parts = sum(np.array(v["contribution"]) for k, v in row.items() if k not in ("__total__", "__unattributed__"))
    assert np.allclose(parts, total, rtol=1e-10, atol=1e-14)  # signed contributions sum to the total
    assert np.abs(row["__unattributed__"]["contribution"]).max() <= 1e-10 * np.abs(total).max()


@pytest.mark.parametrize("model", ["e3nn", "schnet", "gaunt"])
def test_equivariant_models_sit_at_their_floor(model, dtype):
    rep = geolie.audit(model, MOLS, limit=2, dtype=dtype, n_finite=2, progress=False)
    for row in rep.rows:
        for name, o in row["outputs"].items():
            assert all(o["at_floor"]), (model, name, o["rel"], o["floor_rel"])


def test_emt_sits_at_its_finite_difference_floor():
    rep = geolie.audit("emt", "emt-bulk:test", limit=2, n_finite=2, progress=False)
    assert set(rep.outputs) == {"energy", "forces", "stress", "stress[l=0]", "stress[l=2]"}
    for row in rep.rows:
        assert row["method"] == "fd-float64"
        for o in row["outputs"].values():
            assert all(o["at_floor"]) and o["floor_source"] == "finite-difference error estimate"
            assert max(o["rel"]) < 1e-9


def test_calculator_with_external_field_matches_closed_form():
    sys.path.insert(0, HERE)
    from planted_models import FIELD

    atoms = geolie.data.load("xtb-md/ethanol", "test")[0]
    rep = geolie.audit("planted_models:external_field", [atoms], n_finite=1, progress=False)
    q = np.where(atoms.numbers == 1, 1.0, -1.0)
    x = atoms.positions
    X = geolie.hat(torch.eye(3, dtype=torch.float64)).numpy()
    o = rep.rows[0]["outputs"]
    expected_e = [abs(-(q[:, None] * (x @ X[k].T) * FIELD).sum()) for k in range(3)]
    expected_e += [abs(-(q * FIELD[k]).sum()) for k in range(3)]
    assert np.allclose(o["energy"]["abs"], expected_e, rtol=1e-8)
    F = q[:, None] * FIELD
    expected_f = [np.linalg.norm(F @ X[k].T) for k in range(3)] + [0, 0, 0]
    assert np.allclose(o["forces"]["abs"], expected_f, rtol=1e-8, atol=1e-9)


def test_cli_end_to_end_gate_and_resume(tmp_path, capsys):
    data = tmp_path / "mols.extxyz"
    import ase.io

    ase.io.write(data, geolie.data.load("xtb-md/ethanol", "test")[:3])
    out = tmp_path / "audit"
    assert main(["audit", "--model", "pair-mlp", "--data", str(data), "--out", str(out), "--n-finite", "1",
                 "--fail-above", "1e-8", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "forces" in text
    for f in ("report.json", "structures.csv", "results.jsonl", "lie_forces.png", "lie_energy.png"):
        assert (out / f).exists(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_structures"] == 3 and "p99" in rep["aggregates"]["forces"]["rx"]
    # a broken model fails the gate
    bad = tmp_path / "bad"
    assert main(["audit", "--model", "cartesian-mlp", "--data", str(data), "--out", str(bad), "--n-finite", "1",
                 "--fail-above", "1e-6", "--output", "forces"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # an interrupted audit: keep one finished line and a torn one, then resume
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    first = json.loads(lines[0])
    assert main(["audit", "--model", "pair-mlp", "--data", str(data), "--out", str(out), "--n-finite", "1",
                 "--resume"]) == 0
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    assert rows[0] == first  # the finished structure was not recomputed


def test_bad_specs_and_structures(tmp_path, capsys):
    sys.path.insert(0, HERE)
    with pytest.raises(ValueError, match="unknown model 'nonsense'"):
        geolie.audit("nonsense", MOLS, progress=False)
    with pytest.raises(ValueError, match="cannot import 'no_such_package_xyz.mod'"):
        geolie.audit("no_such_package_xyz.mod:f", MOLS, progress=False)
    with pytest.raises(TypeError, match="returned a dict"):
        geolie.audit("planted_models:not_a_model", MOLS, progress=False)
    from ase.build import bulk

    with pytest.raises(ValueError, match=r"structure 0 \(Fe\).*cannot handle element\(s\) \['Fe'\]"):
        geolie.audit("emt", [bulk("Fe")], progress=False)
    with pytest.raises(ValueError, match=r"structure 0 .*NaN"):
        geolie.audit("planted_models:nan_model", MOLS, limit=1, progress=False)
    assert main(["audit", "--model", "nonsense", "--data", MOLS, "--out", str(tmp_path / "x")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_assert_equivariant():
    mols = geolie.data.load("xtb-md/ethanol", "val")[:2]
    geolie.testing.assert_equivariant("pair-mlp", mols, rtol=1e-10)
    with pytest.raises(AssertionError, match=r"Lie derivative rx of 'forces', structure 0 .* noise floor"):
        geolie.testing.assert_equivariant("cartesian-mlp", mols, rtol=1e-6)


def test_pretrained_ani1x_in_both_dtypes():
    """ANI-1x (weights inside torchani 2.2.4's wheel, read offline): at its floor in float32 and float64. In
    float32 the forces' floor (~3e-7) is set by the float32 AEVs and networks; the energy stays ~1e-10 because
    torchani adds the self-energies in float64."""
    pytest.importorskip("torchani")
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        rep = geolie.audit("ani1x", MOLS, limit=1, dtype=dtype, n_finite=1, progress=False)
        o = rep.rows[0]["outputs"]
        assert all(o["forces"]["at_floor"]) and max(o["forces"]["rel"]) < tol
        assert max(o["energy"]["rel"]) < tol
    from ase.build import molecule

    with pytest.raises(ValueError, match=r"cannot handle element\(s\) \['Si'\]"):
        geolie.audit("ani1x", [molecule("SiH4")], progress=False)


def test_pretrained_sevenn0():
    """SevenNet-0 with its own autograd forces, differentiated forward-over-reverse: at its float32 floor under
    rotations and translations; it is not inversion-symmetric (finite inversion error ~1e-2 on forces), which the
    audit reports. float64 is refused with a clear error (float32 constants in the checkpoint's generated code)."""
    pytest.importorskip("sevenn")
    rep = geolie.audit("sevenn-0", MOLS, limit=1, dtype=torch.float32, n_finite=1, progress=False)
    assert rep.rows[0]["method"] == "jvp-loop"
    f = rep.rows[0]["outputs"]["forces"]
    assert all(f["at_floor"]) and max(f["rel"]) < 1e-5
    fin = rep.rows[0]["finite"]["forces"]
    assert fin["rotation"] < 1e-5 and fin["inversion"] > 1e-3
    with pytest.raises(ValueError, match="runs in .*float32.* only"):
        geolie.audit("sevenn-0", MOLS, limit=1, dtype=torch.float64, progress=False)


def test_point_cloud_classifiers_on_shapes(tmp_path):
    """Point-cloud models (forward(pos) -> logits) audited on the bundled canonical-orientation shapes."""
    sys.path.insert(0, HERE)
    shapes = geolie.data.load("shapes", "test")[:3]
    bad = geolie.audit("planted_models:biased_classifier", shapes, n_finite=2, progress=False)
    assert bad.outputs == ["output"] and bad.values("output", "rel")[:, :3].max() > 1e-3
    assert bad.values("output", "rel")[:, 3:].max() < 1e-12  # centred: translation invariant
    good = geolie.audit("planted_models:invariant_classifier", shapes, n_finite=2, progress=False)
    assert all(all(r["outputs"]["output"]["at_floor"]) for r in good.rows)
    assert max(r["finite"]["output"]["rotation"] for r in good.rows) < 1e-12
    assert main(["audit", "--model", "planted_models:biased_classifier", "--data", "shapes:test", "--limit", "2",
                 "--out", str(tmp_path), "--n-finite", "1", "--fail-above", "1e-6"]) == 1


def test_hutchinson_attribution_for_vector_outputs():
    """Per-point vector outputs: the norm of each module's pushed-forward local Lie derivative, estimated with
    Rademacher probes, matches the exact value (the planted linear map feeds the output directly)."""
    from geolie import layerwise_attribution

    class VectorField(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.radial = torch.nn.Linear(1, 1)
            self.planted = torch.nn.Linear(3, 3, bias=False)
            with torch.no_grad():
                self.planted.weight.copy_(0.1 * torch.randn(3, 3, generator=g))

        def forward(self, pos):
            c = pos - pos.mean(0)
            return c * self.radial(c.norm(dim=-1, keepdim=True)) + self.planted(c)

    m = VectorField().double()
    x = geolie.data.load("shapes", "test")[0].points.double()[:64]
    res = layerwise_attribution(m, m, x, out_rep="vector", reps={"planted": ("vector", "vector")}, n_probes=400)
    assert res["planted"]["kind"].startswith("norm (Hutchinson")
    c = x - x.mean(0)
    W = m.planted.weight.detach()
    X = geolie.hat(torch.eye(3, dtype=torch.float64))
    exact = [float((c @ (W @ X[k] - X[k] @ W).T).norm()) for k in range(3)]
    est = res["planted"]["contribution"]
    assert all(abs(e - t) / t < 0.15 for e, t in zip(est, exact))
    assert np.allclose(res["__total__"]["contribution"], exact, rtol=1e-10)  # the only break: total = planted
    assert max(res["radial"]["contribution"]) < 1e-12


def test_e3nn_dict_network_gate_points():
    """e3nn's gate_points_2101 network (dict input, declared irreps_out 0e + 1o) is at its float64 floor on shapes;
    the same network round-tripped through float32 carries float32 constants, which the audit exposes."""
    from geolie.adapters.e3nn_models import gate_points

    pot = gate_points()
    rep = geolie.audit(pot, "shapes:test", limit=1, n_finite=1, progress=False)
    o = rep.rows[0]["outputs"]["output"]
    assert o["rep"] == "1x0e+1x1o" and all(o["at_floor"]) and max(o["rel"]) < 1e-14
    spoiled = gate_points()
    spoiled._module = spoiled._module.float()  # the float64 copy now holds float32-rounded constants
    rep = geolie.audit(spoiled, "shapes:test", limit=1, n_finite=1, progress=False)
    assert max(rep.rows[0]["outputs"]["output"]["rel"][:3]) > 1e-12


def test_batched_audit_matches_one_at_a_time():
    """Every per-structure figure is the same whatever the batching: one per call, 3 per call, 5 per call, and the
    default atom budget (ethanol 9 atoms, aspirin 21: budget 30 makes calls of 3, 1, 1 structures); a model that
    breaks rotations, so that the figures are far above the floor."""
    mols = geolie.data.load("xtb-md/ethanol", "test")[:3] + geolie.data.load("xtb-md/aspirin", "test")[:2]
    kw = dict(n_finite=2, progress=False, floor_sample=None)  # floors measured on every structure
    one = geolie.audit("cartesian-mlp", mols, batch_size=1, **kw)
    runs = {3: geolie.audit("cartesian-mlp", mols, batch_size=3, **kw),
            5: geolie.audit("cartesian-mlp", mols, batch_size=5, **kw),
            "atoms": geolie.audit("cartesian-mlp", mols, batch_atoms=30, **kw)}
    assert [r["index"] for r in runs[3].rows] == list(range(5)) and runs[3].rows[4]["batched"] == 2
    assert [r.get("batched", 1) for r in runs["atoms"].rows] == [3, 3, 3, 1, 1]
    for many in runs.values():
        for a, b in zip(one.rows, many.rows):
            for name in ("energy", "forces"):
                oa, ob = a["outputs"][name], b["outputs"][name]
                assert np.allclose(oa["abs"], ob["abs"], rtol=1e-9, atol=1e-14)
                assert np.allclose(oa["rel"], ob["rel"], rtol=1e-9, atol=1e-14)
                # floors: float32 rounding of another evaluation order: the same magnitude
                fa, fb = np.array(oa["floor"]), np.array(ob["floor"])
                assert np.all((fb < 30 * fa + 1e-300) & (fa < 30 * fb + 1e-300))
                fin_a, fin_b = a["finite"][name], b["finite"][name]
                assert set(fin_a) == set(fin_b) == {"repeat", "rotation", "translation", "inversion", "permutation"}
                # the same group elements: the same errors
                assert fin_a["rotation"] == pytest.approx(fin_b["rotation"], rel=1e-6) and fin_a["rotation"] > 1e-4
                # exact symmetries of this model (pairs i,j and j,i: inversion too): at floor
                for fam in ("repeat", "translation", "permutation", "inversion"):
                    assert fin_a[fam] < 1e-12 and fin_b[fam] < 1e-12
    with pytest.raises(ValueError, match="batch_size=1"):
        geolie.audit("emt", "emt-bulk:test", limit=2, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="layer-wise attribution needs batch_size=1"):
        geolie.audit("pair-mlp", mols, batch_size=2, layerwise=True, progress=False)


def test_pretrained_chgnet_molecules_and_crystals():
    """CHGNet (float32) through its own create_graph forces: molecules at the float32 floor; crystals at ~1e-5
    (float32 fractional-coordinate round trips); its stress changes sign under inversion (a left-handed cell has a
    negative signed volume in CHGNet), which the finite companions report."""
    pytest.importorskip("chgnet")
    rep = geolie.audit("chgnet", MOLS, limit=1, dtype=torch.float32, n_finite=1, progress=False)
    f = rep.rows[0]["outputs"]["forces"]
    assert all(f["at_floor"]) and max(f["rel"]) < 1e-5
    rep = geolie.audit("chgnet", "emt-bulk:test", limit=1, dtype=torch.float32, n_finite=1, progress=False)
    o = rep.rows[0]["outputs"]
    assert set(o) == {"energy", "forces", "stress", "stress[l=0]", "stress[l=2]"} and max(o["forces"]["rel"]) < 1e-4
    fin = rep.rows[0]["finite"]
    assert fin["forces"]["rotation"] < 1e-3 and fin["forces"]["permutation"] < 1e-3
    assert fin["stress"]["inversion"] > 1.0


def test_chgnet_energy_derivative_is_verified_and_matches_the_force_identity():
    """CHGNet's forward-mode energy tangent along a rotation or translation is exactly 0.0 in float32, and rightly:
    the generators are signed permutations, so the tangent of every interatomic vector is X r_ij bit for bit and
    r·(X r) = −r_x r_y + r_y r_x cancels exactly. The adjoint test's extra random probe shows the tangent is not lost;
    the identity L_X E = −Σ F·(X x) from the model's own forces agrees to float32 rounding; the floor is measured."""
    pytest.importorskip("chgnet")
    from geolie.adapters import Structure, load_model

    pot = load_model("chgnet")
    st = Structure.from_atoms(geolie.data.load("xtb-md/ethanol", "test")[0])
    ev = pot.evaluation(st, torch.float32)
    rep = geolie.measure(ev)
    e = rep.outputs["energy"]
    assert e.ad_check is not None and e.ad_check <= 1e-3 and rep.outputs["forces"].ad_check <= 1e-3
    assert "difference" in e.floor_source and (e.floor > 0).all()
    out = ev.fn(*ev.inputs)
    ident = geolie.lie_energy_from_forces(ev.inputs[0], out["forces"].detach()).double()
    assert float(ident.abs().max()) > 0  # float32 rounding, not an exact zero
    assert ((rep.lie[0].reshape(-1).double() - ident).abs().numpy() <= 2 * e.floor[0]).all()
    a = geolie.audit(pot, [st.to_atoms()], dtype=torch.float32, n_finite=0, progress=False)
    row = a.rows[0]
    assert row["outputs"]["forces"]["source"] == "-dE/dx (model autograd)"
    assert row["conservative"]["force_gap_rel"] < 1e-5  # its forces are its energy's gradient
    assert any("float32 only" in n for n in a.notes())


def test_shards_merge_into_the_single_run_and_resume_after_a_killed_shard(tmp_path, capsys):
    """Shard invariance of every per-structure figure; merge equals one run (JSON rows, aggregates, CSV); a shard
    killed mid-write resumes without losing or repeating work."""
    from geolie._store import shard_indices

    data = "xtb-md/ethanol:test"
    single = tmp_path / "single"
    # one structure per call in every run: the files are then equal bit for bit (batching changes sub-floor bits
    # only: test_batched_audit_matches_one_at_a_time)
    assert main(["audit", "--model", "pair-mlp", "--data", data, "--limit", "6", "--out", str(single),
                 "--n-finite", "1", "--batch-size", "1"]) == 0
    shards = tmp_path / "shards"
    for i in range(3):
        assert main(["audit", "--model", "pair-mlp", "--data", data, "--limit", "6", "--out", str(shards),
                     "--n-finite", "1", "--shard", f"{i}/3", "--batch-size", "1"]) == 0
    # kill shard 1 mid-line and resume it
    jl = shards / "shard-1-of-3" / "results.jsonl"
    text = jl.read_text()
    jl.write_text(text[: len(text) - 40])
    assert main(["audit", "--model", "pair-mlp", "--data", data, "--limit", "6", "--out", str(shards),
                 "--n-finite", "1", "--shard", "1/3", "--resume", "--batch-size", "1"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(shards), "--out", str(merged)]) == 0
    a = json.loads((single / "report.json").read_text())
    b = json.loads((merged / "report.json").read_text())
    assert a["structures"] == b["structures"] and a["aggregates"] == b["aggregates"]
    assert (single / "structures.csv").read_text() == (merged / "structures.csv").read_text()
    # shards are balanced by atom count and cover everything once
    parts = [shard_indices([9, 9, 3, 21, 12, 9], k, 3) for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(6))
    loads = [sum([9, 9, 3, 21, 12, 9][i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 12
    # a missing shard is an error naming the structures
    import shutil

    shutil.rmtree(shards / "shard-2-of-3")
    assert main(["merge", str(shards), "--out", str(tmp_path / "partial")]) == 2
    assert "structure(s) in no folder" in capsys.readouterr().err


def test_parse_shard_from_slurm_environment():
    from geolie._store import parse_shard

    assert parse_shard("2/5") == (2, 5)
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4",
                                 "SLURM_ARRAY_TASK_COUNT": "6"}) == (3, 6)
    for bad in ("5/5", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    with pytest.raises(ValueError, match="not inside a Slurm array job"):
        parse_shard("slurm", {})


def test_layerwise_break_outside_modules_is_unattributed_not_zero():
    """E = Σ_{i<j} lin([r_ij, d_ij]): the raw displacement enters the Linear through a concatenation (no module),
    so without a declared rep the Linear 'receives broken input' and the whole L_X E = Σ w·(X_k d_ij) must appear as
    unattributed; declaring the input as 1x0e + 1x1o moves it into the Linear's local term."""
    from geolie import layerwise_attribution

    class EdgeConcat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 1).double()

        def forward(self, pos):
            i, j = torch.triu_indices(len(pos), len(pos), 1)
            d = pos[j] - pos[i]
            return self.lin(torch.cat([d.norm(dim=-1, keepdim=True), d], -1)).sum()

    m = EdgeConcat()
    pos = torch.randn(6, 3, dtype=torch.float64)
    i, j = torch.triu_indices(6, 6, 1)
    d = pos[j] - pos[i]
    w = m.lin.weight.detach()[0, 1:]
    X = geolie.hat(torch.eye(3, dtype=torch.float64))
    exact = np.array([float((d @ X[k].T @ w).sum()) for k in range(3)])
    res = layerwise_attribution(m, m, pos)
    assert res["lin"]["status"] == "receives broken input" and res["lin"]["contribution"] == [0.0] * 3
    assert np.allclose(res["__unattributed__"]["contribution"], exact, rtol=1e-10)
    assert "upstream of lin" in res["__unattributed__"]["status"]
    res = layerwise_attribution(m, m, pos, reps={"lin": ("1x0e + 1x1o", "scalar")})
    assert np.allclose(res["lin"]["contribution"], exact, rtol=1e-10)
    assert np.abs(res["__unattributed__"]["contribution"]).max() < 1e-12 * np.abs(exact).max()


class _MixChannels(torch.nn.Module):
    """``[N, C, 3] -> [N, C, 3]``: a channel mix (equivariant on vectors)."""

    def __init__(self, c):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c, c, generator=torch.Generator().manual_seed(1)) / c)

    def forward(self, h):
        return torch.einsum("dc,nci->ndi", self.w, h)


class _ComponentSiLU(torch.nn.Module):
    """SiLU on each Cartesian component: breaks rotations."""

    def forward(self, h):
        return torch.nn.functional.silu(h)


class _NormGate(torch.nn.Module):
    """``h · sigmoid(|h|)`` per channel: equivariant."""

    def forward(self, h):
        return h * torch.sigmoid(h.norm(dim=-1, keepdim=True))


class _VectorBlocks(torch.nn.Module):
    """E = Σ |gate(act(mix(c ⊗ s)))|² with centred positions c: the only break is the component-wise SiLU inside
    ``block``."""

    def __init__(self, c=4):
        super().__init__()
        self.s = torch.nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.block = torch.nn.Sequential(_MixChannels(c), _ComponentSiLU())
        self.gate = torch.nn.Sequential(_MixChannels(c), _NormGate())

    def forward(self, pos):
        c = pos - pos.mean(0)
        return self.gate(self.block(c[:, None, :] * self.s[None, :, None].to(pos))).pow(2).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_attribution_to_named_units(dtype):
    """``units=``: each named module is one unit. On planted vector blocks whose only break is a component-wise SiLU
    inside ``block``, the block carries the whole L_X E (the direct total), the equivariant ``gate`` block and the
    outside carry nothing; the same as attributing the leaves (``block.1``, the SiLU, carries it there)."""
    from geolie import layerwise_attribution

    m = _VectorBlocks().to(dtype)
    pos = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    res = layerwise_attribution(m, m, pos, units=["block", "gate"], reps={"block": ("vector", "vector"),
                                                                          "gate": ("vector", "vector")})
    total = np.array(res["__total__"]["contribution"])
    assert np.abs(total).min() > 1e-3
    assert set(res) == {"block", "gate", "__total__", "__unattributed__"}
    assert np.allclose(res["block"]["contribution"], total, rtol=tol, atol=tol * np.abs(total).max())
    for k in ("gate", "__unattributed__"):
        assert np.abs(res[k]["contribution"]).max() < tol * np.abs(total).max(), k
    leaves = layerwise_attribution(m, m, pos, reps={n: ("vector", "vector") for n in
                                                    ("block.0", "block.1", "gate.0", "gate.1")})
    assert np.allclose(leaves["block.1"]["contribution"], res["block"]["contribution"], rtol=tol,
                       atol=tol * np.abs(total).max())
    with pytest.raises(ValueError, match="not submodules"):
        layerwise_attribution(m, m, pos, units=["blocks"])
    with pytest.raises(ValueError, match="inside unit 'block'"):
        layerwise_attribution(m, m, pos, units=["block", "block.1"])


class _Quadratic(torch.nn.Module):
    """E = Σ_i x_iᵀ A x_i (A symmetric, anisotropic): L_Y E = Σ_i 2 x_iᵀ A (Ω x_i + v) for Y = (ω, v)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, -0.5], [0.0, -0.5, 0.5]],
                                               dtype=torch.float64))

    def forward(self, z, pos, batch=None):
        per_atom = ((pos @ self.A.to(pos)) * pos).sum(-1)
        if batch is None:
            return per_atom.sum()[None]
        return torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, per_atom)


class _QuadraticNoBatch(_Quadratic):
    """Takes a batch argument and ignores it (one energy for the whole call), as some wrappers do."""

    def forward(self, z, pos, batch=None):
        return super().forward(z, pos, None)


def test_model_that_does_not_batch_goes_one_by_one_or_says_why():
    from ase import Atoms

    atoms = [Atoms("H3", positions=np.random.default_rng(k).normal(size=(3, 3))) for k in range(4)]
    kw = dict(n_finite=1, progress=False, floor_sample=None)
    ref = geolie.audit(_Quadratic(), atoms, **kw)
    assert all(r["batched"] == 4 for r in ref.rows)
    rep = geolie.audit(_QuadraticNoBatch(), atoms, **kw)  # geolie chose to batch: falls back
    assert all("batched" not in r for r in rep.rows)
    for a, b in zip(rep.rows, ref.rows):
        np.testing.assert_allclose(a["outputs"]["forces"]["rel"], b["outputs"]["forces"]["rel"], rtol=1e-9)
    with pytest.raises(ValueError, match="returned 1 energies for 2 structures: it does not batch"):
        geolie.audit(_QuadraticNoBatch(), atoms, batch_size=2, **kw)


def test_random_estimator_closed_form_and_unbiased(tmp_path):
    from ase import Atoms

    rng = np.random.default_rng(0)
    pos = rng.normal(size=(4, 3))
    atoms = [Atoms("H4", positions=pos) for _ in range(400)]
    model = _Quadratic()
    exact = geolie.audit(model, atoms[:1], n_finite=0, progress=False)
    rnd = geolie.audit(model, atoms, n_finite=0, progress=False, estimator="random", seed=3)
    assert rnd.generator_names == ["r~", "t~"] and rnd.meta["estimator"] == "random"
    A, x = model.A.numpy(), pos
    E = float(np.sum((x @ A) * x))
    for row in rnd.rows[:20]:  # each row: |L_Y E| / |E| along its own recorded direction, in closed form
        n, m = np.array(row["direction"][0][:3]), np.array(row["direction"][1][3:])
        Om = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
        lr, lt = 2 * np.sum((x @ A) * (x @ Om.T)), 2 * np.sum((x @ A) * m)
        assert abs(np.linalg.norm(n) - 1) < 1e-12 and abs(np.linalg.norm(m) - 1) < 1e-12
        np.testing.assert_allclose(row["outputs"]["energy"]["rel"], [abs(lr) / abs(E), abs(lt) / abs(E)], rtol=1e-10)
    for name in ("energy", "forces"):  # the dataset RMS: unbiased, within 4 of its own standard errors
        truth = exact.aggregates()[name]["iso_rotation_rms"]
        est = rnd.aggregates()[name]["iso_rotation_rms"]
        assert truth["stderr"] == 0.0 and est["draws"] == 400 and est["stderr"] > 0
        assert abs(est["value"] - truth["value"]) < 4 * est["stderr"], (name, est, truth)
        assert est["stderr"] < 0.1 * truth["value"]
    assert rnd.rows[1]["batched"] > 100  # up to 512 atoms per call: each structure along its own directions
    again = geolie.audit(model, atoms[:5], n_finite=0, progress=False, estimator="random", seed=3, batch_size=1)
    for a, b in zip(again.rows, rnd.rows[:5]):  # reproducible, and the same one structure per call
        assert a["direction"] == b["direction"] and "batched" not in a and (b is rnd.rows[0] or b["batched"] > 100)
        for name in ("energy", "forces"):
            np.testing.assert_allclose(a["outputs"][name]["rel"], b["outputs"][name]["rel"], rtol=1e-9)


def test_random_estimator_cli_files_and_floor(tmp_path):
    from geolie.cli import main

    out = str(tmp_path / "a")
    assert main(["audit", "--model", "pair-mlp", "--data", "xtb-md/ethanol:test", "--limit", "3", "--estimator",
                 "random", "--n-finite", "1", "--out", out]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["generators"] == ["r~", "t~"]
    agg = rep["aggregates"]["forces"]
    assert agg["iso_rotation_rms"]["draws"] == 3 and agg["iso_rotation"]["max"] < 1e-13  # invariant: at its floor
    assert "rel_r~" in open(os.path.join(out, "structures.csv")).readline()
    with pytest.raises(ValueError, match="estimator must be"):
        geolie.audit("pair-mlp", MOLS, estimator="hutchinson", progress=False)


def test_file_is_streamed_with_bounded_memory(tmp_path):
    """A file is read as the audit goes: the audit's peak Python memory (tracemalloc: numpy arrays included) grows per
    structure well below what holding the file's structures costs (what grows is the rows, ~6 KB per structure here,
    against ~13 KB per 300-atom structure held), and its rows equal the in-memory audit's."""
    import tracemalloc

    import ase.io
    from ase import Atoms

    rng = np.random.default_rng(0)
    atoms = [Atoms("H300", positions=rng.normal(size=(300, 3)) * 5) for _ in range(150)]
    path = str(tmp_path / "big.extxyz")
    ase.io.write(path, atoms)
    geolie.audit(_Quadratic(), atoms[:1], n_finite=0, progress=False)  # warm-up: first-call imports and caches
    del atoms
    tracemalloc.start()
    held = ase.io.read(path, ":")
    held_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    geolie.audit(_Quadratic(), path, n_finite=0, progress=False, batch_size=1, limit=5)  # warm-up: the file's path
    peaks = {}
    for limit in (50, None):  # the growth over 100 structures: the report's gallery (k structures) is a constant
        tracemalloc.start()
        rep = geolie.audit(_Quadratic(), path, n_finite=0, progress=False, batch_size=1, limit=limit)
        peaks[limit] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(rep.rows) == 150 and rep.meta.get("estimator") == "exact"
    growth = (peaks[None] - peaks[50]) / 100
    assert growth < 0.7 * held_peak / 150, (peaks, held_peak)
    ref = geolie.audit(_Quadratic(), held[:3], n_finite=0, progress=False, batch_size=1)
    for a, b in zip(ref.rows, rep.rows[:3]):
        assert a["outputs"]["forces"]["rel"] == b["outputs"]["forces"]["rel"]
    sharded = geolie.audit(_Quadratic(), path, n_finite=0, progress=False, batch_size=1, shard=(1, 3), limit=30)
    assert [r["index"] for r in sharded.rows] == [r["index"] for r in sharded.rows if r["index"] < 30]
    assert len(sharded.rows) == 10
    with pytest.raises(ValueError, match="cannot be read by ase.io"):
        bad = tmp_path / "bad.extxyz"
        bad.write_text("3\nnot an extxyz header\nH 0 0\n")
        geolie.audit(_Quadratic(), str(bad), progress=False)


def test_rows_stay_on_disk_with_bounded_memory(tmp_path):
    """With an output folder the rows are not held: peak Python memory grows by a small fraction of a row per
    structure (the aggregates' figures and the input list; measured ~320 bytes against ~2.2 KB rows, which an
    in-memory audit holds: ~5.5 KB per structure), and the report read back from disk equals the in-memory one."""
    import tracemalloc

    from ase import Atoms

    from geolie._store import RowFile

    rng = np.random.default_rng(1)
    atoms = [Atoms("H3", positions=rng.normal(size=(3, 3))) for _ in range(2400)]
    kw = dict(n_finite=1, progress=False)
    geolie.audit(_Quadratic(), atoms[:4], **kw)  # warm-up
    peaks = {}
    for n in (400, 2400):
        tracemalloc.start()
        rep = geolie.audit(_Quadratic(), atoms[:n], out_dir=str(tmp_path / str(n)), **kw)
        rep.aggregates()
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert isinstance(rep.rows, RowFile) and len(rep.rows) == 2400
    row_bytes = os.path.getsize(tmp_path / "2400" / "results.jsonl") / 2400
    growth = (peaks[2400] - peaks[400]) / 2000
    assert growth < 0.3 * row_bytes, (growth, row_bytes)
    mem = geolie.audit(_Quadratic(), atoms[:400], **kw)
    disk = geolie.audit(_Quadratic(), atoms[:400], out_dir=str(tmp_path / "again"), **kw)
    def figures(d):  # everything but the cost account (wall times differ from run to run)
        return {k: v for k, v in d.items() if k != "cost"}

    assert figures(disk.to_dict()) == figures(mem.to_dict())
    geolie.write_report(disk, str(tmp_path / "again"))
    assert figures(json.load(open(tmp_path / "again" / "report.json"))) == json.loads(json.dumps(figures(mem.to_dict())))


def test_floor_sample_is_reused_and_shard_invariant():
    """floor_sample=k measures the floor on k evenly spread structures (batched as the run) and raises every other
    structure's rounding estimate to the sample's median relative floor: the same figures in every shard."""
    from geolie._audit import floor_sample_indices

    mols = geolie.data.load("xtb-md/ethanol", "test")[:12]
    assert floor_sample_indices(12, 4) == [0, 4, 7, 11] and floor_sample_indices(3, 8) == [0, 1, 2]
    full = geolie.audit("pair-mlp", mols, n_finite=0, progress=False, floor_sample=None)
    samp = geolie.audit("pair-mlp", mols, n_finite=0, progress=False, floor_sample=4)
    assert [r["floor_sampled"] for r in samp.rows] == [i in (0, 4, 7, 11) for i in range(12)]
    assert samp.meta["floor_sample"] == 4 and "floor_sampled" not in full.rows[0]
    top = {n: np.median([samp.rows[i]["outputs"][n]["floor_rel"] for i in (0, 4, 7, 11)], axis=0)
           for n in ("energy", "forces")}
    for a, b in zip(full.rows, samp.rows):
        for n in ("energy", "forces"):
            oa, ob = a["outputs"][n], b["outputs"][n]
            # the Lie derivatives are unchanged (to their floor: batched calls round differently)
            assert np.allclose(oa["abs"], ob["abs"], rtol=1e-9, atol=max(oa["floor"]))
            if b["floor_sampled"]:  # measured, as in the run that measures every structure (there batched)
                assert np.allclose(ob["floor"], oa["floor"], rtol=0.5)
            else:  # the sample's median relative floor, scaled to this structure: the measured floor's magnitude
                assert np.all(np.array(ob["floor_rel"]) >= top[n] * (1 - 1e-12))
                assert np.all(np.array(ob["floor"]) < 30 * np.array(oa["floor"]))
                assert np.all(np.array(ob["floor"]) > np.array(oa["floor"]) / 30)
                assert "sampled structures" in ob["floor_source"]
            assert all(ob["at_floor"])  # an exactly invariant model: at its floor either way
    # never a false "at floor" from a reused floor: a model that breaks rotations stays above it everywhere
    broken = geolie.audit("cartesian-mlp", mols, n_finite=0, progress=False, floor_sample=4)
    assert not any(any(r["outputs"][n]["at_floor"][:3]) for r in broken.rows for n in ("energy", "forces"))
    parts = [geolie.audit("pair-mlp", mols, n_finite=0, progress=False, floor_sample=4, batch_size=1,
                          shard=(k, 2)) for k in range(2)]
    merged = sorted((r for p in parts for r in p.rows), key=lambda r: r["index"])
    single = geolie.audit("pair-mlp", mols, n_finite=0, progress=False, floor_sample=4, batch_size=1)
    assert merged == single.rows


class _NoisyInvariant(torch.nn.Module):
    """E = Σ_ij |x_i − x_j|² (exactly invariant) times 1 + ``noise`` × a fresh uniform draw on every call: a model that is
    not deterministic (as models drawing random frames per call are), with its randomness of closed-form size."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, z, pos, batch=None):
        b = torch.zeros(len(pos), dtype=torch.long) if batch is None else batch
        d = pos[:, None] - pos[None]
        same = (b[:, None] == b[None]).to(pos.dtype)
        e = torch.zeros(int(b.max()) + 1, dtype=pos.dtype).index_add(0, b, ((d * d).sum(-1) * same).sum(1))
        return e * (1 + self.noise * torch.rand(e.shape, dtype=pos.dtype))


def test_nondeterministic_model_is_said():
    """Repeated identical calls that differ by more than 1000 machine epsilons put a note on the row: the finite
    errors and the adjoint test are then bounded by the model's randomness. A deterministic model gets no note."""
    from ase import Atoms

    atoms = [Atoms("H3", positions=np.random.default_rng(0).normal(size=(3, 3)))]
    rep = geolie.audit(_NoisyInvariant(1e-9), atoms, n_finite=1, progress=False)
    row = rep.rows[0]
    assert 1e-12 < row["finite"]["energy"]["repeat"] < 2e-9  # |u1 − u2| · 1e-9, |u1 − u2| < 1
    assert any(n.startswith("energy: not deterministic") for n in row["notes"])
    assert any("not deterministic" in n for n in rep.notes())
    quiet = geolie.audit(_NoisyInvariant(0.0), atoms, n_finite=1, progress=False)
    assert not any("not deterministic" in n for n in quiet.rows[0]["notes"])
    assert max(quiet.rows[0]["outputs"]["energy"]["rel"]) < 1e-13


def test_audit_with_batched_hvp_equals_the_loop(monkeypatch):
    """The audit's rows are the same (to the floor) whichever HVP variant the device uses; rows name it."""
    from geolie import _lie

    data = geolie.data.load("xtb-md/ethanol", "test")[:4]
    monkeypatch.setattr(_lie, "HVP_BATCHED_UP_TO", {"cpu": 0})
    loop = geolie.audit("pair-mlp", data, n_finite=0, progress=False)
    monkeypatch.setattr(_lie, "HVP_BATCHED_UP_TO", {"cpu": 10 ** 9})
    batched = geolie.audit("pair-mlp", data, n_finite=0, progress=False)
    assert {r["method"] for r in loop.rows} == {"hvp"} and {r["method"] for r in batched.rows} == {"hvp-batched"}
    for a, b in zip(loop.rows, batched.rows):
        for name in ("energy", "forces"):
            # to the floor: below it the two variants' rounding differs (a batched backward pass of 6 tangents
            # rounds one way, of 7 another), and a Lie derivative of 0.0 in one is 1e-17 in the other
            np.testing.assert_allclose(a["outputs"][name]["abs"], b["outputs"][name]["abs"], rtol=1e-9,
                                       atol=max(a["outputs"][name]["floor"]))


def test_dataset_objects_are_read_item_by_item():
    """A dataset object (len and [i], here of torch-geometric Data) is converted item by item as the audit goes, with
    the rows of the same structures given as ase.Atoms; a periodic Data (cell [1, 3, 3]) is a cell; bad items say
    which and why."""
    from torch_geometric.data import Data

    frames = geolie.data.load("xtb-md/ethanol", "test")[:3]

    class Lazy:
        def __init__(self):
            self.reads = 0

        def __len__(self):
            return len(frames)

        def __getitem__(self, i):
            self.reads += 1
            a = frames[i]
            return Data(z=torch.as_tensor(a.numbers), pos=torch.as_tensor(a.positions))

    ds = Lazy()
    kw = dict(n_finite=1, progress=False, floor_sample=None)
    rep = geolie.audit("pair-mlp", ds, **kw)
    ref = geolie.audit("pair-mlp", frames, **kw)
    assert ds.reads == 2 * len(frames)  # one pass counting atoms, one auditing: nothing held
    assert [r["name"] for r in rep.rows] == ["Data#0", "Data#1", "Data#2"]
    for a, b in zip(rep.rows, ref.rows):
        assert a["outputs"]["forces"]["rel"] == b["outputs"]["forces"]["rel"]
    one = geolie.audit("pair-mlp", frames[0], **kw)  # a single Atoms is one structure
    assert len(one.rows) == 1  # one call of its own: the same figures to the floor (here ~1e-16 relative)
    np.testing.assert_allclose(one.rows[0]["outputs"]["forces"]["rel"], ref.rows[0]["outputs"]["forces"]["rel"],
                               atol=1e-14)
    from geolie._audit import _as_structure

    cu = _as_structure(Data(z=torch.tensor([29, 29]), pos=torch.zeros(2, 3), cell=3.6 * torch.eye(3)[None]), 0)
    assert cu.cell is not None and np.allclose(cu.cell, 3.6 * np.eye(3))
    open_ = _as_structure(Data(z=torch.tensor([1]), pos=torch.zeros(1, 3), cell=torch.eye(3), pbc=torch.zeros(3)), 0)
    assert open_.cell is None
    with pytest.raises(ValueError, match=r"structure 0: pos must be \[N, 3\] and z \[N\]"):
        _as_structure(Data(z=torch.tensor([1, 1]), pos=torch.zeros(3, 3)), 0)
    with pytest.raises(TypeError, match="structure 1: expected ase.Atoms.*got int"):
        geolie.audit("pair-mlp", [frames[0], 3], **kw)
