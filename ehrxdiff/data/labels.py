"""Chest ImaGenome labels for the evaluation (paper §III-A; paper-reference §10.1).

The paper scores every image with 10 Chest ImaGenome attributes (``constants.IMAGENOME_LABELS``).
Chest ImaGenome's silver ``attribute_relations_tabular.txt`` has one row per (image, report sentence,
anatomical box, attribute) mention. The reference reduces it to one image-level 0/1 per mentioned
attribute [R convert_to_reference_dataset.py], and so do we, step by step:

1. drop ``categoryID == "nlp"`` rows (they carry the report-level ``normal`` / ``abnormal`` tags);
2. drop ``bbox == "unknown"`` (as EHRXQA does, mimic-schemas §3.2);
3. per (study, image, bbox, label) keep the row of the **last** sentence (largest ``sent_loc``):
   a later sentence of the report overrides an earlier one;
4. per (study, image, label) keep the **max** relation over boxes: positive anywhere = positive.

An attribute that no sentence mentions has no row: it is *not evaluated* for that image (it is not
a negative). Then ``pair_label_rows`` turns image labels into the evaluation rows of Table II, one
per (pair, label), with the previous image's label (missing → 0, as the reference does).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ehrxdiff.constants import IMAGENOME_LABELS

RELATION_COLUMNS = ("study_id", "image_id", "sent_loc", "bbox", "categoryID", "label_name", "relation")
"""Columns read by name from ``attribute_relations_tabular.txt`` (column order in the file is unknown)."""


def read_relations(path: str | Path) -> pd.DataFrame:
    """Read Chest ImaGenome's ``silver_dataset/scene_tabular/attribute_relations_tabular.txt``.

    TAB separated with a header; columns are read by name. ``sent_loc`` is taken from its own column,
    or recomputed from ``row_id`` (last ``|`` field) as EHRXQA does when the column is absent.
    ``image_id`` loses a ``.dcm`` suffix so it equals the MIMIC-CXR ``dicom_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Chest ImaGenome relations file not found: {path}")
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    wanted = [c for c in RELATION_COLUMNS if c in header]
    if "sent_loc" not in header and "row_id" in header:
        wanted.append("row_id")
    missing = [c for c in RELATION_COLUMNS if c not in header and not (c == "sent_loc" and "row_id" in header)]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(header)}")
    df = pd.read_csv(path, sep="\t", usecols=wanted, dtype={"image_id": str, "bbox": str,
                                                            "categoryID": str, "label_name": str})
    if "sent_loc" not in df.columns:
        df["sent_loc"] = df.pop("row_id").astype(str).str.split("|").str[-1].astype(float)
    bad = ~df["relation"].isin([0, 1])
    if bad.any():
        raise ValueError(f"{path}: column 'relation' must be 0/1; {int(bad.sum())} row(s) are not, "
                         f"e.g. {df.loc[bad, 'relation'].iloc[0]!r}")
    df["image_id"] = df["image_id"].str.removesuffix(".dcm")
    df["relation"] = df["relation"].astype(int)
    return df


def image_labels(relations: pd.DataFrame, labels: tuple[str, ...] = IMAGENOME_LABELS) -> pd.DataFrame:
    """Reduce relation rows to image-level labels: columns study_id, dicom_id, label, relation (0/1).

    Steps 1-4 of the module docstring. Sorting is stable, so two rows tied on ``sent_loc`` for the
    same (study, image, bbox, label) resolve to the later row in file order (the reference's
    unstable sort leaves this tie unspecified).
    """
    df = relations[(relations["categoryID"] != "nlp") & (relations["bbox"] != "unknown")]
    df = df.sort_values(["study_id", "image_id", "bbox", "label_name", "sent_loc"], kind="mergesort")
    df = df.drop_duplicates(["study_id", "image_id", "bbox", "label_name"], keep="last")
    df = df.groupby(["study_id", "image_id", "label_name"], as_index=False, sort=True)["relation"].max()
    df = df[df["label_name"].isin(labels)]
    return (df.rename(columns={"image_id": "dicom_id", "label_name": "label"})
              [["study_id", "dicom_id", "label", "relation"]].reset_index(drop=True))


def label_matrix(labels_long: pd.DataFrame, labels: tuple[str, ...] = IMAGENOME_LABELS) -> pd.DataFrame:
    """Wide image × label table (index dicom_id, one float column per label, NaN = not mentioned).

    The evaluator is trained with a BCE masked on NaN, so unmentioned attributes never count as
    negatives (the reference trains one row per mentioned attribute, §10.2).
    """
    wide = labels_long.pivot_table(index="dicom_id", columns="label", values="relation", aggfunc="max")
    return wide.reindex(columns=list(labels)).astype(float)


def pair_label_rows(pairs: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Evaluation rows of Table II: one per (pair, label) where the *target* image has that label.

    ``pairs``: the cohort's ``pairs.parquet`` (pair_key, prev_dicom_id, target_dicom_id, split, ...).
    ``labels``: output of :func:`image_labels` (dicom_id, label, relation).
    Returns pair_key, split, target_dicom_id, prev_dicom_id, label, relation, prev_relation.
    ``prev_relation`` is the previous image's label for that attribute, **0 when the previous image
    has no such label** [R MIMICCXRLocalCLSDatasetAttrs.py: ``fillna(0)``], so "diff" rows
    (relation ≠ prev_relation) include findings that appear in the target but were never mentioned
    before.
    """
    for col in ("pair_key", "prev_dicom_id", "target_dicom_id"):
        if col not in pairs.columns:
            raise ValueError(f"pairs table: missing column {col!r}; found {list(pairs.columns)}")
    for col in ("dicom_id", "label", "relation"):
        if col not in labels.columns:
            raise ValueError(f"labels table: missing column {col!r}; found {list(labels.columns)}")
    keep = [c for c in ("pair_key", "split", "target_dicom_id", "prev_dicom_id") if c in pairs.columns]
    lab = labels[["dicom_id", "label", "relation"]].drop_duplicates(["dicom_id", "label"])
    rows = pairs[keep].merge(lab.rename(columns={"dicom_id": "target_dicom_id"}), on="target_dicom_id")
    prev = lab.rename(columns={"dicom_id": "prev_dicom_id", "relation": "prev_relation"})
    rows = rows.merge(prev, on=["prev_dicom_id", "label"], how="left")
    rows["prev_relation"] = rows["prev_relation"].fillna(0).astype(int)
    rows["relation"] = rows["relation"].astype(int)
    return rows.sort_values(["pair_key", "label"], kind="mergesort").reset_index(drop=True)


def prev_label_matrix(rows: pd.DataFrame, labels: tuple[str, ...] = IMAGENOME_LABELS) -> pd.DataFrame:
    """Pair × label matrix of previous labels (0 where missing): the input of the
    "table classifier w/ prev label" baseline (§10.4; label order = ``labels``)."""
    wide = rows.pivot_table(index="pair_key", columns="label", values="prev_relation", aggfunc="max")
    return wide.reindex(columns=list(labels)).fillna(0).astype(np.float32)


def target_label_matrix(rows: pd.DataFrame, labels: tuple[str, ...] = IMAGENOME_LABELS) -> pd.DataFrame:
    """Pair × label matrix of target labels, NaN where the target has no label (masked in the BCE)."""
    wide = rows.pivot_table(index="pair_key", columns="label", values="relation", aggfunc="max")
    return wide.reindex(columns=list(labels)).astype(np.float32)
