"""CXR–EHR CLIP: the image and table encoders of EHRXDiff and their contrastive pre-training loss (§II-B).

The paper pre-trains two towers on (I_prev, S_event) pairs with a CLIP objective so that, inside the
diffusion model, the image tokens carry the previous image's clinical state and the table tokens the
meaning of the events in between (§II-B, Fig. 2; Table IV shows both towers matter). Facts of the
reference implementation are in shared/docs/paper-reference.md §5 ("ref §5" below).

- :class:`ImageTower` — open_clip's ``VisionTransformer`` (OpenAI-CLIP ViT layout: pre-LN residual blocks,
  QuickGELU), output projection removed. Paper profile: 256 px, patch 32, width 768, 12 layers, 12 heads
  -> 8x8 patches + CLS = 65 tokens x 768 (``constants.N_IMAGE_TOKENS``, ``constants.D_CLIP``).
  Random init, or visual weights from a *local* OpenAI / open_clip file (decision D11).
- :class:`TableTower` — a 2-layer ``nn.TransformerEncoder`` over event embeddings, no positional encoding,
  key-padding mask, a per-token Linear to the CLIP width, masked mean pooling (ref §5 "TableClassifier").
  The empty event set (S_null) is one learned token (decision D3) or the reference's zero events.
- :class:`EHRCLIP` — both towers plus a learnable temperature; :func:`clip_loss` is the symmetric InfoNCE.

Nothing here downloads anything: pretrained weights only ever come from an explicit local path.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file, load_model, save_model
from torch import nn

logger = logging.getLogger(__name__)

LOGIT_SCALE_INIT = math.log(1 / 0.07)   # CLIP's initial temperature 0.07 [ref §5]
LOGIT_SCALE_MAX = math.log(100.0)       # logit scale clamped to [-ln 100, ln 100] [ref §5]
NULL_EVENT_MODES = ("learned_token", "zeros")


# --------------------------------------------------------------------------------------------------
# Image tower
# --------------------------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """CLIP ViT over the previous image I_prev; returns every token and the pooled embedding.

    Returns ``(tokens [B, 1 + (H/p)^2, width], pooled [B, width])``:

    - ``tokens`` is the raw output of the last residual block (CLS first, then the patches in raster
      order), *without* ``ln_post``. That is what the reference's LDM adaptor feeds to the fusion layer
      (ref §6 item 2: ``ln_post`` exists but is not applied there), so the diffusion model sees the same
      features as the paper's.
    - ``pooled`` is ``ln_post(CLS)`` with no output projection (the reference sets ``proj=None``), so the
      CLIP embedding width equals the ViT width (the paper's D_CLIP = 768).

    Images are expected in [-1, 1] (the Cheff/VAE range) and are *not* re-normalised with CLIP's mean/std:
    the reference feeds the same [-1, 1] tensors to the pretrained ViT (ref §5).

    ``weights_path``: optional local OpenAI CLIP file (``ViT-B-32.pt``, a TorchScript archive), open_clip
    state dict (``.bin``/``.pt``/``.safetensors``), a Lightning checkpoint with ``...visual.*`` keys, or a
    saved :class:`ImageTower`. See :func:`load_visual_weights`.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 weights_path: str | Path | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"image tower width {width} is not divisible by heads {heads}")
        self.config = dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                           heads=heads, mlp_ratio=mlp_ratio)
        self.vit = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                     heads=heads, mlp_ratio=mlp_ratio, output_dim=width, act_layer=QuickGELU)
        self.vit.proj = None  # the reference removes the output projection (ref §5)
        self.width = width
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        if weights_path is not None:
            load_visual_weights(self, weights_path)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vit.forward_intermediates(images, indices=1, output_fmt="NLC", output_extra_tokens=True)
        # forward_intermediates splits the last block's output into CLS (prefix) and patch tokens.
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        return tokens, out["image_features"]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint of any of the supported kinds into a flat {name: tensor} dict."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP image weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                is_torchscript = any(n.endswith("constants.pkl") for n in zf.namelist())
            if is_torchscript:  # OpenAI's released ViT-B-32.pt is a TorchScript archive (clip.load does the same)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return torch.jit.load(str(path), map_location="cpu").state_dict()
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, text file, pickled objects we refuse to unpickle, ...
        raise ValueError(f"{path} is not a readable PyTorch / TorchScript / safetensors checkpoint: {err}") from err
    for key in ("state_dict", "model", "module"):  # Lightning / open_clip training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def load_visual_weights(tower: ImageTower, weights_path: str | Path) -> None:
    """Copy ViT weights from a local file into ``tower`` (decision D11), failing loudly on any mismatch.

    The visual keys are located by the prefix in front of ``conv1.weight`` (``visual.`` for OpenAI and
    open_clip, ``model.visual.`` for the reference's Lightning checkpoint, ``vit.`` for an ImageTower),
    so one loader serves all of them. The output projection ``proj`` is ignored (the tower has none).
    The positional embedding is re-initialised when the token grid differs (e.g. ViT-B/32 trained at
    224 px = 7x7 grid, used at 256 px = 8x8), as the reference does (ref §5). Any other missing, extra or
    differently shaped tensor raises one ``ValueError`` naming the file and the first offending key.
    """
    path = Path(weights_path)
    state = _read_state_dict(path)
    prefixes = sorted({k[: -len("conv1.weight")] for k in state if k.endswith("conv1.weight")},
                      key=lambda p: ("visual." not in p, len(p)))
    if not prefixes:
        raise ValueError(f"{path}: no vision-transformer weights found (no key ending in 'conv1.weight'); "
                         f"first key in the file is {next(iter(state), None)!r}")
    prefix = prefixes[0]
    own = tower.vit.state_dict()
    described = ", ".join(f"{k}={v}" for k, v in tower.config.items())
    new_state = {}
    for name, param in own.items():
        src = prefix + name
        if src not in state:
            raise ValueError(f"{path} does not match the image tower ({described}): "
                             f"first mismatching key {src!r} is missing from the file")
        if state[src].shape != param.shape:
            if name == "positional_embedding":
                logger.info("%s: positional embedding %s != %s (grid changed); re-initialised (D11)",
                            path, tuple(state[src].shape), tuple(param.shape))
                continue
            raise ValueError(f"{path} does not match the image tower ({described}): first mismatching key "
                             f"{src!r} has shape {tuple(state[src].shape)}, expected {tuple(param.shape)}")
        new_state[name] = state[src].to(param.dtype)
    ignored = {prefix + "proj"}
    extra = [k for k in state if k.startswith(prefix) and k[len(prefix):] not in own and k not in ignored]
    if extra:
        raise ValueError(f"{path} does not match the image tower ({described}): first mismatching key "
                         f"{extra[0]!r} has no counterpart (e.g. more layers in the file)")
    tower.vit.load_state_dict(new_state, strict=False)
    logger.info("loaded %d visual tensors from %s", len(new_state), path)


# --------------------------------------------------------------------------------------------------
# Table tower
# --------------------------------------------------------------------------------------------------
class TableTower(nn.Module):
    """Transformer over the event embeddings of S_event (the reference's "TableClassifier", ref §5).

    ``forward(events [B, N, event_dim], mask [B, N] bool)`` returns
    ``(tokens [B, N', out_dim], token_mask [B, N'], pooled [B, out_dim])`` with ``N' = max(N, 1)``.

    - ``nn.TransformerEncoder``: ``layers`` post-LN layers, FF 4x width, dropout 0.1, ReLU (torch defaults,
      as the reference), **no positional encoding** (the reference relies on the events' time order only
      through which events are kept). Padding is excluded with ``src_key_padding_mask``.
    - If ``width != event_dim`` a Linear input projection maps events to ``width`` first. The paper runs the
      transformer at the ada-002 width (1536) so it has none; it lets a demo use a narrower transformer
      than its text embedder.
    - A Linear per token maps ``width -> out_dim`` (1536 -> 768 in the paper); padded tokens are set to
      exactly zero so that no consumer can depend on padding; ``pooled`` = mean over real tokens.
    - Rows with no event at all (the null condition S_null of EHRXDiff_w_null, §II-D):
      ``null_events="learned_token"`` (decision D3, default) puts one learned token at position 0 and
      masks everything else, i.e. a true empty set. ``null_events="zeros"`` reproduces the released code:
      zero event vectors with no padding mask (ref §8); with no positional encoding every zero token gets
      the same output, so ``pooled`` does not depend on how many zeros there are.
    """

    def __init__(self, event_dim: int, width: int, layers: int, heads: int, out_dim: int,
                 null_events: str = "learned_token", dropout: float = 0.1):
        super().__init__()
        if null_events not in NULL_EVENT_MODES:
            raise ValueError(f"null_events must be one of {NULL_EVENT_MODES}, got {null_events!r}")
        if width % heads:
            raise ValueError(f"table tower width {width} is not divisible by heads {heads}")
        self.config = dict(event_dim=event_dim, width=width, layers=layers, heads=heads, out_dim=out_dim,
                           null_events=null_events, dropout=dropout)
        self.event_dim, self.out_dim, self.null_events = event_dim, out_dim, null_events
        self.input_proj = nn.Linear(event_dim, width) if width != event_dim else nn.Identity()
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=4 * width,
                                           dropout=dropout, batch_first=True)
        # enable_nested_tensor=False: the same dense computation in training and inference (torch's nested-
        # tensor fast path is a prototype API); padded tokens are zeroed below either way.
        self.transformer = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.fc = nn.Linear(width, out_dim)
        if null_events == "learned_token":
            self.null_token = nn.Parameter(torch.randn(width) * width ** -0.5)

    def forward(self, events: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if events.ndim != 3 or events.shape[-1] != self.event_dim:
            raise ValueError(f"events must be [B, N, {self.event_dim}], got {tuple(events.shape)}")
        if mask.shape != events.shape[:2]:
            raise ValueError(f"event mask must be {tuple(events.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        if events.shape[1] == 0:  # a batch made only of empty event sets: keep one (padding) slot
            events = events.new_zeros(events.shape[0], 1, events.shape[2])
            mask = mask.new_zeros(mask.shape[0], 1)
        empty = ~mask.any(dim=1)                                   # [B] rows = S_null
        if self.null_events == "zeros":
            events = events.masked_fill(empty[:, None, None], 0.0)
            mask = mask | empty[:, None]
        x = self.input_proj(events)
        if self.null_events == "learned_token":
            slot = torch.zeros_like(mask)
            slot[:, 0] = empty
            x = torch.where(slot[..., None], self.null_token.to(x.dtype), x)
            mask = mask | slot
        h = self.transformer(x, src_key_padding_mask=~mask)
        tokens = self.fc(h) * mask[..., None].to(h.dtype)
        pooled = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(tokens.dtype)
        return tokens, mask, pooled


# --------------------------------------------------------------------------------------------------
# The CLIP model and its loss
# --------------------------------------------------------------------------------------------------
def clip_loss(image_embeds: torch.Tensor, event_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over batch-local negatives (ref §5): mean of image->events and events->image CE.

    Inputs are L2-normalised embeddings [B, D] and the (already exponentiated) logit scale. Swapping the
    two modalities transposes the logits and gives the same loss. Computed in float32 even under mixed
    precision (logits up to ±100 and a log-softmax over the batch).
    """
    logits = logit_scale.float() * image_embeds.float() @ event_embeds.float().t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class EHRCLIP(nn.Module):
    """The two towers and a learnable temperature, pre-trained on (I_prev, S_event) pairs (§II-B).

    ``forward(images, events, event_mask) -> (image_embeds, event_embeds, logit_scale)`` with unit-norm
    embeddings and ``logit_scale = exp(clamp(s, ±ln 100))``, s initialised to ln(1/0.07) (ref §5).
    Both pooled embeddings live in ``table_tower.out_dim``; when the image width differs (it does not in
    the paper: 768 both) a bias-free Linear ``image_proj`` maps the image CLS to it.
    """

    def __init__(self, image_tower: ImageTower, table_tower: TableTower):
        super().__init__()
        self.image_tower, self.table_tower = image_tower, table_tower
        self.embed_dim = table_tower.out_dim
        self.image_proj = (nn.Linear(image_tower.width, self.embed_dim, bias=False)
                           if image_tower.width != self.embed_dim else nn.Identity())
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def config(self) -> dict:
        return {"image": dict(self.image_tower.config), "table": dict(self.table_tower.config)}

    @classmethod
    def from_config(cls, config: dict) -> "EHRCLIP":
        """Build from ``{"image": {...ImageTower kwargs, optional weights_path}, "table": {...TableTower kwargs}}``."""
        unknown = set(config) - {"image", "table"}
        if unknown or not {"image", "table"} <= set(config):
            raise ValueError(f"EHRCLIP config needs exactly the keys 'image' and 'table', got {sorted(config)}")
        return cls(ImageTower(**config["image"]), TableTower(**config["table"]))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tower(images)[1])

    def encode_events(self, events: torch.Tensor, event_mask: torch.Tensor) -> torch.Tensor:
        return self.table_tower(events, event_mask)[2]

    def forward(self, images: torch.Tensor, events: torch.Tensor, event_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_embeds = F.normalize(self.encode_image(images), dim=-1)
        event_embeds = F.normalize(self.encode_events(events, event_mask), dim=-1)
        logit_scale = self.logit_scale.clamp(-LOGIT_SCALE_MAX, LOGIT_SCALE_MAX).exp()
        return image_embeds, event_embeds, logit_scale

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (the trained weights replace any init file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        save_model(self, str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "EHRCLIP":
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (expected a save_pretrained folder)")
        config = json.loads((directory / "config.json").read_text())
        config["image"].pop("weights_path", None)
        model = cls.from_config(config)
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False,
                                         device=str(device))
        if missing or unexpected:
            raise ValueError(f"{directory / 'model.safetensors'} does not match {directory / 'config.json'}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.to(device)
