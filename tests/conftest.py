import pytest
import torch

torch.backends.cuda.matmul.allow_tf32 = False

# Tolerances used throughout: float64 answers are compared at 1e-12 (relative), float32 ones at the level
# a float32 evaluation can reach (a few hundred unit round-offs).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))
