"""Exactly-equivariant baselines: frame averaging, Gaunt / spherical-grid tensor products, grid nonlinearities, and
the real spherical harmonics of any degree and exact sphere grids they are built on."""
from .frame_averaging import FrameAveraging, GeolieDegenerateFrameWarning, pca_frames
from .gaunt import GauntTensorProduct, gaunt_coefficients
from .grid_nonlinearity import SphericalGridNonlinearity
from .spherical_harmonics import gauss_legendre_grid, minimal_grid, spherical_harmonics

__all__ = ["FrameAveraging", "GeolieDegenerateFrameWarning", "pca_frames", "GauntTensorProduct",
           "gaunt_coefficients", "SphericalGridNonlinearity", "spherical_harmonics", "gauss_legendre_grid",
           "minimal_grid"]
