"""Notebooks 03–04: the CXR–EHR CLIP (§II-C), the first-stage VAE, the latent diffusion models (EHRXDiff, its
w_null twin of §II-D and the Table IV variants), and sampling the test split with its controls (issue 14).

Each step is idempotent (it reuses what an earlier run wrote, so a notebook can be re-run or resumed cheaply) and maps
the :class:`~ehrxdiff.config.StudyConfig` onto the explicit keyword arguments of the modules that do the work. Every
path under ``run_dir`` comes from :mod:`ehrxdiff.study.layout` (``layout(cfg)``), which names them all in one place.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from ehrxdiff.config import StudyConfig
from ehrxdiff.constants import FINAL_VARIANT, IMAGENOME_LABELS, MAIN_MODELS, TABLE_IV_VARIANTS
from ehrxdiff.data.datasets import collate_pairs
from ehrxdiff.data.images import load_image, to_uint8
from ehrxdiff.data.labels import target_label_matrix
from ehrxdiff.data.wnull import WithNullSamples
from ehrxdiff.evaluation.baselines import generated_image_table, pair_image_table
from ehrxdiff.evaluation.identity import reidentification_table
from ehrxdiff.evaluation.metrics import macro_auroc
from ehrxdiff.models.clip import EHRCLIP
from ehrxdiff.models.ldm import ClipConditioner, build_ehrxdiff
from ehrxdiff.models.pipeline import EHRXDiffPipeline
from ehrxdiff.models.sampling import WithEvents, generate_split, png_path, save_png
from ehrxdiff.models.vae import build_vae, load_cheff_checkpoint, measure_latent_scale
from ehrxdiff.reporting.tables import write_table
from ehrxdiff.study.layout import layout
from ehrxdiff.study.prepare import datasets, label_rows, missing_labels_reason
from ehrxdiff.study.shared import figures_dir, seed_everything
from ehrxdiff.training.cache import CachedPairs, ConditionCache, FirstStageCache, collate_cached
from ehrxdiff.training.findings import (fit_findings_head, pooled_cached_tokens, pooled_image_tokens,
                                       pooled_table_tokens)
from ehrxdiff.training.train_clip import train_clip as fit_clip
from ehrxdiff.training.train_ldm import conditioning_sensitivity as loss_sensitivity, train_ldm
from ehrxdiff.training.train_vae import train_vae as fit_vae

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- 03
def clip_model_config(cfg: StudyConfig, event_dim: int) -> dict:
    """EHRCLIP towers from the config (§II-B): image ViT with the 65-token layout (from ``clip_image_weights``
    when set), 2-layer table transformer. The dict is the model's saved config, hence the path as text."""
    weights = cfg.weights("clip_image_weights")
    return {"image": dict(image_size=cfg.image_size, patch_size=cfg.clip_patch_size, width=cfg.clip_width,
                          layers=cfg.clip_layers, heads=cfg.clip_heads,
                          weights_path=None if weights is None else str(weights)),
            "table": dict(event_dim=event_dim, width=cfg.clip_table_width or event_dim, layers=cfg.clip_table_layers,
                          heads=cfg.clip_table_heads, out_dim=cfg.clip_width, null_events=cfg.null_events)}


def collate(cfg: StudyConfig):
    return partial(collate_pairs, max_events=cfg.max_events)


def train_clip(cfg: StudyConfig, ds: dict | None = None) -> dict:
    """CXR–EHR CLIP pre-training on (I_prev, S_event) of the train split; resumes, or loads a finished run."""
    ds = ds or datasets(cfg, ("train", "valid"))
    seed_everything(cfg)
    model = EHRCLIP.from_config(clip_model_config(cfg, ds["train"].store.dim))
    return fit_clip(model, ds["train"], ds["valid"], out_dir=layout(cfg).clip, epochs=cfg.clip_epochs,
               batch_size=cfg.clip_batch_size, collate_fn=collate(cfg), warmup_steps=cfg.clip_warmup_steps,
               checkpoint_every=cfg.clip_checkpoint_every, checkpoint_limit=cfg.checkpoint_limit, seed=cfg.seed,
               lr=cfg.clip_lr, weight_decay=cfg.clip_weight_decay, num_workers=cfg.num_workers)


def load_clip(cfg: StudyConfig):
    return EHRCLIP.from_pretrained(layout(cfg).clip_final)


def ground_truth_images(cfg: StudyConfig) -> pd.DataFrame | None:
    """The synthetic world's per-image truth (severities, devices, pose), or None on real data."""
    if not cfg.synthetic:
        return None
    return pd.read_parquet(layout(cfg).ground_truth("images")).set_index("dicom_id")


# ---------------------------------------------------------------------------------------------------- 04


def norm_groups(channels) -> int:
    """Largest GroupNorm group count ≤ 32 dividing every channel width (tiny CPU models need fewer)."""
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(d for d in range(1, 33) if g % d == 0)


def loader(cfg: StudyConfig, dataset, *, shuffle: bool, batch_size: int | None = None):
    """A DataLoader of image pairs with the study's collate (VAE training, its checks, the uncached LDM path)."""
    return DataLoader(dataset, batch_size=batch_size or cfg.ldm_batch_size, shuffle=shuffle, drop_last=shuffle,
                      collate_fn=collate(cfg), num_workers=cfg.num_workers)


def train_vae(cfg: StudyConfig, ds: dict):
    """The first stage (D10): a local Cheff checkpoint when given, else an f=4 KL-VAE trained on the cohort.

    Its ``config.scaling_factor`` is the latent scale the LDMs use: ``cfg.latent_scale`` (Cheff's 0.18215), or
    measured on train images when that is None (:func:`ehrxdiff.models.vae.measure_latent_scale`)."""
    vae = _first_stage(cfg, ds)
    scale = cfg.latent_scale
    if scale is None:
        scale = measure_latent_scale(vae, loader(cfg, ds["train"], shuffle=False, batch_size=cfg.vae_batch_size),
                                     image_keys=("prev_image", "target_image"))
    vae.register_to_config(scaling_factor=float(scale))
    return vae


def _first_stage(cfg: StudyConfig, ds: dict):
    kw = dict(block_out_channels=tuple(cfg.vae_channels), latent_channels=cfg.vae_latent_channels,
              image_size=cfg.image_size, norm_num_groups=norm_groups(cfg.vae_channels))
    if cfg.vae_weights:
        return load_cheff_checkpoint(cfg.weights("vae_weights"), layers_per_block=cfg.vae_layers_per_block, **kw)
    seed_everything(cfg)
    vae = build_vae(layers_per_block=cfg.vae_layers_per_block, **kw)
    return fit_vae(vae, loader(cfg, ds["train"], shuffle=True, batch_size=cfg.vae_batch_size),
               output_dir=layout(cfg).vae, max_steps=cfg.vae_steps, learning_rate=cfg.vae_lr,
               kl_weight=cfg.vae_kl_weight, image_keys=("prev_image", "target_image"),
               valid_loader=loader(cfg, ds["valid"], shuffle=False, batch_size=cfg.vae_batch_size),
               validate_every=cfg.validate_every, checkpoint_every=cfg.validate_every,
               checkpoint_limit=cfg.checkpoint_limit, seed=cfg.seed)


def variants(cfg: StudyConfig) -> dict[str, tuple[str, bool]]:
    """Every model the profile trains: name → (Table IV adaptor variant, with null samples)."""
    out = {name: (FINAL_VARIANT, wnull) for name, wnull in MAIN_MODELS.items()}
    out |= {v: (v, False) for v in cfg.ablation_variants if v != FINAL_VARIANT}
    return out


def model_seeds(cfg: StudyConfig) -> dict[str, list[int]]:
    """The sampling seeds of every trained model: all of ``sample_seeds`` for the main models (Tables II-III,
    mean ± std over seeds as the paper), the first ``ablation_seeds`` for Table IV's other rows."""
    return {name: list(cfg.sample_seeds if name in MAIN_MODELS else cfg.sample_seeds[:cfg.ablation_seeds])
            for name in variants(cfg)}


OWN_EVENTS, SHUFFLED_EVENTS, NO_EVENTS = "own", "shuffled", "none"
GUIDANCE_SWEEP_MODEL = "EHRXDiff_w_null"   # the model trained on the no-event branch (§II-D null samples)
RECONSTRUCTION = "VAE reconstruction of I_trg"   # Table II's first-stage row (issue 14)


@dataclass(frozen=True)
class SampleRun:
    """One way of sampling a trained model's test predictions (notebook 04), scored as one row (notebook 05).

    ``events``: ``own`` (the pair's S_event, the paper), ``shuffled`` (another test pair's S_event by the fixed
    permutation of :func:`shuffled_events`: the control that says what the events contribute, not in the paper) or
    ``none`` (no S_event: sampled at s = 0, the model's own no-event condition - the reference of its event guidance,
    :func:`guidance_reference`). ``scale``: the event guidance s of
    :class:`ehrxdiff.models.pipeline.EHRXDiffPipeline` (1 = the paper). ``method`` is the row's name in the tables:
    the model's name for its main run."""
    model: str
    events: str
    scale: float
    method: str
    seeds: tuple

    @property
    def folder(self) -> str:
        """``samples/<folder>/seed<k>``: the model's name for own events at s = 1, else tagged with both, so PNGs
        sampled another way are never resumed into a run."""
        tag = {OWN_EVENTS: "", SHUFFLED_EVENTS: "shuffled", NO_EVENTS: "no-events"}[self.events]
        if self.scale != 1.0 and self.events != NO_EVENTS:
            tag = "-".join(t for t in (tag, f"s{self.scale:g}") if t)
        return f"{self.model}@{tag}" if tag else self.model


def uses_events(cfg: StudyConfig, name: str) -> bool:
    """Whether a trained model reads S_event (a CLIP-table variant of Table IV)."""
    return TABLE_IV_VARIANTS[variants(cfg)[name][0]][2]


def guidance_scale(cfg: StudyConfig, name: str) -> float:
    """The event guidance s a trained model is sampled with: its own in ``event_guidance_by_model``, else
    ``event_guidance_scale``; 1 (the paper's sampler) for a model that does not read S_event. Guidance moves each
    model along its own *diff* / *same* trade-off (docs/methods.md): EHRXDiff_w_null, whose null samples teach
    S_null to copy I_prev, pays more *same* per unit of *diff* than EHRXDiff, so one s does not fit both."""
    if not uses_events(cfg, name):
        return 1.0
    return float(cfg.event_guidance_by_model.get(name, cfg.event_guidance_scale))


def guidance_reference(cfg: StudyConfig) -> str:
    """The no-event branch event guidance contrasts with (:class:`ehrxdiff.models.pipeline.EHRXDiffPipeline`): the
    condition event dropout trained in S_event's place, ``dropped_events``; S_null for a model trained without
    dropout (w_null's null samples are then its only no-event samples)."""
    return cfg.dropped_events if cfg.event_dropout else "null_set"


def sample_runs(cfg: StudyConfig) -> list[SampleRun]:
    """Every sampling run of the study, main runs first. Each model is sampled with its own events at its
    :func:`guidance_scale` (models without S_event at s = 1). Each main model that reads S_event also gets two
    controls with the same seeds, ``<model> (shuffled S_event)`` and ``<model> (no S_event)`` (issue 14: their gap
    to the own-events row is what the events contribute), and :data:`GUIDANCE_SWEEP_MODEL` every s of
    ``guidance_sweep`` (``<model> (s = 2)``; s = 0 is the no-S_event run, exactly: Brooks et al.'s guidance at 0)."""
    runs, seeds = [], model_seeds(cfg)
    for name in variants(cfg):
        runs.append(SampleRun(name, OWN_EVENTS, guidance_scale(cfg, name), name, tuple(seeds[name])))
    for name in MAIN_MODELS:
        if not uses_events(cfg, name):
            continue
        s, sd = guidance_scale(cfg, name), tuple(seeds[name])
        runs.append(SampleRun(name, SHUFFLED_EVENTS, s, f"{name} (shuffled S_event)", sd))
        runs.append(SampleRun(name, NO_EVENTS, 0.0, f"{name} (no S_event)", sd))
        if name == GUIDANCE_SWEEP_MODEL:
            runs += [SampleRun(name, OWN_EVENTS, float(g), f"{name} (s = {g:g})", sd)
                     for g in dict.fromkeys(float(g) for g in cfg.guidance_sweep) if g not in (0.0, s)]
    return runs


def guidance_sweep_runs(cfg: StudyConfig) -> dict[float, SampleRun]:
    """The runs of the guidance sweep, s → run (s = 0 is the no-S_event run, the configured s the main run)."""
    runs = [r for r in sample_runs(cfg) if r.model == GUIDANCE_SWEEP_MODEL]
    out = {0.0: r for r in runs if r.events == NO_EVENTS}
    out |= {r.scale: r for r in runs if r.events == OWN_EVENTS}
    return dict(sorted(out.items())) if len(out) > 1 else {}


def shuffled_events(cfg: StudyConfig, pairs: pd.DataFrame) -> pd.DataFrame:
    """The shuffled-events control's fixed permutation: each pair's S_event is replaced by another pair's
    (``pair_key`` → ``events_of``). One random cycle through all pairs (seeded by ``seed``), so no pair keeps its
    own events; notebook 04 records it in ``samples/shuffled_events.csv``."""
    keys = sorted(pairs["pair_key"].astype(str))
    if len(keys) < 2:
        raise ValueError("the shuffled-events control needs at least 2 test pairs")
    order = np.random.default_rng([cfg.seed, 14]).permutation(len(keys))
    partner = {keys[order[i]]: keys[order[(i + 1) % len(keys)]] for i in range(len(keys))}
    return pd.DataFrame({"pair_key": keys, "events_of": [partner[k] for k in keys]})


def load_predictions(cfg: StudyConfig, pair_keys) -> dict[tuple[str, int], "torch.Tensor"]:
    """Notebook 04's predictions of ``pair_keys`` for every sampling run and seed (:func:`sample_runs`), as
    ``{(method, seed): [N, 3, H, W]}`` in [-1, 1] at ``image_size`` (as ``images.load_image``); raises naming the
    first missing file."""
    keys, out = list(pair_keys), {}
    for run in sample_runs(cfg):
        for seed in run.seeds:
            d = sample_dir(cfg, run, seed)
            generated_image_table(keys, d)
            out[(run.method, seed)] = torch.stack([load_image(d / f"{k}.png", cfg.image_size) for k in keys])
    return out


def score_reidentification(cfg: StudyConfig, test_pairs: pd.DataFrame) -> pd.DataFrame:
    """Patient re-identification (:mod:`ehrxdiff.evaluation.identity`) of the scored test pairs for the real target
    ("GT", the reference) and every sampling run x seed: notebook 04 shows it beside its samples and writes it there
    (``samples/reidentification.csv``; notebook 05's Table IV reads it). Needs no labels. The previous image itself
    would score 1 by construction and is left out."""
    root, size = cfg.source_dirs()["mimic_cxr"], cfg.image_size

    def read(table: pd.DataFrame) -> np.ndarray:
        return np.stack([load_image(Path(root) / p, size).numpy() for p in table["path"]])

    images = {("GT", 0): read(pair_image_table(test_pairs, "target"))}
    images |= {k: v.numpy() for k, v in load_predictions(cfg, test_pairs["pair_key"]).items()}
    out = reidentification_table(images, read(pair_image_table(test_pairs, "prev")))
    layout(cfg).samples_root      # the folder, created when asked for
    out.to_csv(layout(cfg).reidentification, index=False)
    return out


def ldm_steps(cfg: StudyConfig, name: str) -> int:
    """Optimizer steps of one model: ``ldm_steps`` for the main models, ``ablation_ldm_steps`` (when set) for the
    other Table IV rows - Table IV's caption says when they trained less."""
    if name in MAIN_MODELS or cfg.ablation_ldm_steps is None:
        return cfg.ldm_steps
    return cfg.ablation_ldm_steps


def ldm_caches(cfg: StudyConfig, ds: dict, vae, clip=None):
    """The frozen encoders' outputs for the train and valid pairs (:mod:`ehrxdiff.training.cache`), built once per VAE
    / CLIP and reused by every variant: the VAE posteriors (with ``null_augmentations`` jittered copies of the w_null
    null targets) and, when ``clip`` (a :class:`~ehrxdiff.models.ldm.ClipConditioner`) is given, its frozen tokens."""
    pairs = pd.concat([ds[s].pairs for s in ("train", "valid")], ignore_index=True)
    root, cache_root = ds["train"].image_root, layout(cfg).latent_cache
    images = set(pairs["prev_path"].astype(str)) | set(pairs["target_path"].astype(str))
    first = FirstStageCache.build(vae, image_root=root, paths=images, image_size=cfg.image_size,
                                  cache_root=cache_root, augment_paths=CachedPairs.null_augment_paths(ds["train"].pairs),
                                  n_augment=cfg.null_augmentations, seed=cfg.seed)
    cond = None
    if clip is not None:
        cond = ConditionCache.build(clip, pairs=pairs, image_root=root, image_size=cfg.image_size,
                                    event_store=ds["train"].store, max_events=cfg.max_events, cache_root=cache_root)
    return first, cond


def ldm_loaders(cfg: StudyConfig, ds: dict, *, wnull: bool, vae, clip=None, shuffle_valid: bool = False,
                caches=None):
    """(train, valid) loaders of one LDM: from the caches (``ldm_cache_first_stage``; CLIP tokens too when the
    towers are frozen and ``clip`` is given) or encoding images every step as the reference does. ``caches``: the
    ``(first, cond)`` of :func:`ldm_caches` when the caller already holds them."""
    if not cfg.ldm_cache_first_stage:
        train = WithNullSamples(ds["train"], enabled=wnull, augment_targets=cfg.augment_targets)
        return loader(cfg, train, shuffle=True), loader(cfg, ds["valid"], shuffle=shuffle_valid)
    first, cond = caches or ldm_caches(cfg, ds, vae, None if cfg.ldm_clip_trainable else clip)
    col = partial(collate_cached, max_events=cfg.max_events)

    def cached(dataset, shuffle):
        return DataLoader(dataset, batch_size=cfg.ldm_batch_size, shuffle=shuffle, drop_last=shuffle, collate_fn=col,
                          num_workers=cfg.num_workers)
    return (cached(CachedPairs(ds["train"], first, cond, with_null=wnull, seed=cfg.seed,
                               event_dropout=cfg.event_dropout,
                               # a model without CLIP (concat-VAE) has no tokens to withhold and reads no events
                               dropped_events=cfg.dropped_events if cond is not None else "null_set",
                               null_share=cfg.null_sample_share), True),
            cached(CachedPairs(ds["valid"], first, cond), shuffle_valid))


def build_variant(cfg: StudyConfig, name: str, vae, clip):
    """A fresh model of one Table IV variant (§II-C) around the shared VAE and a copy of the pre-trained CLIP towers,
    seeded so every variant starts from the same draw of the RNG (a fair ablation)."""
    variant, _ = variants(cfg)[name]
    vae_mode, use_img, use_tab = TABLE_IV_VARIANTS[variant]
    seed_everything(cfg)
    return build_ehrxdiff(vae=vae, image_size=cfg.image_size, clip=ClipConditioner.from_ehrclip(copy.deepcopy(clip)),
                          vae_mode=vae_mode, use_clip_image=use_img, use_clip_table=use_tab,
                          max_events=cfg.max_events, c_fusion=cfg.context_tokens, d_clip=cfg.clip_width,
                          unet_channels=cfg.unet_channels, num_heads=cfg.unet_heads,
                          layers_per_block=cfg.unet_layers_per_block, norm_num_groups=norm_groups(cfg.unet_channels),
                          latent_scale=vae.config.scaling_factor, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                          clip_trainable=cfg.ldm_clip_trainable, snr_gamma=cfg.snr_gamma, fusion=cfg.adaptor_fusion,
                          event_global=_variant_event_global(cfg, use_img) if use_tab else None,
                          n_findings=len(IMAGENOME_LABELS), time_scale_shift=cfg.unet_time_scale_shift)


def event_global(cfg: StudyConfig) -> str | None:
    """What of S_event the models feed to the UNet's time embedding (:func:`ehrxdiff.models.ldm.build_ehrxdiff`).
    ``findings`` / ``findings_prev`` need finding labels to fit their head; a study without them (an own cohort
    without finding columns, MIMIC without Chest ImaGenome) builds its models without the head, as it skips Tables
    II and IV, and :func:`fit_findings` records why in ``findings_head.json``."""
    if cfg.event_global == "none" or (cfg.event_global.startswith("findings") and missing_labels_reason(cfg)):
        return None
    return cfg.event_global


def _variant_event_global(cfg: StudyConfig, use_clip_image: bool) -> str | None:
    """:func:`event_global` for one Table IV variant: a variant without CLIP image tokens (xattn-CLIPtab) has no
    I_prev tokens for a ``findings_prev`` head to read, so its head reads the events only (``findings``)."""
    g = event_global(cfg)
    return "findings" if g == "findings_prev" and not use_clip_image else g


def fit_findings(cfg: StudyConfig, model, ds: dict, out_dir: Path, cond=None) -> dict | None:
    """``event_global: findings`` / ``findings_prev``: fit the adaptor's findings head
    (:mod:`ehrxdiff.training.findings`) on the train pairs' target labels before the LDM trains, and write what it
    reads and reaches on the validation pairs (macro AUROC over the findings) to ``<out_dir>/findings_head.json`` -
    or, without finding labels, why there is no head. None for a model without the head.

    ``cond``: the frozen towers' :class:`~ehrxdiff.training.cache.ConditionCache` of the train and valid pairs
    (:func:`ldm_caches`); the head's features are pooled from its tokens, which the LDM trains on, rather than
    running the towers over every pair again. Without it (CLIP fine-tuned, or no cache) the towers run here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = model.adaptor.findings_head
    if head is None:
        if cfg.event_global.startswith("findings") and model.adaptor.config.use_clip_table:   # asked for, no labels
            reason = missing_labels_reason(cfg)
            log.warning("event_global findings: no findings head (%s); the model is built with event_global none",
                        reason)
            (out_dir / "findings_head.json").write_text(json.dumps({"skipped": reason}, indent=1))
        return None
    _, rows = label_rows(cfg, pd.concat([ds[s].pairs for s in ("train", "valid")], ignore_index=True))
    record = {"reads": "S_event and I_prev" if model.adaptor.config.findings_reads_image else "S_event"}
    for split in ("train", "valid"):
        pairs = ds[split].pairs
        targets = target_label_matrix(rows[rows["split"] == split]).reindex(pairs["pair_key"])
        reads_image = model.adaptor.config.findings_reads_image   # findings_prev: I_prev's pooled image tokens too
        if cond is not None:
            feats = pooled_cached_tokens(cond, pairs["pair_key"], pairs["prev_path"] if reads_image else None)
        else:
            feats = pooled_table_tokens(model.clip, ds[split].store, list(pairs["pair_key"]),
                                        max_events=cfg.max_events)
            if reads_image:
                feats = torch.cat([feats, pooled_image_tokens(model.clip, ds[split].image_root, pairs["prev_path"],
                                                              image_size=cfg.image_size)], dim=-1)
        y = torch.tensor(targets.to_numpy(), dtype=torch.float32)
        if split == "train":
            record |= fit_findings_head(head, feats, y)
        else:
            with torch.no_grad():
                record["valid_macro_auroc"] = macro_auroc(torch.sigmoid(head(feats)).numpy(), y.numpy())
    (out_dir / "findings_head.json").write_text(json.dumps(record, indent=1))
    log.info("findings head: %s", record)
    return record


def train_variant(cfg: StudyConfig, name: str, ds: dict, vae, clip, *, output_dir: Path | None = None,
                  max_steps: int | None = None, progress: bool = True) -> dict:
    """Train one conditional LDM (Eq. 2) of :func:`variants`; resumes, or reloads a finished run. ``output_dir`` and
    ``max_steps`` (default ``ldm/<name>`` and :func:`ldm_steps`) let a learning curve train the same recipe in
    stages elsewhere (``python -m ehrxdiff.bench curve``)."""
    model = build_variant(cfg, name, vae, clip)
    out = output_dir or layout(cfg).ldm(name)
    caches = (ldm_caches(cfg, ds, vae, None if cfg.ldm_clip_trainable else model.clip)
              if cfg.ldm_cache_first_stage else None)
    fit_findings(cfg, model, ds, out, cond=caches[1] if caches else None)
    train, valid = ldm_loaders(cfg, ds, wnull=variants(cfg)[name][1], vae=vae, clip=model.clip, caches=caches)
    seed_everything(cfg)   # building the caches may or may not draw from the RNG (first build vs reload)
    return train_ldm(model, train, output_dir=out,
                     max_steps=max_steps or ldm_steps(cfg, name), valid_loader=valid,
                     learning_rate=cfg.ldm_lr, effective_batch=cfg.ldm_batch_size * cfg.ldm_grad_accum,
                     ema_decay=cfg.ema_decay, mixed_precision=cfg.ldm_mixed_precision,
                     validate_every=cfg.validate_every, max_val_batches=4,
                     checkpoint_every=cfg.validate_every, checkpoint_limit=cfg.checkpoint_limit, seed=cfg.seed,
                     image_size=cfg.image_size, max_events=cfg.max_events, progress=progress,
                     event_guidance_scale=guidance_scale(cfg, name), guidance_reference=guidance_reference(cfg))


def _train_worker(cfg: StudyConfig, name: str, vae, clip, threads: int) -> dict:
    """One model in a worker process (:func:`train_variants`): its own torch threads, its own datasets."""
    torch.set_num_threads(threads)
    return train_variant(cfg, name, datasets(cfg, ("train", "valid")), vae, clip, progress=False)


def train_variants(cfg: StudyConfig, ds: dict, vae, clip) -> dict[str, dict]:
    """Train every model of :func:`variants` (main models first); ``{name: train_ldm summary}``.

    ``ldm_parallel_models`` > 1 trains that many at a time, each in a worker process with an equal share of the CPU
    cores as torch threads (spawned: a forked torch process can hang in OpenMP). The small demo UNet does not keep two
    threads busy: in learning-curve runs two 1-thread processes trained ~70 samples/s each, and in the demo run
    EHRXDiff and EHRXDiff_w_null trained at 64.6 and 62.3 samples/s side by side (validation and checkpoints
    included) against 107-126 samples/s for one 2-thread process in ``bench ldm`` (training steps only) - about the
    same throughput, measured end to end only this way. Models go in waves of that many, in order, so a lone last
    model trains in this process on every core. The caches are built once here, before any worker starts.
    Results per model are the same as sequential training up to float rounding (another thread count)."""
    names = list(variants(cfg))
    if cfg.ldm_parallel_models <= 1:
        return {name: train_variant(cfg, name, ds, vae, clip) for name in names}
    ldm_caches(cfg, ds, vae, None if cfg.ldm_clip_trainable else ClipConditioner.from_ehrclip(clip))
    k = cfg.ldm_parallel_models
    threads = max(1, (os.cpu_count() or 1) // k)
    out = {}
    for wave in (names[i:i + k] for i in range(0, len(names), k)):   # in waves: a lone last model gets every core
        if len(wave) == 1:
            out[wave[0]] = train_variant(cfg, wave[0], ds, vae, clip)
            continue
        with cf.ProcessPoolExecutor(max_workers=len(wave), mp_context=mp.get_context("spawn")) as pool:
            futures = {name: pool.submit(_train_worker, cfg, name, vae, clip, threads) for name in wave}
            out |= {name: f.result() for name, f in futures.items()}
    return out


def conditioning_sensitivity(cfg: StudyConfig, ds: dict, max_batches: int | None = None) -> pd.DataFrame:
    """Validation Eq. 2 loss of every trained model (EMA weights) with its own condition and with I_prev or S_event
    swapped between pairs (:func:`ehrxdiff.training.train_ldm.conditioning_sensitivity`), over the whole validation
    split (cached inputs make that cheap; ``max_batches`` caps it). Written to ``ldm/conditioning_sensitivity.csv``
    and, as a table with the relative increases, ``figures/table_conditioning_sensitivity.{csv,md,tex}``."""
    rows = {}
    for name in variants(cfg):
        model = load_pipeline(cfg, name).to_model()
        _, valid = ldm_loaders(cfg, ds, wnull=False, vae=model.vae, clip=model.clip)
        rows[name] = loss_sensitivity(model, valid, max_batches=max_batches)
    out = pd.DataFrame(rows).T.rename_axis("model")
    out.to_csv(layout(cfg).ldm() / "conditioning_sensitivity.csv")
    shown = out.copy()
    for c in ("I_prev swapped", "S_event swapped"):
        shown[f"{c} (% change)"] = 100 * (out[c] / out["own condition"] - 1)
    write_table(shown.round(5), "table_conditioning_sensitivity", figures_dir(cfg),
                caption=f"Conditioning sensitivity: validation Eq. 2 loss (EMA weights, {len(ds['valid'])} validation "
                        "pairs) with each pair's own condition and with another pair's I_prev or S_event")
    return out


def device():
    """The device accelerate trains on (a GPU when there is one, else the CPU): sampling and the Eq. 2 checks of
    saved models run there too - on a GPU machine a pipeline left on the CPU would sample ~100x slower."""
    return PartialState().device


def load_pipeline(cfg: StudyConfig, name: str):
    """A trained model's EMA pipeline (D6), on :func:`device`."""
    return EHRXDiffPipeline.from_pretrained(layout(cfg).ldm_pipeline(name)).to(device())


def test_pairs(cfg: StudyConfig, ds: dict):
    """The test pairs the study generates and scores (all of them, or a fixed random subset for CPU runs)."""
    test = ds["test"]
    if cfg.eval_max_pairs and len(test) > cfg.eval_max_pairs:
        sub = test.pairs.sample(cfg.eval_max_pairs, random_state=0).sort_values("pair_key")
        test = test.with_pairs(sub)
    return test


def sample_dir(cfg: StudyConfig, run: "str | SampleRun", seed: int) -> Path:
    """``samples/<run folder>/seed<k>``; a model's name means its main run (its own events at its guidance)."""
    if isinstance(run, str):
        run = next((r for r in sample_runs(cfg) if r.method == run), None) or SampleRun(run, OWN_EVENTS, 1.0, run, ())
    return layout(cfg).sample_dir(run.folder, seed)


def reconstruction_dir(cfg: StudyConfig) -> Path:
    """``samples/vae-reconstruction/seed0``: the first stage's reconstructions of I_trg (:data:`RECONSTRUCTION`)."""
    return layout(cfg).reconstruction_dir


def generate(cfg: StudyConfig, test, runs: list[SampleRun] | None = None) -> pd.DataFrame:
    """I_pred for every test pair, sampling run (:func:`sample_runs`) and seed (D6: EMA weights; DDIM or
    DPM-Solver++), resumable; records the shuffled-events permutation (``samples/shuffled_events.csv``) and writes
    the VAE reconstructions of I_trg (:func:`reconstruct_targets`). One row per run and seed.

    In one process: two 1-thread sampling processes (as :func:`train_variants` trains) were tried; they drew the demo's
    334 test pairs in 716 s, against ~690 s for one 2-thread process (docs/methods.md)."""
    runs = sample_runs(cfg) if runs is None else runs
    perm = shuffled_events(cfg, test.pairs)
    layout(cfg).samples_root      # the folder, created when asked for
    perm.to_csv(layout(cfg).shuffled_events, index=False)
    data = {OWN_EVENTS: test, SHUFFLED_EVENTS: WithEvents(test, dict(zip(perm["pair_key"], perm["events_of"]))),
            NO_EVENTS: WithEvents(test, None)}
    rows, pipes = [], {}
    for run in runs:
        if run.events == SHUFFLED_EVENTS:
            _match_permutation(sample_dir(cfg, run, 0).parent, perm)
        if run.model not in pipes:   # one load per model, shared by its controls and sweep runs
            pipes[run.model] = load_pipeline(cfg, run.model)
        pipe = pipes[run.model]
        for seed in run.seeds:
            s = generate_split(pipe, data[run.events], sample_dir(cfg, run, seed), seed=seed,
                               sampler=cfg.sampler, num_inference_steps=cfg.sample_steps,
                               eta=cfg.sample_eta, batch_size=cfg.sample_batch_size, collate_fn=collate(cfg),
                               clip_x0=cfg.sample_clip_x0, event_guidance_scale=run.scale, progress=False)
            rows.append({"method": run.method, "model": run.model, "events": run.events, "guidance": run.scale,
                         **s})
    if pipes:
        rec = reconstruct_targets(cfg, test, next(iter(pipes.values())).vae)
        rows.append({"method": RECONSTRUCTION, "model": "VAE", "events": "", "guidance": float("nan"), **rec})
    return pd.DataFrame(rows)


def _match_permutation(folder: Path, perm: pd.DataFrame) -> None:
    """A shuffled-events run folder keeps the permutation its PNGs were sampled with; when the test pairs or the seed
    changed it, the old PNGs are removed rather than resumed into the new control."""
    record = folder / "shuffled_events.csv"
    if record.exists() and not pd.read_csv(record, dtype=str).equals(perm.astype(str)):
        log.warning("%s: sampled with another shuffled-events permutation; its PNGs are removed", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    perm.to_csv(record, index=False)


def reconstruct_targets(cfg: StudyConfig, test, vae) -> dict:
    """The first stage's reconstruction of every I_trg (posterior mean, decoded) as 8-bit PNGs like the
    predictions: Table II's first-stage row (issue 14). A diffusion model on this VAE draws its images through the
    same decoder, so the findings the evaluator reads in these are about the best its predictions can carry.
    Resumable as :func:`ehrxdiff.models.sampling.generate_split`."""
    out = reconstruction_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i, k in enumerate(test.pairs["pair_key"]) if not png_path(out, k).is_file()]
    t0 = time.perf_counter()
    for start in range(0, len(todo), cfg.sample_batch_size):
        items = [test[i] for i in todo[start:start + cfg.sample_batch_size]]
        x = torch.stack([it["target_image"] for it in items]).to(vae.device, vae.dtype)
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).cpu()
        for it, gray in zip(items, to_uint8(recon)):
            save_png(out, it["pair_key"], gray)
    seconds = time.perf_counter() - t0
    return {"written": len(todo), "skipped": len(test) - len(todo), "seconds": seconds,
            "seconds_per_image": seconds / len(todo) if todo else float("nan"), "seed": 0}
