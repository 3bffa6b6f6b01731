"""The paper's tables and figures, regenerated from tidy result CSVs (paper §III; issue 6 items 4-5).

Tables: :func:`write_table` writes one table three ways (CSV for machines, Markdown for the README,
LaTeX/booktabs for a paper) under the paper's names ``table1_cohort``, ``table2_imagenome_auroc``,
``table3_fid_demographics``, ``table4_ablation``. Stochastic results are "mean ± std" over sampling seeds
(the paper reports 3 seeds, §III-A); every row also names the evaluator that produced it (D9).

Figures (PNG + PDF): Table II as grouped bars with seed error bars, a per-label AUROC heatmap, the
qualitative figure in the manner of the paper's Fig. 2 (I_prev → I_trg and I_pred, the events between
them under the arrow, the changing finding in bold), and difference maps (I_pred − I_prev next to
I_trg − I_prev).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ehrxdiff.metrics import SUBSETS, mean_std

TABLE_NAMES = ("table1_cohort", "table2_imagenome_auroc", "table3_fid_demographics", "table4_ablation")


# --- tables ----------------------------------------------------------------------------------------

def format_mean_std(mean: float, std: float = float("nan"), digits: int = 3) -> str:
    """"0.722 ± 0.003"; the bare mean when std is NaN (one seed or a deterministic baseline)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def seed_table(results: pd.DataFrame, *, index: str, columns: str, value: str = "value",
               index_order=None, column_order=None, digits: int = 3,
               evaluator_col: str = "evaluator") -> pd.DataFrame:
    """Tidy results (one row per index × column × seed) → a table of "mean ± std" strings.

    If ``evaluator_col`` is present its distinct values per row are joined into a last column, so
    the table says which evaluator/feature extractor produced each number.
    """
    for col in (index, columns, value):
        if col not in results.columns:
            raise ValueError(f"results: missing column {col!r}; found {list(results.columns)}")
    agg = mean_std(results, by=[index, columns], value=value)
    agg["text"] = [format_mean_std(m, s, digits) for m, s in zip(agg["mean"], agg["std"])]
    wide = agg.pivot(index=index, columns=columns, values="text")
    wide = wide.reindex(index=list(index_order) if index_order is not None else list(dict.fromkeys(agg[index])),
                        columns=list(column_order) if column_order is not None else list(dict.fromkeys(agg[columns])))
    wide = wide.fillna("–")
    if evaluator_col in results.columns:
        ev = results.groupby(index)[evaluator_col].agg(lambda s: ", ".join(sorted(set(map(str, s.dropna())))))
        wide[evaluator_col] = ev.reindex(wide.index).fillna("")
    wide.columns.name = None
    return wide


def auroc_table(results: pd.DataFrame, *, index: str = "method", index_order=None,
                ceiling: dict | None = None, digits: int = 3) -> pd.DataFrame:
    """Table II / IV layout: weighted macro AUROC on all / diff / same per method (or variant).

    ``results``: columns ``index``, seed, subset, auroc (, evaluator). ``ceiling`` (synthetic world):
    {subset: AUROC of the true latent severity} shown in a "<subset> ceiling" column beside each subset.
    """
    table = seed_table(results, index=index, columns="subset", value="auroc", index_order=index_order,
                       column_order=SUBSETS, digits=digits)
    if ceiling is not None:
        for pos, subset in reversed(list(enumerate(SUBSETS))):
            table.insert(pos + 1, f"{subset} ceiling", format_mean_std(ceiling.get(subset, np.nan), digits=digits))
    return table


def _latex_escape(text: str) -> str:
    out = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        out = out.replace(a, b)
    return out.replace("±", r"$\pm$").replace("–", "--").replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$")


def to_markdown(df: pd.DataFrame, index: bool = True) -> str:
    """GitHub pipe table (no ``tabulate`` dependency)."""
    frame = df.reset_index() if index else df
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, index: bool = True, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``table`` environment with escaped cells and ± as ``$\\pm$``."""
    frame = df.reset_index() if index else df
    body = [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [r"\begin{tabular}{l" + "c" * (frame.shape[1] - 1) + "}", r"\toprule",
              " & ".join(_latex_escape(c) for c in frame.columns) + r" \\", r"\midrule", *body,
              r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, name: str, figures_dir: str | Path, *, caption: str | None = None,
                index: bool = True) -> dict[str, Path]:
    """Write ``<figures_dir>/<name>.{csv,md,tex}``; returns the three paths. The run's environment goes next to
    its tables (``environment.json``, :mod:`ehrxdiff.provenance`): across machines the numbers move with it."""
    from .provenance import write_environment
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_environment(d)
    paths = {ext: d / f"{name}.{ext}" for ext in ("csv", "md", "tex")}
    df.to_csv(paths["csv"], index=index)
    md = (f"**{caption}**\n\n" if caption else "") + to_markdown(df, index=index)
    paths["md"].write_text(md)
    paths["tex"].write_text(to_latex(df, index=index, caption=caption, label=f"tab:{name}"))
    return paths


# --- figures ---------------------------------------------------------------------------------------

def save_figure(fig, path_stem: str | Path, dpi: int = 200) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (publication copies of every figure).

    No creation date is written into the PDF, so an unchanged figure gives an unchanged file (clean diffs)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    return paths


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
