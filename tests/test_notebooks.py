"""Notebook hygiene, and the one end-to-end run: the smoke profile through the real study command."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ehrxdiff.config import load_config
from ehrxdiff.study import models

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS][:2] == ["01", "02"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one parameters-tagged cell"
    names = {t.id for n in ast.walk(ast.parse(params[0].source)) if isinstance(n, ast.Assign) for t in n.targets}
    assert names == {"profile", "params"}, "the parameters cell holds profile and params only"
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        assert not c.get("outputs") and c.get("execution_count") is None, "committed notebooks carry no outputs"
        code = "\n".join(line for line in c.source.splitlines() if not line.startswith("%"))
        tree = ast.parse(code)
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))], \
            "notebooks orchestrate: functions and classes belong in ehrxdiff/"
        assert "API_KEY" not in c.source, "API keys come from the environment, never a notebook"
    # byte for byte what the clone's nbstripout filter makes of it (cell ids included), so a fresh clone that ran
    # the study shows no notebook as modified
    stripped = subprocess.run([sys.executable, "-m", "nbstripout"], input=path.read_bytes(), capture_output=True,
                              check=True).stdout
    assert stripped == path.read_bytes(), f"{path.name}: not as nbstripout writes it (run nbstripout on it)"


@pytest.mark.e2e
def test_smoke_profile_runs_every_notebook(tmp_path):
    """``./run_all.sh --profile smoke`` on a fresh data and run folder: exits 0, writes the tables."""
    env = dict(os.environ)
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--profile", "smoke", "-p", "data_dir", str(tmp_path / "data"),
                        "-p", "run_dir", str(tmp_path / "run"), "-p", "figures_dir", str(tmp_path / "fig")],
                       capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.endswith("s") and ".ipynb" in ln]
    assert len(lines) == len(NOTEBOOKS) and all(" ok " in ln for ln in lines)
    t1 = pd.read_csv(tmp_path / "fig" / "table1_cohort.csv", index_col=0, thousands=",")
    assert t1.loc["samples"].sum() > 0
    assert (tmp_path / "run" / "event_store").is_dir()
    # Later notebooks must never rewrite the study's samples (06 once re-split its test subset in place).
    samples = pd.read_parquet(tmp_path / "run" / "events" / "samples.parquet")   # 02: its own output
    assert not (tmp_path / "run" / "cohort" / "samples.parquet").exists()         # 01's folder is not rewritten
    assert len(samples) == t1.loc["samples"].sum() > 100
    for table in ("table2_imagenome_auroc", "table3_fid_demographics", "table4_ablation"):
        for ext in ("csv", "md", "tex"):
            assert (tmp_path / "fig" / f"{table}.{ext}").stat().st_size > 0
    t2 = pd.read_csv(tmp_path / "fig" / "table2_imagenome_auroc.csv", index_col=0)
    assert {"GT", "previous image", "previous label", "EHRXDiff", "EHRXDiff_w_null"} <= set(t2.index)
    controls = {f"{m} ({c} S_event)" for m in ("EHRXDiff", "EHRXDiff_w_null") for c in ("shuffled", "no")}
    assert controls | {"VAE reconstruction of I_trg"} <= set(t2.index)          # issue 14's rows
    perm = pd.read_csv(tmp_path / "run" / "samples" / "shuffled_events.csv")
    assert len(perm) == 8 and (perm["pair_key"] != perm["events_of"]).all() and set(perm["events_of"]) == set(
        perm["pair_key"])                                                        # a fixed derangement, recorded
    assert (tmp_path / "run" / "samples" / "EHRXDiff_w_null@shuffled-s2" / "seed1").is_dir()
    assert (tmp_path / "run" / "samples" / "EHRXDiff@shuffled-s3" / "seed1").is_dir()   # EHRXDiff at its own s
    assert "s = 3 (EHRXDiff), s = 2 (EHRXDiff_w_null)" in (tmp_path / "fig" / "table2_imagenome_auroc.md").read_text()
    sampling = pd.read_csv(tmp_path / "run" / "samples" / "sampling_summary.csv")   # 04: every run and seed once
    drawn = sampling[sampling["method"] != "VAE reconstruction of I_trg"]
    assert (drawn["written"] + drawn["skipped"]).eq(8).all()
    assert len(drawn) == len(drawn[["method", "seed"]].drop_duplicates()) == sum(
        len(r.seeds) for r in models.sample_runs(load_config("smoke")))
    sweep = pd.read_csv(tmp_path / "fig" / "table_guidance_sweep.csv", index_col=0)
    assert {"s = 0, own S_event", "s = 1, own S_event", "s = 2, own S_event", "s = 2, shuffled S_event"} == set(
        sweep.index) and "re-id rank" in sweep
    claims = pd.read_csv(tmp_path / "run" / "eval" / "claims.csv")
    assert claims["verdict"].str.match(r"holds|fails|undecided \(").all() and len(claims) == 7
    assert {"margin", "ours sd", "compared sd"} <= set(claims.columns)
    for model in ("EHRXDiff", "EHRXDiff_w_null"):     # event_global findings: the head fitted before training
        head = json.loads((tmp_path / "run" / "ldm" / model / "findings_head.json").read_text())
        assert head["labelled"] > 0 and 0 <= head["valid_macro_auroc"] <= 1
    saved = json.loads((tmp_path / "run" / "ldm" / "EHRXDiff_w_null" / "pipeline" / "model_index.json").read_text())
    assert saved["event_guidance_scale"] == 2.0          # pipe(...) of the saved pipeline samples as the study did
    assert saved["guidance_reference"] == "withheld"     # against the condition its event dropout trained
    sens = pd.read_csv(tmp_path / "run" / "ldm" / "conditioning_sensitivity.csv", index_col=0)   # 04
    assert {"own condition", "I_prev swapped", "S_event swapped"} <= set(sens.columns) and len(sens) >= 2
    reid = pd.read_csv(tmp_path / "run" / "samples" / "reidentification.csv")   # 04: does I_pred follow I_prev?
    assert {"GT", "EHRXDiff", "EHRXDiff_w_null"} <= set(reid["method"]) and reid["rank_percentile"].between(0, 1).all()
    t4 = pd.read_csv(tmp_path / "fig" / "table4_ablation.csv", index_col=0)
    assert t4["re-id rank"].ne("–").all()
    assert "xattn-CLIPtab 2 steps" in (tmp_path / "fig" / "table4_ablation.md").read_text()   # trained less: said
    table_sens = pd.read_csv(tmp_path / "fig" / "table_conditioning_sensitivity.csv", index_col=0)
    assert set(table_sens.index) == set(sens.index) and "I_prev swapped (% change)" in table_sens
    assert any((tmp_path / "run" / "latent_cache").glob("first_stage-*/tensors.safetensors"))
    assert any((tmp_path / "run" / "latent_cache").glob("conditions-*/tensors.safetensors"))
    for fig in ("fig_qualitative", "fig_difference_maps", "fig_table2_auroc_bars"):
        assert (tmp_path / "fig" / f"{fig}.png").exists() and (tmp_path / "fig" / f"{fig}.pdf").exists()
    # 07: what-if, uncertainty, rollout and sampler study write their CSVs and figures
    sim = tmp_path / "run" / "simulation"
    for name in ("whatif_effects", "whatif_agreement", "whatif_observed", "uncertainty_spread", "calibration", "rollout",
                 "sampler_study"):
        assert len(pd.read_csv(sim / f"{name}.csv")) > 0, name
    for fig in ("fig_whatif_example", "fig_whatif_effects", "fig_uncertainty", "fig_calibration", "fig_rollout",
                "fig_sampler_study"):
        assert (tmp_path / "fig" / f"{fig}.png").exists() and (tmp_path / "fig" / f"{fig}.pdf").exists(), fig
    agree = pd.read_csv(tmp_path / "fig" / "table_whatif_agreement.csv")
    assert set(agree["events"]) == {"own", "shuffled"} and agree["agreement"].between(0, 1).any()
    assert (sim / "whatif_shuffled_events.csv").exists()
    observed = pd.read_csv(tmp_path / "fig" / "table_whatif_observed.csv")      # the pairs' own association
    assert {"diuretic", "antibiotic"} >= set(observed["intervention"])
    assert len(observed) and (observed["n_with"] + observed["n_without"]).gt(0).all()
    effects = pd.read_csv(sim / "whatif_effects.csv")
    assert effects["delta_true"].notna().all()       # the synthetic world's truth next to every model effect
    # the events' linear probes (python -m ehrxdiff.bench probe) on this run's notebooks 01-03
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.bench", "probe", "--profile", "smoke", "-p", "data_dir",
                        str(tmp_path / "data"), "-p", "run_dir", str(tmp_path / "run"), "--out", str(tmp_path / "probe")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = pd.read_csv(tmp_path / "probe" / "probe.csv")
    assert len(probe) == 7 and probe[["all", "same"]].apply(lambda c: c.between(0, 1)).all().all()
    assert set(probe["features"]) == {"previous labels", "raw event embeddings", "frozen CLIP table tokens",
                                      "frozen CLIP table tokens + I_prev image tokens"}
    # does the UNet draw what its findings head says (python -m ehrxdiff.bench render) on this run's trained model:
    # its "head" row re-draws the study's own predictions, the oracle and I_prev-label rows draw other films
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.bench", "render", "--profile", "smoke", "-p", "data_dir",
                        str(tmp_path / "data"), "-p", "run_dir", str(tmp_path / "run"), "--seeds", "1",
                        "--out", str(tmp_path / "render")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    render = pd.read_csv(tmp_path / "render" / "render.csv")
    assert list(render["signal"]) == ["head P(finding), no image", "images, head", "images, I_trg labels (oracle)",
                                      "images, I_prev labels"]
    assert render[["all", "same"]].apply(lambda c: c.between(0, 1)).all().all()
    ours = sorted((tmp_path / "run" / "samples" / "EHRXDiff_w_null@s2" / "seed1").glob("*.png"))
    assert len(ours) == 8
    for png in ours:
        study = np.asarray(Image.open(png), dtype=float)
        again = np.asarray(Image.open(tmp_path / "render" / "head" / "seed1" / png.name), dtype=float)
        assert np.abs(study - again).mean() < 0.5, png.name     # the same model and seed (up to thread rounding)
    told = [np.asarray(Image.open(tmp_path / "render" / "I-trg" / "seed1" / p.name)) for p in ours]
    assert any(not np.array_equal(np.asarray(Image.open(p)), t) for p, t in zip(ours, told))
    (tmp_path / "render" / "render_of.json").write_text("{}")    # as if another model had drawn them: not resumed
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.bench", "render", "--profile", "smoke", "-p", "data_dir",
                        str(tmp_path / "data"), "-p", "run_dir", str(tmp_path / "run"), "--seeds", "1",
                        "--out", str(tmp_path / "render")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "PNGs of another model or sampler; removed" in r.stderr, r.stderr[-3000:]
    assert pd.read_csv(tmp_path / "render" / "render.csv")[["all", "diff", "same"]].equals(
        render[["all", "diff", "same"]])                                          # drawn again: the same films
