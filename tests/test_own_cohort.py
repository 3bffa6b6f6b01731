"""Your own cohort (issue 7, deliverable 4): a hand-made two-table cohort with real-world image files."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ehrxdiff.data.datasets import PairDataset, collate_pairs
from ehrxdiff.data.embedding import make_embedder
from ehrxdiff.data.event_store import build_event_store
from ehrxdiff.data.events import serialize_event
from ehrxdiff.data.labels import pair_label_rows
from ehrxdiff.data.own_cohort import build_own_cohort, extract_own_events, import_own_cohort
from ehrxdiff.data.sources import MissingTableError, SchemaError

T0 = pd.Timestamp("2021-03-01 08:00:00")


def _at(hours: float) -> str:
    return str(T0 + pd.Timedelta(hours=hours))


def _write_images(root):
    """One file per kind the loader must take, plus a missing and a corrupt one."""
    img = root / "img"
    img.mkdir()
    ramp = np.linspace(0, 4095, 24 * 24).reshape(24, 24).astype(np.uint16)      # 12-bit data in 16 bits
    Image.fromarray(ramp).save(img / "a1_16bit.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, mode="RGBA").save(img / "a2_rgba.png")
    Image.fromarray(np.full((16, 40, 3), 90, np.uint8)).save(img / "a3 wide.jpg")  # non-square, RGB, space in name
    for name in ("a4.png", "b3.png", "b4.png", "c1.png", "c2.png", "c3.png"):
        Image.fromarray(np.full((12, 12), 128, np.uint8)).save(img / name)
    (img / "b2_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    # b1_missing.png is never written


IMAGES = [  # subject, episode, hours, path, view, pleural_effusion, sex, age
    ("A", "e1", 0, "img/a1_16bit.png", "PA", "0", "F", "70"),
    ("A", "e1", 10, "img/a2_rgba.png", "ap", "1", "F", "70"),
    ("A", "e1", 20, "img/a3 wide.jpg", "PA", "", "F", "70"),
    ("A", "e1", 20, "img/a3_lateral.png", "LATERAL", "", "F", "70"),   # non-frontal: never read
    ("A", "e1", 60, "img/a4.png", "FRONTAL", "1", "F", "70"),          # 40 h after a3, 50 h after a2
    ("B", "e2", 0, "img/b1_missing.png", "AP", "", "M", ""),
    ("B", "e2", 5, "img/b2_corrupt.png", "AP", "", "M", ""),
    ("B", "e2", 8, "img/b3.png", "AP portable", "", "M", ""),         # frontal: first word AP
    ("B", "e2", 12, "img/b4.png", "AP", "maybe", "M", ""),
    ("C", "x", 0, "img/c1.png", "pa_erect", "", "", ""),
    ("C", "x", 6, "img/c2.png", "PA", "", "", ""),
    ("C", "y", 16, "img/c3.png", "PA", "", "", ""),                    # next episode: no pair across
    ("C", "y", "yesterday", "img/c4.png", "PA", "", "", ""),           # bad time
]

EVENTS = [  # subject, hours, table, text, item, value, unit
    ("A", 5, "labs", "", "creatinine", "1.20", "mg/dL"),
    ("A", 5, "note", "patient  short of breath", "", "", ""),
    ("A", 10, "drugs", "", "furosemide", "40", "mg"),                 # at a2's time: not in a2's own S_event
    ("A", 100, "labs", "", "creatinine", "0.9", "mg/dL"),             # after every image
    ("B", 9, "vitals", "", "spo2", "91.0", "%"),
    ("B", 10, "vitals", "", "", "", ""),                               # no content: a bad row
    ("C", 3, "labs", "", "crp", "12", "mg/L"),
]


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    _write_images(root)
    pd.DataFrame([{"Subject_ID": s, "episode_id": e, "time": _at(h) if not isinstance(h, str) else h, "path": p,
                   "view": v, "pleural_effusion": lab, "sex": sex, "age": age}
                  for s, e, h, p, v, lab, sex, age in IMAGES]).to_csv(root / "images.csv", index=False)
    pd.DataFrame([{"subject_id": s, "time": _at(h), "table": t, "text": x, "item": i, "value": v, "unit": u}
                  for s, h, t, x, i, v, u in EVENTS]).to_parquet(root / "events.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def cohort(cohort_files):
    return build_own_cohort(cohort_files / "images.csv", threads=1, workers=2)


def _pairs(res):
    return set(zip(res.pairs["target_dicom_id"], res.pairs["prev_dicom_id"]))


def _n(report, what):
    rows = report[report["what"] == what]
    assert len(rows) == 1, f"no single report row {what!r}:\n{report}"
    return int(rows["n"].iloc[0])


def test_expected_pairs(cohort):
    assert _pairs(cohort) == {
        ("img-a2_rgba", "img-a1_16bit"), ("img-a3-wide", "img-a1_16bit"), ("img-a3-wide", "img-a2_rgba"),
        ("img-a4", "img-a3-wide"),              # a4-a2 = 50 h >= 48 h: cut, as on MIMIC
        ("img-b4", "img-b3"),                   # b1 missing, b2 corrupt: never paired
        ("img-c2", "img-c1"),                   # c3 is another episode
    }
    p = cohort.pairs.set_index("pair_key")
    a = p.loc["img-a4_img-a3-wide"]
    assert (a["subject_id"], a["hadm_id"], a["prev_path"], a["target_path"]) == ("A", "e1", "img/a3 wide.jpg", "img/a4.png")
    assert a["interval_hours"] == pytest.approx(40.0) and a["age"] == 70 and a["gender"] == "F"
    assert pd.isna(p.loc["img-c2_img-c1", "age"]) and pd.isna(p.loc["img-c2_img-c1", "gender"])
    assert set(cohort.pairs["split"]) <= {"train", "valid", "test"}
    assert cohort.pairs.groupby("subject_id")["split"].nunique().max() == 1   # patient-level split


def test_reports_exactly_the_two_bad_files(cohort):
    bad = cohort.bad_images
    assert list(zip(bad["path"], bad["reason"])) == [("img/b1_missing.png", "image file missing"),
                                                     ("img/b2_corrupt.png", "image file unreadable")]
    assert "b2_corrupt.png" in bad["detail"].iloc[1]
    r = cohort.report
    assert _n(r, "image file missing") == 1 and _n(r, "image file unreadable") == 1
    assert _n(r, "time missing or not ISO 8601") == 1
    assert set(cohort.rejected["reason"]) == {"image file missing", "image file unreadable", "time missing or not ISO 8601",
                                              "non-frontal view (counted in the cohort funnel)"}
    assert _n(r, "non-frontal view (lateral, other or empty ViewPosition)") == 1   # counted by build_cohort
    lateral = cohort.rejected[cohort.rejected["reason"].str.startswith("non-frontal")]
    assert lateral[["path", "detail"]].values.tolist() == [["img/a3_lateral.png", "view LATERAL"]]   # and listed
    assert _n(r, "label 'pleural effusion' not 0/1 (kept as not mentioned)") == 1
    assert r["step"].tolist() == list(range(1, len(r) + 1))


def test_labels_feed_the_evaluation_rows(cohort):
    lab = cohort.labels
    assert set(zip(lab["dicom_id"], lab["label"], lab["relation"])) == {
        ("img-a1_16bit", "pleural effusion", 0), ("img-a2_rgba", "pleural effusion", 1), ("img-a4", "pleural effusion", 1)}
    rows = pair_label_rows(cohort.pairs, lab)
    assert set(zip(rows["pair_key"], rows["relation"], rows["prev_relation"])) == {
        ("img-a2_rgba_img-a1_16bit", 1, 0), ("img-a4_img-a3-wide", 1, 0)}


def test_events_serialized_and_windowed(cohort_files, cohort):
    ev = extract_own_events(cohort_files / "events.parquet", cohort.pairs, threads=1)
    got = {k: [text for text, _, _ in ev.for_pair(k)] for k in ev.pair_keys}
    lab = serialize_event("labs", {"item": "creatinine", "value": "1.20", "unit": "mg/dL"})
    assert lab == "labs item creatinine value 1.2 unit mg/dL"
    assert got == {
        "img-a2_rgba_img-a1_16bit": [lab, "note patient short of breath"],   # the 10 h drug was given with a2
        "img-a3-wide_img-a1_16bit": [lab, "note patient short of breath", "drugs item furosemide value 40 unit mg"],
        "img-a3-wide_img-a2_rgba": ["drugs item furosemide value 40 unit mg"],   # at I_prev's time: in
        "img-b4_img-b3": ["vitals item spo2 value 91 unit %"],
        "img-c2_img-c1": ["labs item crp value 12 unit mg/L"],
    }
    assert [h for _, h, _ in ev.for_pair("img-a2_rgba_img-a1_16bit")] == pytest.approx([5, 5])
    inclusive = extract_own_events(cohort_files / "events.parquet", cohort.pairs, threads=1, window_end="inclusive")
    assert [h for _, h, _ in inclusive.for_pair("img-a2_rgba_img-a1_16bit")] == pytest.approx([5, 5, 10])
    rep = ev.report.set_index("what")["n"]
    assert rep["dropped: no text and no column value"] == 1
    assert rep["dropped: pairs with no events"] == 1                      # a4 ← a3 has none
    assert rep["events outside every pair window (info)"] == 1            # A at 100 h
    most_recent = extract_own_events(cohort_files / "events.parquet", cohort.pairs, max_events=1, threads=1)
    assert [t for t, _, _ in most_recent.for_pair("img-a3-wide_img-a1_16bit")] == ["drugs item furosemide value 40 unit mg"]
    # event_budget_last over an own file's table names; a profile's MIMIC name it lacks is counted, not an error
    key = "img-a3-wide_img-a1_16bit"
    others = [t for t, _, _ in extract_own_events(cohort_files / "events.parquet", cohort.pairs, max_events=100,
                                                  threads=1).for_pair(key) if not t.startswith("drugs")]
    drugs_last = extract_own_events(cohort_files / "events.parquet", cohort.pairs, max_events=1, threads=1,
                                    budget_last=("drugs", "chartevents"))
    assert others and [t for t, _, _ in drugs_last.for_pair(key)] == others[-1:]   # the most recent non-drug
    rep = drugs_last.report.set_index("what")["n"]
    assert rep["event_budget_last tables not in events.parquet (ignored): chartevents"] == 1
    assert rep["dropped: events beyond the budget of 1 (drugs fill it last)"] > 0


def test_artefacts_run_through_store_and_dataset(cohort_files, tmp_path):
    """The written files are the ones the study reads: event store, PairDataset, collate."""
    cohort, ev = import_own_cohort(cohort_files / "images.csv", cohort_files / "events.parquet", tmp_path,
                                   threads=1, workers=2)
    for f in ("cohort/pairs.parquet", "cohort/cohort_report.csv", "cohort/rejected_images.csv",
              "cohort/image_labels.parquet", "events/events.parquet", "events/event_texts.parquet"):
        assert (tmp_path / f).is_file(), f
    store = build_event_store(ev, make_embedder("hashing", dim=32), tmp_path / "event_store")
    pairs = pd.read_parquet(tmp_path / "cohort" / "pairs.parquet")
    ds = PairDataset(pairs, cohort_files, store, image_size=16)
    assert len(ds) == 5
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["prev_image"].shape == (5, 3, 16, 16) and batch["events"].shape[-1] == 32
    assert batch["prev_image"].min() >= -1 and batch["prev_image"].max() <= 1


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "images.csv"
    pd.DataFrame({"subject_id": ["A"], "time": [_at(0)], "path": ["x.png"]}).to_csv(path, index=False)
    with pytest.raises(SchemaError, match=r"images\.csv: missing column 'view'"):
        build_own_cohort(path)
    ev = tmp_path / "events.csv"
    pd.DataFrame({"subject_id": ["A"], "time": [_at(0)], "table": ["labs"]}).to_csv(ev, index=False)
    with pytest.raises(SchemaError, match=r"events\.csv: missing column 'text'"):
        extract_own_events(ev, pd.DataFrame(columns=["pair_key", "subject_id", "prev_time", "target_time"]))
    with pytest.raises(MissingTableError, match=r"nothing\.parquet"):
        build_own_cohort(tmp_path / "nothing.parquet")


def test_overlapping_episodes_are_an_error(tmp_path):
    path = tmp_path / "images.csv"
    pd.DataFrame({"subject_id": ["A"] * 3, "episode_id": ["e1", "e2", "e1"], "time": [_at(0), _at(5), _at(10)],
                  "path": ["a.png", "b.png", "c.png"], "view": "PA"}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="episode e2 starts .* must not overlap"):
        build_own_cohort(path, check_images="none")


def test_study_glue_runs_the_own_cohort(cohort_files, cohort, tmp_path):
    """Config keys own_images/own_events route notebooks 01-05's glue to the own cohort (same files downstream)."""
    from ehrxdiff.study import evaluation
    from ehrxdiff.study import prepare
    from ehrxdiff.config import load_config
    keys = sorted(cohort.pairs["pair_key"])          # 6 pairs of 3 patients: a split file fills every split
    (tmp_path / "split.json").write_text(json.dumps({"train": keys[:4], "valid": keys[4:5], "test": keys[5:]}))
    cfg = load_config("smoke", {"own_images": str(cohort_files / "images.csv"),
                                "own_events": str(cohort_files / "events.parquet"),
                                "run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"),
                                "figures_dir": str(tmp_path / "fig"), "embedding_backend": "hashing",
                                "split_file": str(tmp_path / "split.json")})
    assert cfg.own_cohort and not cfg.synthetic
    assert cfg.source_dirs() == {"mimic_cxr": cohort_files}
    with pytest.warns(UserWarning, match=r"the valid split holds 1 patient\(s\) \(1 pairs\): model selection"):
        res = prepare.build_cohort(cfg)          # the split file puts one pair of one patient in valid
    assert _pairs(res) == _pairs(cohort)
    with pytest.warns(UserWarning, match=r"study's samples .*the valid split holds 1 patient"):
        step = prepare.build_events(cfg, res.pairs)          # said again for the samples notebook 02 keeps
    samples, store = prepare.load_pairs_with_events(cfg)
    assert set(samples["pair_key"]) == set(step.events.pair_keys) == set(store.pair_keys)
    ds = prepare.datasets(cfg, ("train", "valid", "test"))
    assert sum(len(d) for d in ds.values()) == len(samples)
    item = next(d for d in ds.values() if len(d))[0]
    assert item["prev_image"].shape[-1] == cfg.image_size
    labels, rows = evaluation.label_rows(cfg, samples)   # from the images table's finding columns
    assert set(labels["label"]) == {"pleural effusion"}
    assert set(rows["pair_key"]) <= set(samples["pair_key"]) and len(rows) > 0


def test_own_cohort_config_needs_both_tables():
    from ehrxdiff.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="own_images and own_events"):
        load_config("smoke", {"own_images": "x.csv"})
    with pytest.raises(ConfigError, match="not both"):
        load_config("smoke", {"own_images": "x.csv", "own_events": "y.csv", "mimic_iv_dir": "m"})


def test_a_cohort_with_an_empty_split_or_no_pairs_stops_in_notebook_01(cohort_files, tmp_path):
    """Issue 15 item 4: 0 pairs, or a split without pairs, is an error where the cohort is built, naming why."""
    from ehrxdiff.study import prepare
    from ehrxdiff.config import load_config
    base = {"own_images": str(cohort_files / "images.csv"), "own_events": str(cohort_files / "events.parquet"),
            "data_dir": str(tmp_path / "data"), "figures_dir": str(tmp_path / "fig")}
    cfg = load_config("smoke", base | {"run_dir": str(tmp_path / "a")})
    with pytest.raises(prepare.EmptyCohortError, match=r"6 pairs, but none in the valid, test split\(s\)"):
        prepare.build_cohort(cfg)                      # 3 patients, split by patient: all 6 pairs land in train
    with pytest.raises(prepare.EmptyCohortError, match=r"6 pairs, but none in the valid, test"):
        prepare.build_cohort(cfg)                      # the cached cohort is checked too
    cfg = load_config("smoke", base | {"run_dir": str(tmp_path / "b"), "max_interval_hours": 0.5})
    with pytest.raises(prepare.EmptyCohortError, match=r"0 pairs\. The funnel \(cohort_report.csv\): .*interval"):
        prepare.build_cohort(cfg)


def test_frontal_rule_reads_the_first_word_of_the_view():
    """Issue 16: real tables say "AP Supine", "PA erect"; laterals and other words stay non-frontal."""
    from ehrxdiff.data.own_cohort import frontal_view
    views = pd.Series(["AP Supine", "ap portable", "PA erect", "pa_erect", " Frontal ", "PA", "LATERAL", "LL", "APEX",
                       "PAX", None, "LAO"])
    assert frontal_view(views).tolist() == ["AP", "AP", "PA", "PA", "AP", "PA", pd.NA, pd.NA, pd.NA, pd.NA, pd.NA, pd.NA]
