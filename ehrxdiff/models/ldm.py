"""EHRXDiff: the conditional latent diffusion model (§II-C, Eq. 2, Fig. 1; paper-reference §7).

Given I_prev and the event set S_event, the model denoises the target latent z = 0.18215 * E(I_trg).sample() with a
diffusers ``UNet2DConditionModel`` that cross-attends to the adaptor's context c_fusion
(:mod:`ehrxdiff.models.adaptor`):

    L = E_{z, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_fusion) ||^2                               (Eq. 2)

Pieces, each a standard diffusers object so nothing of the 2022 LDM code is forked:

* :func:`build_unet` - the paper's UNet (224 base channels, multipliers 1/2/4/4, 2 res blocks, attention + cross-
  attention at the three lowest resolutions, 8 heads, context width 768) or any smaller one for the demo;
* :func:`widen_conv_in` - the Table IV "concat" variants: the VAE latent of I_prev is concatenated to z_t, the new
  input channels of ``conv_in`` start at zero so the widened UNet initially computes exactly what it did before
  (the InstructPix2Pix recipe);
* :func:`build_noise_scheduler` - 1000 steps, betas on LDM's sqrt-linear curve from 0.0015 to 0.0295 (diffusers
  calls it "scaled_linear"), epsilon prediction;
* :class:`ClipConditioner` - a ModelMixin around helper B's ``EHRCLIP`` so the towers save with the pipeline;
* :class:`EHRXDiff` - the trainable whole: frozen VAE, CLIP towers + adaptor + UNet trainable as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import compute_snr
from torch import nn

from ehrxdiff.constants import (BETA_END, BETA_START, D_CLIP, IMAGENOME_LABELS, LATENT_CHANNELS, LATENT_SCALE,
                                NUM_TRAIN_TIMESTEPS, UNET_BASE_CHANNELS, UNET_CHANNEL_MULT, UNET_HEADS)
from ehrxdiff.models.adaptor import FusionAdaptor

PAPER_UNET_CHANNELS = tuple(UNET_BASE_CHANNELS * m for m in UNET_CHANNEL_MULT)  # 224/448/896/896 [R configs]
EVENT_GLOBAL = (None, "pooled", "findings", "findings_prev")   # what reaches the time embedding (build_ehrxdiff)
DROPPED_EVENTS = ("null_set", "withheld")   # what event dropout trains in S_event's place = event guidance's reference


def build_unet(*, latent_channels: int = LATENT_CHANNELS, sample_size: int = 64,
               block_out_channels: Iterable[int] = PAPER_UNET_CHANNELS, layers_per_block: int = 2,
               attention_levels: Iterable[bool] | None = None, num_heads: int = UNET_HEADS,
               cross_attention_dim: int = D_CLIP, norm_num_groups: int = 32,
               concat_latent: bool = False, event_global_dim: int | None = None,
               time_scale_shift: str = "default") -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel shaped like the reference's LDM UNet (paper-reference §7.2).

    ``attention_levels`` marks the levels with a (self + cross) attention transformer; the default, every level
    but the first, is the paper's ``attention_resolutions [8, 4, 2]`` for four levels (latent 32^2, 16^2, 8^2),
    plus the middle block. ``num_heads`` heads per attention (diffusers' ``attention_head_dim`` argument is, for
    historical reasons, the number of heads). ``concat_latent=True`` builds the Table IV "concat" UNet: built with
    C_z inputs, then widened by :func:`widen_conv_in` so the extra channels start at zero. ``event_global_dim``
    (not in the paper; issue 14) adds diffusers' projection class embedding: a pooled S_event vector of that width
    (:func:`pool_events`) is mapped by an MLP and added to the timestep embedding, so it modulates every ResNet block
    (as SDXL adds its pooled text embedding) instead of reaching the UNet only through cross-attention.
    ``time_scale_shift`` is diffusers' ``resnet_time_scale_shift``: ``"default"`` adds that embedding to each ResNet
    block's features (the reference), ``"scale_shift"`` uses it as FiLM, a per-channel scale and shift (as ADM,
    Dhariwal & Nichol 2021); not in the paper.
    """
    chans = tuple(int(c) for c in block_out_channels)
    levels = tuple(attention_levels) if attention_levels is not None else (False,) + (True,) * (len(chans) - 1)
    if len(levels) != len(chans):
        raise ValueError(f"attention_levels has {len(levels)} entries for {len(chans)} levels")
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=chans, layers_per_block=layers_per_block,
        attention_head_dim=num_heads, cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
        transformer_layers_per_block=1, use_linear_projection=False,  # SpatialTransformer depth 1, 1x1 conv in
        resnet_time_scale_shift=time_scale_shift,
        **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": int(event_global_dim)}
           if event_global_dim else {}),
    )
    if concat_latent:
        widen_conv_in(unet, extra_channels=latent_channels)
    return unet


def widen_conv_in(unet: UNet2DConditionModel, *, extra_channels: int) -> UNet2DConditionModel:
    """Add ``extra_channels`` zero-initialised input channels to ``unet.conv_in`` (in place) and update its config.

    With zero weights on the new channels the widened UNet's output equals the original's for any content of
    those channels, so the concat variant starts from the same function as the cross-attention one.
    """
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(device=old.weight.device, dtype=old.weight.dtype)
    unet.register_to_config(in_channels=old.in_channels + extra_channels)
    return unet


def build_noise_scheduler(*, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                          beta_end: float = BETA_END) -> DDPMScheduler:
    """The reference's forward process: LDM "linear" betas = linspace(sqrt(b0), sqrt(b1), T)^2, eps-prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


class ClipConditioner(ModelMixin, ConfigMixin):
    """``EHRCLIP`` (:mod:`ehrxdiff.models.clip`) as a savable diffusers component; built from the CLIP config dict.

    The reference feeds the adaptor the image tower's tokens of I_prev and the table tower's per-event tokens, and
    fine-tunes both towers with the diffusion loss (``clip_trainable: true``, paper-reference §6).
    """

    @register_to_config
    def __init__(self, clip_config: dict):
        super().__init__()
        from ehrxdiff.models.clip import EHRCLIP  # imported here: variants without CLIP never pay open_clip's import

        config = {k: dict(v) for k, v in clip_config.items()}
        config["image"].pop("weights_path", None)  # weights come from this component's own file
        self.clip = EHRCLIP.from_config(config)

    @classmethod
    def from_ehrclip(cls, clip) -> "ClipConditioner":
        """Wrap a trained ``EHRCLIP`` (e.g. ``EHRCLIP.from_pretrained(dir)`` after CLIP pre-training)."""
        wrapper = cls(clip_config=dict(clip.config))
        wrapper.clip.load_state_dict(clip.state_dict())
        return wrapper

    @property
    def event_dim(self) -> int:
        """Width of the event embeddings the table tower expects."""
        return int(self.clip.table_tower.event_dim)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_tower(images)[0]

    def table_tokens(self, events: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, token_mask, _ = self.clip.table_tower(events, mask)
        return tokens, token_mask


@dataclass
class Condition:
    """What the UNet is conditioned on: the cross-attention context and, for "concat" variants, a latent."""
    context: torch.Tensor
    context_mask: torch.Tensor | None
    concat_latent: torch.Tensor | None
    pooled_events: torch.Tensor | None = None    # [B, 2 D]: masked mean and max of the event tokens (pool_events),
    #                                              or [B, n_findings] P(finding) of the adaptor's findings head


def pool_events(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, D] event tokens with their mask (True = a real event) -> [B, 2 D]: the masked mean beside the masked
    max. The mean says what the history is mostly made of; the max keeps a single rare event (one furosemide dose
    among 60 hourly vitals) from being averaged away. A pair without events (the null set) pools to zeros."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    n = m.sum(dim=1).clamp(min=1)
    mean = (tokens * m).sum(dim=1) / n
    peak = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    peak = torch.where(mask.any(dim=1, keepdim=True), peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], dim=-1)


def pool_image(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, D] CLIP image tokens of I_prev -> [B, 2 D]: their mean beside their max, as :func:`pool_events` pools
    the events (what a findings head that reads I_prev sees, ``event_global: findings_prev``)."""
    return torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=-1)


def withheld_table(batch: int, width: int, *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The table tokens of *withheld* events (not in the paper; ``dropped_events: withheld``): one all-zero token,
    valid, [B, 1, width] with its mask [B, 1] - a condition the frozen table tower never emits (its outputs for real
    events and its learned null token of S_null are not zero), given in place of its tokens.

    Why a second "no events" condition: EHRXDiff_w_null's null samples (§II-D) teach S_null "nothing happened, the
    next film repeats I_prev". Event dropout trained with S_null too (InstructPix2Pix) mixes that into "events not
    known": guidance against ε(I_prev, S_null) then pushes every prediction away from a copy of I_prev, and *same*
    pays. With dropout to the withheld token, S_null keeps its one meaning and ε(I_prev, withheld) is the change
    expected without knowing the events - the reference event guidance wants (docs/methods.md)."""
    tokens = torch.zeros(batch, 1, width, device=device, dtype=dtype)
    return tokens, torch.ones(batch, 1, dtype=torch.bool, device=device)


def unet_conditioning(unet: UNet2DConditionModel, condition: Condition) -> dict:
    """The UNet's keyword arguments for ``condition``: the cross-attention context, and the pooled events for a
    UNet built with ``event_global_dim``."""
    kwargs = {"encoder_hidden_states": condition.context, "encoder_attention_mask": condition.context_mask}
    if unet.config.class_embed_type == "projection":
        if condition.pooled_events is None:
            raise ValueError("this UNet takes the pooled S_event (event_global) but the condition has no event tokens")
        kwargs["class_labels"] = condition.pooled_events.to(condition.context.dtype)
    return kwargs


def encode_condition(*, adaptor: FusionAdaptor, prev_image: torch.Tensor | None = None,
                     vae: AutoencoderKL | None = None, clip: ClipConditioner | None = None,
                     events: torch.Tensor | None = None, event_mask: torch.Tensor | None = None,
                     prev_latent_mean: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                     table_tokens: torch.Tensor | None = None, table_mask: torch.Tensor | None = None
                     ) -> Condition:
    """Run the condition encoders of the variant on (I_prev, S_event) - shared by training and the pipeline.

    The VAE is frozen (no gradient); its *unscaled* posterior mean feeds both the adaptor's VAE tokens and the
    concat channels, as in the reference (``encode(I_prev).mode()``, paper-reference §6). Precomputed inputs skip
    their encoder: ``prev_latent_mean`` the VAE, ``image_tokens`` / ``table_tokens`` + ``table_mask`` the frozen CLIP
    towers (:mod:`ehrxdiff.training.cache`); ``prev_image`` and ``events`` are needed only for what is not given.
    """
    cfg = adaptor.config
    mean = prev_latent_mean
    if adaptor.needs_vae_latent and mean is None:
        if vae is None or prev_image is None:
            raise ValueError(f"vae_mode={cfg.vae_mode!r} needs the VAE and prev_image (or prev_latent_mean)")
        with torch.no_grad():
            mean = vae.encode(prev_image.to(vae.dtype)).latent_dist.mode()
    if cfg.use_clip_image and image_tokens is None:
        if clip is None or prev_image is None:
            raise ValueError("this adaptor variant uses CLIP image tokens: give a ClipConditioner and prev_image "
                             "(or image_tokens)")
        image_tokens = clip.image_tokens(prev_image)
    if cfg.use_clip_table and table_tokens is None:
        if clip is None:
            raise ValueError("this adaptor variant uses CLIP table tokens but no ClipConditioner was given")
        if events is None or event_mask is None:
            raise ValueError("use_clip_table=True needs events and event_mask (or table_tokens)")
        table_tokens, table_mask = clip.table_tokens(events, event_mask)
    if not cfg.use_clip_image:
        image_tokens = None
    if not cfg.use_clip_table:
        table_tokens = table_mask = None
    sized = [x for x in (prev_image, mean, image_tokens, table_tokens, events) if x is not None]
    if not sized:
        raise ValueError("encode_condition got no input to take the batch size from")
    context, context_mask = adaptor(vae_latent=mean if cfg.vae_mode == "xattn" else None, image_tokens=image_tokens,
                                    table_tokens=table_tokens, table_mask=table_mask, batch_size=sized[0].shape[0])
    pooled = pool_events(table_tokens, table_mask) if table_tokens is not None else None
    if pooled is not None and adaptor.findings_head is not None:   # event_global "findings": P(finding) instead
        pooled = adaptor.findings(pooled, pool_image(image_tokens) if cfg.findings_reads_image else None)
    return Condition(context, context_mask, mean if cfg.vae_mode == "concat" else None, pooled)


def unet_input(latents: torch.Tensor, condition: Condition) -> torch.Tensor:
    """z_t, or [z_t, E(I_prev)] along channels for the concat variants."""
    if condition.concat_latent is None:
        return latents
    return torch.cat([latents, condition.concat_latent.to(latents.dtype)], dim=1)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR(t), gamma) / SNR(t) (Hang et al. 2023, who report
    3.4x faster convergence at gamma = 5; not in the paper): the low-noise steps, whose epsilon targets are easy and
    whose gradients dominate Eq. 2, are down-weighted. SNR from ``diffusers.training_utils.compute_snr``."""
    snr = compute_snr(noise_scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr


class EHRXDiff(nn.Module):
    """The trainable model: ``forward(batch) -> loss`` (Eq. 2). One module so DDP/accelerate see one forward.

    Trainable: UNet, adaptor and - with ``clip_trainable`` (the reference fine-tunes both towers) - the CLIP towers
    the variant uses; the VAE is frozen and kept in eval mode. Frozen towers are kept in eval mode too (no dropout),
    so their tokens are a function of the input and can be cached (:mod:`ehrxdiff.training.cache`). The CLIP logit
    scale and unused towers are frozen so no parameter is left without a gradient (DDP would otherwise need
    ``find_unused_parameters``). ``snr_gamma`` turns on Min-SNR-gamma weighting of the training loss
    (:func:`min_snr_weights`; the paper trains unweighted, None).
    """

    def __init__(self, *, vae: AutoencoderKL, unet: UNet2DConditionModel, adaptor: FusionAdaptor,
                 noise_scheduler: DDPMScheduler, clip: ClipConditioner | None = None,
                 latent_scale: float = LATENT_SCALE, clip_trainable: bool = True, snr_gamma: float | None = None):
        super().__init__()
        cfg = adaptor.config
        expected_in = vae.config.latent_channels * (2 if cfg.vae_mode == "concat" else 1)
        if unet.config.in_channels != expected_in:
            raise ValueError(f"vae_mode={cfg.vae_mode!r} needs a UNet with {expected_in} input channels, "
                             f"got {unet.config.in_channels}")
        if unet.config.cross_attention_dim != cfg.d_clip:
            raise ValueError(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != adaptor d_clip "
                             f"{cfg.d_clip}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma}")
        self.vae, self.unet, self.adaptor, self.clip = vae, unet, adaptor, clip
        self.noise_scheduler = noise_scheduler
        self.latent_scale = latent_scale
        self.clip_trainable, self.snr_gamma = clip_trainable, snr_gamma
        self.vae.requires_grad_(False).eval()
        if adaptor.findings_head is not None:   # fitted on report labels before training (training.findings)
            adaptor.findings_head.requires_grad_(False)
        if clip is not None:
            clip.requires_grad_(False)
            if clip_trainable and cfg.use_clip_image:
                clip.clip.image_tower.requires_grad_(True)
            if clip_trainable and cfg.use_clip_table:
                clip.clip.table_tower.requires_grad_(True)
            if not clip_trainable:
                clip.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen first stage
        if self.clip is not None and not self.clip_trainable:
            self.clip.eval()  # frozen towers: no dropout, so cached tokens equal computed ones
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.unet, "adaptor": self.adaptor}
        if self.clip is not None and self.clip_trainable:
            mods["clip"] = self.clip
        return mods

    def ema_parameters(self, scope: str = "all") -> Iterator[nn.Parameter]:
        """Parameters tracked by the EMA: ``"all"`` trainable ones (default) or ``"unet"`` only (reference)."""
        if scope not in ("all", "unet"):
            raise ValueError(f"ema scope must be 'all' or 'unet', got {scope!r}")
        mods = [self.unet] if scope == "unet" else list(self.trainable_modules().values())
        for m in mods:
            yield from (p for p in m.parameters() if p.requires_grad)

    def condition(self, batch: dict, prev_latent_mean: torch.Tensor | None = None) -> Condition:
        return encode_condition(adaptor=self.adaptor, vae=self.vae, clip=self.clip, prev_image=batch.get("prev_image"),
                                events=batch.get("events"), event_mask=batch.get("event_mask"),
                                prev_latent_mean=prev_latent_mean if prev_latent_mean is not None
                                else batch.get("prev_mean"),
                                image_tokens=batch.get("image_tokens"), table_tokens=batch.get("table_tokens"),
                                table_mask=batch.get("table_mask"))

    def first_stage(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(posterior mean of I_prev or None when the variant does not use it, posterior mean and std of I_trg):
        read from a cached batch (``prev_mean``, ``target_mean``, ``target_std``; :mod:`ehrxdiff.training.cache`) or
        computed by the frozen encoder, I_prev and I_trg in one pass."""
        if "target_mean" in batch:
            return batch.get("prev_mean"), batch["target_mean"], batch["target_std"]
        prev, target = batch["prev_image"], batch["target_image"]
        b = prev.shape[0]
        with torch.no_grad():
            if self.adaptor.needs_vae_latent:
                posterior = self.vae.encode(torch.cat([prev, target]).to(self.vae.dtype)).latent_dist
                return posterior.mean[:b], posterior.mean[b:], posterior.std[b:]
            posterior = self.vae.encode(target.to(self.vae.dtype)).latent_dist
            return None, posterior.mean, posterior.std

    def forward(self, batch: dict, *, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                posterior_noise: torch.Tensor | None = None, weighted: bool = True) -> torch.Tensor:
        """Eq. 2: MSE between the drawn noise and the UNet's prediction, t ~ U{0..T-1}.

        The target latent is a posterior *sample* scaled by the latent scale (paper-reference §7.1),
        z0 = scale * (mean + std * posterior_noise), whether the posterior comes from the cache or the encoder.
        ``timesteps``/``noise``/``posterior_noise`` may be fixed for deterministic losses. ``weighted=False`` gives
        the plain Eq. 2 loss even when the model trains with Min-SNR weights (validation, conditioning checks).
        """
        prev_mean, t_mean, t_std = self.first_stage(batch)
        if posterior_noise is None:
            posterior_noise = torch.randn_like(t_mean)
        z0 = self.latent_scale * (t_mean + t_std * posterior_noise)
        b = z0.shape[0]
        if noise is None:
            noise = torch.randn_like(z0)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise, timesteps)
        cond = self.condition(batch, prev_latent_mean=prev_mean)
        pred = self.unet(unet_input(zt, cond), timesteps, **unet_conditioning(self.unet, cond)).sample
        if not weighted or self.snr_gamma is None:
            return F.mse_loss(pred.float(), noise.float())
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)).mean()


SAMPLERS = ("ddim", "dpm++")
SAMPLER_ALIASES = {"dpm": "dpm++"}   # the config's name (StudyConfig.sampler) for DPM-Solver++


def make_inference_scheduler(kind: str, train_scheduler_config, clip_x0: float | None = None
                             ) -> "DDIMScheduler | DPMSolverMultistepScheduler":
    """The sampler of decision D6, on the training noise schedule.

    ``"ddim"``: the paper's DDIM (use 100 steps, eta = 1 at call time), with LDM's uniform "leading" timesteps
    offset by one (991, 981, ..., 1) and alpha_prev of the last step = alphas_cumprod[0], exactly as LDM's
    ``DDIMSampler`` [R cheff/ldm/models/diffusion/ddim.py]. ``"dpm++"``: DPM-Solver++ (2nd order multistep), a
    fast switch for <= 20 steps; not in the paper (``"dpm"``, the config's name, is accepted for it).

    ``clip_x0`` (not in the paper; off by default) clips each step's predicted clean latent to
    [-clip_x0, clip_x0]. LDM's schedule ends at alpha_bar_T ~ 4e-6, so an eps error e at high t becomes an x0
    error e / sqrt(alpha_bar_t) (~500 e): a converged model makes e ~ 0 there, a short CPU run does not, and
    its unclipped trajectories leave the latent range (measured on the demo: x0 std 45 vs 0.6). Set it to the
    latent range (max |z| of encoded training images) for under-trained models.
    """
    kind = SAMPLER_ALIASES.get(kind, kind)
    clip = {} if clip_x0 is None else {"clip_sample": True, "clip_sample_range": float(clip_x0)}
    if kind == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config, timestep_spacing="leading", steps_offset=1,
                                         set_alpha_to_one=False, **({"clip_sample": False} | clip))
    if kind == "dpm++":
        thr = {} if clip_x0 is None else {"thresholding": True, "sample_max_value": float(clip_x0)}
        return DPMSolverMultistepScheduler.from_config(train_scheduler_config, algorithm_type="dpmsolver++",
                                                       solver_order=2, timestep_spacing="linspace", **thr)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")


def build_ehrxdiff(*, vae: AutoencoderKL, image_size: int, clip: ClipConditioner | None = None,
                   vae_mode: str | None = "xattn", use_clip_image: bool = True, use_clip_table: bool = True,
                   max_events: int, c_fusion: int, d_clip: int | None = None,
                   unet_channels: Iterable[int] = PAPER_UNET_CHANNELS, attention_levels: Iterable[bool] | None = None,
                   num_heads: int = UNET_HEADS, layers_per_block: int = 2, norm_num_groups: int = 32,
                   latent_scale: float = LATENT_SCALE, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   beta_start: float = BETA_START, beta_end: float = BETA_END, clip_trainable: bool = True,
                   snr_gamma: float | None = None, fusion: str = "linear", event_global: str | None = None,
                   n_findings: int = len(IMAGENOME_LABELS), time_scale_shift: str = "default") -> EHRXDiff:
    """Assemble a fresh EHRXDiff for one Table IV variant around a (trained) VAE and (pre-trained) CLIP.

    Shapes follow from the parts: latent size = ``image_size / f``, D_CLIP = the CLIP token width (image tower
    width, which must equal the table tower's ``out_dim``), image tokens = the image tower's token count.
    ``event_global`` (not in the paper) also feeds S_event to the UNet's time embedding (:func:`build_unet`):
    ``"pooled"`` the pooled table tokens (:func:`pool_events`), ``"findings"`` the ``n_findings`` probabilities of the
    adaptor's findings head over them (fit it with :func:`ehrxdiff.training.findings.fit_findings_head` before
    training; it stays frozen), ``"findings_prev"`` those of a head that reads the pooled CLIP image tokens of I_prev
    too (:func:`pool_image`; needs ``use_clip_image``). None: cross-attention only, the paper.
    """
    if event_global not in EVENT_GLOBAL:
        raise ValueError(f"event_global must be one of {EVENT_GLOBAL}, got {event_global!r}")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % f:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE factor {f}")
    latent_size = image_size // f
    n_image_tokens = 0
    if use_clip_image or use_clip_table:
        if clip is None:
            raise ValueError("CLIP image/table tokens requested but clip=None")
        widths = {clip.clip.image_tower.width, clip.clip.table_tower.out_dim}
        if len(widths) != 1:
            raise ValueError(f"image tower width and table tower out_dim differ: {sorted(widths)}")
        d_clip = widths.pop() if d_clip is None else d_clip
        n_image_tokens = clip.clip.image_tower.num_tokens
        if clip.clip.image_tower.config["image_size"] != image_size:
            raise ValueError(f"CLIP image tower is built for {clip.clip.image_tower.config['image_size']} px, "
                             f"the model for {image_size} px")
    if d_clip is None:
        raise ValueError("d_clip is needed when no CLIP tower is used")
    if event_global and not use_clip_table:
        raise ValueError("event_global pools the CLIP table tokens: it needs use_clip_table=True")
    if event_global == "findings_prev" and not use_clip_image:
        raise ValueError("event_global findings_prev reads I_prev's CLIP image tokens: it needs use_clip_image=True")
    adaptor = FusionAdaptor(latent_channels=vae.config.latent_channels, latent_size=latent_size, d_clip=d_clip,
                            n_image_tokens=max(n_image_tokens, 1), max_events=max_events, c_fusion=c_fusion,
                            vae_mode=vae_mode, use_clip_image=use_clip_image, use_clip_table=use_clip_table,
                            fusion=fusion,
                            n_findings=n_findings if event_global in ("findings", "findings_prev") else 0,
                            findings_reads_image=event_global == "findings_prev")
    global_dim = {"pooled": 2 * d_clip, "findings": n_findings, "findings_prev": n_findings}.get(event_global)
    unet = build_unet(latent_channels=vae.config.latent_channels, sample_size=latent_size,
                      block_out_channels=unet_channels, layers_per_block=layers_per_block,
                      attention_levels=attention_levels, num_heads=num_heads, cross_attention_dim=d_clip,
                      norm_num_groups=norm_num_groups, concat_latent=vae_mode == "concat",
                      event_global_dim=global_dim, time_scale_shift=time_scale_shift)
    return EHRXDiff(vae=vae, unet=unet, adaptor=adaptor, clip=clip if (use_clip_image or use_clip_table) else None,
                    noise_scheduler=build_noise_scheduler(num_train_timesteps=num_train_timesteps,
                                                          beta_start=beta_start, beta_end=beta_end),
                    latent_scale=latent_scale, clip_trainable=clip_trainable, snr_gamma=snr_gamma)
