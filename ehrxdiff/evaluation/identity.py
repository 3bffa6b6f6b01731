"""Does a prediction follow the previous image? Patient re-identification from I_prev (not in the paper).

Issue 5 asks that predictions "follow the previous image's anatomy", and the paper's qualitative figure argues
it by eye. This module says it in numbers: for every scored pair i, rank all scored previous images I_prev(j) by
their distance to the prediction I_pred(i); the prediction *follows* its own patient when I_prev(i) ranks first.

- ``top1``: share of pairs whose own I_prev is the nearest (chance 1/N);
- ``rank_percentile``: mean share of other pairs' I_prev that are farther than the own one (chance 0.5,
  perfect 1.0) — graded, so it moves before top-1 does.

The same numbers for the real target I_trg give the reference: how recognisable a patient's next film is from
the previous one in this cohort (acquisition nuisance - rotation, shift, exposure - and the findings that change
keep it below 1). An average radiograph, whatever it looks like, scores chance.

Distances are squared Euclidean distances between images standardised per image (zero mean, unit variance), so a global
exposure change does not count as a different patient.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def standardise(images: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, D] float64, each row zero-mean and unit-variance (constant images stay zero)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    x = x - x.mean(1, keepdims=True)
    sd = x.std(1, keepdims=True)
    return x / np.where(sd > 0, sd, 1.0)


def reidentification(pred: np.ndarray, prev: np.ndarray) -> dict[str, float]:
    """Re-identify each pair's patient from its previous image (module docstring); rows of ``pred`` and ``prev``
    belong to the same pair. Top-1 needs the own I_prev strictly nearest; in the rank, a tie counts half (as in an
    AUROC). One image predicted for every pair scores exactly chance on both: the one pair whose I_prev is nearest
    to it is re-identified (top-1 = 1/N), and the ranks average 0.5."""
    if len(pred) != len(prev):
        raise ValueError(f"{len(pred)} predictions for {len(prev)} previous images")
    n = len(pred)
    if n < 2:
        raise ValueError("re-identification needs at least 2 pairs")
    a, b = standardise(pred), standardise(prev)
    d = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T  # [pred i, prev j] squared distance
    own = np.diag(d)[:, None]
    others = ~np.eye(n, dtype=bool)
    scale = np.abs(d).max() * 1e-9                           # distances equal up to rounding are ties
    closer = ((d < own - scale) & others).sum(1)
    tied = ((np.abs(d - own) <= scale) & others).sum(1)
    farther = (n - 1) - closer - tied
    return {"top1": float(((closer + tied) == 0).mean()),
            "rank_percentile": float(((farther + 0.5 * tied) / (n - 1)).mean()),
            "n": n, "chance_top1": 1.0 / n}


def reidentification_table(images: dict[tuple[str, int], np.ndarray], prev: np.ndarray) -> pd.DataFrame:
    """Tidy rows (method, seed, top1, rank_percentile, n, chance_top1) for ``{(method, seed): images}``."""
    rows = [{"method": m, "seed": s, **reidentification(x, prev)} for (m, s), x in images.items()]
    return pd.DataFrame(rows)
