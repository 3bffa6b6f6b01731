"""Checks of the extraction path against the world's ground truth (the sidecar real data never has).

:func:`true_pairs` derives the pairs the cohort rules *should* produce from what actually happened — which
admission each film was taken in, its true time and view — by a route independent of the DuckDB linkage
over the CSVs (pandas over the sidecar). :func:`check_cohort` compares the two: every true pair found,
no false pair.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ehrxdiff.data.schemas import MIMIC_IV_SUBDIR


def true_pairs(world: str | Path, *, max_interval_hours: float = 48.0, min_age: int = 18,
               pairing: str = "all_earlier") -> pd.DataFrame:
    """Pair keys (``<target>_<prev>``) implied by the ground truth and the reference's rules."""
    world = Path(world)
    gt = pd.read_parquet(world / "ground_truth/images.parquet")
    adm = pd.read_csv(world / MIMIC_IV_SUBDIR / "hosp/admissions.csv.gz", usecols=["hadm_id", "admittime", "dischtime"],
                      parse_dates=["admittime", "dischtime"])
    img = gt[gt["is_frontal"] & gt["hadm_id"].notna() & (gt["age"] >= min_age)].merge(adm, on="hadm_id")
    img = img[(img["time"] > img["admittime"]) & (img["time"] <= img["dischtime"])]
    m = img.merge(img, on="hadm_id", suffixes=("_t", "_p"))
    hours = (m["time_t"] - m["time_p"]).dt.total_seconds() / 3600
    m = m[(m["study_id_t"] != m["study_id_p"]) & (hours > 0) & (hours < max_interval_hours)]
    if pairing == "consecutive":
        studies = img[["hadm_id", "study_id", "time"]].groupby(["hadm_id", "study_id"], as_index=False)["time"].min()
        studies = studies.sort_values(["hadm_id", "time"])
        studies["prev_study"] = studies.groupby("hadm_id")["study_id"].shift()
        prev_of = dict(zip(studies["study_id"], studies["prev_study"]))
        m = m[m["study_id_t"].map(prev_of) == m["study_id_p"]]
    return pd.DataFrame({"pair_key": m["dicom_id_t"] + "_" + m["dicom_id_p"], "hadm_id": m["hadm_id"]})


def check_cohort(pairs: pd.DataFrame, world: str | Path, **rules) -> dict:
    """{'true': n, 'found': n, 'missed': [...], 'false': [...]} — missed and false should both be empty."""
    truth = set(true_pairs(world, **rules)["pair_key"])
    got = set(pairs["pair_key"])
    return {"true": len(truth), "found": len(truth & got), "missed": sorted(truth - got), "false": sorted(got - truth)}
