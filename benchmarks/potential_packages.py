"""Audit throughput for potential packages' models: geolie's exact AD through the model's own module against the
package's ASE calculator differentiated by finite differences (geolie's ``CalculatorAdapter``), in one run.

Models (random init, built with each package's constructors at a typical size, saved and loaded as a user would):

* MACE, MACE-MP-0-small-like: 128x0e hidden, max_ell 3, correlation 3, 2 interactions, r_max 6 Å;
* NequIP, its default preset: 4 layers, l_max 1, 32 features, r_max 5 Å;
* Orb v3 direct and conservative at Orb's own size (latent 256, 5 message-passing steps; ``orb-v3-*-20-omat``);
* fairchem, a conserving eSCN-MD (the UMA/eSEN backbone) at half eSEN-small's size to fit a CPU run (64 sphere
  channels, l_max 2, 2 layers, cutoff 6 Å, spectral feed-forward and gate activations: exactly equivariant), saved as
  an inference checkpoint;
* MatterSim, MatterSim-v1-1M's M3GNet size (4 blocks, 128 units, max_l 4, max_n 4, cutoff 5 Å), float32 only.

Structures: 20-atom molecules (bundled ``xtb-md/aspirin`` frames, 21 atoms; Orb and MACE/NequIP with H, C, O) and
64-atom cells (fcc Cu 2x2x4, rattled). For each model, structure kind and dtype: structures/s of
``geolie.audit`` with default figures but no finite companions (``n_finite=0``: the Lie derivatives, their adjoint
test and floors) — median of ``--repeat`` runs after a warm-up — and of the calculator route through finite
differences (float64 arrays; MatterSim's calculator computes them in float32), under the default dtype each
package's loader leaves in a user's process (:data:`CALC_DEFAULT_DTYPE`), with the relative floor each reaches (median over structures, forces). Writes
``benchmarks/results/potential_packages.json``; packages that are not installed are skipped and said so.

    python benchmarks/potential_packages.py [--structures 4] [--repeat 3] [--packages mace nequip ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import random_mace, device_info, result_path, timeit, write_json  # noqa: E402

import geolie  # noqa: E402
from geolie.adapters import CalculatorAdapter, Structure, load_model  # noqa: E402


def _mace(d):
    from mace.calculators import MACECalculator

    m = random_mace()
    path = os.path.join(d, "mace.model")
    torch.save(m, path)
    return f"mace:{path}", lambda: MACECalculator(model_paths=path, device="cpu", default_dtype="float64")


def _nequip(d):
    import lightning
    from nequip.integrations.ase import NequIPCalculator
    from nequip.train import NequIPLightningModule
    from nequip.utils import get_current_code_versions

    from geolie.adapters.nequip import nequip_global_state

    cfg = {"_target_": "nequip.model.NequIPGNNModel", "seed": 0, "model_dtype": "float64", "r_max": 5.0,
           "type_names": ["H", "C", "N", "O", "Cu"], "num_layers": 4, "l_max": 1, "num_features": 32,
           "avg_num_neighbors": 20.0}
    info = {"versions": get_current_code_versions(verbose=False),
            "training_module": {"_target_": "nequip.train.NequIPLightningModule"}}
    path = os.path.join(d, "nequip.ckpt")
    with nequip_global_state():
        lm = NequIPLightningModule(model=cfg, num_datasets={"train": 1, "val": 1, "test": 0}, info_dict=info)
        tr = lightning.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu",
                               enable_progress_bar=False, enable_model_summary=False)
        tr.strategy.connect(lm)
        tr.save_checkpoint(path)

    def calc():
        from geolie._torch_utils import default_dtype

        with default_dtype(torch.float64), nequip_global_state():
            return NequIPCalculator._from_saved_model(path, device="cpu")

    return f"nequip:{path}", calc


def _orb(d, kind):
    from orb_models.forcefield import pretrained
    from orb_models.forcefield.calculator import ORBCalculator

    torch.manual_seed(0)
    m = getattr(pretrained, f"orb_v3_{kind}_architecture")()
    path = os.path.join(d, f"orb_{kind}.ckpt")
    torch.save(m.state_dict(), path)
    arch = f"orb-v3-{kind}-20-omat"
    return f"orb:{arch}:{path}", lambda: ORBCalculator(getattr(pretrained, arch.replace("-", "_"))(
        weights_path=path, device="cpu", precision="float64", compile=False), device="cpu")


def _fairchem(d):
    import hydra
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings, MLIPInferenceCheckpoint
    from fairchem.core.units.mlip_unit.predict import MLIPPredictUnit

    uma = "fairchem.core.models.uma.escn_md."
    backbone = dict(model=uma + "eSCNMDBackbone", max_num_elements=100, sphere_channels=64, lmax=2, mmax=2,
                    otf_graph=True, max_neighbors=300, cutoff=6.0, edge_channels=64, num_distance_basis=64,
                    direct_forces=False, regress_forces=True, regress_stress=True, num_layers=2,
                    hidden_channels=64, dataset_mapping={"omat": "omat"}, use_dataset_embedding=True,
                    always_use_pbc=False, ff_type="spectral", act_type="gate")
    cfg = dict(_target_="fairchem.core.models.base.HydraModel", backbone=backbone,
               heads={"efs": dict(module=uma + "MLP_EFS_Head")}, pass_through_head_outputs=True)
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg)
    norm = dict(_target_="fairchem.core.modules.normalization.normalizer.Normalizer", mean=0.0, rmsd=1.0)
    tasks = [dict(_target_="fairchem.core.units.mlip_unit.mlip_unit.Task", name=p, level=lv, property=p,
                  datasets=["omat"], normalizer=norm,
                  out_spec=dict(_target_="fairchem.core.units.mlip_unit.mlip_unit.OutputSpec", dim=dim,
                                dtype="float32"))
             for p, lv, dim in (("energy", "system", [1]), ("forces", "atom", [3]), ("stress", "system", [1, 9]))]
    path = os.path.join(d, "esen.pt")
    torch.save(MLIPInferenceCheckpoint(model_config=cfg, model_state_dict=model.state_dict(),
                                       ema_state_dict=torch.optim.swa_utils.AveragedModel(model).state_dict(),
                                       tasks_config=tasks), path)
    return f"fairchem:{path}", lambda: FAIRChemCalculator(MLIPPredictUnit(path, "cpu", inference_settings=(
        InferenceSettings(activation_checkpointing=False, base_precision_dtype=torch.float64))), task_name="omat")


def _mattersim(d):
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.potential import MatterSimCalculator, Potential

    torch.manual_seed(0)
    path = os.path.join(d, "mattersim.pth")
    Potential(M3Gnet(num_blocks=4, units=128, max_l=4, max_n=4, cutoff=5.0, threebody_cutoff=4.0, device="cpu"),
              device="cpu").save(path)
    return f"mattersim:{path}", lambda: MatterSimCalculator(potential=Potential.from_checkpoint(
        path, device="cpu", load_training_state=False), device="cpu")


#: torch's default dtype each package's calculator runs under, as a user's process has it after loading it: NequIP's
#: and Orb's float64 loaders set float64 for the whole process (Orb's float64 calculator fails on molecules without
#: it, NequIP's converts positions in it); MatterSim's Potential builds its strain in it and fails under float64
CALC_DEFAULT_DTYPE = {"mattersim": torch.float32}


BUILDERS = {"mace": _mace, "nequip": _nequip, "orb-direct": lambda d: _orb(d, "direct"),
            "orb-conservative": lambda d: _orb(d, "conservative"), "fairchem": _fairchem, "mattersim": _mattersim}


def _structures(n):
    mols = [Structure.from_atoms(a, name=f"aspirin {i}") for i, a in
            enumerate(geolie.data.load("xtb-md/aspirin", "test")[:n])]
    from ase.build import bulk

    cells = []
    for i in range(n):
        b = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 4))
        b.rattle(0.05, seed=i)
        cells.append(Structure.from_atoms(b, name=f"Cu64 {i}"))
    return {"molecules (21 atoms)": mols, "cells (64 atoms)": cells}


def _floor(rep):
    return float(np.nanmedian([np.nanmedian(r["outputs"]["forces"]["floor_rel"]) for r in rep.rows]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--structures", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packages", nargs="*", default=list(BUILDERS))
    ap.add_argument("--keep", action="store_true",
                    help="keep the results file's rows of packages not run now (a run continued package by package)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sets = _structures(args.structures)
    results, skipped = [], {}
    out = result_path("potential_packages")
    if args.keep and os.path.exists(out):
        import json

        with open(out) as fh:
            results = [r for r in json.load(fh)["results"] if r["package"] not in args.packages]

    def save():  # after every row: a long run never loses what it finished
        write_json(out, {"device": device_info("cpu"), "threads": torch.get_num_threads(),
                         "structures_per_set": args.structures, "repeat": args.repeat, "results": results,
                         "skipped": skipped})

    def record(pkg, kind, route, dtype, rate, floor, **extra):  # one result row, saved at once
        row = {"package": pkg, "structures": kind, "route": route, "dtype": str(dtype)[6:],
               "structures_per_s": rate, "forces_floor_rel": floor, **extra}
        results.append(row)
        save()
        print(row, flush=True)
    with tempfile.TemporaryDirectory() as d:
        for pkg in args.packages:
            try:
                spec, calc = BUILDERS[pkg](d)
            except ImportError as e:
                skipped[pkg] = f"not installed ({e})"
                print(f"{pkg}: skipped, {skipped[pkg]}")
                continue
            pot = load_model(spec)

            def fresh_calc(make=calc):
                # MACE's and Orb's calculators set torch's default dtype for the whole process: restored here
                from geolie._torch_utils import default_dtype

                with default_dtype(torch.get_default_dtype()):
                    return make()

            c = fresh_calc()  # one calculator, reused (built once, as a user would)
            ca = CalculatorAdapter(c, name=f"{pkg} calculator")
            for kind, sts in sets.items():
                n = len(sts)
                last = {}
                for dtype in pot.dtypes:

                    def run():
                        last["rep"] = geolie.audit(pot, sts, dtype=dtype, n_finite=0, progress=False,
                                                   floor_sample=None)

                    t = timeit(run, warmup=1, repeat=args.repeat)
                    record(pkg, kind, "geolie AD (model module)", dtype, n / t["median_s"], _floor(last["rep"]))

                fd_dtype = torch.float64  # what an ASE calculator returns (MatterSim's computed in float32)

                def run_fd():
                    from geolie._torch_utils import default_dtype

                    with default_dtype(CALC_DEFAULT_DTYPE.get(pkg, torch.float64)):
                        last["rep"] = geolie.audit(ca, sts, dtype=fd_dtype, n_finite=0, progress=False,
                                                   floor_sample=None, batch_size=1)

                try:
                    t = timeit(run_fd, warmup=0, repeat=1)
                except Exception as e:  # noqa: BLE001 - a calculator that fails is a result, said in the row
                    record(pkg, kind, "ASE calculator, finite differences", fd_dtype, None, None,
                           error=f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                record(pkg, kind, "ASE calculator, finite differences", fd_dtype, n / t["median_s"],
                       _floor(last["rep"]))
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
