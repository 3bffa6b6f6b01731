"""Baselines of Table II (paper §III-A; paper-reference §10.3-10.4).

* **GT** — the evaluator on the real target images ``I_trg`` (an upper reference for any generator).
* **Previous image** — the evaluator on ``I_prev``: "nothing changes" in image space.
* **Previous label** — the previous image's label used as the score (0 on *diff*, 1 on *same* by
  construction, §10.3).
* **Table classifier** — events only: the CLIP table tower (initialised from the pre-trained CLIP,
  §10.4), masked mean over tokens, Linear → 10 labels, BCE.
* **Table classifier w/ prev label** — as above plus one extra token: learnable label embeddings
  [10, event_dim] × the previous labels (0/1), averaged over the 10 labels and prepended to the events.

The two image baselines need no code beyond :func:`pair_image_table` + ``evaluators.score_images``;
the table classifiers are trained here with accelerate and the shared checkpoint utilities.
Deviation: our tower pools its *projected* tokens (``out_dim``) before the Linear, where the reference
pools the 1536-d transformer output; it is one more linear map inside the same function class.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.datasets import pad_events
from ehrxdiff.evaluation.metrics import macro_auroc
from ehrxdiff.training.loop import append_history, latest_checkpoint, load_checkpoint, save_checkpoint


def pair_image_table(pairs: pd.DataFrame, which: str) -> pd.DataFrame:
    """(pair_key, path) of each pair's previous or target image, for ``evaluators.EvaluatorImages``
    with ``key_col="pair_key"`` and the MIMIC-CXR root as image root (GT and previous-image rows)."""
    col = {"prev": "prev_path", "target": "target_path"}.get(which)
    if col is None:
        raise ValueError(f"which must be 'prev' or 'target', got {which!r}")
    if col not in pairs.columns:
        raise ValueError(f"pairs table: missing column {col!r}")
    return pairs[["pair_key", col]].rename(columns={col: "path"}).reset_index(drop=True)


def generated_image_table(pair_keys, sample_dir: str | Path, suffix: str = ".png") -> pd.DataFrame:
    """(pair_key, path) of generated images named ``<pair_key>.png`` (the reference's layout, §9);
    raises naming the first missing file rather than evaluating a partial sample set."""
    keys = list(pair_keys)
    missing = [k for k in keys if not (Path(sample_dir) / f"{k}{suffix}").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} generated image(s) missing in {sample_dir}, "
                                f"e.g. {missing[0]}{suffix}")
    return pd.DataFrame({"pair_key": keys, "path": [f"{k}{suffix}" for k in keys]})


def previous_label_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Evaluation rows scored by the previous label (§10.3)."""
    return rows.assign(score=rows["prev_relation"].astype(float))


class TableClassifier(nn.Module):
    """Events → 10 label logits, from a (pre-trained) CLIP ``TableTower`` (§10.4).

    ``table_tower`` is deep-copied, so fine-tuning never touches the CLIP model it came from.
    ``forward(events [B, N, D], mask [B, N], prev_labels [B, L] | None)`` → logits [B, L].
    """

    def __init__(self, table_tower: nn.Module, *, num_labels: int = len(IMAGENOME_LABELS),
                 use_prev_label: bool = False):
        super().__init__()
        self.tower = copy.deepcopy(table_tower)
        self.use_prev_label = use_prev_label
        self.fc = nn.Linear(self.tower.out_dim, num_labels)
        if use_prev_label:   # reference: nn.Parameter(torch.randn(10, 1536))
            self.label_embs = nn.Parameter(torch.randn(num_labels, self.tower.event_dim))

    def forward(self, events: torch.Tensor, mask: torch.Tensor,
                prev_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_prev_label:
            if prev_labels is None:
                raise ValueError("this table classifier was built with use_prev_label=True: pass prev_labels")
            token = (prev_labels.to(events.dtype)[..., None] * self.label_embs).mean(dim=1, keepdim=True)
            events = torch.cat([token, events], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask.bool()], dim=1)
        _, _, pooled = self.tower(events, mask)
        return self.fc(pooled)


class PairEvents(torch.utils.data.Dataset):
    """Per-pair events + label targets for the table classifiers (images are not needed).

    ``targets``/``prev_labels``: pair × label frames from ``labels.target_label_matrix`` /
    ``labels.prev_label_matrix``. Targets keep NaN (masked in the loss, or read as 0 in training when
    ``missing_as_negative`` — the reference fills train/valid with 0 and masks only at test time).
    """

    def __init__(self, event_store, targets: pd.DataFrame, prev_labels: pd.DataFrame, *,
                 max_events: int | None = None, missing_as_negative: bool = False):
        have = set(event_store.pair_keys)
        self.keys = [k for k in targets.index if k in have]
        self.n_without_events = len(targets) - len(self.keys)   # counted, reported by the caller
        self.store, self.max_events = event_store, max_events
        y = np.array(targets.loc[self.keys], dtype=np.float32)      # writable copy
        self.targets = np.nan_to_num(y, nan=0.0) if missing_as_negative else y
        self.prev = np.array(prev_labels.reindex(self.keys).fillna(0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        ev = np.asarray(self.store.embeddings(self.keys[i], max_events=self.max_events), np.float32)
        return {"pair_key": self.keys[i], "events": torch.from_numpy(ev),
                "labels": torch.from_numpy(self.targets[i]), "prev_labels": torch.from_numpy(self.prev[i])}


def collate_events(items: list[dict]) -> dict:
    """Zero-pad events to the longest row and build the mask (True = real event), as data.collate_pairs."""
    events, mask = pad_events([it["events"] for it in items])
    return {"pair_key": [it["pair_key"] for it in items], "events": events, "event_mask": mask,
            "labels": torch.stack([it["labels"] for it in items]),
            "prev_labels": torch.stack([it["prev_labels"] for it in items])}


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the non-NaN targets."""
    m = ~torch.isnan(targets)
    if not m.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[m], targets[m])


def _forward(model, batch: dict) -> torch.Tensor:
    prev = batch["prev_labels"] if getattr(model, "use_prev_label", False) else None
    return model(batch["events"], batch["event_mask"], prev)


@torch.no_grad()
def predict_table_classifier(model: TableClassifier, loader, labels=IMAGENOME_LABELS) -> pd.DataFrame:
    """P(label) per pair: index pair_key, one column per label (input of ``metrics.attach_scores``)."""
    model.eval()
    keys, probs = [], []
    for batch in loader:
        keys += batch["pair_key"]
        probs.append(torch.sigmoid(_forward(model, batch)))
    return pd.DataFrame(torch.cat(probs).numpy(), index=pd.Index(keys, name="pair_key"), columns=list(labels))


def train_table_classifier(model: TableClassifier, train_set: PairEvents, valid_set: PairEvents | None, *,
                           output_dir: str | Path, epochs: int, batch_size: int = 32, lr: float = 1e-4,
                           checkpoint_limit: int = 2, seed: int = 0, cpu: bool = True) -> TableClassifier:
    """Fine-tune with AdamW lr 1e-4 and BCE (§10.4); keep the epoch with the best validation macro AUROC
    (the reference's ``best_val_auc.pt``; the last epoch when there is no validation set).

    One checkpoint per epoch under ``output_dir/checkpoints`` (resumed automatically), history in
    ``output_dir/history.csv``; the best weights are returned (and saved as ``best.safetensors``).
    """
    out = Path(output_dir)
    set_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collate_events)
    vloader = (torch.utils.data.DataLoader(valid_set, batch_size=batch_size, collate_fn=collate_events)
               if valid_set is not None and len(valid_set) else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc = Accelerator(cpu=cpu)
    model, opt, loader = acc.prepare(model, opt, loader)
    state = {"epoch": 0, "best": -1.0}
    if (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        state.update({k: v for k, v in load_checkpoint(acc, ckpt).items() if k in state})
    raw = acc.unwrap_model(model)
    best_file = out / "best.safetensors"
    for epoch in range(state["epoch"], epochs):
        model.train()
        losses = []
        for batch in loader:
            loss = masked_bce(_forward(model, batch), batch["labels"])
            acc.backward(loss)
            opt.step(); opt.zero_grad()
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if vloader is not None:
            row["val_macro_auroc"] = macro_auroc(predict_table_classifier(raw, vloader).to_numpy(),
                                                  valid_set.targets)
        if acc.is_main_process:   # one writer: under `accelerate launch` every process runs this loop
            append_history(out / "history.csv", row)
        score = row.get("val_macro_auroc", float(epoch))
        if not best_file.exists() or (np.isfinite(score) and score > state["best"]):
            state["best"] = float(score)
            if acc.is_main_process:
                out.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(best_file))
        acc.wait_for_everyone()
        state["epoch"] = epoch + 1
        save_checkpoint(acc, out / "checkpoints", epoch + 1, checkpoint_limit, dict(state))
    raw.load_state_dict(load_file(str(best_file)))
    return raw.eval()
