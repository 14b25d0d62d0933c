"""Run the documentation's examples (``docs/examples``), each a whole program, and check or write their output.

Every code block of the docs is one of these files, included into its page with ``--8<--`` (pymdownx.snippets),
and so is the output shown under it (``<example>.out``). The test suite (``tests/test_docs.py``) runs each example
in a fresh copy of the folder and compares its standard output with the ``.out`` file shown in the docs: text
exactly, numbers to 2% (numbers below 1e-9, rounding-level figures that differ between CPUs, only have to stay below
it). After changing an example, write its output again::

    python docs/run_examples.py --write [NAME ...]
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "examples")

#: example file -> what it needs beyond the core install (a module to import, or an executable), or None
EXAMPLES: Dict[str, Optional[str]] = {
    "quickstart.py": None,
    "own_model_cli.sh": None,
    "api_tour.py": None,
    "ase_calculator.py": None,
    "package_file.py": "mace",
    "gate.sh": "pytest",
    "training.py": None,
    "hunt.py": None,
    "dataset_scale.sh": None,
    "torchrun.sh": "torchrun",
    "baselines.py": None,
}
#: files the examples use but that are not run themselves
SUPPORT = ("my_potential.py", "test_gate.py", "slurm.sh")

_NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def missing(need: Optional[str]) -> Optional[str]:
    """Why an example cannot run here (``None``: it can)."""
    if need is None:
        return None
    if need == "torchrun":
        return None if shutil.which("torchrun") else "torchrun is not on PATH"
    import importlib.util

    return None if importlib.util.find_spec(need) else f"{need} is not installed"


def run(name: str, timeout: float = 600) -> Tuple[str, str, int]:
    """Run one example in a fresh copy of the examples folder; returns (stdout, stderr, exit status)."""
    with tempfile.TemporaryDirectory(prefix="geolie-example-") as tmp:
        for f in os.listdir(FOLDER):
            if f.endswith((".py", ".sh")):
                shutil.copy(os.path.join(FOLDER, f), tmp)
        cmd = [sys.executable, name] if name.endswith(".py") else ["bash", name]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        bindir = os.path.dirname(sys.executable)  # the geolie and torchrun of this Python first
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        return p.stdout, p.stderr, p.returncode


def differences(expected: str, got: str, rtol: float = 0.02, tiny: float = 1e-9) -> List[str]:
    """Lines where ``got`` differs from ``expected``: the text between numbers exactly, numbers to ``rtol`` (both
    below ``tiny`` in magnitude: equal)."""
    out = []
    e_lines, g_lines = expected.splitlines(), got.splitlines()
    if len(e_lines) != len(g_lines):
        out.append(f"{len(g_lines)} lines, expected {len(e_lines)}")
    for k, (e, g) in enumerate(zip(e_lines, g_lines)):
        if _NUM.sub("#", e).rstrip() != _NUM.sub("#", g).rstrip():
            out.append(f"line {k + 1}: {g!r}, expected {e!r}")
            continue
        for a, b in zip(_NUM.findall(e), _NUM.findall(g)):
            x, y = float(a), float(b)
            if abs(x) < tiny and abs(y) < tiny:
                continue
            if not math.isclose(x, y, rel_tol=rtol, abs_tol=tiny):
                out.append(f"line {k + 1}: {b} where the docs show {a}: {g!r}")
                break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="examples to run (default: all)")
    ap.add_argument("--write", action="store_true", help="write each example's output to <example>.out")
    args = ap.parse_args(argv)
    status = 0
    for name in args.names or list(EXAMPLES):
        why = missing(EXAMPLES[name])
        if why:
            print(f"{name}: skipped ({why})")
            continue
        out, err, rc = run(name)
        path = os.path.join(FOLDER, name + ".out")
        if rc != 0:
            print(f"{name}: exit status {rc}\n{err[-3000:]}")
            status = 1
        elif args.write:
            with open(path, "w") as fh:
                fh.write(out)
            print(f"{name}: written {os.path.relpath(path)}")
        else:
            diff = differences(open(path).read(), out) if os.path.exists(path) else ["no .out file"]
            print(f"{name}: " + ("as in the docs" if not diff else "differs:\n  " + "\n  ".join(diff)))
            status |= bool(diff)
    return status


if __name__ == "__main__":
    sys.exit(main())
