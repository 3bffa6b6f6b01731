"""``python -m ehrxdiff.bench``: the benchmarks' command line (:mod:`ehrxdiff.bench.cli`)."""
from ehrxdiff.bench.cli import main

raise SystemExit(main())
