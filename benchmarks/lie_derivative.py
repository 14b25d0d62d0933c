"""Cost of the full SE(3) Lie derivative of energy and forces, relative to one energy+forces evaluation.

For each model (a distance-MLP pair potential, an e3nn message-passing potential, PyG's SchNet at its default
size) and molecule-like clouds of 10-100 atoms, in float32 on the CPU (``--device cuda``: on a GPU):

* ``ef``: one energy + forces evaluation (forward, then ``torch.autograd.grad``): the unit of cost;
* ``hvp``: geolie's default for ``conservative`` energies: E and F once with their graph, then one backward per
  generator (``J_F v = -∇(∇E·v)``; ``hvp-loop``);
* ``hvp-batched``: the same, all generators in one batched backward (``is_grads_batched``): which of the two
  ``hvp`` runs on a device type is :data:`geolie._lie.HVP_TANGENTS`, set from this comparison (CPU: the loop);
* ``jvp-vmap``: geolie, ``conservative`` energy, all six generators in one ``vmap(jvp)`` (forward-over-reverse);
* ``jvp-loop``: geolie, forces by ``torch.autograd.grad(create_graph=True)`` inside the model (MACE/NequIP style),
  one forward-mode pass per generator;
* ``double-backward``: lie-deriv's trick (grad of grad with a dummy cotangent), per generator, same model;
* ``finite``: as many Haar rotations + translations as fit in the ``hvp`` wall time, and the relative error
  of forces they reach, against the relative Lie derivative (the floor) of the same exactly-equivariant model.

Writes ``benchmarks/results/lie_derivative.json`` and prints a markdown table. Timings: 2 warm-up calls, then
the median of at least 5 runs (and 0.5 s).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

import geolie  # noqa: E402
from geolie.models import E3nnPotential, PairMLPPotential  # noqa: E402
from geolie.neighbors import radius_graph  # noqa: E402

CUTOFF = 5.0


def molecule_like(n: int, seed: int, dtype):
    """``n`` atoms at molecular density (0.1 / Å³) with a 0.9 Å minimum distance; H, C, N, O."""
    g = torch.Generator().manual_seed(seed)
    side = (n / 0.1) ** (1 / 3)
    pts = []
    while len(pts) < n:
        p = torch.rand(3, generator=g, dtype=torch.float64) * side
        if all(float((p - q).norm()) > 0.9 for q in pts):
            pts.append(p)
    z = torch.tensor([1, 6, 7, 8])[torch.randint(0, 4, (n,), generator=g)]
    return z, torch.stack(pts).to(dtype)


class FixedEdges(torch.nn.Module):
    """PyG interaction graph with edges fixed at the base point (distances stay differentiable)."""

    def __init__(self, edge_index):
        super().__init__()
        self.edge_index = edge_index

    def forward(self, pos, batch):
        row, col = self.edge_index
        d = pos[row] - pos[col]
        return self.edge_index, torch.sqrt((d * d).sum(-1))


def build(name, z, pos, dtype):
    """Return ``energy(pos)`` for the named model with edges fixed at ``pos`` (on ``pos``'s device)."""
    ei = radius_graph(pos, CUTOFF)
    dev = pos.device
    if name == "distance-mlp":
        m = PairMLPPotential(cutoff=CUTOFF).to(dev, dtype)
        return lambda p: m(z, p).sum()
    if name == "e3nn":
        m = E3nnPotential(cutoff=CUTOFF).to(dev, dtype)
        return lambda p: m(z, p, ei).sum()
    if name == "schnet":
        from torch_geometric.nn.models import SchNet

        torch.manual_seed(0)
        m = SchNet(hidden_channels=128, num_filters=128, num_interactions=6, num_gaussians=50,
                   cutoff=CUTOFF).to(dev, dtype)
        m.interaction_graph = FixedEdges(ei)
        return lambda p: m(z, p).sum()
    raise ValueError(name)


def autograd_ef(energy):
    """Energy and forces as a model computes them (autograd.grad; create_graph so that it can be differentiated)."""

    def ef(p, create_graph=True):
        # clone, not detach: detach drops a forward-mode tangent (geolie's adjoint test then rejects jvp-loop)
        p = p if p.requires_grad else p.clone().requires_grad_(True)
        e = energy(p)
        f = -torch.autograd.grad(e, p, create_graph=create_graph)[0]
        return e, f

    return ef


def run(models, sizes, dtype, min_time, device="cpu"):
    rows = []
    out_rep = ("scalar", "vector")
    for name in models:
        for n in sizes:
            z, pos = molecule_like(n, seed=n, dtype=dtype)
            z, pos = z.to(device), pos.to(device)
            energy = build(name, z, pos, dtype)
            ef_model = autograd_ef(energy)
            ef_cons = geolie.conservative(energy)
            row = {"model": name, "atoms": n, "dtype": str(dtype).replace("torch.", ""),
                   "edges": int(radius_graph(pos, CUTOFF).shape[1])}
            t_ef = timeit(lambda: ef_model(pos, create_graph=False), min_time=min_time)["median_s"]
            row["ef_ms"] = 1e3 * t_ef
            variants = {
                "hvp": lambda: geolie.lie_derivative(ef_cons, pos, out_rep=out_rep, method="hvp-loop"),
                "hvp-batched": lambda: geolie.lie_derivative(ef_cons, pos, out_rep=out_rep, method="hvp-batched"),
                "jvp-vmap": lambda: geolie.lie_derivative(ef_cons, pos, out_rep=out_rep, method="jvp-vmap"),
                "jvp-loop": lambda: geolie.lie_derivative(ef_model, pos, out_rep=out_rep, method="jvp-loop"),
                "double-backward": lambda: geolie.lie_derivative(ef_model, pos, out_rep=out_rep,
                                                                 method="double-backward"),
            }
            for key, fn in variants.items():
                try:
                    t = timeit(fn, min_time=min_time)["median_s"]
                    row[f"{key}_ms"], row[f"{key}_x"] = 1e3 * t, t / t_ef
                except Exception as e:  # noqa: BLE001 - record the failure in the results
                    row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            # noise floors at equal wall time: the Lie derivative vs finite Haar rotations (+ translations)
            L = geolie.lie_derivative(ef_cons, pos, out_rep=out_rep)
            e0, f0 = [t.detach() for t in ef_cons(pos)]
            row["lie_rel_forces"] = float(L[1].norm() / (math.sqrt(6) * f0.norm()))
            budget = row.get("hvp_ms", row["ef_ms"] * 4) / 1e3
            n_fit = max(1, int(budget / t_ef))
            R, t = geolie.SE3.random(n_fit, torch.Generator().manual_seed(0), box=2.0, dtype=dtype, device=device)
            errs = []
            for k in range(n_fit):
                f1 = ef_cons(pos @ R[k].T + t[k])[1].detach()
                errs.append(float((f1 - f0 @ R[k].T).norm() / f0.norm()))
            row["finite_n"], row["finite_max_rel_forces"] = n_fit, max(errs)
            rows.append(row)
            print(f"  {name:>13} N={n:<4} ef {row['ef_ms']:.2f} ms  hvp {row.get('hvp_x', float('nan')):.2f}x  "
                  f"batched {row.get('hvp-batched_x', float('nan')):.2f}x  "
                  f"vmap {row.get('jvp-vmap_x', float('nan')):.2f}x"
                  f"  loop {row.get('jvp-loop_x', float('nan')):.2f}x  2xbwd {row.get('double-backward_x', float('nan')):.2f}x",
                  file=sys.stderr)
    return rows


def table(rows):
    lines = ["| model | atoms | E+F (ms) | hvp (x E+F) | hvp-batched (x) | jvp-loop (x) | jvp-vmap (x) | "
             "double-backward (x) | Lie rel. forces | finite: n rotations, max rel. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def x(k):
            return f"{r[k + '_x']:.2f}" if k + "_x" in r else "fails"

        lines.append(f"| {r['model']} | {r['atoms']} | {r['ef_ms']:.2f} | {x('hvp')} | {x('hvp-batched')} | "
                     f"{x('jvp-loop')} | {x('jvp-vmap')} | "
                     f"{x('double-backward')} | {r['lie_rel_forces']:.1e} | {r['finite_n']}, "
                     f"{r['finite_max_rel_forces']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["distance-mlp", "e3nn", "schnet"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (results: lie_derivative_cuda.json)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    rows = run(args.models, args.sizes, dtype, args.min_time, args.device)
    write_json(args.out or result_path("lie_derivative", args.device),
               {"benchmark": "lie_derivative", "env": device_info(args.device), "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
