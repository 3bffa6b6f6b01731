"""Cohort rules on a hand-built release with known answers (paper-reference §2.1-2.3, §2.7; issue 3)."""
import json

import numpy as np
import pandas as pd
import pytest

from ehrxdiff.data.cohort import assign_splits, build_cohort, table1
from ehrxdiff.data.sources import MissingTableError, SchemaError
from mimic_fixture import admission, build_release, image_row, patient, write_metadata

S1, S2 = 10000001, 10000002
H1, H2 = 20000001, 20000002


def _images():
    return [
        image_row(S1, 50000001, "ed", "2150-01-01 08:00:00"),          # ED, before admittime 10:00
        image_row(S1, 50000002, "a1", "2150-01-02 08:00:00"),
        image_row(S1, 50000002, "a2", "2150-01-02 08:05:00", "PA"),    # same study as a1
        image_row(S1, 50000003, "b", "2150-01-04 07:00:00"),           # 47 h after a1
        image_row(S1, 50000003, "lat", "2150-01-04 07:00:00", "LATERAL"),
        image_row(S1, 50000004, "c", "2150-01-04 09:00:00"),           # 49 h after a1
        image_row(S1, 50000005, "d", "2150-01-04 12:00:00"),
        image_row(S1, 50000006, "m", "2150-01-05 08:00:00"),           # file missing on disk
        image_row(S2, 50000007, "k1", "2150-02-01 08:00:00"),          # child admission
        image_row(S2, 50000008, "k2", "2150-02-01 13:00:00"),
    ]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    return build_release(
        root,
        patients=[patient(S1, age=60), patient(S2, age=10)],
        admissions=[admission(S1, H1, "2150-01-01 10:00:00", "2150-01-10 10:00:00"),
                    admission(S2, H2, "2150-01-31 10:00:00", "2150-02-03 10:00:00")],
        images=_images(), skip_files=("m",))


@pytest.fixture(scope="module")
def cohort(release):
    return build_cohort(*release, threads=1)


def _pairs(res):
    return set(zip(res.pairs["target_dicom_id"], res.pairs["prev_dicom_id"]))


def _dropped(res, startswith):
    rows = res.report[(res.report["kind"] == "dropped") & res.report["what"].str.startswith(startswith)]
    assert len(rows) == 1, f"no single report row starting with {startswith!r}:\n{res.report}"
    return int(rows["n"].iloc[0])


def test_all_earlier_pairs_exact(cohort):
    assert _pairs(cohort) == {("b", "a1"), ("b", "a2"), ("c", "b"), ("d", "b"), ("d", "c")}
    assert (cohort.pairs["pair_key"] == cohort.pairs["target_dicom_id"] + "_" + cohort.pairs["prev_dicom_id"]).all()


def test_ed_image_before_admission_not_linked(cohort):
    ids = set(cohort.pairs["prev_dicom_id"]) | set(cohort.pairs["target_dicom_id"])
    assert "ed" not in ids
    assert _dropped(cohort, "no admission") == 1


def test_lateral_never_pairs(cohort):
    ids = set(cohort.pairs["prev_dicom_id"]) | set(cohort.pairs["target_dicom_id"])
    assert "lat" not in ids
    assert _dropped(cohort, "non-frontal") == 1


def test_same_study_never_pairs(cohort):
    assert ("a2", "a1") not in _pairs(cohort)
    assert _dropped(cohort, "same study") == 1


def test_47h_kept_49h_dropped(cohort):
    p = cohort.pairs.set_index("pair_key")
    assert p.loc["b_a1", "interval_hours"] == pytest.approx(47.0)
    assert "c_a1" not in p.index and "c_a2" not in p.index
    assert _dropped(cohort, "interval >= 48") == 4  # c-a1, c-a2, d-a1, d-a2


def test_studytime_without_leading_zero_parsed(cohort):
    p = cohort.pairs.set_index("pair_key")
    assert p.loc["b_a1", "prev_time"] == pd.Timestamp("2150-01-02 08:00:00")  # StudyTime "80000.125"
    assert p.loc["b_a1", "prev_path"] == "files/p10/p10000001/s50000002/a1.jpg"


def test_missing_image_excluded_and_counted(cohort):
    ids = set(cohort.pairs["prev_dicom_id"]) | set(cohort.pairs["target_dicom_id"])
    assert "m" not in ids
    assert _dropped(cohort, "image file missing") == 1
    assert _dropped(cohort, "image file unreadable") == 0


def test_unreadable_image_excluded(release, tmp_path):
    mimic_iv, mimic_cxr = release
    bad = mimic_cxr / "files/p10/p10000001/s50000005/d.jpg"
    original = bad.read_bytes()
    try:
        bad.write_bytes(b"not a jpeg at all")
        res = build_cohort(mimic_iv, mimic_cxr, threads=1)
    finally:
        bad.write_bytes(original)
    assert _dropped(res, "image file unreadable") == 1
    assert "d" not in set(res.pairs["target_dicom_id"])


def test_minors_excluded(cohort):
    assert S2 not in set(cohort.pairs["subject_id"])
    assert _dropped(cohort, "age < 18") == 1
    assert _dropped(cohort, "linked only to admissions with age") == 2


def test_consecutive_switch(release):
    res = build_cohort(*release, pairing="consecutive", threads=1)
    assert _pairs(res) == {("b", "a1"), ("b", "a2"), ("c", "b"), ("d", "c")}


def test_missing_file_names_the_file(release, tmp_path):
    mimic_iv, _ = release
    with pytest.raises(MissingTableError, match="mimic-cxr-2.0.0-metadata.csv.gz"):
        build_cohort(mimic_iv, tmp_path, threads=1)


def test_missing_column_names_file_and_column(release, tmp_path):
    mimic_iv, _ = release
    write_metadata(tmp_path, _images(), drop_columns=("ViewPosition",))
    with pytest.raises(SchemaError, match=r"mimic-cxr-2.0.0-metadata.csv.gz: missing column 'viewposition'"):
        build_cohort(mimic_iv, tmp_path, threads=1)


def test_split_file(release, tmp_path):
    split = tmp_path / "dataset_split.json"
    split.write_text(json.dumps({"train": ["b_a1", "c_b"], "valid": ["d_c"], "test": ["zz_yy"]}))
    res = build_cohort(*release, split_file=split, threads=1)
    assert dict(zip(res.pairs["pair_key"], res.pairs["split"])) == {"b_a1": "train", "c_b": "train", "d_c": "valid"}
    assert _dropped(res, "pair not in split file") == 2


def test_write_roundtrip(cohort, tmp_path):
    cohort.write(tmp_path)
    back = pd.read_parquet(tmp_path / "pairs.parquet")
    assert list(back["pair_key"]) == list(cohort.pairs["pair_key"])
    assert (tmp_path / "cohort_report.csv").read_text().startswith("step,kind,what,unit,n")


def test_assign_splits_patient_level_and_reference_rule():
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 200, size=3000)
    pairs = pd.DataFrame({"subject_id": subjects})
    split = assign_splits(pairs, split_seed=42)
    # patient-level: one split per subject
    assert (pairs.assign(split=split).groupby("subject_id")["split"].nunique() == 1).all()
    # the reference rule by hand
    counts = pairs.groupby("subject_id")["subject_id"].count().sample(frac=1, random_state=42)
    cum, n = counts.cumsum(), len(pairs)
    test_subjects = set(counts.index[cum < int(n * 0.05)])
    assert set(pairs.loc[split == "test", "subject_id"]) == test_subjects
    assert 0.03 * n < (split == "test").sum() <= 0.05 * n
    assert (split == "valid").sum() > 0 and (split == "train").sum() > 0.85 * n
    assert split.equals(assign_splits(pairs, split_seed=42))


def test_table1():
    pairs = pd.DataFrame({"subject_id": [1, 1, 2, 3], "hadm_id": [10, 11, 20, 30], "split": ["train", "train", "train", "test"],
                          "interval_hours": [10.0, 20.0, 30.0, 5.0]})
    t = table1(pairs)
    assert t.loc["patients", "train"] == 2 and t.loc["hospital admissions", "train"] == 3
    assert t.loc["samples", "train"] == 3 and t.loc["mean interval (h)", "train"] == 20.0
    assert t.loc["samples", "valid"] == 0 and t.loc["samples", "test"] == 1
