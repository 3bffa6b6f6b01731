"""What a radiologist would have written: Chest ImaGenome relation rows and CheXpert labels per study.

The reader is noisy (a finding is reported positive when severity + N(0, 0.05) > 0.5) and selective: positives
are almost always mentioned, negatives about half the time, and a finding that was positive on the previous
study of the admission is always mentioned when it resolves ("no longer seen"). That reproduces the structure
the reference's metric relies on: a label exists only where the report mentions the finding (paper-reference
§10.1), and a missing previous label counts as 0.
"""
from __future__ import annotations

import numpy as np

from ehrxdiff.constants import IMAGENOME_LABELS

CATEGORY = {k: "anatomicalfinding" for k in IMAGENOME_LABELS} | {"pneumonia": "disease"}
BBOXES = {
    "pleural effusion": ("right costophrenic angle", "left costophrenic angle"),
    "enlarged cardiac silhouette": ("cardiac silhouette",),
    "lung opacity": ("right lower lung zone", "left lower lung zone"),
    "pulmonary edema/hazy opacity": ("right lung", "left lung"),
    "pneumonia": ("right lower lung zone",),
    "consolidation": ("right lower lung zone",),
    "vascular congestion": ("right lung", "left lung"),
    "pneumothorax": ("right apical zone",),
    "enlarged hilum": ("right hilar structures", "left hilar structures"),
    "mediastinal widening": ("mediastinum", "upper mediastinum"),
}
CHEXPERT = {"Pleural Effusion": "pleural effusion", "Cardiomegaly": "enlarged cardiac silhouette",
            "Consolidation": "consolidation", "Edema": "pulmonary edema/hazy opacity", "Pneumonia": "pneumonia",
            "Pneumothorax": "pneumothorax", "Lung Opacity": "lung opacity",
            "Enlarged Cardiomediastinum": "mediastinal widening"}


def read_study(sev: dict, prev_pos: dict, rng: np.random.Generator) -> dict[str, int]:
    """The reported label per mentioned finding: {label: 0/1}; unmentioned findings are absent."""
    out = {}
    for lab in IMAGENOME_LABELS:
        pos = sev[lab] + rng.normal(0, 0.05) > 0.5
        if (pos and rng.random() < 0.95) or (not pos and (prev_pos.get(lab) or rng.random() < 0.5)):
            out[lab] = int(pos)
    return out


def relation_rows(study_id: int, dicom_ids: list[str], said: dict[str, int], devices: dict,
                  rng: np.random.Generator) -> list[tuple]:
    """Rows of attribute_relations_tabular.txt for one study (same rows for every image of the study)."""
    sentences = []
    for lab, rel in said.items():
        for bbox in BBOXES[lab]:
            sentences.append((bbox, rel, lab, CATEGORY[lab]))
    if devices.get("endotracheal_tube"):
        sentences.append(("trachea", 1, "endotracheal tube", "tubesandlines"))
    sentences.append(("unknown", 1, "atelectasis", "anatomicalfinding"))  # dropped by the reference (bbox unknown)
    order = rng.permutation(len(sentences))
    rows = []
    abnormal = any(said.values())
    for dicom in dicom_ids:
        for n, i in enumerate(order):
            bbox, rel, lab, cat = sentences[i]
            rows.append((study_id, f"{dicom}.dcm", f"{study_id}|{n}", float(n), bbox, rel, lab, cat,
                         "yes" if rel else "no"))
        rows.append((study_id, f"{dicom}.dcm", f"{study_id}|{len(order)}", float(len(order)), "right lung", 1,
                     "abnormal" if abnormal else "normal", "nlp", "yes"))
    return rows


def chexpert_row(subject_id: int, study_id: int, said: dict[str, int], devices: dict) -> dict:
    """One row of mimic-cxr-2.0.0-chexpert: 1.0 / 0.0 / empty (not mentioned); No Finding only 1.0 or empty."""
    row = {"subject_id": subject_id, "study_id": study_id}
    for col, lab in CHEXPERT.items():
        row[col] = float(said[lab]) if lab in said else None
    row["Support Devices"] = 1.0 if any(devices.values()) else None
    row["No Finding"] = 1.0 if not any(said.values()) and not any(devices.values()) else None
    return row
