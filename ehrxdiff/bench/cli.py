"""Benchmarks that print figures (not timed tests). ``python -m ehrxdiff.bench <what> ...``

``render``: a trained model's test predictions with its findings head's signal, the true labels of I_trg or
I_prev's labels in its place, scored as Table II (issue 14: is the head or the UNet what limits *diff*?).

``cohort``: cohort + event extraction on a synthetic world (issue 3's goal: full MIMIC-IV v2.2, ~314 M
chartevents + ~118 M labevents rows, in <= 30 min on 2 cores with peak RSS <= 4 GB). Prints rows/s per
table and stage, wall time, peak RSS of this process (DuckDB runs in it; the world is generated in a child
process, reported separately), DuckDB's memory limit and threads, and a linear extrapolation of each
stage's time to the real release by the rows that drive it (tables: their rows; window join/top-k: events in
pair windows; texts, write, store: kept events; the real in-window share per table is assumed equal to the
world's, printed with the figures). Events go through the streaming path
(``extract_events_to_dir`` → parquet → ``build_event_store`` in chunks).

Add a subcommand by writing ``_bench_<name>(args)`` and registering its parser in :func:`main`. Each subcommand
imports what it measures inside its function, on purpose: ``cohort`` must time DuckDB without torch's import in
the same process (its peak RSS is a target), and ``--help`` answers without loading torch.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

# Row counts of the real MIMIC-IV v2.2 / MIMIC-CXR-JPG v2.0.0 files (mimic-schemas.md §1.3, §2.1; source S7, S12).
REAL_ROWS = {
    "labevents": 118_171_367, "prescriptions": 15_416_708, "inputevents": 8_978_893,
    "chartevents": 313_645_063, "outputevents": 4_234_967, "microbiologyevents": 3_228_713,
    "procedureevents": 696_092,
}
REAL_CXR_IMAGES = 377_110


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _generate(world: Path, n_patients: int, seed: int, chart_sets_per_hour: int, images: bool) -> None:
    from ehrxdiff.data.schemas import MIMIC_CXR_SUBDIR
    from ehrxdiff.synthetic import generate_world

    (world / MIMIC_CXR_SUBDIR).mkdir(parents=True, exist_ok=True)  # render=False writes no JPEG folder first
    generate_world(world, n_patients=n_patients, seed=seed, chart_sets_per_hour=chart_sets_per_hour,
                   render=images, progress=True)


def _count_rows(mimic_iv: Path, tables) -> dict[str, int]:
    from ehrxdiff.data.schemas import EVENT_TABLE_MODULE
    from ehrxdiff.data.sources import connect, csv_relation_sql, read_header, table_path

    con = connect(threads=None)
    out = {}
    for t in tables:
        path = table_path(mimic_iv, f"{EVENT_TABLE_MODULE[t]}/{t}")
        out[t] = int(con.execute(f"SELECT count(*) FROM {csv_relation_sql(path, read_header(path))}").fetchone()[0])
    con.close()
    return out


def _bench_cohort(a: argparse.Namespace) -> int:
    import shutil

    from ehrxdiff.data.cohort import build_cohort
    from ehrxdiff.constants import EVENT_TABLES, MAX_EVENTS
    from ehrxdiff.data.embedding import HashingEmbedder
    from ehrxdiff.data.event_store import build_event_store
    from ehrxdiff.data.events import extract_events_to_dir
    from ehrxdiff.data.schemas import MIMIC_CXR_SUBDIR, MIMIC_IV_SUBDIR

    world = Path(a.world or f"data/bench/world-n{a.n_patients}-c{a.chart_sets_per_hour}-s{a.seed}")
    t = time.perf_counter()
    child = mp.get_context("spawn").Process(target=_generate, args=(world, a.n_patients, a.seed,
                                                                     a.chart_sets_per_hour, a.images))
    child.start()
    child.join()
    if child.exitcode != 0:
        print(f"error: synthetic world generation failed (exit code {child.exitcode})")
        return 1
    print(f"world {world}: ready in {time.perf_counter() - t:.1f} s (generated or reused)")
    iv, cxr = world / MIMIC_IV_SUBDIR, world / MIMIC_CXR_SUBDIR
    out = Path(a.out or world / "bench_out")
    shutil.rmtree(out, ignore_errors=True)

    t0 = time.perf_counter()
    cohort = build_cohort(iv, cxr, check_images="decode" if a.images else "none", memory_limit=a.memory_limit, threads=a.threads)
    t_cohort = time.perf_counter() - t0
    rss_cohort = _peak_rss_mb()
    t1 = time.perf_counter()
    extract_events_to_dir(iv, cohort.pairs, out / "events", memory_limit=a.memory_limit, threads=a.threads,
                          gunzip_thread=a.gunzip_thread)
    t_events = time.perf_counter() - t1
    rss_events = _peak_rss_mb()
    embedder = HashingEmbedder(dim=a.store_dim)  # built before the clock: its import (scikit-learn) is a fixed cost
    t2 = time.perf_counter()
    store = build_event_store(out / "events", embedder, out / "event_store")
    t_store = time.perf_counter() - t2
    rss = _peak_rss_mb()

    t3 = time.perf_counter()
    rows = _count_rows(iv, EVENT_TABLES)
    t_count = time.perf_counter() - t3
    n_images = int(cohort.report.query("what == 'images in metadata'")["n"].iloc[0])
    import pandas as pd
    rep = pd.read_csv(out / "events" / "event_report.csv")

    def n_of(table: str, what: str) -> float:
        return float(rep[(rep["table"] == table) & (rep["what"] == what)]["n"].iloc[0])

    secs = {tb: n_of(tb, "seconds") for tb in EVENT_TABLES}
    scan_secs = {tb: n_of(tb, "seconds: scan + item filter + cohort semi-join + window flag") for tb in EVENT_TABLES}
    in_win = {tb: n_of(tb, "events in pair windows") for tb in EVENT_TABLES}
    all_rows = sum(rows.values())
    real_all = sum(REAL_ROWS.values())
    n_in_win = sum(in_win.values())
    n_kept = n_of("all", "events kept")
    n_pairs = len(cohort.pairs)
    # Extrapolation drivers. Per-table passes scale with that table's rows. The per-pair stages scale with the
    # events in pair windows (window join, top-k) or the kept events (texts, write, store); their real counts
    # are unknown without the real data, so each table is assumed to put the same share of its rows into pair
    # windows as here: real in-window events = sum_t in_window_t * real_rows_t / rows_t, and real kept events =
    # kept * the same factor, capped at (pairs scaled by images) * max_events.
    real_in_win = sum(in_win[tb] * REAL_ROWS[tb] / max(1, rows[tb]) for tb in EVENT_TABLES)
    f_win = real_in_win / max(1.0, n_in_win)
    real_pairs = n_pairs * REAL_CXR_IMAGES / max(1, n_images)
    real_kept = min(n_kept * f_win, real_pairs * MAX_EVENTS)
    f_kept = real_kept / max(1.0, n_kept)
    summary = store.summary()
    print(f"\nsettings: DuckDB memory_limit={a.memory_limit} threads={a.threads} gunzip_thread={a.gunzip_thread}; "
          f"{os.cpu_count()} CPU cores visible; duckdb {__import__('duckdb').__version__}")
    print(f"cohort: {n_pairs:,} pairs from {n_images:,} images in {t_cohort:.1f} s")
    print(f"events: {int(n_in_win):,} events in pair windows, {int(n_kept):,} kept, "
          f"{int(n_of('all', 'unique event texts')):,} unique texts, "
          f"{int(n_of('all', 'pairs kept')):,} pairs in {t_events:.1f} s (DuckDB -> parquet, {out / 'events'})")
    print(f"event store (hashing embedder, dim {a.store_dim}, streamed from parquet): {t_store:.1f} s, "
          f"{summary['bytes_on_disk']:,} bytes = {summary['ratio']:.3f} x the reference layout at this dim")
    print(f"\n{'stage / table':<30}{'driver rows':>14}{'seconds':>10}{'rows/s':>14}{'real rows':>14}{'extrap. s':>12}")
    total_extra = 0.0

    def line(name: str, n: float, sec: float, real: float) -> None:
        nonlocal total_extra
        extra = sec * real / max(1.0, n)
        total_extra += extra
        print(f"{name:<30}{n:>14,.0f}{sec:>10.1f}{n / max(sec, 1e-9):>14,.0f}{real:>14,.0f}{extra:>12.0f}")

    line("cohort (images)", n_images, t_cohort, REAL_CXR_IMAGES)
    for tb in EVENT_TABLES:  # scan + filter + window flag, and the per-table counts: x the table's rows
        line(f"{tb} (pass {scan_secs[tb]:.1f} s)", rows[tb], secs[tb], REAL_ROWS[tb])
    line("window join + top-k", n_in_win, n_of("all", "seconds: window join + most recent per pair"), real_in_win)
    post = t_events - sum(secs.values()) - n_of("all", "seconds: window join + most recent per pair")
    line("texts + write events", n_kept, post, real_kept)
    line("event store", n_kept, t_store, real_kept)
    print(f"{'all event tables':<30}{all_rows:>14,}{t_events:>10.1f}{all_rows / t_events:>14,.0f}{real_all:>14,}")
    print(f"extrapolation assumptions: each table's pass x its real rows; in-window events x {f_win:.1f} "
          f"(each table keeps this world's share of rows in pair windows: {real_in_win:,.0f} real); kept events x "
          f"{f_kept:.1f} (same factor, capped at {real_pairs:,.0f} real pairs x {MAX_EVENTS}); cohort x images")
    print(f"\nrow count scan only (for reference): {t_count:.1f} s, {all_rows / t_count:,.0f} rows/s")
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"peak RSS of this process (DuckDB runs in it): after cohort {rss_cohort:,.0f} MB, after events "
          f"{rss_events:,.0f} MB, after store {rss:,.0f} MB")
    print(f"peak RSS of child processes (world generation, if it ran): {kids:,.0f} MB")
    print(f"extrapolated full MIMIC-IV v2.2 (cohort x images, each table x its rows, per-pair stages x their events): "
          f"{total_extra / 60:.1f} min (goal <= 30 min, peak RSS <= 4096 MB)")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def _bench_ldm(a) -> int:
    """Random-weight models at a profile's sizes: the cost of training and sampling, not their quality.

    Training is timed twice at the same batch size, each step including its collate: the per-step-encoding path
    (the reference's: the frozen VAE encodes I_prev and I_trg and the CLIP towers run forward and backward every
    step) and the cached path of the profile's recipe (:mod:`ehrxdiff.training.cache`: VAE posteriors read, and CLIP
    tokens too when ``ldm_clip_trainable`` is false). The last line is the speed-up of the cached path (issue 13)."""
    import torch
    from diffusers.training_utils import EMAModel

    from ehrxdiff.config import load_config
    from ehrxdiff.data.datasets import collate_pairs
    from ehrxdiff.models.clip import EHRCLIP
    from ehrxdiff.study import models
    from ehrxdiff.training.cache import collate_cached
    from ehrxdiff.models.ldm import ClipConditioner, build_ehrxdiff
    from ehrxdiff.models.pipeline import EHRXDiffPipeline
    from ehrxdiff.models.vae import build_vae
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.profile)
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=tuple(cfg.vae_channels), latent_channels=cfg.vae_latent_channels,
                    layers_per_block=cfg.vae_layers_per_block, image_size=cfg.image_size, norm_num_groups=models.norm_groups(cfg.vae_channels))
    clip = EHRCLIP.from_config(models.clip_model_config(cfg, a.event_dim))
    dev = torch.device(a.device)

    def build(clip_trainable: bool):
        torch.manual_seed(0)
        return build_ehrxdiff(vae=vae, image_size=cfg.image_size, clip=ClipConditioner.from_ehrclip(clip),
                              max_events=cfg.max_events, c_fusion=cfg.context_tokens, d_clip=cfg.clip_width,
                              unet_channels=cfg.unet_channels, num_heads=cfg.unet_heads,
                              layers_per_block=cfg.unet_layers_per_block, norm_num_groups=models.norm_groups(cfg.unet_channels),
                              clip_trainable=clip_trainable, snr_gamma=cfg.snr_gamma).to(dev)

    b, n = a.batch_size or cfg.ldm_batch_size, cfg.max_events
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    raw_items = [{"prev_image": torch.rand(3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
                  "target_image": torch.rand(3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
                  "events": torch.randn(n, a.event_dim, generator=g), "pair_key": str(i), "is_null": False}
                 for i in range(b)]
    per_step = build(True)
    cached = build(cfg.ldm_clip_trainable)
    with torch.no_grad():   # what ehrxdiff.training.cache stores: posteriors and, for frozen towers, tokens
        raw = collate_pairs(raw_items, max_events=n)
        dist = vae.to(dev).eval().encode(torch.cat([raw["prev_image"], raw["target_image"]]).to(dev)).latent_dist
        mean, std = dist.mean.cpu(), dist.std.cpu()
        cached.clip.eval()
        img = cached.clip.image_tokens(raw["prev_image"].to(dev)).cpu()
        tab, tmask = cached.clip.table_tokens(raw["events"].to(dev), raw["event_mask"].to(dev))
    cached_items = []
    for i, it in enumerate(raw_items):
        item = {"prev_mean": mean[i], "target_mean": mean[b + i], "target_std": std[b + i], "pair_key": it["pair_key"],
                "is_null": False}
        if cfg.ldm_clip_trainable:
            item |= {"prev_image": it["prev_image"], "events": it["events"]}
        else:
            item |= {"image_tokens": img[i], "table_tokens": tab[i].cpu(), "table_mask": tmask[i].cpu()}
        cached_items.append(item)

    def timed(model, items, collate) -> float:
        params = [p for m in model.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ema = EMAModel(params, decay=0.999, foreach=True)   # as train_ldm
        model.train()

        def step():
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in collate(items).items()}
            model(batch).backward()
            opt.step()
            opt.zero_grad()
            ema.step(params)

        step()   # warm-up step, not timed
        sync()
        t0 = time.perf_counter()
        for _ in range(a.train_steps):
            step()
        sync()
        return (time.perf_counter() - t0) / a.train_steps

    train_s = timed(per_step, raw_items, lambda items: collate_pairs(items, max_events=n))
    cached_s = timed(cached, cached_items, lambda items: collate_cached(items, max_events=n))
    params = [p for m in cached.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    ema_s = {}
    for foreach in (True, False):   # the EMA update alone: one fused update vs diffusers' per-tensor loop
        e = EMAModel(params, decay=0.999, foreach=foreach)
        e.step(params)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.train_steps):
            e.step(params)
        sync()
        ema_s[foreach] = (time.perf_counter() - t0) / a.train_steps
    print(f"profile {cfg.profile}: image {cfg.image_size} px, UNet {cfg.unet_channels}, context {cfg.context_tokens} "
          f"tokens x {cfg.clip_width}, {n} events, fp32 on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f", torch threads {torch.get_num_threads()}"))
    print("parameters: " + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M"
                                      for k, m in per_step.trainable_modules().items()))
    print(f"train, per-step encoding (VAE encode + CLIP towers fine-tuned; collate, forward, backward, AdamW, EMA): "
          f"{train_s:.3f} s/step at batch {b} = {b / train_s:.1f} samples/s")
    frozen = "VAE posteriors and CLIP tokens cached" if not cfg.ldm_clip_trainable else \
        "VAE posteriors cached, CLIP towers fine-tuned"
    print(f"train, cached path ({frozen}; Min-SNR gamma {cfg.snr_gamma}): {cached_s:.3f} s/step at batch {b} = "
          f"{b / cached_s:.1f} samples/s")
    print(f"EMA update alone: {ema_s[True] * 1e3:.1f} ms/step fused (foreach), {ema_s[False] * 1e3:.1f} ms/step per tensor")
    if a.loader:
        _bench_loader(cfg, b)
    model = per_step
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in raw.items()}
    pipe = EHRXDiffPipeline.from_model(model.eval(), sampler="ddim", image_size=cfg.image_size, max_events=n)
    k = a.sample_batch
    for kind, steps in (("ddim", 100), ("dpm++", a.fast_steps)):
        pipe.use_sampler(kind)
        g = torch.Generator(device=dev).manual_seed(0)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe.generate(batch["prev_image"][:k], batch["events"][:k], batch["event_mask"][:k],
                          num_inference_steps=steps, eta=1.0, generator=g, progress=False)
        sync()
        dt = time.perf_counter() - t0
        print(f"sampling {kind}-{steps}: {dt / k:.3f} s/image (batch {k})")
    print(f"speed-up of the cached path: {train_s / cached_s:.1f}x")
    return 0


def _bench_loader(cfg, batch_size: int, batches: int = 40) -> None:
    """The profile's training loader on its run's real data (notebooks 01-02 done): can it feed the model?"""
    from ehrxdiff.study import models, prepare
    ds = prepare.datasets(cfg, ("train",))
    for epoch in (1, 2):   # a fresh loader per epoch, as in training: workers (and their image caches) start anew
        it = iter(models.loader(cfg, ds["train"], shuffle=True, batch_size=batch_size))
        next(it)
        t0 = time.perf_counter()
        n = sum(1 for _, _ in zip(range(batches), it))
        dt = time.perf_counter() - t0
        print(f"data loader (epoch start {epoch}, num_workers {cfg.num_workers}): {n / dt:.1f} batches/s "
              f"= {n * batch_size / dt:.0f} samples/s")


def _bench_curve(a) -> int:
    """A learning curve of one model of a profile against CPU time (issue 13: measure learning, not just speed).

    Trains ``--model`` with the profile's recipe and any ``-p KEY VALUE`` overrides, in stages of ``--every`` optimizer
    steps (each stage resumes the last one's checkpoint, so the curve is one training run), and after each stage
    scores the EMA weights: the validation Eq. 2 loss with the own condition and with I_prev or S_event swapped
    (:func:`ehrxdiff.training.train_ldm.conditioning_sensitivity`, the whole validation split) and the patient
    re-identification of ``--pairs`` test predictions (:mod:`ehrxdiff.evaluation.identity`; sampler and steps of the
    profile, seed 0). Needs notebooks 01-03 of the profile's run; the VAE is notebook 04's (trained here if missing).
    One tidy row per stage goes to ``<out>/curve.csv``; ``train_seconds`` counts training only."""
    import numpy as np
    import pandas as pd
    import torch

    from ehrxdiff.evaluation import identity
    from ehrxdiff.study import models, prepare
    from ehrxdiff.config import load_config
    from ehrxdiff.models.pipeline import EHRXDiffPipeline
    from ehrxdiff.models.sampling import pair_seed
    from ehrxdiff.training.train_ldm import conditioning_sensitivity
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.profile, {k: v for k, v in a.param})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = prepare.datasets(cfg)
    vae, clip = models.train_vae(cfg, ds), models.load_clip(cfg)
    test = models.test_pairs(cfg, ds)
    test = test.with_pairs(test.pairs.iloc[: a.pairs])
    items = [test[i] for i in range(len(test))]
    batch = models.collate(cfg)(items)
    prev = batch["prev_image"].numpy()
    gt = identity.reidentification(batch["target_image"].numpy(), prev)["rank_percentile"]
    rows, train_s, t_start = [], 0.0, time.perf_counter()
    print(f"{a.model} on {cfg.profile} with {dict(a.param)}; re-id of the real next film on {len(items)} test pairs: "
          f"{gt:.3f}", flush=True)
    for stage in range(1, a.stages + 1):
        s = models.train_variant(cfg, a.model, ds, vae, clip, output_dir=out, max_steps=stage * a.every,
                                progress=False)
        train_s += 0.0 if np.isnan(s["seconds"]) else s["seconds"]
        pipe = EHRXDiffPipeline.from_pretrained(out / "pipeline")
        model = pipe.to_model()
        _, valid = models.ldm_loaders(cfg, ds, wnull=False, vae=model.vae, clip=model.clip)
        sens = conditioning_sensitivity(model, valid)
        pipe.use_sampler(cfg.sampler, clip_x0=cfg.sample_clip_x0)
        gens = [torch.Generator().manual_seed(pair_seed(0, k)) for k in batch["pair_key"]]
        pred = pipe.generate(batch["prev_image"], batch["events"], batch["event_mask"],   # unused by non-table rows
                             num_inference_steps=cfg.sample_steps, eta=cfg.sample_eta, generator=gens, progress=False)
        own = sens["own condition"]
        row = {"model": a.model, "step": s["steps"], "samples": s["samples_seen"],
               "train_seconds": round(train_s, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
               "samples_per_second": round(s["samples_per_second"], 1), "valid_loss": own,
               "I_prev swapped %": 100 * (sens["I_prev swapped"] / own - 1),
               "S_event swapped %": 100 * (sens["S_event swapped"] / own - 1),
               "reid_rank": identity.reidentification(pred.numpy(), prev)["rank_percentile"], "reid_rank_gt": gt,
               **{f"param {k}": v for k, v in a.param}}
        rows.append(row)
        pd.DataFrame(rows).to_csv(out / "curve.csv", index=False)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                        if not k.startswith("param")), flush=True)
    return 0


def _bench_probe(a) -> int:
    """Linear probes of S_event (issue 14: where is the events' information about the next film lost?).

    For each representation of a pair's S_event - the raw event embeddings and the frozen CLIP table tokens, each
    pooled by :func:`ehrxdiff.models.ldm.pool_events` over the ``max_events`` the LDM sees, and the CLIP table tokens
    beside I_prev's pooled CLIP image tokens (what the ``findings_prev`` head reads) - with and without the previous
    film's labels, a logistic regression per finding (:func:`ehrxdiff.training.findings.fit_findings_head`,
    the findings head's own fit) is trained on the train pairs' target labels and scored on the test pairs with Table
    II's weighted-macro AUROC (all / diff / same). Needs notebooks 01-03 of the profile's run. One tidy row per probe
    goes to ``<out>/probe.csv``."""
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from ehrxdiff.config import load_config
    from ehrxdiff.constants import IMAGENOME_LABELS
    from ehrxdiff.data.labels import prev_label_matrix, target_label_matrix
    from ehrxdiff.evaluation.metrics import score_method
    from ehrxdiff.models.ldm import ClipConditioner, pool_events
    from ehrxdiff.study import models, prepare
    from ehrxdiff.training.findings import (event_batches, fit_findings_head, pooled_image_tokens,
                                            pooled_table_tokens)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.profile, {k: v for k, v in a.param})
    pairs, store = prepare.load_pairs_with_events(cfg)
    _, rows = prepare.label_rows(cfg, pairs)
    keys = list(pairs["pair_key"])
    raw = torch.cat([pool_events(events, mask)
                     for events, mask in event_batches(store, keys, max_events=cfg.max_events)])
    conditioner = ClipConditioner.from_ehrclip(models.load_clip(cfg))
    clip = pooled_table_tokens(conditioner, store, keys, max_events=cfg.max_events)
    image = pooled_image_tokens(conditioner, cfg.source_dirs()["mimic_cxr"], pairs["prev_path"],
                                image_size=cfg.image_size)
    feats = {"raw event embeddings": pd.DataFrame(raw.numpy(), index=keys),
             "frozen CLIP table tokens": pd.DataFrame(clip.numpy(), index=keys),
             # what the findings_prev head reads: the events' tokens beside I_prev's CLIP image tokens
             "frozen CLIP table tokens + I_prev image tokens": pd.DataFrame(torch.cat([clip, image], -1).numpy(),
                                                                           index=keys)}
    split = {s: rows[rows["split"] == s] for s in ("train", "test")}
    prev = {s: prev_label_matrix(r) for s, r in split.items()}
    target = target_label_matrix(split["train"]).reindex(prev["train"].index)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, with_prev in [("previous labels", True)] + [(f, w) for f in feats for w in (False, True)]:
        def x(s):
            parts = ([prev[s].to_numpy()] if with_prev else []) + (
                [feats[name].loc[prev[s].index].to_numpy()] if name in feats else [])
            return torch.tensor(np.hstack(parts), dtype=torch.float32)
        torch.manual_seed(cfg.seed)
        xtr = x("train")
        head = nn.Linear(xtr.shape[1], len(IMAGENOME_LABELS))
        fit_findings_head(head, xtr, torch.tensor(target.to_numpy(), dtype=torch.float32))
        with torch.no_grad():
            probs = pd.DataFrame(torch.sigmoid(head(x("test"))).numpy(), index=prev["test"].index,
                                 columns=list(IMAGENOME_LABELS))
        summary, _ = score_method(split["test"], probs, method=name)
        row = {"features": name, "with previous labels": with_prev,
               **{r["subset"]: round(r["auroc"], 3) for _, r in summary.iterrows()}}
        results.append(row)
        print(row, flush=True)
    pd.DataFrame(results).to_csv(out / "probe.csv", index=False)
    return 0


def _bench_render(a) -> int:
    """Does the UNet draw what its findings signal says? (issue 14.) For a trained model with a findings head
    (``event_global: findings*``): the test predictions at the model's event guidance in the study, sampled with the
    head's P(finding) in the time embedding (the study's own run), with the true labels of I_trg in its place (an oracle:
    the most any head could tell the UNet) and with I_prev's labels (a head that says "no change"), each scored by
    notebook 05's evaluator as Table II (weighted-macro AUROC all / diff / same), beside the head's P itself scored
    as a predictor. The oracle row bounds what a better head or better events can buy through this path; its gap
    to the VAE reconstruction of I_trg is the UNet's. Needs notebooks 01-05 of the profile's run; PNGs are written
    under ``--out`` (resumed while ``render_of.json`` records the same model and sampler), one tidy row per signal
    and seed to ``<out>/render.csv``."""
    import pandas as pd
    import torch

    from ehrxdiff.config import load_config
    from ehrxdiff.constants import IMAGENOME_LABELS
    from ehrxdiff.data.labels import target_label_matrix
    from ehrxdiff.evaluation.baselines import generated_image_table
    from ehrxdiff.evaluation.metrics import score_method
    from ehrxdiff.models.ldm import encode_condition
    from ehrxdiff.models.sampling import generate_split
    from ehrxdiff.study import evaluation, models, prepare
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.profile, {k: v for k, v in a.param})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.pipeline:   # e.g. a model trained by ``bench curve``
        from ehrxdiff.models.pipeline import EHRXDiffPipeline
        pipe = EHRXDiffPipeline.from_pretrained(a.pipeline).to(models.device())
    else:
        pipe = models.load_pipeline(cfg, a.model)
    if pipe.adaptor.findings_head is None:
        print(f"{a.model} has no findings head (event_global {cfg.event_global}): nothing to render", file=sys.stderr)
        return 2
    ds = prepare.datasets(cfg, ("test",))
    test = models.test_pairs(cfg, ds)
    keys = list(test.pairs["pair_key"])
    samples, _ = prepare.load_pairs_with_events(cfg)
    labels, rows = prepare.label_rows(cfg, samples)
    rows = rows[rows["pair_key"].isin(set(keys))]
    evaluator = evaluation.train_evaluator(cfg, samples, labels)   # notebook 05's, reloaded
    tag = evaluation.evaluator_tag(cfg, evaluator)
    collate = models.collate(cfg)
    head = []
    with torch.no_grad():
        for i in range(0, len(test), cfg.sample_batch_size):
            b = collate([test[j] for j in range(i, min(len(test), i + cfg.sample_batch_size))])
            cond = encode_condition(adaptor=pipe.adaptor, vae=pipe.vae, clip=pipe.clip, prev_image=b["prev_image"],
                                    events=b["events"], event_mask=b["event_mask"])
            head.append(cond.pooled_events.float().cpu())
    labels_order = list(IMAGENOME_LABELS)
    head_p = pd.DataFrame(torch.cat(head).numpy(), index=pd.Index(keys, name="pair_key"), columns=labels_order)
    prev = (rows.pivot_table(index="pair_key", columns="label", values="prev_relation", aggfunc="max")
            .reindex(index=keys, columns=labels_order).astype("float32"))
    signals = {"head": None, "I_trg labels (oracle)": target_label_matrix(rows).reindex(keys), "I_prev labels": prev}
    folders = {signal: out / signal.split(" ")[0].replace("_", "-") for signal in signals}   # head, I-trg, I-prev
    scale = models.guidance_scale(cfg, a.model)   # the study's s of this model
    from ehrxdiff.training.cache import module_fingerprint
    fingerprint = {"unet": module_fingerprint(pipe.unet), "adaptor": module_fingerprint(pipe.adaptor),
                   "guidance": scale, "sampler": cfg.sampler, "steps": cfg.sample_steps,
                   "eta": cfg.sample_eta, "clip_x0": cfg.sample_clip_x0}
    record = out / "render_of.json"   # PNGs of another model or sampler are removed, never resumed into this one
    if record.exists() and json.loads(record.read_text()) != fingerprint:
        print(f"{out}: PNGs of another model or sampler; removed", file=sys.stderr)
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    record.write_text(json.dumps(fingerprint, indent=1))
    results = []

    def add(signal, seed, scores):
        summary, _ = score_method(rows, scores, method=signal, seed=seed, evaluator=tag)
        r = {"model": a.pipeline or a.model, "signal": signal, "seed": seed, "guidance": scale,
             **summary.set_index("subset")["auroc"].to_dict()}
        results.append(r)
        pd.DataFrame(results).to_csv(out / "render.csv", index=False)
        print(f"{signal:<34} seed {seed}  all {r['all']:.3f}  diff {r['diff']:.3f}  same {r['same']:.3f}", flush=True)

    print(f"{a.model} on {cfg.profile}: {len(keys)} test pairs, event guidance s = {scale:g}, "
          f"{cfg.sampler}-{cfg.sample_steps}; weighted-macro AUROC of the evaluator {tag}", flush=True)
    add("head P(finding), no image", 0, head_p)
    for seed in a.seeds:
        for signal, given in signals.items():
            folder = folders[signal] / f"seed{seed}"
            generate_split(pipe, test, folder, seed=seed, sampler=cfg.sampler, num_inference_steps=cfg.sample_steps,
                           eta=cfg.sample_eta, batch_size=cfg.sample_batch_size, collate_fn=collate,
                           clip_x0=cfg.sample_clip_x0, event_guidance_scale=scale,
                           findings=given, progress=False)
            img = evaluation.score_images(cfg, evaluator, generated_image_table(keys, folder), folder)
            add(f"images, {signal}", seed, img.table)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cohort", help="cohort + event extraction on a synthetic world")
    c.add_argument("--n-patients", type=int, default=1000)
    c.add_argument("--chart-sets-per-hour", "--chart-rows-per-hour", dest="chart_sets_per_hour", type=int, default=1,
                   help="multiplies the ICU vital-sign rows (ehrxdiff.synthetic.generate_world)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--world", default=None, help="world folder (default data/bench/world-n<N>-c<C>-s<seed>)")
    c.add_argument("--images", action="store_true", help="render JPEGs and check them (default: tables only)")
    c.add_argument("--memory-limit", default="2GB")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", default=None, help="where the events and the store go (default <world>/bench_out)")
    c.add_argument("--store-dim", type=int, default=32, help="hashing-embedder dim of the benchmark's event store")
    c.add_argument("--gunzip-thread", action="store_true",
                   help="inflate the .csv.gz files on a second thread (extract_events_to_dir(gunzip_thread=True))")
    c.add_argument("--keep", action="store_true", help="keep the events and the store (default: deleted)")
    c.set_defaults(func=_bench_cohort)
    m = sub.add_parser("ldm", help="EHRXDiff train samples/s and sampling s/image (DDIM-100 vs DPM-Solver++)")
    m.add_argument("--profile", default="demo")
    m.add_argument("--event-dim", type=int, default=384)
    m.add_argument("--train-steps", type=int, default=5)
    m.add_argument("--fast-steps", type=int, default=20)
    m.add_argument("--sample-batch", type=int, default=8)
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (timings synchronise the GPU)")
    m.add_argument("--batch-size", type=int, default=None, help="training batch (default: the profile's ldm_batch_size)")
    m.add_argument("--loader", action="store_true", help="also time the profile's data loader on its run's real data")
    m.set_defaults(func=_bench_ldm)
    lc = sub.add_parser("curve", help="learning curve of one model: re-id and conditioning sensitivity vs CPU time")
    lc.add_argument("--profile", default="demo")
    lc.add_argument("--model", default="EHRXDiff", help="a model of the profile (models.variants)")
    lc.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="config override, as ./run_all.sh -p")
    lc.add_argument("--every", type=int, default=100, help="optimizer steps per stage")
    lc.add_argument("--stages", type=int, default=5)
    lc.add_argument("--pairs", type=int, default=80, help="test pairs sampled for the re-identification")
    lc.add_argument("--threads", type=int, default=None)
    lc.add_argument("--out", required=True, help="folder of the run (checkpoints, pipeline, curve.csv)")
    lc.set_defaults(func=_bench_curve)
    pr = sub.add_parser("probe", help="linear probes of S_event: do the frozen CLIP table tokens predict the next film?")
    pr.add_argument("--profile", default="demo")
    pr.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="config override, as ./run_all.sh -p")
    pr.add_argument("--threads", type=int, default=None)
    pr.add_argument("--out", required=True, help="folder for probe.csv")
    pr.set_defaults(func=_bench_probe)
    rd = sub.add_parser("render", help="does the UNet draw what its findings signal says: head vs true labels")
    rd.add_argument("--profile", default="demo")
    rd.add_argument("--model", default="EHRXDiff_w_null", help="a trained model with a findings head")
    rd.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="config override, as ./run_all.sh -p")
    rd.add_argument("--pipeline", default=None, help="a saved pipeline folder instead of the run's --model "
                    "(e.g. <bench curve --out>/pipeline)")
    rd.add_argument("--seeds", type=int, nargs="+", default=[0])
    rd.add_argument("--threads", type=int, default=None)
    rd.add_argument("--out", required=True, help="folder for the PNGs and render.csv")
    rd.set_defaults(func=_bench_render)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
