"""The conditional LDM (issue 5): VAE, adaptor (Table IV), UNet, Eq. 2 training, w_null, checkpoint/resume.

Tiny random models built from config (no downloads): 16 px images -> f=4 latent 3x4x4, 16-wide tokens.
"""
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ehrxdiff.models.adaptor import TABLE_IV_VARIANTS, FusionAdaptor
from ehrxdiff.data.datasets import collate_pairs
from ehrxdiff.models.ldm import (PAPER_UNET_CHANNELS, ClipConditioner, build_ehrxdiff, build_noise_scheduler,
                                 build_unet, widen_conv_in)
from ehrxdiff.models.vae import build_vae, load_cheff_checkpoint, measure_latent_scale, psnr
from ehrxdiff.training.train_vae import train_vae
from ehrxdiff.data.wnull import NULL_SUFFIX, NullTargetAugmentation, WithNullSamples
from weight_files import to_ldm_layout

torch.set_num_threads(1)
PX, EVENT_DIM, WIDTH, MAX_EVENTS = 16, 8, 16, 6
TINY_CLIP = {"image": dict(image_size=PX, patch_size=8, width=WIDTH, layers=1, heads=2),
             "table": dict(event_dim=EVENT_DIM, width=WIDTH, layers=1, heads=2, out_dim=WIDTH)}


def tiny_vae():
    return build_vae(block_out_channels=(8, 16, 32), norm_num_groups=8, image_size=PX, layers_per_block=1)


def tiny_model(variant="xattn-VAE+CLIPimg+CLIPtab", seed=0):
    torch.manual_seed(seed)
    vae_mode, use_img, use_tab = TABLE_IV_VARIANTS[variant]
    return build_ehrxdiff(vae=tiny_vae(), image_size=PX, clip=ClipConditioner(TINY_CLIP), vae_mode=vae_mode,
                          use_clip_image=use_img, use_clip_table=use_tab, max_events=MAX_EVENTS, c_fusion=5,
                          d_clip=WIDTH, unet_channels=(16, 32), num_heads=2, norm_num_groups=8, layers_per_block=1)


def fixed_batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 4, dtype=torch.bool)
    for i in range(b):
        mask[i, : i % 5] = True  # row 0 has no events at all (S_null)
    return {"prev_image": torch.rand(b, 3, PX, PX, generator=g) * 2 - 1,
            "target_image": torch.rand(b, 3, PX, PX, generator=g) * 2 - 1,
            "events": torch.randn(b, 4, EVENT_DIM, generator=g) * mask[..., None],
            "event_mask": mask, "pair_key": [f"t{i}_p{i}" for i in range(b)], "is_null": torch.zeros(b, dtype=bool)}


# ---------------------------------------------------------------------------------------------- VAE
def test_vae_has_cheff_shape_f4_three_latent_channels():
    vae = tiny_vae()
    z = vae.encode(torch.zeros(2, 3, PX, PX)).latent_dist.mean
    assert z.shape == (2, 3, PX // 4, PX // 4)
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_load_cheff_checkpoint_converts_ldm_layout_and_rejects_mismatch(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    ldm = to_ldm_layout(vae.state_dict(), 3)
    ldm = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(1)  # training-loss keys are ignored
    path = tmp_path / "cheff_autoencoder.pt"
    torch.save({"state_dict": ldm}, path)
    loaded = load_cheff_checkpoint(path, block_out_channels=(8, 16, 32), layers_per_block=1, image_size=PX,
                                   norm_num_groups=8).eval()
    x = torch.rand(1, 3, PX, PX) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean, atol=1e-6)
        assert torch.allclose(loaded.decode(torch.ones(1, 3, 4, 4)).sample, vae.decode(torch.ones(1, 3, 4, 4)).sample,
                              atol=1e-6)
    with pytest.raises(ValueError, match="cheff_autoencoder.pt.*does not match"):
        load_cheff_checkpoint(path, block_out_channels=(8, 16, 64), layers_per_block=1, image_size=PX,
                              norm_num_groups=8)


def test_psnr_known_value():
    x = torch.zeros(2, 3, 4, 4)
    y = x + 0.2  # mse 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2,), 20.0), atol=1e-4)


def test_train_vae_runs_and_saves(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(8, 3, PX, PX) * 2 - 1
    vae = train_vae(tiny_vae(), DataLoader(images, batch_size=4), output_dir=tmp_path, max_steps=2,
                    checkpoint_every=2, progress=False)
    assert (tmp_path / "vae" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "state.json").is_file()
    assert vae.encode(images[:1]).latent_dist.mean.shape == (1, 3, 4, 4)


# ---------------------------------------------------------------------------------------------- adaptor
@pytest.mark.parametrize("variant", list(TABLE_IV_VARIANTS))
def test_adaptor_output_shape_for_every_table_iv_variant(variant):
    vae_mode, use_img, use_tab = TABLE_IV_VARIANTS[variant]
    a = FusionAdaptor(latent_channels=3, latent_size=4, d_clip=WIDTH, n_image_tokens=5, max_events=MAX_EVENTS,
                      c_fusion=7, vae_mode=vae_mode, use_clip_image=use_img, use_clip_table=use_tab)
    ctx, mask = a(vae_latent=torch.randn(2, 3, 4, 4), image_tokens=torch.randn(2, 5, WIDTH),
                  table_tokens=torch.randn(2, 3, WIDTH), table_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
                  batch_size=2)
    expected = {"concat-VAE": 1, "xattn-VAE": 3, "xattn-CLIPimg": 5, "xattn-CLIPtab": MAX_EVENTS,
                "concat-VAE+CLIPtab": MAX_EVENTS}.get(variant, 7)
    assert ctx.shape == (2, expected, WIDTH) and a.n_context_tokens == expected
    assert a.needs_vae_latent == (vae_mode is not None)
    if use_tab and expected == MAX_EVENTS:  # a lone table keeps its (padded) mask for cross-attention
        assert mask.tolist() == [[True, True] + [False] * 4, [True] + [False] * 5]
    else:
        assert mask is None


def test_adaptor_ignores_padded_tokens_and_rejects_too_many():
    a = FusionAdaptor(latent_size=4, d_clip=WIDTH, n_image_tokens=5, max_events=MAX_EVENTS, c_fusion=7)
    lat, img = torch.randn(1, 3, 4, 4), torch.randn(1, 5, WIDTH)
    tab, mask = torch.randn(1, 4, WIDTH), torch.tensor([[True, True, False, False]])
    garbage = tab.clone()
    garbage[:, 2:] = 100.0
    ctx1, _ = a(vae_latent=lat, image_tokens=img, table_tokens=tab, table_mask=mask)
    ctx2, _ = a(vae_latent=lat, image_tokens=img, table_tokens=garbage, table_mask=mask)
    ctx3, _ = a(vae_latent=lat, image_tokens=img, table_tokens=tab[:, :2], table_mask=mask[:, :2])
    assert torch.allclose(ctx1, ctx2) and torch.allclose(ctx1, ctx3)
    with pytest.raises(ValueError, match="exceed max_events"):
        a(vae_latent=lat, image_tokens=img, table_tokens=torch.randn(1, MAX_EVENTS + 1, WIDTH))


# ---------------------------------------------------------------------------------------------- UNet / schedule
def test_concat_variant_zero_init_channels_leave_output_unchanged():
    torch.manual_seed(0)
    unet = build_unet(latent_channels=3, sample_size=4, block_out_channels=(16, 32), num_heads=2,
                      cross_attention_dim=WIDTH, norm_num_groups=8, layers_per_block=1).eval()
    z, ctx, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, WIDTH), torch.tensor([10, 500])
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=ctx).sample
        widen_conv_in(unet, extra_channels=3)
        after = unet(torch.cat([z, torch.randn(2, 3, 4, 4) * 5], 1), t, encoder_hidden_states=ctx).sample
    assert unet.config.in_channels == 6
    assert torch.allclose(before, after, atol=1e-6)


def test_noise_schedule_is_ldm_sqrt_linear():
    s = build_noise_scheduler()
    assert s.config.num_train_timesteps == 1000 and s.config.prediction_type == "epsilon"
    assert s.betas[0].item() == pytest.approx(0.0015, rel=1e-4) and s.betas[-1].item() == pytest.approx(0.0295, rel=1e-4)
    root = s.betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), atol=1e-6)


def test_unet_attention_at_all_but_the_highest_resolution_by_default():
    """Paper: attention_resolutions [8, 4, 2] of 4 levels = every level but the first (built small here)."""
    assert PAPER_UNET_CHANNELS == (224, 448, 896, 896)
    small = build_unet(sample_size=8, block_out_channels=(8, 8, 16, 16), num_heads=2, cross_attention_dim=WIDTH,
                       norm_num_groups=8, layers_per_block=1)
    assert small.config.down_block_types == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert small.config.up_block_types == ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
    assert small.config.attention_head_dim == 2 and small.config.cross_attention_dim == WIDTH


# ---------------------------------------------------------------------------------------------- Eq. 2 training
@pytest.mark.parametrize("variant", ["xattn-VAE+CLIPimg+CLIPtab", "concat-VAE", "xattn-CLIPtab"])
def test_one_training_step_lowers_loss_on_fixed_batch(variant):
    model = tiny_model(variant)
    batch = fixed_batch()
    t, noise = torch.tensor([50, 300, 600, 900]), torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    params = [p for m in model.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.vae.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.eval()  # no dropout: the two losses differ only by the update
    loss0 = model(batch, timesteps=t, noise=noise)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(batch, timesteps=t, noise=noise)
    assert loss1.item() < loss0.item()


# ---------------------------------------------------------------------------------------------- w_null
class ToyPairs(Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"prev_image": torch.rand(3, PX, PX, generator=g) * 2 - 1,
                "target_image": torch.rand(3, PX, PX, generator=g) * 2 - 1,
                "events": torch.randn(2 + i, EVENT_DIM, generator=g), "pair_key": f"{self.targets[i]}_p{i}",
                "prev_dicom_id": f"p{i}", "target_dicom_id": self.targets[i], "is_null": False}


def test_wnull_adds_exactly_one_null_sample_per_unique_target():
    base = ToyPairs(["a", "b", "a", "c", "b", "a"])
    ds = WithNullSamples(base, target_ids=base.targets)
    assert len(ds) == 6 + 3 and ds.n_null == 3
    nulls = [ds[i] for i in range(6, 9)]
    assert [n["pair_key"] for n in nulls] == [f"a_p0{NULL_SUFFIX}", f"b_p1{NULL_SUFFIX}", f"c_p3{NULL_SUFFIX}"]
    for n, src in zip(nulls, (0, 1, 3)):
        assert n["is_null"] and n["events"].shape == (0, EVENT_DIM)
        assert torch.equal(n["prev_image"], base[src]["prev_image"])       # condition image never augmented
        assert n["target_image"].shape == n["prev_image"].shape and type(n["target_image"]) is torch.Tensor
        assert not torch.equal(n["target_image"], n["prev_image"])          # target = augmented I_prev
    assert torch.equal(ds[2]["target_image"], base[2]["target_image"])     # D4 default: real targets untouched
    batch = collate_pairs([ds[0], ds[6]])
    assert batch["event_mask"][1].sum() == 0 and batch["is_null"].tolist() == [False, True]
    assert len(WithNullSamples(base, target_ids=base.targets, enabled=False)) == 6


def test_null_target_augmentation_is_an_affine_jitter_filled_with_black():
    torch.manual_seed(0)
    x = torch.ones(3, 32, 32)
    y = NullTargetAugmentation(degrees=10, scale=(0.9, 0.9))(x)           # shrink: the border becomes fill
    assert y.shape == x.shape and y.min().item() == -1.0 and y[:, 16, 16].tolist() == [1.0, 1.0, 1.0]


def test_wnull_augment_all_changes_real_targets():
    base = ToyPairs(["a", "b"])
    torch.manual_seed(0)
    ds = WithNullSamples(base, target_ids=base.targets, augment_targets="all", scale=(0.9, 0.9))
    assert not torch.equal(ds[0]["target_image"], base[0]["target_image"])
    with pytest.raises(ValueError, match="augment_targets"):
        WithNullSamples(base, target_ids=base.targets, augment_targets="some")


# ---------------------------------------------------------------------------------------------- kill and resume
def _train(tmp_path, max_steps, resume=True):
    from ehrxdiff.training.train_ldm import train_ldm

    model = tiny_model()
    data = ToyPairs([f"t{i}" for i in range(6)])
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=lambda it: collate_pairs(it, max_events=MAX_EVENTS))
    summary = train_ldm(model, loader, output_dir=tmp_path, max_steps=max_steps, valid_loader=loader,
                        learning_rate=1e-3, effective_batch=4, validate_every=2, max_val_batches=1,
                        checkpoint_every=2, checkpoint_limit=2, mixed_precision="no", resume=resume,
                        image_size=PX, max_events=MAX_EVENTS, progress=False)
    return model, summary


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    straight, s1 = _train(tmp_path / "straight", 4)
    assert s1["steps"] == 4 and s1["gradient_accumulation"] == 2
    _train(tmp_path / "resumed", 2)                     # "killed" after the checkpoint at step 2
    resumed, s2 = _train(tmp_path / "resumed", 4)       # a new process picks up checkpoint-2
    assert s2["steps"] == 4 and s2["steps_this_run"] == 2 and s2["seconds"] > 0
    _, s3 = _train(tmp_path / "resumed", 4)             # a finished run reloaded: nothing trained, nothing timed
    assert s3["steps_this_run"] == 0 and math.isnan(s3["seconds"]) and math.isnan(s3["samples_per_second"])
    for (name, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "resumed" / "pipeline" / "model_index.json").is_file()
    import pandas as pd
    hist = pd.read_csv(tmp_path / "resumed" / "history.csv")
    assert hist[hist.split == "train"].step.tolist() == [1, 2, 3, 4]
    assert {"loss", "loss_ema"} <= set(hist[hist.split == "valid"].dropna(axis=1).columns)


def test_clip_x0_switch_is_off_by_default_and_clips_when_set():
    """Decision D6 keeps the paper's unclipped DDIM; the CPU-demo switch clips predicted x0 (ldm docstring)."""
    from ehrxdiff.models.ldm import build_noise_scheduler, make_inference_scheduler
    cfg = build_noise_scheduler().config
    assert make_inference_scheduler("ddim", cfg).config.clip_sample is False
    clipped = make_inference_scheduler("ddim", cfg, clip_x0=2.0)
    assert clipped.config.clip_sample is True and clipped.config.clip_sample_range == 2.0
    assert make_inference_scheduler("dpm++", cfg, clip_x0=2.0).config.thresholding is True


def test_measured_latent_scale_gives_unit_variance_targets():
    """LDM's scale_by_std: 1/std of posterior samples, so scale * z has std 1 on the measured batches."""
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(8, 16), latent_channels=3, layers_per_block=1, image_size=16,
                    norm_num_groups=8)
    batches = [{"target_image": torch.rand(4, 3, 16, 16) * 2 - 1} for _ in range(3)]
    scale = measure_latent_scale(vae, batches, max_batches=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([vae.encode(b["target_image"]).latent_dist.sample(generator=gen).flatten() for b in batches[:2]])
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert (scale * z).std().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        measure_latent_scale(vae, [])


def test_conditioning_sensitivity_sees_only_the_conditions_a_model_uses():
    """concat-VAE starts with zero weights on the I_prev channels: swapping I_prev changes nothing until they are
    non-zero; it has no table tower, so swapping S_event never changes its loss; repeated calls agree exactly."""
    from ehrxdiff.training.train_ldm import conditioning_sensitivity, validation_loss
    model = tiny_model("concat-VAE").eval()
    loader = [fixed_batch(), fixed_batch(seed=2)]
    before = conditioning_sensitivity(model, loader)
    assert before["I_prev swapped"] == pytest.approx(before["own condition"], abs=1e-7)
    assert before["S_event swapped"] == pytest.approx(before["own condition"], abs=1e-7)
    with torch.no_grad():
        model.unet.conv_in.weight[:, model.vae.config.latent_channels:] = 0.5
    after = conditioning_sensitivity(model, loader)
    assert abs(after["I_prev swapped"] - after["own condition"]) > 1e-4
    assert after["S_event swapped"] == pytest.approx(after["own condition"], abs=1e-7)
    state = torch.get_rng_state()
    assert validation_loss(model, loader) == validation_loss(model, loader)
    assert torch.equal(torch.get_rng_state(), state)          # validation leaves training's RNG untouched


def test_token_fusion_keeps_every_source_token_and_the_table_mask():
    """adaptor fusion "tokens" (issue 14): no token-axis Linear; an event's token reaches the context unchanged
    wherever it sits, padded events are masked out, and the context does not depend on the padding."""
    a = FusionAdaptor(latent_channels=3, latent_size=4, d_clip=WIDTH, n_image_tokens=5, max_events=MAX_EVENTS,
                      c_fusion=7, vae_mode="xattn", use_clip_image=True, use_clip_table=True, fusion="tokens")
    assert a.token_mixer is None and a.n_context_tokens == 3 + 5 + MAX_EVENTS
    table = torch.randn(2, 3, WIDTH)
    ctx, mask = a(vae_latent=torch.randn(2, 3, 4, 4), image_tokens=torch.randn(2, 5, WIDTH), table_tokens=table,
                  table_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    assert ctx.shape == (2, 3 + 5 + MAX_EVENTS, WIDTH)
    assert torch.equal(ctx[0, 8:10], table[0, :2]) and not ctx[0, 10:].any()
    assert mask[:, :8].all() and mask[0, 8:].tolist() == [True, True] + [False] * 4
    with pytest.raises(ValueError, match="fusion"):
        FusionAdaptor(latent_channels=3, latent_size=4, d_clip=WIDTH, n_image_tokens=5, max_events=MAX_EVENTS,
                      fusion="mean")
