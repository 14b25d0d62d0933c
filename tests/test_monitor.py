"""geolie.monitor: what it writes (against the audit and a closed form), that it never changes the model or the RNG,
resume, and the Lightning callback."""
import math
import random

import numpy as np
import pytest
import torch

import geolie
from geolie.models import CartesianMLPPotential, PairMLPPotential
from geolie.monitor import MONITOR_COLUMNS, EquivarianceMonitor, lightning_callback


@pytest.fixture(scope="module")
def frames():
    return geolie.data.load("xtb-md/ethanol", split="test")[:3]


def test_monitor_rows_match_the_audit(tmp_path, frames):
    model = CartesianMLPPotential(anisotropy=0.3)
    mon = EquivarianceMonitor(model, frames, str(tmp_path), every=2, n_finite=2)
    for step in range(5):
        mon.step(step)
    rows = EquivarianceMonitor.read_csv(str(tmp_path / "monitor.csv"))
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert {r["output"] for r in rows} == {"energy", "forces"}
    assert (tmp_path / "monitor.png").stat().st_size > 0
    rep = geolie.audit(model, frames, n_finite=2, progress=False)
    for name in ("energy", "forces"):
        rel = rep.values(name, "rel")
        iso = np.sqrt(np.mean(rel[:, :3] ** 2, axis=1))
        trans = np.sqrt(np.mean(rel[:, 3:] ** 2, axis=1))
        for r in (r for r in rows if r["output"] == name):
            assert r["n_samples"] == 3
            np.testing.assert_allclose(r["rot_iso_median"], np.median(iso), rtol=1e-9)
            np.testing.assert_allclose(r["rot_iso_max"], iso.max(), rtol=1e-9)
            np.testing.assert_allclose(r["trans_max"], trans.max(), rtol=1e-9)
            assert r["rot_iso_median"] > 1e-4  # the anisotropic term breaks rotations
            assert r["trans_max"] < 1e-12  # displacements only: translation invariant
            assert r["finite_rotation_max"] > 1e-4
            assert set(r) == set(MONITOR_COLUMNS)


def test_monitor_equivariant_model_sits_at_floor(tmp_path, frames):
    mon = EquivarianceMonitor(PairMLPPotential(), frames, str(tmp_path), every=1, n_finite=1, plot=False)
    for r in mon.measure(0):
        assert r["rot_iso_max"] < 1e-13 and r["finite_rotation_max"] < 1e-12
        assert 0 < r["floor_rel_median"] < 1e-13


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_monitor_generic_function_closed_form(tmp_path, dtype, tol):
    """f(x) = Σ x_i,x²: L_rx f = 0, L_ry f = 2Σ x z, L_rz f = −2Σ x y, L_tx f = 2Σ x, L_ty = L_tz = 0."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, dtype=dtype)

    def f(p):
        return (p[:, 0] ** 2).sum()

    mon = EquivarianceMonitor(f, x, str(tmp_path), in_rep="point", out_rep="scalar", n_finite=2, plot=False)
    (row,) = mon.measure(3)
    xd = x.double()
    fx = float(f(xd))
    ry, rz, tx = 2 * float((xd[:, 0] * xd[:, 2]).sum()), -2 * float((xd[:, 0] * xd[:, 1]).sum()), \
        2 * float(xd[:, 0].sum())
    assert row["rot_iso_median"] == pytest.approx(math.sqrt((ry ** 2 + rz ** 2) / 3) / abs(fx), rel=tol)
    assert row["trans_median"] == pytest.approx(math.sqrt(tx ** 2 / 3) / abs(fx), rel=tol)
    assert row["finite_rotation_max"] > 1e-2 and row["step"] == 3


def _train(model, frames, steps, monitor_dir=None):
    """A tiny training loop that draws random numbers (dropout-like noise, batch order) every step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = geolie.data.to_pyg(frames)
    mon = EquivarianceMonitor(model, frames[:2], monitor_dir, every=2, n_finite=2, plot=False) if monitor_dir \
        else None
    for step in range(steps):
        opt.zero_grad()
        k = int(torch.randint(len(frames), ()))
        d = data[k]
        pos = (d.pos.double() + 1e-3 * torch.randn(d.pos.shape, dtype=torch.float64)).requires_grad_(True)
        e = model(d.z, pos)
        f = -torch.autograd.grad(e.sum(), pos, create_graph=True)[0]
        loss = (e.sum() - d.energy.double().sum()) ** 2 * 1e-4 + ((f - d.forces.double()) ** 2).mean()
        loss = loss + 1e-6 * float(np.random.rand()) + 1e-6 * random.random()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step)
    return model


def test_monitor_never_changes_parameters_or_rng(tmp_path, frames):
    def seeded():
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)

    seeded()
    plain = _train(CartesianMLPPotential().double(), frames, 6)
    after_plain = (torch.rand(3), np.random.rand(), random.random())
    seeded()
    model = CartesianMLPPotential().double()
    model.train()
    monitored = _train(model, frames, 6, str(tmp_path))
    after_mon = (torch.rand(3), np.random.rand(), random.random())
    for a, b in zip(plain.parameters(), monitored.parameters()):
        assert torch.equal(a, b)  # bit for bit: the monitor drew no random number and touched no parameter
    assert torch.equal(after_plain[0], after_mon[0]) and after_plain[1:] == after_mon[1:]
    assert monitored.training and all(p.requires_grad for p in monitored.parameters())
    assert len(EquivarianceMonitor.read_csv(str(tmp_path / "monitor.csv"))) == 3 * 2  # steps 0, 2, 4 x 2 outputs


def test_monitor_leaves_grads_alone(tmp_path, frames):
    model = CartesianMLPPotential()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    EquivarianceMonitor(model, frames[:1], str(tmp_path), dtype=torch.float32, n_finite=0, plot=False).measure(0)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_monitor_resume_and_restart(tmp_path, frames):
    m = PairMLPPotential()
    EquivarianceMonitor(m, frames[:1], str(tmp_path), n_finite=0, plot=False).measure(0)
    mon = EquivarianceMonitor(m, frames[:1], str(tmp_path), n_finite=0)  # resume: the history is read back
    assert [r["step"] for r in mon.history] == [0, 0]
    mon.measure(10)
    assert [r["step"] for r in EquivarianceMonitor.read_csv(mon.csv_path)] == [0, 0, 10, 10]
    mon = EquivarianceMonitor(m, frames[:1], str(tmp_path), n_finite=0, resume=False)
    assert mon.history == [] and not (tmp_path / "monitor.csv").exists()


def test_monitor_bad_input(tmp_path):
    with pytest.raises(ValueError, match="every must be"):
        EquivarianceMonitor(PairMLPPotential(), [], str(tmp_path), every=0)
    with pytest.raises(ValueError, match="empty"):
        EquivarianceMonitor(PairMLPPotential(), [], str(tmp_path))
    with pytest.raises(ValueError, match="both in_rep and out_rep"):
        EquivarianceMonitor(lambda p: p.sum(), torch.zeros(2, 3), str(tmp_path), in_rep="point")


def test_lightning_callback(tmp_path, frames):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = CartesianMLPPotential()

        def training_step(self, batch, batch_idx):
            pos = batch.requires_grad_(True)
            return self.model(torch.tensor([6, 1, 1]), pos).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    mon = EquivarianceMonitor(None, frames[:1], str(tmp_path), every=2, n_finite=0, plot=False, dtype=torch.float32)
    loader = torch.utils.data.DataLoader([torch.randn(3, 3) for _ in range(4)], batch_size=None)
    trainer = pl.Trainer(max_steps=4, callbacks=[lightning_callback(mon, "model")], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(Module(), loader)
    assert sorted({r["step"] for r in EquivarianceMonitor.read_csv(mon.csv_path)}) == [2, 4]


def test_monitor_measures_a_sample_of_the_held_out_set_by_default(tmp_path):
    """``max_samples`` (16 by default): that many structures evenly spread over the held-out set, the same every
    measurement; ``None``: all; a measurement's rows say how many were measured."""
    held = geolie.data.load("xtb-md/ethanol", split="val")
    assert len(held) > 16
    mon = EquivarianceMonitor(PairMLPPotential().double(), held, str(tmp_path / "a"), n_finite=0, plot=False)
    assert len(mon.data) == 16
    names = [s.name for s in mon.data]
    rows = mon.measure(0)
    assert all(r["n_samples"] == 16 for r in rows)
    assert [s.name for s in mon.data] == names
    every = EquivarianceMonitor(PairMLPPotential().double(), held[:20], str(tmp_path / "b"), n_finite=0, plot=False,
                                max_samples=None)
    assert len(every.data) == 20
    with pytest.raises(ValueError, match="max_samples"):
        EquivarianceMonitor(PairMLPPotential(), held, str(tmp_path / "c"), max_samples=0)
