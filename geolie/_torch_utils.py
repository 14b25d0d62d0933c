"""Small torch idioms used across geolie (private): a scoped default dtype and sums per segment (structure)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["default_dtype", "segment_sum"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[torch.dtype]:
    """Within the block ``torch.get_default_dtype()`` is ``dtype`` (e3nn builds its Clebsch–Gordan buffers and
    generators in the default dtype); the previous default is restored on exit, also after an error, and yielded."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield old
    finally:
        torch.set_default_dtype(old)


def segment_sum(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[s] = Σ_{i: index[i] = s} x[i]`` along the first dimension: ``[n, *x.shape[1:]]`` (per-structure sums of
    per-atom values with a PyG-style ``batch`` vector). ``index_add`` rather than torch-scatter: as fast here, and it
    composes with forward-mode AD."""
    return torch.zeros((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device).index_add(
        0, index.to(x.device).long(), x)
