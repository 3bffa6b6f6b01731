"""The synthetic world: schema fidelity, determinism, known dynamics, and findings drawn where they belong."""
from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.schemas import (COLUMNS, CXR_FILES, IMAGENOME_RELATIONS, IMAGENOME_SUBDIR, MIMIC_CXR_SUBDIR,
                                   MIMIC_IV_SUBDIR)
from ehrxdiff.synthetic import WorldConfigError, generate_world
from ehrxdiff.synthetic.dynamics import Traits, initial_state, severities, simulate
from ehrxdiff.synthetic.render import patient_anatomy, random_pose, render_frontal

TS = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,3})?$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w") / "world", n_patients=14, seed=3, image_size=32,
                          workers=1, progress=False)


def _header(path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.readline().rstrip("\n").split("\t" if str(path).endswith(".txt") else ",")


def test_every_file_has_the_release_columns_in_order(world):
    for key, cols in COLUMNS.items():
        if key.startswith(("hosp/", "icu/")):
            path = world / MIMIC_IV_SUBDIR / f"{key}.csv.gz"
        elif key.startswith("cxr/"):
            path = world / MIMIC_CXR_SUBDIR / CXR_FILES[key]
        else:
            path = world / IMAGENOME_SUBDIR / IMAGENOME_RELATIONS
        assert path.exists(), path
        assert _header(path) == list(cols), key


def test_value_formats_match_the_schema_doc(world):
    iv = world / MIMIC_IV_SUBDIR
    adm = pd.read_csv(iv / "hosp/admissions.csv.gz", dtype=str, keep_default_na=False)
    assert adm["admittime"].str.match(TS).all() and adm["dischtime"].str.match(TS).all()
    assert adm["hadm_id"].str.match(r"^2\d{7}$").all()
    pat = pd.read_csv(iv / "hosp/patients.csv.gz", dtype=str, keep_default_na=False)
    assert pat["subject_id"].str.match(r"^1\d{7}$").all() and set(pat["gender"]) <= {"M", "F"}
    assert pat["anchor_year_group"].str.match(r"^\d{4} - \d{4}$").all()
    assert pat["dod"].isin([""]).sum() + pat["dod"].str.match(r"^\d{4}-\d{2}-\d{2}$").sum() == len(pat)
    lab = pd.read_csv(iv / "hosp/labevents.csv.gz", dtype=str, keep_default_na=False)
    assert not lab["itemid"].str.contains(r"\.").any(), "integers are written without decimals"
    assert (lab["hadm_id"] == "").any(), "some lab rows carry no hadm_id, as in MIMIC"
    proc = pd.read_csv(iv / "icu/procedureevents.csv.gz", dtype=str, keep_default_na=False)
    assert proc["storetime"].str.match(TS).all()
    meta = pd.read_csv(world / MIMIC_CXR_SUBDIR / CXR_FILES["cxr/metadata"], dtype=str)
    assert meta["StudyDate"].str.match(r"^2\d{7}$").all()
    assert meta["StudyTime"].str.match(r"^\d{1,6}(\.\d+)?$").all()
    assert meta["dicom_id"].str.match(r"^([0-9a-f]{8}-){4}[0-9a-f]{8}$").all()
    assert meta["study_id"].str.match(r"^5\d{7}$").all()
    assert set(meta["ViewPosition"]) <= {"PA", "AP", "LATERAL", "LL"} and "LATERAL" in set(meta["ViewPosition"])
    for r in meta.itertuples():
        s = str(r.subject_id)
        assert (world / MIMIC_CXR_SUBDIR / f"files/p{s[:2]}/p{s}/s{r.study_id}/{r.dicom_id}.jpg").exists()
    rel = pd.read_csv(world / IMAGENOME_SUBDIR / IMAGENOME_RELATIONS, sep="\t")
    assert set(rel.loc[rel["categoryID"] != "nlp", "label_name"]) & set(IMAGENOME_LABELS)
    assert rel["image_id"].str.endswith(".dcm").all()


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    again = generate_world(tmp_path / "again", n_patients=14, seed=3, image_size=32, workers=2, progress=False)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and "ground_truth" not in p.parts}
    assert digest(world) == digest(again)


def test_ground_truth_sidecar_covers_every_image(world):
    gt = pd.read_parquet(world / "ground_truth/images.parquet")
    meta = pd.read_csv(world / MIMIC_CXR_SUBDIR / CXR_FILES["cxr/metadata"])
    assert set(gt["dicom_id"]) == set(meta["dicom_id"])
    assert set(IMAGENOME_LABELS) <= set(gt.columns)
    assert gt[list(IMAGENOME_LABELS)].stack().between(0, 1).all()


def _patients(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        t = Traits("M", 60.0, 0.2, 0.1, 0.2, 0.1)
        style = {"diurese": 1.0, "fluids": 1.0, "treat": 1.0, "abx_interval": 12, "line_hour": -1}
        yield t, style, initial_state(str(rng.choice(["heart_failure", "pneumonia", "mixed"])), t, rng), i


def test_a_diuretic_lowers_edema_and_antibiotics_lower_consolidation_on_average():
    """Counterfactual replay with the same physiology noise: the effect of one action, nothing else."""
    d_edema, d_cons = [], []
    for t, style, s0, i in _patients(60):
        _, acts = simulate(s0, t, 72, style, physiology_seed=i, policy_rng=np.random.default_rng(i))
        none = [dict() for _ in acts]
        base, _ = simulate(s0, t, 72, style, physiology_seed=i, actions=none)
        diur, _ = simulate(s0, t, 72, style, physiology_seed=i, actions=[{"furosemide_mg": 80.0}] + none[1:])
        abx, _ = simulate(s0, t, 72, style, physiology_seed=i, actions=[{"antibiotic_start": 120.0}] + none[1:])
        d_edema.append(diur[12].edema - base[12].edema)
        d_cons.append(abx[71].consolidation - base[71].consolidation)
    assert np.mean(d_edema) < -0.02 and np.mean(np.array(d_edema) <= 0) > 0.9
    assert np.mean(d_cons) < -0.05 and np.mean(np.array(d_cons) <= 1e-9) > 0.9


def test_untreated_pneumonia_grows():
    t = Traits("F", 50.0, 0.1, 0.1, 0.1, 0.0)
    s0 = initial_state("pneumonia", t, np.random.default_rng(1))
    st, _ = simulate(s0, t, 96, {}, physiology_seed=1, actions=[{}] * 96)
    assert st[-1].infection > s0.infection


def _render(sev_overrides, devices=None, seed=0):
    rng = np.random.default_rng(seed)
    anat = patient_anatomy(rng, "M", 60, 128)
    pose = random_pose(np.random.default_rng(1), ap=False) | {"rotation": 0.0, "shift_x": 0.0, "shift_y": 0.0,
                                                             "noise": 0.0, "scale": 1.0}
    sev = {k: 0.0 for k in IMAGENOME_LABELS} | sev_overrides
    return render_frontal(sev, devices or {}, anat, pose, 128, np.random.default_rng(2))


def test_effusion_brightens_the_lower_lung_zones():
    clear, wet = _render({}), _render({"pleural effusion": 0.8})
    lower = (slice(75, 95), slice(15, 113))   # lower lung zones, both sides
    upper = (slice(25, 45), slice(15, 113))
    assert wet[lower].mean() > clear[lower].mean() + 0.03
    assert abs(wet[upper].mean() - clear[upper].mean()) < 0.01


def test_cardiac_enlargement_widens_the_heart_and_devices_draw_lines():
    small, big = _render({}), _render({"enlarged cardiac silhouette": 1.0})
    row = slice(78, 84)
    assert (big[row] > small[row] + 0.05).sum() > 60
    tube = _render({}, {"endotracheal_tube": True})
    assert tube[5:30, 62:66].mean() > _render({})[5:30, 62:66].mean() + 0.1


def test_bad_parameters_give_one_clear_line(tmp_path):
    with pytest.raises(WorldConfigError, match="n_patients"):
        generate_world(tmp_path, n_patients=-3)
    with pytest.raises(WorldConfigError, match="image_size"):
        generate_world(tmp_path, n_patients=3, image_size=0)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    blocked = ro / "sub"
    try:
        with pytest.raises(WorldConfigError, match="not writable"):
            generate_world(blocked if __import__("os").geteuid() != 0 else "/proc/ehrxdiff", n_patients=3)
    finally:
        ro.chmod(0o700)
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.synthetic", "--out", str(tmp_path / "x"), "--n-patients",
                        "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "n_patients" in r.stderr
