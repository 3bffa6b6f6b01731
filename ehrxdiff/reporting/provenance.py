"""The machine and software a run's tables came from, written next to the tables (issue 15).

Two runs on the same machine give byte-identical tables (docs/reproducibility.md); across machines the
numbers move with the CPU's kernels (MKL/oneDNN pick code paths by instruction set: AVX-512 vs AVX2 sum in a
different order) and with package versions. ``environment.json`` records what a reader needs to tell which
case a difference is: CPU model and instruction set, thread counts, torch's BLAS/LAPACK build, and the
versions of the packages that compute the numbers. It holds no time stamp, so it changes only when the
environment does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pandas as pd

__all__ = ["environment", "write_environment", "compare_tables", "PACKAGES"]

# the packages whose versions can move a number in the tables
PACKAGES = ("torch", "diffusers", "accelerate", "open_clip_torch", "torchxrayvision", "numpy", "scipy", "pandas",
            "scikit-learn", "duckdb", "pyarrow", "pillow", "safetensors", "sentence-transformers", "transformers",
            "matplotlib", "seaborn")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def environment() -> dict:
    """The run's environment as a JSON-ready dict (computed once per process)."""
    import torch  # imported only to report its build: the CLI's compare needs no torch

    build = torch.__config__.show()
    settings = {}
    for part in build.split("Build settings:", 1)[-1].split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            if k.strip() in ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP", "TORCH_VERSION"):
                settings[k.strip()] = v.strip()
    libs = [ln.strip(" -") for ln in build.splitlines() if any(s in ln for s in ("Math Kernel", "MKL-DNN", "OpenMP"))]
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_build": settings,
        "torch_libraries": libs,
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED",
                                               "CUBLAS_WORKSPACE_CONFIG")},
    }


def write_environment(folder: str | Path) -> Path:
    """Write ``<folder>/environment.json`` (rewritten only when it differs, so its file time stays put)."""
    path = Path(folder) / "environment.json"
    text = json.dumps(environment(), indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def compare_tables(a: str | Path, b: str | Path, pattern: str = "table*.csv") -> "pd.DataFrame":
    """Two runs' tables side by side (issue 15's check): per file, byte-identical or not, and where not, how many
    cells differ and the largest difference of their leading numbers (``0.687 ± 0.050`` → 0.687)."""
    def lead(s: pd.Series) -> pd.Series:
        return pd.to_numeric(s.astype(str).str.replace(",", "").str.extract(r"^\s*(-?[0-9.]+)")[0], errors="coerce")

    rows = []
    for f in sorted(Path(a).glob(pattern)):
        g = Path(b) / f.name
        row = {"table": f.name, "identical": g.is_file() and f.read_bytes() == g.read_bytes(), "cells_differ": 0,
               "max_abs_diff": 0.0}
        if not g.is_file():
            row.update(identical=False, cells_differ=None, max_abs_diff=None)
        elif not row["identical"]:
            x, y = pd.read_csv(f, index_col=0), pd.read_csv(g, index_col=0)
            if x.shape != y.shape or list(x.columns) != list(y.columns):
                row.update(cells_differ=None, max_abs_diff=None)
            else:
                row["cells_differ"] = int((x.astype(str).to_numpy() != y.astype(str).to_numpy()).sum())
                d = [float((lead(x[c]) - lead(y[c])).abs().max()) for c in x.columns]
                d = [v for v in d if v == v]
                row["max_abs_diff"] = max(d) if d else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["table", "identical", "cells_differ", "max_abs_diff"])


def main(argv: list[str] | None = None) -> int:
    """``python -m ehrxdiff.reporting.provenance compare A B``: the tables of two runs (figures folders), exit 1 if any
    differs; ``python -m ehrxdiff.reporting.provenance show``: this environment."""
    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.reporting.provenance")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--pattern", default="table*.csv")
    sub.add_parser("show")
    args = ap.parse_args(argv)
    if args.command == "show":
        print(json.dumps(environment(), indent=1, sort_keys=True))
        return 0
    res = compare_tables(args.a, args.b, args.pattern)
    print(res.to_string(index=False))
    n_same = int(res["identical"].sum())
    print(f"{n_same} of {len(res)} tables byte-identical")
    return 0 if len(res) and n_same == len(res) else 1


if __name__ == "__main__":
    raise SystemExit(main())
