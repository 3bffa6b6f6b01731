"""CXR–EHR CLIP towers, loss, local weight loading, training/resume and retrieval (issue 4).

Tiny random towers built from config; every test runs in well under a second or two on one CPU thread.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from ehrxdiff.models.clip import EHRCLIP, ImageTower, TableTower, clip_loss, load_visual_weights
from ehrxdiff.constants import N_IMAGE_TOKENS
from ehrxdiff.data.datasets import collate_pairs
from ehrxdiff.training.train_clip import embed_images, retrieval_from_similarity, retrieval_metrics, train_clip

torch.set_num_threads(1)

EVENT_DIM = 16
IMAGE = dict(image_size=64, patch_size=8, width=32, layers=2, heads=2)          # 8x8 grid + CLS = 65 tokens
TABLE = dict(event_dim=EVENT_DIM, width=32, layers=2, heads=2, out_dim=32)


def tiny_clip(**table) -> EHRCLIP:
    torch.manual_seed(0)
    return EHRCLIP.from_config({"image": dict(IMAGE), "table": {**TABLE, **table}})


class ToyPairs(Dataset):
    """In-memory (I_prev, S_event) pairs; event counts vary so batches need padding."""

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.items = [dict(prev_image=torch.rand(3, size, size, generator=g) * 2 - 1,
                           target_image=torch.rand(3, size, size, generator=g) * 2 - 1,
                           events=torch.randn(1 + i % 5, EVENT_DIM, generator=g),
                           pair_key=f"t{i}_p{i}", is_null=False) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


collate = functools.partial(collate_pairs, max_events=None)


# ---------------------------------------------------------------------------------------------- towers
def test_image_tower_returns_65_tokens_and_ln_post_cls():
    tower = ImageTower(**IMAGE).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens, pooled = tower(images)
    assert tokens.shape == (2, 65, 32) and tower.num_tokens == 65
    assert pooled.shape == (2, 32)
    # pooled = ln_post(CLS) with no projection; tokens are the raw last-block output (CLS first)
    torch.testing.assert_close(pooled, tower.vit.ln_post(tokens[:, 0]))
    # the paper's layout (256 px, patch 32) gives the same 65 tokens; width kept tiny for speed
    paper_grid = ImageTower(image_size=256, patch_size=32, width=16, layers=1, heads=1)
    assert paper_grid(torch.zeros(1, 3, 256, 256))[0].shape == (1, N_IMAGE_TOKENS, 16)


def test_table_tower_1024_events_padded_and_masked():
    tower = TableTower(**TABLE).eval()
    events = torch.zeros(2, 1024, EVENT_DIM)
    mask = torch.zeros(2, 1024, dtype=torch.bool)
    events[0, :3], mask[0, :3] = torch.randn(3, EVENT_DIM), True
    events[1, :10], mask[1, :10] = torch.randn(10, EVENT_DIM), True
    tokens, token_mask, pooled = tower(events, mask)
    assert tokens.shape == (2, 1024, 32) and pooled.shape == (2, 32)
    assert torch.equal(token_mask, mask)
    assert tokens[~mask].abs().max() == 0  # padded tokens are exactly zero
    torch.testing.assert_close(pooled[1], tokens[1, :10].mean(0))


@pytest.mark.parametrize("grad", [True, False])  # torch's fast (nested-tensor) path runs only without grad
def test_padding_never_changes_real_tokens_or_pooled(grad):
    tower = TableTower(**TABLE).eval()
    real = torch.randn(1, 5, EVENT_DIM)
    with torch.set_grad_enabled(grad):
        tok_alone, _, pooled_alone = tower(real, torch.ones(1, 5, dtype=torch.bool))
        padded = torch.cat([real, torch.randn(1, 59, EVENT_DIM) * 100], dim=1)  # garbage in the padding
        batch = torch.cat([padded, torch.randn(1, 64, EVENT_DIM)])
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[0, :5], mask[1] = True, True
        tok_pad, _, pooled_pad = tower(batch, mask)
    torch.testing.assert_close(pooled_pad[0], pooled_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok_pad[0, :5], tok_alone[0], atol=1e-5, rtol=1e-5)


def test_empty_event_set_is_one_learned_token():
    tower = TableTower(**TABLE).eval()
    events = torch.randn(2, 7, EVENT_DIM)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, :4] = True                                           # row 0 is S_null
    tokens, token_mask, pooled = tower(events, mask)
    assert token_mask[0].tolist() == [True] + [False] * 6
    assert torch.isfinite(pooled).all()
    # the null row depends on nothing but the learned token: not on N, not on what sits in the padding
    _, m0, pooled_n0 = tower(torch.zeros(1, 0, EVENT_DIM), torch.zeros(1, 0, dtype=torch.bool))
    assert m0.shape == (1, 1) and bool(m0[0, 0])
    torch.testing.assert_close(pooled[0], pooled_n0[0], atol=1e-5, rtol=1e-5)
    pooled[0].sum().backward()
    assert tower.null_token.grad is not None and tower.null_token.grad.abs().sum() > 0


def test_empty_event_set_zeros_switch_reproduces_reference():
    tower = TableTower(**TABLE, null_events="zeros").eval()
    assert not hasattr(tower, "null_token")
    outs = []
    for n in (1, 9):  # N zero events, none masked: the pooled output must not depend on N
        events = torch.randn(1, n, EVENT_DIM)                 # content is ignored for an empty row
        _, token_mask, pooled = tower(events, torch.zeros(1, n, dtype=torch.bool))
        assert token_mask.all()
        outs.append(pooled)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    _, _, ref = tower(torch.zeros(1, 3, EVENT_DIM), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise():
    tower = TableTower(**TABLE)
    with pytest.raises(ValueError, match="events must be"):
        tower(torch.zeros(2, 3, EVENT_DIM + 1), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="event mask"):
        tower(torch.zeros(2, 3, EVENT_DIM), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="null_events"):
        TableTower(**TABLE, null_events="empty")


# ---------------------------------------------------------------------------------------------- loss
def test_clip_loss_symmetric_finite_and_correct():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    loss = clip_loss(a, b, scale)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, clip_loss(b, a, scale))
    logits = scale * a @ b.T
    manual = -(torch.log_softmax(logits, 1).diag().mean() + torch.log_softmax(logits, 0).diag().mean()) / 2
    torch.testing.assert_close(loss, manual)
    assert clip_loss(a, a, torch.tensor(100.0)) < 0.01 < loss      # perfect alignment -> ~0


def test_model_logit_scale_init_and_clamp():
    model = tiny_clip()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    _, _, scale = model(torch.zeros(2, 3, 64, 64), torch.randn(2, 3, EVENT_DIM), torch.ones(2, 3, dtype=bool))
    assert math.isclose(scale.item(), 100.0, rel_tol=1e-5)


def test_image_projection_when_widths_differ():
    model = EHRCLIP.from_config({"image": dict(IMAGE), "table": {**TABLE, "out_dim": 24}})
    assert isinstance(model.image_proj, nn.Linear)
    img, evt, _ = model(torch.zeros(2, 3, 64, 64), torch.randn(2, 3, EVENT_DIM), torch.ones(2, 3, dtype=bool))
    assert img.shape == evt.shape == (2, 24)
    assert isinstance(tiny_clip().image_proj, nn.Identity)


def test_one_optimisation_step_lowers_the_loss():
    model = tiny_clip(dropout=0.0).train()
    batch = collate([ToyPairs(8)[i] for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        return clip_loss(*model(batch["prev_image"], batch["events"], batch["event_mask"]))

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before.detach()


def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = tiny_clip().eval()
    model.save_pretrained(tmp_path / "m")
    again = EHRCLIP.from_pretrained(tmp_path / "m").eval()
    assert again.config == model.config
    x, e, m = torch.rand(2, 3, 64, 64), torch.randn(2, 4, EVENT_DIM), torch.ones(2, 4, dtype=torch.bool)
    for got, want in zip(again(x, e, m), model(x, e, m)):
        torch.testing.assert_close(got, want)
    with pytest.raises(FileNotFoundError, match="config.json"):
        EHRCLIP.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- local weights
def _visual_file(tmp_path, tower: ImageTower, prefix="visual.") -> str:
    sd = {prefix + k: v.clone() for k, v in tower.vit.state_dict().items()}
    sd[prefix + "proj"] = torch.randn(tower.width, 16)        # CLIP files carry an output projection
    sd["logit_scale"] = torch.tensor(4.6)                      # ... and the text tower, ignored
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": sd}, path)
    return str(path)


def test_local_weights_load_and_reinit_positional_embedding_when_grid_changes(tmp_path):
    source = ImageTower(**{**IMAGE, "image_size": 32})          # 4x4 grid, like ViT-B/32 at 224 vs 256
    path = _visual_file(tmp_path, source)
    torch.manual_seed(1)
    tower = ImageTower(**IMAGE, weights_path=path)
    torch.manual_seed(1)
    fresh = ImageTower(**IMAGE)
    torch.testing.assert_close(tower.vit.conv1.weight, source.vit.conv1.weight)
    torch.testing.assert_close(tower.vit.transformer.resblocks[1].mlp.c_fc.weight,
                               source.vit.transformer.resblocks[1].mlp.c_fc.weight)
    torch.testing.assert_close(tower.vit.positional_embedding, fresh.vit.positional_embedding)
    assert tower.vit.positional_embedding.shape == (65, 32)


def test_local_weights_from_torchscript_archive(tmp_path):
    """OpenAI's ViT-B-32.pt is a TorchScript archive whose keys start with ``visual.``."""
    source = ImageTower(**IMAGE)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = source.vit

        def forward(self, x):
            return x * self.visual.class_embedding.sum()

    path = tmp_path / "ViT-tiny.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, but that is the format OpenAI released
        torch.jit.save(torch.jit.trace(Wrapper(), torch.zeros(1)), str(path))
    tower = ImageTower(**IMAGE)
    load_visual_weights(tower, path)
    torch.testing.assert_close(tower.vit.positional_embedding, source.vit.positional_embedding)
    torch.testing.assert_close(tower.vit.ln_post.weight, source.vit.ln_post.weight)


def test_wrong_weight_files_give_one_clear_error(tmp_path):
    wrong_width = _visual_file(tmp_path, ImageTower(**{**IMAGE, "width": 64, "heads": 2}))
    with pytest.raises(ValueError, match=r"clip\.pt does not match the image tower.*'visual\.class_embedding'"):
        ImageTower(**IMAGE, weights_path=wrong_width)

    more_layers = _visual_file(tmp_path, ImageTower(**{**IMAGE, "layers": 3}))
    with pytest.raises(ValueError, match=r"first mismatching key 'visual\.transformer\.resblocks\.2\."):
        ImageTower(**IMAGE, weights_path=more_layers)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pt is not a readable"):
        ImageTower(**IMAGE, weights_path=text)

    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match=r"other\.pt: no vision-transformer weights"):
        ImageTower(**IMAGE, weights_path=other)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ImageTower(**IMAGE, weights_path=tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------- training
TRAIN = dict(epochs=2, batch_size=4, collate_fn=collate, warmup_steps=2, checkpoint_every=3,
             checkpoint_limit=2, seed=7, progress=False)


def _opt_state(out_dir):
    return torch.load(sorted((out_dir / "checkpoints").glob("checkpoint-*"))[-1] / "optimizer.bin",
                      weights_only=True)["state"]


def test_train_clip_kill_and_resume_matches_uninterrupted_run(tmp_path):
    train, valid = ToyPairs(20, seed=1), ToyPairs(8, seed=2)   # 5 steps per epoch, 10 in all
    full = train_clip(tiny_clip(), train, valid, out_dir=tmp_path / "full", **TRAIN)
    assert full["finished"] and full["step"] == 10

    part = train_clip(tiny_clip(), train, valid, out_dir=tmp_path / "cut", max_steps=7, **TRAIN)
    assert not part["finished"] and part["final_dir"] is None
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-6", "checkpoint-7"]            # limit 2 pruned checkpoint-3
    # a kill between step 7 and its checkpoint: step 7 (mid-epoch 2) must be redone on resume
    import shutil
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-7")
    resumed = train_clip(tiny_clip(), train, valid, out_dir=tmp_path / "cut", **TRAIN)
    assert resumed["finished"] and resumed["step"] == 10

    for (name, p_full), p_res in zip(full["model"].named_parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(p_res, p_full, rtol=1e-5, atol=1e-6, msg=name)
    s_full, s_res = _opt_state(tmp_path / "full"), _opt_state(tmp_path / "cut")
    for i in (0, len(s_full) - 1):
        torch.testing.assert_close(s_res[i]["exp_avg"], s_full[i]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s_res[i]["exp_avg_sq"], s_full[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    h_full, h_res = full["history"], resumed["history"]
    assert h_res["step"].tolist() == h_full["step"].tolist()    # no duplicated rows after the resume
    np.testing.assert_allclose(h_res["loss"], h_full["loss"], rtol=1e-5)
    assert set(h_full["split"]) == {"train", "valid"}


def test_train_clip_loads_a_finished_run(tmp_path):
    train = ToyPairs(8, seed=1)
    first = train_clip(tiny_clip(), train, None, out_dir=tmp_path, **{**TRAIN, "epochs": 1})
    again = train_clip(tiny_clip(), train, None, out_dir=tmp_path, **{**TRAIN, "epochs": 1})
    assert again["finished"] and again["step"] == first["step"] == 2
    for a, b in zip(first["model"].parameters(), again["model"].parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="different model config"):
        train_clip(tiny_clip(out_dim=24), train, None, out_dir=tmp_path, **{**TRAIN, "epochs": 1})
    # resume=False starts afresh: the finished weights and old checkpoints are gone
    again = train_clip(tiny_clip(), train, None, out_dir=tmp_path, resume=False, max_steps=1, **{**TRAIN, "epochs": 1})
    assert not again["finished"] and not (tmp_path / "final").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert again["history"]["step"].tolist() == [1]


# ---------------------------------------------------------------------------------------------- retrieval
def test_retrieval_from_similarity_recall_and_chance():
    table = retrieval_from_similarity(np.eye(10), ks=(1, 5))
    assert (table["recall"] == 1.0).all()
    # z: 10 hits against 10 x 0.5 expected at k=5, sd sqrt(10 x 0.25)
    np.testing.assert_allclose(table.set_index(["direction", "k"])["z"].xs(5, level="k"), 5 / np.sqrt(2.5))
    np.testing.assert_allclose(table.set_index(["direction", "k"])["chance"].xs(5, level="k"), 0.5)
    # reversed ranking: the partner is always last
    worst = retrieval_from_similarity(-np.eye(10), ks=(1, 9, 10)).set_index(["direction", "k"])["recall"]
    assert worst.xs(9, level="k").eq(0).all() and worst.xs(10, level="k").eq(1).all()
    # images 0 and 1 identical (rows tie): both directions see 2 tied-correct candidates for those queries
    sim = np.eye(4)
    sim[:, 1] = sim[:, 0] = np.array([1, 1, 0, 0])
    tied = retrieval_from_similarity(sim, ks=(1,)).set_index("direction")
    assert tied.loc["events→image", "recall"] == 1.0
    np.testing.assert_allclose(tied.loc["events→image", "chance"], (0.5 + 0.5 + 0.25 + 0.25) / 4)


def test_retrieval_metrics_and_embed_images_run_on_a_model():
    data = ToyPairs(6)
    null = dict(data[0], events=torch.zeros(0, EVENT_DIM), pair_key="null", is_null=True)
    data.items.insert(3, null)                                   # w_null samples are skipped
    model = tiny_clip()
    table = retrieval_metrics(model, data, batch_size=4, collate_fn=collate, ks=(1, 5))
    assert list(table.columns) == ["direction", "k", "recall", "chance", "n", "z"] and (table["n"] == 6).all()
    keys, emb = embed_images(model, data, batch_size=4, collate_fn=collate)
    assert keys == [f"t{i}_p{i}" for i in range(6)] and emb.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
