"""e3nn networks with dict inputs (``e3nn.nn.models.gate_points_2101.Network`` and alike) as point-cloud models.

Such a network is called as ``net({"pos": pos, "batch": batch, ...})`` and declares ``irreps_out``; geolie audits
its output with that representation (per structure when ``reduce_output``, per point otherwise). The module's own
neighbour search (a naive ``radius_graph`` built from differentiable distances) is replaced while geolie calls it by
:func:`geolie.neighbors.radius_graph`, whose edges stay fixed at the base point, so forward-mode AD applies.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Optional

import torch

from .._torch_utils import default_dtype

from ..neighbors import radius_graph
from .torch_module import PointCloudAdapter


@contextlib.contextmanager
def _fixed_edges(module_name: str):
    mod = importlib.import_module(module_name)
    old = getattr(mod, "radius_graph", None)
    mod.radius_graph = lambda pos, r_max, batch=None: radius_graph(pos, r_max, batch)
    try:
        yield
    finally:
        if old is not None:
            mod.radius_graph = old


class _DictCall(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, extra: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.net = net
        self.extra = extra or {}
        self._module_name = type(net).__module__

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        data = {"pos": pos, "batch": torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)}
        data.update({k: v.to(pos.device) for k, v in self.extra.items()})
        with _fixed_edges(self._module_name):
            return self.net(data)


def e3nn_network(net: torch.nn.Module, name: str = "", extra: Optional[Dict[str, torch.Tensor]] = None
                 ) -> PointCloudAdapter:
    """Wrap a dict-input e3nn network (with ``irreps_out`` and ``reduce_output``) as a :class:`PointCloudAdapter`."""
    if not hasattr(net, "irreps_out"):
        raise TypeError(f"{type(net).__name__} declares no irreps_out")
    per_atom = not getattr(net, "reduce_output", True)
    return PointCloudAdapter(_DictCall(net, extra), out_rep=net.irreps_out, name=name or type(net).__name__,
                           per_atom=per_atom)


def gate_points(seed: int = 0) -> PointCloudAdapter:
    """``e3nn.nn.models.gate_points_2101.Network`` (scalar + vector output per cloud), deterministically initialized."""
    from e3nn import o3
    from e3nn.nn.models.gate_points_2101 import Network

    with default_dtype(torch.float64):  # e3nn's CG buffers in float64
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = Network(irreps_in=None, irreps_hidden="8x0e+8x0o+4x1e+4x1o", irreps_out="1x0e+1x1o",
                          irreps_node_attr=None, irreps_edge_attr=o3.Irreps.spherical_harmonics(2), layers=2,
                          max_radius=0.6, number_of_basis=8, radial_layers=1, radial_neurons=16, num_neighbors=10.0,
                          num_nodes=500.0, reduce_output=True)
    return e3nn_network(net, name="gate-points")  # kept in float64: a float32 round trip would spoil constants
