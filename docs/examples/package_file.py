"""Audit a MACE model file (a random-init ScaleShiftMACE saved as mace_run_train saves it; load yours the same way).

NequIP, Orb, fairchem and MatterSim files go the same way: nequip:PATH, orb:ARCH:WEIGHTS, fairchem:PATH,
mattersim:PATH.
"""
import numpy as np
import torch
from ase.build import molecule
from e3nn import o3
from mace.modules import interaction_classes
from mace.modules.models import ScaleShiftMACE

import geolie

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # MACE computes its coupling coefficients in the default dtype
block = interaction_classes["RealAgnosticResidualInteractionBlock"]
z = [1, 6, 8]
model = ScaleShiftMACE(r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
                       interaction_cls_first=block, num_interactions=2, num_elements=len(z),
                       hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
                       atomic_energies=np.zeros(len(z)), avg_num_neighbors=8.0, atomic_numbers=z, correlation=2,
                       gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
torch.set_default_dtype(torch.float32)
torch.save(model, "small.model")

report = geolie.audit("mace:small.model", [molecule("CH3CH2OH"), molecule("CH4")], n_finite=1, progress=False)
print(report.table())
