"""``python -m ehrxdiff.synthetic --out DIR --n-patients N --seed S [--image-size PX]``."""
from __future__ import annotations

import argparse
import sys
import time

from . import WorldConfigError, generate_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ehrxdiff.synthetic", description=__doc__)
    p.add_argument("--out", default="data/synthetic", help="output directory (default data/synthetic)")
    p.add_argument("--n-patients", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--chart-sets-per-hour", type=int, default=1, help="multiply ICU vital-sign rows (benchmarks)")
    p.add_argument("--no-images", action="store_true", help="write the tables only")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = generate_world(a.out, n_patients=a.n_patients, seed=a.seed, image_size=a.image_size,
                             chart_sets_per_hour=a.chart_sets_per_hour, workers=a.workers,
                             overwrite=a.overwrite, render=not a.no_images)
    except WorldConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"synthetic world written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
