"""The real, open MIMIC-IV demo tables (tests/data/mimic-iv-demo-2.2, ODbL) as a regression fixture (issue 16):
real itemids, real drug spellings (tall-man, lower case, stray spaces), real blanks; a made-up image side for its
admissions with the traps of real linkage. The cohort is checked against an independent pairing in pandas, the
event extraction against what the real tables select, and the smoke study runs on them end to end."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ehrxdiff.data.cohort import build_cohort
from ehrxdiff.data.events import extract_events
from ehrxdiff.data.schemas import COLUMNS
from mimic_fixture import cxr_side_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).parent / "data" / "mimic-iv-demo-2.2"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("real")
    iv = root / "mimiciv" / "2.2"
    shutil.copytree(DEMO, iv)
    # chartevents is not in the open demo: a header-only table, as its NOTE says
    (iv / "icu" / "chartevents.csv.gz").write_bytes(gzip.compress((",".join(COLUMNS["icu/chartevents"]) + "\n").encode(),
                                                                 mtime=0))
    return iv, cxr_side_for(iv, root)


@pytest.fixture(scope="module")
def cohort(release):
    return build_cohort(*release, threads=1)


def _independent_pairs(iv: Path, cxr: Path) -> set[tuple[str, str]]:
    """The pairing rules written again in pandas, from the files (module docstring of ehrxdiff.data.cohort)."""
    pat = pd.read_csv(iv / "hosp/patients.csv.gz")
    adm = pd.read_csv(iv / "hosp/admissions.csv.gz", parse_dates=["admittime", "dischtime"]).merge(pat, on="subject_id")
    adm = adm[adm["admittime"].dt.year - adm["anchor_year"] + adm["anchor_age"] >= 18]
    meta = pd.read_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"StudyDate": str, "StudyTime": str})
    meta = meta[meta["ViewPosition"].isin(["PA", "AP"])]
    meta["t"] = pd.to_datetime(meta["StudyDate"] + meta["StudyTime"].str.split(".").str[0].str.zfill(6),
                               format="%Y%m%d%H%M%S")
    link = meta.merge(adm[["subject_id", "hadm_id", "admittime", "dischtime"]], on="subject_id")
    link = link[(link["t"] > link["admittime"]) & (link["t"] <= link["dischtime"])]
    study_t = meta.groupby(["subject_id", "study_id"])["t"].min().rename("st").reset_index()
    link = link.merge(study_t, on=["subject_id", "study_id"])
    p = link.merge(link, on=["subject_id", "hadm_id"], suffixes=("_t", "_p"))
    p = p[(p["t_p"] < p["t_t"]) & (p["st_p"] < p["st_t"]) & ((p["t_t"] - p["t_p"]) < pd.Timedelta(hours=48))]
    return set(zip(p["dicom_id_t"], p["dicom_id_p"]))


def _n(res, startswith: str) -> int:
    r = res.report[res.report["what"].str.startswith(startswith)]
    assert len(r) == 1, res.report
    return int(r["n"].iloc[0])


def test_cohort_on_the_real_tables_matches_an_independent_pairing(release, cohort):
    iv, cxr = release
    got = set(zip(cohort.pairs["target_dicom_id"], cohort.pairs["prev_dicom_id"]))
    assert got == _independent_pairs(iv, cxr) and len(got) > 400
    meta = pd.read_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert _n(cohort, "non-frontal view") == int((meta["ViewPosition"] == "LATERAL").sum()) > 0
    assert _n(cohort, "no admission with admittime < image time") > 0          # the ED and outpatient films
    assert _n(cohort, "duplicate row in admissions.csv.gz") == 0
    assert _n(cohort, "admission without a valid") == 0 and _n(cohort, "age unknown (no patients row)") == 0


def test_events_on_the_real_tables(release, cohort):
    """What the real demo selects, per table, with the case-folded drug names and the reference's exact ones."""
    iv, _ = release
    folded = extract_events(iv, cohort.pairs, threads=1, max_events=1024)
    exact = extract_events(iv, cohort.pairs, threads=1, max_events=1024, drug_matching="exact")
    rep = folded.report.pivot_table(index="table", columns="what", values="n", aggfunc="sum")
    print(rep.filter(like="events in pair windows").to_string())
    in_win = folded.report[folded.report["what"] == "events in pair windows"].set_index("table")["n"]
    assert in_win["chartevents"] == 0 and in_win["labevents"] > 0 and in_win["prescriptions"] > 0
    ex = exact.report[exact.report["what"] == "events in pair windows"].set_index("table")["n"]
    assert in_win["prescriptions"] > ex["prescriptions"]                      # tall-man / lower-case names gained
    assert (in_win.drop("prescriptions") == ex.drop("prescriptions")).all()
    texts = " | ".join(folded.texts)
    assert "HydrALAZINE" in texts or "NORepinephrine" in texts or "PHENYLEPHrine" in texts
    assert not any(t in " | ".join(exact.texts) for t in ("drug HydrALAZINE", "drug NORepinephrine"))
    assert len(folded.pair_keys) > 0.3 * len(cohort.pairs)
    # filters that select nothing in the real tables are counted per table (and listed by extract_events_to_dir)
    rep = folded.report.set_index(["table", "what"])["n"]
    unmatched = rep.loc[("microbiologyevents", "filter values (spec_type_desc) that select no event in a pair window "
                                               "(event_filter_unmatched.csv)")]
    assert 0 < unmatched < rep.loc[("microbiologyevents", "filter values (spec_type_desc)")]


def test_filter_values_that_select_nothing_are_listed(release, cohort, tmp_path):
    from ehrxdiff.data.events import extract_events_to_dir
    iv, _ = release
    out = extract_events_to_dir(iv, cohort.pairs, tmp_path / "ev", threads=1, tables=("microbiologyevents", "procedureevents"))
    listed = pd.read_csv(out / "event_filter_unmatched.csv")
    rep = pd.read_csv(out / "event_report.csv").set_index(["table", "what"])["n"]
    for table, col in (("microbiologyevents", "spec_type_desc"), ("procedureevents", "ordercategoryname")):
        n = rep.loc[(table, f"filter values ({col}) that select no event in a pair window (event_filter_unmatched.csv)")]
        assert (listed["table"] == table).sum() == n
    print(listed.to_string())
    assert "17 - Inhaled Meds" in set(listed["value"])      # a procedure category the real demo never uses


@pytest.mark.e2e
def test_smoke_study_runs_on_the_real_tables(release, tmp_path):
    """Notebooks 01-07 on the real demo tables (no Chest ImaGenome: the label-free path of 05-07)."""
    iv, cxr = release
    env = dict(os.environ)
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--profile", "smoke", "-p", "mimic_iv_dir", str(iv),
                        "-p", "mimic_cxr_dir", str(cxr), "-p", "data_dir", str(tmp_path / "data"),
                        "-p", "run_dir", str(tmp_path / "run"), "-p", "figures_dir", str(tmp_path / "fig"),
                        "-p", "embedding_backend", "hashing",
                        "-p", "ablation_variants", "[]", "-p", "vae_steps", "2", "-p", "ldm_steps", "2",
                        "-p", "sample_steps", "2", "-p", "uncertainty_samples", "2", "-p", "rollout_chains", "2",
                        "-p", "rollout_max_steps", "2", "-p", "sampler_study_steps", "[2]"],
                       capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "run" / "notebooks" / "07_what_if.ipynb").is_file() or \
        len(list((tmp_path / "run" / "notebooks").glob("07_*.ipynb"))) == 1       # executed notebooks in run_dir
    t1 = pd.read_csv(tmp_path / "fig" / "table1_cohort.csv", index_col=0, thousands=",")
    assert t1.loc["samples"].sum() > 100
    assert (tmp_path / "fig" / "table_image_similarity.csv").is_file()
    assert (tmp_path / "fig" / "environment.json").is_file()
