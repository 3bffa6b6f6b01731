"""Evaluation without finding labels (issue 7, item 4: "labels optional"): the metrics it falls back to, what
it says it skipped, and one own cohort without finding columns through notebooks 01-07 on the smoke profile."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ehrxdiff.config import load_config
from ehrxdiff.evaluation.label_free import label_free_plan, vs_previous_image
from ehrxdiff.study import models
from ehrxdiff.study.prepare import has_labels, missing_labels_reason
from ehrxdiff.evaluation.metrics import image_similarity

ROOT = Path(__file__).resolve().parents[1]


def test_image_similarity_known_values():
    rng = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 32, 32, generator=rng) * 1.6 - 0.8
    same = image_similarity(target, target)
    assert np.allclose(same["MSE"], 0) and np.allclose(same["SSIM"], 1) and np.isinf(same["PSNR"]).all()
    shifted = image_similarity(target + 0.2, target)          # MSE 0.04 → PSNR 10·log10(2² / 0.04) = 20 dB
    assert np.allclose(shifted["MSE"], 0.04) and np.allclose(shifted["PSNR"], 20.0)
    noise = torch.randn(target.shape, generator=rng)
    slight, heavy = (image_similarity(target + a * noise, target) for a in (0.05, 0.5))
    assert (heavy["SSIM"] < slight["SSIM"]).all() and (slight["SSIM"] < 1).all() and (heavy["SSIM"] < 0.5).all()
    assert (heavy["PSNR"] < slight["PSNR"]).all()
    small = image_similarity(target[:, :, :8, :8], target[:, :, :8, :8].flip(-1))   # below the 11 px window
    assert small.shape == (4, 3) and (small["SSIM"] < 1).all()
    with pytest.raises(ValueError, match="must both be"):
        image_similarity(target[:2], target)


def test_vs_previous_image_counts_pairs_closer_to_the_target():
    rows = [("previous image", 0, k, "MSE", v) for k, v in zip("abcd", (0.10, 0.10, 0.10, 0.10))]
    rows += [("EHRXDiff", 0, k, "MSE", v) for k, v in zip("abcd", (0.05, 0.05, 0.20, 0.10))]
    rows += [("EHRXDiff", 0, k, "SSIM", v) for k, v in zip("abcd", (0.9, 0.9, 0.9, 0.9))]
    rows += [("previous image", 0, k, "SSIM", v) for k, v in zip("abcd", (0.5, 0.5, 0.5, 0.95))]
    out = vs_previous_image(pd.DataFrame(rows, columns=["method", "seed", "pair_key", "metric", "value"]))
    got = out.set_index("metric")
    assert got.loc["MSE", "share_pairs_better"] == pytest.approx((2 + 0.5) / 4)   # lower MSE wins, a tie counts half
    assert got.loc["MSE", "difference"] == pytest.approx(0.0)
    assert got.loc["SSIM", "share_pairs_better"] == pytest.approx(3 / 4)          # higher SSIM wins
    assert got.loc["SSIM", "previous image"] == pytest.approx(0.6125)


def test_label_free_plan_reports_only_what_the_cohort_carries():
    both = pd.DataFrame({"age": [70, 60, 50, 40], "gender": ["F", "M", "F", "M"]})
    plan, skipped = label_free_plan(both, xrv_weights=None)
    assert plan == {"age": True, "sex": True, "evaluator": "train"}
    assert {s["what"] for s in skipped} == {"Table II (weighted-macro AUROC all/diff/same)", "Table IV (ablation AUROC)",
                                            "baselines: previous label, table classifiers", "claims on AUROC"}
    one_sex = both.assign(gender="F", age=np.nan)
    plan, skipped = label_free_plan(one_sex, xrv_weights=None)
    assert plan == {"age": False, "sex": False, "evaluator": None}
    assert {"age r", "sex AUROC", "FID"} <= {s["what"] for s in skipped}   # no trained features: no FID, said why
    plan, skipped = label_free_plan(one_sex.drop(columns=["age", "gender"]), xrv_weights="densenet.pt")
    assert plan["evaluator"] == "xrv" and "FID" not in {s["what"] for s in skipped}


def test_has_labels_by_source(tmp_path):
    assert has_labels(load_config("smoke", {"run_dir": str(tmp_path)}))               # synthetic: ImaGenome-shaped
    mimic = load_config("smoke", {"mimic_iv_dir": str(tmp_path), "mimic_cxr_dir": str(tmp_path)})
    assert not has_labels(mimic) and "imagenome_dir" in missing_labels_reason(mimic)
    own = load_config("smoke", {"own_images": "i.csv", "own_events": "e.csv", "run_dir": str(tmp_path)})
    assert "no finding columns" in missing_labels_reason(own)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "image_labels.parquet").write_bytes(b"")
    assert has_labels(own)


def test_the_findings_head_needs_labels(tmp_path):
    """``event_global: findings_prev`` (the smoke and demo profiles) and ``findings`` fit their head on finding
    labels: without them the models are built without it (the e2e test below checks what notebook 04 records);
    ``pooled`` needs none."""
    assert models.event_global(load_config("smoke", {"run_dir": str(tmp_path)})) == "findings_prev"
    mimic = {"mimic_iv_dir": str(tmp_path), "mimic_cxr_dir": str(tmp_path)}
    assert models.event_global(load_config("smoke", mimic)) is None
    assert models.event_global(load_config("smoke", mimic | {"event_global": "findings"})) is None
    assert models.event_global(load_config("smoke", mimic | {"event_global": "pooled"})) == "pooled"
    assert models.event_global(load_config("smoke", {"event_global": "none"})) is None


# ------------------------------------------------------------------------------------------ end to end
def own_cohort_from_world(world: Path, out: Path) -> tuple[Path, Path]:
    """The smoke world's films and lab/drug rows rewritten in the documented two-table format, with sex but
    without age and without any finding column (so: no labels, sex AUROC and FID yes, age r no), and timed by
    the **day** as many real cohorts are (issue 16): films and events at midnight of their date, so every event
    of a target film's day carries the target's own time."""
    from ehrxdiff.data.schemas import cxr_image_relpath
    cxr = world / "mimic-cxr-jpg" / "2.0.0"
    hosp = world / "mimiciv" / "2.2" / "hosp"
    meta = pd.read_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"StudyDate": str})
    clock = meta["StudyTime"].map(lambda t: f"{int(float(t)):06d}")
    sex = pd.read_csv(hosp / "patients.csv.gz").set_index("subject_id")["gender"]
    images = pd.DataFrame({
        "subject_id": meta["subject_id"], "time": pd.to_datetime(meta["StudyDate"] + clock,
                                                                 format="%Y%m%d%H%M%S").dt.normalize(),
        "path": [str(cxr / cxr_image_relpath(s, st, d)) for s, st, d in zip(meta["subject_id"], meta["study_id"],
                                                                             meta["dicom_id"])],
        "view": meta["ViewPosition"], "image_id": meta["dicom_id"], "sex": meta["subject_id"].map(sex)})
    labs = pd.read_csv(hosp / "labevents.csv.gz")
    drugs = pd.read_csv(hosp / "prescriptions.csv.gz")
    day = lambda t: pd.to_datetime(t).dt.normalize()   # noqa: E731
    events = pd.concat([
        pd.DataFrame({"subject_id": labs["subject_id"], "time": day(labs["charttime"]), "table": "labs",
                      "item": labs["itemid"], "value": labs["valuenum"], "unit": labs["valueuom"]}),
        pd.DataFrame({"subject_id": drugs["subject_id"], "time": day(drugs["starttime"]), "table": "drugs",
                      "item": drugs["drug"], "value": drugs["dose_val_rx"], "unit": drugs["dose_unit_rx"],
                      "text": "route " + drugs["route"].astype(str)})], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    images.to_csv(out / "images.csv", index=False)
    events.to_csv(out / "events.csv", index=False)
    return out / "images.csv", out / "events.csv"


@pytest.mark.e2e
def test_label_free_own_cohort_runs_every_notebook(tmp_path, monkeypatch):
    """Notebooks 01-07 on the smoke profile with an own cohort that has no finding labels: every notebook runs,
    the image-space results are written, and what needs labels is listed as skipped, not faked."""
    import papermill as pm
    from ehrxdiff.synthetic import generate_world
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(k, v)
    world = generate_world(tmp_path / "world", n_patients=40, seed=0, image_size=64, progress=False)
    images, events = own_cohort_from_world(world, tmp_path / "own")
    run, fig = tmp_path / "run", tmp_path / "fig"
    params = {"own_images": str(images), "own_events": str(events), "run_dir": str(run), "figures_dir": str(fig),
              "data_dir": str(tmp_path / "data"),
              # smaller than smoke where it only costs time: this test is about the label-free paths, not training
              "ablation_variants": [], "vae_steps": 2, "ldm_steps": 2, "sample_steps": 2, "uncertainty_samples": 2,
              "rollout_chains": 2, "rollout_max_steps": 2, "sampler_study_steps": [2],
              # day-resolution films: 1- and 2-day gaps need a window above 48 h (issue 16: "a suitable window")
              "max_interval_hours": 72,
              # sex AUROC needs both sexes among the scored test pairs: at day resolution the 5 % test split is one
              # patient; 15 % and 16 scored pairs hold both (7 patients; the subset: 14 M, 2 F)
              "test_fraction": 0.15, "eval_max_pairs": 16,
              # a what-if in this cohort's own terms (the built-in MIMIC ones are refused on an own cohort)
              "whatif_definitions": {"diuretic": {
                  "events": [{"table": "drugs", "item": "Furosemide", "value": 40, "unit": "mg", "text": "route IV"}],
                  "lowers": ["pulmonary edema/hazy opacity", "pleural effusion"]}}}
    seconds = {}
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        t0 = time.perf_counter()
        pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters={"profile": "smoke", "params": params},
                            kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
        seconds[nb.name] = round(time.perf_counter() - t0, 1)
    print("notebook seconds:", seconds)
    assert not (run / "cohort" / "image_labels.parquet").exists()
    # 01-02 at day resolution: the events of a target film's own day (stamped with its time) are in the events
    # table but never in that pair's S_event (window_end "exclusive", the default)
    pairs = pd.read_parquet(run / "cohort" / "pairs.parquet")
    interval = ((pairs["target_time"] - pairs["prev_time"]).dt.total_seconds() / 3600).set_axis(pairs["pair_key"])
    assert set(interval.round(6)) <= {24.0, 48.0} and (interval == 48.0).any()     # 2-day gaps kept by the 72 h
    raw = pd.read_csv(events, parse_dates=["time"], dtype={"subject_id": str})
    at_target = raw.merge(pairs, left_on=["subject_id", "time"], right_on=["subject_id", "target_time"])
    assert len(at_target) > 100                       # the leak the window must keep out is there to leak
    s_event = pd.read_parquet(run / "events" / "events.parquet")
    assert len(s_event) and (s_event["hours"].to_numpy() < interval.reindex(s_event["pair_key"]).to_numpy()).all()
    ev, sim = run / "eval", run / "simulation"
    # 04: the smoke profile's event_global findings cannot fit its head without labels: built without it, said why
    for model in ("EHRXDiff", "EHRXDiff_w_null"):
        head = json.loads((run / "ldm" / model / "findings_head.json").read_text())
        assert "no finding columns" in head["skipped"]
        assert json.loads((run / "ldm" / model / "pipeline" / "adaptor" / "config.json").read_text())["n_findings"] == 0
    # 05: image similarity per method and seed (the previous image once, each model per sampling seed)
    per_pair = pd.read_csv(ev / "image_similarity.csv")
    n_pairs = per_pair["pair_key"].nunique()
    assert n_pairs == 16 and set(per_pair["metric"]) == {"MSE", "PSNR", "SSIM"}
    counts = per_pair.groupby("method")["seed"].nunique()
    assert counts["previous image"] == 1 and counts["EHRXDiff"] == counts["EHRXDiff_w_null"] == 2
    assert per_pair["value"].notna().all() and per_pair.groupby(["method", "seed", "metric"]).size().eq(n_pairs).all()
    vs = pd.read_csv(ev / "vs_previous_image.csv")
    runs = {"EHRXDiff", "EHRXDiff_w_null", "EHRXDiff_w_null (s = 1)"} | {
        f"{m} ({c} S_event)" for m in ("EHRXDiff", "EHRXDiff_w_null") for c in ("shuffled", "no")}
    assert set(vs["method"]) == runs and vs["share_pairs_better"].between(0, 1).all()   # with issue 14's controls
    demo = pd.read_csv(ev / "demographics.csv")
    assert set(demo["metric"]) == {"FID", "sex AUROC"}                   # sex in the table, no age: no age r
    assert demo["evaluator"].str.contains("trained on sex/age only").all()
    skipped = pd.read_csv(ev / "skipped.csv")
    assert {"Table II (weighted-macro AUROC all/diff/same)", "age r"} <= set(skipped["what"])
    assert skipped["reason"].str.contains("no finding columns").all()
    assert not (ev / "auroc_summary.csv").exists() and not (fig / "table2_imagenome_auroc.csv").exists()
    for table in ("table_image_similarity", "table_vs_previous_image", "table3_fid_demographics", "evaluation_skipped"):
        assert (fig / f"{table}.md").read_text().count("|") > 4, table
    t = pd.read_csv(fig / "table_image_similarity.csv", index_col=0)
    assert list(t.columns[:3]) == ["MSE", "PSNR", "SSIM"] and "±" in t.loc["EHRXDiff_w_null", "SSIM"]
    # 06: pairs chosen by image change, figures drawn
    for name in ("fig_qualitative", "fig_difference_maps"):
        assert (fig / f"{name}.png").exists()
    # 07: image-space parts written, probability parts skipped and said so
    spread = pd.read_csv(sim / "uncertainty_spread.csv")
    assert {"mean_pixel_std", "max_pixel_std"} <= set(spread.columns) and (spread["mean_pixel_std"] > 0).all()
    roll = pd.read_csv(sim / "rollout.csv")
    assert set(roll["metric"]) == {"pixel MAE", "PSNR", "SSIM"}
    sampler = pd.read_csv(sim / "sampler_study.csv")
    assert set(sampler["metric"]) == {"MSE", "PSNR", "SSIM", "seconds per image"}
    assert set(pd.read_csv(sim / "skipped.csv")["what"]) == {
        "what-if effects and agreement", "observed association of the interventions",
        "P(finding) spread and calibration", "rollout Brier score and AUROC", "sampler study AUROC and FID"}
    assert not (sim / "calibration.csv").exists() and not (sim / "whatif_effects.csv").exists()
    out07 = (tmp_path / "07_what_if.ipynb").read_text()
    assert "difference map only (mean |cf - f| = " in out07       # the own-terms diuretic was added and predicted
    for name in ("fig_whatif_example", "fig_uncertainty", "fig_rollout", "fig_sampler_study"):
        assert (fig / f"{name}.png").exists(), name
    out05 = (tmp_path / "05_evaluation.ipynb").read_text()
    assert "Evaluation without finding labels. Skipped:" in out05
