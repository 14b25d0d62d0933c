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
