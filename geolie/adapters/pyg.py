"""PyG models (SchNet, DimeNet++, ViSNet, ...) without pyg-lib / torch-cluster.

PyG's models call ``torch_geometric.nn.radius_graph``, which needs torch-cluster (no wheels here). While geolie
calls a model, :func:`geolie_radius_graph` points the names those modules imported at
:func:`geolie.neighbors.radius_graph` (torch-cluster itself is used when it is installed). The neighbour list is
built from detached positions, so edges stay fixed at the base point while geolie differentiates.
"""
from __future__ import annotations

import contextlib
import importlib

from ..neighbors import radius_graph as _geolie_rg
from .torch_module import TorchAdapter

_MODULES = ("torch_geometric.nn.models.schnet", "torch_geometric.nn.models.dimenet",
            "torch_geometric.nn.models.visnet")


def _has_torch_cluster() -> bool:
    try:
        import torch_cluster  # noqa: F401

        return True
    except ImportError:
        return False


def _rg(x, r, batch=None, loop=False, max_num_neighbors=32, flow="source_to_target", num_workers=1,
        batch_size=None):
    if flow != "source_to_target":
        raise ValueError("geolie's radius_graph supports flow='source_to_target' only")
    return _geolie_rg(x, r, batch, loop=loop, max_num_neighbors=max_num_neighbors)


@contextlib.contextmanager
def geolie_radius_graph():
    """Within the block, PyG's model modules use geolie's pure-torch ``radius_graph`` (unless torch-cluster is
    installed)."""
    if _has_torch_cluster():
        yield
        return
    saved = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "radius_graph"):
            saved.append((mod, mod.radius_graph))
            mod.radius_graph = _rg
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.radius_graph = fn


def uses_pyg(module) -> bool:
    """Whether ``module`` or one of its submodules is one of PyG's models (whose ``radius_graph`` geolie serves)."""
    return any(type(m).__module__.startswith("torch_geometric.nn.models") for m in module.modules())


class PyGAdapter(TorchAdapter):
    """A :class:`TorchAdapter` for modules built on PyG's models: every call runs inside
    :func:`geolie_radius_graph`."""

    def call_context(self):
        return geolie_radius_graph()


def schnet(hidden_channels: int = 64, num_interactions: int = 3, cutoff: float = 5.0, seed: int = 0):
    """PyG's SchNet, deterministically initialized (no pretrained weights are downloaded)."""
    import torch
    from torch_geometric.nn.models import SchNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SchNet(hidden_channels=hidden_channels, num_filters=hidden_channels,
                      num_interactions=num_interactions, num_gaussians=32, cutoff=cutoff)
