"""What every step of the study shares: seeding right before a model is built, and the figures folder."""
from __future__ import annotations

from pathlib import Path

from accelerate.utils import set_seed

from ehrxdiff.config import StudyConfig


def seed_everything(cfg: StudyConfig) -> None:
    """Seed Python, NumPy and torch from ``cfg.seed`` right before a model is built. Its initial weights come from the
    global RNG, whose state there was not fixed: two fresh runs of notebook 03 trained different CLIP weights (max
    |diff| 0.46) from identical data. The training loops seed only after the model exists."""
    set_seed(cfg.seed)


def figures_dir(cfg: StudyConfig) -> Path:
    """Where tables and figures go (``figures/`` for the demo, under the run folder for smoke and gpu), created."""
    p = cfg.path("figures_dir")
    p.mkdir(parents=True, exist_ok=True)
    return p
