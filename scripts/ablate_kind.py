"""Ablations of KIND's transfer beside a finished demo directory (see kind.experiments.ablations).

python scripts/ablate_kind.py runs/demo_paper --out runs/ablations [--jobs 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kind.experiments.ablations import run_ablations


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("demo", type=Path, help="a finished demo directory (default or paper preset)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--orth-weight", type=float, default=1e-4)
    args = ap.parse_args()
    print(run_ablations(args.demo, args.out, args.jobs, args.orth_weight))


if __name__ == "__main__":
    main()
