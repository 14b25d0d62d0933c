"""Exactly-equivariant baselines beside a model that is not: frame averaging around a Cartesian MLP, and a Gaunt
tensor product checked against e3nn's Wigner matrices."""
import torch
from e3nn import o3

import geolie
from geolie.models import CartesianMLPPotential
from geolie.nn import FrameAveraging, GauntTensorProduct

torch.manual_seed(0)
mols = geolie.data.load("xtb-md/aspirin", "test")[:2]
plain = CartesianMLPPotential().double()  # reads Cartesian components: breaks rotations
averaged = FrameAveraging(plain, group="SE3")  # PCA frames per structure: exactly equivariant
for name, model in (("plain", plain), ("frame-averaged", averaged)):
    report = geolie.audit(model, mols, n_finite=1, progress=False)
    a = report.aggregates()["forces"]
    print(f"{name:>15}: forces max rel. Lie derivative {a['iso_rotation']['max']:.1e}, max finite rotation error "
          f"{a['finite_max_rel']['rotation']:.1e}, verdict {a['verdict']['overall']}")

# Gaunt tensor product: grid, Fourier and dense give the same product, equivariant to rounding
irreps_in, irreps_out = "0e+1o+2e", "0e+1o+2e+3o+4e"
tp = GauntTensorProduct(irreps_in, irreps_in, irreps_out, method="grid").double()
x1, x2 = (o3.Irreps(irreps_in).randn(8, -1, dtype=torch.float64) for _ in range(2))
fin = geolie.finite_equivariance_error(tp, (x1, x2), group="SO3", in_rep=(irreps_in, irreps_in), out_rep=irreps_out,
                                       n=8)
print(f"Gaunt grid product: max relative error over 8 Haar rotations "
      f"{next(iter(fin.errors.values()))['rotation']['max_rel']:.0e} (float64)")
for method in ("fourier", "dense"):
    other = GauntTensorProduct(irreps_in, irreps_in, irreps_out, method=method).double()
    other.load_state_dict(dict(tp.named_parameters()), strict=False)  # the same per-degree weights
    print(f"  grid vs {method}: max difference {(other(x1, x2) - tp(x1, x2)).abs().max():.0e}")
