"""Your own cohort: a non-MIMIC longitudinal imaging cohort in two tables, run through the MIMIC path's code.

Two tables, CSV (``.csv``/``.csv.gz``) or Parquet. Headers are case-insensitive; ids are read as text; times
are ISO 8601 (``2021-03-04 08:15:00``, ``2021-03-04T08:15``) local times: a time with an offset such as ``Z``
or ``+02:00`` is refused, naming the file, column and row (mixed notations would shift events against films);
ids written as floats (``10412715.0``) are read as their digits; blank cells are missing; a row repeated in the
events table is one event (counted).

**images** — one row per image file

=============  ========  ===========================================================================
column         required  meaning
=============  ========  ===========================================================================
subject_id     yes       patient
time           yes       acquisition time (kept to the second, as MIMIC-CXR's StudyTime)
path           yes       image file (PNG/JPEG, any bit depth, mode and size: :mod:`ehrxdiff.data.images`),
                         relative to ``image_root`` (default: the images table's folder) or absolute
view           yes       frontal when its first word is ``PA``, ``AP`` or ``FRONTAL`` (any case; ``AP Supine``,
                         ``PA erect``, ``ap_portable``): paired; any other value (``LATERAL``, ``LL``, …) is
                         counted as non-frontal, dropped as on MIMIC, and listed in ``rejected_images.csv``
episode_id     no        admission/episode: pairs never cross episodes, and one subject's episodes must
                         not overlap in time. Absent: one episode per subject (``max_interval_hours``
                         still bounds every pair)
image_id       no        unique, file-name-safe id (letters, digits, ``.``, ``_``, ``-``): it names the
                         predicted images. Default: the path without extension, other characters → ``-``
age            no        age in years at that image; a pair gets its episode's first age
sex            no        ``F``/``M`` (or female/male); a pair gets the subject's first value
<finding>      no        labels, 0/1/blank, for any of the 10 Chest ImaGenome findings, named as in
                         :data:`~ehrxdiff.constants.IMAGENOME_LABELS` with spaces or underscores, or by
                         the part before ``/`` (``pleural_effusion``, ``pulmonary_edema``, …)
=============  ========  ===========================================================================

**events** — one row per event: ``subject_id``, ``time``, ``table`` (the source, e.g. ``labs``) and the
content, as free ``text`` and/or column/value pairs: every other column (but ``episode_id``, ignored: events join
a pair by subject and time) is written ``<column> <value>`` in file order when its cell is not blank. A row serializes
exactly like a MIMIC event (:func:`ehrxdiff.data.events.serialize_event`): ``labs item creatinine value 1.2 unit
mg/dL``; the text comes last (``note patient short of breath``).

What is reused, not rewritten: the pairs and the patient-level split are made by
:func:`ehrxdiff.data.cohort.pair_images`, the MIMIC path's own pairing step, called on the table's frontal images
grouped by episode (an episode plays an admission; one study per subject and time; no age filter), so ``pairing``,
``max_interval_hours``, the split and the pairing rows of the funnel are the MIMIC path's.
Events join a pair by subject with prev_time <= time < target_time (``window_end="exclusive"``, the default: an
event at the target's own time, e.g. every event of its day in day-resolution data, was taken with the film to
be predicted) or <= target_time (``"inclusive"``, the reference's rule), time-ordered with a
stable tie-break (table in order of first appearance, then file row), the most recent ``max_events`` kept,
into the same :class:`~ehrxdiff.data.events.EventResult`. The artefacts are the MIMIC path's (``cohort/pairs.parquet``,
``cohort/cohort_report.csv``, ``events/events.parquet``, ``events/event_texts.parquet``, ``events/event_report.csv``)
plus ``cohort/rejected_images.csv`` and, with labels, ``cohort/image_labels.parquet`` (the columns of
:func:`ehrxdiff.data.labels.image_labels`).

Nothing is dropped silently: a bad row (no subject, unparseable time, …) or an unusable image file (missing,
unreadable) is counted in the report and listed with its row number and reason; a missing file or required
column is one error naming the file and the column.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ehrxdiff.constants import (IMAGENOME_LABELS, MAX_EVENTS, MAX_INTERVAL_HOURS, SPLIT_SEED, TEST_FRACTION,
                                VALID_FRACTION)
from ehrxdiff.data.cohort import CHECK_IMAGES, CohortResult, check_image_files, format_table1, pair_images, table1
from ehrxdiff.data.events import (TEXT_STYLES, EventResult, budget_order_sql, budget_report_row, serialize_event,
                                  window_sql)
from ehrxdiff.data.images import ImageLoadError, read_gray
from ehrxdiff.data.sources import (ID_PATTERN, OFFSET_PATTERN, InputFileError, MissingTableError, SchemaError,
                                   connect, csv_relation_sql, read_header, reading, validate_columns)

log = logging.getLogger(__name__)

__all__ = ["OwnCohortResult", "read_table", "build_own_cohort", "extract_own_events", "serialize_own_row", "import_own_cohort",
           "IMAGE_COLUMNS", "EVENT_COLUMNS", "main"]

IMAGE_COLUMNS = ("subject_id", "time", "path", "view")
EVENT_COLUMNS = ("subject_id", "time", "table")
FRONTAL = {"PA": "PA", "AP": "AP", "FRONTAL": "AP"}    # accepted view → its ViewPosition (a MIMIC frontal one)
# a view is frontal when its first word (upper-cased; words split by space, _ or -) is PA, AP or FRONTAL: real
# tables say "AP Supine", "AP portable", "PA erect" (issue 16: 91 films of a real collection were dropped)
_FRONTAL_RULE = r"^(PA|AP|FRONTAL)(?:[ _-].*)?$"


def frontal_view(view: pd.Series) -> pd.Series:
    """The ViewPosition a frontal view pairs as (``PA``/``AP``), or missing for any other view (lateral, …)."""
    first = view.astype("string").str.strip().str.upper().str.extract(_FRONTAL_RULE, expand=False)
    return first.map(FRONTAL).astype("string")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
_FILE_REASONS = ("image file missing", "image file unreadable")


@dataclass
class OwnCohortResult(CohortResult):
    """:class:`~ehrxdiff.data.cohort.CohortResult` plus what the import rejected and the optional labels.

    ``rejected``: one row per rejected images-table row: row (0-based), path, reason, detail.
    ``labels``: image labels (study_id, dicom_id, label, relation) or None when the table has no label column.
    """

    rejected: pd.DataFrame = field(default_factory=pd.DataFrame)
    labels: pd.DataFrame | None = None

    @property
    def bad_images(self) -> pd.DataFrame:
        """The rejected rows whose image file is missing or unreadable."""
        return self.rejected[self.rejected["reason"].isin(_FILE_REASONS)].reset_index(drop=True)

    def write(self, out_dir: str | Path) -> Path:
        """``pairs.parquet``, ``cohort_report.csv``, ``rejected_images.csv`` and, with labels,
        ``image_labels.parquet`` under ``out_dir``."""
        out = super().write(out_dir)
        self.rejected.to_csv(out / "rejected_images.csv", index=False)
        if self.labels is not None:
            self.labels.to_parquet(out / "image_labels.parquet", index=False)
        return out


# ---------------------------------------------------------------------------------------------------------------
# reading and normalising

def read_table(path: str | Path, required) -> pd.DataFrame:
    """A CSV/CSV.gz/Parquet table with lower-cased column names; every CSV cell is text, blank = missing.

    A missing file raises :class:`~ehrxdiff.data.sources.MissingTableError`, a missing required column
    :class:`~ehrxdiff.data.sources.SchemaError`; both name the file (and the column). A file that cannot be read (a
    truncated gzip, a row with more or fewer fields than the header, text that is not UTF-8, a broken Parquet
    file) raises :class:`~ehrxdiff.data.sources.InputFileError` naming the file and the line. CSVs are read by DuckDB's
    strict reader (pandas pads a short row with blanks without a word).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingTableError(f"missing file: {path}")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        with reading(path):
            df = pd.read_parquet(path)
        header = [str(c).strip().lower() for c in df.columns]
    elif name.endswith((".csv", ".csv.gz")):
        header = read_header(path)
        con = connect(threads=1)
        try:
            with reading(path):
                df = con.execute(f"SELECT * FROM {csv_relation_sql(path, header)}").df()
        finally:
            con.close()
        df = df.astype("string")
    else:
        raise ValueError(f"{path}: expected .csv, .csv.gz or .parquet")
    if len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise SchemaError(f"{path}: duplicate column(s) after lower-casing: {', '.join(dup)}")
    validate_columns(path, header, required)
    df.columns = header
    df.attrs["path"] = str(path)
    return df.reset_index(drop=True)


def _text(s: pd.Series) -> pd.Series:
    """Stripped text, blank → missing."""
    t = s.astype("string").str.strip()
    return t.mask(t == "")


def _id(df: pd.DataFrame, col: str) -> pd.Series:
    """An id column as text. A float column (Parquet written from pandas with a missing value) or a text id
    written as a float (``10412715.0``) becomes its integer digits, so the two tables' ids match (issue 15:
    ``10412715.0`` matched no event); a float id with a fraction is refused, naming the file, column and row."""
    s = df[col]
    if pd.api.types.is_float_dtype(s):
        frac = s.notna() & (s != s.round())
        if frac.any():
            i = int(frac.to_numpy().argmax())
            raise InputFileError(f"{df.attrs.get('path', '?')}: column '{col}': row {i + 1}: {s.iloc[i]!r} is not an "
                                 "id (a float with a fraction)")
        return s.astype("Int64").astype("string")
    t = _text(s)
    as_id = t.str.fullmatch(ID_PATTERN, na=False)        # the MIMIC path's rule (sources.ID_SQL)
    return t.where(~as_id, t.str.split(".").str[0])


_OFFSET = re.compile(OFFSET_PATTERN)


def _time(df: pd.DataFrame, col: str) -> pd.Series:
    """ISO 8601 → naive timestamps; unparseable → NaT. A time with a UTC offset (``+02:00``, ``Z``) or a time-zone
    aware column is refused, naming the file, column and row: converting it to UTC while the other table's times
    stay local shifted every event by the offset without a word (issue 15)."""
    s = df[col]
    where = f"{df.attrs.get('path', '?')}: column '{col}'"
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        raise InputFileError(f"{where}: times carry a time zone ({s.dtype.tz}); write local times without one, the "
                             "same clock in the images and the events table")
    if not pd.api.types.is_datetime64_any_dtype(s):
        t = _text(s)
        off = t.str.contains(_OFFSET, na=False)
        if off.any():
            i = int(off.to_numpy().argmax())
            raise InputFileError(f"{where}: row {i + 1}: '{t.iloc[i]}' and {int(off.sum()) - 1} more carry a UTC "
                                 "offset; write local times without one, the same clock in the images and the "
                                 "events table")
        s = pd.to_datetime(t, errors="coerce", format="ISO8601")
    return s.astype("datetime64[us]")


def _label_columns(columns) -> dict[str, str]:
    """Column → Chest ImaGenome finding, for the columns that name one (spaces/underscores, or the part before /)."""
    names = {}
    for lab in IMAGENOME_LABELS:
        names[lab] = lab
        names.setdefault(lab.split("/")[0], lab)
    out = {}
    for c in columns:
        lab = names.get(c.replace("_", " ").strip())
        if lab is not None and lab not in out.values():
            out[c] = lab
    return out


class _Funnel:
    """Report rows (kind, what, unit, n) in the layout of the cohort report, and the rejected rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.rejected: list[pd.DataFrame] = []

    def add(self, kind: str, what: str, unit: str, n: int) -> None:
        self.rows.append({"kind": kind, "what": what, "unit": unit, "n": int(n)})

    def list_only(self, df: pd.DataFrame, hit: pd.Series, reason: str, detail) -> None:
        """List rows in ``rejected_images.csv`` that another step counts (non-frontal views: the funnel row of
        build_own_cohort)."""
        if hit.any():
            self.rejected.append(pd.DataFrame({"row": df.index[hit], "path": df.loc[hit, "path"], "reason": reason,
                                               "detail": detail[hit]}))

    def reject(self, df: pd.DataFrame, ok: pd.Series, bad: pd.Series, reason: str, detail=None) -> pd.Series:
        """Reject rows where ``ok & bad`` with ``reason`` (counted even when 0); returns the new ``ok``."""
        hit = ok & bad.fillna(False).astype(bool)
        self.add("dropped", reason, "images", int(hit.sum()))
        if hit.any():
            d = pd.DataFrame({"row": df.index[hit], "path": df.loc[hit, "path"], "reason": reason,
                              "detail": detail[hit] if detail is not None else ""})
            self.rejected.append(d)
        return ok & ~hit


# ---------------------------------------------------------------------------------------------------------------
# images → pairs

def _check_files(paths: list[Path], mode: str, workers: int) -> list[tuple[str | None, str]]:
    """(None or "missing"/"unreadable", detail) per file: full decode with :func:`read_gray`, or header only."""
    if mode == "header":
        return [(r, "" if r is None else f"{p}: {r}") for p, r in zip(paths, check_image_files(paths, workers=workers))]

    def one(p: Path) -> tuple[str | None, str]:
        try:
            read_gray(p)
            return None, ""
        except ImageLoadError as e:
            return e.reason, str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, paths))


def _images(path: Path, image_root: Path, check_images: str, workers: int, fun: _Funnel) -> tuple[pd.DataFrame, dict]:
    """The images table validated: kept rows with normalised columns, and the label columns found."""
    df = read_table(path, IMAGE_COLUMNS)
    fun.add("kept", f"rows in {path.name}", "images", len(df))
    img = pd.DataFrame({"subject_id": _id(df, "subject_id"), "time": _time(df, "time").dt.floor("s"),
                        "path": _text(df["path"]), "view": _text(df["view"]).str.upper()}, index=df.index)
    has_episode = "episode_id" in df.columns
    img["episode_id"] = _id(df, "episode_id") if has_episode else img["subject_id"]
    if "image_id" in df.columns:
        img["image_id"] = _text(df["image_id"])
        unsafe = img["image_id"].notna() & ~img["image_id"].fillna("").str.fullmatch(_SAFE_ID.pattern)
    else:
        stem = img["path"].str.replace(r"\.[A-Za-z0-9]+$", "", regex=True)
        img["image_id"] = stem.str.replace(r"[^A-Za-z0-9._-]+", "-", regex=True).str.strip("-")
        unsafe = pd.Series(False, index=img.index)

    ok = pd.Series(True, index=img.index)
    ok = fun.reject(img, ok, img["subject_id"].isna(), "no subject_id")
    ok = fun.reject(img, ok, img["time"].isna(), "time missing or not ISO 8601")
    ok = fun.reject(img, ok, img["path"].isna(), "no path")
    ok = fun.reject(img, ok, img["view"].isna(), "no view")
    if has_episode:
        ok = fun.reject(img, ok, img["episode_id"].isna(), "no episode_id")
    ok = fun.reject(img, ok, img["image_id"].isna() | unsafe,
                    "image_id empty or not file-name safe (letters, digits, . _ -)")
    ok = fun.reject(img, ok, img["image_id"].where(ok).duplicated() & img["image_id"].notna(),
                    "duplicate image_id (first row kept)")

    # the files of frontal rows (the others are counted as non-frontal by the funnel, unread, and listed here)
    img["view_position"] = frontal_view(img["view"])
    frontal = ok & img["view_position"].notna()
    fun.list_only(img, ok & ~frontal & img["view"].notna(), "non-frontal view (counted in the cohort funnel)",
                  "view " + img["view"].fillna(""))
    status = pd.Series(None, index=img.index, dtype=object)
    detail = pd.Series("", index=img.index, dtype=object)
    if check_images != "none" and frontal.any():
        idx = img.index[frontal]
        res = _check_files([image_root / p for p in img.loc[idx, "path"]], check_images, workers)
        status[idx] = [r for r, _ in res]
        detail[idx] = [d for _, d in res]
    ok = fun.reject(img, ok, status == "missing", "image file missing", detail)
    ok = fun.reject(img, ok, status == "unreadable", "image file unreadable", detail)

    labels = _label_columns(df.columns)
    fun.add("kept", "label columns: " + (", ".join(labels.values()) or "none"), "columns", len(labels))
    for col, lab in labels.items():
        v = _text(df[col])
        num = pd.to_numeric(v, errors="coerce")
        bad = ok & v.notna() & ~num.isin([0, 1])
        fun.add("dropped", f"label '{lab}' not 0/1 (kept as not mentioned)", "label values", int(bad.sum()))
        img[f"label:{lab}"] = num.where(num.isin([0, 1]))
    if "age" in df.columns:
        age = pd.to_numeric(_text(df["age"]), errors="coerce")
        fun.add("dropped", "age not a number (kept as unknown)", "values",
                int((ok & _text(df["age"]).notna() & age.isna()).sum()))
        img["age"] = age
    if "sex" in df.columns:
        raw = _text(df["sex"]).str.upper()
        sex = raw.map({"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"})
        fun.add("dropped", "sex not F/M (kept as unknown)", "values", int((ok & raw.notna() & sex.isna()).sum()))
        img["sex"] = sex
    return img[ok].sort_values(["subject_id", "time", "image_id"], kind="mergesort"), labels


def _check_episodes(path: Path, img: pd.DataFrame) -> None:
    spans = img.groupby(["subject_id", "episode_id"])["time"].agg(["min", "max"]).reset_index()
    spans = spans.sort_values(["subject_id", "min", "max"], kind="mergesort")
    prev_max = spans.groupby("subject_id")["max"].shift()
    clash = spans[spans["min"] <= prev_max]
    if len(clash):
        r = clash.iloc[0]
        raise ValueError(f"{path}: subject {r['subject_id']}: episode {r['episode_id']} starts at {r['min']} before an "
                         f"earlier episode of the subject ends; episodes of one subject must not overlap in time")


def _first(img: pd.DataFrame, keys: list[str], col: str) -> pd.Series:
    return img.dropna(subset=[col]).groupby(keys)[col].first()


def build_own_cohort(images: str | Path, *, image_root: str | Path | None = None, pairing: str = "all_earlier",
                     max_interval_hours: float = MAX_INTERVAL_HOURS, split_seed: int = SPLIT_SEED,
                     test_fraction: float = TEST_FRACTION, valid_fraction: float = VALID_FRACTION,
                     split_file: str | Path | None = None, check_images: str = "decode", workers: int | None = None,
                     threads: int | None = None) -> OwnCohortResult:
    """Pairs of an images table (module docstring for the format) by :func:`ehrxdiff.data.cohort.pair_images`.

    ``check_images``: "decode" reads every frontal image in full with :func:`ehrxdiff.data.images.read_gray` (finds
    truncated files too), "header" only parses headers (fast, as the MIMIC path), "none" trusts the table.
    The output's ``prev_path``/``target_path`` are the table's paths (relative to ``image_root``, or absolute),
    ``hadm_id`` the episode (the subject when there is no episode_id), ``age``/``gender`` from age/sex or missing.
    """
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    path = Path(images)
    root = Path(image_root) if image_root is not None else path.parent
    fun = _Funnel()
    img, labels = _images(path, root, check_images, workers or min(8, os.cpu_count() or 1), fun)
    _check_episodes(path, img[img["view_position"].notna()])

    subjects = sorted(img["subject_id"].unique())
    img["subject_code"] = img["subject_id"].map({s: i + 1 for i, s in enumerate(subjects)}).astype("int64")
    img["hadm_code"] = img.groupby(["subject_id", "episode_id"], sort=True).ngroup().astype("int64") + 1
    img["study_code"] = img.groupby(["subject_id", "time"], sort=True).ngroup().astype("int64") + 1

    # the frontal images of each episode are its links (episodes do not overlap: checked above); times to the
    # second, as the MIMIC path reads StudyDate + StudyTime; study order = dense rank of the study's time
    frontal = img[img["view_position"].notna()]
    fun.add("dropped", "non-frontal view (lateral, other or empty ViewPosition)", "images", len(img) - len(frontal))
    fun.add("kept", "frontal images", "images", len(frontal))
    t = frontal["time"].dt.floor("s")
    linked = pd.DataFrame({"subject_id": frontal["subject_code"], "hadm_id": frontal["hadm_code"],
                           "age": pd.Series(float("nan"), index=frontal.index), "gender": None,
                           "dicom_id": frontal["image_id"].astype(str), "study_id": frontal["study_code"],
                           "image_time": t,
                           "study_order": t.groupby(frontal["subject_code"]).rank(method="dense").astype("int64")})
    by_id = img.set_index("image_id")
    con = connect(threads=threads)
    con.register("linked_frame", linked)
    con.execute("CREATE TEMP TABLE linked AS SELECT * FROM linked_frame")
    pairs = pair_images(con, "linked", fun, pairing=pairing, max_interval_hours=max_interval_hours,
                        split_seed=split_seed, test_fraction=test_fraction, valid_fraction=valid_fraction,
                        split_file=split_file,
                        paths=lambda q, side: q[f"{side}_dicom_id"].map(by_id["path"]).astype(str).tolist())
    con.close()

    # back from the integer codes to the table's ids, and age and sex
    pairs["subject_id"] = pairs["prev_dicom_id"].map(by_id["subject_id"]).astype(str)
    pairs["hadm_id"] = pairs["prev_dicom_id"].map(by_id["episode_id"]).astype(str)
    episode = list(zip(pairs["subject_id"], pairs["hadm_id"]))
    age = _first(img, ["subject_id", "episode_id"], "age") if "age" in img else pd.Series(dtype=float)
    pairs["age"] = pd.Series([age.get(k, float("nan")) for k in episode], index=pairs.index, dtype="float64")
    sex = _first(img, ["subject_id"], "sex") if "sex" in img else pd.Series(dtype=object)
    pairs["gender"] = pairs["subject_id"].map(sex).astype(object)

    report = pd.DataFrame(fun.rows)
    report.insert(0, "step", range(1, len(report) + 1))
    rejected = (pd.concat(fun.rejected, ignore_index=True).sort_values("row", kind="mergesort").reset_index(drop=True)
                if fun.rejected else pd.DataFrame(columns=["row", "path", "reason", "detail"]))
    if rejected.size:
        log.warning("%s: %d row(s) rejected: %s", path, len(rejected), rejected["reason"].value_counts().to_dict())
    lab = None
    if labels:
        long = img.melt(id_vars=["study_code", "image_id"], value_vars=[f"label:{v}" for v in labels.values()],
                        var_name="label", value_name="relation").dropna(subset=["relation"])
        lab = pd.DataFrame({"study_id": long["study_code"].to_numpy(), "dicom_id": long["image_id"].to_numpy(),
                            "label": long["label"].str.removeprefix("label:").to_numpy(),
                            "relation": long["relation"].astype(int).to_numpy()})
        lab = lab.sort_values(["study_id", "dicom_id", "label"], kind="mergesort").reset_index(drop=True)
    return OwnCohortResult(pairs=pairs, report=report, rejected=rejected, labels=lab)


# ---------------------------------------------------------------------------------------------------------------
# events → S_event per pair

def serialize_own_row(table: str, values: dict, text: str | None = None, *, text_style: str = "plain") -> str:
    """One row of an own events table as event text: its columns in the given (file) order, then the free ``text``
    (a nameless column writes its value alone), by the MIMIC path's serializer. The what-if writes added events
    with it too (:meth:`ehrxdiff.simulation.whatif.EventList.add`), so they read exactly like extracted rows."""
    d = dict(values)
    if text is not None:
        d[""] = text
    return serialize_event(table, d, text_style=text_style)


def extract_own_events(events: str | Path, pairs: pd.DataFrame, *, max_events: int = MAX_EVENTS,
                       text_style: str = "plain", threads: int | None = None,
                       window_end: str = "exclusive", budget_last: tuple[str, ...] = ()) -> EventResult:
    """S_event of every pair from an events table (module docstring), as :func:`ehrxdiff.data.events.extract_events`
    returns it for MIMIC: the same serializer, window rule, ordering, ``max_events`` cut (``budget_last``: tables
    that fill it after all others) and report rows."""
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {text_style!r}")
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    path = Path(events)
    df = read_table(path, EVENT_COLUMNS)
    value_cols = [c for c in df.columns if c not in (*EVENT_COLUMNS, "text", "episode_id")]
    if "text" not in df.columns and not value_cols:
        raise SchemaError(f"{path}: missing column 'text' (and no column/value columns; header has: "
                          f"{', '.join(df.columns)})")
    report: list[dict] = []

    def add(table: str, what: str, n) -> None:
        report.append({"table": table, "what": what, "n": n})

    ev = pd.DataFrame({"subject_id": _id(df, "subject_id"), "t": _time(df, "time"), "table": _text(df["table"]),
                       "row_ord": df.index.to_numpy()}, index=df.index)
    text = _text(df["text"]) if "text" in df.columns else pd.Series(pd.NA, index=df.index, dtype="string")
    content = text.notna()
    for c in value_cols:
        content |= _text(df[c]).notna() if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]) else df[c].notna()
    add("all", "rows in " + path.name, len(df))
    ok = pd.Series(True, index=df.index)
    for what, bad in (("no subject_id", ev["subject_id"].isna()), ("time missing or not ISO 8601", ev["t"].isna()),
                      ("no table", ev["table"].isna()), ("no text and no column value", ~content)):
        add("all", f"dropped: {what}", int((ok & bad).sum()))
        ok &= ~bad
    # a row repeated (same subject, time, table and content) is one event, as on the MIMIC path
    key = pd.concat([ev[["subject_id", "t", "table"]], text.rename("_text"),
                     *(df[c].astype("string").rename(f"_v{i}") for i, c in enumerate(value_cols))], axis=1)
    dup = ok & key.where(ok).duplicated()
    add("all", "dropped: duplicate rows (same subject, time, table and values; first kept)", int(dup.sum()))
    ok &= ~dup
    ev = ev[ok]
    tables = list(pd.unique(ev["table"]))
    ev["table_ord"] = ev["table"].map({t: i for i, t in enumerate(tables)}).astype("int32")
    # the profile's event_budget_last names MIMIC tables (the demo's chartevents); an own events file has its own
    # table names, so the ones it lacks are counted in the report and left out, not an error
    present = [t for t in (budget_last or ()) if t in tables]
    absent = [t for t in (budget_last or ()) if t not in tables]
    add("all", f"event_budget_last tables not in {path.name} (ignored): {', '.join(absent) or 'none'}", len(absent))
    last_first = budget_order_sql(tables, present)

    win = pairs[["pair_key", "subject_id", "prev_time", "target_time"]].copy()
    win["subject_id"] = win["subject_id"].astype(str)
    for c in ("prev_time", "target_time"):
        win[c] = pd.to_datetime(win[c]).astype("datetime64[us]")
    con = connect(threads=threads)
    con.register("ev_df", ev[["subject_id", "t", "table_ord", "row_ord"]].astype({"subject_id": str}))
    con.register("win_df", win)
    # the window join and the most-recent cut of events.extract_events, on (subject, time) instead of hadm_id
    con.execute(f"""CREATE TEMP TABLE ev AS SELECT w.pair_key, e.t, w.prev_time, e.table_ord, e.row_ord
        FROM ev_df e JOIN win_df w ON e.subject_id = w.subject_id AND {window_sql("e.t", "w", window_end)}""")
    in_win = con.execute("SELECT table_ord, count(*), count(DISTINCT row_ord) FROM ev GROUP BY 1").fetchall()
    per_table = {int(t): (int(n), int(u)) for t, n, u in in_win}
    for i, t in enumerate(tables):
        add(t, "events in pair windows", per_table.get(i, (0, 0))[0])
    add("all", "events outside every pair window (info)", len(ev) - sum(u for _, u in per_table.values()))
    kept = con.execute(f"""SELECT pair_key, t, prev_time, table_ord, row_ord FROM (
        SELECT *, row_number() OVER (PARTITION BY pair_key ORDER BY {last_first}t DESC, table_ord DESC, row_ord DESC)
          AS rn
        FROM ev) WHERE rn <= {int(max_events)} ORDER BY pair_key, t, table_ord, row_ord""").df()
    n_all = con.execute("SELECT count(*) FROM ev").fetchone()[0]
    con.close()
    add("all", budget_report_row(max_events, present), int(n_all - len(kept)))

    rows = sorted(set(kept["row_ord"]))
    values = df.loc[rows, value_cols].itertuples(index=False) if value_cols else [()] * len(rows)
    row_text = {}
    for r, table, vals in zip(rows, ev.loc[rows, "table"], values):
        row_text[r] = serialize_own_row(table, {k: (None if v is pd.NA else v) for k, v in zip(value_cols, vals)},
                                        text[r] if pd.notna(text.get(r)) else None, text_style=text_style)
    texts = sorted(set(row_text.values()))
    text_id = {t: i for i, t in enumerate(texts)}
    out = pd.DataFrame({
        "pair_key": kept["pair_key"].astype(str),
        "position": kept.groupby("pair_key").cumcount().astype("int32"),
        "text_id": kept["row_ord"].map(lambda r: text_id[row_text[r]]).astype("int32"),
        "hours": ((kept["t"] - kept["prev_time"]).dt.total_seconds() / 3600.0).astype("float32"),
    })
    out["table"] = pd.Categorical.from_codes(kept["table_ord"].astype("int16"), categories=tables)
    out["pair_key"] = out["pair_key"].astype("category")
    n_pairs_with = out["pair_key"].nunique()
    add("all", "dropped: pairs with no events", int(len(set(pairs["pair_key"])) - n_pairs_with))
    add("all", "pairs kept", int(n_pairs_with))
    add("all", "events kept", int(len(out)))
    add("all", "unique event texts", int(len(texts)))
    return EventResult(events=out, texts=texts, report=pd.DataFrame(report, columns=["table", "what", "n"]),
                       text_style=text_style)


def import_own_cohort(images: str | Path, events: str | Path, run_dir: str | Path, *, max_events: int = MAX_EVENTS,
                      text_style: str = "plain", window_end: str = "exclusive", budget_last: tuple[str, ...] = (),
                      **cohort_kwargs) -> tuple[OwnCohortResult, EventResult]:
    """Both steps, written where the study reads them: ``run_dir/cohort/`` and ``run_dir/events/``.

    ``cohort_kwargs`` go to :func:`build_own_cohort`. Events are extracted for every pair; the study keeps the
    pairs with at least one event and re-splits them (``study.build_events``), as on MIMIC.
    """
    cohort = build_own_cohort(images, **cohort_kwargs)
    cohort.write(Path(run_dir) / "cohort")
    ev = extract_own_events(events, cohort.pairs, max_events=max_events, text_style=text_style,
                            threads=cohort_kwargs.get("threads"), window_end=window_end, budget_last=budget_last)
    ev.write(Path(run_dir) / "events")
    return cohort, ev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.data.own_cohort", description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="images table (.csv, .csv.gz or .parquet)")
    ap.add_argument("--events", required=True, help="events table (.csv, .csv.gz or .parquet)")
    ap.add_argument("--out", required=True, help="run folder: writes cohort/ and events/ under it")
    ap.add_argument("--image-root", default=None, help="folder the relative image paths start from "
                                                       "(default: the images table's folder)")
    ap.add_argument("--pairing", choices=["all_earlier", "consecutive"], default="all_earlier")
    ap.add_argument("--max-interval-hours", type=float, default=MAX_INTERVAL_HOURS)
    ap.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    ap.add_argument("--valid-fraction", type=float, default=VALID_FRACTION)
    ap.add_argument("--max-events", type=int, default=MAX_EVENTS)
    ap.add_argument("--text-style", choices=list(TEXT_STYLES), default="plain")
    ap.add_argument("--check-images", choices=list(CHECK_IMAGES), default="decode")
    ap.add_argument("--window-end", choices=["exclusive", "inclusive"], default="exclusive",
                    help="events strictly before the target image (default) or also at its time")
    a = ap.parse_args(argv)
    try:
        cohort, ev = import_own_cohort(a.images, a.events, a.out, image_root=a.image_root, pairing=a.pairing,
                                       max_interval_hours=a.max_interval_hours, split_seed=a.split_seed,
                                       test_fraction=a.test_fraction, valid_fraction=a.valid_fraction,
                                       max_events=a.max_events, window_end=a.window_end,
                                       text_style=a.text_style, check_images=a.check_images)
    except (SchemaError, MissingTableError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(cohort.report.to_string(index=False))
    if len(cohort.rejected):
        print(cohort.rejected.to_string(index=False))
    print(format_table1(table1(cohort.pairs)).to_string())
    print(ev.report[ev.report["table"] == "all"].to_string(index=False))
    print(f"wrote {Path(a.out) / 'cohort'} ({len(cohort.pairs)} pairs) and {Path(a.out) / 'events'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
