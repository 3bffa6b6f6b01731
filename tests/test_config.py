"""One parameter path: profile file → parameters → a validated config that rejects unknown keys."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ehrxdiff.config import ROOT, ConfigError, StudyConfig, load_config


SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def test_the_four_profiles_ship():
    assert SHIPPED == ["demo", "gpu", "paper", "smoke"]


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_profile_loads(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, StudyConfig) and cfg.profile == profile
    assert cfg.image_size % cfg.clip_patch_size == 0
    assert (cfg.image_size // cfg.clip_patch_size) ** 2 + 1 == 65, "the paper's 65-token layout (§III-A)"


def test_gpu_profile_differs_from_the_demo_only_from_notebook_04_on():
    """configs/gpu.yaml promises the demo's world, cohort, events and CLIP, so a demo run's 01-03 outputs serve it."""
    demo, gpu = load_config("demo").to_dict(), load_config("gpu").to_dict()
    upstream = [k for k in demo if k.startswith(("synthetic", "clip_", "embedding", "split", "pairing"))]
    upstream += ["max_events", "event_budget_last", "image_size", "text_style", "null_events", "max_interval_hours", "min_age", "seed"]
    assert {k: gpu[k] for k in upstream} == {k: demo[k] for k in upstream}
    assert gpu["ldm_steps"] > demo["ldm_steps"] and gpu["vae_steps"] > demo["vae_steps"]


def test_overrides_layer_over_the_profile_and_are_typed():
    cfg = load_config("smoke", {"clip_epochs": "3", "clip_lr": 1, "mimic_iv_dir": "/data/mimiciv/2.2"})
    assert cfg.clip_epochs == 3 and cfg.clip_lr == 1.0 and isinstance(cfg.clip_lr, float)
    assert cfg.synthetic is False is (cfg.mimic_iv_dir is None)


def test_a_float_in_e_notation_without_a_dot_is_a_float():
    """``-p ldm_lr 1e-3``: YAML 1.1 reads it as a string; the config reads it as the number it is."""
    assert load_config("smoke", {"ldm_lr": "1e-3"}).ldm_lr == 1e-3
    with pytest.raises(ConfigError, match="ldm_lr must be float"):
        load_config("smoke", {"ldm_lr": "fast"})


def test_unknown_key_is_an_error_that_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'clip_epochs'"):
        load_config("smoke", {"clip_epochz": 2})


@pytest.mark.parametrize("bad", [{"clip_epochs": 1.5}, {"filter_inputevents": "maybe"}, {"pairing": "random"},
                                 {"image_size": -64}, {"image_size": 30}, {"ldm_mixed_precision": False},
                                 {"ldm_mixed_precision": "fp8"}, {"snr_gamma": 0}, {"ablation_ldm_steps": 0},
                                 {"null_augmentations": 0}, {"ldm_clip_trainable": 1}, {"event_dropout": 1.0},
                                 {"ldm_parallel_models": 0}, {"event_global": True}, {"event_global": "mean"},
                                 {"dropped_events": "zeros"}, {"null_sample_share": 0}, {"null_sample_share": 1.0},
                                 {"dropped_events": "withheld", "event_dropout": 0.1, "ldm_clip_trainable": True},
                                 {"null_sample_share": 0.2, "ldm_cache_first_stage": False, "event_dropout": 0.0}])
def test_bad_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        load_config("smoke", bad)


def test_paths_resolve_against_the_repository_and_profile():
    cfg = load_config("smoke")
    assert cfg.path("run_dir") == ROOT / "runs" / "smoke"
    assert cfg.synthetic_root.is_relative_to(ROOT / "data" / "synthetic")


def test_cli_fails_with_one_line_before_any_notebook_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.config", "resolve", "--profile", "smoke", "-p", "nope", "1",
                        "--out", str(tmp_path / "p.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown config key 'nope'" in r.stderr
    assert not (tmp_path / "p.yaml").exists()
    r = subprocess.run([sys.executable, "-m", "ehrxdiff.config", "resolve", "--profile", "smoke", "-p", "clip_epochs",
                        "2", "--out", str(tmp_path / "p.yaml")], capture_output=True, text=True)
    assert r.returncode == 0 and "clip_epochs: 2" in (tmp_path / "p.yaml").read_text()


def test_no_api_key_is_a_config_key():
    """Keys come from the environment only: papermill writes parameters into executed notebooks."""
    assert not [f for f in StudyConfig.__dataclass_fields__ if "key" in f.lower() or "token" in f.lower()
                and f != "context_tokens"]


def test_fp32_is_the_configs_name_for_no_autocast():
    from ehrxdiff.training.train_ldm import resolve_mixed_precision
    assert load_config("smoke", {"ldm_mixed_precision": "fp32"}).ldm_mixed_precision == "fp32"
    assert resolve_mixed_precision("fp32") == "no" and resolve_mixed_precision("bf16") == "bf16"


def test_study_seed_fixes_the_initial_weights_whatever_the_rng_did_before():
    """shared.seed_everything runs before every model is built: the initial weights must not depend on what consumed
    the RNG earlier."""
    import torch

    from ehrxdiff.study import shared
    cfg = load_config("smoke")
    weights = []
    for burn in (0, 5):
        torch.rand(burn)   # earlier RNG use that differs between runs
        shared.seed_everything(cfg)
        weights.append(torch.nn.Linear(4, 3).weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    shared.seed_everything(load_config("smoke", {"seed": cfg.seed + 1}))
    assert not torch.equal(torch.nn.Linear(4, 3).weight, weights[0])


def test_a_profile_extends_another_and_overrides_its_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("clip_epochs: 3\nimage_size: 64\n")
    (tmp_path / "child.yaml").write_text(f"extends: {tmp_path / 'base.yaml'}\nclip_epochs: 7\n")
    cfg = load_config(str(tmp_path / "child.yaml"), {"image_size": 32})
    assert (cfg.clip_epochs, cfg.image_size, cfg.profile) == (7, 32, "child")
    (tmp_path / "base.yaml").write_text(f"extends: {tmp_path / 'child.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "child.yaml"))
    (tmp_path / "bad.yaml").write_text("extends: demo\nclip_epoch: 7\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'clip_epoch'"):
        load_config(str(tmp_path / "bad.yaml"))


def test_a_first_stage_cache_refuses_per_step_jitter_of_every_target():
    """augment_targets 'all' (the released code) draws a new affine of every target each step: no cache holds that."""
    with pytest.raises(ConfigError, match="ldm_cache_first_stage"):
        load_config("smoke", {"augment_targets": "all"})
    assert load_config("smoke", {"augment_targets": "all", "ldm_cache_first_stage": False,
                                "event_dropout": 0.0, "null_sample_share": None}).augment_targets == "all"


def test_paper_profile_keeps_the_papers_recipe():
    """Fine-tuned CLIP towers and plain Eq. 2 in the paper profile; the demo's short-run recipe is its own."""
    paper, demo = load_config("paper"), load_config("demo")
    assert paper.ldm_clip_trainable and paper.snr_gamma is None
    assert paper.null_sample_share is None and paper.dropped_events == "null_set"   # §II-D: one per unique target
    assert not demo.ldm_clip_trainable and demo.snr_gamma == 5.0
    assert demo.dropped_events == "withheld" and demo.null_sample_share == 0.3



def test_paper_profile_is_the_papers_numbers():
    """constants.py is the paper numbers' one home (issue 17): configs/paper.yaml and the config's defaults for the
    data steps are checked against it, so a copy that drifts fails here."""
    from ehrxdiff import constants as C
    paper, default = load_config("paper"), StudyConfig()
    assert (paper.image_size, paper.clip_width, paper.context_tokens, paper.max_events) == \
        (C.IMAGE_SIZE, C.D_CLIP, C.C_FUSION, C.MAX_EVENTS)
    assert (paper.image_size // paper.clip_patch_size) ** 2 + 1 == C.N_IMAGE_TOKENS
    assert 2 ** (len(paper.vae_channels) - 1) == C.VAE_DOWNSAMPLE and paper.vae_latent_channels == C.LATENT_CHANNELS
    assert paper.unet_channels == [C.UNET_BASE_CHANNELS * m for m in C.UNET_CHANNEL_MULT]
    assert paper.unet_heads == C.UNET_HEADS and (paper.clip_table_layers, paper.clip_table_heads) == \
        (C.TABLE_LAYERS, C.TABLE_HEADS)
    assert paper.ldm_lr == C.LDM_LR and paper.ldm_batch_size * paper.ldm_grad_accum == C.EFFECTIVE_BATCH
    assert paper.ema_decay == C.EMA_DECAY and (paper.sample_steps, paper.sample_eta) == (C.DDIM_STEPS, C.DDIM_ETA)
    assert (paper.clip_batch_size, paper.clip_lr, paper.clip_weight_decay) == (C.CLIP_BATCH, C.CLIP_LR, C.CLIP_WD)
    assert (paper.latent_scale, paper.beta_start, paper.beta_end) == (C.LATENT_SCALE, C.BETA_START, C.BETA_END)
    assert (default.max_interval_hours, default.min_age, default.split_seed, default.test_fraction,
            default.valid_fraction) == (C.MAX_INTERVAL_HOURS, C.MIN_AGE, C.SPLIT_SEED, C.TEST_FRACTION,
                                        C.VALID_FRACTION)

# ------------------------------------------------------------------------------- what-if interventions (issue 16)
OWN = {"own_images": "images.csv", "own_events": "events.csv"}
OWN_DIURETIC = {"diuretic": {"events": [{"table": "drugs", "item": "furosemide", "value": 40, "text": "iv push"}],
                             "lowers": ["pulmonary edema/hazy opacity", "pleural effusion"]}}


def test_whatif_interventions_are_the_builtins_on_mimic_data_and_the_defined_ones_on_an_own_cohort():
    syn = load_config("smoke").interventions()
    assert list(syn) == ["diuretic", "antibiotic"] and syn["diuretic"]["action"] == {"furosemide_mg": 40.0}
    assert load_config("smoke", OWN).interventions() == {}            # nothing MIMIC-shaped is added by default
    own = load_config("smoke", OWN | {"whatif_definitions": OWN_DIURETIC}).interventions()
    assert own == {"diuretic": {"events": [("drugs", {"item": "furosemide", "value": 40, "text": "iv push"})],
                                "lowers": ("pulmonary edema/hazy opacity", "pleural effusion"), "action": None}}
    # on MIMIC-shaped data a definition wins over the built-in of its name (and has no world truth), the rest stay
    mixed = load_config("smoke", {"whatif_definitions": OWN_DIURETIC,
                                  "whatif_interventions": ["diuretic", "antibiotic"]}).interventions()
    assert mixed["diuretic"]["action"] is None and mixed["antibiotic"]["action"] == {"antibiotic_start": 120.0}
    # the profile path: a definition given as YAML text on the command line (-p KEY VALUE) parses the same
    text = "{diuretic: {events: [{table: drugs, item: furosemide, value: 40, text: iv push}], " \
           "lowers: [pulmonary edema/hazy opacity, pleural effusion]}}"
    assert load_config("smoke", OWN | {"whatif_definitions": text}).interventions() == own


@pytest.mark.parametrize("params, message", [
    (OWN | {"whatif_interventions": ["diuretic"]}, r"'diuretic' is a built-in MIMIC intervention \(it adds "
                                                   r"prescriptions, inputevents rows\) and this is an own cohort"),
    ({"whatif_interventions": ["diuresis"]}, r"unknown 'diuresis' \(built-in: diuretic, antibiotic, intubation"),
    ({"whatif_definitions": {"x": {"events": []}}}, r"whatif_definitions\.x: expected"),
    ({"whatif_definitions": {"x": {"events": [{"table": "drugs", "item": "a"}], "lower": []}}}, r"\.x: expected"),
    ({"whatif_definitions": {"x": {"events": [{"item": "a"}]}}}, r"x\.events\[0\]: an event is a mapping with 'table'"),
    ({"whatif_definitions": {"x": {"events": [{"table": "drugs", "item": ["a", "b"]}]}}}, r"must be text or numbers"),
    ({"whatif_definitions": {"x": {"events": [{"table": "drugs", "item": "a"}], "lowers": ["edema"]}}},
     r"x\.lowers: findings the evaluator scores .*not \['edema'\]"),
    ({"whatif_definitions": {"x": {"events": [{"table": "prescriptions", "dose": 40}]}}},
     r"x\.events\[0\]: prescriptions has no serialized column\(s\) \['dose'\]"),
    ({"sampler_study_samplers": ["euler"]}, r"'euler' is not ddim or dpm"),
    ({"sampler_study_steps": [10, 0]}, r"sampler_study_steps must be positive"),
])
def test_bad_whatif_and_sampler_keys_fail_at_load(params, message):
    """Notebook 07's keys are checked with every other key, before notebook 01 starts (not when 07 runs)."""
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", params)


def test_event_budget_last_names_real_tables_once():
    """A misspelt table would leave the budget rule silently unchanged: refused before notebook 01 runs."""
    assert load_config("demo").event_budget_last == ["chartevents"] and load_config("paper").event_budget_last == []
    with pytest.raises(ConfigError, match=r"event_budget_last: \['chart'\] are not MIMIC-IV event tables"):
        load_config("demo", {"event_budget_last": ["chart"]})
    with pytest.raises(ConfigError, match="distinct table names"):
        load_config("demo", {"event_budget_last": ["chartevents", "chartevents"]})
