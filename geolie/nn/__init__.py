"""Exactly-equivariant baselines: frame averaging, Gaunt / spherical-grid tensor products, grid nonlinearities."""
from .frame_averaging import FrameAveraging, GeolieDegenerateFrameWarning, pca_frames
from .gaunt import GauntTensorProduct, gaunt_coefficients
from .grid_nonlinearity import SphericalGridNonlinearity

__all__ = ["FrameAveraging", "GeolieDegenerateFrameWarning", "pca_frames", "GauntTensorProduct",
           "gaunt_coefficients", "SphericalGridNonlinearity"]
