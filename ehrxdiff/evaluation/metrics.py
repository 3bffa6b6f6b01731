"""Metrics of Tables II-IV (paper §III-A; paper-reference §10.3-10.7).

* Weighted macro AUROC on *all* / *diff* / *same* (Table II, IV), exactly as the reference's
  ``test_network`` [R finetune_attr.py]: per subset, a per-label AUROC wherever that label has both
  classes in the subset, then the average of those AUROCs weighted by each label's number of rows in
  the subset. *diff* = rows whose target label differs from the previous image's label, *same* = equal.
* Pearson r between predicted and true age, AUROC for sex (Table III) [R eval_demographic.py,
  gender_classification_openai.py].
* FID (Table III): Fréchet distance between Gaussians fitted to image features [R eval_fid.py], the
  standard pytorch-fid formula with the 1e-6 diagonal fallback.
* Mean ± std over sampling seeds (the paper reports 3 seeds for every stochastic result, §III-A).
* Image similarity to the true target (MSE, PSNR, SSIM; beyond the paper): what a cohort *without* finding
  labels can still be scored on (docs/own-cohort.md), since it needs no evaluator and no labels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import linalg, stats
from sklearn.metrics import roc_auc_score

SUBSETS = ("all", "diff", "same")


def subset_mask(rows: pd.DataFrame, subset: str) -> pd.Series:
    """Row mask of an evaluation subset (§10.3): all, diff (relation ≠ prev_relation), same."""
    if subset == "all":
        return pd.Series(True, index=rows.index)
    if subset == "diff":
        return rows["relation"] != rows["prev_relation"]
    if subset == "same":
        return rows["relation"] == rows["prev_relation"]
    raise ValueError(f"unknown subset {subset!r}; expected one of {SUBSETS}")


def per_label_auroc(rows: pd.DataFrame, *, score: str = "score",
                    subsets: tuple[str, ...] = SUBSETS) -> pd.DataFrame:
    """Per-label AUROC for each subset: columns subset, label, auroc, n_rows, n_pos.

    Labels with a single class in a subset get ``auroc = NaN`` (the reference skips them) and do not
    enter the weighted macro average. Rows with a NaN score are an error, not a silent skip.
    """
    for col in ("label", "relation", "prev_relation", score):
        if col not in rows.columns:
            raise ValueError(f"evaluation rows: missing column {col!r}; found {list(rows.columns)}")
    if rows[score].isna().any():
        raise ValueError(f"evaluation rows: column {score!r} has {int(rows[score].isna().sum())} NaN "
                         f"score(s), e.g. pair {rows.loc[rows[score].isna()].iloc[0].get('pair_key')}")
    out = []
    for subset in subsets:
        sub = rows[subset_mask(rows, subset)]
        for label, grp in sub.groupby("label", sort=True):
            y = grp["relation"].to_numpy()
            both = np.unique(y).size == 2
            auc = roc_auc_score(y, grp[score].to_numpy()) if both else np.nan
            out.append({"subset": subset, "label": label, "auroc": auc,
                        "n_rows": len(grp), "n_pos": int(y.sum())})
    return pd.DataFrame(out, columns=["subset", "label", "auroc", "n_rows", "n_pos"])


def weighted_macro_auroc(rows: pd.DataFrame, *, score: str = "score",
                         subsets: tuple[str, ...] = SUBSETS) -> dict[str, float]:
    """Weighted macro AUROC per subset (Table II): {"all": .., "diff": .., "same": ..}.

    weight of a label = its number of rows in the subset, over labels whose AUROC is defined;
    NaN if no label in the subset has both classes.
    """
    per = per_label_auroc(rows, score=score, subsets=subsets).dropna(subset=["auroc"])
    result = {}
    for subset in subsets:
        p = per[per["subset"] == subset]
        result[subset] = float(np.average(p["auroc"], weights=p["n_rows"])) if len(p) else float("nan")
    return result


def macro_auroc(probs: np.ndarray, targets: np.ndarray) -> float:
    """Unweighted mean AUROC over label columns with both classes among non-NaN targets.

    Used for model selection on the validation split (the reference selects its classifiers on
    validation AUROC, §10.2, §10.4), not for the reported tables.
    """
    probs, targets = np.asarray(probs, float), np.asarray(targets, float)
    aucs = [roc_auc_score(targets[m, j], probs[m, j]) for j in range(targets.shape[1])
            for m in [~np.isnan(targets[:, j])] if np.unique(targets[m, j]).size == 2]
    return float(np.mean(aucs)) if aucs else float("nan")


def attach_scores(rows: pd.DataFrame, scores: pd.DataFrame, *, key: str = "pair_key",
                  name: str = "score") -> pd.DataFrame:
    """Join a wide score table (index = ``key`` values, one column per label) onto evaluation rows.

    For an image classifier the index is the pair key of the scored image (generated ``I_pred``,
    ``I_trg`` for GT, ``I_prev`` for the previous-image baseline). Rows whose pair has no score raise,
    naming how many and one example, rather than silently shrinking the test set.
    """
    long = scores.rename_axis(key).reset_index().melt(id_vars=key, var_name="label", value_name=name)
    out = rows.merge(long, on=[key, "label"], how="left")
    missing = out[name].isna()
    if missing.any():
        ex = out.loc[missing].iloc[0]
        raise ValueError(f"{int(missing.sum())} evaluation row(s) have no score, e.g. {key}="
                         f"{ex[key]!r} label={ex['label']!r}")
    return out


def score_method(rows: pd.DataFrame, scores: pd.DataFrame, *, method: str, seed: int = 0,
                 evaluator: str = "", key: str = "pair_key") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one method (one seed) on the evaluation rows → tidy (summary, per_label) frames.

    ``scores``: wide P(label) table indexed by ``key`` (``evaluators.score_images(...).table`` keyed by
    pair_key, or a table classifier's output). Both frames carry method, seed and evaluator, the
    columns that ``reporting.auroc_table`` / ``plot_label_heatmap`` read.
    """
    scored = attach_scores(rows, scores[[c for c in scores.columns if c in set(rows["label"])]], key=key)
    tags = {"method": method, "seed": seed, "evaluator": evaluator}
    summary = pd.DataFrame([{**tags, "subset": s, "auroc": v}
                            for s, v in weighted_macro_auroc(scored).items()])
    per_label = per_label_auroc(scored).assign(**tags)
    return summary, per_label


def ceiling_auroc(rows: pd.DataFrame, ground_truth: pd.DataFrame,
                  subsets: tuple[str, ...] = SUBSETS) -> dict[str, float]:
    """AUROC of the synthetic world's true latent severity of the target (Table II "ceiling" column).

    ``ground_truth`` is the sidecar ``ground_truth/images.parquet``: dicom_id and one float column per
    label (severity in [0, 1]). Scoring the rows with the target's true severity says how well *any*
    image-based predictor could rank these labels; the gap to 1 is label noise of the report text.
    """
    if "dicom_id" not in ground_truth.columns:
        raise ValueError(f"ground truth: missing column 'dicom_id'; found {list(ground_truth.columns)}")
    labels = sorted(rows["label"].unique())
    absent = [lab for lab in labels if lab not in ground_truth.columns]
    if absent:
        raise ValueError(f"ground truth: missing severity column(s) {absent}")
    gt = ground_truth.set_index("dicom_id")[labels]
    scored = attach_scores(rows, gt, key="target_dicom_id", name="true_severity")
    return weighted_macro_auroc(scored, score="true_severity", subsets=subsets)


def sex_auroc(is_female, score) -> float:
    """AUROC of the sex classifier's P(female) against the patients table's sex (F = 1) [§10.6]."""
    return float(roc_auc_score(np.asarray(is_female, dtype=int), np.asarray(score, dtype=float)))


def age_pearson(true_age, predicted_age) -> float:
    """Pearson r between predicted and cohort age (admission-year based) [§10.5, scipy]."""
    return float(stats.pearsonr(np.asarray(true_age, float), np.asarray(predicted_age, float)).statistic)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows = samples) in float64 for the Fréchet distance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, dim]; got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = |mu1 − mu2|² + Tr(S1 + S2 − 2 (S1 S2)^½)  (Heusel et al. 2017; pytorch-fid's recipe).

    When the product is near singular (fewer samples than feature dims), ``eps`` is added to both
    diagonals, as in the reference [R eval_fid.py]; a tiny imaginary part from sqrtm is dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(features_real: np.ndarray, features_fake: np.ndarray) -> float:
    """FID between two feature sets (e.g. 1024-d pooled pre-ReLU DenseNet features, §10.7)."""
    return frechet_distance(*feature_statistics(features_real), *feature_statistics(features_fake))


def mean_std(results: pd.DataFrame, *, by: list[str], value: str) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count of ``value`` over seeds, grouped by ``by``.

    The paper reports mean ± std over 3 sampling seeds without saying which std; we use the sample
    std. One seed (deterministic baselines) gives std NaN, printed as the bare mean.
    """
    g = results.groupby(by, sort=False, dropna=False)[value]
    return g.agg(mean="mean", std="std", n="count").reset_index()


IMAGE_METRICS = ("MSE", "PSNR", "SSIM")
HIGHER_IS_BETTER = {"MSE": False, "PSNR": True, "SSIM": True, "pixel MAE": False}


def image_similarity(pred, target) -> pd.DataFrame:
    """Per image: MSE, PSNR (dB) and SSIM of ``pred`` against ``target`` ([N, C, H, W] or [N, H, W] in [-1, 1];
    first channel, the images are grey). Rows in input order, columns :data:`IMAGE_METRICS`.

    Why these: without finding labels there is no evaluator to read findings, but a prediction can still be
    compared with the film that was really taken next. The data range is the image contract's 2 (so PSNR and
    SSIM do not depend on how a cohort stores its pixels); SSIM is scikit-image's (Wang et al. 2004, Gaussian
    window σ = 1.5 as in the paper, 7 px when the image is smaller than the 11 px window). Identical images
    give PSNR = inf, as they should; a summary over pairs should then be read with that in mind.
    """
    from skimage.metrics import structural_similarity  # heavy (scikit-image), only for SSIM
    p, t = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64) for x in (pred, target))
    p, t = (x[:, 0] if x.ndim == 4 else x for x in (p, t))
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"image_similarity: pred {p.shape} and target {t.shape} must both be [N, (C,) H, W]")
    mse = ((p - t) ** 2).mean(axis=(1, 2))
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(4.0 / mse)
    gauss = min(p.shape[1:]) >= 11
    ssim = [structural_similarity(a, b, data_range=2.0, gaussian_weights=gauss, sigma=1.5,
                                  use_sample_covariance=not gauss, win_size=None if gauss else 7)
            for a, b in zip(p, t)]
    return pd.DataFrame({"MSE": mse, "PSNR": psnr, "SSIM": np.asarray(ssim, float)})
