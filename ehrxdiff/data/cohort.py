"""The cohort of (I_prev, S_event, I_trg) triples: MIMIC-CXR images linked to MIMIC-IV admissions.

Rules are the reference implementation's (paper-reference §2.1-2.3, §2.7; decisions D1, D12), written
as DuckDB SQL so the whole metadata file (377 k images) and admissions table (431 k rows) are joined
without pandas round trips:

1. admissions x patients, age = year(admittime) - anchor_year + anchor_age, keep age >= ``min_age``;
2. images: ViewPosition in {PA, AP} only; time = StudyDate + StudyTime, where StudyTime is a float that
   lost its leading zero (``80556.875`` = 08:05:56): integer part zero-padded to 6 digits, fractional
   seconds dropped;
3. StudyOrder = dense rank per subject of the study's time (its earliest frontal image);
4. link by subject_id (the CXR metadata has no hadm_id): admittime < image time <= dischtime. An image
   taken in the ED before admission therefore links to nothing (the classic trap);
5. pairs inside one admission: prev time < target time, different (later) study, target - prev < 48 h;
   ``pairing="all_earlier"`` keeps every earlier image (the released code, Table I), ``"consecutive"``
   only the images of the immediately preceding study of that admission (the paper's wording);
6. patient-level split: per-patient sample counts shuffled with ``split_seed`` (pandas ``sample``, as
   the reference), cumulative counts: first ``test_fraction`` of samples -> test, next
   ``valid_fraction`` -> valid, rest -> train; or the reference's ``dataset_split.json``.

Every row removed is counted with its reason in :attr:`CohortResult.report`.
"""
from __future__ import annotations

import argparse
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError

from ehrxdiff.constants import FRONTAL_VIEWS, MAX_INTERVAL_HOURS, MIN_AGE, SPLIT_SEED, TEST_FRACTION, VALID_FRACTION
from ehrxdiff.data.schemas import cxr_image_relpath
from ehrxdiff.data.sources import (ID_SQL, OFFSET_SQL, InputFileError, MissingTableError, SchemaError, connect,
                                   materialize, register_table)

log = logging.getLogger(__name__)

__all__ = ["CohortResult", "build_cohort", "pair_images", "assign_splits", "table1", "format_table1", "check_image_files", "main"]

PAIR_COLUMNS = (
    "pair_key", "subject_id", "hadm_id", "prev_dicom_id", "target_dicom_id", "prev_study_id",
    "target_study_id", "prev_time", "target_time", "interval_hours", "prev_path", "target_path",
    "split", "age", "gender",
)
CXR_METADATA_STEM = "mimic-cxr-2.0.0-metadata"


@dataclass
class CohortResult:
    """``pairs``: one row per (I_prev, I_trg) pair, columns :data:`PAIR_COLUMNS`;
    ``report``: tidy funnel (step, kind "kept"/"dropped", what, unit, n)."""

    pairs: pd.DataFrame
    report: pd.DataFrame

    def write(self, out_dir: str | Path) -> Path:
        """Write ``pairs.parquet`` and ``cohort_report.csv`` into ``out_dir``; returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.pairs.to_parquet(out / "pairs.parquet", index=False)
        self.report.to_csv(out / "cohort_report.csv", index=False)
        return out


class _Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, kind: str, what: str, unit: str, n: int) -> None:
        self.rows.append({"step": len(self.rows) + 1, "kind": kind, "what": what, "unit": unit, "n": int(n)})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "kind", "what", "unit", "n"])


def _scalar(con, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0] or 0)


def _refuse_offsets(con, table: str, col: str, path: Path) -> None:
    """:class:`InputFileError` if any ``col`` value carries a UTC offset: DuckDB's cast drops it, so a file
    mixing notations would shift some times against the others without a word (issue 15)."""
    n, example = con.execute(f'SELECT count(*), any_value("{col}") FROM "{table}" '
                             f'WHERE {OFFSET_SQL.format(x=chr(34) + col + chr(34))}').fetchone()
    if n:
        raise InputFileError(f"{path}: column '{col}': {n} time(s) carry a UTC offset (e.g. '{example}'). MIMIC times "
                             "are local times without one; write every time in one clock, without an offset.")


def _deduplicate(con, table: str, key: str, path: Path, rep: "_Report", unit: str) -> None:
    """One row per ``key``: exact copies of a row are dropped (one kept) and counted; rows that share the key but
    differ are refused, since no rule can say which is right (issue 15: a duplicated metadata row doubled pairs,
    a duplicated admission doubled S_event)."""
    before = _scalar(con, f'SELECT count(*) FROM "{table}"')
    con.execute(f'CREATE OR REPLACE TEMP TABLE "{table}" AS SELECT DISTINCT * FROM "{table}"')
    rep.add("dropped", f"duplicate row in {path.name} (identical copy; one kept)", unit,
            before - _scalar(con, f'SELECT count(*) FROM "{table}"'))
    k = ID_SQL.format(x=f'"{key}"') if key.endswith("_id") and key != "dicom_id" else f'trim("{key}")'
    row = con.execute(f'SELECT {k} AS k, count(*) FROM "{table}" WHERE {k} IS NOT NULL GROUP BY 1 HAVING count(*) > 1 '
                      f'ORDER BY 2 DESC, 1 LIMIT 1').fetchone()
    if row is not None:
        n = _scalar(con, f'SELECT count(*) FROM (SELECT {k} FROM "{table}" WHERE {k} IS NOT NULL GROUP BY 1 '
                         f'HAVING count(*) > 1)')
        raise InputFileError(f"{path}: column '{key}': {n} value(s) on more than one row with different contents "
                             f"(e.g. {key} {row[0]} on {row[1]} rows). The release has one row per {key}: keep the "
                             "right one and remove the others.")


CHECK_IMAGES = ("decode", "header", "none")


def check_image_files(paths: list[Path], *, workers: int = 8, decode: bool = True) -> list[str | None]:
    """For each path: None if it is a readable image, else "missing" or "unreadable".

    ``decode=True`` (the default, as the own-cohort path) decodes every image in full, so a JPEG cut short in a
    download fails here and not in training (issue 15); ``decode=False`` parses the header only (exists, non-empty,
    PIL reads the header), for very large downloads: docs/real-data.md has the cost of each.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode grey

    def one(p: Path) -> str | None:
        try:
            if not p.is_file():
                return "missing"
            if p.stat().st_size == 0:
                return "unreadable"
            with Image.open(p) as im:
                if decode:
                    im.load()
                else:
                    im.size  # noqa: B018 - header parsed on open
            return None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return "unreadable"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, paths))


def assign_splits(pairs: pd.DataFrame, *, split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION,
                  valid_fraction: float = VALID_FRACTION) -> pd.Series:
    """Patient-level split by cumulative sample count, exactly as the reference's ``make_input``.

    Per-patient counts (ordered by subject_id) are shuffled with ``Series.sample(frac=1,
    random_state=split_seed)``; with cumulative count c and total N: c < int(N*test) -> test,
    c < int(N*(test+valid)) -> valid, else train. Call it again after pairs are dropped for having no
    events to match the reference, which splits after that drop. Returns a Series aligned to ``pairs``.
    """
    if pairs.empty:
        return pd.Series([], index=pairs.index, dtype="str", name="split")
    counts = pairs.groupby("subject_id")["subject_id"].count().sample(frac=1, random_state=split_seed)
    cum = counts.cumsum()
    total = int(counts.sum())
    t1 = int(total * test_fraction)
    # the reference writes int(N*2*valid_percent) with one shared fraction; keep its float arithmetic
    t2 = int(total * 2 * valid_fraction) if test_fraction == valid_fraction else int(total * (test_fraction + valid_fraction))
    split_of = pd.Series("train", index=counts.index, dtype="str")
    split_of[cum < t1] = "test"
    split_of[(cum >= t1) & (cum < t2)] = "valid"
    return pairs["subject_id"].map(split_of).rename("split")


def _load_split_file(path: str | Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    mapping: dict[str, str] = {}
    for split in ("train", "valid", "test"):
        if split not in data:
            raise ValueError(f"{path}: missing key '{split}' (expected train/valid/test lists of pair keys)")
        for key in data[split]:
            mapping[str(key)] = split
    return mapping


def build_cohort(mimic_iv_dir: str | Path, mimic_cxr_dir: str | Path, *, pairing: str = "all_earlier",
                 max_interval_hours: float = MAX_INTERVAL_HOURS, min_age: int = MIN_AGE,
                 split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION,
                 valid_fraction: float = VALID_FRACTION, split_file: str | Path | None = None,
                 check_images: str = "decode", image_root: str | Path | None = None,
                 memory_limit: str | None = None, threads: int | None = None) -> CohortResult:
    """Build the pair cohort (module docstring for the rules).

    ``image_root`` is where ``files/pNN/...`` images are checked (default ``mimic_cxr_dir``; point it
    at a resized copy with the same layout). Paths in the output stay relative to that root.
    """
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    if pairing not in ("all_earlier", "consecutive"):
        raise ValueError(f"pairing must be 'all_earlier' or 'consecutive', got {pairing!r}")
    if max_interval_hours <= 0:
        raise ValueError(f"max_interval_hours must be > 0, got {max_interval_hours}")
    image_root = Path(image_root) if image_root is not None else Path(mimic_cxr_dir)
    rep = _Report()
    con = connect(memory_limit=memory_limit, threads=threads)

    # each file read once, here, so a file that cannot be read fails naming it (issue 15)
    files = {}
    for name, root, stem, required, key in (
            ("patients", mimic_iv_dir, "hosp/patients", ["subject_id", "gender", "anchor_age", "anchor_year"], "hosp/patients"),
            ("admissions", mimic_iv_dir, "hosp/admissions", ["subject_id", "hadm_id", "admittime", "dischtime"], "hosp/admissions"),
            ("metadata", mimic_cxr_dir, CXR_METADATA_STEM,
             ["dicom_id", "subject_id", "study_id", "viewposition", "studydate", "studytime"], "cxr/metadata")):
        files[name], _ = register_table(con, f"{name}_csv", root, stem, required, key)
        materialize(con, name, f"{name}_csv", files[name])
    for col in ("admittime", "dischtime"):
        _refuse_offsets(con, "admissions", col, files["admissions"])
    _deduplicate(con, "patients", "subject_id", files["patients"], rep, "patients")
    _deduplicate(con, "admissions", "hadm_id", files["admissions"], rep, "admissions")
    _deduplicate(con, "metadata", "dicom_id", files["metadata"], rep, "images")

    # 1. adult admissions (the reference's left merge: no patients row -> age unknown -> dropped); the reasons
    # are exclusive, in this order: bad ids or times, no patients row, a patients row without a usable age, age
    sid, hid = ID_SQL.format(x="a.subject_id"), ID_SQL.format(x="a.hadm_id")
    con.execute(f"""
        CREATE TEMP TABLE adm AS
        SELECT {sid} AS subject_id, {hid} AS hadm_id,
               TRY_CAST(a.admittime AS TIMESTAMP) AS admittime, TRY_CAST(a.dischtime AS TIMESTAMP) AS dischtime,
               year(TRY_CAST(a.admittime AS TIMESTAMP)) - TRY_CAST(p.anchor_year AS INTEGER)
                   + TRY_CAST(p.anchor_age AS INTEGER) AS age,
               p.gender AS gender, p._sid IS NOT NULL AS has_patient
        FROM admissions a LEFT JOIN (SELECT *, {ID_SQL.format(x="subject_id")} AS _sid FROM patients) p
          ON {sid} = p._sid""")
    valid = "subject_id IS NOT NULL AND hadm_id IS NOT NULL AND admittime IS NOT NULL AND dischtime IS NOT NULL"
    rep.add("kept", "admissions", "admissions", _scalar(con, "SELECT count(*) FROM adm"))
    rep.add("dropped", "admission without a valid subject_id, hadm_id, admittime or dischtime", "admissions",
            _scalar(con, f"SELECT count(*) FROM adm WHERE NOT ({valid})"))
    rep.add("dropped", "age unknown (no patients row)", "admissions",
            _scalar(con, f"SELECT count(*) FROM adm WHERE {valid} AND NOT has_patient"))
    rep.add("dropped", "age unknown (patients row with unparseable anchor_age or anchor_year)", "admissions",
            _scalar(con, f"SELECT count(*) FROM adm WHERE {valid} AND has_patient AND age IS NULL"))
    rep.add("dropped", f"age < {min_age}", "admissions",
            _scalar(con, f"SELECT count(*) FROM adm WHERE {valid} AND age < {int(min_age)}"))
    con.execute(f"""CREATE TEMP TABLE adult AS SELECT * EXCLUDE (has_patient) FROM adm
        WHERE age >= {int(min_age)} AND {valid}""")

    # 2. images: frontal only (ViewPosition trimmed and upper-cased), StudyDate + zero-padded integer StudyTime
    views = ", ".join(f"'{v}'" for v in FRONTAL_VIEWS)
    con.execute(f"""
        CREATE TEMP TABLE img_all AS
        SELECT NULLIF(trim(dicom_id), '') AS dicom_id, {ID_SQL.format(x="subject_id")} AS subject_id,
               {ID_SQL.format(x="study_id")} AS study_id, upper(trim(viewposition)) AS viewposition,
               try_strptime(trim(studydate) || ' ' || lpad(split_part(trim(studytime), '.', 1), 6, '0'),
                            '%Y%m%d %H%M%S') AS image_time
        FROM metadata""")
    rep.add("kept", "images in metadata", "images", _scalar(con, "SELECT count(*) FROM img_all"))
    rep.add("dropped", "non-frontal view (lateral, other or empty ViewPosition)", "images",
            _scalar(con, f"SELECT count(*) FROM img_all WHERE viewposition IS NULL OR viewposition NOT IN ({views})"))
    rep.add("dropped", "unparseable StudyDate/StudyTime or ids", "images", _scalar(con, f"""
        SELECT count(*) FROM img_all WHERE viewposition IN ({views})
          AND (image_time IS NULL OR subject_id IS NULL OR study_id IS NULL OR dicom_id IS NULL)"""))
    con.execute(f"""
        CREATE TEMP TABLE frontal AS
        WITH f AS (SELECT * FROM img_all WHERE viewposition IN ({views}) AND image_time IS NOT NULL
                   AND subject_id IS NOT NULL AND study_id IS NOT NULL AND dicom_id IS NOT NULL),
             s AS (SELECT subject_id, study_id, min(image_time) AS study_time FROM f GROUP BY ALL)
        SELECT f.*, dense_rank() OVER (PARTITION BY s.subject_id ORDER BY s.study_time) AS study_order
        FROM f JOIN s USING (subject_id, study_id)""")
    rep.add("kept", "frontal images", "images", _scalar(con, "SELECT count(*) FROM frontal"))

    # 3. link to admissions by subject_id and time (ED-before-admission images link to nothing)
    con.execute("""
        CREATE TEMP TABLE linked AS
        SELECT f.*, a.hadm_id, a.admittime, a.age, a.gender
        FROM frontal f JOIN adult a
          ON f.subject_id = a.subject_id AND f.image_time > a.admittime AND f.image_time <= a.dischtime""")
    rep.add("dropped", "no admission with admittime < image time <= dischtime (incl. ED before admission)",
            "images", _scalar(con, """
        SELECT count(*) FROM frontal f WHERE NOT EXISTS (SELECT 1 FROM adm a WHERE a.subject_id = f.subject_id
            AND f.image_time > a.admittime AND f.image_time <= a.dischtime)"""))
    rep.add("dropped", f"linked only to admissions with age < {min_age} or unknown age", "images", _scalar(con, """
        SELECT count(*) FROM frontal f WHERE EXISTS (SELECT 1 FROM adm a WHERE a.subject_id = f.subject_id
            AND f.image_time > a.admittime AND f.image_time <= a.dischtime)
          AND NOT EXISTS (SELECT 1 FROM linked l WHERE l.dicom_id = f.dicom_id)"""))
    rep.add("kept", "image-admission links", "links", _scalar(con, "SELECT count(*) FROM linked"))

    # 4. image files on disk: missing or unreadable images are excluded before pairing
    if check_images != "none":
        imgs = con.execute("SELECT DISTINCT dicom_id, subject_id, study_id FROM linked ORDER BY dicom_id").df()
        rel = [cxr_image_relpath(s, t, d) for d, s, t in imgs.itertuples(index=False)]
        status = check_image_files([image_root / r for r in rel], decode=check_images == "decode")
        imgs["status"] = status
        how = {"decode": "decoded in full", "header": "header only"}[check_images]
        rep.add("dropped", "image file missing on disk", "images", int((imgs["status"] == "missing").sum()))
        rep.add("dropped", f"image file unreadable on disk ({how})", "images",
                int((imgs["status"] == "unreadable").sum()))
        bad = imgs.loc[imgs["status"].notna(), ["dicom_id"]]
        con.register("bad_images", bad)
        con.execute("DELETE FROM linked WHERE dicom_id IN (SELECT dicom_id FROM bad_images)")

    # 5-6. pairs inside one admission, split by patient (the one pairing function both sources call)
    pairs = pair_images(con, "linked", rep, pairing=pairing, max_interval_hours=max_interval_hours,
                        split_seed=split_seed, test_fraction=test_fraction, valid_fraction=valid_fraction,
                        split_file=split_file,
                        paths=lambda p, side: [cxr_image_relpath(s, t, d) for s, t, d in
                                               zip(p["subject_id"], p[f"{side}_study_id"], p[f"{side}_dicom_id"])])
    con.close()
    return CohortResult(pairs=pairs, report=rep.frame())


def pair_images(con, linked: str, rep, *, pairing: str, max_interval_hours: float, split_seed: int,
                test_fraction: float, valid_fraction: float, split_file: str | Path | None, paths) -> pd.DataFrame:
    """Steps 5-6 of the module docstring over linked frontal images: pairs inside one admission (or an own
    cohort's episode) and their patient-level split, each drop counted in ``rep``. The one pairing function:
    :func:`build_cohort` calls it on MIMIC's image-admission links, :func:`ehrxdiff.data.own_cohort.build_own_cohort`
    on its images grouped by episode, so ``pairing``, the interval rule, the split and the funnel rows are the
    same code for both.

    ``linked``: a DuckDB table of one row per (image, admission) link with ``subject_id``, ``hadm_id``, ``age``,
    ``gender``, ``dicom_id``, ``study_id``, ``image_time`` and ``study_order`` (dense rank per subject of the
    study's earliest frontal image time). ``paths(pairs, side)`` gives the image paths of side "prev" or
    "target". ``rep``: the funnel, anything with ``add(kind, what, unit, n)``. Returns the pairs with columns
    :data:`PAIR_COLUMNS`.
    """
    interval = float(max_interval_hours) * 3600.0
    con.execute(f"""
        CREATE TEMP TABLE cand AS
        WITH l AS (SELECT *, dense_rank() OVER (PARTITION BY subject_id, hadm_id ORDER BY study_order) AS adm_rank
                   FROM {linked})
        SELECT t.subject_id, t.hadm_id, t.age, t.gender,
               p.dicom_id AS prev_dicom_id, t.dicom_id AS target_dicom_id,
               p.study_id AS prev_study_id, t.study_id AS target_study_id,
               p.image_time AS prev_time, t.image_time AS target_time,
               t.study_order - p.study_order AS order_diff, t.adm_rank - p.adm_rank AS rank_diff,
               epoch(t.image_time) - epoch(p.image_time) AS dt_seconds
        FROM l t JOIN l p ON t.subject_id = p.subject_id AND t.hadm_id = p.hadm_id
         AND p.image_time < t.image_time AND p.dicom_id <> t.dicom_id""")
    rep.add("kept", "earlier-image candidates in the same admission", "pairs", _scalar(con, "SELECT count(*) FROM cand"))
    rep.add("dropped", "same study (or earlier study order)", "pairs", _scalar(con, "SELECT count(*) FROM cand WHERE order_diff <= 0"))
    if pairing == "consecutive":
        rep.add("dropped", "not the immediately preceding study (pairing=consecutive)", "pairs",
                _scalar(con, "SELECT count(*) FROM cand WHERE order_diff > 0 AND rank_diff <> 1"))
    keep = "order_diff > 0" + (" AND rank_diff = 1" if pairing == "consecutive" else "")
    rep.add("dropped", f"interval >= {max_interval_hours:g} h", "pairs",
            _scalar(con, f"SELECT count(*) FROM cand WHERE {keep} AND dt_seconds >= {interval}"))
    pairs = con.execute(f"""
        SELECT target_dicom_id || '_' || prev_dicom_id AS pair_key, subject_id, hadm_id,
               prev_dicom_id, target_dicom_id, prev_study_id, target_study_id, prev_time, target_time,
               dt_seconds / 3600.0 AS interval_hours, age, gender
        FROM cand WHERE {keep} AND dt_seconds < {interval}
        ORDER BY subject_id, hadm_id, target_time, target_dicom_id, prev_time, prev_dicom_id""").df()
    con.execute("DROP TABLE cand")
    pairs["prev_path"] = paths(pairs, "prev")
    pairs["target_path"] = paths(pairs, "target")

    # 6. split
    if split_file is not None:
        mapping = _load_split_file(split_file)
        pairs["split"] = pairs["pair_key"].map(mapping)
        rep.add("dropped", "pair not in split file", "pairs", int(pairs["split"].isna().sum()))
        rep.add("kept", "split-file keys not found in this cohort (info)", "pairs",
                len(set(mapping) - set(pairs["pair_key"])))
        pairs = pairs[pairs["split"].notna()].reset_index(drop=True)
    else:
        pairs["split"] = assign_splits(pairs, split_seed=split_seed, test_fraction=test_fraction,
                                       valid_fraction=valid_fraction)
    rep.add("kept", "pairs", "pairs", len(pairs))
    pairs = pairs[list(PAIR_COLUMNS)]
    pairs["interval_hours"] = pairs["interval_hours"].astype("float64")
    return pairs


def table1(pairs: pd.DataFrame) -> pd.DataFrame:
    """Table I of the paper: patients, admissions, samples and mean interval (h) per split."""
    rows = {}
    for split in ("train", "valid", "test"):
        p = pairs[pairs["split"] == split]
        rows[split] = {
            "patients": p["subject_id"].nunique(),
            "hospital admissions": p["hadm_id"].nunique(),
            "samples": len(p),
            "mean interval (h)": round(float(p["interval_hours"].mean()), 2) if len(p) else float("nan"),
        }
    return pd.DataFrame(rows)


def format_table1(t1: pd.DataFrame) -> pd.DataFrame:
    """Table I as the paper prints it: counts as integers with thousands separators, the interval with two
    decimals (a numeric frame mixes them into floats: ``20.0`` patients)."""
    shown = t1.astype(object)
    for row in shown.index:
        shown.loc[row] = [("" if pd.isna(v) else f"{v:.2f}") if "interval" in row else f"{int(v):,}" for v in t1.loc[row]]
    shown.index.name = "statistic"
    return shown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.data.cohort", description=__doc__.splitlines()[0])
    ap.add_argument("--mimic-iv", required=True, help="MIMIC-IV v2.2 root (holds hosp/ and icu/)")
    ap.add_argument("--mimic-cxr", required=True, help="MIMIC-CXR-JPG v2.0.0 root (holds the metadata csv and files/)")
    ap.add_argument("--out", required=True, help="output folder for pairs.parquet and cohort_report.csv")
    ap.add_argument("--pairing", choices=["all_earlier", "consecutive"], default="all_earlier")
    ap.add_argument("--max-interval-hours", type=float, default=MAX_INTERVAL_HOURS)
    ap.add_argument("--split-file", default=None, help="reference dataset_split.json (optional)")
    ap.add_argument("--check-images", choices=list(CHECK_IMAGES), default="decode",
                    help="decode every linked image in full (default), parse headers only, or skip the check")
    ap.add_argument("--memory-limit", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        res = build_cohort(a.mimic_iv, a.mimic_cxr, pairing=a.pairing, max_interval_hours=a.max_interval_hours,
                           split_file=a.split_file, check_images=a.check_images,
                           memory_limit=a.memory_limit, threads=a.threads)
    except (SchemaError, MissingTableError, ValueError) as exc:  # InputFileError is a ValueError
        print(f"error: {exc}")
        return 2
    out = res.write(a.out)
    print(res.report.to_string(index=False))
    print(format_table1(table1(res.pairs)).to_string())
    print(f"wrote {out / 'pairs.parquet'} ({len(res.pairs)} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
