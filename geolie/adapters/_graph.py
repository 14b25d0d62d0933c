"""The shared part of the adapters for interatomic-potential packages (MACE, NequIP, Orb, fairchem, MatterSim).

These packages take a *neighbour graph* built outside the model: an edge list ``(i, j)`` with integer periodic
shifts ``S`` (ASE's convention, the edge vector is ``pos[j] − pos[i] + S · cell``), and compute forces and stress
inside ``forward`` from their energy with ``torch.autograd.grad``. :class:`GraphPotentialAdapter` gives each of them
the same treatment, so that a package's file only says how to call its model:

* the graph is built once per structure with :func:`geolie.neighbors.neighbor_list` at the model's cutoff and held
  fixed at (and infinitesimally near) the base geometry: the Lie derivative sees the model as a smooth function of
  the positions and the cell (edge vectors and lattice shifts recomputed from them). Finite rotations,
  translations and permutations move farther and rebuild it, as the package's own calculator would;
* the positions handed to the model are connected to autograd without dropping a forward-mode tangent
  (:func:`geolie.adapters.with_autograd`), and the model's force computation runs with ``create_graph`` (the
  package's "training" switch): forward-over-reverse through the model's own forces, exact;
* molecules are batched (several structures per call, one graph each, no edge across structures), the finite
  checks' rotated, translated and permuted copies too (``Evaluation.stack``); periodic structures go one per call
  (a cell per call);
* outputs are reported as the model returns them, with where each came from (``Evaluation.sources``).

A package file subclasses the adapter and implements :meth:`GraphPotentialAdapter._run`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._registry import install_hint

from .. import _evaluation as ev_mod
from .._evaluation import Evaluation, stacked_batch
from ._protocol import Adapter, CopyCache, Structure, with_autograd

#: where the model's autograd stress comes from (reported in ``Evaluation.sources``)
MODEL_AUTOGRAD_STRESS = "strain derivative (model autograd)"


class ModelFileError(ValueError):
    """A model file that cannot be used: missing, unreadable, or saved by another package."""


def require(module: str, extra: str, package: Optional[str] = None):
    """``import module`` or a clear error naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"the {package or module!r} package is needed for this model ({e}); install it with "
                         f"{install_hint(extra)}") from None


def check_file(path: str, package: str) -> str:
    """``path`` as given, or a :class:`ModelFileError` when it does not exist or is not a file."""
    if not path:
        raise ModelFileError(f"{package}: no model file given (use --model {package}:PATH)")
    if not os.path.exists(path):
        raise ModelFileError(f"{package}: model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"{package}: {path!r} is not a file")
    return path


def weights_only_load(path: str, package: str):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, nothing in the file is executed.
    A file that needs more (pickled classes or functions) is refused with a :class:`ModelFileError`."""
    check_file(path, package)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the file holds more than weights (or is not a torch file)
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split(". ")[0][:160]
        raise ModelFileError(f"{package}: {path!r} is not a plain weights file (loading it would unpickle code, which "
                             f"geolie does not do for weights): {type(e).__name__}: {first}") from None


def torch_load(path: str, package: str):
    """``torch.load(path)`` (full unpickling: these files hold modules) or a :class:`ModelFileError` naming the file
    and the cause (a truncated or corrupt file, a file of another kind). **Loading is executing**: unpickling a
    module runs code from the file; open only files you trust (``geolie models`` and the CLI help say so)."""
    check_file(path, package)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's problem, said with its cause
        raise ModelFileError(f"{package}: cannot read model file {path!r}: {type(e).__name__}: {e}") from None


@dataclass
class Graph:
    """A neighbour graph of one structure or of a batch of molecules (``i``, ``j``, ``S`` as in the module doc).

    ``z [N]`` atomic numbers, ``batch [N]`` structure index, ``i``/``j [E]`` edge ends, ``S [E, 3]`` integer
    lattice shifts (float, in the model's dtype), ``n_structures``, ``periodic``."""

    z: torch.Tensor
    batch: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    S: torch.Tensor
    n_structures: int
    periodic: bool

    @property
    def ptr(self) -> torch.Tensor:
        counts = torch.bincount(self.batch, minlength=self.n_structures)
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    def edge_vectors(self, pos: torch.Tensor, cell: Optional[torch.Tensor]) -> torch.Tensor:
        """``pos[j] − pos[i] + S · cell`` (differentiable in ``pos`` and ``cell``)."""
        d = pos[self.j] - pos[self.i]
        if self.periodic and cell is not None:
            d = d + self.S @ cell.reshape(3, 3)
        return d


def build_graph(z: torch.Tensor, pos: torch.Tensor, cell: Optional[torch.Tensor], batch: Optional[torch.Tensor],
                cutoff: float, dtype: torch.dtype, device) -> Graph:
    """The neighbour graph at ``cutoff`` (geolie's cell list, equal to ASE's ``neighbor_list``; tested)."""
    from ..neighbors import neighbor_list

    n = pos.shape[0]
    b = torch.zeros(n, dtype=torch.long) if batch is None else batch.detach().cpu().long()
    p = pos.detach().cpu().double()
    c = None if cell is None else cell.detach().cpu().double().reshape(3, 3)
    i, j, S = neighbor_list(p, cutoff, cell=c, batch=None if c is not None else b)
    return Graph(z.to(device), b.to(device), i.to(device), j.to(device), S.to(device=device, dtype=dtype),
                 int(b.max()) + 1 if n else 1, c is not None)


def atoms_per_structure(z: torch.Tensor, pos: torch.Tensor, cell: Optional[torch.Tensor],
                        batch: Optional[torch.Tensor]) -> list:
    """ASE ``Atoms`` of each structure (``batch`` says which atom is whose; positions as given, in float64; the cell's
    rows and periodic boundaries when a cell is given), for packages that build their graph from ASE objects."""
    import numpy as np
    from ase import Atoms

    zs, ps = z.detach().cpu().numpy(), pos.detach().cpu().double().numpy()
    b = np.zeros(len(zs), dtype=int) if batch is None else batch.detach().cpu().numpy()
    c = None if cell is None else cell.detach().cpu().double().numpy().reshape(3, 3)
    return [Atoms(numbers=zs[b == k], positions=ps[b == k], cell=c, pbc=c is not None)
            for k in range(int(b.max()) + 1)]


def near(pos: torch.Tensor, z: torch.Tensor, cell: Optional[torch.Tensor], p0: torch.Tensor, z0: torch.Tensor,
         c0: Optional[torch.Tensor], tol: float = 1e-3) -> bool:
    """At (or infinitesimally near) the geometry a graph was built for: same atoms in the same order, positions and
    cell within ``tol`` Å. Finite rotations, translations and permutations move farther and rebuild it."""
    if z.shape != z0.shape or not torch.equal(z.detach().cpu(), z0):
        return False
    if float((pos.detach().cpu().double() - p0).abs().max()) > tol:
        return False
    if (cell is None) != (c0 is None):
        return False
    return cell is None or float((cell.detach().cpu().double().reshape(3, 3) - c0).abs().max()) <= tol


class GraphPotentialAdapter(Adapter):
    """A potential from a package that takes a neighbour graph; see the module docstring.

    Subclasses set ``package`` (the short name, ``mace``), ``extra`` (the pip extra) and implement :meth:`_run`.
    ``module``: the package's model (not modified: the audit works on per-dtype copies); ``cutoff`` in Å;
    ``elements``: the atomic numbers it covers; ``path``: the file it was loaded from (said in reports).
    """

    package = "potential"
    extra = ""
    method = "jvp"
    #: output name -> (representation, per atom); outputs a model returns beyond these are not audited
    OUTPUTS: Dict[str, Tuple[str, bool]] = {"energy": ("scalar", False), "forces": ("vector", True),
                                            "stress": ("stress", False)}

    def __init__(self, module: torch.nn.Module, *, path: str = "", name: str = "", cutoff: float,
                 elements: Optional[Sequence[int]] = None):
        self._module = module
        self._cache = CopyCache(module, self._prepare)
        self.path = path
        self.name = name or (f"{self.package}:{os.path.basename(path)}" if path else self.package)
        self.cutoff = float(cutoff)
        self.elements = None if elements is None else tuple(int(z) for z in elements)

    # -- what a package file provides ----------------------------------------------------------------------------
    def _prepare(self, m: torch.nn.Module) -> torch.nn.Module:
        """The per-dtype copy made ready to run (``eval()`` by default)."""
        return m.eval()

    def _run(self, m: torch.nn.Module, pos: torch.Tensor, cell: Optional[torch.Tensor], g: Graph,
             stress: bool) -> Dict[str, torch.Tensor]:
        """The model on ``pos [N, 3]`` (connected to autograd), ``cell [3, 3]`` or ``None`` and the graph:
        a dict with ``energy [B]``, ``forces [N, 3]`` (the model's own, with ``create_graph``), ``stress [B, 3, 3]``
        when ``stress`` (periodic), and any other :attr:`OUTPUTS` the model returns."""
        raise NotImplementedError

    def _energy_pass_outputs(self) -> set:
        """Outputs :meth:`_run_energy` returns (the model's energy pass without its forces); none by default."""
        return set()

    def _run_energy(self, m: torch.nn.Module, pos: torch.Tensor, g: Graph) -> Dict[str, torch.Tensor]:
        """The model on a molecule's (or batch's) ``pos`` without computing forces: the outputs of
        :meth:`_energy_pass_outputs`, as :meth:`_run` returns them."""
        raise NotImplementedError

    def _graph(self, z: torch.Tensor, pos: torch.Tensor, cell: Optional[torch.Tensor], batch: Optional[torch.Tensor],
               dtype: torch.dtype):
        """The neighbour graph handed to :meth:`_run` (geolie's :func:`build_graph` at ``cutoff``; a package whose
        graph carries more than edges, such as Orb's ``AtomGraphs``, builds its own)."""
        return build_graph(z, pos, cell, batch, self.cutoff, dtype, self.device)

    def sources(self) -> Dict[str, str]:
        """Where each output comes from (see :mod:`geolie._evaluation`)."""
        return {"energy": ev_mod.MODEL, "forces": ev_mod.MODEL_AUTOGRAD_FORCES, "stress": MODEL_AUTOGRAD_STRESS}

    def notes(self, dtype: torch.dtype) -> List[str]:
        return []

    # -- the adapter protocol ------------------------------------------------------------------------------------
    def copy_for(self, dtype: torch.dtype) -> torch.nn.Module:
        return self._cache.get(self.device, dtype)[0]

    def can_batch(self, st: Structure) -> bool:
        return st.cell is None

    def _evaluation(self, pos, z, cell, batch, dtype, where: str) -> Evaluation:
        if not self.dtypes or dtype not in self.dtypes:
            raise ValueError(f"{where}: model {self.name!r} does not run in {dtype} ({self.dtype_note or 'see dtypes'})")
        m, cast_notes = self._cache.get(self.device, dtype)
        periodic = cell is not None
        if periodic and abs(float(torch.linalg.det(cell.detach().double()))) < 1e-9:
            raise ValueError(f"{where}: the cell is degenerate (zero volume)")
        base = self._graph(z, pos, cell, batch, dtype)
        z0, p0 = z.detach().cpu(), pos.detach().cpu().double()
        c0 = None if cell is None else cell.detach().cpu().double().reshape(3, 3)
        n_struct = 1 if batch is None else int(batch.max()) + 1
        with torch.enable_grad():
            out0 = self._run(m, with_autograd(pos), cell, base, periodic)
        keys = [k for k in self.OUTPUTS if k in out0 and out0[k] is not None and (k != "stress" or periodic)]
        if "energy" not in keys:
            raise ValueError(f"{where}: model {self.name!r} returned no energy (outputs: {sorted(out0)})")

        def fn(p, zz, c=None):
            g = base if near(p, zz, c, p0, z0, c0) else self._graph(zz, p, c, batch, dtype)
            out = self._run(m, with_autograd(p), c, g, periodic)
            res = {}
            for k in keys:
                v = out[k]
                if k == "energy":
                    v = v.reshape(n_struct) if batch is not None else v.reshape(1)
                elif k == "stress":
                    v = v.reshape(3, 3)
                elif not self.OUTPUTS[k][1] and batch is None:
                    v = v.reshape(v.shape[1:]) if v.dim() > 0 and v.shape[0] == 1 else v
                res[k] = v.to(p.dtype)
            return res

        if self.sources().get("forces") == ev_mod.MODEL_AUTOGRAD_FORCES:
            # the forces are the energy's autograd gradient: the Lie derivative may use their symmetric Jacobian
            # (geolie._lie's "hvp-forces", accepted only where its adjoint test finds it symmetric to rounding)
            fn._geolie_autograd_forces = ("energy", "forces")
            energy_keys = [k for k in keys if k not in ("energy", "forces")]
            if energy_keys and not periodic and self._energy_pass_outputs() >= set(energy_keys):

                def energy_outputs(p, zz):  # the model without its forces: forward mode for per-atom energies
                    g = base if near(p, zz, None, p0, z0, c0) else self._graph(zz, p, None, batch, dtype)
                    return self._run_energy(m, p, g)

                energy_outputs.outputs = tuple(energy_keys)
                fn._geolie_energy_outputs = energy_outputs

        def stack(k: int):  # k copies of these molecules as one batch, one graph per copy built from its positions
            bk = stacked_batch(batch, pos.shape[0], k, self.device)

            def fn_k(p, zz):
                out = self._run(m, with_autograd(p), None, self._graph(zz, p, None, bk, dtype), False)
                res = {key: out[key] for key in keys}
                res["energy"] = res["energy"].reshape(k * n_struct)
                return {key: v.to(p.dtype) for key, v in res.items()}

            return fn_k

        x = (pos, z, cell) if periodic else (pos, z)
        in_rep = ("point", None, "cell") if periodic else ("point", None)
        src = self.sources()
        return Evaluation(fn, x, in_rep, {k: self.OUTPUTS[k][0] for k in keys}, batch=batch,
                          per_atom={k: self.OUTPUTS[k][1] for k in keys},
                          sources={k: src.get(k, ev_mod.MODEL) for k in keys}, method=self.method,
                          notes=list(cast_notes) + self.notes(dtype) + ([self.dtype_note] if self.dtype_note else []),
                          stack=None if periodic else stack)

    def evaluation(self, st: Structure, dtype: torch.dtype) -> Evaluation:
        pos, z = self.inputs(st, dtype)
        cell = None if st.cell is None else torch.as_tensor(st.cell, dtype=dtype, device=self.device)
        return self._evaluation(pos, z, cell, None, dtype, st.name or "structure")

    def batch_evaluation(self, sts: Sequence[Structure], dtype: torch.dtype) -> Evaluation:
        """Several molecules in one call (one graph each, no edge across structures); per-structure outputs."""
        if not all(self.can_batch(st) for st in sts):
            raise ValueError(f"{self.name}: periodic structures are audited one per call; use batch_size=1")
        pos, z, batch = self.batch_inputs(sts, dtype)
        return self._evaluation(pos, z, None, batch, dtype, f"batch of {len(sts)}")

    def layerwise_target(self, st: Structure, dtype: torch.dtype):
        """The model copy and its energy as a function of the positions (molecules; a cell would have to rotate
        with them, which the layer-wise pass does not do)."""
        if st.cell is not None:
            return None
        ev = self.evaluation(st, dtype)
        z = ev.inputs[1]
        return self.copy_for(dtype), (lambda p: ev.fn(p, z)["energy"].sum()), None
