"""EHRXDiff_w_null: null-condition training samples (§II-D; paper-reference §8; decisions D3, D4).

The paper's w_null variant adds, for every unique target image of the split, one extra triple

    (I_prev, S_null, augmented I_prev)

so the model also learns that *without* events the image should stay the same, up to the small geometric jitter
of a repeat radiograph. The reference takes the first pair of each unique target, uses its previous image both as
condition and (augmented) as target, and a null table. Here:

* the null table is an **empty event set** (``events`` with 0 rows): the collate gives it an all-False mask row
  and the table tower turns it into one learned null token (D3, ``TableTower(null_events="learned_token")``),
  or into the reference's zero events with ``null_events="zeros"``;
* the augmentation, ``RandomAffine(10 deg, scale 0.9-1.1)`` on the target only (never the condition), is applied
  to the null samples only, as the paper says (D4 default ``augment_targets="null_only"``); ``"all"`` augments
  every target as the released code does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

AUGMENT_MODES = ("null_only", "all")
NULL_SUFFIX = "__null"  # pair_key of a null sample = <pair_key of its source pair> + NULL_SUFFIX


class NullTargetAugmentation:
    """The reference's target jitter: RandomAffine(degrees=10, scale=(0.9, 1.1)) [R custom_dataset.py].

    Applied to [3, H, W] tensors in [-1, 1]; the area uncovered by rotation/shrinking is filled with -1, the black
    the reference's PIL transform fills with. (The tensor is wrapped as a ``tv_tensors.Image``: torchvision's v2
    transforms pass plain tensors through unchanged.)
    """

    def __init__(self, *, degrees: float = 10.0, scale: tuple[float, float] = (0.9, 1.1)):
        self.affine = v2.RandomAffine(degrees=degrees, scale=scale, fill=-1.0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.affine(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def null_source_indices(target_ids: Sequence[str]) -> list[int]:
    """Index of the first pair of every unique target (in first-seen order), as the reference de-duplicates."""
    seen: dict[str, int] = {}
    for i, t in enumerate(target_ids):
        seen.setdefault(str(t), i)
    return list(seen.values())


class WithNullSamples(Dataset):
    """Wrap a pair dataset (items as :class:`ehrxdiff.data.datasets.PairDataset`) with one null sample per unique
    target.

    Indices ``[0, len(base))`` are the base pairs; the following ``n_null`` are null samples. ``target_ids`` gives
    each base item's target dicom (``base.pairs["target_dicom_id"]`` for a PairDataset, the default).
    ``enabled=False`` passes the base dataset through unchanged (EHRXDiff without w_null).
    """

    def __init__(self, base: Dataset, *, target_ids: Sequence[str] | None = None, enabled: bool = True,
                 augment_targets: str = "null_only", degrees: float = 10.0,
                 scale: tuple[float, float] = (0.9, 1.1)):
        if augment_targets not in AUGMENT_MODES:
            raise ValueError(f"augment_targets must be one of {AUGMENT_MODES}, got {augment_targets!r}")
        if target_ids is None:
            pairs = getattr(base, "pairs", None)
            if pairs is None or "target_dicom_id" not in pairs:
                raise ValueError("pass target_ids: the base dataset has no pairs['target_dicom_id'] column")
            target_ids = pairs["target_dicom_id"].tolist()
        if len(target_ids) != len(base):
            raise ValueError(f"{len(target_ids)} target_ids for a dataset of {len(base)} pairs")
        self.base, self.enabled, self.augment_targets = base, enabled, augment_targets
        self.null_sources = null_source_indices(target_ids) if enabled else []
        self.augment = NullTargetAugmentation(degrees=degrees, scale=scale)

    @property
    def n_null(self) -> int:
        return len(self.null_sources)

    def __len__(self) -> int:
        return len(self.base) + self.n_null

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < len(self.base):
            item = dict(self.base[i])
            if self.enabled and self.augment_targets == "all":
                item["target_image"] = self.augment(item["target_image"])
            return item
        src = dict(self.base[self.null_sources[i - len(self.base)]])
        events = src["events"]
        return {
            **src,
            "target_image": self.augment(src["prev_image"]),   # (I_prev, S_null, augmented I_prev)
            "events": events[:0],                              # the empty event set S_null (D3)
            "pair_key": f"{src['pair_key']}{NULL_SUFFIX}",
            "target_dicom_id": src.get("prev_dicom_id", src.get("target_dicom_id")),
            "is_null": True,
        }
