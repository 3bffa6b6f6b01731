"""The findings head of ``event_global: findings`` (not in the paper; issue 14): fitted before the LDM trains.

Why: on the demo world the frozen CLIP table tokens hold what the events say about the next film - a linear probe
of their pooled mean and max, events only, predicts the next film's findings at weighted-macro AUROC 0.83 / 0.76 /
0.84 (all / diff / same; docs/methods.md) - but the diffusion loss alone, at a CPU budget, does not teach the UNet to
find it in 64 cross-attended tokens (loss +0.1 % with S_event swapped). The head turns the pooled tokens into 14
probabilities, one per finding (:meth:`ehrxdiff.models.adaptor.FusionAdaptor.findings`), which reach every ResNet
block through the time embedding, as a class label does in class-conditional diffusion.

It is a logistic regression per finding on the *train* pairs' report labels of the target film (Chest ImaGenome,
the labels Table II is scored against; unlabelled findings masked), full batch, with an L2 penalty, on standardised
inputs folded back into the Linear so the head reads the raw pooled tokens. Nothing of the test split is used. It is
frozen while the LDM trains (:class:`ehrxdiff.models.ldm.EHRXDiff`), so the UNet learns to draw what the head says
rather than the head learning to help the loss.

``event_global: findings_prev`` fits the same head on the pooled CLIP image tokens of I_prev beside the events'
(:func:`pooled_image_tokens`): the next film's findings are mostly the last film's, changed by the events.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ehrxdiff.data.datasets import pad_events
from ehrxdiff.data.images import load_image
from ehrxdiff.models.ldm import ClipConditioner, pool_events, pool_image

__all__ = ["event_batches", "pooled_table_tokens", "pooled_image_tokens", "pooled_cached_tokens", "fit_findings_head"]


def event_batches(event_store, keys, *, max_events: int, batch_size: int = 256):
    """The pairs' S_event as the LDM sees them (the ``max_events`` most recent events, zero-padded with their mask),
    ``(events [B, N, D], mask [B, N])`` per batch of ``batch_size`` keys."""
    for i in range(0, len(keys), batch_size):
        rows = [torch.from_numpy(np.asarray(event_store.embeddings(k, max_events=max_events), np.float32))
                for k in keys[i:i + batch_size]]
        yield pad_events(rows, max_events=max_events)


@torch.no_grad()
def pooled_table_tokens(clip: ClipConditioner, event_store, keys, *, max_events: int,
                        batch_size: int = 256) -> torch.Tensor:
    """[len(keys), 2 D]: :func:`~ehrxdiff.models.ldm.pool_events` of the table tower's tokens of each pair's S_event
    (:func:`event_batches`), the tower in eval mode."""
    tower = clip.clip.table_tower
    was_training = tower.training
    tower.eval()
    out = [pool_events(*clip.table_tokens(events, mask))
           for events, mask in event_batches(event_store, keys, max_events=max_events, batch_size=batch_size)]
    tower.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def pooled_image_tokens(clip: ClipConditioner, image_root, paths, *, image_size: int,
                        batch_size: int = 256) -> torch.Tensor:
    """[len(paths), 2 D]: :func:`~ehrxdiff.models.ldm.pool_image` of the image tower's tokens of each image (I_prev
    of each pair, loaded at the model's size as the LDM's cache loads it), each distinct image encoded once, the
    tower in eval mode."""
    root = Path(image_root)
    paths = [str(p) for p in paths]
    distinct = sorted(set(paths))
    tower = clip.clip.image_tower
    was_training = tower.training
    tower.eval()
    pooled = torch.cat([pool_image(clip.image_tokens(torch.stack([load_image(root / p, image_size)
                                                                  for p in distinct[i:i + batch_size]])))
                        for i in range(0, len(distinct), batch_size)]) if distinct else torch.zeros(0)
    tower.train(was_training)
    row = {p: i for i, p in enumerate(distinct)}
    return pooled[[row[p] for p in paths]] if paths else pooled


@torch.no_grad()
def pooled_cached_tokens(cond, keys, prev_paths=None, *, batch_size: int = 1024) -> torch.Tensor:
    """:func:`pooled_table_tokens` (and, with ``prev_paths``, :func:`pooled_image_tokens` beside them) read from a
    :class:`ehrxdiff.training.cache.ConditionCache` instead of running the towers again: the cache holds the same
    frozen towers' tokens of the same pairs (eval mode, the ``max_events`` most recent events), which the LDM then
    trains on, so the head reads exactly what the UNet is given. [len(keys), 2 D] or [len(keys), 4 D]."""
    keys = [str(k) for k in keys]
    missing = [k for k in keys if k not in cond.pair_row]
    if missing:
        raise KeyError(f"the condition cache {cond.folder} holds no table tokens of pair {missing[0]!r} "
                       f"({len(missing)} of {len(keys)} pairs missing)")
    rows = [cond.pair_row[k] for k in keys]
    out = [pool_events(cond.table_tokens[rows[i:i + batch_size]], cond.table_mask[rows[i:i + batch_size]])
           for i in range(0, len(rows), batch_size)]
    feats = torch.cat(out) if out else torch.zeros(0, 2 * cond.table_tokens.shape[-1])
    if prev_paths is None:
        return feats
    paths = [str(p) for p in prev_paths]
    absent = [p for p in paths if p not in cond.image_row]
    if absent:
        raise KeyError(f"the condition cache {cond.folder} holds no image tokens of I_prev {absent[0]!r} "
                       f"({len(absent)} of {len(paths)} films missing)")
    pooled = pool_image(cond.image_tokens)          # the cache holds each film once: pool them all, then index
    return torch.cat([feats, pooled[[cond.image_row[p] for p in paths]]], dim=-1)


def _masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(targets)
    return F.binary_cross_entropy_with_logits(logits[known], targets[known])


def fit_findings_head(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, *, steps: int = 500,
                      lr: float = 0.01, l2: float = 1e-3) -> dict:
    """Fit ``head`` (Linear 2 D -> K) in place: masked BCE of ``head(features)`` against ``targets`` [N, K] (NaN =
    unlabelled), plus ``l2`` times the mean squared weight, by full-batch Adam for ``steps`` steps on standardised
    features; the standardisation is then folded into the weights. Deterministic for a given start. Returns the
    final training BCE and the number of labelled (pair, finding) cells."""
    if features.ndim != 2 or features.shape[1] != head.in_features:
        raise ValueError(f"features must be [N, {head.in_features}], got {tuple(features.shape)}")
    if targets.shape != (features.shape[0], head.out_features):
        raise ValueError(f"targets must be [{features.shape[0]}, {head.out_features}], got {tuple(targets.shape)}")
    if not (~torch.isnan(targets)).any():
        raise ValueError("no labelled finding to fit the findings head on")
    x = features.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = ((x - mu) / sd).float()
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = _masked_bce(z @ w.T + b, targets) + l2 * w.pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        wd = w.detach().double() / sd                      # head(x) = w·(x - mu)/sd + b
        head.weight.copy_(wd.float())
        head.bias.copy_((b.detach().double() - wd @ mu).float())
        bce = float(_masked_bce(head(features), targets))
    return {"train_bce": bce, "labelled": int((~torch.isnan(targets)).sum())}
