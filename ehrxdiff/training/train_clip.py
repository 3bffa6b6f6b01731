"""CXR–EHR CLIP pre-training on (I_prev, S_event) pairs and its retrieval check (§II-B, notebook 03).

:func:`train_clip` follows the reference recipe (ref §5 in shared/docs/paper-reference.md): AdamW
(lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.2 on all parameters, as the reference), symmetric
InfoNCE with batch-local negatives, ``drop_last`` batches, RandomResizedCrop(scale 0.75-1, square) on the
image; and deviates where decided: the data are shuffled (the reference's loader is not, §14 item 7) and
the cosine schedule is stepped per optimizer step (D5). It runs through ``accelerate``, so
``accelerate launch`` gives multi-GPU and mixed precision with no code change.

Resume is exact: the shuffling order comes from accelerate's seedable sampler (seed + epoch), a resumed
epoch skips the batches already done, and the global RNG (dropout, crops) is re-seeded from
(seed, step, process) before every step, so a killed run continued from its last checkpoint reaches the
same weights and optimizer state as an uninterrupted one.

:func:`retrieval_metrics` reports image->events and events->image recall@k against chance, the issue's
evidence that the towers learned to match an image with its events.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ehrxdiff.constants import CLIP_BETAS, CLIP_EPS, CLIP_LR, CLIP_WD
from ehrxdiff.models.clip import EHRCLIP, clip_loss
from ehrxdiff.training.loop import (append_history, cosine_with_warmup, latest_checkpoint, load_checkpoint,
                                    save_checkpoint, trim_history)

logger = logging.getLogger(__name__)

CROP_SCALE = (0.75, 1.0)  # RandomResizedCrop(256, scale=(0.75, 1), ratio 1:1) on I_prev [ref §5]


def _real_pairs(batch: dict) -> dict:
    """Drop w_null samples (§II-D): their empty event sets are identical, so in a contrastive batch they
    would be each other's false negatives. CLIP learns from real (I_prev, S_event) pairs only."""
    is_null = batch.get("is_null")
    if is_null is None or not bool(is_null.any()):
        return batch
    keep = ~is_null

    def select(value):
        if torch.is_tensor(value) and value.shape[:1] == keep.shape:
            return value[keep]
        if isinstance(value, (list, tuple)) and len(value) == len(keep):
            return [v for v, k in zip(value, keep.tolist()) if k]
        return value

    return {name: select(value) for name, value in batch.items()}


def _augment(images: torch.Tensor) -> torch.Tensor:
    """Per-image random square crop of 75-100 % of the area, resized back (ref §5)."""
    crop = v2.RandomResizedCrop(images.shape[-1], scale=CROP_SCALE, ratio=(1.0, 1.0), antialias=True)
    return torch.stack([crop(img) for img in images])


def _batch_loss(model, batch: dict, augment: bool) -> torch.Tensor:
    if batch["prev_image"].shape[0] < 2:
        raise ValueError(f"a CLIP batch holds {batch['prev_image'].shape[0]} real pair(s) after dropping w_null "
                         "samples; contrastive training needs >= 2 (pass the dataset without w_null samples)")
    images = _augment(batch["prev_image"]) if augment else batch["prev_image"]
    image_embeds, event_embeds, logit_scale = model(images, batch["events"], batch["event_mask"])
    return clip_loss(image_embeds, event_embeds, logit_scale)


@torch.no_grad()
def _validation_loss(model, loader, accelerator: Accelerator) -> float:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        batch = _real_pairs(batch)
        n = batch["prev_image"].shape[0]
        if n < 2:  # InfoNCE of a single pair is 0 by construction: not a measurement
            continue
        total += _batch_loss(model, batch, augment=False) * n
        count += n
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return float(total / count) if count > 0 else float("nan")


def _load_finished(model: EHRCLIP, final_dir: Path) -> EHRCLIP:
    finished = EHRCLIP.from_pretrained(final_dir)
    if finished.config != model.config:
        raise ValueError(f"{final_dir} holds a run with a different model config ({finished.config}) than the "
                         f"one requested ({model.config}); use another out_dir or resume=False")
    model.load_state_dict(finished.state_dict())
    return model


def train_clip(model: EHRCLIP, train_dataset: Dataset, valid_dataset: Dataset | None, *, out_dir: str | Path,
               epochs: int, batch_size: int, collate_fn: Callable, warmup_steps: int, checkpoint_every: int,
               checkpoint_limit: int | None, seed: int, lr: float = CLIP_LR, weight_decay: float = CLIP_WD,
               betas: tuple[float, float] = CLIP_BETAS, eps: float = CLIP_EPS, num_workers: int = 0,
               mixed_precision: str = "no", max_steps: int | None = None, resume: bool = True,
               image_augment: bool = True, progress: bool = True) -> dict:
    """Pre-train ``model`` contrastively; returns ``{"model", "history", "final_dir", "step", "finished"}``.

    Files under ``out_dir``: ``checkpoints/checkpoint-<step>`` (see :mod:`ehrxdiff.training.loop`),
    ``history.csv`` (tidy: step, epoch, split, loss, lr, logit_scale) and ``final/`` (``save_pretrained``).

    - ``resume=True``: if ``final/`` exists, its weights are loaded and nothing is trained ("load a
      finished run"); otherwise training continues from the latest checkpoint, if any.
    - ``max_steps`` stops after that many optimizer steps in total (counting resumed ones) and writes a
      checkpoint, as an interruption would; the learning-rate schedule still spans all ``epochs``, so
      calling again without ``max_steps`` finishes the same run.
    - ``batch_size`` is per process; batches are ``drop_last`` (InfoNCE depends on the batch size), and the
      validation loss uses the same batch size.
    """
    out_dir = Path(out_dir)
    final_dir, ckpt_root, history_csv = out_dir / "final", out_dir / "checkpoints", out_dir / "history.csv"
    if resume and (final_dir / "model.safetensors").is_file():
        logger.info("loading the finished run from %s", final_dir)
        history = pd.read_csv(history_csv) if history_csv.is_file() else pd.DataFrame()
        return {"model": _load_finished(model, final_dir), "history": history, "final_dir": final_dir,
                "step": int(history["step"].max()) if len(history) else None, "finished": True}

    accelerator = Accelerator(mixed_precision=mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    if len(train_dataset) < batch_size * accelerator.num_processes:
        raise ValueError(f"train_dataset has {len(train_dataset)} pairs, fewer than one batch "
                         f"({batch_size} x {accelerator.num_processes} processes)")
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate_fn, num_workers=num_workers)
    valid_loader = (DataLoader(valid_dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                               drop_last=len(valid_dataset) >= batch_size * accelerator.num_processes,
                               num_workers=num_workers) if valid_dataset is not None else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = len(train_loader)  # per process, after sharding
    total_steps = epochs * steps_per_epoch
    # A prepared scheduler steps once per process per optimizer step (see training.cosine_with_warmup).
    scheduler = accelerator.prepare(cosine_with_warmup(optimizer, warmup_steps * accelerator.num_processes,
                                                       total_steps * accelerator.num_processes))
    if valid_loader is not None:
        valid_loader = accelerator.prepare(valid_loader)

    step = 0
    if resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        logger.info("resumed from %s (step %d of %d)", ckpt, step, total_steps)
        if accelerator.is_main_process:
            trim_history(history_csv, step)
    elif accelerator.is_main_process:  # a fresh run: no curves, checkpoints or weights of an earlier one survive
        history_csv.unlink(missing_ok=True)
        for stale in (ckpt_root, final_dir):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    stop_at = total_steps if max_steps is None else min(max_steps, total_steps)
    bar = tqdm(total=total_steps, initial=step, desc="CLIP", disable=not (progress and accelerator.is_main_process))
    model.train()
    while step < stop_at:
        epoch = step // steps_per_epoch
        train_loader.set_epoch(epoch)
        done_in_epoch = step - epoch * steps_per_epoch
        loader = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        for batch in loader:
            torch.manual_seed((seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
                              % 2**63)
            loss = _batch_loss(model, _real_pairs(batch), image_augment)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            mean_loss = float(accelerator.reduce(loss.detach(), "mean"))  # collective: every process calls it
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if accelerator.is_main_process:
                append_history(history_csv, dict(
                    step=step, epoch=epoch, split="train", loss=mean_loss, lr=scheduler.get_last_lr()[0],
                    logit_scale=float(accelerator.unwrap_model(model).logit_scale.detach().exp())))
            if step % steps_per_epoch == 0 and valid_loader is not None:
                val = _validation_loss(model, valid_loader, accelerator)
                if accelerator.is_main_process:
                    append_history(history_csv, dict(step=step, epoch=epoch, split="valid", loss=val))
            if step % checkpoint_every == 0 or step == stop_at:
                save_checkpoint(accelerator, ckpt_root, step, checkpoint_limit, {"epoch": epoch})
            if step >= stop_at:
                break
    bar.close()

    unwrapped = accelerator.unwrap_model(model)
    history = pd.read_csv(history_csv) if history_csv.is_file() else pd.DataFrame()
    finished = step >= total_steps
    if finished and accelerator.is_main_process:
        unwrapped.save_pretrained(final_dir)
    accelerator.wait_for_everyone()
    return {"model": unwrapped, "history": history, "final_dir": final_dir if finished else None,
            "step": step, "finished": finished}


# --------------------------------------------------------------------------------------------------
# Embeddings and retrieval
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _embed(model: EHRCLIP, dataset: Dataset, *, batch_size: int, collate_fn: Callable, events: bool
           ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    model.eval()
    device = next(model.parameters()).device
    keys, image_embeds, event_embeds = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        batch = _real_pairs(batch)
        keys += list(batch["pair_key"])
        image_embeds.append(torch.nn.functional.normalize(
            model.encode_image(batch["prev_image"].to(device)), dim=-1).float().cpu())
        if events:
            event_embeds.append(torch.nn.functional.normalize(model.encode_events(
                batch["events"].to(device), batch["event_mask"].to(device)), dim=-1).float().cpu())
    img = torch.cat(image_embeds).numpy()
    return keys, img, (torch.cat(event_embeds).numpy() if events else None)


def embed_images(model: EHRCLIP, dataset: Dataset, *, batch_size: int = 64, collate_fn: Callable
                 ) -> tuple[list[str], np.ndarray]:
    """Unit-norm CLIP embeddings of each pair's I_prev: ``(pair_keys, array [N, embed_dim])``
    (w_null samples skipped). For the notebook's 2-D projection coloured by a finding."""
    keys, img, _ = _embed(model, dataset, batch_size=batch_size, collate_fn=collate_fn, events=False)
    return keys, img


def retrieval_metrics(model: EHRCLIP, dataset: Dataset, *, batch_size: int = 64, collate_fn: Callable,
                      ks: Sequence[int] = (1, 5, 10)) -> pd.DataFrame:
    """Recall@k of each pair's true partner among all N pairs of ``dataset`` (w_null samples skipped),
    image->events and events->image, against chance; see :func:`retrieval_from_similarity`."""
    _, img, evt = _embed(model, dataset, batch_size=batch_size, collate_fn=collate_fn, events=True)
    return retrieval_from_similarity(img.astype(np.float64) @ evt.astype(np.float64).T, ks=ks)


def retrieval_from_similarity(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> pd.DataFrame:
    """Recall@k from an [N, N] image x events similarity matrix whose diagonal holds the true pairs.

    Columns: direction ("image→events", "events→image"), k, recall, chance, n, z. ``z`` is the margin over chance
    in standard deviations of the hit count under random ranking (a Poisson-binomial over the queries' own chance
    probabilities, normal approximation): z > 3 is a margin that random rankings give less than once in 700. The rank
    of the true partner counts only candidates scoring *strictly* higher, so exact ties (the same previous image
    appears in several pairs of one admission, reference §2.3) count as found; chance accounts for it: with m
    tied-correct candidates among N, a random ranking puts one in the top k with probability
    1 - C(N-m, k) / C(N, k) (= k/N when m = 1), averaged over queries.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square [N, N], got {sim.shape}")
    n = sim.shape[0]
    rows = []
    for direction, scores in (("image→events", sim), ("events→image", sim.T)):
        correct = np.diag(scores)[:, None]
        rank = (scores > correct).sum(axis=1)              # 0 = best
        ties = (scores == correct).sum(axis=1)             # >= 1 (the partner itself)
        for k in ks:
            p = np.array([1.0 - (math.comb(n - m, k) / math.comb(n, k) if k <= n else 0.0) for m in ties])
            hits, sd = float((rank < k).sum()), float(np.sqrt((p * (1 - p)).sum()))
            rows.append(dict(direction=direction, k=int(k), recall=hits / n, chance=float(p.mean()), n=n,
                             z=(hits - p.sum()) / sd if sd > 0 else float("nan")))
    return pd.DataFrame(rows)
