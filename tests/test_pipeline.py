"""EHRXDiffPipeline and split sampling (issue 5 items 6-7): offline save/load, seeds, samplers, resumable PNGs."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ehrxdiff.models.adaptor import TABLE_IV_VARIANTS
from ehrxdiff.models.ldm import (ClipConditioner, build_ehrxdiff, encode_condition, pool_events, pool_image,
                                 unet_conditioning, unet_input, withheld_table)
from ehrxdiff.models.pipeline import EHRXDiffPipeline
from ehrxdiff.models.sampling import generate_split
from ehrxdiff.models.vae import build_vae

torch.set_num_threads(1)
PX, EVENT_DIM, WIDTH, MAX_EVENTS = 16, 8, 16, 6
TINY_CLIP = {"image": dict(image_size=PX, patch_size=8, width=WIDTH, layers=1, heads=2),
             "table": dict(event_dim=EVENT_DIM, width=WIDTH, layers=1, heads=2, out_dim=WIDTH)}


def tiny_pipe(variant="xattn-VAE+CLIPimg+CLIPtab", sampler="ddim", event_global=None, n_findings=4):
    torch.manual_seed(0)
    vae_mode, use_img, use_tab = TABLE_IV_VARIANTS[variant]
    vae = build_vae(block_out_channels=(8, 16, 32), norm_num_groups=8, image_size=PX, layers_per_block=1)
    clip = ClipConditioner(TINY_CLIP) if (use_img or use_tab) else None
    model = build_ehrxdiff(vae=vae, image_size=PX, clip=clip, vae_mode=vae_mode, use_clip_image=use_img,
                           use_clip_table=use_tab, max_events=MAX_EVENTS, c_fusion=5, d_clip=WIDTH,
                           unet_channels=(16, 32), num_heads=2, norm_num_groups=8, layers_per_block=1,
                           event_global=event_global, n_findings=n_findings)
    pipe = EHRXDiffPipeline.from_model(model, sampler=sampler, image_size=PX, max_events=MAX_EVENTS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(b=2):
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, True, False], [False, False, False]])[:b]
    return torch.rand(b, 3, PX, PX, generator=g) * 2 - 1, torch.randn(b, 3, EVENT_DIM, generator=g), mask


@pytest.mark.parametrize("variant", ["xattn-VAE+CLIPimg+CLIPtab", "concat-VAE", "xattn-CLIPtab"])  # last: no adaptor weights
def test_pipeline_round_trips_save_from_pretrained_with_identical_images(tmp_path, variant):
    pipe = tiny_pipe(variant)
    prev, events, mask = inputs()
    a = pipe.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                      progress=False)
    pipe.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.image_size == PX and loaded.config.max_events == MAX_EVENTS
    assert (loaded.clip is None) == (variant == "concat-VAE")
    b = loaded.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                        progress=False)
    c = loaded.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(8),
                        progress=False)
    assert a.shape == (2, 3, PX, PX) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_call_with_pil_image_and_event_strings():
    pipe = tiny_pipe()
    calls = []

    def embedder(texts):
        calls.append(list(texts))
        return np.stack([np.full(EVENT_DIM, len(t), np.float32) for t in texts])

    prev = Image.fromarray((np.arange(32 * 24) % 255).reshape(24, 32).astype(np.uint8))  # any size, grey
    events = [f"labevents itemid pO2 value {i}" for i in range(MAX_EVENTS + 2)]
    out = pipe(prev, events, embedder=embedder, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1 and out.images[0].size == (PX, PX) and out.images[0].mode == "L"
    assert calls == [events]  # embedded once, the most recent max_events kept afterwards
    batch = pipe([prev, prev], [events, []], embedder=embedder, num_inference_steps=2, output_type="np")
    assert batch.images.shape == (2, PX, PX) and batch.images.dtype == np.uint8
    with pytest.raises(ValueError, match="embedder"):
        pipe(prev, events, num_inference_steps=2)


def test_saved_pipeline_carries_its_event_guidance_scale_and_call_uses_it(tmp_path):
    """The study's s travels with the weights: pipe(...) of a reloaded pipeline samples as the study did, unless
    told otherwise (s = 1: the paper's sampler)."""
    pipe = tiny_pipe()
    guided = EHRXDiffPipeline.from_model(pipe.to_model(), image_size=PX, max_events=MAX_EVENTS,
                                         event_guidance_scale=2.5)
    guided.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.event_guidance_scale == 2.5
    prev = torch.rand(3, PX, PX, generator=torch.Generator().manual_seed(2)) * 2 - 1
    events = np.random.default_rng(0).normal(size=(2, EVENT_DIM)).astype(np.float32)

    def call(**kw):
        return loaded(prev, events, num_inference_steps=3, generator=torch.Generator().manual_seed(4),
                      output_type="pt", **kw).images

    def gen(s):
        return loaded.generate(prev[None], torch.from_numpy(events)[None], torch.ones(1, 2, dtype=torch.bool),
                               num_inference_steps=3, generator=torch.Generator().manual_seed(4), progress=False,
                               event_guidance_scale=s)

    assert torch.equal(call(), gen(2.5))
    assert torch.equal(call(event_guidance_scale=1.0), gen(1.0))
    assert not torch.equal(gen(2.5), gen(1.0))
    with pytest.raises(ValueError, match="CLIP table"):
        EHRXDiffPipeline.from_model(tiny_pipe("concat-VAE").to_model(), image_size=PX, max_events=MAX_EVENTS,
                                    event_guidance_scale=2.0)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_samplers_are_deterministic_per_generator(sampler):
    pipe = tiny_pipe(sampler=sampler)
    pipe.use_sampler(sampler)
    prev, events, mask = inputs()
    x1 = pipe.generate(prev, events, mask, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                       progress=False)
    x2 = pipe.generate(prev, events, mask, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                       progress=False)
    assert torch.equal(x1, x2) and torch.isfinite(x1).all()
    assert type(pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}[sampler]


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"prev_image": torch.rand(3, PX, PX, generator=g) * 2 - 1,
                "target_image": torch.zeros(3, PX, PX), "events": torch.randn(i % 3, EVENT_DIM, generator=g),
                "pair_key": f"t{i}_p{i}", "is_null": False}


def test_generate_split_is_resumable_and_batch_independent(tmp_path):
    pipe = tiny_pipe()
    data = Pairs(3)
    s1 = generate_split(pipe, data, tmp_path / "a", seed=5, num_inference_steps=2, batch_size=3, progress=False)
    assert s1["written"] == 3 and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "t0_p0.png", "t1_p1.png", "t2_p2.png"]
    (tmp_path / "a" / "t1_p1.png").unlink()  # as if killed before this image
    s2 = generate_split(pipe, data, tmp_path / "a", seed=5, num_inference_steps=2, batch_size=3, progress=False)
    assert (s2["written"], s2["skipped"]) == (1, 2)
    generate_split(pipe, data, tmp_path / "b", seed=5, num_inference_steps=2, batch_size=1, progress=False)
    for k in ("t0_p0", "t1_p1", "t2_p2"):
        a = np.asarray(Image.open(tmp_path / "a" / f"{k}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{k}.png"))
        assert a.shape == (PX, PX) and np.array_equal(a, b), k


def test_event_guidance_at_one_is_the_plain_sampler_and_at_zero_the_null_event_prediction():
    """eps = eps(I_prev, null) + s (eps(I_prev, S_event) - eps(I_prev, null)) (InstructPix2Pix's text guidance on the
    events; not in the paper): s = 1 must be the paper's sampler bit for bit, s = 0 the prediction without events,
    and any other s something else."""
    pipe = tiny_pipe()
    with torch.no_grad():   # a random UNet ignores its context too little to matter; make the events count
        pipe.adaptor.token_mixer.weight.mul_(20)
    prev, events, mask = inputs()

    def run(ev, m, **kw):
        return pipe.generate(prev, ev, m, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(5),
                             progress=False, **kw)

    plain = run(events, mask)
    assert torch.equal(run(events, mask, event_guidance_scale=1.0), plain)
    no_events = run(torch.zeros(2, 1, EVENT_DIM), torch.zeros(2, 1, dtype=torch.bool))
    assert torch.equal(run(events, mask, event_guidance_scale=0.0), no_events)
    assert not torch.allclose(no_events[0], plain[0], atol=1e-4)      # row 0 has events: they change the prediction
    assert not torch.allclose(run(events, mask, event_guidance_scale=3.0)[0], plain[0], atol=1e-4)
    with pytest.raises(ValueError, match="event_guidance_scale"):
        tiny_pipe("concat-VAE").generate(prev, None, None, num_inference_steps=2, event_guidance_scale=2.0,
                                         progress=False)


def test_guidance_against_withheld_events_at_zero_is_the_withheld_prediction_and_round_trips(tmp_path):
    """``guidance_reference="withheld"`` (a model trained with ``dropped_events: withheld``): the no-event branch is
    the withheld-events token, not S_null - s = 0 samples exactly what the model draws with the table tower's tokens
    replaced by that token, unlike the S_null reference's s = 0; s = 1 is the plain sampler under either reference;
    the reference travels with a saved pipeline and an unknown one is refused."""
    pipe = tiny_pipe()
    with torch.no_grad():
        pipe.adaptor.token_mixer.weight.mul_(20)
    withheld = EHRXDiffPipeline.from_model(pipe.to_model(), image_size=PX, max_events=MAX_EVENTS,
                                           guidance_reference="withheld")
    withheld.set_progress_bar_config(disable=True)
    prev, events, mask = inputs()

    def run(p, **kw):
        return p.generate(prev, events, mask, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(5),
                          progress=False, **kw)

    assert torch.equal(run(withheld, event_guidance_scale=1.0), run(pipe))
    tower = withheld.clip.table_tokens
    withheld.clip.table_tokens = lambda ev, m: withheld_table(ev.shape[0], WIDTH)
    drawn_withheld = run(withheld)
    withheld.clip.table_tokens = tower
    assert torch.equal(run(withheld, event_guidance_scale=0.0), drawn_withheld)
    assert not torch.allclose(drawn_withheld, run(pipe, event_guidance_scale=0.0), atol=1e-4)
    withheld.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.guidance_reference == "withheld"
    assert torch.equal(run(loaded, event_guidance_scale=2.0), run(withheld, event_guidance_scale=2.0))
    with pytest.raises(ValueError, match="guidance_reference"):
        EHRXDiffPipeline.from_model(pipe.to_model(), image_size=PX, max_events=MAX_EVENTS, guidance_reference="none")


def test_pooled_events_are_mean_and_max_of_the_real_events_and_zero_for_none():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]], [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    pooled = pool_events(tokens, mask)
    assert torch.equal(pooled[0], torch.tensor([2.0, -1.0, 3.0, 0.0]))     # padding (100) is neither mean nor max
    assert torch.equal(pooled[1], torch.zeros(4))                            # the null event set


def test_event_global_feeds_the_pooled_events_to_the_time_embedding_and_round_trips(tmp_path):
    """``event_global`` (issue 14, not in the paper): the UNet gets diffusers' projection class embedding of width
    2 D, the pooled S_event changes the prediction through it alone, and the saved pipeline reloads it."""
    pipe = tiny_pipe(event_global="pooled")
    assert pipe.adaptor.findings_head is None
    assert pipe.unet.config.class_embed_type == "projection"
    assert pipe.unet.config.projection_class_embeddings_input_dim == 2 * WIDTH
    prev, events, mask = inputs()
    cond = encode_condition(adaptor=pipe.adaptor, vae=pipe.vae, clip=pipe.clip, prev_image=prev, events=events,
                            event_mask=mask)
    z, t = torch.randn(2, 3, PX // 4, PX // 4), torch.tensor([500, 500])
    with torch.no_grad():
        for p in pipe.unet.class_embedding.parameters():   # a fresh MLP is too small to move the output measurably
            p.mul_(30)
        base = pipe.unet(unet_input(z, cond), t, **unet_conditioning(pipe.unet, cond)).sample
        other = dataclasses.replace(cond, pooled_events=torch.randn_like(cond.pooled_events))
        moved = pipe.unet(unet_input(z, other), t, **unet_conditioning(pipe.unet, other)).sample
    assert not torch.allclose(base, moved, atol=1e-4)         # same context, other pooled events: another eps
    a = pipe.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                      progress=False, event_guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    b = loaded.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                        progress=False, event_guidance_scale=2.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs use_clip_table"):
        tiny_pipe("concat-VAE", event_global="pooled")
    with pytest.raises(ValueError, match="event_global must be one of"):
        tiny_pipe(event_global=True)


def test_event_global_findings_feeds_the_heads_probabilities_frozen_and_round_trips(tmp_path):
    """``event_global: findings`` (issue 14, not in the paper): the adaptor's findings head maps the pooled table
    tokens to n_findings probabilities, which are what the UNet's class embedding gets; the head is not trained by
    the LDM (no gradient, not in the EMA) and is saved and reloaded with the pipeline."""
    pipe = tiny_pipe(event_global="findings", n_findings=4)
    head = pipe.adaptor.findings_head
    assert (head.in_features, head.out_features) == (2 * WIDTH, 4)
    assert pipe.unet.config.projection_class_embeddings_input_dim == 4
    prev, events, mask = inputs()
    cond = encode_condition(adaptor=pipe.adaptor, vae=pipe.vae, clip=pipe.clip, prev_image=prev, events=events,
                            event_mask=mask)
    tokens, tmask = pipe.clip.table_tokens(events, mask)
    assert torch.allclose(cond.pooled_events, torch.sigmoid(head(pool_events(tokens, tmask))))
    model = pipe.to_model()
    trainable = {id(p) for m in model.trainable_modules().values() for p in m.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in model.adaptor.findings_head.parameters())
    assert not any(p is q for p in model.ema_parameters() for q in model.adaptor.findings_head.parameters())
    with torch.no_grad():
        head.weight.normal_()
    pipe.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    assert torch.equal(loaded.adaptor.findings_head.weight, head.weight)
    with pytest.raises(ValueError, match="no findings head"):
        tiny_pipe(event_global="pooled").adaptor.findings(torch.zeros(1, 2 * WIDTH))


def test_event_global_findings_prev_head_reads_the_events_and_i_prev(tmp_path):
    """``event_global: findings_prev`` (issue 14, not in the paper): the findings head reads the pooled table tokens
    beside the pooled CLIP image tokens of I_prev, so another I_prev with the same events gives other probabilities;
    the head is frozen, round-trips, and a variant without CLIP image tokens cannot have it."""
    pipe = tiny_pipe(event_global="findings_prev", n_findings=4)
    head = pipe.adaptor.findings_head
    assert (head.in_features, head.out_features) == (4 * WIDTH, 4)
    assert pipe.adaptor.config.findings_reads_image
    with torch.no_grad():
        head.weight.normal_()
    prev, events, mask = inputs()

    def pooled(image):
        return encode_condition(adaptor=pipe.adaptor, vae=pipe.vae, clip=pipe.clip, prev_image=image, events=events,
                                event_mask=mask).pooled_events
    tokens, tmask = pipe.clip.table_tokens(events, mask)
    with torch.no_grad():
        want = torch.sigmoid(head(torch.cat([pool_events(tokens, tmask), pool_image(pipe.clip.image_tokens(prev))],
                                            dim=-1)))
        got, other = pooled(prev), pooled(prev.flip(-1))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, other, atol=1e-4)          # same events, another I_prev: other P(finding)
    model = pipe.to_model()
    trainable = {id(p) for m in model.trainable_modules().values() for p in m.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in head.parameters())
    pipe.save_pretrained(tmp_path)
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path)
    assert loaded.adaptor.config.findings_reads_image and torch.equal(loaded.adaptor.findings_head.weight, head.weight)
    with pytest.raises(ValueError, match="needs use_clip_image"):
        tiny_pipe("xattn-CLIPtab", event_global="findings_prev")
    with pytest.raises(ValueError, match="reads the events and I_prev"):
        pipe.adaptor.findings(torch.zeros(1, 2 * WIDTH))


def test_findings_override_replaces_the_heads_signal_and_nan_keeps_it():
    """``generate(findings=...)`` (issue 14's ``bench render`` diagnostic, not in the paper): the head's own P(finding)
    given back, or all NaN, is the plain sampler bit for bit; other probabilities change the prediction through the
    time embedding only, also under event guidance; a model without a head refuses, naming what it needs."""
    pipe = tiny_pipe(event_global="findings_prev", n_findings=4)
    with torch.no_grad():
        pipe.adaptor.findings_head.weight.normal_()
        pipe.unet.class_embedding.linear_1.weight.mul_(50)   # a random UNet hardly reads its class embedding
    prev, events, mask = inputs()
    with torch.no_grad():   # as generate computes it (with autograd on, attention takes a kernel that rounds otherwise)
        head = encode_condition(adaptor=pipe.adaptor, vae=pipe.vae, clip=pipe.clip, prev_image=prev, events=events,
                                event_mask=mask).pooled_events

    def run(**kw):
        return pipe.generate(prev, events, mask, num_inference_steps=3, generator=torch.Generator().manual_seed(2),
                             progress=False, **kw)

    plain = run()
    assert torch.equal(run(findings=head), plain)
    assert torch.equal(run(findings=torch.full_like(head, float("nan"))), plain)
    flipped = head.clone()
    flipped[0] = 1 - flipped[0]                       # row 0 told the opposite, row 1 given NaN: keeps its head
    flipped[1] = float("nan")
    got = run(findings=flipped)
    assert not torch.allclose(got[0], plain[0], atol=1e-4) and torch.equal(got[1], plain[1])
    guided = run(event_guidance_scale=2.0)
    assert torch.equal(run(event_guidance_scale=2.0, findings=head), guided)
    with pytest.raises(ValueError, match="findings head"):
        tiny_pipe().generate(prev, events, mask, num_inference_steps=2, findings=head, progress=False)
    with pytest.raises(ValueError, match=r"findings is \(2, 3\)"):
        run(findings=head[:, :3])


def test_unet_time_scale_shift_builds_film_resnets_from_the_config():
    """``unet_time_scale_shift: scale_shift`` (not in the paper): the time + event_global embedding becomes a FiLM scale
    and shift in every ResNet block (twice the projection width), and the default stays the reference's addition."""
    from ehrxdiff.config import ConfigError, load_config
    from ehrxdiff.models.ldm import build_unet
    film = build_unet(latent_channels=3, sample_size=8, block_out_channels=(16, 32), layers_per_block=1, num_heads=2,
                      cross_attention_dim=WIDTH, norm_num_groups=8, event_global_dim=4, time_scale_shift="scale_shift")
    plain = build_unet(latent_channels=3, sample_size=8, block_out_channels=(16, 32), layers_per_block=1, num_heads=2,
                       cross_attention_dim=WIDTH, norm_num_groups=8, event_global_dim=4)
    r_film, r_plain = film.down_blocks[0].resnets[0], plain.down_blocks[0].resnets[0]
    assert r_film.time_emb_proj.out_features == 2 * r_plain.time_emb_proj.out_features == 2 * 16
    out = film(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 5, WIDTH),
               class_labels=torch.rand(2, 4)).sample
    assert out.shape == (2, 3, 8, 8)
    assert load_config("smoke", {"unet_time_scale_shift": "scale_shift"}).unet_time_scale_shift == "scale_shift"
    with pytest.raises(ConfigError, match="unet_time_scale_shift"):
        load_config("smoke", {"unet_time_scale_shift": "film"})
