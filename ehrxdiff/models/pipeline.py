"""``EHRXDiffPipeline``: predict the next CXR from a previous CXR and a list of events (§II, Fig. 1).

A ``diffusers.DiffusionPipeline`` holding the frozen VAE, the UNet, the inference scheduler, the CLIP towers
(:class:`ehrxdiff.models.ldm.ClipConditioner`, optional for variants without CLIP) and the adaptor, so a trained model
is one folder: ``save_pretrained(dir)`` / ``EHRXDiffPipeline.from_pretrained(dir)`` work offline, the custom
components being ModelMixin/ConfigMixin classes that diffusers imports from ``ehrxdiff`` by module path.

    pipe = EHRXDiffPipeline.from_pretrained("runs/demo/ldm/pipeline")
    out = pipe(Image.open("prev.jpg"), ["labevents itemid pO2 value 85 ...", ...], embedder=embed_texts,
               num_inference_steps=100, generator=torch.Generator().manual_seed(42))
    out.images[0].save("pred.png")

Sampling follows the reference (paper-reference §9): x_T ~ N(0, I), the condition computed once, no classifier-
free guidance, decode z / 0.18215, clamp to [-1, 1]. ``event_guidance_scale`` s != 1 (not in the paper) adds
InstructPix2Pix-style guidance on the events (Brooks et al. 2023): with the same I_prev, the no-event branch that
EHRXDiff_w_null learned from its null samples (§II-D) is the reference, eps = eps(I_prev, null) + s * (eps(I_prev,
S_event) - eps(I_prev, null)); s = 1 is the paper's sampler exactly, s = 0 the reference's prediction exactly.
The reference is ``config.guidance_reference``: ``"null_set"`` the null event set S_null, or ``"withheld"`` for a
model whose event dropout trained the withheld-events token instead (:func:`ehrxdiff.models.ldm.withheld_table`;
``dropped_events: withheld``), which leaves S_null meaning "nothing happened" to w_null's null samples.
A saved pipeline carries the s its study sampled it with (``config.event_guidance_scale``:
:func:`ehrxdiff.study.models.guidance_scale`, 1 for a model that does not read S_event), which ``pipe(...)`` uses
unless told otherwise, so the README's call reproduces the study's predictions.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ehrxdiff.constants import LATENT_SCALE, MAX_EVENTS
from ehrxdiff.data.images import to_model_tensor, to_uint8
from ehrxdiff.models.adaptor import FusionAdaptor
from ehrxdiff.models.ldm import (DROPPED_EVENTS, ClipConditioner, EHRXDiff, encode_condition,
                                 make_inference_scheduler, unet_conditioning, unet_input, withheld_table)


def _check_event_guidance(adaptor: FusionAdaptor, scale: float) -> None:
    """Guidance on S_event (s != 1) needs a model that reads S_event: one with the CLIP table tower."""
    if float(scale) != 1.0 and not adaptor.config.use_clip_table:
        raise ValueError("event_guidance_scale != 1 needs a model conditioned on the events (CLIP table)")


class EHRXDiffPipeline(DiffusionPipeline):
    """VAE + UNet + scheduler + CLIP towers + adaptor; see the module docstring for usage.

    ``image_size`` is the pixel size the model was trained at (I_prev is resized to it); ``max_events`` keeps the
    most recent events of a longer list, as the data pipeline does; ``event_guidance_scale`` is the default s of
    ``__call__`` and ``guidance_reference`` the no-event branch its guidance contrasts with (module docstring).
    """

    model_cpu_offload_seq = "clip->adaptor->unet->vae"
    _optional_components = ["clip"]

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler, adaptor: FusionAdaptor,
                 clip: ClipConditioner | None = None, latent_scale: float = LATENT_SCALE, image_size: int = 256,
                 max_events: int = MAX_EVENTS, event_guidance_scale: float = 1.0,
                 guidance_reference: str = "null_set"):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, adaptor=adaptor, clip=clip)
        _check_event_guidance(adaptor, event_guidance_scale)
        if guidance_reference not in DROPPED_EVENTS:
            raise ValueError(f"guidance_reference must be one of {DROPPED_EVENTS}, got {guidance_reference!r}")
        self.register_to_config(latent_scale=latent_scale, image_size=image_size, max_events=max_events,
                                event_guidance_scale=float(event_guidance_scale),
                                guidance_reference=guidance_reference)

    @classmethod
    def from_model(cls, model, *, sampler: str = "ddim", image_size: int, max_events: int,
                   event_guidance_scale: float = 1.0, guidance_reference: str = "null_set") -> "EHRXDiffPipeline":
        """A pipeline sharing the modules of a trained :class:`ehrxdiff.models.ldm.EHRXDiff` (weights are not copied).

        The modules are put in eval mode (no dropout in the table tower), as ``from_pretrained`` does.
        """
        model.eval()
        return cls(vae=model.vae, unet=model.unet, adaptor=model.adaptor, clip=model.clip,
                   scheduler=make_inference_scheduler(sampler, model.noise_scheduler.config),
                   latent_scale=model.latent_scale, image_size=image_size, max_events=max_events,
                   event_guidance_scale=event_guidance_scale, guidance_reference=guidance_reference)

    def to_model(self):
        """The trainable :class:`ehrxdiff.models.ldm.EHRXDiff` around this pipeline's modules (shared, not copied),
        with the training noise schedule rebuilt from the sampler's config - e.g. to compute Eq. 2 losses of saved
        weights."""
        return EHRXDiff(vae=self.vae, unet=self.unet, adaptor=self.adaptor, clip=self.clip,
                        noise_scheduler=DDPMScheduler.from_config(self.scheduler.config),
                        latent_scale=self.config.latent_scale).eval()

    def use_sampler(self, kind: str, clip_x0: float | None = None) -> None:
        """Swap the inference scheduler in place: ``"ddim"`` (paper) or ``"dpm++"`` (fast); ``clip_x0`` see
        :func:`ehrxdiff.models.ldm.make_inference_scheduler`."""
        self.scheduler = make_inference_scheduler(kind, self.scheduler.config, clip_x0=clip_x0)

    # -- tensor-level API (used by ehrxdiff.models.sampling for whole splits) -----------------------------
    @torch.no_grad()
    def generate(self, prev_image: torch.Tensor, events: torch.Tensor | None = None,
                 event_mask: torch.Tensor | None = None, *, num_inference_steps: int = 100, eta: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress: bool = True, event_guidance_scale: float = 1.0,
                 findings: torch.Tensor | None = None) -> torch.Tensor:
        """Predict I_trg for a batch: ``prev_image`` [B, 3, H, W] in [-1, 1], ``events`` [B, N, D] zero-padded,
        ``event_mask`` [B, N] (True = real event). Returns [B, 3, H, W] in [-1, 1] on the CPU, wherever it ran.

        ``generator`` may be a list of one generator per row, which makes each row's result independent of the
        batch it was drawn in (what resumable batch generation relies on). ``event_guidance_scale``: see the module
        docstring (the two branches are separate UNet calls, so s = 0 and s = 1 reproduce the plain predictions).
        ``findings`` [B, n_findings] (a model with a findings head, ``event_global: findings*``; not in the paper):
        P(finding) put in place of the head's in the S_event branch, NaN keeping the head's value - a diagnostic
        (``python -m ehrxdiff.bench render``): given the true labels of I_trg, how much of them does the UNet draw?
        The no-event branch of the guidance keeps its own head output.
        """
        device, dtype = self._execution_device, self.unet.dtype
        prev = prev_image.to(device=device, dtype=dtype)
        if events is not None:
            events, event_mask = events.to(device=device, dtype=dtype), event_mask.to(device)
        cond = encode_condition(adaptor=self.adaptor, vae=self.vae, clip=self.clip, prev_image=prev,
                                events=events, event_mask=event_mask)
        if findings is not None:
            if self.adaptor.findings_head is None or cond.pooled_events is None:
                raise ValueError("findings= needs a model with a findings head (event_global findings or "
                                 "findings_prev)")
            given = findings.to(device=device, dtype=cond.pooled_events.dtype)
            if given.shape != cond.pooled_events.shape:
                raise ValueError(f"findings is {tuple(given.shape)}, the head gives {tuple(cond.pooled_events.shape)}")
            cond.pooled_events = torch.where(torch.isnan(given), cond.pooled_events, given)
        s = float(event_guidance_scale)
        _check_event_guidance(self.adaptor, s)
        null_cond = None
        if s != 1.0:
            b = prev.shape[0]
            if self.config.get("guidance_reference", "null_set") == "withheld":
                tokens, mask = withheld_table(b, self.adaptor.config.d_clip, device=device, dtype=dtype)
                null_cond = encode_condition(adaptor=self.adaptor, vae=self.vae, clip=self.clip, prev_image=prev,
                                             table_tokens=tokens, table_mask=mask)
            else:
                null_cond = encode_condition(adaptor=self.adaptor, vae=self.vae, clip=self.clip, prev_image=prev,
                                             events=prev.new_zeros(b, 1, self.clip.event_dim),
                                             event_mask=torch.zeros(b, 1, dtype=torch.bool, device=device))
        b, c = prev.shape[0], self.vae.config.latent_channels
        size = self.unet.config.sample_size
        latents = randn_tensor((b, c, size, size), generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}
        for t in self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps:
            scaled = self.scheduler.scale_model_input(latents, t)
            if s == 0.0:   # the reference branch alone: what eps_null + 0 * (eps - eps_null) is, at half the cost
                eps = self.unet(unet_input(scaled, null_cond), t, **unet_conditioning(self.unet, null_cond)).sample
            else:
                eps = self.unet(unet_input(scaled, cond), t, **unet_conditioning(self.unet, cond)).sample
                if null_cond is not None:
                    eps_null = self.unet(unet_input(scaled, null_cond), t,
                                         **unet_conditioning(self.unet, null_cond)).sample
                    eps = eps_null + s * (eps - eps_null)
            latents = self.scheduler.step(eps, t, latents, **extra).prev_sample
        images = self.vae.decode((latents / self.config.latent_scale).to(self.vae.dtype)).sample
        return images.clamp(-1, 1).float().cpu()  # callers mix predictions with CPU tensors (targets, masks)

    # -- user-level API --------------------------------------------------------------------------
    def _prev_tensor(self, image) -> torch.Tensor:
        size = self.config.image_size
        if isinstance(image, Image.Image):
            return to_model_tensor(np.asarray(image.convert("L"), dtype=np.float32) / 255.0, size)
        if torch.is_tensor(image) and image.dim() == 3:
            if image.shape[-1] != size or image.shape[-2] != size:
                raise ValueError(f"prev_image tensor is {tuple(image.shape)}, expected [3, {size}, {size}]")
            return image.float()
        raise TypeError(f"prev_image must be a PIL image or a [3, H, W] tensor in [-1, 1], got {type(image)}")

    def _event_array(self, events, embedder: Callable[[list[str]], np.ndarray] | None) -> np.ndarray:
        if isinstance(events, np.ndarray) or torch.is_tensor(events):
            arr = np.asarray(events, dtype=np.float32)
        elif isinstance(events, Sequence) and all(isinstance(e, str) for e in events):
            if len(events) == 0:
                arr = np.zeros((0, 1), np.float32)
            elif embedder is None:
                raise ValueError("events given as strings need embedder=callable(list[str]) -> array [n, dim] "
                                 "(the same text embedder the event store was built with)")
            else:
                arr = np.asarray(embedder(list(events)), dtype=np.float32)
        else:
            raise TypeError("events must be a list of strings or an array [n_events, dim]")
        if arr.ndim != 2:
            raise ValueError(f"event embeddings must be 2-D [n_events, dim], got shape {arr.shape}")
        return arr[-self.config.max_events:]

    @torch.no_grad()
    def __call__(self, prev_image, events, *, num_inference_steps: int = 100, eta: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 embedder: Callable[[list[str]], np.ndarray] | None = None, output_type: str = "pil",
                 return_dict: bool = True, event_guidance_scale: float | None = None):
        """Predict the next CXR of one or several patients.

        ``prev_image``: a PIL image / [3, H, W] tensor, or a list of them. ``events``: for one image a list of
        event strings (embedded with ``embedder``) or an array [n, dim] of embeddings; for a list of images, a
        list of such. ``output_type``: ``"pil"`` (grey PIL images), ``"np"`` (uint8 [B, H, W]) or ``"pt"``
        ([B, 3, H, W] in [-1, 1]). ``event_guidance_scale``: s of the event guidance (module docstring); None takes
        the s the pipeline was saved with (``config.event_guidance_scale``), 1 is the paper's sampler.
        """
        single = not isinstance(prev_image, (list, tuple))
        prevs = [prev_image] if single else list(prev_image)
        evs = [events] if single else list(events)
        if len(evs) != len(prevs):
            raise ValueError(f"{len(prevs)} images but {len(evs)} event lists")
        prev = torch.stack([self._prev_tensor(p) for p in prevs])
        ev_t = mask = None
        if self.adaptor.config.use_clip_table:  # variants without the table tower ignore the events
            arrays = [self._event_array(e, embedder) for e in evs]
            dims = {a.shape[1] for a in arrays if len(a)}
            if len(dims) > 1:
                raise ValueError(f"event embeddings of different widths {sorted(dims)}")
            dim = dims.pop() if dims else self.clip.event_dim
            n = max([len(a) for a in arrays] + [1])
            ev_t = torch.zeros(len(arrays), n, dim)
            mask = torch.zeros(len(arrays), n, dtype=torch.bool)
            for i, a in enumerate(arrays):
                ev_t[i, : len(a)] = torch.from_numpy(a)
                mask[i, : len(a)] = True
        s = self.config.event_guidance_scale if event_guidance_scale is None else event_guidance_scale
        images = self.generate(prev, ev_t, mask, num_inference_steps=num_inference_steps, eta=eta,
                               generator=generator, event_guidance_scale=s)
        if output_type == "pt":
            out = images
        elif output_type in ("np", "pil"):
            out = to_uint8(images)
            if output_type == "pil":
                out = [Image.fromarray(g, mode="L") for g in out]
        else:
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
