"""Malformed input never passes silently (issue 15): each case is a synthetic world with one defect, made by code
here (nothing committed), and asserts the exact outcome: an error naming the file and the column (or line), or a
counted skip with the right reason and a cohort that is otherwise unchanged."""
from __future__ import annotations

import csv
import gzip
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ehrxdiff.study import prepare
from ehrxdiff.data.cohort import build_cohort, main as cohort_main
from ehrxdiff.data.events import extract_events
from ehrxdiff.data.own_cohort import extract_own_events, read_table
from ehrxdiff.data.sources import InputFileError
from ehrxdiff.synthetic import generate_world

IV, CXR = "mimiciv/2.2", "mimic-cxr-jpg/2.0.0"
META = f"{CXR}/mimic-cxr-2.0.0-metadata.csv.gz"
ADM, PAT = f"{IV}/hosp/admissions.csv.gz", f"{IV}/hosp/patients.csv.gz"
LAB, CHART, DITEMS = f"{IV}/hosp/labevents.csv.gz", f"{IV}/icu/chartevents.csv.gz", f"{IV}/icu/d_items.csv.gz"
TABLES = ("labevents", "chartevents")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("bad") / "world", n_patients=10, seed=3, image_size=32, workers=1,
                          progress=False)


@pytest.fixture(scope="module")
def baseline(world):
    res = build_cohort(world / IV, world / CXR, threads=1)
    assert len(res.pairs) > 20
    return res


@pytest.fixture(scope="module")
def baseline_events(world, baseline):
    return extract_events(world / IV, baseline.pairs, tables=TABLES, threads=1)


def _copy(world: Path, tmp: Path) -> Path:
    out = tmp / "world"
    shutil.copytree(world, out)
    return out


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _write(path: Path, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    path.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))


def _edit(root: Path, rel: str, fn) -> None:
    p = root / rel
    _write(p, fn(_read(p)))


def _raw_edit(root: Path, rel: str, fn) -> None:
    p = root / rel
    p.write_bytes(gzip.compress(fn(gzip.decompress(p.read_bytes())), mtime=0))


def _n(res, startswith: str, kind: str = "dropped") -> int:
    rows = res.report[(res.report["kind"] == kind) & res.report["what"].str.startswith(startswith)]
    assert len(rows) == 1, f"no single report row starting with {startswith!r}:\n{res.report}"
    return int(rows["n"].iloc[0])


def _ev(res, table: str, startswith: str) -> int:
    r = res.report[(res.report["table"] == table) & res.report["what"].str.startswith(startswith)]
    assert len(r) == 1, res.report
    return int(r["n"].iloc[0])


def _in_window_row(root: Path, rel: str, pairs: pd.DataFrame, tcol: str) -> int:
    """Index of a row of ``rel`` inside a pair's window (by hadm_id and time)."""
    df = _read(root / rel)
    df["_t"] = pd.to_datetime(df[tcol], errors="coerce", format="ISO8601")
    hadm = pd.to_numeric(df["hadm_id"], errors="coerce")          # the world writes labevents' ids as 2000.0
    for _, p in pairs.iterrows():
        m = (hadm == p["hadm_id"]) & df["_t"].between(p["prev_time"], p["target_time"])
        if m.any():
            return int(m.to_numpy().argmax())
    raise AssertionError("no row in a window")


def _pairs(res) -> list[str]:
    return sorted(res.pairs["pair_key"])


# --- duplicates: one identical copy is dropped and counted, the cohort is unchanged ----------------------------

@pytest.mark.parametrize("rel,what,unit", [
    (META, "duplicate row in mimic-cxr-2.0.0-metadata.csv.gz", "images"),
    (ADM, "duplicate row in admissions.csv.gz", "admissions"),
    (PAT, "duplicate row in patients.csv.gz", "patients"),
])
def test_identical_duplicate_row_dropped_and_counted(world, baseline, tmp_path, rel, what, unit):
    root = _copy(world, tmp_path)
    _edit(root, rel, lambda df: pd.concat([df, df.iloc[[len(df) // 2]]], ignore_index=True))
    res = build_cohort(root / IV, root / CXR, threads=1)
    assert _n(res, what) == 1 and _n(baseline, what) == 0
    assert res.report[res.report["what"].str.startswith(what)]["unit"].item() == unit
    assert _pairs(res) == _pairs(baseline)
    assert not res.pairs["pair_key"].duplicated().any()


def test_duplicate_admission_does_not_double_s_event(world, baseline, baseline_events, tmp_path):
    root = _copy(world, tmp_path)
    hadm = str(baseline.pairs["hadm_id"].iloc[0])
    _edit(root, ADM, lambda df: pd.concat([df, df[df["hadm_id"] == hadm]], ignore_index=True))
    res = build_cohort(root / IV, root / CXR, threads=1)
    ev = extract_events(root / IV, res.pairs, tables=TABLES, threads=1)
    key = baseline.pairs["pair_key"].iloc[0]
    assert ev.for_pair(key) == baseline_events.for_pair(key)


def test_duplicate_event_row_is_one_event(world, baseline, baseline_events, tmp_path):
    root = _copy(world, tmp_path)
    i = _in_window_row(root, LAB, baseline.pairs, "charttime")
    _edit(root, LAB, lambda df: pd.concat([df, df.iloc[[i]]], ignore_index=True))
    ev = extract_events(root / IV, baseline.pairs, tables=TABLES, threads=1)
    assert _ev(ev, "all", "dropped: duplicate rows") == 1
    assert ev.events.shape == baseline_events.events.shape


@pytest.mark.parametrize("rel,key", [(ADM, "hadm_id"), (PAT, "subject_id"), (META, "dicom_id")])
def test_conflicting_duplicate_key_is_refused_naming_file_and_column(world, tmp_path, rel, key):
    root = _copy(world, tmp_path)

    def conflict(df):
        row = df.iloc[[0]].copy()
        other = [c for c in df.columns if c != key and c.lower() not in ("subject_id",)][-1]
        row[other] = row[other] + "9"
        return pd.concat([df, row], ignore_index=True)
    _edit(root, rel, conflict)
    with pytest.raises(InputFileError, match=rf"{Path(rel).name}: column '{key}': 1 value\(s\) on more than one row"):
        build_cohort(root / IV, root / CXR, threads=1)


# --- images that only partly decode ------------------------------------------------------------------------

def test_truncated_jpeg_is_dropped_when_decoded_in_full_and_passes_a_header_check(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    rel = baseline.pairs["target_path"].iloc[0]
    jpg = root / CXR / rel
    Image.open(jpg).convert("L").resize((512, 512)).save(jpg, quality=95)   # large enough to cut mid-scan
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    res = build_cohort(root / IV, root / CXR, threads=1)
    assert _n(res, "image file unreadable on disk (decoded in full)") == 1
    assert rel not in set(res.pairs["target_path"]) | set(res.pairs["prev_path"])
    header_only = build_cohort(root / IV, root / CXR, check_images="header", threads=1)
    assert _n(header_only, "image file unreadable on disk (header only)") == 0     # what the switch costs
    assert _pairs(header_only) == _pairs(baseline)


# --- id columns ----------------------------------------------------------------------------------------------

def test_ids_written_as_floats_link_as_integers(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    for rel, cols in ((ADM, ("subject_id", "hadm_id")), (PAT, ("subject_id",)), (META, ("subject_id", "study_id"))):
        _edit(root, rel, lambda df, cols=cols: df.assign(**{c: df[c] + ".0" for c in cols}))
    assert _pairs(build_cohort(root / IV, root / CXR, threads=1)) == _pairs(baseline)


def test_text_nan_or_fractional_ids_are_counted_not_rounded(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    hadm = str(baseline.pairs["hadm_id"].iloc[0])
    subj = str(baseline.pairs["subject_id"].iloc[-1])

    def bad(df):
        df = df.copy()
        df.loc[df["hadm_id"] == hadm, "hadm_id"] = "NaN"
        df.loc[df["subject_id"] == subj, "subject_id"] = subj + ".5"   # TRY_CAST would round it to another id
        return df
    _edit(root, ADM, bad)
    adm = _read(world / ADM)
    n_bad = int(((adm["hadm_id"] == hadm) | (adm["subject_id"] == subj)).sum())
    res = build_cohort(root / IV, root / CXR, threads=1)
    assert _n(res, "admission without a valid subject_id, hadm_id") == n_bad
    assert hadm not in set(res.pairs["hadm_id"].astype(str)) and subj not in set(res.pairs["subject_id"].astype(str))


def test_event_with_text_nan_hadm_id_is_counted(world, baseline, baseline_events, tmp_path):
    root = _copy(world, tmp_path)
    i = _in_window_row(root, LAB, baseline.pairs, "charttime")
    _edit(root, LAB, lambda df: df.assign(hadm_id=df["hadm_id"].where(df.index != i, "NaN")))
    ev = extract_events(root / IV, baseline.pairs, tables=TABLES, threads=1)
    assert (_ev(ev, "labevents", "dropped: null or unparseable hadm_id")
            == _ev(baseline_events, "labevents", "dropped: null or unparseable hadm_id") + 1)


# --- time zones ---------------------------------------------------------------------------------------------

def test_admission_time_with_offset_is_refused(world, tmp_path):
    root = _copy(world, tmp_path)
    _edit(root, ADM, lambda df: df.assign(admittime=df["admittime"].where(df.index != 3, df["admittime"] + "+02:00")))
    with pytest.raises(InputFileError, match=r"admissions.csv.gz: column 'admittime': 1 time\(s\) carry a UTC offset"):
        build_cohort(root / IV, root / CXR, threads=1)


def test_event_time_with_offset_is_refused(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    i = _in_window_row(root, CHART, baseline.pairs, "charttime")
    _edit(root, CHART, lambda df: df.assign(charttime=df["charttime"].where(df.index != i, df["charttime"] + "Z")))
    with pytest.raises(InputFileError, match=r"chartevents.csv.gz: column 'charttime': 1 time\(s\) of cohort rows"):
        extract_events(root / IV, baseline.pairs, tables=TABLES, threads=1)


# --- files that cannot be read: one error naming the file, never a library traceback ------------------------

@pytest.mark.parametrize("rel,defect,match", [
    (ADM, "extra field", r"admissions.csv.gz: reading failed: CSV Error on Line: 4.*Expected Number of Columns"),
    (PAT, "missing field", r"patients.csv.gz: reading failed: CSV Error on Line: 3.*Expected Number of Columns"),
    (META, "latin-1", r"mimic-cxr-2.0.0-metadata.csv.gz: reading failed: .*not utf-8 encoded"),
    (ADM, "truncated gzip", r"admissions.csv.gz: reading failed: .*GZIP"),
])
def test_unreadable_cohort_file_names_the_file(world, tmp_path, rel, defect, match):
    root = _copy(world, tmp_path)
    _damage(root / rel, defect)
    with pytest.raises(InputFileError, match=match):
        build_cohort(root / IV, root / CXR, threads=1)


@pytest.mark.parametrize("rel,defect,match", [
    (LAB, "truncated gzip", r"labevents.csv.gz: reading failed: .*GZIP"),
    (CHART, "extra field", r"chartevents.csv.gz: reading failed: CSV Error on Line: 4"),
    (DITEMS, "latin-1", r"d_items.csv.gz: reading failed: .*not utf-8 encoded"),
])
def test_unreadable_event_file_names_the_file(world, baseline, tmp_path, rel, defect, match):
    root = _copy(world, tmp_path)
    _damage(root / rel, defect)
    with pytest.raises(InputFileError, match=match):
        extract_events(root / IV, baseline.pairs, tables=TABLES, threads=1)


def _damage(path: Path, defect: str) -> None:
    data = gzip.decompress(path.read_bytes())
    lines = data.split(b"\n")
    if defect == "extra field":
        lines[3] += b",surplus"
    elif defect == "missing field":
        lines[2] = lines[2].rsplit(b",", 1)[0]
    elif defect == "latin-1":
        lines[2] = lines[2].replace(b",", "é".encode("latin-1") + b",", 1)
    if defect == "truncated gzip":
        gz = gzip.compress(data, mtime=0)
        path.write_bytes(gz[: len(gz) * 2 // 3])
    else:
        path.write_bytes(gzip.compress(b"\n".join(lines), mtime=0))


def test_cohort_command_line_prints_one_error_line(world, tmp_path, capsys):
    root = _copy(world, tmp_path)
    _damage(root / ADM, "truncated gzip")
    rc = cohort_main(["--mimic-iv", str(root / IV), "--mimic-cxr", str(root / CXR), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 2 and out.startswith("error: ") and "admissions.csv.gz" in out and "Traceback" not in out


# --- zero-result inputs stop early, saying why; misleading reasons ---------------------------------------------

@pytest.mark.parametrize("defect", ["empty admissions", "empty metadata", "unparseable admittime"])
def test_zero_pair_cohort_stops_with_a_reason(world, tmp_path, defect):
    root = _copy(world, tmp_path)
    if defect == "empty admissions":
        _edit(root, ADM, lambda df: df.iloc[:0])
    elif defect == "empty metadata":
        _edit(root, META, lambda df: df.iloc[:0])
    else:
        _edit(root, ADM, lambda df: df.assign(admittime="not a time"))
    res = build_cohort(root / IV, root / CXR, threads=1)
    assert res.pairs.empty
    if defect == "unparseable admittime":
        assert _n(res, "admission without a valid") == _n(res, "admissions", kind="kept") > 0
        assert _n(res, "age unknown (no patients row)") == 0
    with pytest.raises(prepare.EmptyCohortError, match="0 pairs"):
        prepare.check_pairs(res.pairs, where="this test", report=res.report)


def test_unparseable_age_has_its_own_reason(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    subj = str(baseline.pairs["subject_id"].iloc[0])
    _edit(root, PAT, lambda df: df.assign(anchor_age=df["anchor_age"].where(df["subject_id"] != subj,
                                                                            df["anchor_age"] + " years")))
    res = build_cohort(root / IV, root / CXR, threads=1)
    n_adm = int((_read(world / ADM)["subject_id"] == subj).sum())
    assert _n(res, "age unknown (patients row with unparseable anchor_age or anchor_year)") == n_adm
    assert _n(res, "age unknown (no patients row)") == 0
    assert subj not in set(res.pairs["subject_id"].astype(str))


def test_lower_case_view_position_is_frontal(world, baseline, tmp_path):
    root = _copy(world, tmp_path)
    _edit(root, META, lambda df: df.assign(ViewPosition=df["ViewPosition"].str.lower()))
    assert _pairs(build_cohort(root / IV, root / CXR, threads=1)) == _pairs(baseline)


# --- the own-cohort path: the same families ---------------------------------------------------------------------

def _own_events(world: Path) -> pd.DataFrame:
    lab = _read(world / LAB)
    return pd.DataFrame({"subject_id": lab["subject_id"].astype("int64"), "time": lab["charttime"], "table": "labs",
                         "item": lab["itemid"], "value": lab["valuenum"]})


def _own_pairs(baseline) -> pd.DataFrame:
    return baseline.pairs.assign(subject_id=baseline.pairs["subject_id"].astype(str))


def test_own_events_with_float_subject_ids_match(world, baseline, tmp_path):
    ev = _own_events(world)
    ev.to_parquet(tmp_path / "int.parquet")
    ev.assign(subject_id=ev["subject_id"].astype("float64")).to_parquet(tmp_path / "float.parquet")
    a = extract_own_events(tmp_path / "int.parquet", _own_pairs(baseline))
    b = extract_own_events(tmp_path / "float.parquet", _own_pairs(baseline))
    assert len(a.events) > 0 and a.events.equals(b.events) and a.texts == b.texts


def test_own_float_id_with_a_fraction_is_refused(world, baseline, tmp_path):
    ev = _own_events(world).astype({"subject_id": "float64"})
    ev.loc[5, "subject_id"] += 0.5
    ev.to_parquet(tmp_path / "ev.parquet")
    with pytest.raises(InputFileError, match=r"ev.parquet: column 'subject_id': row 6: .* is not an id"):
        extract_own_events(tmp_path / "ev.parquet", _own_pairs(baseline))


def test_own_time_with_offset_is_refused_naming_the_row(world, baseline, tmp_path):
    ev = _own_events(world)
    ev.loc[7, "time"] = ev.loc[7, "time"] + "+02:00"
    ev.to_csv(tmp_path / "ev.csv", index=False)
    with pytest.raises(InputFileError, match=r"ev.csv: column 'time': row 8: .*\+02:00' and 0 more carry a UTC offset"):
        extract_own_events(tmp_path / "ev.csv", _own_pairs(baseline))


def test_own_duplicate_event_row_counted(world, baseline, tmp_path):
    ev = _own_events(world)
    pd.concat([ev, ev.iloc[[3]]]).to_csv(tmp_path / "ev.csv", index=False)
    res = extract_own_events(tmp_path / "ev.csv", _own_pairs(baseline))
    assert _ev(res, "all", "dropped: duplicate rows") == 1


@pytest.mark.parametrize("defect,match", [
    ("missing field", r"ev.csv: reading failed: CSV Error on Line: 3.*Expected Number of Columns: 5 Found: 4"),
    ("extra field", r"ev.csv: reading failed: CSV Error on Line: 4"),
    ("latin-1", r"ev.csv: reading failed: .*not utf-8 encoded"),
])
def test_own_unreadable_csv_names_the_file(world, tmp_path, defect, match):
    path = tmp_path / "ev.csv"
    _own_events(world).to_csv(path, index=False)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    _damage(gz, defect)
    path.write_bytes(gzip.decompress(gz.read_bytes()))
    with pytest.raises(InputFileError, match=match):
        read_table(path, ("subject_id", "time", "table"))


def test_own_truncated_gzip_and_broken_parquet_name_the_file(world, tmp_path):
    path = tmp_path / "ev.csv.gz"
    data = gzip.compress(_own_events(world).to_csv(index=False).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"ev.csv.gz: reading failed"):
        read_table(path, ("subject_id",))
    pq = tmp_path / "ev.parquet"
    _own_events(world).to_parquet(pq)
    pq.write_bytes(pq.read_bytes()[:-20])
    with pytest.raises(InputFileError, match=r"ev.parquet: reading failed"):
        read_table(pq, ("subject_id",))


def test_events_extracted_with_other_settings_are_refused_not_reused(world, baseline, tmp_path):
    """A run folder from before ``event_budget_last`` (or with another max_events) holds an S_event the config does
    not describe; notebook 02 refuses it naming the file and the setting instead of training on it."""
    from ehrxdiff.config import load_config
    from ehrxdiff.data.events import extract_events_to_dir
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "run")})
    assert cfg.event_budget_last == ["chartevents"]
    ev_dir = tmp_path / "events"
    kw = dict(max_events=cfg.max_events, text_style=cfg.text_style, window_end=cfg.event_window_end,
              drug_matching=cfg.drug_matching, tables=TABLES, threads=1)
    extract_events_to_dir(world / IV, baseline.pairs, ev_dir, budget_last=(), **kw)
    with pytest.raises(prepare.StaleEventsError,
                       match=r"event_meta.json: these events were extracted with event_budget_last \[\] "
                             r"\(config: \['chartevents'\]\)"):
        prepare.check_events_match(cfg, ev_dir)
    extract_events_to_dir(world / IV, baseline.pairs, ev_dir, budget_last=("chartevents",), **kw)
    prepare.check_events_match(cfg, ev_dir)                                   # the same settings: reused
    with pytest.raises(prepare.StaleEventsError, match=r"max_events 64 \(config: 32\)"):
        prepare.check_events_match(load_config("smoke", {"max_events": 32}), ev_dir)
