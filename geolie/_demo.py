"""``geolie demo``: Lie derivatives of bundled models on ASE molecules (no download).

For each molecule and model the energy and forces (``geolie.conservative``) are differentiated along the six
SE(3) generators in float64, and the noise floor is the float32-vs-float64 difference of the same quantity
(scaled by u64/u32). Models: ``PairMLPPotential`` and ``E3nnPotential`` (exactly equivariant) and
``CartesianMLPPotential`` (breaks rotations on purpose).
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from ._conservative import conservative
from ._groups import SE3
from ._metrics import measure
from .neighbors import radius_graph

DEFAULT_MOLECULES = ("H2O", "CH4", "CH3CH2OH", "C6H6", "CH3COOH")


def _models():
    from .models import CartesianMLPPotential, E3nnPotential, PairMLPPotential

    return {
        "pair-mlp (equivariant)": PairMLPPotential(),
        "e3nn (equivariant)": E3nnPotential(),
        "cartesian-mlp (breaks SO(3))": CartesianMLPPotential(),
    }


def _energy_forces(model, z, edge_index):
    from .models import E3nnPotential

    if isinstance(model, E3nnPotential):
        fn = conservative(lambda pos: model(z, pos, edge_index))
    else:
        fn = conservative(lambda pos: model(z, pos))

    def ef(pos):
        e, f = fn(pos)
        return {"energy": e, "forces": f}

    return ef


def run_demo(molecules=DEFAULT_MOLECULES, json_path: Optional[str] = None, stream=None) -> Dict:
    """Run the demo, print a table, return (and optionally save) the results as a dict."""
    from ase.build import molecule
    from tqdm import tqdm

    stream = stream or sys.stdout
    torch.backends.cuda.matmul.allow_tf32 = False
    models64 = {k: m.double() for k, m in _models().items()}
    models32 = {k: m.float() for k, m in _models().items()}
    results: Dict[str, Dict] = {}
    jobs = [(mk, name) for mk in models64 for name in molecules]
    for mk, name in tqdm(jobs, desc="geolie demo", file=sys.stderr, disable=None):
        atoms = molecule(name)
        pos = torch.tensor(atoms.positions, dtype=torch.float64)
        z = torch.tensor(atoms.numbers)
        ei = radius_graph(pos, 5.0)
        rep = measure(_energy_forces(models64[mk], z, ei), pos, group=SE3, in_rep="point",
                      out_rep={"energy": "scalar", "forces": "vector"},
                      f_ref=_energy_forces(models32[mk], z, ei))
        results.setdefault(mk, {})[name] = rep
    gens = list(SE3.generator_names)
    print("\ngeolie demo: relative Lie derivative ‖L_X y‖/‖y‖ per generator (float64, jvp); floor = float32 vs "
          "float64 of the same quantity, scaled to float64", file=stream)
    for mk, per_mol in results.items():
        print(f"\n{mk}", file=stream)
        head = f"  {'molecule':<10}{'output':<8}" + "".join(f"{g:>10}" for g in gens) + f"{'floor':>10}{'verdict':>14}"
        print(head + "\n  " + "-" * (len(head) - 2), file=stream)
        for name, rep in per_mol.items():
            for out, m in rep.outputs.items():
                fl = float(np.nanmax(m.floor_rel))
                verdict = "at floor" if bool(m.at_floor.all()) else "BREAKS"
                print(f"  {name:<10}{out:<8}" + "".join(f"{m.rel[0, k]:>10.1e}" for k in range(len(gens)))
                      + f"{fl:>10.1e}{verdict:>14}", file=stream)
    data = {mk: {name: rep.to_dict() for name, rep in per.items()} for mk, per in results.items()}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(data, fh, indent=1)
        print(f"\nresults written to {json_path}", file=stream)
    return data
