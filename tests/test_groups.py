import math

import pytest
import torch

import geolie
from geolie import SE3, SO3, hat, so3_exp, vee


def test_names_and_dims():
    assert SO3.dim == 3 and SE3.dim == 6
    assert SO3.generator_names == ("rx", "ry", "rz")
    assert SE3.generator_names == ("rx", "ry", "rz", "tx", "ty", "tz")
    assert SO3.generators().shape == (3, 3, 3) and SE3.generators().shape == (6, 4, 4)


def test_generators_are_levi_civita_and_e3nn():
    from e3nn import o3

    X = SO3.generators()
    eps = torch.zeros(3, 3, 3, dtype=torch.float64)
    for i, j, k in [(0, 1, 2), (1, 2, 0), (2, 0, 1)]:
        eps[i, j, k], eps[i, k, j] = 1, -1
    assert torch.equal(X, -eps)
    assert torch.allclose(X, o3.so3_generators(1).double())


def test_rz_is_counter_clockwise():
    R = SO3.exp(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    assert torch.allclose(torch.tensor([1.0, 0, 0], dtype=torch.float64) @ R.T,
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("theta", [0.0, 1e-9, 1e-4, 0.3, 2.0, 3.1])
def test_exp_matches_matrix_exp(theta):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    w = theta * w / w.norm()
    assert torch.allclose(so3_exp(w), torch.linalg.matrix_exp(hat(w)), atol=1e-14)
    xi = torch.cat([w, torch.randn(3, generator=g, dtype=torch.float64)])
    R, t = SE3.exp(xi)
    M = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", xi, SE3.generators()))
    assert torch.allclose(R, M[:3, :3], atol=1e-14) and torch.allclose(t, M[:3, 3], atol=1e-14)


def test_exp_single_translation_generator_is_a_translation():
    R, t = SE3.exp(torch.tensor([0, 0, 0, 0.5, 0, 0], dtype=torch.float64))
    assert torch.equal(R, torch.eye(3, dtype=torch.float64)) and torch.allclose(t, torch.tensor([0.5, 0, 0]).double())


def test_hat_vee():
    w = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    assert torch.allclose(vee(hat(w)), w)
    assert torch.allclose((hat(w) @ v[..., None])[..., 0], torch.cross(w, v, dim=-1))


def test_random_is_haar():
    g = torch.Generator().manual_seed(0)
    R = SO3.random(4000, g)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4000, 3, 3), atol=1e-13)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4000, dtype=torch.float64), atol=1e-13)
    # Haar: E[R] = 0 and E[tr(R)^2] = 1 (the trace's second moment for SO(3)); sampling error ~ 1/sqrt(n)
    assert R.mean(0).abs().max() < 0.05
    assert abs(float((R.diagonal(dim1=1, dim2=2).sum(-1) ** 2).mean()) - 1.0) < 0.1
    R2 = SO3.random(3, torch.Generator().manual_seed(5))
    assert torch.equal(R2, SO3.random(3, torch.Generator().manual_seed(5)))
    Rt, t = SE3.random(100, g, box=2.0)
    assert t.abs().max() <= 2.0 and Rt.shape == (100, 3, 3)


def test_bad_group_and_xi():
    with pytest.raises(ValueError, match="unknown group"):
        geolie.as_group("SU2")
    with pytest.raises(ValueError, match="trailing dimension 6"):
        SE3.exp(torch.zeros(3))


def test_log_inverts_exp():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 3, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=-1, keepdim=True) * torch.rand(200, 1, generator=g, dtype=torch.float64) * 3.1
    w[:3] *= 1e-9  # tiny angles
    assert torch.allclose(geolie.so3_log(so3_exp(w)), w, atol=1e-12)
    R = SO3.random(50, g)
    assert torch.allclose(so3_exp(geolie.so3_log(R)), R, atol=1e-12)


def test_irreps_action_matches_e3nn_away_from_identity():
    from e3nn import o3

    R = SO3.random(5, torch.Generator().manual_seed(4))
    ir = o3.Irreps("1x0e+2x1o+1x2e+1x3o")
    rep = geolie.as_rep(ir)
    for r in R:  # e3nn computes in the default dtype (float32 here): compare at its precision
        assert torch.allclose(rep.D(r), ir.D_from_matrix(r).double(), atol=1e-5)
        assert torch.allclose(rep.D(-r), ir.D_from_matrix(-r).double(), atol=1e-5)
        assert torch.allclose(rep.D(r)[1:4, 1:4], r, atol=1e-13)  # 1o: D(R) = R, to float64 precision
        D = rep.D(r)
        assert torch.allclose(D @ D.T, torch.eye(ir.dim, dtype=torch.float64), atol=1e-13)
