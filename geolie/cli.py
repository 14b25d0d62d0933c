"""The ``geolie`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="geolie", description="Measure how equivariant a model is (Lie derivatives "
                                     "under SO(3)/SE(3)).")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="Lie derivatives of bundled equivariant and non-equivariant models on "
                          "ASE molecules (no download)")
    demo.add_argument("--molecules", nargs="+", default=None,
                      help="ASE molecule names (ase.build.molecule), default: H2O CH4 CH3CH2OH C6H6 CH3COOH")
    demo.add_argument("--json", default=None, help="also write the full results (per generator, floors) here")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import DEFAULT_MOLECULES, run_demo

        mols = args.molecules or DEFAULT_MOLECULES
        from ase.collections import g2

        unknown = [m for m in mols if m not in g2.names]
        if unknown:
            parser.error(f"unknown molecule(s) {unknown}; choose from ase.collections.g2, e.g. {g2.names[:8]}")
        run_demo(mols, args.json)
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
