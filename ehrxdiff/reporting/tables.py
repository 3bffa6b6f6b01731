"""The paper's tables, regenerated from tidy result CSVs (paper §III; issue 6 items 4-5).

:func:`write_table` writes one table three ways (CSV for machines, Markdown for the README,
LaTeX/booktabs for a paper) under the paper's names ``table1_cohort``, ``table2_imagenome_auroc``,
``table3_fid_demographics``, ``table4_ablation``. Stochastic results are "mean ± std" over sampling seeds
(the paper reports 3 seeds, §III-A); every row also names the evaluator that produced it (D9). The figures
drawn from the same frames are in :mod:`ehrxdiff.reporting.figures`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ehrxdiff.evaluation.metrics import SUBSETS, mean_std
from ehrxdiff.reporting.provenance import write_environment

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
    its tables (``environment.json``, :mod:`ehrxdiff.reporting.provenance`): across machines the numbers move with
    it."""
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_environment(d)
    paths = {ext: d / f"{name}.{ext}" for ext in ("csv", "md", "tex")}
    df.to_csv(paths["csv"], index=index)
    md = (f"**{caption}**\n\n" if caption else "") + to_markdown(df, index=index)
    paths["md"].write_text(md)
    paths["tex"].write_text(to_latex(df, index=index, caption=caption, label=f"tab:{name}"))
    return paths


# --- re-identification (Table IV's re-id rank column) ------------------------------------------------
REIDENTIFICATION_COLUMNS = {"top1": "top-1", "rank_percentile": "rank percentile"}


def reidentification_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method, "mean ± std" over seeds of top-1 and rank percentile (:func:`seed_table`), in the order of
    ``table``, whose rows come from :func:`ehrxdiff.evaluation.identity.reidentification_table`; Table IV's "re-id
    rank" column is its "rank percentile"."""
    long = table.melt(id_vars=["method", "seed"], value_vars=list(REIDENTIFICATION_COLUMNS), var_name="metric")
    return seed_table(long.replace({"metric": REIDENTIFICATION_COLUMNS}), index="method", columns="metric",
                      column_order=list(REIDENTIFICATION_COLUMNS.values()))
