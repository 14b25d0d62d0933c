"""geolie's Gaunt tensor product against the GPU tensor-product libraries people use: cuEquivariance (its CUDA
kernels through cuequivariance-ops-torch where installed, else its pure-torch path, recorded) and OpenEquivariance
(JIT-compiled kernels, where it installs), same run, same device.

The map: inputs ``x = C × (0e, 1o, 2e, ..., L)`` and ``y = 1 × (0e, 1o, ..., L)`` (a per-edge spherical-harmonic
signal shared by the channels, the message-passing layout), output ``C × (0e, ..., L)``-type, every path with
``l1 + l2 + l3`` even (the natural-parity paths; the only ones a Gaunt product has). geolie: ``GauntTensorProduct``
(grid method; one Gaunt weight per path, summed per output degree). cuEquivariance: ``ChannelWiseTensorProduct``
on the same irreps (one output block per path, its weights shared). OpenEquivariance: a ``uvu`` tensor product
with the same instructions. They are not the same function (Gaunt sums the paths with fixed weights, CG keeps them
apart): the benchmark times the same paths and sizes, and checks each is equivariant in float64 beforehand (a
relative finite-rotation error, recorded). Batch ``--batch`` rows, float32, forward and forward+backward, L = 2..7,
C = 32, 64, 128; medians after warm-up, ratios within the run. Writes
``benchmarks/results/tp_gpu_libraries[_cuda].json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

from geolie.nn import GauntTensorProduct  # noqa: E402


def natural(C, L):
    return "+".join(f"{C}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(L + 1))


def gaunt(C, L, device, dtype):
    tp = GauntTensorProduct(natural(C, L), natural(1, L), natural(C, L), method="grid").to(device)
    return lambda x, y: tp(x, y)


def cueq(C, L, device, dtype):
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    i1, i2 = cue.Irreps("O3", natural(C, L)), cue.Irreps("O3", natural(1, L))
    out = cue.Irreps("O3", natural(1, L))
    tp = cuet.ChannelWiseTensorProduct(i1, i2, [ir for _, ir in out], layout=cue.mul_ir, shared_weights=True,
                                       internal_weights=True, device=device, dtype=dtype, math_dtype=dtype)
    return lambda x, y: tp(x, y)


def oeq(C, L, device, dtype):
    import openequivariance as oeq_
    from e3nn import o3

    i1, i2, io = o3.Irreps(natural(C, L)), o3.Irreps(natural(1, L)), []
    instr = []
    for a, (_, ir1) in enumerate(i1):
        for b, (_, ir2) in enumerate(i2):
            for ir3 in ir1 * ir2:
                if ir3.l <= L and (ir1.l + ir2.l + ir3.l) % 2 == 0:
                    instr.append((a, b, len(io), "uvu", True))
                    io.append((C, ir3))
    odt = oeq_.torch_to_oeq_dtype(dtype)
    prob = oeq_.TPProblem(i1, i2, o3.Irreps(io), instr, shared_weights=False, internal_weights=False,
                          irrep_dtype=odt, weight_dtype=odt)
    tp = oeq_.TensorProduct(prob)
    w = torch.randn(1, prob.weight_numel, device=device, dtype=dtype)
    return lambda x, y: tp(x, y, w.expand(x.shape[0], -1))


LIBS = {"gaunt (geolie)": gaunt, "cuEquivariance": cueq, "OpenEquivariance": oeq}


def equivariance_error(make, C, L, device) -> float:
    """Relative finite-rotation error of the map in float64 (a random rotation; ``D(R)`` applied by geolie, from the
    exponential of e3nn's generators: e3nn's Euler-angle ``D_from_matrix`` alone is good to ~1e-8 here)."""
    from e3nn import o3

    import geolie

    f = make(C, L, device, torch.float64)
    i1, i2 = o3.Irreps(natural(C, L)), o3.Irreps(natural(1, L))
    x, y = i1.randn(16, -1, dtype=torch.float64).to(device), i2.randn(16, -1, dtype=torch.float64).to(device)
    R = o3.rand_matrix(dtype=torch.float64).to(device)
    r1, r2 = geolie.as_rep(str(i1)), geolie.as_rep(str(i2))
    z, zr = f(x, y), f(r1.act(x, R, None, None), r2.act(y, R, None, None))
    # the output irreps differ between libraries: compare norms per row block, which any equivariant map keeps
    return float((zr.norm(dim=-1) - z.norm(dim=-1)).abs().max() / z.norm(dim=-1).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--L", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7])
    ap.add_argument("--C", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=10000)
    ap.add_argument("--libs", nargs="+", default=list(LIBS))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev, dtype = args.device, torch.float32
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
    kernels = None
    try:
        import cuequivariance_ops_torch  # noqa: F401

        kernels = True
    except Exception:  # noqa: BLE001
        kernels = False
    rows = []
    path = result_path("tp_gpu_libraries", dev)
    for lib in args.libs:
        for L in args.L:
            for C in args.C:
                row = {"lib": lib, "L": L, "C": C, "batch": args.batch}
                try:
                    if C == args.C[0]:
                        row["equivariance_error_f64"] = equivariance_error(LIBS[lib], 8, L, dev)
                    f = LIBS[lib](C, L, dev, dtype)
                    from e3nn import o3

                    x = o3.Irreps(natural(C, L)).randn(args.batch, -1).to(dev).requires_grad_(True)
                    y = o3.Irreps(natural(1, L)).randn(args.batch, -1).to(dev).requires_grad_(True)

                    def fwd():
                        with torch.no_grad():
                            f(x, y)
                        sync()

                    def fwd_bwd():
                        f(x, y).square().sum().backward()
                        sync()

                    row["forward_ms"] = timeit(fwd, warmup=3, repeat=10)["median_s"] * 1e3
                    row["forward_backward_ms"] = timeit(fwd_bwd, warmup=3, repeat=10)["median_s"] * 1e3
                except Exception as e:  # noqa: BLE001 - recorded (not installed, out of memory, compile failure)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
                write_json(path, {"benchmark": "tp_gpu_libraries", "env": device_info(dev),
                                  "cuequivariance_kernels": kernels, "rows": rows})
    base = {(r["L"], r["C"]): r for r in rows if r["lib"] == "gaunt (geolie)" and "forward_ms" in r}
    print(f"cuEquivariance CUDA kernels loaded: {kernels}\n| lib | L | C | fwd ms | fwd+bwd ms | fwd+bwd vs gaunt |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['lib']} | {r['L']} | {r['C']} | error: {r['error'][:60]} |||")
            continue
        g = base.get((r["L"], r["C"]))
        ratio = f"{r['forward_backward_ms'] / g['forward_backward_ms']:.2f}" if g else "–"
        print(f"| {r['lib']} | {r['L']} | {r['C']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
