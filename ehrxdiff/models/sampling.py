"""Generate predicted CXRs for a whole split (decision D6; paper-reference §9).

The paper samples every test pair with DDIM, 100 steps, eta = 1, no guidance, and evaluates the PNGs named
``<pair_key>.png`` (3 sampling seeds per result, §III-A). Here:

* the pipeline carries the EMA weights by default (``train_ldm`` exports them; the reference sampled with the
  raw weights, D6 ``use_ema_for_sampling``);
* ``sampler="ddim"`` (paper) or ``"dpm++"`` (DPM-Solver++, <= 20 steps, fast switch);
* each image's noise comes from its own generator seeded by (seed, pair_key), so a picture does not depend on
  the batch it was drawn in: a resumed run that **skips the PNGs already written** gives exactly the images an
  uninterrupted run would have.
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ehrxdiff.data.datasets import collate_pairs
from ehrxdiff.data.images import to_uint8
from ehrxdiff.models.ldm import SAMPLER_ALIASES


def pair_seed(seed: int, pair_key: str) -> int:
    """A stable 63-bit seed per (run seed, pair): crc32 of the key mixed with the seed."""
    return (int(seed) * 1_000_003 + zlib.crc32(pair_key.encode())) % (2 ** 63)


def png_path(out_dir: str | Path, pair_key: str) -> Path:
    return Path(out_dir) / f"{pair_key}.png"


def save_png(out_dir: str | Path, pair_key: str, gray) -> None:
    """``out_dir/<pair_key>.png`` from an 8-bit grey [H, W] array, written atomically: a killed run never leaves a
    truncated PNG behind for a resumed one to skip."""
    tmp = png_path(out_dir, pair_key).with_suffix(".tmp.png")
    Image.fromarray(gray, mode="L").save(tmp)
    tmp.replace(png_path(out_dir, pair_key))


class WithEvents(Dataset):
    """The items of a :class:`ehrxdiff.data.datasets.PairDataset` with another S_event: ``events_of[pair_key]``'s
    events (the shuffled-events control, ``study.shuffled_events``) or, with ``events_of=None``, the null event set
    (no events: the collate gives an all-False mask row, as the w_null null samples and the guidance's null branch see
    it). Everything else of the item - I_prev, I_trg, the pair key and so the sampling noise - stays the pair's own."""

    def __init__(self, dataset, events_of: dict[str, str] | None):
        self.dataset, self.events_of = dataset, events_of
        self.pairs = dataset.pairs
        if events_of is not None:
            missing = set(self.pairs["pair_key"].astype(str)) - set(events_of)
            if missing:
                raise KeyError(f"events_of has no source pair for {len(missing)} pair(s), e.g. {sorted(missing)[0]}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        if self.events_of is None:
            item["events"] = item["events"][:0]
        else:
            item["events"] = torch.from_numpy(self.dataset.events(self.events_of[str(item["pair_key"])]))
        return item


def generate_split(pipe, dataset, out_dir: str | Path, *, seed: int = 42, sampler: str = "ddim",
                   num_inference_steps: int = 100, eta: float = 1.0, batch_size: int = 8,
                   collate_fn=None, num_workers: int = 0, progress: bool = True,
                   clip_x0: float | None = None, event_guidance_scale: float = 1.0, findings=None) -> dict:
    """Write ``out_dir/<pair_key>.png`` (8-bit grey, image_size^2) for every item of ``dataset``.

    ``dataset`` yields items as :class:`ehrxdiff.data.datasets.PairDataset` (batched by ``collate_fn``, default
    ``data.collate_pairs``). Items whose PNG exists are skipped (resume). Returns a summary with the number of
    images written/skipped and seconds per generated image. ``event_guidance_scale``: see
    :class:`ehrxdiff.models.pipeline.EHRXDiffPipeline` (1 = the paper's sampler). ``findings``: a pair_key x finding
    frame of P(finding) given to the pipeline in place of its findings head's (NaN = the head's; a diagnostic).
    """
    sampler = SAMPLER_ALIASES.get(sampler, sampler)   # the summary names the pipeline's sampler ("dpm++")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.use_sampler(sampler, clip_x0=clip_x0)
    keys = _pair_keys(dataset)
    todo = [i for i, k in enumerate(keys) if not png_path(out, k).is_file()]
    subset = torch.utils.data.Subset(dataset, todo)
    collate = collate_fn or (lambda items: collate_pairs(items, max_events=pipe.config.max_events))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    device = pipe._execution_device
    written, t0 = 0, time.perf_counter()
    for batch in tqdm(loader, desc=f"sample {sampler}-{num_inference_steps}", disable=not progress):
        gens = [torch.Generator(device=device).manual_seed(pair_seed(seed, k)) for k in batch["pair_key"]]
        uses_table = pipe.adaptor.config.use_clip_table
        images = pipe.generate(batch["prev_image"], batch["events"] if uses_table else None,
                               batch["event_mask"] if uses_table else None,
                               num_inference_steps=num_inference_steps, eta=eta, generator=gens, progress=False,
                               event_guidance_scale=event_guidance_scale if uses_table else 1.0,
                               findings=None if findings is None else torch.tensor(
                                   findings.reindex(list(batch["pair_key"])).to_numpy(dtype="float32")))
        for key, gray in zip(batch["pair_key"], to_uint8(images)):
            save_png(out, key, gray)
            written += 1
    seconds = time.perf_counter() - t0
    return {"written": written, "skipped": len(keys) - len(todo), "seconds": seconds,
            "seconds_per_image": seconds / written if written else float("nan"),
            "sampler": sampler, "steps": num_inference_steps, "seed": seed}


def _pair_keys(dataset) -> list[str]:
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None and "pair_key" in pairs and len(pairs) == len(dataset):
        return pairs["pair_key"].astype(str).tolist()
    return [str(dataset[i]["pair_key"]) for i in range(len(dataset))]
