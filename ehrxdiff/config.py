"""One parameter path: profile file → papermill → the notebook's ``parameters`` cell → :class:`StudyConfig`.

Every notebook's parameters cell holds two names: ``profile`` (``smoke``, ``demo``, ``paper`` or a path to a
YAML file) and ``params`` (a dict of overrides). ``load_config(profile, params)`` layers defaults ← profile
file ← overrides, checks every key and type, and returns a frozen object; an unknown key is an error that
names the closest known key (nanoGPT's configurator habit). ``./run_all.sh -p KEY VALUE`` goes through
:func:`main` (``python -m ehrxdiff.config resolve``) so a typo fails before any notebook starts.

API keys are deliberately *not* config: they come from the environment only (papermill writes parameters
into the executed notebooks).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ehrxdiff import constants as C
from ehrxdiff.constants import EVENT_TABLES, IMAGENOME_LABELS, TABLE_IV_VARIANTS, WHATIF_DEFAULT, WHATIF_INTERVENTIONS
from ehrxdiff.data.events import event_columns, unknown_columns
from ehrxdiff.data.schemas import IMAGENOME_SUBDIR, MIMIC_CXR_SUBDIR, MIMIC_IV_SUBDIR

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "configs"
WEIGHT_KEYS = ("clip_image_weights", "vae_weights", "xrv_weights", "age_model_weights")
"""Pretrained components, each read from a local file in the format it is released in (never downloaded):
open_clip / OpenAI ViT (§II-B), Cheff's autoencoder (§II-C), torchxrayvision's DenseNet-121 (§10.6), the Riken
age model (§10.5). Tested with small files in those formats (``tests/test_local_weights.py``)."""


class ConfigError(ValueError):
    """A bad profile or parameter, reported as one line."""


@dataclass(frozen=True)
class StudyConfig:
    profile: str = "demo"
    # -- where things are (relative paths are relative to the repository root) --------------------------
    data_dir: str = "data"
    run_dir: str = "runs/{profile}"          # models, caches, samples, executed notebooks
    figures_dir: str = "figures"             # tables and figures (smoke writes under its run_dir)
    mimic_iv_dir: str | None = None          # real MIMIC-IV v2.2 root (…/mimiciv/2.2); unset → synthetic
    mimic_cxr_dir: str | None = None         # real MIMIC-CXR-JPG v2.0.0 root
    imagenome_dir: str | None = None         # real Chest ImaGenome v1.0.0 root
    own_images: str | None = None            # your own cohort (docs/own-cohort.md, ehrxdiff.data.own_cohort):
    own_events: str | None = None            #   images + events tables, instead of MIMIC and the synthetic world
    own_image_root: str | None = None        #   where relative image paths start (unset → the images table's folder)
    check_images: str = "decode"             # decode | header | none: how hard image files are checked (both paths)
    synthetic_n_patients: int = 1000
    synthetic_seed: int = 0
    synthetic_image_size: int = 256          # stored resolution (the reference stores 256 px, §4)
    seed: int = 42
    num_workers: int = 0
    # -- cohort (§II-D, paper-reference §2, D1, D12) -------------------------------------------------------
    pairing: str = "all_earlier"             # all_earlier (reference code) | consecutive (paper wording)
    max_interval_hours: float = float(C.MAX_INTERVAL_HOURS)
    min_age: int = C.MIN_AGE
    split_seed: int = C.SPLIT_SEED
    test_fraction: float = C.TEST_FRACTION
    valid_fraction: float = C.VALID_FRACTION
    split_file: str | None = None            # the reference's dataset_split.json, when the user has it
    duckdb_memory_limit: str = "4GB"
    duckdb_threads: int = 2
    # -- events (§II-D, D2, D7, D8) ----------------------------------------------------------------------
    max_events: int = C.MAX_EVENTS
    event_budget_last: list = field(default_factory=list)   # tables that fill max_events after all others ([] =
                                             # the reference's most recent max_events; not in the paper)
    text_style: str = "plain"                # plain | genhpf_digits
    filter_inputevents: bool = True
    drug_matching: str = "casefold"          # casefold (tall-man / lower-case names match) | exact (the reference's)
    event_window_end: str = "exclusive"      # S_event: prev <= t < target (no event charted with I_trg) | inclusive (reference)
    embedding_backend: str = "local"         # local | hashing | openai
    embedding_dim: int = 384                 # hashing backend only
    embedding_model_path: str | None = None  # local backend; unset → the bundled all-MiniLM-L6-v2
    openai_provider: str = "openai"          # openai | azure (the paper's: Azure OpenAI)
    openai_model: str = "text-embedding-ada-002"   # provider openai: the model name
    openai_base_url: str | None = None       # provider openai: unset → api.openai.com (set: a proxy or a local server)
    openai_azure_endpoint: str | None = None  # provider azure: https://<resource>.openai.azure.com
    openai_azure_deployment: str | None = None  # provider azure: the deployment of the model (unset → openai_model)
    openai_api_version: str = "2022-12-01"   # provider azure (the reference's)
    allow_external_api: bool = False         # MIMIC-derived text leaves the machine only when True (DUA)
    # -- images and CLIP (§II-B, §III-A, D5, D11) --------------------------------------------------------
    image_size: int = 64                     # model input (paper 256)
    clip_patch_size: int = 8                 # 64/8 → 8x8 grid + CLS = 65 tokens, the paper's token layout
    clip_width: int = 192                    # D_CLIP (paper 768)
    clip_layers: int = 4
    clip_heads: int = 4
    clip_table_layers: int = 2
    clip_table_width: int | None = None      # table transformer width; unset → the event embedding width
    clip_table_heads: int = 6
    clip_epochs: int = 10
    clip_batch_size: int = 64
    clip_lr: float = 5e-4
    clip_weight_decay: float = 0.2
    clip_warmup_steps: int = 20
    clip_image_weights: str | None = None    # local OpenAI/open_clip ViT weights
    clip_checkpoint_every: int = 200         # optimizer steps between resumable checkpoints
    checkpoint_limit: int = 2                # newest checkpoints kept per training run
    # -- VAE (D10) ---------------------------------------------------------------------------------------
    vae_channels: list = field(default_factory=lambda: [32, 64, 64])
    vae_latent_channels: int = C.LATENT_CHANNELS
    latent_scale: float | None = C.LATENT_SCALE   # Cheff's scale_factor [R]; None → measured 1/std (LDM's scale_by_std)
    vae_layers_per_block: int = 2            # res blocks per level (Cheff: 2); CPU profiles use 1
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_weights: str | None = None           # local Cheff checkpoint
    # -- LDM (§II-C, Eq. 2, D3, D4, D6) ------------------------------------------------------------------
    unet_channels: list = field(default_factory=lambda: [64, 128, 128])
    unet_heads: int = 4
    unet_layers_per_block: int = 2           # res blocks per level (paper num_res_blocks 2); CPU profiles use 1
    unet_time_scale_shift: str = "default"   # how the time (+ event_global) embedding enters each ResNet block:
                                             # "default" adds it (the reference), "scale_shift" FiLM (scale and shift)
    context_tokens: int = 64                 # C_fusion (paper 1024)
    ldm_steps: int = 300                     # optimizer steps per main model (EHRXDiff, EHRXDiff_w_null)
    ablation_ldm_steps: int | None = None    # steps per Table IV ablation row; unset → ldm_steps (fewer: caption says so)
    ldm_cache_first_stage: bool = True       # VAE posteriors computed once (ehrxdiff.training.cache), not every step
    ldm_clip_trainable: bool = True          # fine-tune the CLIP towers with Eq. 2 (reference); False → tokens cached
    null_augmentations: int = 4              # cached jittered copies of each w_null null target (cache only)
    snr_gamma: float | None = None           # Min-SNR-γ loss weighting (Hang et al. 2023); None → plain Eq. 2 (paper)
    event_dropout: float = 0.0               # share of real pairs trained with the null event set (not in the paper)
    dropped_events: str = "null_set"         # what a dropped pair gets: null_set (S_null) | withheld (one zero token,
    #                                          models.ldm.withheld_table): event guidance's reference either way
    null_sample_share: float | None = None   # w_null's null samples as this share of the training set (cache only);
    #                                          None → one per unique target (§II-D, the paper)
    adaptor_fusion: str = "linear"           # linear (paper: token-axis Linear) | tokens (side by side; not in the paper)
    event_global: str = "none"               # S_event in the UNet's time embedding too (not in the paper; issue 14):
    #                                          none (paper) | pooled (mean+max of the table tokens) | findings (P(finding)
    #                                          of a head fitted on the train pairs' labels; training.findings;
    #                                          a study without finding labels builds its models without the head) |
    #                                          findings_prev (the head reads I_prev's pooled CLIP image tokens too)
    ldm_parallel_models: int = 1             # models trained at once, one worker process each (CPU: cores split)
    ldm_batch_size: int = 16
    ldm_grad_accum: int = 1                  # effective batch = batch x accumulation (paper 128)
    ldm_lr: float = 2e-4                     # paper 5e-5 at batch 128 for ~100 epochs; CPU demo runs short
    ema_decay: float = 0.999                 # paper 0.9999
    ldm_mixed_precision: str = "auto"        # auto (bf16/fp16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16
    beta_start: float = C.BETA_START         # noise schedule (§II-C; sqrt-linear, 1000 steps) [R configs]
    beta_end: float = C.BETA_END
    null_events: str = "learned_token"       # learned_token (D3) | zeros (reference)
    augment_targets: str = "null_only"       # null_only (paper, D4) | all (reference)
    ablation_variants: list = field(default_factory=list)   # Table IV rows (adaptor.TABLE_IV_VARIANTS) besides the final model
    validate_every: int = 100                # optimizer steps between validation losses (VAE, LDM)
    sampler: str = "ddim"                    # ddim (paper: 100 steps, eta 1) | dpm (fast)
    sample_steps: int = 50
    sample_eta: float = 1.0
    sample_clip_x0: float | None = None      # clip predicted x0 to ±this (not in the paper; for short CPU runs)
    event_guidance_scale: float = 1.0        # guidance on S_event vs the null event set (not in the paper; 1 = none)
    event_guidance_by_model: dict = field(default_factory=dict)   # model → its own s, in place of event_guidance_scale
    guidance_sweep: list = field(default_factory=list)   # more s for EHRXDiff_w_null's guidance sweep (issue 14)
    sample_seeds: list = field(default_factory=lambda: [0, 1, 2])
    sample_batch_size: int = 32
    eval_max_pairs: int = 0                  # test pairs generated and scored (0 = the whole test split)
    ablation_seeds: int = 1                  # sampling seeds for Table IV rows (the main models use all)
    use_ema_for_sampling: bool = True
    # -- evaluation (D9) ---------------------------------------------------------------------------------
    evaluator_arch: str = "demo"             # demo (narrow DenseNet) | densenet121 (XRV architecture)
    eval_epochs: int = 6
    eval_batch_size: int = 64
    eval_image_size: int = 64
    xrv_weights: str | None = None           # local torchxrayvision DenseNet-121 weights
    age_model_weights: str | None = None     # local Riken age model
    # -- beyond the paper: notebook 07 (issue 7; what-if, uncertainty, rollout, sampler study; ehrxdiff/study/simulation.py)
    simulation_model: str = "EHRXDiff_w_null"   # the notebook-04 model notebook 07 simulates with
    # None: the built-ins diuretic and antibiotic (constants.WHATIF_DEFAULT; intubation is built in too) on
    # MIMIC-shaped data, every whatif_definitions entry on an own cohort; else names from either (docs/methods.md)
    whatif_interventions: list | None = None
    whatif_definitions: dict = field(default_factory=dict)   # name → {events: [{table, column: value…}], lowers: [...]}
    # tables a figure caption shows first when S_event is too long to print (None: MIMIC's treatments, labs, then
    # vitals on MIMIC-shaped data; no table order on an own cohort, whose tables have its own names)
    event_salience: list | None = None
    whatif_pairs: int = 100                  # test pairs each intervention is added to (agreement with the world)
    whatif_seeds: int = 2                    # sampling seeds per history (the same ones for factual and edited)
    uncertainty_pairs: int = 16              # test pairs sampled uncertainty_samples times
    uncertainty_samples: int = 16
    rollout_chains: int = 32                 # chains of consecutive test pairs rolled out
    rollout_max_steps: int = 5
    rollout_seeds: int = 2
    sampler_study_pairs: int = 100           # scored test pairs generated per (sampler, steps)
    sampler_study_samplers: list = field(default_factory=lambda: ["ddim", "dpm"])
    sampler_study_steps: list = field(default_factory=lambda: [10, 20, 50, 100])

    # ---------------------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """A path-valued key, resolved against the repository root (``{profile}`` substituted)."""
        value = getattr(self, key)
        if value is None:
            raise ConfigError(f"{key} is not set")
        p = Path(str(value).format(profile=Path(self.profile).stem)).expanduser()
        return p if p.is_absolute() else ROOT / p

    def weights(self, key: str) -> Path | None:
        """A local-weight key (:data:`WEIGHT_KEYS`) resolved like :meth:`path`, or None when unset (then the
        component is trained from scratch, or, for ``age_model_weights``, age comes from the evaluator's head)."""
        if key not in WEIGHT_KEYS:
            raise ConfigError(f"{key} is not a local-weight key ({', '.join(WEIGHT_KEYS)})")
        return None if getattr(self, key) is None else self.path(key)

    def interventions(self) -> dict[str, dict]:
        """The what-if interventions notebook 07 adds, name → ``{"events": [(table, values)], "lowers": (finding,
        …), "action": world action or None}`` (validated at load, :func:`_interventions`). ``action`` is the
        synthetic world's: only a built-in has one, so only a built-in is scored against the world's truth."""
        return _interventions(self)

    @property
    def synthetic(self) -> bool:
        """True when the study runs on the generated world (no real data path set)."""
        return self.mimic_iv_dir is None and self.mimic_cxr_dir is None and self.own_images is None

    @property
    def own_cohort(self) -> bool:
        """True when the study runs on the user's own images/events tables (no MIMIC, no ImaGenome)."""
        return self.own_images is not None

    @property
    def synthetic_root(self) -> Path:
        return self.path("data_dir") / "synthetic" / f"n{self.synthetic_n_patients}_s{self.synthetic_seed}_px{self.synthetic_image_size}"

    def source_dirs(self) -> dict[str, Path]:
        """Release roots: the real downloads when given, otherwise the synthetic world's tree."""
        if self.own_cohort:
            root = self.path("own_image_root") if self.own_image_root else self.path("own_images").parent
            return {"mimic_cxr": root}
        if self.synthetic:
            r = self.synthetic_root
            return {"mimic_iv": r / MIMIC_IV_SUBDIR, "mimic_cxr": r / MIMIC_CXR_SUBDIR, "imagenome": r / IMAGENOME_SUBDIR}
        if self.mimic_iv_dir is None or self.mimic_cxr_dir is None:
            raise ConfigError("real data needs both mimic_iv_dir and mimic_cxr_dir")
        out = {"mimic_iv": self.path("mimic_iv_dir"), "mimic_cxr": self.path("mimic_cxr_dir")}
        if self.imagenome_dir is not None:
            out["imagenome"] = self.path("imagenome_dir")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}
_HINTS = typing.get_type_hints(StudyConfig)


def _coerce(key: str, value, source: str):
    """Check one value against the field's type; ints are accepted for floats; strings parse as YAML scalars."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    base = typing.get_origin(base) or base
    if isinstance(value, str) and base is not str:
        raw, value = value, yaml.safe_load(value)
        if base is float and isinstance(value, str):   # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(raw)
            except ValueError:
                pass
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(f"{source}: {key} must be {base.__name__}, got {value!r}")
    return value


def _apply(values: dict, updates: dict, source: str) -> None:
    for key, value in (updates or {}).items():
        if key not in _FIELDS:
            near = difflib.get_close_matches(key, _FIELDS, n=1)
            raise ConfigError(f"{source}: unknown config key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        values[key] = _coerce(key, value, source)


def profile_file(profile: str) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        p = p if p.is_absolute() else ROOT / p
    else:
        p = PROFILES_DIR / f"{profile}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}: no file {p} (known: {', '.join(known)})")
    return p


def _profile_layers(profile: str, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The profile file's keys, after those of the profile it ``extends`` (a name or a path), base first."""
    path = profile_file(profile)
    if path in seen:
        raise ConfigError(f"{path}: profiles extend each other in a cycle")
    try:
        from_file = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(from_file, dict):
        raise ConfigError(f"{path}: must be a mapping of config keys")
    base = from_file.pop("extends", None)
    return (_profile_layers(str(base), seen + (path,)) if base is not None else []) + [(path, from_file)]


def load_config(profile: str = "demo", params: dict | None = None) -> StudyConfig:
    """Defaults ← ``configs/<profile>.yaml`` (after the profile it ``extends``, if any) ← ``params``; every key and
    type validated."""
    values: dict = {"profile": Path(profile).stem}
    for path, from_file in _profile_layers(profile):
        _apply(values, from_file, str(path))
    _apply(values, params or {}, "params")
    cfg = StudyConfig(**values)
    _validate(cfg)
    return cfg


_EVENT_VALUE_TYPES = (str, int, float, bool)


def _definition(name: str, d) -> dict:
    """One ``whatif_definitions`` entry checked and normalised (unknown keys, empty events, non-scalar values,
    findings the evaluator does not score are errors)."""
    where = f"whatif_definitions.{name}"
    if not isinstance(d, dict) or set(d) - {"events", "lowers"} or not d.get("events"):
        raise ConfigError(f"{where}: expected {{events: [{{table: <table>, <column>: <value>, ...}}, ...], "
                          f"lowers: [<finding>, ...]}}, got {d!r}")
    events = []
    for i, ev in enumerate(d["events"]):
        if not isinstance(ev, dict) or not isinstance(ev.get("table"), str) or len(ev) < 2:
            raise ConfigError(f"{where}.events[{i}]: an event is a mapping with 'table' and at least one "
                              f"column (or 'text'), got {ev!r}")
        values = {k: v for k, v in ev.items() if k != "table"}
        bad = [k for k, v in values.items() if not isinstance(k, str) or not isinstance(v, _EVENT_VALUE_TYPES)]
        if bad:
            raise ConfigError(f"{where}.events[{i}]: values must be text or numbers; not {bad}")
        if ev["table"] in EVENT_TABLES:
            # a MIMIC table: its columns are the extraction's; the check reads the reference's item filters
            # from disk, so it runs only for definitions that name a MIMIC table
            unknown = unknown_columns(ev["table"], values)
            if unknown:
                raise ConfigError(f"{where}.events[{i}]: {ev['table']} has no serialized column(s) {unknown} "
                                  f"(its columns: {', '.join(event_columns(ev['table']))})")
        events.append((ev["table"], values))
    lowers = d.get("lowers") or []
    unknown = [f for f in lowers if f not in IMAGENOME_LABELS]
    if not isinstance(lowers, list) or unknown:
        raise ConfigError(f"{where}.lowers: findings the evaluator scores ({', '.join(IMAGENOME_LABELS)}); "
                          f"not {unknown or lowers!r}")
    return {"events": events, "lowers": tuple(lowers), "action": None}


def _interventions(c: StudyConfig) -> dict[str, dict]:
    """``whatif_interventions`` resolved against the built-ins and ``whatif_definitions`` (a definition wins
    over a built-in of the same name). The built-ins add MIMIC prescriptions/inputevents/procedureevents rows,
    which an own cohort never contains: named on an own cohort they are an error, not a silent what-if."""
    if not isinstance(c.whatif_definitions, dict):
        raise ConfigError(f"whatif_definitions must be a mapping name → definition, got {c.whatif_definitions!r}")
    defined = {str(k): _definition(str(k), v) for k, v in c.whatif_definitions.items()}
    names = c.whatif_interventions if c.whatif_interventions is not None else \
        list(defined if c.own_cohort else WHATIF_DEFAULT)
    out = {}
    for name in names:
        if name in defined:
            out[name] = defined[name]
        elif name in WHATIF_INTERVENTIONS and c.own_cohort:
            raise ConfigError(f"whatif_interventions: {name!r} is a built-in MIMIC intervention (it adds "
                              f"{', '.join(t for t, _ in WHATIF_INTERVENTIONS[name]['events'])} rows) and this "
                              "is an own cohort: define the intervention in your tables' terms in "
                              "whatif_definitions (docs/methods.md, \"What-if interventions\")")
        elif name in WHATIF_INTERVENTIONS:
            b = WHATIF_INTERVENTIONS[name]
            out[name] = {"events": list(b["events"]), "lowers": tuple(b["lowers"]), "action": dict(b["action"])}
        else:
            raise ConfigError(f"whatif_interventions: unknown {name!r} (built-in: {', '.join(WHATIF_INTERVENTIONS)}"
                              f"; defined: {', '.join(defined) or 'none'})")
    return out


def _validate(c: StudyConfig) -> None:
    choices = {"pairing": ("all_earlier", "consecutive"), "text_style": ("plain", "genhpf_digits"),
               "embedding_backend": ("local", "hashing", "openai"), "null_events": ("learned_token", "zeros"),
               "augment_targets": ("null_only", "all"), "dropped_events": ("null_set", "withheld"), "sampler": ("ddim", "dpm"), "adaptor_fusion": ("linear", "tokens"),
               "event_global": ("none", "pooled", "findings", "findings_prev"),
               "ldm_mixed_precision": ("auto", "fp32", "bf16", "fp16"),  # not "no": YAML reads it as False
               "evaluator_arch": ("demo", "densenet121"), "check_images": ("decode", "header", "none"),
               "openai_provider": ("openai", "azure"), "drug_matching": ("casefold", "exact"),
               "event_window_end": ("exclusive", "inclusive"), "unet_time_scale_shift": ("default", "scale_shift")}
    for key, ok in choices.items():
        if getattr(c, key) not in ok:
            raise ConfigError(f"{key} must be one of {', '.join(ok)}, got {getattr(c, key)!r}")
    for key in ("synthetic_n_patients", "synthetic_image_size", "image_size", "max_events", "clip_epochs",
                "clip_batch_size", "vae_batch_size", "vae_steps", "ldm_steps", "ldm_batch_size", "ldm_grad_accum", "sample_steps",
                "context_tokens", "eval_batch_size", "eval_image_size", "null_augmentations",
                "ldm_parallel_models"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(c, key)}")
    if c.ablation_ldm_steps is not None and c.ablation_ldm_steps <= 0:
        raise ConfigError(f"ablation_ldm_steps must be positive or null, got {c.ablation_ldm_steps}")
    if c.snr_gamma is not None and c.snr_gamma <= 0:
        raise ConfigError(f"snr_gamma must be positive or null, got {c.snr_gamma}")
    if c.embedding_backend == "openai" and c.openai_provider == "azure" and not c.openai_azure_endpoint:
        raise ConfigError("openai_provider azure needs openai_azure_endpoint (https://<resource>.openai.azure.com) "
                          "and, unless it is named like openai_model, openai_azure_deployment")
    if not isinstance(c.event_budget_last, list) or not all(isinstance(t, str) and t for t in c.event_budget_last) \
            or len(set(c.event_budget_last)) != len(c.event_budget_last):
        raise ConfigError(f"event_budget_last must be a list of distinct table names, got {c.event_budget_last!r}")
    if c.own_events is None and (bad := [t for t in c.event_budget_last if t not in C.EVENT_TABLES]):
        raise ConfigError(f"event_budget_last: {bad} are not MIMIC-IV event tables ({', '.join(C.EVENT_TABLES)})")
    if not 0 <= c.event_dropout < 1:
        raise ConfigError(f"event_dropout must be in [0, 1), got {c.event_dropout}")
    if c.event_dropout and not c.ldm_cache_first_stage:
        raise ConfigError("event_dropout is drawn by the cached training set: it needs ldm_cache_first_stage true")
    if c.null_sample_share is not None and not 0 < c.null_sample_share < 1:
        raise ConfigError(f"null_sample_share must be in (0, 1) or null (one per unique target), got "
                          f"{c.null_sample_share!r}")
    if c.null_sample_share is not None and not c.ldm_cache_first_stage:
        raise ConfigError("null_sample_share is drawn by the cached training set: it needs ldm_cache_first_stage true")
    if c.dropped_events == "withheld" and c.event_dropout and c.ldm_clip_trainable:
        raise ConfigError("dropped_events withheld puts a token in place of the table tower's cached tokens: it needs "
                          "the frozen towers (ldm_clip_trainable false)")
    if not isinstance(c.event_guidance_by_model, dict):
        raise ConfigError(f"event_guidance_by_model must map model names to s, got {c.event_guidance_by_model!r}")
    readers = [*C.MAIN_MODELS, *(v for v in c.ablation_variants if TABLE_IV_VARIANTS.get(v, (None, False, False))[2])]
    if bad := [m for m in c.event_guidance_by_model if m not in readers]:
        raise ConfigError(f"event_guidance_by_model: {bad} are not models of this profile that read S_event "
                          f"({', '.join(readers)})")
    for key, values in (("event_guidance_scale", [c.event_guidance_scale]), ("guidance_sweep", c.guidance_sweep),
                        ("event_guidance_by_model", list(c.event_guidance_by_model.values()))):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf") for v in values):
            raise ConfigError(f"{key} must be finite numbers >= 0 (1 = the paper's sampler), got {values}")
    if c.ldm_cache_first_stage and c.augment_targets == "all":
        raise ConfigError("augment_targets 'all' jitters every target at every step, which a first-stage cache "
                          "cannot hold: set ldm_cache_first_stage false with it")
    if c.image_size % c.clip_patch_size:
        raise ConfigError(f"image_size {c.image_size} is not a multiple of clip_patch_size {c.clip_patch_size}")
    for v in c.ablation_variants:
        if v not in TABLE_IV_VARIANTS:
            raise ConfigError(f"ablation_variants: unknown variant {v!r} (known: {', '.join(TABLE_IV_VARIANTS)})")
    if (c.own_images is None) != (c.own_events is None):
        raise ConfigError("an own cohort needs both own_images and own_events")
    if c.own_images is not None and (c.mimic_iv_dir or c.mimic_cxr_dir):
        raise ConfigError("set either own_images/own_events or mimic_iv_dir/mimic_cxr_dir, not both")
    _interventions(c)             # notebook 07's keys, checked before notebook 01 starts
    for smp in c.sampler_study_samplers:
        if smp not in ("ddim", "dpm"):
            raise ConfigError(f"sampler_study_samplers: {smp!r} is not ddim or dpm")
    if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in c.sampler_study_steps):
        raise ConfigError(f"sampler_study_steps must be positive integers, got {c.sampler_study_steps}")
    for key in WEIGHT_KEYS:       # a missing file fails here, not after notebooks 01-03 have run
        path = c.weights(key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: no such file {path} (weights are read from local files only, never "
                              "downloaded; relative paths are taken from the repository root)")
    if not 0 <= c.test_fraction + c.valid_fraction < 1:
        raise ConfigError("test_fraction + valid_fraction must be in [0, 1)")


def main(argv: list[str] | None = None) -> int:
    """``python -m ehrxdiff.config resolve --profile P [-p KEY VALUE]... --out FILE``: validate, then write
    the papermill parameter file ``{profile: P, params: {...}}`` that every notebook receives.
    ``run-dir`` prints the resolved run folder (absolute)."""
    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.config")
    ap.add_argument("command", choices=["resolve", "show", "run-dir"])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    params = {k: v for k, v in a.param}
    try:
        cfg = load_config(a.profile, params)
        typed = {k: getattr(cfg, k) for k in params}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.command == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if a.command == "run-dir":  # run_all.sh puts the executed notebooks and timings under the run's own folder
        print(cfg.path("run_dir").resolve())
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(yaml.safe_dump({"profile": a.profile, "params": typed}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
