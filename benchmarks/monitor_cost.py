"""What one EquivarianceMonitor measurement costs, by held-out sample size (``max_samples``), on this machine.

The model is the training tutorial's per-atom MLP on centred coordinates (docs/examples/training.py), the held-out
set xTB ethanol ``val`` (100 structures), float64, SO(3), ``n_finite`` 2 (the default): one warm-up measurement,
then the median of 5. Results: ``benchmarks/results/monitor_cost.json``.
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "docs", "examples"))


def main():
    import geolie
    from geolie.monitor import EquivarianceMonitor

    src = open(os.path.join(HERE, "..", "docs", "examples", "training.py")).read()
    ns = {}
    exec(src.split("def fit")[0], ns)  # the tutorial's model class and data
    torch.manual_seed(0)
    model = ns["CentredMLP"]().double()
    held = geolie.data.load("xtb-md/ethanol", "val")
    rows = []
    for m in (4, 16, 64, None):
        with tempfile.TemporaryDirectory() as d:
            mon = EquivarianceMonitor(model, held, d, every=1, group="SO3", max_samples=m, plot=False)
            mon.measure(0)
            ts = []
            for k in range(5):
                t0 = time.perf_counter()
                mon.measure(k + 1)
                ts.append(time.perf_counter() - t0)
        rows.append({"max_samples": m, "n": len(mon.data), "median_s": statistics.median(ts), "runs": ts})
        print(f"max_samples={m!s:>5} ({len(mon.data):>3} structures): {statistics.median(ts):.2f} s per measurement")
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "monitor_cost.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
