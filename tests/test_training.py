"""Generic accelerate checkpoint / resume / history / schedule utilities (ehrxdiff.training.loop)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from ehrxdiff.training.loop import (append_history, cosine_with_warmup, latest_checkpoint, load_checkpoint,
                                    save_checkpoint, trim_history)

torch.set_num_threads(1)


class Counter:
    """A custom stateful object (like an EMA) registered for checkpointing."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _setup(seed=0):
    torch.manual_seed(seed)
    accelerator = Accelerator()
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, opt, sched, counter


def _train(model, opt, sched, counter, steps):
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        counter.n += 1


def test_save_load_restores_model_optimizer_scheduler_and_registered_objects(tmp_path):
    acc, model, opt, sched, counter = _setup()
    _train(model, opt, sched, counter, 3)
    path = save_checkpoint(acc, tmp_path, step=3, limit=None, extra={"epoch": 1})
    assert path.name == "checkpoint-3" and (path / "model.safetensors").is_file()
    assert json.loads((path / "state.json").read_text()) == {"step": 3, "epoch": 1}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_m = opt.state_dict()["state"][0]["exp_avg"].clone()
    saved_lr = sched.get_last_lr()[0]

    _train(model, opt, sched, counter, 2)                       # move everything away from the checkpoint
    assert not torch.equal(model.weight, saved["weight"])
    state = load_checkpoint(acc, latest_checkpoint(tmp_path))
    assert state["step"] == 3 and counter.n == 3
    torch.testing.assert_close(model.state_dict(), saved)
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], saved_m)
    assert sched.get_last_lr()[0] == pytest.approx(saved_lr)


def test_checkpoint_limit_prunes_oldest_and_latest_ignores_incomplete(tmp_path):
    acc, model, opt, sched, counter = _setup()
    for step in (2, 4, 10, 12):                                  # 10 < 12 numerically, not as strings
        save_checkpoint(acc, tmp_path, step=step, limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-12"]
    (tmp_path / "checkpoint-99.tmp").mkdir()                    # killed while saving
    (tmp_path / "checkpoint-50").mkdir()                        # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "checkpoint-12"
    assert latest_checkpoint(tmp_path / "absent") is None
    with pytest.raises(FileNotFoundError, match="checkpoint-50"):
        load_checkpoint(acc, tmp_path / "checkpoint-50")


def test_append_history_and_trim(tmp_path):
    csv = tmp_path / "logs" / "history.csv"
    append_history(csv, {"step": 1, "split": "train", "loss": 2.0})
    append_history(csv, {"step": 2, "split": "train", "loss": 1.5})
    append_history(csv, {"step": 2, "split": "valid", "loss": 1.7, "recall5": 0.3})   # new column
    append_history(csv, {"step": 3, "split": "train", "loss": 1.2})
    frame = pd.read_csv(csv)
    assert frame["step"].tolist() == [1, 2, 2, 3]
    assert list(frame.columns) == ["step", "split", "loss", "recall5"]
    assert frame["recall5"].isna().tolist() == [True, True, False, True]
    trim_history(csv, max_step=2)
    assert pd.read_csv(csv)["step"].tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="no column 'epoch'"):
        trim_history(csv, 1, step_column="epoch")


def test_cosine_with_warmup_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])   # linear warm-up, per optimizer step
    assert lrs[8] == pytest.approx(0.5)                            # cosine midpoint
    assert sched.get_last_lr()[0] == pytest.approx(0.0)            # decays to 0 at the end (D5)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(opt, warmup_steps=13, total_steps=12)
