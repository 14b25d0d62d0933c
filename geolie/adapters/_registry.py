"""The model registry: short names and ``package.module:factory`` specs, resolved to adapters by :func:`load_model`."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._protocol import Adapter
from .ase_calc import CalculatorAdapter
from .torch_module import PointCloudAdapter, TorchAdapter, signature_kind

SHORT_NAMES: Dict[str, str] = {
    "pair-mlp": "geolie.models:PairMLPPotential",
    "e3nn": "geolie.models:E3nnPotential",
    "cartesian-mlp": "geolie.models:CartesianMLPPotential",
    "gaunt": "geolie.models:GauntPotential",
    "schnet": "geolie.adapters.pyg:schnet",
    "emt": "geolie.adapters.ase_calc:emt",
    "ani1x": "geolie.adapters.pretrained:ani1x",
    "sevenn-0": "geolie.adapters.pretrained:sevenn0",
    "gate-points": "geolie.adapters.e3nn_models:gate_points",
    "chgnet": "geolie.adapters.pretrained:chgnet",
}

#: ``PREFIX:PATH`` model files of interatomic-potential packages: prefix -> (loader, pip extra, import name,
#: what the file is)
FILE_PACKAGES: Dict[str, Tuple[str, str, str, str]] = {
    "mace": ("geolie.adapters.mace:load", "mace", "mace", "a MACE model file (torch.save of the model)"),
    "nequip": ("geolie.adapters.nequip:load", "nequip", "nequip",
               "a NequIP/Allegro checkpoint (.ckpt) or package (.nequip.zip)"),
    "orb": ("geolie.adapters.orb:load", "orb", "orb_models",
            "an Orb model: ARCHITECTURE:WEIGHTS.ckpt (a state dict) or PATH (torch.save of the model)"),
    "fairchem": ("geolie.adapters.fairchem:load", "fairchem", "fairchem.core",
                 "a fairchem inference checkpoint (UMA, eSEN): PATH, or TASK:PATH for a multi-task model"),
    "mattersim": ("geolie.adapters.mattersim:load", "mattersim", "mattersim",
                  "a MatterSim model file (Potential.save; M3GNet, float32 only)"),
    "metatomic": ("geolie.adapters.metatomic:load", "metatomic", "metatomic.torch",
                  "an exported metatomic AtomisticModel (.pt, TorchScript; loaded without unpickling)"),
    "torchsim": ("geolie.adapters.torchsim:load", "torchsim", "torch_sim",
                 "a TorchSim ModelInterface: torchsim:package.module:factory (called with dtype= when it takes it)"),
}

#: extras whose package must then be installed without its pins (see the docs, tutorials/package-files.md)
NO_DEPS = {"mace": "mace-torch==0.3.16", "mattersim": "mattersim==1.2.3"}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, run in a clone of geolie (``pip install -e``), with the ``--no-deps``
    step where the package's own pins must be bypassed."""
    cmd = f"pip install -e '.[{extra}]'"
    if extra in NO_DEPS:
        cmd += f" && pip install --no-deps {NO_DEPS[extra]}"
    return cmd + " (in a clone of geolie; from an installed wheel: pip install 'geolie[" + extra + "]')"


#: the optional extra each short name needs ("" for none)
EXTRAS: Dict[str, str] = {"schnet": "", "ani1x": "pretrained", "sevenn-0": "sevenn", "chgnet": "chgnet"}


def load_model(spec: Any, *, device: Optional[str] = None, out_rep: Any = None, per_atom: Optional[bool] = None
               ) -> Adapter:
    """A :class:`Adapter` from a short name (``pair-mlp``, ``e3nn``, ``cartesian-mlp``, ``gaunt``, ``schnet``,
    ``emt``, ``ani1x``, ``sevenn-0``, ``chgnet``), a model file of a potential package (``mace:PATH``,
    ``nequip:PATH``, ``orb:ARCH:WEIGHTS`` or ``orb:PATH``, ``fairchem:[TASK:]PATH``, ``mattersim:PATH``; see
    :data:`FILE_PACKAGES`), a
    ``package.module:factory`` string (the factory returns an
    ``nn.Module`` or an ASE ``Calculator``), or such an object directly. A module whose ``forward`` takes positions
    only is a :class:`PointCloudAdapter` with an invariant output unless ``out_rep`` declares another (``per_atom``:
    its first dimension follows the points). For other torch modules ``out_rep`` declares the outputs beyond energy,
    forces and stress (a dict). ``device``: where torch models run (calculators stay on the CPU).
    """
    pot = _resolve(spec)
    if isinstance(pot, PointCloudAdapter):
        if out_rep is not None:
            pot.out_rep = out_rep
        if per_atom is not None:
            pot.per_atom = per_atom
    elif isinstance(pot, TorchAdapter) and isinstance(out_rep, dict):
        pot.extra_rep.update(out_rep)
    if device is not None and not isinstance(pot, CalculatorAdapter):
        pot.to(device)
    return pot


def _resolve(spec: Any) -> Adapter:
    if isinstance(spec, Adapter):
        return spec
    name = None
    if isinstance(spec, str) and spec.split(":", 1)[0] in FILE_PACKAGES:
        prefix, path = spec.split(":", 1)
        loader = FILE_PACKAGES[prefix][0]
        mod_name, attr = loader.split(":")
        return getattr(importlib.import_module(mod_name), attr)(path)
    if isinstance(spec, str):
        name = spec
        target = SHORT_NAMES.get(spec, spec)
        if ":" not in target:
            raise ValueError(f"unknown model {spec!r}: use a short name {sorted(SHORT_NAMES)} or "
                             "'package.module:factory'")
        mod_name, attr = target.split(":", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model {spec!r}: cannot import {mod_name!r} ({e})") from None
        if not hasattr(mod, attr):
            raise ValueError(f"model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        factory = getattr(mod, attr)
        obj = factory() if callable(factory) else factory
    else:
        obj = spec
    if isinstance(obj, Adapter):
        return obj
    if any(c.__name__ == "ModelInterface" and c.__module__.startswith("torch_sim") for c in type(obj).__mro__):
        from .torchsim import TorchSimAdapter

        return TorchSimAdapter(obj, name=name or type(obj).__name__)
    if isinstance(obj, torch.nn.Module):
        if signature_kind(obj) == "pos":  # a model on one point cloud: invariant output unless declared
            return PointCloudAdapter(obj, name=name or type(obj).__name__)
        from .pyg import PyGAdapter, uses_pyg

        cls = PyGAdapter if uses_pyg(obj) else TorchAdapter
        return cls(obj, name=name or type(obj).__name__)
    from ase.calculators.calculator import BaseCalculator

    if isinstance(obj, BaseCalculator):
        return CalculatorAdapter(obj, name=name or type(obj).__name__)
    raise TypeError(f"model {spec!r}: the factory returned a {type(obj).__name__}; expected a torch.nn.Module, an "
                    "ASE Calculator or a geolie.adapters.Adapter")


def available_models() -> List[Dict[str, Any]]:
    """What ``geolie models`` lists: every short name and file prefix, the extra it needs and whether what it needs
    imports now (``importable``; ``reason`` when not). Nothing is loaded or built."""
    rows = []
    for name, target in SHORT_NAMES.items():
        mod = target.split(":")[0]
        needs = {"ani1x": "torchani", "sevenn-0": "sevenn", "chgnet": "chgnet", "schnet": "torch_geometric",
                 "gate-points": "e3nn", "emt": "ase"}.get(name, mod)
        ok, why = _importable(needs)
        rows.append({"name": name, "kind": "short name", "extra": EXTRAS.get(name, ""), "importable": ok,
                     "reason": why, "what": target})
    for prefix, (loader, extra, needs, what) in FILE_PACKAGES.items():
        ok, why = _importable(needs)
        rows.append({"name": f"{prefix}:PATH", "kind": "model file", "extra": extra, "importable": ok,
                     "reason": why, "what": what})
    return rows


def _importable(module: str) -> Tuple[bool, str]:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return False, str(e)
    return (True, "") if found else (False, f"{module} is not installed")
