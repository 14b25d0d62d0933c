"""Loading the bundled datasets and arbitrary ASE-readable files (private; see ``geolie.data``)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

SPLITS = ("train", "val", "test", "all")


@dataclass
class ShapeSample:
    """One point cloud of the ``shapes`` dataset: ``points [n, 3]`` (float32), class ``label`` and its ``name``."""

    points: torch.Tensor
    label: int
    name: str


def _is_dataset_folder(p: Path) -> bool:
    return p.is_dir() and any((p / name / "manifest.json").is_file() for name in ("xtb-md", "emt-bulk", "shapes"))


def dataset_root() -> Path:
    """The bundled datasets folder.

    In this order: ``$GEOLIE_DATASETS`` if set; the ``geolie._datasets`` package data of an installed geolie (the
    repository's ``datasets/`` ships in the wheel; an editable install maps it to the repository's folder); the
    ``datasets/`` folder beside the ``geolie`` package in a source tree that is imported without being installed.
    """
    env = os.environ.get("GEOLIE_DATASETS")
    if env:
        root = Path(env)
        if not _is_dataset_folder(root):
            raise FileNotFoundError(f"geolie datasets folder not found at GEOLIE_DATASETS={env}: it holds no "
                                    "geolie dataset (no */manifest.json)")
        return root
    candidates = []
    try:
        spec = importlib.util.find_spec("geolie._datasets")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "datasets")
    for c in candidates:
        if _is_dataset_folder(c):
            return c
    raise FileNotFoundError(
        f"geolie datasets folder not found (looked in {', '.join(map(str, candidates))}): reinstall geolie (pip install "
        "geolie, or pip install -e . in its repository) or set GEOLIE_DATASETS to a copy of its datasets/ folder"
    )


def _manifest(name: str) -> Dict:
    path = dataset_root() / name / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"dataset {name!r} has no manifest at {path}: run python datasets/{name}/make.py")
    return json.loads(path.read_text())


def available() -> List[str]:
    """Names accepted by :func:`load` (besides file paths)."""
    names = []
    try:
        man = _manifest("xtb-md")
        names += ["xtb-md"] + [f"xtb-md/{m}" for m in man["molecules"]]
    except FileNotFoundError:
        pass
    for name in ("emt-bulk", "shapes"):
        if (dataset_root() / name / "manifest.json").exists():
            names.append(name)
    return names


def _verify(path: Path, sha: str, recipe: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != sha:
        raise ValueError(
            f"{path}: checksum mismatch (sha256 {h.hexdigest()[:12]}…, manifest {sha[:12]}…): the file is corrupt "
            f"or was modified; regenerate it with python {recipe}"
        )


def read(path: Union[str, os.PathLike], index=":", require: Sequence[str] = ()) -> List:
    """Read structures with ``ase.io.read``; check that each has the labels in ``require``.

    ``require`` may name ``"energy"``, ``"forces"``, ``"stress"``. Errors name the file and the structure.
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".gz" and Path(path.stem).suffix in (".xyz", ".extxyz"):
            # ase's extxyz reader seeks backwards, and each seek in a gzip stream decompresses it again from the
            # start (quadratic: 4 s instead of 0.3 s for 1000 structures): decompress once, in memory
            import gzip
            import io

            with gzip.open(path, "rt") as fh:
                text = fh.read()
            structures = ase.io.read(io.StringIO(text), index=index, format="extxyz")
        else:
            structures = ase.io.read(str(path), index=index)
    except Exception as e:  # noqa: BLE001 - any parse failure: one clear error naming the file
        raise ValueError(f"{path}: cannot be read by ase.io ({type(e).__name__}: {e}); is it truncated or corrupt?") \
            from None
    structures = structures if isinstance(structures, list) else [structures]
    if not structures:
        raise ValueError(f"{path}: contains no structures")
    for i, at in enumerate(structures):
        results = at.calc.results if at.calc is not None else {}
        missing = [k for k in require if k not in results]
        if missing:
            raise ValueError(f"{path}: structure {i} has no {', '.join(missing)} label(s); present: {sorted(results)}")
        if len(at) == 0:
            raise ValueError(f"{path}: structure {i} is empty (no atoms)")
    return structures


def _select(items: List, split: str, splits: Optional[Dict[str, List[int]]], name: str) -> List:
    if split == "all":
        return items
    if splits is None or split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; choose from {sorted((splits or {}).keys()) + ['all']}")
    return [items[i] for i in splits[split]]


def _load_xtb(molecule: str, split: str, verify: bool) -> List:
    man = _manifest("xtb-md")
    if molecule not in man["molecules"]:
        raise ValueError(f"unknown xtb-md molecule {molecule!r}; available: {sorted(man['molecules'])}")
    files = man["molecules"][molecule]["files"]
    if split == "shift":
        entry, sub = files["300"], "all"
    else:
        entry, sub = files["500"], split
    path = dataset_root() / "xtb-md" / entry["file"]
    if verify:
        _verify(path, entry["sha256"], "datasets/xtb-md/make.py")
    structures = read(path, require=("energy", "forces"))
    if len(structures) != entry["frames"]:
        raise ValueError(f"{path}: {len(structures)} structures where the manifest records {entry['frames']}")
    for at in structures:
        at.info["molecule"] = molecule
    return _select(structures, sub, entry.get("splits"), f"xtb-md/{molecule}")


def load(name: str, split: str = "all", *, verify: bool = True):
    """Load a bundled dataset split (see the package docstring) or any file ``ase.io`` reads.

    Returns a list of ASE ``Atoms`` (labels through ``atoms.get_potential_energy()``, ``get_forces()``,
    ``get_stress()``), or of :class:`ShapeSample` for ``"shapes"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"load: name must be a string, got {type(name).__name__}")
    if split not in SPLITS + ("shift",):
        raise ValueError(f"load: unknown split {split!r}; choose from {list(SPLITS) + ['shift']}")
    if name == "xtb-md":
        out = []
        for mol in _manifest("xtb-md")["molecules"]:
            out += _load_xtb(mol, split, verify)
        return out
    if name.startswith("xtb-md/"):
        return _load_xtb(name.split("/", 1)[1], split, verify)
    if name in ("emt-bulk", "shapes"):
        if split == "shift":
            raise ValueError(f"{name}: has no 'shift' split")
        entry = _manifest(name)["files"]["all"]
        path = dataset_root() / name / entry["file"]
        if verify:
            _verify(path, entry["sha256"], f"datasets/{name}/make.py")
        if name == "emt-bulk":
            items = read(path, require=("energy", "forces", "stress"))
        else:
            try:
                with np.load(path) as z:
                    pts, off, lab, cls = z["points"], z["offsets"], z["labels"], z["classes"]
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
            items = [ShapeSample(torch.from_numpy(pts[off[i]:off[i + 1]].copy()), int(lab[i]), str(cls[lab[i]]))
                     for i in range(len(lab))]
        return _select(items, split, entry.get("splits"), name)
    if os.path.exists(name):
        if split != "all":
            raise ValueError(f"{name}: a file has no predefined splits; use split='all'")
        return read(name)
    raise ValueError(f"unknown dataset {name!r}: not a file, and not one of {available()}")


def to_pyg(items, dtype: torch.dtype = torch.float64):
    """Convert ``Atoms`` (or :class:`ShapeSample`) to a ``torch_geometric.data.Batch``.

    Fields: ``z`` (long), ``pos`` ``[N, 3]``, ``cell`` ``[B, 3, 3]`` for periodic structures, ``energy`` ``[B]``,
    ``forces`` ``[N, 3]``, ``stress`` ``[B, 3, 3]`` where labelled; shapes give ``pos`` and ``y``.
    """
    from torch_geometric.data import Batch, Data

    items = list(items)
    if not items:
        raise ValueError("to_pyg: nothing to convert (empty list)")
    datas = []
    for i, it in enumerate(items):
        if isinstance(it, ShapeSample):
            datas.append(Data(pos=it.points.to(dtype), y=torch.tensor([it.label])))
            continue
        d = Data(z=torch.as_tensor(it.numbers, dtype=torch.long), pos=torch.as_tensor(it.positions, dtype=dtype))
        if it.pbc.any():
            d.cell = torch.as_tensor(np.asarray(it.cell), dtype=dtype)[None]
        res = it.calc.results if it.calc is not None else {}
        if "energy" in res:
            d.energy = torch.tensor([float(res["energy"])], dtype=dtype)
        if "forces" in res:
            d.forces = torch.as_tensor(res["forces"], dtype=dtype)
        if "stress" in res:
            s = np.asarray(res["stress"], dtype=np.float64)
            if s.shape == (6,):
                from ase.stress import voigt_6_to_full_3x3_stress

                s = voigt_6_to_full_3x3_stress(s)
            d.stress = torch.as_tensor(s, dtype=dtype)[None]
        datas.append(d)
    return Batch.from_data_list(datas)
