"""Timing and environment helpers shared by the benchmarks (warm-up, then the median of several runs)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict

import torch


def _sync() -> None:
    """Wait for queued CUDA work (a no-op where CUDA was never used), so that wall times cover the GPU's work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], warmup: int = 2, repeat: int = 7, min_time: float = 0.0) -> Dict[str, float]:
    """Median, min and max wall time (seconds) of ``fn()`` after ``warmup`` calls (CUDA work synchronized)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def device_info(device: str = "cpu") -> Dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        info["device_name"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu_count"] = os.cpu_count()
    return info


def result_path(name: str, device: str = "cpu") -> str:
    """``benchmarks/results/<name>.json`` on the CPU, ``<name>_cuda.json`` on a GPU."""
    tag = "" if device == "cpu" else "_cuda"
    return os.path.join(os.path.dirname(__file__), "results", f"{name}{tag}.json")


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def random_mace(**overrides):
    """A random-init ScaleShiftMACE built in float64 (seed 0, elements H C N O Cu); ``overrides`` replace the
    constructor's defaults here (r_max 6, max_ell 3, 128x0e hidden, correlation 3)."""
    import numpy as np
    from e3nn import o3
    from mace.modules import interaction_classes
    from mace.modules.models import ScaleShiftMACE

    z = [1, 6, 7, 8, 29]
    block = interaction_classes["RealAgnosticResidualInteractionBlock"]
    kw = dict(r_max=6.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, interaction_cls=block,
              interaction_cls_first=block, num_interactions=2, num_elements=len(z),
              hidden_irreps=o3.Irreps("128x0e"), MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(z)),
              avg_num_neighbors=20.0, atomic_numbers=z, correlation=3, gate=torch.nn.functional.silu,
              atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    kw.update(overrides)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        return ScaleShiftMACE(**kw)
    finally:
        torch.set_default_dtype(old)
