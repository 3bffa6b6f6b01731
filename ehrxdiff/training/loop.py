"""Training utilities shared by every trainer (CLIP, VAE, LDM, evaluators): one checkpoint/resume path.

All state goes through ``accelerate`` (``Accelerator.save_state`` / ``load_state``), so a run started with
``accelerate launch`` on several GPUs, or with mixed precision, checkpoints and resumes with the same code
as a CPU run. Layout under a run's ``ckpt_root``::

    checkpoint-<step>/            model.safetensors, optimizer.bin, scheduler.bin, random_states_*.pkl,
                                  any object registered with accelerator.register_for_checkpointing (EMA),
                                  state.json  {"step": ..., **extra}

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed only when complete, so a run killed
while saving never leaves a half checkpoint that :func:`latest_checkpoint` would pick up (the habit of
diffusers' ``--checkpointing_steps`` / ``--checkpoints_total_limit`` / ``--resume_from_checkpoint latest``).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (folder name matches and state.json exists), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        match = _CKPT_RE.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder under ``ckpt_root``, or None."""
    found = _checkpoints(Path(ckpt_root))
    return found[-1][1] if found else None


def save_checkpoint(accelerator: Accelerator, ckpt_root: str | Path, step: int, limit: int | None,
                    extra: dict | None = None) -> Path:
    """Save the full training state at ``step`` and keep only the ``limit`` newest checkpoints.

    Must be called on every process (accelerate writes weights from the main process and one RNG file per
    process). ``extra`` (JSON-serialisable: epoch, best loss, ...) is stored in ``state.json`` next to the
    step. ``limit=None`` or 0 keeps everything.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"checkpoint-{step}"
    tmp = ckpt_root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a run killed while saving
        tmp.mkdir(parents=True)  # before any process writes into it (each writes its own RNG file)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": int(step), **(extra or {})}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit:
            for _, old in _checkpoints(ckpt_root)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict:
    """Restore everything :func:`save_checkpoint` saved (objects must be prepared/registered the same way)
    and return the contents of ``state.json``."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: {path} is not a complete checkpoint")
    accelerator.load_state(str(path))
    return json.loads(state_file.read_text())


def append_history(csv_path: str | Path, row: dict) -> None:
    """Append one tidy row (e.g. step, epoch, split, loss, lr) to a CSV that the notebooks plot.

    A row with new columns rewrites the file with the union of columns (missing values left empty).
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if csv_path.is_file() and csv_path.stat().st_size > 0:
        with csv_path.open(newline="") as fh:
            header = next(csv.reader(fh))
        if set(row) - set(header):
            frame = pd.concat([pd.read_csv(csv_path), pd.DataFrame([row])], ignore_index=True)
            frame.to_csv(csv_path, index=False)
            return
        with csv_path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=header).writerow(row)
        return
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)


def trim_history(csv_path: str | Path, max_step: int, step_column: str = "step") -> None:
    """Drop rows logged after ``max_step``: on resume, work done after the last checkpoint is redone,
    and its first log would otherwise appear twice in the curves."""
    csv_path = Path(csv_path)
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return
    frame = pd.read_csv(csv_path)
    if step_column not in frame.columns:
        raise ValueError(f"{csv_path}: no column {step_column!r} to trim the history by")
    frame[frame[step_column] <= max_step].to_csv(csv_path, index=False)


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up then cosine decay to 0, stepped once per optimizer step (decision D5).

    The reference steps its CLIP schedule per *epoch*, so the warm-up never ends (ref §5, §14 item 7).
    Note for multi-process runs: a scheduler passed through ``accelerator.prepare`` steps once per process
    per optimizer step, so pass step counts multiplied by ``accelerator.num_processes``.
    """
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps > 0, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                           num_training_steps=total_steps)
