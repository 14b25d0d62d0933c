"""Overhead of frame averaging against the bare backbone.

Backbones: ``point-mlp`` (DeepSets on raw centred coordinates: plain, non-equivariant, cost linear in the batch)
and ``schnet`` (PyG's SchNet on geolie's radius graph: a realistic GNN cost; its equivariance is irrelevant to the
overhead measured here). Batches of 32 molecules from the
bundled ``xtb-md`` data (9-21 atoms; ``--structures`` for more), float32, CPU (``--device cuda``: on a GPU, where
K separate calls pay K launch latencies and the folded batch does not). For E(3) (8 frames) and SE(3) (4 frames):

* ``ratio_vs_k_calls`` = t(FrameAveraging) / (K · t(backbone on the batch)): the issue's target is <= 1.2;
* ``ratio_vs_folded`` = t(FrameAveraging) / t(backbone on the K-times larger folded batch): the pure overhead of
  frames, folding and mapping back;
* ``one_frame_per_call_ratio_vs_k_calls``: the same with ``frames_per_call=1`` (K backbone calls);
* ``frames_*_eigh_ms``: the PCA frames alone, 3x3 eigenproblems solved on the host (default) or on the device.

Energies only, and energy + forces by autograd. Writes ``benchmarks/results/frame_averaging[_cuda].json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import device_info, result_path, timeit, write_json  # noqa: E402

import geolie.data as gd  # noqa: E402
from geolie.adapters.pyg import geolie_radius_graph, schnet  # noqa: E402
from geolie.nn import FrameAveraging, pca_frames  # noqa: E402


class PointMLP(torch.nn.Module):
    """DeepSets energy on raw coordinates (centred per structure): plain and non-equivariant."""

    def __init__(self, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 16)
        self.phi = torch.nn.Sequential(torch.nn.Linear(19, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, 1))

    def forward(self, z, pos, batch):
        n = int(batch.max()) + 1
        cnt = pos.new_zeros(n).index_add(0, batch, torch.ones_like(pos[:, 0]))
        c = pos.new_zeros(n, 3).index_add(0, batch, pos) / cnt[:, None]
        e = self.phi(torch.cat([pos - c[batch], self.emb(z).to(pos.dtype)], -1))[:, 0]
        return pos.new_zeros(n).index_add(0, batch, e)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--structures", nargs="+", type=int, default=[32], help="batch sizes (molecules per batch)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    rows = []
    for n_st in args.structures:
        rows += measure(n_st, dev)
    write_json(result_path("frame_averaging", args.device),
               {"benchmark": "frame_averaging", "env": device_info(args.device), "rows": rows})
    print("| backbone | structures | group | frames | bare (ms) | FA (ms) | FA / (K x bare) | FA / folded batch | "
          "frames_per_call=1: FA / (K x bare) | "
          "E+F: FA / (K x bare) | frames: host eigh (ms) | device eigh (ms) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['structures']} | {r['group']} | {r['frames']} | {r['bare_ms']:.2f} | "
              f"{r['fa_ms']:.2f} | {r['ratio_vs_k_calls']:.2f} | {r['ratio_vs_folded']:.2f} | "
              f"{r['one_frame_per_call_ratio_vs_k_calls']:.2f} | "
              f"{r['forces_ratio_vs_k_calls']:.2f} | {r['frames_host_eigh_ms']:.3f} | {r['frames_device_eigh_ms']:.3f} |")


def measure(n_st, dev):
    mols = {m: gd.load(f"xtb-md/{m}", "test") for m in ("ethanol", "benzene", "aspirin", "naphthalene")}
    frames = [mols[m][k // 4] for k, m in zip(range(n_st), list(mols) * n_st)]
    b = gd.to_pyg(frames, dtype=torch.float32)
    z, pos, batch = b.z.to(dev), b.pos.to(dev), b.batch.to(dev)
    rows = []
    sch = schnet().to(dev)

    def schnet_energy(z, pos, batch):
        with geolie_radius_graph():
            return sch(z, pos, batch).reshape(-1)

    for name, bb in (("point-mlp", PointMLP().to(dev)), ("schnet", schnet_energy)):
        t_bare = timeit(lambda: bb(z, pos, batch), min_time=0.5)["median_s"]
        for group in ("E3", "SE3"):
            fa = FrameAveraging(bb, group=group, gap_threshold=0.0)
            K = fa.n_frames
            zf = z.repeat(K)
            pf = pos.repeat(K, 1)
            bf = (batch[None] + n_st * torch.arange(K, device=dev)[:, None]).reshape(-1)
            t_fold = timeit(lambda: bb(zf, pf, bf), min_time=0.5)["median_s"]
            t_fa = timeit(lambda: fa(z, pos, batch), min_time=0.5)["median_s"]
            fa1 = FrameAveraging(bb, group=group, gap_threshold=0.0, frames_per_call=1)
            t_fa1 = timeit(lambda: fa1(z, pos, batch), min_time=0.5)["median_s"]

            def ef():
                p = pos.clone().requires_grad_(True)
                torch.autograd.grad(fa(z, p, batch).sum(), p)

            def ef_bare():
                p = pos.clone().requires_grad_(True)
                torch.autograd.grad(bb(z, p, batch).sum(), p)

            t_ef = timeit(ef, min_time=0.5)["median_s"]
            t_ef_bare = timeit(ef_bare, min_time=0.5)["median_s"]
            t_frames = {where: timeit(lambda: pca_frames(pos, batch, n_st, fa.center, fa.proper, solve_on=where),
                                      min_time=0.2)["median_s"] for where in ("host", "device")}
            row = {"backbone": name, "group": group, "frames": K, "structures": n_st, "atoms": int(pos.shape[0]),
                   "bare_ms": 1e3 * t_bare, "folded_ms": 1e3 * t_fold, "fa_ms": 1e3 * t_fa,
                   "ratio_vs_k_calls": t_fa / (K * t_bare), "ratio_vs_folded": t_fa / t_fold,
                   "fa_one_frame_per_call_ms": 1e3 * t_fa1, "one_frame_per_call_ratio_vs_k_calls": t_fa1 / (K * t_bare),
                   "forces_ratio_vs_k_calls": t_ef / (K * t_ef_bare),
                   "frames_host_eigh_ms": 1e3 * t_frames["host"], "frames_device_eigh_ms": 1e3 * t_frames["device"]}
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
