"""Gaunt tensor products against e3nn's TensorProduct on the same paths: grid, Fourier, dense; L = 1..8 and beyond.

All four compute the same map (checked here at float64 to 1e-10 before timing): inputs and output ``C x (0e, 1o,
2e, ..., L)``, the channel-wise product with every even path. e3nn gets the Gaunt path constants as weights
(``uuu``, internal weights). Batch 10⁴ (``--batch``), 1 and 32 channels, forward and forward+backward, float32,
on the CPU (and CUDA with ``--device cuda``; the results name the device). Warm-up, then medians; ratios are
against measurements of the same run. ``--compiled grid dense`` adds the same products under ``torch.compile``
(on CUDA with CUDA graphs, meant to remove the kernel-launch latency that dominates at one channel; on an H100 with
torch 2.11 their forward+backward failed, recorded as errors). A configuration that fails or runs out of memory is
recorded as such (and left out of ratios and slopes); the JSON is rewritten after every configuration.
Configurations whose single call exceeds ``--max-seconds`` are skipped for larger L (recorded as such). Fitted log-log slopes of time against L (L >= 3). Writes
``benchmarks/results/tensor_products_<device>.json`` and a plot ``tensor_products_<device>.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, timeit, write_json  # noqa: E402

from geolie.nn import GauntTensorProduct, gaunt_coefficients  # noqa: E402
from geolie.nn.spherical_harmonics import wigner_3j_float64  # noqa: E402


def natural(C, L):
    return "+".join(f"{C}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(L + 1))


def e3nn_tp(C, L):
    from e3nn import o3

    ir = o3.Irreps(natural(C, L))
    instr, weights = [], []
    for i1, (_, a) in enumerate(ir):
        for i2, (_, b) in enumerate(ir):
            for i3, (_, c) in enumerate(ir):
                if (a.l + b.l + c.l) % 2 == 0 and abs(a.l - b.l) <= c.l <= a.l + b.l:
                    G, Cg = gaunt_coefficients(a.l, b.l, c.l), wigner_3j_float64(a.l, b.l, c.l)
                    instr.append((i1, i2, i3, "uuu", True, 1.0))
                    weights.append(float((G * Cg).sum()))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tp = o3.TensorProduct(ir, ir, ir, instr, irrep_normalization="none", path_normalization="none",
                              internal_weights=True)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        tp.weight.copy_(torch.tensor([w for w in weights for _ in range(C)], dtype=torch.float64))
    return tp


def ratio_of(row, key):
    return f"{row[key]:.1f}x" if key in row else "–"


def build(method, C, L):
    if method == "e3nn":
        return e3nn_tp(C, L)
    return GauntTensorProduct(natural(C, L), natural(C, L), natural(C, L), method=method.split("+")[0],
                              weights=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6, 7, 8, 10, 12])
    ap.add_argument("--channels", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--methods", nargs="+", default=["e3nn", "dense", "grid", "fourier"])
    ap.add_argument("--compiled", nargs="*", default=[],
                    help="also time these methods under torch.compile (CUDA: mode reduce-overhead, CUDA graphs), "
                         "as '<method>+compile' rows, at the degrees --compile-L")
    ap.add_argument("--compile-L", nargs="+", type=int, default=[6, 7])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    tag = "cuda" if dev.type == "cuda" else "cpu"
    out_json = args.out or os.path.join(os.path.dirname(__file__), "results", f"tensor_products_{tag}.json")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    methods = args.methods + [f"{m}+compile" for m in args.compiled]
    for C in args.channels:
        skip = set()
        for L in args.L:
            # correctness first, in float64, on a small batch
            ref = None
            g = torch.Generator().manual_seed(L)
            dim = sum(C * (2 * l + 1) for l in range(L + 1))
            x64 = torch.randn(8, dim, generator=g, dtype=torch.float64)
            y64 = torch.randn(8, dim, generator=g, dtype=torch.float64)
            for method in methods:
                compiled = method.endswith("+compile")
                if compiled and L not in args.compile_L:
                    continue
                row = {"method": method, "L": L, "channels": C, "batch": args.batch}
                if method in skip:
                    row["skipped"] = f"a smaller L took more than {args.max_seconds} s per call or ran out of memory"
                    rows.append(row)
                    continue
                t0 = time.perf_counter()
                try:
                    tp = build(method, C, L)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                    rows.append(row)
                    continue
                row["build_s"] = time.perf_counter() - t0
                tp = tp.double()
                with torch.no_grad():
                    z = tp(x64, y64)
                if ref is None:
                    ref = z
                row["max_rel_diff_f64"] = float((z - ref).norm() / ref.norm())
                tp = tp.float().to(dev)
                graphs = compiled and dev.type == "cuda"
                if compiled:
                    torch._dynamo.reset()  # a fresh compilation per configuration (no recompile-limit fallback)
                    tp = torch.compile(tp, mode="reduce-overhead" if graphs else None)
                mark = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
                x = torch.randn(args.batch, dim, generator=g).to(dev)
                y = torch.randn(args.batch, dim, generator=g).to(dev)

                def fwd():
                    mark()  # CUDA graphs: a new iteration (earlier outputs may be overwritten)
                    with torch.no_grad():
                        tp(x, y)
                    sync()

                xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()

                def fwd_bwd():
                    mark()
                    tp(xr, yr).sum().backward()
                    sync()

                try:
                    t1 = time.perf_counter()
                    fwd()
                    first = time.perf_counter() - t1
                    if compiled:  # compilation happened in the first call: time a second one
                        row["compile_s"] = first
                        t1 = time.perf_counter()
                        fwd()
                        first = time.perf_counter() - t1
                    if first > args.max_seconds:
                        skip.add(method)
                    reps = 3 if first > 0.5 else 7
                    row["forward_ms"] = 1e3 * timeit(fwd, warmup=1, repeat=reps)["median_s"]
                    row["forward_backward_ms"] = 1e3 * timeit(fwd_bwd, warmup=2 if compiled else 1,
                                                              repeat=reps)["median_s"]
                except torch.OutOfMemoryError as e:
                    row["error"] = "out of memory: " + str(e).split(".")[0][:120]
                    skip.add(method)
                except Exception as e:  # noqa: BLE001 - a compile failure is a result too
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                finally:
                    tp = x = y = xr = yr = None  # free the device memory before the next configuration
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                write_json(out_json, {"benchmark": "tensor_products", "env": device_info(args.device), "rows": rows,
                                      "partial": True})
                if "forward_backward_ms" in row:
                    print(f"C={C:<3} L={L:<3} {method:>8}: fwd {row['forward_ms']:9.2f} ms  fwd+bwd "
                          f"{row['forward_backward_ms']:9.2f} ms  diff {row['max_rel_diff_f64']:.1e}", file=sys.stderr)
                else:
                    print(f"C={C:<3} L={L:<3} {method:>8}: {row.get('error')}", file=sys.stderr)
    # slopes and ratios
    slopes = {}
    for C in args.channels:
        for method in methods:
            pts = [(r["L"], r["forward_ms"]) for r in rows if r["channels"] == C and r["method"] == method
                   and "forward_ms" in r and "error" not in r and r["L"] >= 3]
            if len(pts) >= 3:
                Ls, ts = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
                slopes[f"{method}_C{C}"] = float(np.polyfit(Ls, ts, 1)[0])
    for r in rows:
        base = {q["method"]: q.get("forward_ms") for q in rows
                if q["L"] == r["L"] and q["channels"] == r["channels"] and "error" not in q}
        if "forward_ms" in r and "error" not in r:
            for other in ("e3nn", "dense", "dense+compile"):
                if base.get(other):
                    r[f"speedup_vs_{other}"] = base[other] / r["forward_ms"]
    write_json(out_json, {"benchmark": "tensor_products", "env": device_info(args.device), "rows": rows,
                          "slopes_forward_vs_L": slopes})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.channels), figsize=(5 * len(args.channels), 4), squeeze=False)
        for ax, C in zip(axes[0], args.channels):
            for method in args.methods:
                pts = [(r["L"], r["forward_ms"]) for r in rows if r["channels"] == C and r["method"] == method
                       and "forward_ms" in r]
                if pts:
                    lab = method + (f" (slope {slopes[f'{method}_C{C}']:.1f})" if f"{method}_C{C}" in slopes else "")
                    ax.loglog(*zip(*pts), "o-", label=lab)
            ax.set_xlabel("L (= L1 = L2 = Lout)")
            ax.set_ylabel("forward time (ms)")
            ax.set_title(f"{C} channel(s), batch {args.batch}, {tag}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_json.replace(".json", ".png"), dpi=80)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    lines = ["| C | L | e3nn (ms) | dense (ms) | grid (ms) | fourier (ms) | grid vs dense | grid vs e3nn |",
             "|---|---|---|---|---|---|---|---|"]
    for C in args.channels:
        for L in args.L:
            get = {r["method"]: r for r in rows if r["L"] == L and r["channels"] == C}

            def ms(m):
                return f"{get[m]['forward_ms']:.2f}" if m in get and "forward_ms" in get[m] else "skipped"

            g = get.get("grid", {})
            lines.append(f"| {C} | {L} | {ms('e3nn')} | {ms('dense')} | {ms('grid')} | {ms('fourier')} | "
                         f"{ratio_of(g, 'speedup_vs_dense')} | {ratio_of(g, 'speedup_vs_e3nn')} |")
    comp = [r for r in rows if r["method"].endswith("+compile") and "forward_backward_ms" in r]
    if comp:
        lines += ["", "| C | L | compiled | forward (ms) | forward+backward (ms) | vs dense | vs dense+compile |",
                  "|---|---|---|---|---|---|---|"]
        for r in comp:
            lines.append(f"| {r['channels']} | {r['L']} | {r['method']} | {r['forward_ms']:.3f} | "
                         f"{r['forward_backward_ms']:.3f} | {ratio_of(r, 'speedup_vs_dense')} | "
                         f"{ratio_of(r, 'speedup_vs_dense+compile')} |")
    print("\n".join(lines))
    print("slopes:", {k: round(v, 2) for k, v in slopes.items()})


if __name__ == "__main__":
    main()
