"""Small weight files in the formats the real ones ship in, for the local-weight keys of the config.

A wrong key name or layout must fail in the tests, not on a user's GPU with the real file (issue 16, item 4):

- ``clip_image_weights``  open_clip's state dict (``visual.*`` keys, a projection and the text tower beside them);
- ``vae_weights``         Cheff's LDM checkpoint: ``{"state_dict": {"first_stage_model.<LDM names>": …}}``;
- ``xrv_weights``         torchxrayvision's file: the whole pickled ``xrv.models.DenseNet``;
- ``age_model_weights``   the Riken age model: a TorchScript archive.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from torch import nn


def to_ldm_layout(sd: dict, n_levels: int) -> dict:
    """Inverse of diffusers' converter: a diffusers AutoencoderKL state dict in the CompVis LDM names Cheff uses."""
    top = dict(DIFFUSERS_TO_LDM_MAPPING["vae"].items())
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
                    lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                    lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k2)
        k2 = k2.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0" in k2:
            k2 = k2.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k2 = k2.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM stores attention projections as 1x1 convs
        out[k2] = v
    return out


def write_cheff_checkpoint(vae, path: Path) -> Path:
    """An LDM checkpoint holding the autoencoder under ``first_stage_model.`` and training-loss keys beside it."""
    ldm = {f"first_stage_model.{k}": v for k, v in
           to_ldm_layout(vae.state_dict(), len(vae.config.block_out_channels)).items()}
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": ldm}, path)
    return path


def write_open_clip_visual(vit: nn.Module, path: Path, proj_dim: int = 16) -> Path:
    """open_clip's checkpoint layout: ``{"state_dict": {"visual.*": …, "logit_scale": …}}``."""
    sd = {f"visual.{k}": v.clone() for k, v in vit.state_dict().items()}
    width = sd["visual.class_embedding"].shape[0]
    sd["visual.proj"] = torch.randn(width, proj_dim)
    sd["logit_scale"] = torch.tensor(4.6)
    torch.save({"state_dict": sd}, path)
    return path


def write_xrv_densenet(model, path: Path) -> Path:
    """torchxrayvision ships its DenseNet weights as the whole pickled model."""
    torch.save(model, path)
    return path


class _AgeNet(nn.Module):
    """Stands in for the Riken network: [B, 3, 320, 320] ImageNet-normalised → [B, 1] years."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


def write_riken_torchscript(path: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """A TorchScript archive like the Riken age model's; returns the path and the eager network it holds."""
    torch.manual_seed(seed)
    net = _AgeNet().eval()
    with torch.no_grad():
        net.head.bias.fill_(60.0)
        net.head.weight.mul_(20.0)
    torch.jit.save(torch.jit.script(net), str(path))
    return path, net
