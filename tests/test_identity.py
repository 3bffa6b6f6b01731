"""Patient re-identification from the previous image (ehrxdiff.evaluation.identity) on hand-checkable inputs."""
import numpy as np
import pytest

from ehrxdiff.evaluation.identity import reidentification, reidentification_table


def _patients(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8))


def test_copies_of_the_previous_image_are_always_reidentified_even_after_an_exposure_change():
    prev = _patients()
    r = reidentification(2.0 * prev + 0.3, prev)        # gain and offset: standardisation removes them
    assert r["top1"] == 1.0 and r["rank_percentile"] == 1.0 and r["chance_top1"] == pytest.approx(1 / 6)


def test_an_average_radiograph_scores_chance_and_a_swap_scores_zero():
    prev = _patients()
    same = np.repeat(prev.mean(0, keepdims=True) + _patients(1, 5), len(prev), 0)
    r = reidentification(same, prev)
    assert r["top1"] == pytest.approx(1 / 6) and r["rank_percentile"] == pytest.approx(0.5)
    swapped = reidentification(np.roll(prev, 1, axis=0), prev)   # every prediction is another patient's image
    assert swapped["top1"] == 0.0 and swapped["rank_percentile"] <= 4 / 5   # at least one other patient nearer


def test_rank_by_hand():
    prev = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    pred = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # pair 1 looks like patient 2
    r = reidentification(pred, prev)
    # pair 0: own nearest (2/2 farther); pair 1: patient 2 nearer, patient 0 tied with own (0.5/2); pair 2: 2/2
    assert r["top1"] == pytest.approx(2 / 3)
    assert r["rank_percentile"] == pytest.approx((1 + 0.25 + 1) / 3)
    t = reidentification_table({("m", 0): pred, ("copy", 1): prev}, prev)
    assert list(t["method"]) == ["m", "copy"] and t["top1"].tolist() == pytest.approx([2 / 3, 1.0])
    with pytest.raises(ValueError, match="2 previous"):
        reidentification(pred, prev[:2])


def test_summary_table_is_mean_and_std_over_seeds():
    import pandas as pd

    from ehrxdiff.reporting.tables import reidentification_summary
    t = pd.DataFrame({"method": ["a", "a", "b"], "seed": [0, 1, 0], "rank_percentile": [0.6, 0.8, 0.5],
                      "top1": [0.1, 0.3, 0.0]})
    col = reidentification_summary(t)["rank percentile"]
    assert col["a"] == "0.700 ± 0.141" and col["b"] == "0.500"
    assert reidentification_summary(t).loc["a", "top-1"] == "0.200 ± 0.141" and list(reidentification_summary(t).index) == ["a", "b"]
