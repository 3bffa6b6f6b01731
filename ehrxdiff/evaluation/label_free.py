"""Evaluation without finding labels (an own cohort, or MIMIC without Chest ImaGenome): what can still be said.

Nothing that needs labels is faked. :func:`label_free_plan` decides what a label-free run can report and records
why the rest is skipped; every prediction and the previous image are scored against the true I_trg by image
similarity (:func:`similarity_rows`), and :func:`vs_previous_image` compares each model with repeating I_prev.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ehrxdiff.evaluation.metrics import HIGHER_IS_BETTER, image_similarity

def label_free_plan(pairs: pd.DataFrame, *, xrv_weights: str | None) -> tuple[dict, list[dict]]:
    """What a label-free evaluation can report on these test pairs, and a (what, why) record for the rest.

    Returns ({"age": bool, "sex": bool, "evaluator": "train" | "xrv" | None}, skipped). Age r needs ≥ 3 known
    ages, sex AUROC both sexes among the test pairs. The evaluator is trained when the cohort carries sex or age
    (its backbone then learns from those targets, so FID has trained features), is the XRV backbone as loaded
    when only ``xrv_weights`` is given, and is absent otherwise (no FID)."""
    age = "age" in pairs and int(pairs["age"].notna().sum()) >= 3
    sex = "gender" in pairs and set(pairs["gender"].dropna()) >= {"F", "M"}
    evaluator = "train" if (age or sex) else ("xrv" if xrv_weights else None)
    why = "no finding labels"
    skipped = [
        {"what": "Table II (weighted-macro AUROC all/diff/same)", "why": f"{why}: AUROC needs the findings of I_trg"},
        {"what": "Table IV (ablation AUROC)", "why": f"{why}; the ablation rows are in table_image_similarity instead"},
        {"what": "baselines: previous label, table classifiers", "why": f"{why}: they predict or train on labels"},
        {"what": "claims on AUROC", "why": f"{why}; checked on image similarity to I_trg instead"},
    ]
    if not age:
        skipped.append({"what": "age r", "why": "the images table has no age (fewer than 3 test pairs with one)"})
    if not sex:
        skipped.append({"what": "sex AUROC", "why": "the images table has no sex, or the test pairs hold one sex only"})
    if evaluator is None:
        skipped.append({"what": "FID", "why": "no labels, age or sex to train the evaluator's backbone on and no "
                        "xrv_weights: an untrained network's features would not measure anything"})
    return {"age": age, "sex": sex, "evaluator": evaluator}, skipped


def similarity_rows(method: str, seed: int, keys, pred, target) -> pd.DataFrame:
    sim = image_similarity(pred, target).assign(pair_key=list(keys))
    return sim.melt(id_vars="pair_key", var_name="metric", value_name="value").assign(method=method, seed=seed)


def vs_previous_image(per_pair: pd.DataFrame) -> pd.DataFrame:
    """Per (method, seed, metric): the method's mean over pairs next to the previous image's on the same pairs,
    their difference, and the share of pairs where the method is closer to I_trg (ties count half)."""
    prev = per_pair[per_pair["method"] == "previous image"].set_index(["pair_key", "metric"])["value"]
    out = []
    for (method, seed, metric), g in per_pair[per_pair["method"] != "previous image"].groupby(
            ["method", "seed", "metric"], sort=False):
        ref = prev.reindex(list(zip(g["pair_key"], [metric] * len(g)))).to_numpy()
        v = g["value"].to_numpy()
        sign = 1 if HIGHER_IS_BETTER[metric] else -1
        better = np.where(np.isclose(v, ref), 0.5, (sign * (v - ref) > 0).astype(float))
        finite = np.isfinite(v) & np.isfinite(ref)
        out.append({"method": method, "seed": seed, "metric": metric, "model": float(v[finite].mean()),
                    "previous image": float(ref[finite].mean()), "difference": float((v - ref)[finite].mean()),
                    "share_pairs_better": float(better.mean()), "n_pairs": len(g)})
    return pd.DataFrame(out)
