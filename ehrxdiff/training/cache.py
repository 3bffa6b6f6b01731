"""The frozen encoders' outputs, computed once: the LDM trains on them instead of re-encoding every step.

In the paper's recipe (§III-A) the first stage is frozen, so E(I) of a cohort image is the same at every training
step; on a 2-core CPU re-encoding I_prev and I_trg was half of each demo step (issue 13). Two caches:

* :class:`FirstStageCache` - the VAE posterior (mean, std) of every image the LDM sees, at the model's size. The
  LDM draws z = scale * (mean + std * eps), eps ~ N(0, I): the distribution of ``encode(I).sample()`` (Eq. 2's
  target, paper-reference §7.1), so training from the cache is the same objective, not an approximation.
  EHRXDiff_w_null's null targets are *augmented* copies of I_prev (§II-D, D4); a fresh RandomAffine per step has
  no finite cache, so ``n_augment`` jittered copies of each such image are encoded once (seeded) and a null sample
  draws one of them uniformly. With K copies the model sees at most K poses of each null target instead of a new one
  per visit (the demo's 600 steps at batch 64 visit each about 4 times, with K = 2); the cost is K encodes per null
  source image, paid once.
* :class:`ConditionCache` - when the CLIP towers are frozen (``ldm_clip_trainable: false``; the reference fine-
  tunes them, the paper profile keeps that), the image tower's tokens of I_prev and the table tower's tokens of
  S_event per pair, plus the tokens of the null event set, computed once in eval mode.

Each cache lives in a folder named by a fingerprint of everything it was computed from - the encoder's weights and
config, the image size, the images' bytes, the events and pairs - so a changed VAE, CLIP, image size or cohort can
never read a stale cache: it simply looks in another folder. The fingerprint is stored too and checked on load.
:class:`CachedPairs` serves training and validation batches from the caches (the LDM's forward takes either).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ehrxdiff.data.datasets import pad_events
from ehrxdiff.data.images import load_image
from ehrxdiff.data.wnull import NULL_SUFFIX, NullTargetAugmentation, null_source_indices
from ehrxdiff.models.ldm import DROPPED_EVENTS, withheld_table

FORMAT_VERSION = 1

# Batch keys that carry the previous image and those that carry the events, in either form (images and raw events,
# or their cached encodings): what the conditioning-sensitivity check swaps between pairs.
PREV_KEYS = ("prev_image", "prev_mean", "image_tokens")
EVENT_KEYS = ("events", "event_mask", "table_tokens", "table_mask")


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config (when it has one) and every tensor of its state dict (name, dtype, shape,
    bytes): two modules share a fingerprint only if they compute the same function."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        # keys starting with "_" are diffusers' bookkeeping (version, name_or_path), not the function
        h.update(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                            sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _files_fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(hashlib.sha1(Path(p).read_bytes()).digest())
    return h.hexdigest()


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write into ``<folder>.tmp`` and rename when complete (a killed build never leaves a half cache)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _read(folder: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file() or not (folder / "tensors.safetensors").is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: cache fingerprint does not match its folder name (edited by hand?); "
                         f"delete {folder}")
    return load_file(str(folder / "tensors.safetensors")), meta


@torch.no_grad()
def _batched(fn, items: Sequence, batch_size: int, load) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(items), batch_size):
        out.append(fn(torch.stack([load(x) for x in items[i:i + batch_size]])))
    return out


class FirstStageCache:
    """Posterior mean and std [N, C_z, h, w] (float32) of each image path; ``augmented`` [M, K, ...] for the
    null targets (module docstring). Build or load with :meth:`build`."""

    def __init__(self, paths: list[str], mean: torch.Tensor, std: torch.Tensor, aug_paths: list[str],
                 aug_mean: torch.Tensor, aug_std: torch.Tensor, folder: Path | None = None):
        self.paths, self.mean, self.std = paths, mean, std
        self.aug_paths, self.aug_mean, self.aug_std = aug_paths, aug_mean, aug_std
        self.row = {p: i for i, p in enumerate(paths)}
        self.aug_row = {p: i for i, p in enumerate(aug_paths)}
        self.folder = folder

    @property
    def n_augment(self) -> int:
        return int(self.aug_mean.shape[1]) if self.aug_mean.ndim == 5 else 0

    @classmethod
    def build(cls, vae, *, image_root: str | Path, paths: Iterable[str], image_size: int, cache_root: str | Path,
              augment_paths: Iterable[str] = (), n_augment: int = 4, seed: int = 0, batch_size: int = 64,
              augmentation=None) -> "FirstStageCache":
        """Encode every image of ``paths`` (relative to ``image_root``) and ``n_augment`` augmented copies of each
        of ``augment_paths`` - or load them from ``cache_root/first_stage-<fingerprint>`` when computed before.
        ``augmentation`` defaults to the w_null target jitter (:class:`ehrxdiff.data.wnull.NullTargetAugmentation`)."""
        root = Path(image_root)
        paths, aug_paths = sorted(set(map(str, paths))), sorted(set(map(str, augment_paths)))
        augmentation = augmentation or NullTargetAugmentation()
        parts = {"format_version": FORMAT_VERSION, "vae": module_fingerprint(vae), "image_size": int(image_size),
                 "images": _files_fingerprint(root / p for p in paths), "paths": paths,
                 "augment": aug_paths, "n_augment": int(n_augment) if aug_paths else 0, "seed": int(seed),
                 "augmentation": repr(getattr(augmentation, "affine", augmentation))}
        key = _key(parts)
        folder = Path(cache_root) / f"first_stage-{key[:16]}"
        found = _read(folder, key)
        if found is not None:
            t, _ = found
            return cls(paths, t["mean"], t["std"], aug_paths, t["aug_mean"], t["aug_std"], folder)
        device = next(vae.parameters()).device
        was_training = vae.training
        vae.eval()

        def encode(x: torch.Tensor) -> torch.Tensor:
            dist = vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist
            return torch.stack([dist.mean.float().cpu(), dist.std.float().cpu()])

        def load(p: str) -> torch.Tensor:
            return load_image(root / p, image_size)

        enc = torch.cat(_batched(encode, paths, batch_size, load), dim=1) if paths else torch.zeros(2, 0)
        n_aug = int(n_augment) if aug_paths else 0
        if n_aug:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)   # the jitter draws from torch's global RNG (torchvision v2)
            copies = [torch.cat(_batched(encode, aug_paths, batch_size, lambda p: augmentation(load(p))), dim=1)
                      for _ in range(n_aug)]
            torch.random.set_rng_state(gen_state)
            aug = torch.stack(copies, dim=2)   # [2, M, K, C, h, w]
        else:
            aug = torch.zeros(2, 0)
        vae.train(was_training)
        _write(folder, {"mean": enc[0], "std": enc[1], "aug_mean": aug[0], "aug_std": aug[1]},
               {"key": key, "format_version": FORMAT_VERSION, "n_images": len(paths), "n_augmented": len(aug_paths),
                "n_augment": n_aug, "image_size": int(image_size)})
        return cls(paths, enc[0], enc[1], aug_paths, aug[0], aug[1], folder)

    def posterior(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.row.get(path)
        if i is None:
            raise KeyError(f"{path}: not in the first-stage cache {self.folder} (built for another cohort?)")
        return self.mean[i], self.std[i]

    def augmented(self, path: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.aug_row.get(path)
        if i is None:
            raise KeyError(f"{path}: no augmented copies in the first-stage cache {self.folder}")
        return self.aug_mean[i, k], self.aug_std[i, k]


class ConditionCache:
    """Frozen CLIP tokens: ``image_tokens`` [N_img, T, D] per I_prev path, ``table_tokens`` [N_pair, max_events, D]
    with ``table_mask`` per pair key, and the null event set's tokens (one row). Build or load with :meth:`build`."""

    def __init__(self, image_paths, image_tokens, pair_keys, table_tokens, table_mask, null_tokens, null_mask,
                 folder: Path | None = None):
        self.image_row = {p: i for i, p in enumerate(image_paths)}
        self.pair_row = {k: i for i, k in enumerate(pair_keys)}
        self.image_tokens, self.table_tokens, self.table_mask = image_tokens, table_tokens, table_mask
        self.null_tokens, self.null_mask = null_tokens, null_mask
        self.folder = folder
        self._withheld = None

    @classmethod
    def build(cls, clip, *, pairs: pd.DataFrame, image_root: str | Path, image_size: int, event_store,
              max_events: int, cache_root: str | Path, use_image: bool = True, use_table: bool = True,
              batch_size: int = 64) -> "ConditionCache":
        """Tokens of :class:`ehrxdiff.models.ldm.ClipConditioner` ``clip`` (eval mode, no dropout) for every pair of
        ``pairs`` (columns pair_key, prev_path), or loaded from ``cache_root/conditions-<fingerprint>``."""
        root = Path(image_root)
        prev_paths = sorted(set(pairs["prev_path"].astype(str))) if use_image else []
        keys = sorted(set(pairs["pair_key"].astype(str))) if use_table else []
        store_files = [event_store.root / n for n in ("embeddings.npy", "event_text_ids.npy", "pairs.parquet")]
        parts = {"format_version": FORMAT_VERSION, "clip": module_fingerprint(clip), "image_size": int(image_size),
                 "images": _files_fingerprint(root / p for p in prev_paths), "paths": prev_paths, "pairs": keys,
                 "events": _files_fingerprint(store_files) if use_table else None, "max_events": int(max_events)}
        key = _key(parts)
        folder = Path(cache_root) / f"conditions-{key[:16]}"
        found = _read(folder, key)
        if found is not None:
            t, _ = found
            return cls(prev_paths, t["image_tokens"], keys, t["table_tokens"], t["table_mask"], t["null_tokens"],
                       t["null_mask"], folder)
        device = next(clip.parameters()).device
        was_training = clip.training
        clip.eval()
        with torch.no_grad():
            img = (torch.cat(_batched(lambda x: clip.image_tokens(x.to(device)).float().cpu(), prev_paths,
                                      batch_size, lambda p: load_image(root / p, image_size)))
                   if prev_paths else torch.zeros(0))
            tab, msk = [], []
            for i in range(0, len(keys), batch_size):
                rows = [event_store.embeddings(k, max_events=max_events) for k in keys[i:i + batch_size]]
                ev, m = pad_events([np.asarray(r, np.float32) for r in rows], max_events=max_events)
                tok, tmask = clip.table_tokens(ev.to(device), m.to(device))
                tok, tmask = _pad_to(tok.float().cpu(), tmask.cpu(), max_events)
                tab.append(tok)
                msk.append(tmask)
            table = torch.cat(tab) if tab else torch.zeros(0)
            mask = torch.cat(msk) if msk else torch.zeros(0, dtype=torch.bool)
            if use_table:
                dim = int(clip.event_dim)
                nt, nm = clip.table_tokens(torch.zeros(1, 1, dim, device=device),
                                           torch.zeros(1, 1, dtype=torch.bool, device=device))
                null_t, null_m = _pad_to(nt.float().cpu(), nm.cpu(), max_events)
            else:
                null_t, null_m = torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        clip.train(was_training)
        _write(folder, {"image_tokens": img, "table_tokens": table, "table_mask": mask, "null_tokens": null_t,
                        "null_mask": null_m},
               {"key": key, "format_version": FORMAT_VERSION, "n_images": len(prev_paths), "n_pairs": len(keys)})
        return cls(prev_paths, img, keys, table, mask, null_t, null_m, folder)

    def image(self, prev_path: str) -> torch.Tensor:
        return self.image_tokens[self.image_row[prev_path]]

    def table(self, pair_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.pair_row[pair_key]
        return self.table_tokens[i], self.table_mask[i]

    def null_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.null_tokens[0], self.null_mask[0]

    def withheld_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`ehrxdiff.models.ldm.withheld_table` padded as the cached tables are (built once, as the null table)."""
        if self._withheld is None:
            tokens, mask = _pad_to(*withheld_table(1, self.null_tokens.shape[-1]), self.null_tokens.shape[1])
            self._withheld = tokens[0], mask[0]
        return self._withheld


def _pad_to(tokens: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero tokens / False mask up to ``n`` positions (the adaptor pads the table to ``max_events`` anyway)."""
    b, m, d = tokens.shape
    if m < n:
        tokens = torch.cat([tokens, tokens.new_zeros(b, n - m, d)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, n - m)], 1)
    return tokens, mask


class CachedPairs(Dataset):
    """Training/validation items from the caches: ``prev_mean``, ``target_mean``, ``target_std`` and, with a
    :class:`ConditionCache`, ``image_tokens`` / ``table_tokens`` / ``table_mask``; without one (CLIP fine-tuned),
    the raw ``prev_image`` and ``events`` of ``base`` (a :class:`ehrxdiff.data.datasets.PairDataset`) for the towers.

    ``with_null=True`` appends EHRXDiff_w_null's null samples (§II-D): one per unique target, (I_prev, S_null, one of
    the cached augmented copies of I_prev), as :class:`ehrxdiff.data.wnull.WithNullSamples`. The copy is drawn uniformly
    per visit from (``seed``, epoch, index) - not from the global RNG, which a prefetching loader advances ahead of
    the step - so a resumed run draws the same copies as an unbroken one; the trainer calls :meth:`set_epoch`.

    ``event_dropout`` p (not in the paper; InstructPix2Pix's conditioning dropout, Brooks et al. 2023): each visit of a
    real pair replaces its S_event by the null event set with probability p, the target staying I_trg, so the model
    learns eps(I_prev, null) on every kind of pair - the reference branch of event guidance - and must take from the
    events what they add. Drawn like the null targets, from (``seed``, epoch, index). ``dropped_events="withheld"``
    gives a dropped pair the withheld-events token (:func:`ehrxdiff.models.ldm.withheld_table`) instead of S_null,
    so that with ``with_null`` S_null means only "nothing happened"; it needs the frozen towers' tokens.

    ``null_share`` (not in the paper, which adds one null sample per unique target, §II-D - 39 % of the demo's
    training visits): the null samples make up this share of the training set instead, each visit's source drawn
    uniformly from the unique targets from (``seed``, epoch, index), so every target can serve over the epochs.
    """

    def __init__(self, base, first_stage: FirstStageCache, conditions: ConditionCache | None = None, *,
                 with_null: bool = False, seed: int = 0, event_dropout: float = 0.0,
                 dropped_events: str = "null_set", null_share: float | None = None):
        if not 0.0 <= event_dropout < 1.0:
            raise ValueError(f"event_dropout must be in [0, 1), got {event_dropout}")
        if dropped_events not in DROPPED_EVENTS:
            raise ValueError(f"dropped_events must be one of {DROPPED_EVENTS}, got {dropped_events!r}")
        if dropped_events == "withheld" and event_dropout and conditions is None:   # (a model without the table
            raise ValueError("dropped_events='withheld' replaces the cached table tokens: it needs a ConditionCache "
                             "(frozen CLIP towers)")                                 # tower has nothing to drop)
        self.dropped_events = dropped_events
        self.base, self.fs, self.cc = base, first_stage, conditions
        self.seed, self.epoch, self.event_dropout = int(seed), 0, float(event_dropout)
        self.pairs = base.pairs
        self.prev_paths = self.pairs["prev_path"].astype(str).tolist()
        self.target_paths = self.pairs["target_path"].astype(str).tolist()
        self.keys = self.pairs["pair_key"].astype(str).tolist()
        self.null_sources = null_source_indices(self.pairs["target_dicom_id"].tolist()) if with_null else []
        if self.null_sources and first_stage.n_augment == 0:
            raise ValueError("with_null=True needs augmented null targets in the first-stage cache (n_augment > 0)")
        if null_share is not None and not 0.0 < null_share < 1.0:
            raise ValueError(f"null_share must be in (0, 1) or None, got {null_share}")
        self.null_share = null_share
        self.n_null = (len(self.null_sources) if null_share is None or not self.null_sources
                       else max(1, round(len(self.pairs) * null_share / (1.0 - null_share))))

    @staticmethod
    def null_augment_paths(pairs: pd.DataFrame) -> list[str]:
        """The images whose augmented copies the null samples of ``pairs`` need (I_prev of each null source)."""
        idx = null_source_indices(pairs["target_dicom_id"].tolist())
        return sorted(set(pairs["prev_path"].astype(str).iloc[idx]))

    def __len__(self) -> int:
        return len(self.pairs) + self.n_null

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        null = i >= len(self.pairs)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if not null:
            j = i
        elif self.null_share is None:
            j = self.null_sources[i - len(self.pairs)]
        else:
            j = self.null_sources[int(rng.integers(len(self.null_sources)))]
        prev = self.prev_paths[j]
        prev_mean, _ = self.fs.posterior(prev)
        if null:
            t_mean, t_std = self.fs.augmented(prev, int(rng.integers(self.fs.n_augment)))
        else:
            t_mean, t_std = self.fs.posterior(self.target_paths[j])
        dropped = not null and self.event_dropout > 0 and rng.random() < self.event_dropout
        no_events = null or dropped
        item = {"prev_mean": prev_mean, "target_mean": t_mean, "target_std": t_std, "is_null": null,
                "pair_key": self.keys[j] + (NULL_SUFFIX if null else "")}
        if self.cc is not None:
            if self.cc.image_row:
                item["image_tokens"] = self.cc.image(prev)
            if self.cc.pair_row:
                if dropped and self.dropped_events == "withheld":
                    table = self.cc.withheld_table()
                elif no_events:
                    table = self.cc.null_table()
                else:
                    table = self.cc.table(self.keys[j])
                item["table_tokens"], item["table_mask"] = table
        else:
            raw = self.base[j]
            item["prev_image"] = raw["prev_image"]
            item["events"] = raw["events"][:0] if no_events else raw["events"]
        return item


def collate_cached(items: list[dict], max_events: int | None = None) -> dict:
    """Stack the cached tensors; raw events (CLIP fine-tuned) are padded as
    :func:`ehrxdiff.data.datasets.collate_pairs`."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]
             if k not in ("events", "pair_key", "is_null")}
    batch["pair_key"] = [it["pair_key"] for it in items]
    batch["is_null"] = torch.tensor([bool(it["is_null"]) for it in items])
    if "events" in items[0]:
        batch["events"], batch["event_mask"] = pad_events([it["events"] for it in items], max_events=max_events)
    return batch
