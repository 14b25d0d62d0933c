"""Datasets with real labels, offline: ``geolie.data.load(name, split=...)``.

Bundled (recipes and files in the repository's top-level ``datasets/``):

* ``"xtb-md/<molecule>"`` (or ``"xtb-md"`` for all eight): GFN2-xTB Langevin MD of ethanol, malonaldehyde,
  benzene, toluene, uracil, aspirin, naphthalene, salicylic_acid; splits ``train``/``val``/``test`` (500 K) and
  ``shift`` (300 K). ASE ``Atoms`` with energy (eV) and forces (eV/Å).
* ``"emt-bulk"``: periodic metal cells with EMT energy, forces and stress (eV/Å³); ``train``/``val``/``test``.
* ``"shapes"``: procedural point clouds in a canonical orientation, 12 classes; :class:`ShapeSample` items.

Any other string is read as a file with ``ase.io`` (extxyz, xyz, cif, POSCAR, traj, ...). ``to_pyg`` converts to
``torch_geometric`` ``Data``/``Batch`` with ``z, pos, cell, energy, forces, stress`` (or ``pos, y`` for shapes).
Files are verified against the manifest's sha256 on load (``verify=False`` skips it).
"""
from ._load import ShapeSample, available, dataset_root, load, read, to_pyg

__all__ = ["load", "read", "available", "to_pyg", "ShapeSample", "dataset_root"]
