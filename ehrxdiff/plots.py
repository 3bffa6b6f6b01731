"""Figures of the data notebooks (01, 02): contact sheets, interval histograms, example pairs, event counts.

Each function draws from tidy frames, returns the matplotlib figure and, given ``path_stem``, saves PNG + PDF
through :func:`ehrxdiff.reporting.save_figure` (the evaluation figures live in :mod:`ehrxdiff.reporting`).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .images import read_gray
from .reporting import save_figure
from .schemas import cxr_image_relpath


def finish_figure(fig, path_stem):
    """Tight layout, then PNG + PDF under ``path_stem`` when given (``reporting.save_figure``); every figure
    function of the package ends here, so all figures are written the same way."""
    fig.tight_layout()
    if path_stem is not None:
        save_figure(fig, path_stem)
    return fig


def contact_sheet(metadata: pd.DataFrame, cxr_root: str | Path, *, n: int = 16, seed: int = 0,
                  caption_cols=("ViewPosition",), path_stem=None):
    """A grid of images picked at random from the MIMIC-CXR metadata (all views)."""
    rows = metadata.sample(min(n, len(metadata)), random_state=seed)
    k = int(np.ceil(np.sqrt(len(rows))))
    fig, axes = plt.subplots(k, k, figsize=(1.8 * k, 1.9 * k))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, r in zip(np.ravel(axes), rows.itertuples()):
        ax.imshow(read_gray(Path(cxr_root) / cxr_image_relpath(r.subject_id, r.study_id, r.dicom_id)),
                  cmap="gray", vmin=0, vmax=1)
        ax.set_title(" ".join(str(getattr(r, c)) for c in caption_cols), fontsize=7)
    return finish_figure(fig, path_stem)


def interval_histogram(pairs: pd.DataFrame, *, max_hours: float = 48, title: str | None = None, path_stem=None):
    """Hours between I_prev and I_trg per split (the paper caps it at 48 h, §II-D). ``title`` says which pairs:
    notebook 01's cohort, or notebook 02's samples (pairs with events, re-split), which Table I counts."""
    fig, ax = plt.subplots(figsize=(5, 3))
    if title:
        ax.set_title(title, fontsize=8)
    for split, g in pairs.groupby("split"):
        ax.hist(g["interval_hours"], bins=np.linspace(0, max_hours, 25), alpha=0.6, label=f"{split} (n={len(g)})",
                density=True)
    ax.set_xlabel("interval I_prev → I_trg (h)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return finish_figure(fig, path_stem)


def pair_examples(pairs: pd.DataFrame, cxr_root: str | Path, *, n: int = 4, seed: int = 0, path_stem=None):
    """I_prev → I_trg for a few pairs, with the interval."""
    rows = pairs.sample(min(n, len(pairs)), random_state=seed)
    fig, axes = plt.subplots(len(rows), 2, figsize=(4, 2.1 * len(rows)), squeeze=False)
    for (a, b), r in zip(axes, rows.itertuples()):
        for ax, rel, title in ((a, r.prev_path, "I_prev"), (b, r.target_path, f"I_trg (+{r.interval_hours:.1f} h)")):
            ax.imshow(read_gray(Path(cxr_root) / rel), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return finish_figure(fig, path_stem)


def event_counts(events: pd.DataFrame, *, path_stem=None):
    """Events per table (left) and per pair (right) after the reference's filters."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    events["table"].value_counts().plot.barh(ax=a, color="0.4")
    a.set_xlabel("events")
    per_pair = events.groupby("pair_key").size()
    b.hist(per_pair, bins=30, color="0.4")
    b.set_xlabel("events per pair")
    b.set_ylabel("pairs")
    return finish_figure(fig, path_stem)


def loss_curves(history: pd.DataFrame, *, title: str = "", path_stem=None, y: str = "loss"):
    """Train/valid loss per optimizer step from a trainer's tidy ``history.csv``."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for split, g in history.groupby("split"):
        ax.plot(g["step"], g[y], marker="o" if split != "train" else None, ms=3, label=split,
                lw=0.8 if split == "train" else 1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return finish_figure(fig, path_stem)


def embedding_projection(embeddings: np.ndarray, values, *, label: str, path_stem=None):
    """2-D PCA of unit-norm embeddings coloured by a ground-truth value (does the tower see clinical state?)."""
    from sklearn.decomposition import PCA
    xy = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=8, cmap="viridis")
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return finish_figure(fig, path_stem)


def image_grid(columns: dict[str, list], *, row_titles=None, path_stem=None):
    """Columns of images (arrays or tensors in [-1, 1], or uint8) side by side: e.g. I_prev | I_trg | predictions."""
    from .images import to_uint8
    names = list(columns)
    n = len(columns[names[0]])
    fig, axes = plt.subplots(n, len(names), figsize=(1.7 * len(names), 1.8 * n), squeeze=False)
    for j, name in enumerate(names):
        for i, img in enumerate(columns[name]):
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                arr = to_uint8(img if hasattr(img, "dim") else __import__("torch").as_tensor(img))[0]
            axes[i, j].imshow(arr, cmap="gray", vmin=0, vmax=255)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        if row_titles is not None:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=6)
    return finish_figure(fig, path_stem)
