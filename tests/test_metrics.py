"""Metric tests on hand-computable inputs (issue 6 "Done when")."""
import numpy as np
import pandas as pd
import pytest

from ehrxdiff.evaluation import metrics


def _rows(label, relation, prev, score):
    return pd.DataFrame({"pair_key": [f"{label}{i}" for i in range(len(relation))], "label": label,
                         "relation": relation, "prev_relation": prev, "score": score})


def test_perfect_ranker_gives_auroc_one_on_every_subset():
    rows = _rows("a", [0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 1], [0.1, 0.9, 0.2, 0.8, 0.7, 0.3])
    assert metrics.weighted_macro_auroc(rows) == {"all": 1.0, "diff": 1.0, "same": 1.0}


def test_previous_label_baseline_is_zero_on_diff_and_one_on_same():
    rng = np.random.default_rng(0)
    frames = []
    for label in ("x", "y"):
        rel, prev = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        frames.append(_rows(label, rel, prev, prev.astype(float)))
    rows = pd.concat(frames, ignore_index=True)
    res = metrics.weighted_macro_auroc(rows, score="prev_relation")
    assert res["diff"] == 0.0 and res["same"] == 1.0
    assert 0.0 < res["all"] < 1.0


def test_weighting_matches_hand_calculation():
    # label a: 4 rows, AUROC 0.75 ; label b: 2 rows, AUROC 0 ; label c: one class only -> skipped
    a = _rows("a", [0, 0, 1, 1], [0, 0, 0, 0], [0.1, 0.6, 0.5, 0.9])   # pairs (n,p): 3 of 4 correct
    b = _rows("b", [0, 1], [0, 0], [0.9, 0.1])
    c = _rows("c", [1, 1, 1], [0, 0, 0], [0.2, 0.3, 0.4])
    rows = pd.concat([a, b, c], ignore_index=True)
    per = metrics.per_label_auroc(rows, subsets=("all",)).set_index("label")
    assert per.loc["a", "auroc"] == pytest.approx(0.75) and per.loc["b", "auroc"] == 0.0
    assert np.isnan(per.loc["c", "auroc"]) and per.loc["c", "n_rows"] == 3
    got = metrics.weighted_macro_auroc(rows, subsets=("all",))["all"]
    assert got == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)


def test_nan_scores_raise():
    rows = _rows("a", [0, 1], [0, 0], [0.1, np.nan])
    with pytest.raises(ValueError, match="NaN"):
        metrics.weighted_macro_auroc(rows)


def test_attach_scores_and_missing_pair():
    rows = _rows("a", [0, 1], [0, 0], [0, 0]).drop(columns="score")
    scores = pd.DataFrame({"a": [0.2, 0.8]}, index=["a0", "a1"])
    out = metrics.attach_scores(rows, scores)
    assert out["score"].tolist() == [0.2, 0.8]
    with pytest.raises(ValueError, match="no score"):
        metrics.attach_scores(rows, scores.iloc[:1])


def test_ceiling_uses_target_true_severity():
    rows = pd.DataFrame({"pair_key": ["t1_p", "t2_p", "t3_p"], "target_dicom_id": ["t1", "t2", "t3"],
                         "label": "a", "relation": [0, 1, 1], "prev_relation": [0, 0, 1]})
    gt = pd.DataFrame({"dicom_id": ["t1", "t2", "t3", "p"], "a": [0.1, 0.7, 0.9, 0.5]})
    assert metrics.ceiling_auroc(rows, gt)["all"] == 1.0
    with pytest.raises(ValueError, match="severity"):
        metrics.ceiling_auroc(rows.assign(label="zz"), gt)


def test_fid_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8))
    assert abs(metrics.fid(f, f)) < 1e-6
    d1, d2 = metrics.fid(f, f + 0.5), metrics.fid(f, f + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-6) and d2 == pytest.approx(8 * 1.0, rel=1e-6)


def test_frechet_singular_covariance_uses_eps_fallback():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 16))                     # 3 samples in 16-d: singular covariance
    assert np.isfinite(metrics.fid(f, f * 1.1))


def test_sex_auroc_and_age_pearson():
    assert metrics.sex_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.age_pearson([20, 40, 60], [25, 45, 65]) == pytest.approx(1.0)
    assert metrics.age_pearson([20, 40, 60], [65, 45, 25]) == pytest.approx(-1.0)


def test_mean_std_over_seeds():
    res = pd.DataFrame({"method": ["m", "m", "m", "g"], "seed": [0, 1, 2, 0], "auroc": [0.7, 0.8, 0.9, 0.5]})
    out = metrics.mean_std(res, by=["method"], value="auroc").set_index("method")
    assert out.loc["m", "mean"] == pytest.approx(0.8) and out.loc["m", "std"] == pytest.approx(0.1)
    assert out.loc["g", "n"] == 1 and np.isnan(out.loc["g", "std"])


def test_score_method_tidy_frames():
    rows = _rows("a", [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]).drop(columns="score")
    scores = pd.DataFrame({"a": [0.1, 0.9, 0.2, 0.8], "p_female": 0.5}, index=[f"a{i}" for i in range(4)])
    summary, per = metrics.score_method(rows, scores, method="GT", seed=2, evaluator="ev")
    assert summary.set_index("subset")["auroc"].to_dict() == {"all": 1.0, "diff": 1.0, "same": 1.0}
    assert set(summary["method"]) == {"GT"} and set(per["evaluator"]) == {"ev"} and set(per["seed"]) == {2}
