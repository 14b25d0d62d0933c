"""The engine in a few calls: Lie derivatives of a function, their floor, and the finite companion."""
import torch

import geolie
from geolie.models import PairMLPPotential

torch.manual_seed(0)
model = PairMLPPotential().double()
z = torch.tensor([8, 1, 1])
pos = torch.tensor([[0.0, 0.0, 0.12], [0.0, 0.76, -0.47], [0.0, -0.76, -0.47]], dtype=torch.float64)

ef = geolie.conservative(lambda p: model(z, p))  # (energy, forces = -dE/dpos)
L = geolie.lie_derivative(ef, pos, group=geolie.SE3, in_rep="point", out_rep=("scalar", "vector"))
print("Lie derivative shapes:", tuple(L[0].shape), tuple(L[1].shape))  # one row per generator rx ry rz tx ty tz

model32 = PairMLPPotential().float()  # same seed, same weights, float32: the other precision gives the floor
model32.load_state_dict(model.state_dict())
ef32 = geolie.conservative(lambda p: model32(z, p))
report = geolie.measure(ef, pos, out_rep=("scalar", "vector"), f_ref=ef32)
print(report.table())
fin = geolie.finite_equivariance_error(ef, pos, out_rep=("scalar", "vector"), n=16, parity=True)
print(fin.table())
