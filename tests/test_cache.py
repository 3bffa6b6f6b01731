"""The frozen encoders' caches (issue 13): the cached loss is the per-step loss, stale caches are never read,
w_null's null targets come from cached augmentations, and cached training resumes - on one process and on two.

Tiny random models (tests/test_ldm.py's sizes) over a tiny folder of real PNG files and a real event store.
"""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ehrxdiff.training.cache import CachedPairs, ConditionCache, FirstStageCache, collate_cached, module_fingerprint
from ehrxdiff.data.datasets import PairDataset, collate_pairs
from ehrxdiff.data.event_store import EventStore
from ehrxdiff.data.wnull import NULL_SUFFIX
from ehrxdiff.models.ldm import ClipConditioner, build_ehrxdiff
from test_ldm import EVENT_DIM, MAX_EVENTS, PX, TINY_CLIP, WIDTH, tiny_vae

torch.set_num_threads(1)
N_IMAGES = 8


def tiny_world(root: Path, *, n_pairs: int = 10, seed: int = 0, write: bool = True
               ) -> tuple[pd.DataFrame, Path, EventStore]:
    """N_IMAGES grey PNGs, ``n_pairs`` pairs among them (targets repeat, so w_null has fewer null samples than pairs),
    and an event store with 0-5 events per pair (pair 0 has none). ``write=False`` opens a world written before."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, (PX, PX), dtype=np.uint8)
        if write:
            Image.fromarray(pixels, mode="L").save(img_dir / f"d{i}.png")
    rows = []
    for k in range(n_pairs):
        p, t = k % N_IMAGES, (k * 3 + 1) % N_IMAGES
        rows.append({"pair_key": f"pair{k}", "prev_path": f"d{p}.png", "target_path": f"d{t}.png",
                     "prev_dicom_id": f"d{p}", "target_dicom_id": f"d{t}", "split": "train"})
    pairs = pd.DataFrame(rows)
    texts = [f"labevents value {i}" for i in range(12)]
    emb = rng.standard_normal((len(texts), EVENT_DIM)).astype(np.float32)
    ev = {r["pair_key"]: (rng.integers(0, len(texts), k % 6), np.sort(rng.random(k % 6))) for k, r in enumerate(rows)}
    store = EventStore.write(root / "store", texts, emb, ev) if write else EventStore.open(root / "store")
    return pairs, img_dir, store


def model(variant=("xattn", True, True), *, clip_trainable=True, snr_gamma=None, seed=0):
    torch.manual_seed(seed)
    vae_mode, use_img, use_tab = variant
    return build_ehrxdiff(vae=tiny_vae(), image_size=PX, clip=ClipConditioner(TINY_CLIP), vae_mode=vae_mode,
                          use_clip_image=use_img, use_clip_table=use_tab, max_events=MAX_EVENTS, c_fusion=5,
                          d_clip=WIDTH, unet_channels=(16, 32), num_heads=2, norm_num_groups=8, layers_per_block=1,
                          clip_trainable=clip_trainable, snr_gamma=snr_gamma)


def caches(m, pairs, img_dir, store, cache_root, *, frozen: bool, n_augment: int = 3):
    from ehrxdiff.data.wnull import NullTargetAugmentation
    ds = PairDataset(pairs, img_dir, store, image_size=PX, max_events=MAX_EVENTS)
    # a stronger jitter than the paper's: at 16 px a 10-degree nearest-neighbour affine can leave an image unchanged
    first = FirstStageCache.build(m.vae, image_root=img_dir, paths=set(pairs.prev_path) | set(pairs.target_path),
                                  image_size=PX, cache_root=cache_root, augment_paths=CachedPairs.null_augment_paths(pairs),
                                  n_augment=n_augment, augmentation=NullTargetAugmentation(degrees=40, scale=(0.6, 0.7)))
    cond = (ConditionCache.build(m.clip, pairs=pairs, image_root=img_dir, image_size=PX, event_store=store,
                                 max_events=MAX_EVENTS, cache_root=cache_root) if frozen else None)
    return ds, first, cond


@pytest.mark.parametrize("frozen", [True, False], ids=["clip-frozen-tokens-cached", "clip-fine-tuned"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_cached_loss_equals_per_step_encoding_loss(tmp_path, frozen, snr_gamma):
    """Same noise, timesteps and posterior draws: the loss from cached posteriors (and tokens) is the loss of
    encoding the images every step, to float precision - the cache changes the cost, not the objective."""
    pairs, img_dir, store = tiny_world(tmp_path)
    m = model(clip_trainable=not frozen, snr_gamma=snr_gamma).eval()
    ds, first, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=frozen)
    cached_ds = CachedPairs(ds, first, cond)
    idx = list(range(len(ds)))
    raw = collate_pairs([ds[i] for i in idx], max_events=MAX_EVENTS)
    cached = collate_cached([cached_ds[i] for i in idx], max_events=MAX_EVENTS)
    assert ("image_tokens" in cached) == frozen and ("prev_image" in cached) == (not frozen)
    g = torch.Generator().manual_seed(3)
    shape = (len(idx), 3, PX // 4, PX // 4)
    fixed = {"timesteps": torch.randint(0, 1000, (len(idx),), generator=g), "noise": torch.randn(shape, generator=g),
             "posterior_noise": torch.randn(shape, generator=g)}
    with torch.no_grad():
        for weighted in (False, True):
            a = m(raw, weighted=weighted, **fixed).item()
            b = m(cached, weighted=weighted, **fixed).item()
            assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
        other = m(cached, **{**fixed, "posterior_noise": torch.randn(shape, generator=g)}).item()
    assert other != pytest.approx(a, rel=1e-6)   # the posterior draw is part of what was fixed


def test_changed_vae_image_size_or_images_never_read_an_old_cache(tmp_path):
    pairs, img_dir, store = tiny_world(tmp_path)
    vae = tiny_vae()
    paths = sorted(set(pairs.prev_path))

    def build(v=vae, size=PX, root=tmp_path / "cache"):
        return FirstStageCache.build(v, image_root=img_dir, paths=paths, image_size=size, cache_root=root)

    first = build()
    again = build()
    assert again.folder == first.folder and torch.equal(again.mean, first.mean)   # reloaded, not recomputed
    changed = tiny_vae()
    with torch.no_grad():
        changed.encoder.conv_in.weight.add_(0.01)
    assert module_fingerprint(changed) != module_fingerprint(vae)
    other_vae = build(v=changed)
    assert other_vae.folder != first.folder and not torch.allclose(other_vae.mean, first.mean)
    bigger = build(size=2 * PX)
    assert bigger.folder != first.folder and bigger.mean.shape[-1] == 2 * first.mean.shape[-1]
    meta = first.folder / "meta.json"
    good = meta.read_text()
    meta.write_text(good.replace('"key": "', '"key": "x'))     # a folder whose stored fingerprint disagrees
    with pytest.raises(ValueError, match="fingerprint"):
        build()
    meta.write_text(good)
    Image.fromarray(np.zeros((PX, PX), np.uint8), mode="L").save(img_dir / paths[0])   # same name, new content
    assert build().folder != first.folder


def test_condition_cache_follows_the_clip_weights_and_the_events(tmp_path):
    pairs, img_dir, store = tiny_world(tmp_path)
    m = model(clip_trainable=False)
    kw = dict(pairs=pairs, image_root=img_dir, image_size=PX, event_store=store, max_events=MAX_EVENTS,
              cache_root=tmp_path / "cache")
    a = ConditionCache.build(m.clip, **kw)
    tok, mask = a.table("pair3")
    assert tok.shape == (MAX_EVENTS, WIDTH) and mask.sum() == 3 and not tok[~mask].any()
    null_tok, null_mask = a.null_table()
    assert null_mask.sum() == 1 and null_mask[0]                       # the learned null token (D3)
    assert ConditionCache.build(m.clip, **kw).folder == a.folder
    with torch.no_grad():
        m.clip.clip.table_tower.fc.weight.mul_(2)
    assert ConditionCache.build(m.clip, **kw).folder != a.folder
    # a changed event store (another embedder, say) is another cache too
    emb = np.load(store.root / "embeddings.npy").astype(np.float32) + 1
    pe = {k: (store.text_ids(k), store.times(k)) for k in store.pair_keys}
    store2 = EventStore.write(tmp_path / "store2", [f"t{i}" for i in range(len(emb))], emb, pe)
    assert ConditionCache.build(m.clip, **{**kw, "event_store": store2}).folder != a.folder


def test_findings_head_features_from_the_cache_are_the_towers_features(tmp_path):
    """``event_global: findings_prev``: the head fitted before the LDM trains reads the pooled tokens from the
    condition cache the LDM trains on; they equal running the frozen towers over the same pairs (pair 0 has no
    events: its table part is the pooled null token, D3), and a pair or film the cache does not hold is refused by
    name."""
    from ehrxdiff.training.findings import pooled_cached_tokens, pooled_image_tokens, pooled_table_tokens
    pairs, img_dir, store = tiny_world(tmp_path)
    m = model(clip_trainable=False).eval()
    _, _, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=True)
    keys, prev = list(pairs.pair_key[::-1]), list(pairs.prev_path[::-1])   # another order than the cache's
    table = pooled_table_tokens(m.clip, store, keys, max_events=MAX_EVENTS, batch_size=3)
    image = pooled_image_tokens(m.clip, img_dir, prev, image_size=PX, batch_size=3)
    got = pooled_cached_tokens(cond, keys, prev)
    assert got.shape == (len(keys), 4 * WIDTH)
    assert torch.allclose(got, torch.cat([table, image], -1), atol=1e-5)
    assert torch.equal(pooled_cached_tokens(cond, keys), got[:, :2 * WIDTH])
    from ehrxdiff.models.ldm import pool_events
    null = pool_events(cond.null_tokens, cond.null_mask)[0]
    assert torch.allclose(got[keys.index("pair0"), :2 * WIDTH], null) and null.any()
    with pytest.raises(KeyError, match="pair 'nope'"):
        pooled_cached_tokens(cond, keys + ["nope"])
    with pytest.raises(KeyError, match="I_prev 'gone.png'"):
        pooled_cached_tokens(cond, keys[:1], ["gone.png"])


def test_null_samples_draw_cached_augmentations_of_the_previous_image(tmp_path):
    """One null sample per unique target (§II-D), conditioned on I_prev with the null event set; its target is one
    of the K cached jittered copies of I_prev, never the unaugmented posterior and never I_trg."""
    pairs, img_dir, store = tiny_world(tmp_path)
    m = model(clip_trainable=False)
    ds, first, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=True, n_augment=3)
    data = CachedPairs(ds, first, cond, with_null=True)
    n_targets = pairs.target_dicom_id.nunique()
    assert len(data) == len(pairs) + n_targets and first.n_augment == 3
    seen = set()
    for epoch in range(20):
        data.set_epoch(epoch)
        item = data[len(pairs)]                       # the first null sample: source pair 0
        assert torch.equal(item["target_mean"], data[len(pairs)]["target_mean"])   # a function of (seed, epoch, i)
        src = pairs.iloc[0]
        assert item["is_null"] and item["pair_key"].startswith("pair0")
        copies = first.aug_mean[first.aug_row[src.prev_path]]
        k = [i for i in range(3) if torch.equal(item["target_mean"], copies[i])]
        assert len(k) == 1
        seen.add(k[0])
        assert not torch.equal(item["target_mean"], first.posterior(src.prev_path)[0])
        assert torch.equal(item["prev_mean"], first.posterior(src.prev_path)[0])
        assert torch.equal(item["table_mask"], cond.null_table()[1])
    assert len(seen) > 1                               # the copies are drawn, not fixed
    with pytest.raises(ValueError, match="n_augment"):
        CachedPairs(ds, FirstStageCache.build(m.vae, image_root=img_dir, paths=set(pairs.prev_path) |
                                              set(pairs.target_path), image_size=PX, cache_root=tmp_path / "c0"),
                    cond, with_null=True)


def _train_cached(tmp_path, out, max_steps):
    from ehrxdiff.training.train_ldm import train_ldm
    pairs, img_dir, store = tiny_world(tmp_path / "world")
    m = model(clip_trainable=False, snr_gamma=5.0)
    ds, first, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=True)
    torch.manual_seed(0)
    loader = DataLoader(CachedPairs(ds, first, cond, with_null=True), batch_size=2, shuffle=True,
                        collate_fn=lambda it: collate_cached(it, max_events=MAX_EVENTS),
                        generator=torch.Generator().manual_seed(0))
    valid = DataLoader(CachedPairs(ds, first, cond), batch_size=4, collate_fn=collate_cached)
    s = train_ldm(m, loader, output_dir=out, max_steps=max_steps, valid_loader=valid, learning_rate=1e-3,
                  effective_batch=2, validate_every=2, max_val_batches=1, checkpoint_every=2, mixed_precision="no",
                  image_size=PX, max_events=MAX_EVENTS, progress=False)
    return m, s


def test_cached_training_kill_and_resume_matches_uninterrupted_run(tmp_path):
    straight, s1 = _train_cached(tmp_path, tmp_path / "straight", 5)
    assert s1["steps"] == 5 and s1["samples_per_second"] > 0
    _train_cached(tmp_path, tmp_path / "resumed", 2)                 # "killed" after the checkpoint at step 2
    resumed, s2 = _train_cached(tmp_path, tmp_path / "resumed", 5)  # resumes mid-epoch from checkpoint-2
    assert s2["steps_this_run"] == 3
    for (name, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not any(p.requires_grad for p in resumed.clip.parameters())   # frozen towers stay frozen
    hist = pd.read_csv(tmp_path / "resumed" / "history.csv")
    assert hist[hist.split == "train"].step.tolist() == [1, 2, 3, 4, 5]


def test_two_fresh_runs_give_identical_weights(tmp_path):
    """Issue 15: the same seeds give the same model, bit for bit (a few LDM steps over the cached first stage,
    shuffled loader, null-branch draws, Min-SNR weights), two runs in fresh folders."""
    a, _ = _train_cached(tmp_path / "a", tmp_path / "a" / "run", 3)
    b, _ = _train_cached(tmp_path / "b", tmp_path / "b" / "run", 3)
    for (name, x), y in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(x, y), name
    for (name, x), y in zip(a.adaptor.state_dict().items(), b.adaptor.state_dict().values()):
        assert torch.equal(x, y), name


DISTRIBUTED = textwrap.dedent("""
    import json, os, sys, traceback
    from pathlib import Path
    tmp, steps = Path(sys.argv[2]), int(sys.argv[3])


    def main():
        import torch
        sys.path.insert(0, sys.argv[1])
        from accelerate import PartialState
        from torch.utils.data import DataLoader
        from ehrxdiff.training.cache import CachedPairs, collate_cached
        from ehrxdiff.training.train_ldm import train_ldm
        from test_cache import MAX_EVENTS, PX, caches, model, tiny_world
        torch.set_num_threads(1)
        state = PartialState(cpu=True)   # as train_ldm on a machine without CUDA
        pairs, img_dir, store = tiny_world(tmp / "world", write=False)   # written by the test before the launch
        m = model(clip_trainable=False, snr_gamma=5.0)
        ds, first, cond = caches(m, pairs, img_dir, store, tmp / f"cache{state.process_index}", frozen=True)
        data = CachedPairs(ds, first, cond, with_null=True)
        loader = DataLoader(data, batch_size=2, shuffle=True, collate_fn=lambda it: collate_cached(it, MAX_EVENTS))
        s = train_ldm(m, loader, output_dir=tmp / "run", max_steps=steps, learning_rate=1e-3, effective_batch=4,
                      checkpoint_every=2, mixed_precision="no", image_size=PX, max_events=MAX_EVENTS, progress=False)
        # what each process was served in one epoch of the same (prepared) loader: its own shard
        from accelerate import Accelerator
        acc = Accelerator(cpu=True)
        even = torch.utils.data.Subset(data, range(16))   # 16 = 4 batches x 2 per process x 2: no wrap-around padding
        keys = [k for b in acc.prepare(DataLoader(even, batch_size=2, collate_fn=lambda it: collate_cached(it, MAX_EVENTS)))
                for k in b["pair_key"]]
        (tmp / f"rank{state.process_index}.json").write_text(json.dumps(
            {"world": state.num_processes, "steps": s["steps"], "this_run": s["steps_this_run"], "keys": keys,
             "accum": s["gradient_accumulation"]}))


    try:
        main()
    except BaseException:   # each rank's own traceback, whole: the launcher interleaves and the test would cut them
        (tmp / f"rank{os.environ.get('RANK', 'unknown')}.err").write_text(traceback.format_exc())
        raise
""")


def test_cached_training_under_accelerate_launch_two_processes_checkpoints_and_resumes(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): each process reads its own shard of the cached pairs,
    the run checkpoints, and a second launch resumes from the checkpoint to the end."""
    script = tmp_path / "train2.py"
    script.write_text(DISTRIBUTED)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    import json
    tiny_world(tmp_path / "world")
    for steps, this_run in ((2, 2), (4, 2)):
        run = subprocess.run([*launch, str(script), str(tests), str(tmp_path), str(steps)], env=env,
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:   # a rank that fails leaves its whole traceback; the launcher's stderr only the end
            errs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("rank*.err")))
            pytest.fail(f"launch of {steps} steps exited {run.returncode}\n{errs}\n--- launcher stderr (end)\n"
                        f"{run.stderr[-3000:]}")
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world"] == 2 and r["steps"] == steps and r["this_run"] == this_run for r in ranks), ranks
    assert ranks[0]["accum"] == 1                                     # 2 per process x 2 processes = 4
    k0, k1 = set(ranks[0]["keys"]), set(ranks[1]["keys"])
    assert len(k0) == len(k1) == 8 and not k0 & k1                    # disjoint shards of the 16 items
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history.loc[history.split == "train", "step"].tolist() == [1, 2, 3, 4]   # one writer: each step once
    assert not math.isnan(float(history.loss.iloc[-1]))


def test_event_dropout_trains_a_share_of_real_pairs_with_the_null_event_set(tmp_path):
    """InstructPix2Pix's conditioning dropout on S_event: the target stays I_trg, the events become S_null, for about
    the asked share of visits, drawn reproducibly per (seed, epoch, index)."""
    pairs, img_dir, store = tiny_world(tmp_path, n_pairs=40)
    m = model(clip_trainable=False)
    ds, first, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=True)
    null_tokens = cond.null_table()[0]
    data = CachedPairs(ds, first, cond, event_dropout=0.3, seed=1)
    with_events = [i for i in range(len(pairs)) if i % 6]   # tiny_world gives pairs 0, 6, 12, ... no events at all
    dropped = []
    for epoch in range(10):
        data.set_epoch(epoch)
        for i in with_events:
            item = data[i]
            assert torch.equal(item["target_mean"], first.posterior(pairs.target_path[i])[0]) and not item["is_null"]
            dropped.append(torch.equal(item["table_tokens"], null_tokens))
            assert torch.equal(data[i]["table_tokens"], item["table_tokens"])   # reproducible
    assert 0.2 < np.mean(dropped) < 0.4
    plain = CachedPairs(ds, first, cond)
    assert not any(torch.equal(plain[i]["table_tokens"], null_tokens) for i in with_events)


def test_withheld_dropout_keeps_s_null_for_the_null_samples_and_null_share_sizes_them(tmp_path):
    """``dropped_events="withheld"``: a dropped real pair gets the withheld-events token (one zero token, valid),
    never S_null, which w_null's null samples keep ("nothing happened"); ``null_share`` makes the null samples that
    share of the set, each visit's source drawn reproducibly from the unique targets."""
    pairs, img_dir, store = tiny_world(tmp_path, n_pairs=40)
    m = model(clip_trainable=False)
    ds, first, cond = caches(m, pairs, img_dir, store, tmp_path / "cache", frozen=True)
    null_tokens, withheld = cond.null_table()[0], cond.withheld_table()
    assert withheld[1].tolist() == [True] + [False] * (len(withheld[1]) - 1) and not withheld[0].any()
    assert null_tokens[0].abs().sum() > 0                      # the tower's null token is not the withheld token
    data = CachedPairs(ds, first, cond, with_null=True, event_dropout=0.3, seed=1, dropped_events="withheld",
                       null_share=0.2)
    assert len(data) == len(pairs) + round(len(pairs) * 0.2 / 0.8)
    with_events = [i for i in range(len(pairs)) if i % 6]
    dropped, sources = [], set()
    for epoch in range(10):
        data.set_epoch(epoch)
        for i in with_events:
            item = data[i]
            assert not torch.equal(item["table_tokens"], null_tokens)
            dropped.append(torch.equal(item["table_tokens"], withheld[0]) and torch.equal(item["table_mask"], withheld[1]))
        for i in range(len(pairs), len(data)):
            item = data[i]
            assert item["is_null"] and torch.equal(item["table_tokens"], null_tokens)
            assert item["pair_key"] == data[i]["pair_key"]           # reproducible
            sources.add(item["pair_key"])
    assert 0.2 < np.mean(dropped) < 0.4
    every = {f"{pairs.pair_key[j]}{NULL_SUFFIX}" for j in data.null_sources}
    assert sources == every                                         # over the epochs every unique target serves
    with pytest.raises(ValueError, match="null_share"):
        CachedPairs(ds, first, cond, with_null=True, null_share=1.0)
    with pytest.raises(ValueError, match="ConditionCache"):
        CachedPairs(ds, first, None, event_dropout=0.3, dropped_events="withheld")
    image_only = ConditionCache(list(cond.image_row), cond.image_tokens, [], torch.zeros(0), torch.zeros(0, dtype=torch.bool),
                                torch.zeros(0), torch.zeros(0, dtype=torch.bool), cond.folder)
    blind = CachedPairs(ds, first, image_only, event_dropout=0.3, dropped_events="withheld")   # no table: nothing to drop
    assert "table_tokens" not in blind[1] and "image_tokens" in blind[1]
