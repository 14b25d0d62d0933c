"""Hunt the orientation where a model breaks worst. The planted model is exact except for bonds within ~0.01 rad
of the y axis (as a tie-break on coordinate axes would be): random rotations never see it, the hunt does."""
import torch
from ase.build import molecule

import geolie


class YBondBump(torch.nn.Module):
    def forward(self, z, pos, batch):
        i, j = torch.triu_indices(len(pos), len(pos), 1)
        d = pos[j] - pos[i]
        r = d.norm(dim=-1)
        bump = torch.exp(-(1 - (d[:, 1] / r) ** 2) / 0.01 ** 2) * (r < 1.6)  # bonds along y only
        return (torch.exp(-r) + bump).sum().reshape(1)


mol = molecule("CH3OH")
mol.rotate(37, (1, 2, 3))  # a generic orientation: no bond near the y axis to begin with
result = geolie.hunt(YBondBump(), mol, dtype=torch.float64, out_dir="hunt-out", tag="methanol")
for name, o in result.outputs.items():
    print(f"{name:>7}: random rotations {o['random_error']:.1e}, worst found {o['worst_error']:.2e} "
          f"(floor {o['floor']:.0e}) by '{o['found_by']}'")
print(f"{result.model_calls} model calls; written:", *sorted(__import__("os").listdir("hunt-out")))
