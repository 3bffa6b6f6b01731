"""Golden-slice regression tests (issue 17 item 5), as diffusers' pipeline tests do: a tiny EHRXDiff built from a
fixed seed, a fixed batch, and a few output values compared with values recorded once. A refactor that changes how
the model is built (module order, initialisation), conditioned (adaptor, CLIP tokens, null events), trained (Eq. 2,
Min-SNR weights) or sampled (DDIM, event guidance, per-row generators) changes these numbers and fails here, where
the end-to-end tests would only see "still runs".

The tolerance (1e-4) is far above float32 noise between CPU kernels for a model this small (a single forward pass),
and far below what a changed computation moves. To re-record after a deliberate change: run this file with
``EHRXDIFF_PRINT_GOLDEN=1 pytest -s tests/test_golden.py`` and paste the printed values, saying why in the commit.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ehrxdiff.models.adaptor import TABLE_IV_VARIANTS
from ehrxdiff.models.ldm import ClipConditioner, build_ehrxdiff
from ehrxdiff.models.pipeline import EHRXDiffPipeline
from ehrxdiff.models.vae import build_vae

PX, EVENT_DIM, WIDTH, MAX_EVENTS = 16, 8, 16, 6
TINY_CLIP = {"image": dict(image_size=PX, patch_size=8, width=WIDTH, layers=1, heads=2),
             "table": dict(event_dim=EVENT_DIM, width=WIDTH, layers=1, heads=2, out_dim=WIDTH)}
ATOL = 1e-4
torch.set_num_threads(1)


def tiny_model(variant="xattn-VAE+CLIPimg+CLIPtab", snr_gamma=5.0):
    torch.manual_seed(0)
    vae_mode, use_img, use_tab = TABLE_IV_VARIANTS[variant]
    vae = build_vae(block_out_channels=(8, 16, 32), norm_num_groups=8, image_size=PX, layers_per_block=1)
    return build_ehrxdiff(vae=vae, image_size=PX, clip=ClipConditioner(TINY_CLIP), vae_mode=vae_mode,
                          use_clip_image=use_img, use_clip_table=use_tab, max_events=MAX_EVENTS, c_fusion=5,
                          d_clip=WIDTH, unet_channels=(16, 32), num_heads=2, norm_num_groups=8, layers_per_block=1,
                          snr_gamma=snr_gamma)


def batch():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, True, False], [False, False, False]])       # row 1: the null event set
    return {"prev_image": torch.rand(2, 3, PX, PX, generator=g) * 2 - 1,
            "target_image": torch.rand(2, 3, PX, PX, generator=g) * 2 - 1,
            "events": torch.randn(2, 3, EVENT_DIM, generator=g) * mask[..., None], "event_mask": mask}


def check(name: str, got: np.ndarray, want: list[float]) -> None:
    if os.environ.get("EHRXDIFF_PRINT_GOLDEN"):
        print(f"{name} = {[round(float(x), 6) for x in got.ravel()]}")
    np.testing.assert_allclose(got.ravel(), np.asarray(want), atol=ATOL, rtol=0, err_msg=name)


GOLDEN_LOSS = [
    0.577857, 1.173062]
# rows 0 (two events) and 1 (the null set), 3x3 each; with guidance row 1 is unchanged (its condition is the null set)
GOLDEN_SAMPLE = [
    -0.564216, -0.214162, -0.258691, -0.433161, -0.418868, -0.357156,
    -0.192521, -0.454061, -0.433980, -0.055098, -0.131075, -0.139894,
    -0.003956, 0.083764, 0.131317, 0.123465, 0.107640, 0.025764]
GOLDEN_GUIDED = [
    -0.565006, -0.210955, -0.256481, -0.431127, -0.415700, -0.354453,
    -0.193837, -0.452744, -0.432109, -0.055097, -0.131075, -0.139894,
    -0.003956, 0.083764, 0.131317, 0.123465, 0.107640, 0.025764]


def test_golden_training_loss():
    """Eq. 2 with Min-SNR-γ 5 weights and the plain loss, fixed t / noise / posterior draw (paper's xattn model)."""
    model = tiny_model().eval()
    b = batch()
    g = torch.Generator().manual_seed(11)
    t = torch.tensor([10, 700])
    noise = torch.randn(2, 3, PX // 4, PX // 4, generator=g)
    post = torch.randn(2, 3, PX // 4, PX // 4, generator=g)
    with torch.no_grad():
        weighted = model(b, timesteps=t, noise=noise, posterior_noise=post)
        plain = model(b, timesteps=t, noise=noise, posterior_noise=post, weighted=False)
    check("GOLDEN_LOSS", np.array([weighted.item(), plain.item()]), GOLDEN_LOSS)


def _pipe():
    pipe = EHRXDiffPipeline.from_model(tiny_model(), sampler="ddim", image_size=PX, max_events=MAX_EVENTS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_golden_ddim_sample_slice():
    """DDIM-4, eta 1, one generator per row: the corner 3x3 of each row's first channel (row 1: null events)."""
    b = batch()
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    out = _pipe().generate(b["prev_image"], b["events"], b["event_mask"], num_inference_steps=4, generator=gens,
                           progress=False)
    check("GOLDEN_SAMPLE", out[:, 0, -3:, -3:].numpy(), GOLDEN_SAMPLE)


def test_golden_event_guided_sample_slice():
    """The same with event guidance s = 2 (ε = ε(∅) + 2·(ε(S_event) − ε(∅)), two UNet calls per step)."""
    b = batch()
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    out = _pipe().generate(b["prev_image"], b["events"], b["event_mask"], num_inference_steps=4, generator=gens,
                           progress=False, event_guidance_scale=2.0)
    check("GOLDEN_GUIDED", out[:, 0, -3:, -3:].numpy(), GOLDEN_GUIDED)
