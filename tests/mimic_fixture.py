"""Hand-built tiny MIMIC-shaped releases for tests: the real headers (ehrxdiff.data.schemas.COLUMNS, in the
release's order and case), gzip'd CSV, NULL = empty field, and tiny real JPEG files on disk.

Tests describe only the rows they need (as dicts keyed by column); every other column is left empty.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ehrxdiff.data.schemas import COLUMNS, cxr_image_relpath

CXR_METADATA = "mimic-cxr-2.0.0-metadata"


def write_csv(path: Path, columns, rows: list[dict], *, gz: bool = True) -> Path:
    """Write ``rows`` under the header ``columns`` (keys matched case-insensitively); returns the path."""
    path = Path(str(path) + (".csv.gz" if gz else ".csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    lower = [c.lower() for c in columns]
    for row in rows:
        row = {k.lower(): v for k, v in row.items()}
        unknown = set(row) - set(lower)
        assert not unknown, f"fixture row has columns not in the header: {unknown}"
        w.writerow(["" if row.get(c) is None else row.get(c) for c in lower])
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_mimic_table(mimic_iv: Path, stem: str, rows: list[dict], *, drop_columns=(), gz: bool = True) -> Path:
    """``mimic_iv/<stem>.csv.gz`` with the release header of ``stem`` (minus ``drop_columns``)."""
    cols = [c for c in COLUMNS[stem] if c not in drop_columns]
    return write_csv(Path(mimic_iv) / stem, cols, _without(rows, drop_columns), gz=gz)


def write_metadata(mimic_cxr: Path, rows: list[dict], *, drop_columns=()) -> Path:
    cols = [c for c in COLUMNS["cxr/metadata"] if c not in drop_columns]
    return write_csv(Path(mimic_cxr) / CXR_METADATA, cols, _without(rows, drop_columns))


def _without(rows: list[dict], drop_columns) -> list[dict]:
    drop = {c.lower() for c in drop_columns}
    return [{k: v for k, v in r.items() if k.lower() not in drop} for r in rows]


def write_jpeg(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, np.uint8), mode="L").save(path, format="JPEG")


def image_row(subject_id: int, study_id: int, dicom_id: str, when: str, view: str = "AP") -> dict:
    """A metadata row; ``when`` = "YYYY-MM-DD HH:MM:SS", written as StudyDate + float StudyTime without
    the leading zero, exactly as the release does (``80556.875``)."""
    date, time = when.split(" ")
    hhmmss = int(time.replace(":", ""))
    return {"dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id, "ViewPosition": view,
            "Rows": 8, "Columns": 8, "StudyDate": date.replace("-", ""), "StudyTime": f"{hhmmss}.125"}


def build_release(root: Path, *, patients: list[dict], admissions: list[dict], images: list[dict],
                  skip_files: tuple[str, ...] = (), tables: dict[str, list[dict]] | None = None) -> tuple[Path, Path]:
    """Write a tiny release under ``root``; returns (mimic_iv_dir, mimic_cxr_dir).

    ``images``: metadata rows (see :func:`image_row`); a JPEG is written for each unless its dicom_id
    is in ``skip_files``. ``tables``: extra MIMIC-IV tables by stem (e.g. "icu/chartevents").
    """
    mimic_iv, mimic_cxr = Path(root) / "mimiciv" / "2.2", Path(root) / "mimic-cxr-jpg" / "2.0.0"
    write_mimic_table(mimic_iv, "hosp/patients", patients)
    write_mimic_table(mimic_iv, "hosp/admissions", admissions)
    for stem, rows in (tables or {}).items():
        write_mimic_table(mimic_iv, stem, rows)
    write_metadata(mimic_cxr, images)
    for r in images:
        if r["dicom_id"] not in skip_files:
            write_jpeg(mimic_cxr / cxr_image_relpath(r["subject_id"], r["study_id"], r["dicom_id"]))
    return mimic_iv, mimic_cxr


def patient(subject_id: int, age: int = 60, anchor_year: int = 2150, gender: str = "M") -> dict:
    return {"subject_id": subject_id, "gender": gender, "anchor_age": age, "anchor_year": anchor_year,
            "anchor_year_group": "2011 - 2013"}


def admission(subject_id: int, hadm_id: int, admit: str, disch: str) -> dict:
    return {"subject_id": subject_id, "hadm_id": hadm_id, "admittime": admit, "dischtime": disch,
            "admission_type": "EW EMER.", "admission_location": "EMERGENCY ROOM", "insurance": "Other",
            "language": "ENGLISH", "race": "WHITE", "hospital_expire_flag": 0}


def cxr_side_for(mimic_iv: Path, root: Path, *, seed: int = 0, size: int = 32) -> Path:
    """A made-up MIMIC-CXR-JPG side for the admissions of a real MIMIC-IV table (the open demo has no images):
    per admission frontal films 3, 15, 30 and 50 h after admittime while before dischtime (AP/PA mixed, the
    15 h study with a lateral as well), plus the traps of real linkage: a film in the ED 2 h before admittime and
    an outpatient film 10 days after discharge. Small smooth-noise JPEGs; returns the MIMIC-CXR root."""
    import pandas as pd
    adm = pd.read_csv(Path(mimic_iv) / "hosp" / "admissions.csv.gz", usecols=["subject_id", "hadm_id", "admittime",
                                                                            "dischtime"], parse_dates=["admittime", "dischtime"])
    adm = adm.sort_values(["subject_id", "admittime", "hadm_id"]).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    cxr = Path(root) / "mimic-cxr-jpg" / "2.0.0"
    rows, study = [], 50_000_000

    def film(subject, when, view, new_study=True):
        nonlocal study
        study += int(new_study)
        dicom = f"d{len(rows):06d}"
        rows.append(image_row(int(subject), study, dicom, pd.Timestamp(when).strftime("%Y-%m-%d %H:%M:%S"), view))
        img = rng.normal(128, 40, (size // 4, size // 4))
        img = np.kron(img, np.ones((4, 4)))
        path = cxr / cxr_image_relpath(int(subject), study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path, format="JPEG")

    for a in adm.itertuples(index=False):
        film(a.subject_id, a.admittime - pd.Timedelta(hours=2), "AP")                      # ED, before admission
        for k, h in enumerate((3, 15, 30, 50)):
            when = a.admittime + pd.Timedelta(hours=h, minutes=int(rng.integers(0, 50)))
            if when < a.dischtime:
                film(a.subject_id, when, "PA" if k % 2 else "AP")
                if h == 15:
                    film(a.subject_id, when, "LATERAL", new_study=False)
        film(a.subject_id, a.dischtime + pd.Timedelta(days=10), "PA")                      # outpatient
    write_metadata(cxr, rows)
    return cxr
