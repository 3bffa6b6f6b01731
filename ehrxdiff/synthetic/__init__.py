"""The synthetic MIMIC world: MIMIC-IV v2.2, MIMIC-CXR-JPG v2.0.0 and Chest ImaGenome v1.0.0 look-alikes.

Same files, layouts, column names, column order and value formats as the credentialed releases
(shared/docs/mimic-schemas.md, :mod:`ehrxdiff.data.schemas`), generated with known patient dynamics
(:mod:`.dynamics`) and rendered radiographs (:mod:`.render`), so that the study runs out of the box and its
numbers can be checked against ground truth. ``ground_truth/`` is the sidecar real data never has; nothing in
the extraction path reads it.

Shell: ``python -m ehrxdiff.synthetic --out DIR --n-patients N --seed S [--image-size PX]``.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .dynamics import DEVICES
from .items import D_ITEMS, D_LABITEMS
from .render import patient_anatomy, random_pose, render_frontal, render_lateral
from .reports import chexpert_row, read_study, relation_rows
from .world import patient
from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.schemas import (COLUMNS, CXR_FILES, IMAGENOME_RELATIONS, IMAGENOME_SUBDIR, MIMIC_CXR_SUBDIR,
                                   MIMIC_IV_SUBDIR, cxr_image_relpath)

GENERATOR_VERSION = 1
GZ = {"method": "gzip", "compresslevel": 1, "mtime": 0}   # mtime 0: same seed ⇒ byte-identical files


class WorldConfigError(ValueError):
    """A bad generator parameter, reported as one line."""


def _check(out_dir: Path, n_patients: int, image_size: int, chart_sets_per_hour: int) -> None:
    if not isinstance(n_patients, int) or n_patients < 1:
        raise WorldConfigError(f"n_patients must be a positive integer, got {n_patients!r}")
    if not isinstance(image_size, int) or not 16 <= image_size <= 2048:
        raise WorldConfigError(f"image_size must be an integer in [16, 2048], got {image_size!r}")
    if not isinstance(chart_sets_per_hour, int) or chart_sets_per_hour < 1:
        raise WorldConfigError(f"chart_sets_per_hour must be a positive integer, got {chart_sets_per_hour!r}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorldConfigError(f"output directory {out_dir} is not writable ({e.strerror})") from None


def _one_patient(args) -> dict:
    """Worker: simulate, read and render one patient. Returns rows only (pixels go straight to disk)."""
    seed, index, subject_id, image_size, cxr_root, chart_sets, render = args
    rec = patient(seed, index, subject_id, chart_sets)
    rng = np.random.default_rng([seed, index, 1])
    anat = patient_anatomy(rng, rec.images[0]["sex"] if rec.images else "M", rec.images[0]["age"] if rec.images else 60,
                           image_size)
    meta, gt, rel, chex, prev_pos = [], [], [], [], {}
    studies: dict[int, list[dict]] = {}
    for im in rec.images:
        studies.setdefault(im["study_id"], []).append(im)
    for study_id, ims in studies.items():
        first = ims[0]
        said = read_study(first["severity"], prev_pos.get(first["hadm_id"], {}), rng)
        prev_pos[first["hadm_id"]] = said
        rel += relation_rows(study_id, [im["dicom_id"] for im in ims], said, first["devices"], rng)
        chex.append(chexpert_row(subject_id, study_id, said, first["devices"]))
        views = {im["view"] for im in ims}
        proc = "CHEST (PORTABLE AP)" if "AP" in views else "CHEST (PA AND LAT)"
        for im in ims:
            pose = random_pose(rng, im["ap"])
            t = pd.Timestamp(im["time"], unit="s")
            lateral = im["view"] == "LATERAL"
            meta.append((im["dicom_id"], subject_id, study_id, proc, im["view"], image_size, image_size,
                         int(t.strftime("%Y%m%d")), float(t.strftime("%H%M%S")) + round(rng.uniform(0, 0.999), 3),
                         proc, {"PA": "postero-anterior", "AP": "antero-posterior"}.get(im["view"], "lateral"),
                         "Recumbent" if im["ap"] else "Erect"))
            if render:
                img = (render_lateral(anat, pose, image_size, rng) if lateral else
                       render_frontal(im["severity"], im["devices"], anat, pose, image_size, rng))
                path = Path(cxr_root) / cxr_image_relpath(subject_id, study_id, im["dicom_id"])
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(path, quality=95)
            gt.append({"dicom_id": im["dicom_id"], "subject_id": subject_id, "study_id": study_id,
                       "hadm_id": im["hadm_id"], "stay_id": im["stay_id"], "time": t, "view": im["view"],
                       "is_frontal": not lateral, "sex": im["sex"], "age": float(im["age"]), **im["severity"],
                       **{d: bool(im["devices"].get(d)) for d in DEVICES},
                       **{f"pose_{k}": v for k, v in pose.items()},
                       **{f"reported_{k}": said.get(k, np.nan) for k in IMAGENOME_LABELS}})
    return {"rows": rec.rows, "meta": meta, "gt": gt, "rel": rel, "chex": chex, "hourly": rec.hourly}


TIME_COLUMNS = {"admittime", "dischtime", "deathtime", "edregtime", "edouttime", "charttime", "storetime",
                "starttime", "stoptime", "endtime", "intime", "outtime", "chartdate", "storedate"}


def _column_kinds(df: pd.DataFrame) -> dict[str, str]:
    """How each object column is written: "int" (nullable Int64, no ``.0``), "float", or as is ("")."""
    kinds = {}
    for col in df.columns:
        s = df[col]
        if col in TIME_COLUMNS or col == "dod" or s.dtype != object:
            continue
        nn = s.dropna()
        if len(nn) and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in nn.iloc[:50]):
            kinds[col] = "int"
        elif len(nn) and all(isinstance(x, (float, np.floating)) for x in nn.iloc[:50]):
            kinds[col] = "float"
        else:
            kinds[col] = ""
    return kinds


def _frame(table: str, rows: list[tuple], kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows → typed frame: times from epoch seconds, integers as nullable Int64 (written without ``.0``).

    ``kinds`` (from :func:`_column_kinds` on the first chunk) keeps every chunk of a streamed table typed alike."""
    df = pd.DataFrame.from_records(rows, columns=list(COLUMNS[table]))
    kinds = _column_kinds(df) if kinds is None else kinds
    for col in df.columns:
        s = df[col]
        if col in TIME_COLUMNS:
            sec = pd.to_numeric(s)
            ms = (sec * 1000).round() % 1000
            df[col] = pd.to_datetime(sec.round(3) // 1, unit="s")
            if (ms > 0).any():  # a few .mmm storetimes as in the v2.2 demo; whole seconds elsewhere
                text = df[col].dt.strftime("%Y-%m-%d %H:%M:%S")
                frac = ms.fillna(0).astype(int).map(lambda m: f".{m:03d}" if m else "")
                df[col] = text.where(sec.isna(), text + frac)
        elif col == "dod":
            df[col] = pd.to_datetime(pd.to_numeric(s), unit="s").dt.strftime("%Y-%m-%d")
        elif kinds.get(col) == "int":
            df[col] = s.astype("Int64")
        elif kinds.get(col) == "float":
            df[col] = s.astype("float64")
    return df


# Tables written chunk by chunk as the patients come in (chartevents: ≥ 10 M rows in benchmark worlds), so a
# big world never holds them whole; the others are small and written at the end.
STREAMED_TABLES = ("icu/chartevents",)
CHUNK_ROWS = 250_000


class _ChunkedCsv:
    """One csv.gz written in chunks of whole patients; byte-identical to writing the table in one go."""

    def __init__(self, path: Path, table: str, chunk_rows: int = CHUNK_ROWS) -> None:
        self.table, self.chunk_rows, self.buf, self.kinds, self.n, self.started = table, chunk_rows, [], None, 0, False
        self._gz = gzip.GzipFile(filename=str(path), mode="wb", compresslevel=GZ["compresslevel"], mtime=GZ["mtime"])
        self._fh = io.TextIOWrapper(self._gz, encoding="utf-8", newline="")

    def add(self, rows: list[tuple]) -> None:
        self.buf.extend(rows)
        if len(self.buf) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buf and self.started:
            return
        if self.kinds is None and self.buf:  # typed by the first chunk, as the one-go writer types the table
            self.kinds = _column_kinds(pd.DataFrame.from_records(self.buf, columns=list(COLUMNS[self.table])))
        _frame(self.table, self.buf, self.kinds).to_csv(self._fh, index=False, header=not self.started)
        self.started, self.n, self.buf = True, self.n + len(self.buf), []

    def close(self) -> None:
        self.flush()
        self._fh.close()


def generate_world(out_dir: str | Path = "data/synthetic", n_patients: int = 1000, seed: int = 0,
                   image_size: int = 256, chart_sets_per_hour: int = 1, workers: int | None = None,
                   overwrite: bool = False, render: bool = True, progress: bool = True) -> Path:
    """Write the three releases under ``out_dir`` (a PhysioNet-like tree) and the ground-truth sidecar.

    Deterministic per ``seed`` (byte-identical files). Reuses an existing world generated with the same
    parameters unless ``overwrite``. ``chart_sets_per_hour`` multiplies the ICU vital-sign rows (benchmarks
    use it to write ≥ 10 M chartevents rows); ``render=False`` skips the JPEGs (benchmarks of the tables).
    """
    out = Path(out_dir)
    _check(out, n_patients, image_size, chart_sets_per_hour)
    params = {"version": GENERATOR_VERSION, "n_patients": n_patients, "seed": seed, "image_size": image_size,
              "chart_sets_per_hour": chart_sets_per_hour, "render": render}
    stamp = out / "ground_truth" / "world.json"
    if stamp.exists() and not overwrite and json.loads(stamp.read_text()) == params:
        return out
    iv, cxr, ig = out / MIMIC_IV_SUBDIR, out / MIMIC_CXR_SUBDIR, out / IMAGENOME_SUBDIR
    rng = np.random.default_rng(seed)
    subjects = np.sort(rng.choice(np.arange(10000000, 20000000), n_patients, replace=False))
    jobs = [(seed, i, int(s), image_size, str(cxr), chart_sets_per_hour, render) for i, s in enumerate(subjects)]
    workers = workers or min(os.cpu_count() or 1, 4)
    for d in (iv / "hosp", iv / "icu", cxr):
        d.mkdir(parents=True, exist_ok=True)
    streamed = {t: _ChunkedCsv(iv / f"{t}.csv.gz", t) for t in STREAMED_TABLES}
    tables: dict[str, list] = {}
    results: list[dict] = []   # per patient, everything but the streamed tables
    bar = tqdm(total=len(jobs), disable=not progress, desc="synthetic patients")
    step = 32 * workers  # patients in flight: bounds the rows waiting in the pool while a chunk is written
    with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
        for lo in range(0, len(jobs), step):
            for r in pool.imap(_one_patient, jobs[lo:lo + step], chunksize=4):
                for k, v in r.pop("rows").items():
                    if k in streamed:
                        streamed[k].add(v)
                    else:
                        tables.setdefault(k, []).extend(v)
                results.append(r)
                bar.update()
    bar.close()
    for w in streamed.values():
        w.close()
    tables["hosp/d_labitems"] = D_LABITEMS
    tables["icu/d_items"] = D_ITEMS
    ids = {"hosp/labevents": "labevent_id", "hosp/microbiologyevents": "microevent_id"}
    for table in COLUMNS:
        if not table.startswith(("hosp/", "icu/")) or table in streamed:
            continue
        df = _frame(table, tables.pop(table, []))
        if table in ids:
            df[ids[table]] = np.arange(1, len(df) + 1)
        df.to_csv(iv / f"{table}.csv.gz", index=False, compression=GZ)
        del df
    meta = pd.DataFrame.from_records([m for r in results for m in r["meta"]], columns=list(COLUMNS["cxr/metadata"]))
    meta = meta.sort_values(["subject_id", "study_id"], kind="stable")
    meta.to_csv(cxr / CXR_FILES["cxr/metadata"], index=False, compression=GZ)
    split_of = dict(zip(subjects, rng.choice(["train", "validate", "test"], n_patients, p=[0.97, 0.01, 0.02])))
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split=meta["subject_id"].map(split_of))
    split.to_csv(cxr / CXR_FILES["cxr/split"], index=False, compression=GZ)
    chex = pd.DataFrame([c for r in results for c in r["chex"]], columns=list(COLUMNS["cxr/chexpert"]))
    chex.sort_values(["subject_id", "study_id"]).to_csv(cxr / CXR_FILES["cxr/chexpert"], index=False, compression=GZ)
    rel_path = ig / IMAGENOME_RELATIONS
    rel_path.parent.mkdir(parents=True, exist_ok=True)
    rel = pd.DataFrame.from_records([x for r in results for x in r["rel"]],
                                    columns=list(COLUMNS["imagenome/attribute_relations"]))
    rel.to_csv(rel_path, sep="\t", index=False)
    gtd = out / "ground_truth"
    gtd.mkdir(exist_ok=True)
    pd.DataFrame([g for r in results for g in r["gt"]]).to_parquet(gtd / "images.parquet", index=False)
    course = pd.DataFrame([h for r in results for h in r["hourly"]])
    course["time"] = pd.to_datetime(course["time"], unit="s")
    course.to_parquet(gtd / "course.parquet", index=False)
    (gtd / "README.md").write_text(GROUND_TRUTH_README)
    stamp.write_text(json.dumps(params))
    return out


GROUND_TRUTH_README = """# Ground truth of the synthetic world (never present in real data)

- `images.parquet`: one row per image: ids, the admission it was really taken in (`hadm_id`, null for
  outpatient films), time, view, `is_frontal`, sex, age, the latent severity in [0, 1] of each of the 10
  Chest ImaGenome findings (columns named by label), devices, acquisition pose, and `reported_<label>` (what the
  synthetic radiologist wrote: 1, 0, or NaN when not mentioned).
- `course.parquet`: the hourly course of every admission (severities, devices, fluid balance, diuretic
  compartment, antibiotics on board, and `action_*` columns for what the clinician did that hour).
- `world.json`: the generator parameters. Nothing in the extraction path reads this folder.
"""
