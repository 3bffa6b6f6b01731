"""The machine and software a run's tables came from, written next to the tables (issue 15).

Two runs on the same machine give byte-identical tables (README, "Reproducibility"); across machines the
numbers move with the CPU's kernels (MKL/oneDNN pick code paths by instruction set: AVX-512 vs AVX2 sum in a
different order) and with package versions. ``environment.json`` records what a reader needs to tell which
case a difference is: CPU model and instruction set, thread counts, torch's BLAS/LAPACK build, and the
versions of the packages that compute the numbers. It holds no time stamp, so it changes only when the
environment does.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["environment", "write_environment", "PACKAGES"]

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
    import torch

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
