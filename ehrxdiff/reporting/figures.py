"""Every figure of the study, drawn from tidy frames: one module, so all figures are made and written the same way.

Each function returns the matplotlib figure and, given ``path_stem``, writes ``<stem>.png`` and ``<stem>.pdf``
through :func:`finish_figure`. In the notebooks' order: the data (01, 02: contact sheets, interval histograms,
example pairs, event counts), training (03, 04: loss curves, embeddings, image grids), Tables II–IV as bars and
heat maps and the event-guidance sweep (05), the qualitative panels with their S_event captions (06, Fig. 2 of the
paper), and the what-if, uncertainty, calibration, rollout and sampler-study figures (07).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.images import read_gray, to_uint8
from ehrxdiff.data.schemas import cxr_image_relpath
from ehrxdiff.evaluation.metrics import SUBSETS
from ehrxdiff.simulation.uncertainty import pixel_std
from ehrxdiff.simulation.whatif import WhatIf


def save_figure(fig, path_stem: str | Path, dpi: int = 200) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (publication copies of every figure).

    No creation date is written into the PDF, so an unchanged figure gives an unchanged file (clean diffs)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    return paths


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
    from sklearn.decomposition import PCA  # heavy (scikit-learn), only where it is used
    xy = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=8, cmap="viridis")
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return finish_figure(fig, path_stem)


def image_grid(columns: dict[str, list], *, row_titles=None, path_stem=None):
    """Columns of images (arrays or tensors in [-1, 1], or uint8) side by side: e.g. I_prev | I_trg | predictions."""
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


def plot_auroc_bars(results: pd.DataFrame, path_stem: str | Path, *, hue: str = "method",
                    hue_order=None, ceiling: dict | None = None, title: str | None = None):
    """Table II as grouped bars: x = subset, bar = method, error bar = std over seeds (sd).

    Deterministic baselines have one value and no error bar; a ceiling (synthetic world) is a dashed
    line over each subset group.
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    sns.barplot(data=results, x="subset", y="auroc", hue=hue, order=list(SUBSETS), hue_order=hue_order,
                errorbar="sd", capsize=0.1, err_kws={"linewidth": 1}, ax=ax)
    if ceiling is not None:
        for i, subset in enumerate(SUBSETS):
            if subset in ceiling and np.isfinite(ceiling[subset]):
                ax.hlines(ceiling[subset], i - 0.42, i + 0.42, colors="k", linestyles="--", linewidth=1,
                          label="ceiling (true severity)" if i == 0 else None)
    ax.set(ylim=(0, 1.05), xlabel="", ylabel="weighted macro AUROC", title=title)
    ax.axhline(0.5, color="0.6", linewidth=0.6, zorder=0)
    ax.legend(frameon=False, fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    sns.despine(fig)
    save_figure(fig, path_stem)
    return fig


def plot_guidance_sweep(tidy: pd.DataFrame, path_stem: str | Path, *, chosen: float | None = None):
    """Event guidance sweep (issue 14): one panel per metric (AUROC all / diff / same, FID, re-id rank) against s,
    own S_event as a line with the seed sd, the shuffled-events control as separate points; ``chosen`` is marked."""
    metrics = [m for m in ("AUROC all", "AUROC diff", "AUROC same", "FID", "re-id rank") if m in set(tidy["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 2.6), squeeze=False)
    span = float(tidy["s"].max() - tidy["s"].min()) or 1.0
    for ax, metric in zip(axes[0], metrics):
        d = tidy[tidy["metric"] == metric].copy()
        d.loc[d["events"] == "shuffled", "s"] += 0.04 * span   # dodge: the control sits beside its own-events point
        sns.lineplot(data=d, x="s", y="value", hue="events", hue_order=["own", "shuffled"], style="events",
                     markers=True, dashes=False, errorbar="sd", err_style="bars", ax=ax, legend=ax is axes[0][-1])
        if chosen is not None:
            ax.axvline(chosen, color="0.6", linewidth=0.8, linestyle=":")
        ax.set(title=metric, xlabel="event guidance s", ylabel="")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="S_event")
    sns.despine(fig)
    fig.tight_layout()
    save_figure(fig, path_stem)
    return fig


def plot_label_heatmap(per_label: pd.DataFrame, path_stem: str | Path, *, index: str = "method",
                       index_order=None, subsets=SUBSETS):
    """Per-label AUROC (mean over seeds) as method × label heatmaps, one panel per subset."""
    agg = per_label.groupby([index, "subset", "label"], sort=False)["auroc"].mean().reset_index()
    rows = list(index_order) if index_order is not None else list(dict.fromkeys(agg[index]))
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.2 * len(subsets), 0.45 * len(rows) + 2.4),
                             squeeze=False, sharey=True)
    for ax, subset in zip(axes[0], subsets):
        mat = agg[agg["subset"] == subset].pivot(index=index, columns="label", values="auroc").reindex(rows)
        sns.heatmap(mat, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    annot_kws={"fontsize": 6}, cbar=ax is axes[0][-1])
        ax.set(title=subset, xlabel="", ylabel="")
        plt.setp(ax.get_xticklabels(), rotation=50, ha="right", rotation_mode="anchor", fontsize=7)
    save_figure(fig, path_stem)
    return fig


def _gray(img) -> np.ndarray:
    """[C, H, W] / [H, W] tensor or array → float [H, W] in [0, 1]. Floats are the project's [-1, 1];
    uint8 is [0, 255]."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3:
        a = a.mean(axis=0)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip((a.astype(np.float32) + 1) / 2, 0, 1)


# Which MIMIC events a figure shows first when S_event is too long to print: what was done to the patient, then
# what was measured. Vitals outnumber treatments many times over and would otherwise fill every caption. An own
# cohort's tables have other names: config ``event_salience`` orders them (none: no table order).
SALIENCE = ("prescriptions", "inputevents", "procedureevents", "microbiologyevents", "labevents", "outputevents",
            "chartevents")


def salience_rule(salience) -> str:
    """How :func:`salient_events` chose, in words, for the caption's "k of N events: …" line."""
    salience = tuple(salience)
    if salience == SALIENCE:
        return "treatments, labs, then vitals"
    if salience:
        return f"{', '.join(salience)} first, distinct items, most recent first"
    return "distinct items, most recent first"


def salient_events(events, n: int, salience=SALIENCE) -> list[str]:
    """Up to ``n`` of S_event's ``(text, hours since I_prev, table)`` for a figure caption, like the paper's Fig. 2,
    which prints the events that explain the change rather than the last vitals: by table in ``salience`` order
    (MIMIC's :data:`SALIENCE` by default; tables not named come after, all alike), then distinct items before
    repeats of one (the text before " value "), most recent first; returned in time order as "+12 h <text>".
    (The figure says how many of how many it shows and how it chose: pass ``n_events_total`` and
    ``events_rule`` = :func:`salience_rule` with the example.)"""
    ev = list(events)
    salience = tuple(salience)
    rank = {t: i for i, t in enumerate(salience)}
    repeat, seen = [0] * len(ev), {}
    for i in sorted(range(len(ev)), key=lambda i: (-float(ev[i][1]), -i)):   # most recent occurrence = 0
        item = str(ev[i][0]).split(" value ")[0]
        repeat[i] = seen.get(item, 0)
        seen[item] = repeat[i] + 1
    order = sorted(range(len(ev)), key=lambda i: (rank.get(str(ev[i][2]), len(salience)), repeat[i],
                                                  -float(ev[i][1]), -i))
    chosen = sorted(order[:n])
    return [f"+{float(ev[i][1]):.0f} h {ev[i][0]}" for i in chosen]


def _event_text(events, max_events: int, width: int, total: int | None = None,
                rule: str = salience_rule(SALIENCE)) -> str:
    """The caption's event lines: the last ``max_events``, or - when ``total`` says they were chosen from a longer
    S_event by :func:`salient_events` - all of them under a "k of N events: <rule>" line."""
    ev = list(events)
    shown = [textwrap.shorten(str(e), width=width, placeholder="…") for e in ev[-max_events:]]
    if total is not None and total > len(shown):
        head = [f"({len(shown)} of {total} events: {rule})"]
    else:
        more = len(ev) - len(shown)
        head = [f"(+{more} earlier events)"] if more > 0 else []
    return "\n".join(head + shown)


def plot_qualitative(examples: list[dict], path_stem: str | Path, *, max_events: int = 6,
                     event_width: int = 46):
    """Fig. 2 style rows: I_prev → (events) → I_trg and I_pred.

    Each example: ``prev``, ``target``, ``pred`` images, ``events`` (texts of S_event, time order; with
    ``n_events_total`` and ``events_rule`` when they are a :func:`salient_events` choice),
    ``finding`` (the change between I_prev and I_trg, printed bold under the arrow) and an optional
    ``title`` (e.g. the pair key and interval).
    """
    n = len(examples)
    fig, axes = plt.subplots(n, 4, figsize=(10.5, 2.7 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.45, 1, 1], "wspace": 0.05})
    for r, ex in enumerate(examples):
        for c, (key, name) in zip((0, 2, 3), (("prev", "$I_{prev}$"), ("target", "$I_{trg}$"),
                                               ("pred", "$I_{pred}$"))):
            ax = axes[r][c]
            ax.imshow(_gray(ex[key]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]); ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
        ax = axes[r][1]
        ax.axis("off")
        ax.annotate("", xy=(0.97, 0.86), xytext=(0.03, 0.86), xycoords="axes fraction",
                    arrowprops={"arrowstyle": "-|>", "lw": 1.5, "color": "k"})
        if ex.get("finding"):
            ax.text(0.5, 0.74, ex["finding"], ha="center", va="top", fontsize=8, fontweight="bold",
                    wrap=True, transform=ax.transAxes)
        ax.text(0.5, 0.60, _event_text(ex.get("events", []), max_events, event_width, ex.get("n_events_total"),
                                       ex.get("events_rule", salience_rule(SALIENCE))),
                ha="center",
                va="top", fontsize=5.5, family="monospace", multialignment="left",
                transform=ax.transAxes)
        if ex.get("title"):
            ax.set_title(ex["title"], fontsize=7)
    save_figure(fig, path_stem)
    return fig


def plot_difference_maps(examples: list[dict], path_stem: str | Path):
    """Per row: I_prev, I_pred − I_prev, I_trg − I_prev (shared symmetric colour scale per row), so the
    predicted change can be compared with the real one at a glance."""
    n = len(examples)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for r, ex in enumerate(examples):
        prev, pred, trg = (_gray(ex[k]) for k in ("prev", "pred", "target"))
        d_pred, d_trg = pred - prev, trg - prev
        lim = max(float(np.abs(d_pred).max()), float(np.abs(d_trg).max()), 1e-6)
        axes[r][0].imshow(prev, cmap="gray", vmin=0, vmax=1)
        im = None
        for ax, d in zip(axes[r][1:], (d_pred, d_trg)):
            im = ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for ax in axes[r]:
            ax.set_xticks([]); ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[r]), fraction=0.025, pad=0.02)
        if ex.get("title"):
            axes[r][0].set_ylabel(ex["title"], fontsize=7)
    for ax, t in zip(axes[0], ("$I_{prev}$", "$I_{pred} - I_{prev}$", "$I_{trg} - I_{prev}$")):
        ax.set_title(t, fontsize=10)
    save_figure(fig, path_stem)
    return fig


def plot_rollout_example(dataset, chains: pd.DataFrame, preds: dict[str, dict], chain: int, path_stem=None):
    """One chain: the true films on top, the rollout (seed 0) below, starting from the true I_0."""

    index = {k: i for i, k in enumerate(dataset.pairs["pair_key"])}
    g = chains[chains["chain"] == chain].sort_values("step")
    n = len(g) + 1
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.0), squeeze=False)
    first = dataset[index[g["pair_key"].iloc[0]]]["prev_image"]
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(first[0].numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[0][0].set_title("I_0", fontsize=8)
    for j, (_, r) in enumerate(g.iterrows(), start=1):
        axes[0][j].imshow(dataset[index[r["pair_key"]]]["target_image"][0].numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[0][j].set_title(f"true I_{j}", fontsize=8)
        axes[1][j].imshow(preds["rollout"][(chain, r["step"])][0, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[1][j].set_title(f"rollout Î_{j}", fontsize=8)
    return finish_figure(fig, path_stem)


def plot_rollout(metrics: pd.DataFrame, path_stem=None):
    """Each metric against the step, mean over seeds, one line per method."""

    names = list(dict.fromkeys(metrics["metric"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.3), squeeze=False)
    for ax, metric in zip(axes[0], names):
        m = metrics[metrics["metric"] == metric].groupby(["method", "step"])["value"].mean().unstack(0)
        for method in m.columns:
            ax.plot(m.index, m[method], marker="o", ms=3, label=method)
        ax.set_xlabel("step along the admission")
        ax.set_title(metric + (" (↑)" if metric in ("AUROC (pooled)", "PSNR", "SSIM") else " (↓)"), fontsize=9)
        ax.set_xticks(m.index)
    axes[0][0].legend(fontsize=7)
    n = metrics.groupby("step")["n_pairs"].max()
    fig.suptitle("rollout vs one-step vs carrying the first image forward; pairs per step: "
                 + ", ".join(f"{s}: {v}" for s, v in n.items()), fontsize=8)
    return finish_figure(fig, path_stem)


def plot_sampler_study(table: pd.DataFrame, path_stem=None, *, reference: dict | None = None):
    """AUROC all/diff/same, FID and seconds per image against steps, one line per sampler.

    ``reference``: optional {metric: value} drawn as dashed lines (e.g. the previous-image baseline's AUROC)."""

    metrics = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.9 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for sampler, g in table[table["metric"] == metric].groupby("sampler", sort=False):
            g = g.sort_values("steps")
            ax.plot(g["steps"], g["value"], marker="o", ms=3, label=sampler)
        if reference and metric in reference and np.isfinite(reference[metric]):
            ax.axhline(reference[metric], color="grey", ls="--", lw=0.8, label="previous image")
        ax.set_xscale("log")
        ax.set_xticks(sorted(table["steps"].unique()), [str(s) for s in sorted(table["steps"].unique())])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=7)
    return finish_figure(fig, path_stem)


def plot_calibration(table: pd.DataFrame, path_stem=None):
    """Reliability diagram: mean predicted probability vs frequency of the finding in I_trg, one line per method."""

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect")
    for method, g in table.groupby("method", sort=False):
        ax.plot(g["mean_score"], g["frequency"], marker="o", ms=3, label=f"{method} (ECE {g['ece'].iloc[0]:.3f})")
    ax.set_xlabel("evaluator P(finding) on the image")
    ax.set_ylabel("frequency of the finding in the true I_trg")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return finish_figure(fig, path_stem)


def plot_uncertainty(prev: torch.Tensor, samples: torch.Tensor, targets: torch.Tensor, spread: pd.DataFrame | None,
                     pair_keys: Sequence[str], path_stem=None, *, max_rows: int = 3):
    """Per pair: I_prev, I_trg, two samples, the mean and the per-pixel std; right: P(finding) spread per pair
    (left out when ``spread`` is None: no finding labels, so no evaluator probabilities)."""

    rows = min(max_rows, len(pair_keys))
    std = pixel_std(samples)
    fig = plt.figure(figsize=(14 if spread is not None else 10, 2.3 * rows + 0.4))
    grid = fig.add_gridspec(rows, 7 if spread is not None else 6,
                            width_ratios=[1, 1, 1, 1, 1, 1, 2.2] if spread is not None else None)
    for r in range(rows):
        panels = [("I_prev", prev[r, 0], "gray", (-1, 1)), ("I_trg", targets[r, 0], "gray", (-1, 1)),
                  ("sample 0", samples[r, 0, 0], "gray", (-1, 1)),
                  ("sample 1", samples[r, min(1, samples.shape[1] - 1), 0], "gray", (-1, 1)),
                  (f"mean of {samples.shape[1]}", samples[r, :, 0].mean(0), "gray", (-1, 1)),
                  (f"pixel std (max {float(std[r].max()):.2f})", std[r], "magma", (0, max(float(std.max()), 1e-6)))]
        for c, (name, img, cmap, (lo, hi)) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(img.numpy(), cmap=cmap, vmin=lo, vmax=hi)
            ax.axis("off")
            if r == 0:
                ax.set_title(name, fontsize=8)
        if spread is None:
            continue
        ax = fig.add_subplot(grid[r, 6])
        s = spread[spread["pair_key"] == pair_keys[r]]
        y = np.arange(len(s))
        ax.errorbar(s["mean"], y, xerr=[s["mean"] - s["min"], s["max"] - s["mean"]], fmt="o", ms=3, lw=1)
        ax.set_yticks(y, s["label"], fontsize=6)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        if r == rows - 1:
            ax.set_xlabel("P(finding): mean, min–max over samples", fontsize=8)
    return finish_figure(fig, path_stem)


def plot_effects(effects: pd.DataFrame, summary: pd.DataFrame, path_stem=None):
    """Per (intervention, finding): the model's change in P(finding) against the world's true severity change."""

    if "events" in summary:   # the own-events rows; the shuffled control is in the agreement table
        summary = summary[summary["events"] == "own"]
        effects = effects[effects["events"] == "own"]
    n = max(len(summary), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.2), squeeze=False)
    for ax, (_, s) in zip(axes[0], summary.iterrows()):
        g = effects[(effects["intervention"] == s["intervention"]) & (effects["label"] == s["label"])]
        ax.scatter(g["delta_true"], g["delta_p"], s=12, alpha=0.7)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel("world: Δ severity (truth)", fontsize=8)
        ax.set_ylabel("model: Δ P(finding)", fontsize=8)
        ax.set_title(f"+{s['intervention']} → {s['label']}\nlowers {s['lowers_rate']:.0%} (world "
                     f"{s['true_lowers_rate']:.0%}), agree {s['agreement']:.0%}", fontsize=8)
    return finish_figure(fig, path_stem)


def plot_what_if(result: WhatIf, path_stem=None, *, labels=IMAGENOME_LABELS, title: str = ""):
    """I_prev | factual I_pred | counterfactual I_pred | difference (cf − f), and per-finding P under both."""

    fig = plt.figure(figsize=(13, 3.4))
    grid = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 1, 1.8])
    imgs = [("I_prev", result.prev[0]), ("factual I_pred", result.factual[0, 0]),
            ("counterfactual I_pred", result.counterfactual[0, 0])]
    for i, (name, img) in enumerate(imgs):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, 3])
    d = result.difference.numpy()
    lim = max(float(np.abs(d).max()), 1e-6)
    ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(f"cf − f (mean of {len(result.factual)} seed(s))\nscale ±{lim:.2g}", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 4])
    if len(result.probabilities):
        m = result.probabilities.groupby(["label", "history"])["probability"].mean().unstack()
        m = m.reindex(index=[lab for lab in labels if lab in m.index])
        y = np.arange(len(m))
        ax.barh(y - 0.2, m["factual"], height=0.4, label="factual")
        ax.barh(y + 0.2, m["counterfactual"], height=0.4, label="counterfactual")
        ax.set_yticks(y, m.index, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("evaluator P(finding)")
        ax.legend(fontsize=7, loc="lower right")
    else:          # no evaluator (no finding labels): say so rather than leave an empty panel
        ax.axis("off")
        ax.text(0.0, 0.5, "no evaluator P(finding):\nthe cohort has no finding labels", fontsize=8, va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return finish_figure(fig, path_stem)
