"""The first stage: a KL autoencoder with Cheff's shape (decision D10, paper-reference §7.1, §11).

EHRXDiff diffuses in the latent space of Cheff's KL-VAE (Weber et al. 2023): 3 input channels, base width 128
with multipliers (1, 2, 4) -> 128/256/512 channels, **three levels = two downsamplings = f 4**, 2 ResNet blocks per
level, one self-attention block in the middle, 3 latent channels (256 px -> 3x64x64) [P §III-A]. Cheff's weights
sit behind a dead link, so the study either trains this VAE on the cohort's own images (:func:`train_vae`), or
converts a *local* Cheff / LDM checkpoint into diffusers' layout (:func:`load_cheff_checkpoint`).

Training here is reconstruction (L1 or L2) + a small KL term, without Cheff's LPIPS/discriminator: LPIPS needs
network-downloaded VGG weights, and a blur-tolerant VAE is enough for a CPU demo. PSNR on validation images
(:func:`psnr`) is what the notebook reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ehrxdiff.constants import LATENT_CHANNELS, LATENT_SCALE

CHEFF_BLOCK_OUT_CHANNELS = (128, 256, 512)  # ch 128 x ch_mult [1, 2, 4] [C configs/cheff-ae.yml]
CHEFF_KL_WEIGHT = 1e-6                     # kl_weight of Cheff's LPIPSWithDiscriminator [C configs/cheff-ae.yml]


def build_vae(*, block_out_channels: Iterable[int] = CHEFF_BLOCK_OUT_CHANNELS,
              latent_channels: int = LATENT_CHANNELS, layers_per_block: int = 2, image_size: int = 256,
              norm_num_groups: int = 32, scaling_factor: float = LATENT_SCALE) -> AutoencoderKL:
    """A randomly initialised diffusers ``AutoencoderKL`` with Cheff's topology.

    The downsampling factor is ``2 ** (len(block_out_channels) - 1)``: three levels give Cheff's f = 4. Like
    Cheff (``attn_resolutions: []``) there is no attention inside the levels, only in the middle block, and the
    1x1 ``quant_conv`` (2C->2C) / ``post_quant_conv`` (C->C) are kept so Cheff weights map one to one.
    """
    chans = tuple(int(c) for c in block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(chans),
        up_block_types=("UpDecoderBlock2D",) * len(chans),
        block_out_channels=chans, layers_per_block=layers_per_block, latent_channels=latent_channels,
        norm_num_groups=norm_num_groups, sample_size=image_size, scaling_factor=scaling_factor,
        mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True,
    )


def downsample_factor(vae: AutoencoderKL) -> int:
    """f = 2 ** (levels - 1): 4 for Cheff's three levels."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, *, kl_weight: float = CHEFF_KL_WEIGHT,
             reconstruction: str = "l1") -> dict[str, torch.Tensor]:
    """Reconstruction + ``kl_weight`` * KL of the posterior to N(0, I), both per-pixel means.

    Cheff sums the NLL over pixels and divides by the batch; we use means so ``kl_weight`` does not depend on
    the image size (it is a small regulariser either way: the latent's scale is handled by ``LATENT_SCALE``).
    """
    if reconstruction not in ("l1", "l2"):
        raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, images) if reconstruction == "l1" else F.mse_loss(recon, images)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return {"loss": rec + kl_weight * kl, "reconstruction": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def psnr(reconstruction: torch.Tensor, target: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB for tensors [B, C, H, W] in [-1, 1] (data range 2)."""
    mse = (reconstruction.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


class VAEObjective(torch.nn.Module):
    """``forward(images) -> loss terms``: the loss as a module, so DDP sees a forward call and syncs gradients."""

    def __init__(self, vae: AutoencoderKL, *, kl_weight: float, reconstruction: str):
        super().__init__()
        self.vae, self.kl_weight, self.reconstruction = vae, kl_weight, reconstruction

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return vae_loss(self.vae, images, kl_weight=self.kl_weight, reconstruction=self.reconstruction)


def images_of(batch, image_key: str) -> torch.Tensor:
    if torch.is_tensor(batch):
        return batch
    if image_key not in batch:
        raise KeyError(f"VAE training batch has no {image_key!r} (keys: {sorted(batch)})")
    return batch[image_key]


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, loader, *, image_keys: tuple[str, ...] = ("target_image",),
                 kl_weight: float = CHEFF_KL_WEIGHT, reconstruction: str = "l1", max_batches: int | None = None
                 ) -> dict[str, float]:
    """Mean loss terms and PSNR (posterior mean decoded, as at inference) over ``loader``."""
    was_training = vae.training
    vae.eval()
    sums, n = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "psnr": 0.0}, 0
    device = next(vae.parameters()).device
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = torch.cat([images_of(batch, k) for k in image_keys]).to(device)
        terms = vae_loss(vae, x, kl_weight=kl_weight, reconstruction=reconstruction)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        for k in ("loss", "reconstruction", "kl"):
            sums[k] += terms[k].item() * len(x)
        sums["psnr"] += psnr(recon, x).sum().item()
        n += len(x)
    vae.train(was_training)
    if n == 0:
        raise ValueError("VAE validation loader is empty")
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, loader, *, image_keys: tuple[str, ...] = ("target_image",),
                         max_batches: int = 8, seed: int = 0) -> float:
    """1 / std of posterior samples of training images: LDM's ``scale_by_std`` (Rombach et al. §4.3).

    The paper keeps 0.18215, the value measured for Cheff's (and SD's) VAE, so the diffusion targets have unit
    variance. A VAE trained here spreads its latents differently (demo: std 2.16, so 0.18215 leaves targets at
    std 0.39 and the diffusion model sees 7x less signal than intended at every t); measuring restores the intent.
    """
    device = next(vae.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        x = torch.cat([images_of(batch, k) for k in image_keys]).to(device, vae.dtype)
        zs.append(vae.encode(x).latent_dist.sample(generator=gen).flatten().float())
    if not zs:
        raise ValueError("cannot measure the latent scale: the loader is empty")
    return float(1.0 / torch.cat(zs).std())


_LDM_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_cheff_checkpoint(path: str | Path, *, block_out_channels: Iterable[int] = CHEFF_BLOCK_OUT_CHANNELS,
                          latent_channels: int = LATENT_CHANNELS, layers_per_block: int = 2,
                          image_size: int = 256, norm_num_groups: int = 32,
                          scaling_factor: float = LATENT_SCALE, allow_pickle: bool = False) -> AutoencoderKL:
    """Load a LOCAL Cheff autoencoder (or an LDM checkpoint holding ``first_stage_model.*``) into diffusers.

    Cheff's file is a torch checkpoint dict with ``state_dict`` [C README.md]; the LDM key layout
    (``encoder.down.0.block.0...``, ``mid.attn_1.q`` as 1x1 convs) is converted by diffusers' own
    ``convert_ldm_vae_checkpoint``. Keys of the training loss (LPIPS, discriminator) are ignored. A file that does
    not hold a VAE of the requested shape raises one ``ValueError`` naming the file and the offending keys.
    Lightning checkpoints may pickle non-tensor objects: ``allow_pickle=True`` loads those (trusted files only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cheff VAE checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e}); if it is a "
                         "trusted Lightning file, pass allow_pickle=True") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' of tensors, got {type(ckpt).__name__}")
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in state) else ""
    ldm = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(_LDM_VAE_PREFIXES)}
    if not ldm:
        raise ValueError(f"{path}: no VAE keys (encoder.*, decoder.*, quant_conv.*) found in the state_dict")
    vae = build_vae(block_out_channels=block_out_channels, latent_channels=latent_channels,
                    layers_per_block=layers_per_block, image_size=image_size, norm_num_groups=norm_num_groups,
                    scaling_factor=scaling_factor)
    converted = convert_ldm_vae_checkpoint(ldm, vae.config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def head(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ValueError(
            f"{path}: does not match a VAE with block_out_channels={tuple(block_out_channels)}, "
            f"latent_channels={latent_channels}, layers_per_block={layers_per_block}: "
            f"missing [{head(missing)}]; unexpected [{head(unexpected)}]; "
            f"wrong shape [{head([f'{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}' for k in wrong])}]")
    vae.load_state_dict(converted, strict=True)
    return vae
