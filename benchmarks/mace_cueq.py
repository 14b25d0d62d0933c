"""MACE through cuEquivariance: does the CUDA kernel path change equivariance, and what does it cost?

A small random-init ScaleShiftMACE (the one the package tests build, float64) is audited through ``mace:PATH`` in
three forms, each in a fresh process so that which kernels load is controlled:

* ``e3nn``: the model as built (e3nn tensor products);
* ``cueq-torch``: converted by MACE's ``convert_e3nn_cueq`` for the CPU (no conv fusion) and run with
  ``cuequivariance_ops_torch`` made unimportable: cuequivariance-torch's pure-torch implementation;
* ``cueq-kernels``: converted for CUDA (conv fusion, ``uniform_1d``) with cuequivariance-ops-torch's CUDA kernels.

For each form and dtype: the worst relative Lie derivative per output over the six SE(3) generators, its median floor,
the verdict (``geolie._verdict``, threshold 1e-6), the largest difference of energy and forces from the e3nn model on
the same structures, which kernel package was loaded, audit structures/s and batched E+F structures/s (same run).
Structures: ``--n`` bundled ethanol and as many aspirin frames (default 4 + 4). Writes ``benchmarks/results/mace_cueq[_cuda].json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def build(path: str) -> None:
    from e3nn import o3

    from _common import random_mace

    torch.save(random_mace(r_max=4.5, num_bessel=6, max_ell=2, hidden_irreps=o3.Irreps("16x0e+16x1o"),
                           avg_num_neighbors=8.0, correlation=2), path)


def convert(src: str, dst: str, device: str) -> None:
    from mace.cli.convert_e3nn_cueq import run

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = run(src, device=device, return_model=True)
    finally:
        torch.set_default_dtype(old)
    torch.save(model.cpu() if device != "cpu" else model, dst)


def child(form: str, path: str, ref: str, device: str, block_ops: bool, n: int) -> dict:
    """One form audited in this process (``block_ops``: cuequivariance_ops_torch made unimportable first)."""
    if block_ops:
        sys.modules["cuequivariance_ops_torch"] = None
    warnings.simplefilter("ignore")
    import geolie
    from geolie.adapters import Structure, load_model
    from geolie.data import load

    from audit_gpu import ef_rate
    from _common import timeit

    mols = load("xtb-md/ethanol", "all")[:n] + load("xtb-md/aspirin", "all")[:n]
    sts = [Structure.from_atoms(a) for a in mols]
    pot, pot_ref = load_model(f"mace:{path}", device=device), load_model(f"mace:{ref}", device=device)
    out = {"form": form, "kernels_loaded": "cuequivariance_ops_torch" in sys.modules
           and sys.modules["cuequivariance_ops_torch"] is not None, "rows": []}
    for dt in ("float64", "float32"):
        dtype = getattr(torch, dt)
        row = {"dtype": dt}
        try:
            geolie.audit(pot, mols[:2], dtype=dtype, progress=False, device=device)
            res = {}
            t = timeit(lambda: res.setdefault("rep", geolie.audit(pot, mols, dtype=dtype, progress=False,
                                                                  device=device, threshold=1e-6)),
                       warmup=0, repeat=1)
            rep = res["rep"]
            agg = rep.aggregates()
            row.update(audit_per_s=len(mols) / t["median_s"], ef_per_s=ef_rate(pot, sts, 512, dtype, device),
                       verdicts={k: v["verdict"].get("overall") for k, v in agg.items()},
                       lie_rel_max={k: max(v[g]["max"] for g in rep.generator_names) for k, v in agg.items()},
                       floor_rel_median={k: v["floor_rel_median"] for k, v in agg.items()},
                       finite_rotation_max={k: v["finite_max_rel"].get("rotation") for k, v in agg.items()})
            diff = {"energy": 0.0, "forces": 0.0}
            for st in sts:
                a, b = pot.evaluation(st, dtype), pot_ref.evaluation(st, dtype)
                ya, yb = a.fn(*a.inputs), b.fn(*b.inputs)
                for k in diff:
                    diff[k] = max(diff[k], float((ya[k] - yb[k]).abs().max() / yb[k].abs().max().clamp_min(1e-30)))
            row["max_rel_diff_vs_e3nn"] = diff
        except Exception as e:  # noqa: BLE001 - recorded
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        out["rows"].append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=4, help="ethanol and aspirin frames each")
    ap.add_argument("--child", nargs=5, default=None, metavar=("FORM", "PATH", "REF", "DEVICE", "BLOCK"))
    args = ap.parse_args(argv)
    if args.child:
        form, path, ref, device, block = args.child
        print(json.dumps(child(form, path, ref, device, block == "1", args.n)))
        return
    from _common import device_info, result_path, write_json

    tmp = tempfile.mkdtemp()
    e3nn_path, torch_path, kern_path = (os.path.join(tmp, f"{n}.model") for n in ("e3nn", "cueq_torch", "cueq_k"))
    build(e3nn_path)
    forms = [("e3nn", e3nn_path, "1")]
    try:
        convert(e3nn_path, torch_path, "cpu")
        forms.append(("cueq-torch", torch_path, "1"))
    except Exception as e:  # noqa: BLE001
        print(f"conversion for the CPU failed: {e}", file=sys.stderr)
    if args.device.startswith("cuda"):
        try:
            convert(e3nn_path, kern_path, "cuda")
            forms.append(("cueq-kernels", kern_path, "0"))
        except Exception as e:  # noqa: BLE001
            print(f"conversion for CUDA failed: {e}", file=sys.stderr)
    results = []
    for form, path, block in forms:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--child", form, path, e3nn_path,
                              args.device, block], capture_output=True, text=True)
        if res.returncode != 0:
            results.append({"form": form, "error": res.stderr[-1500:]})
        else:
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        results[-1]["seconds"] = time.perf_counter() - t0
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        write_json(result_path("mace_cueq", args.device), {"benchmark": "mace_cueq", "env": device_info(args.device),
                                                            "results": results})
    print("| form | dtype | kernels | energy Lie max | forces Lie max | forces floor | verdict (E, F) | "
          "vs e3nn (F) | audit /s | E+F /s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for row in r.get("rows", []):
            if "error" in row:
                print(f"| {r['form']} | {row['dtype']} | error: {row['error'][:80]} ||||||||")
                continue
            v = row["verdicts"]
            print(f"| {r['form']} | {row['dtype']} | {r['kernels_loaded']} | {row['lie_rel_max']['energy']:.1e} | "
                  f"{row['lie_rel_max']['forces']:.1e} | {row['floor_rel_median']['forces']:.1e} | "
                  f"{v.get('energy')}, {v.get('forces')} | {row['max_rel_diff_vs_e3nn']['forces']:.1e} | "
                  f"{row['audit_per_s']:.1f} | {row['ef_per_s']:.0f} |")


if __name__ == "__main__":
    main()
