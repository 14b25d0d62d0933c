"""Helpers shared by the dataset recipes (checksums, splits); the recipes run as scripts from this folder."""
from __future__ import annotations

import hashlib

import numpy as np


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def splits(n: int, seed: int, fractions=(0.8, 0.1)):
    """Fixed random train/val/test split of ``range(n)`` (default 80/10/10)."""
    perm = np.random.RandomState(seed).permutation(n)
    a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
    return {"train": sorted(perm[:a].tolist()), "val": sorted(perm[a:b].tolist()), "test": sorted(perm[b:].tolist())}
