"""Datasets of (I_prev, S_event, I_trg) triples (§II-A) read lazily from the cohort and the event store.

A dataset item is a dict: ``prev_image``/``target_image`` [3, H, W] in [-1, 1], ``events`` float32 [n, D]
(time-ordered, the most recent ``max_events``), ``pair_key``, ``prev_dicom_id``, ``target_dicom_id``,
``is_null`` (False here; the w_null wrapper adds null samples, §II-D). :func:`collate_pairs` pads events
to the longest row of the batch (or a fixed ``pad_to``) and builds ``event_mask`` (True = real event).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ehrxdiff.data.images import load_image


class PairDataset(Dataset):
    """Triples of one split. Images are read from ``image_root`` (the MIMIC-CXR-JPG root) on access.

    ``cache_images`` keeps decoded, resized images in memory: worth it on CPU, where the same previous
    image appears in several pairs (the reference pairs every earlier image, §2.3).
    """

    def __init__(self, pairs: pd.DataFrame, image_root: str | Path, event_store=None, *,
                 image_size: int = 64, max_events: int = 1024, split: str | None = None,
                 cache_images: bool = True):
        df = pairs if split is None else pairs[pairs["split"] == split]
        if event_store is not None:
            have = set(event_store.pair_keys)
            df = df[df["pair_key"].isin(have)]
        self.pairs = df.reset_index(drop=True)
        self.image_root = Path(image_root)
        self.store = event_store
        self.image_size = image_size
        self.max_events = max_events
        self._load = lru_cache(maxsize=None)(self._load_uncached) if cache_images else self._load_uncached

    def __len__(self) -> int:
        return len(self.pairs)

    def with_pairs(self, pairs: pd.DataFrame) -> "PairDataset":
        """The same images, store and sizes over other ``pairs`` (e.g. a fixed subset of the test split)."""
        return PairDataset(pairs, self.image_root, self.store, image_size=self.image_size, max_events=self.max_events)

    def _load_uncached(self, relpath: str) -> torch.Tensor:
        return load_image(self.image_root / relpath, self.image_size)

    def events(self, pair_key: str) -> np.ndarray:
        if self.store is None:
            return np.zeros((0, 1), np.float32)
        return np.asarray(self.store.embeddings(pair_key, max_events=self.max_events), np.float32)

    def __getitem__(self, i: int) -> dict:
        r = self.pairs.iloc[i]
        return {
            "prev_image": self._load(r["prev_path"]),
            "target_image": self._load(r["target_path"]),
            "events": torch.from_numpy(self.events(r["pair_key"])),
            "pair_key": r["pair_key"],
            "prev_dicom_id": r["prev_dicom_id"],
            "target_dicom_id": r["target_dicom_id"],
            "is_null": False,
        }


def pad_events(rows, max_events: int | None = None, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded events [B, N, D] float32 and the key-padding mask [B, N] (True = real event).

    ``rows``: per-row event arrays [n_i, D] (tensors or arrays; an empty row may be [0, 1]). ``max_events`` keeps
    each row's most recent events; ``pad_to`` fixes N (the reference pads every row to 1024, §6), otherwise rows
    are padded to the longest, which is what makes the demo fast on a CPU.
    """
    evs = [e if torch.is_tensor(e) else torch.as_tensor(e) for e in rows]
    if max_events is not None:
        evs = [e[-max_events:] for e in evs]
    dim = max(e.shape[1] for e in evs)
    n = max([e.shape[0] for e in evs] + [1])
    if pad_to is not None:
        if n > pad_to:
            raise ValueError(f"a row has {n} events, more than pad_to={pad_to}")
        n = pad_to
    events = torch.zeros(len(evs), n, dim, dtype=torch.float32)
    mask = torch.zeros(len(evs), n, dtype=torch.bool)
    for i, e in enumerate(evs):
        if e.shape[0]:
            events[i, : e.shape[0]] = e.float()
            mask[i, : e.shape[0]] = True
    return events, mask


def collate_pairs(items: list[dict], max_events: int | None = None, pad_to: int | None = None) -> dict:
    """Stack images, pad events with zeros and build the key-padding mask (:func:`pad_events`)."""
    events, mask = pad_events([it["events"] for it in items], max_events=max_events, pad_to=pad_to)
    batch = {
        "prev_image": torch.stack([it["prev_image"] for it in items]),
        "target_image": torch.stack([it["target_image"] for it in items]),
        "events": events,
        "event_mask": mask,
        "pair_key": [it["pair_key"] for it in items],
        "is_null": torch.tensor([bool(it.get("is_null", False)) for it in items]),
    }
    return batch
