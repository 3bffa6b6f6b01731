"""A_fusion: the conditioning adaptor that builds the UNet's cross-attention context (§II-C, Fig. 2).

The reference's ``MultiModalTransformerAdaptor`` (paper-reference §6) takes three token sets of width D_CLIP:

* **VAE**: the posterior mean of I_prev (unscaled, [B, C_z, H_f, W_f]) flattened per channel and projected by one
  Linear(H_f*W_f -> D_CLIP): C_z = 3 tokens;
* **CLIP image**: the 65 ViT tokens of I_prev;
* **CLIP table**: the event tokens of the table tower, padded to exactly ``max_events`` (1024 in the paper);

concatenates them along the token axis (3 + 65 + 1024 = 1092) and mixes that axis with one Linear(1092 -> C_fusion)
to get ``c_fusion`` in R^{C_fusion x D_CLIP} (1024 x 768).

Table IV ablates the sources. Every row is a config of this one module: ``vae_mode`` "xattn" (VAE tokens in the
context), "concat" (the VAE latent goes to the UNet input instead, see ``ldm.widen_conv_in``) or None, and the
booleans ``use_clip_image`` / ``use_clip_table``. As in the reference's single-source adaptors (VAEAdaptor,
ClipImgAdaptor, ...), a lone source is passed through without the token-mixing Linear, keeping its padding mask.
A config with no context source at all (Table IV row 1, concat-VAE alone) gets one learned constant token, so
the same cross-attention UNet serves every row; a constant context carries no information about the pair.

``fusion="tokens"`` (not in the paper; issue 14) skips the token-axis Linear when several sources are fused: the
context is the sources' tokens side by side (3 + 65 + max_events) with the table's padding mask, so the UNet's
cross-attention can pick an event by its content wherever it sits in the history. The Linear instead gives each
fused token fixed weights per *position* of the padded table, and a drug given at hour 3 or hour 30 lands on
different positions. ``fusion="linear"`` is the paper's adaptor.

``n_findings`` (not in the paper; issue 14, ``event_global: findings``) gives the adaptor a **findings head**: one
Linear from the pooled table tokens (:func:`ehrxdiff.models.ldm.pool_events`, masked mean and max) to the logits of
the next film's findings, fitted on the train pairs' report labels *before* the LDM trains
(:mod:`ehrxdiff.training.findings`) and frozen while it does. Its probabilities go to the UNet's time embedding: a
14-number summary of what the events say about the next film, where the cross-attention context leaves the UNet to
find that in 64 event tokens. At test time it reads only S_event, as every other part of the condition.
``findings_reads_image`` (``event_global: findings_prev``) lets the head read the pooled CLIP image tokens of I_prev
beside the events': what the next film shows depends on what the last one showed (a linear probe on the demo world:
weighted-macro AUROC all / same 0.82 / 0.84 from the events alone, 0.89 / 0.93 with I_prev's tokens; docs/methods.md).
No input is added: the model already reads I_prev.

Mask semantics (a deliberate cleanup of the reference, which mixes the transformer's outputs at padded positions
into the context): padded event tokens are **zeroed** before the token-axis Linear, so the fused context does not
depend on how a row was padded, and rows with a different number of events stay comparable. Positions are fixed by
padding every table to ``max_events`` tokens, as the reference does, so the Linear's weights have a meaning.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ehrxdiff.constants import (C_FUSION, D_CLIP, LATENT_CHANNELS, MAX_EVENTS, N_IMAGE_TOKENS, TABLE_IV_VARIANTS)  # noqa: F401

VAE_MODES = ("xattn", "concat", None)
FUSIONS = ("linear", "tokens")

# Table IV rows as adaptor configs live in constants.TABLE_IV_VARIANTS (re-exported here).


class FusionAdaptor(ModelMixin, ConfigMixin):
    """Fuse VAE, CLIP-image and CLIP-table tokens into the UNet context (paper-reference §6).

    Args:
        latent_channels, latent_size: C_z and H_f (= W_f) of the VAE latent of I_prev.
        d_clip: token width D_CLIP (= the UNet's cross-attention width).
        n_image_tokens: tokens of the CLIP image tower (1 + (H/p)^2; 65 for ViT-B/32 at 256 px).
        max_events: the table is padded to exactly this many tokens before fusion.
        c_fusion: output tokens when more than one source is fused (C_fusion).
        vae_mode, use_clip_image, use_clip_table: the Table IV variant.
        fusion: ``linear`` (the paper: a Linear over the token axis to ``c_fusion`` tokens) or ``tokens`` (the
            sources' tokens side by side, masked; module docstring).
        n_findings: outputs of the findings head (0 = none, the paper; module docstring).
        findings_reads_image: the findings head also reads the pooled CLIP image tokens of I_prev (module docstring).
    """

    @register_to_config
    def __init__(self, *, latent_channels: int = LATENT_CHANNELS, latent_size: int = 64, d_clip: int = D_CLIP,
                 n_image_tokens: int = N_IMAGE_TOKENS, max_events: int = MAX_EVENTS, c_fusion: int = C_FUSION,
                 vae_mode: str | None = "xattn", use_clip_image: bool = True, use_clip_table: bool = True,
                 fusion: str = "linear", n_findings: int = 0, findings_reads_image: bool = False):
        super().__init__()
        # A single-source variant has no weights of its own (Table IV rows 2-4 skip the mixing Linear); this
        # buffer gives save_pretrained something to write so from_pretrained can load every variant alike.
        self.register_buffer("format_version", torch.tensor(1), persistent=True)
        if vae_mode not in VAE_MODES:
            raise ValueError(f"vae_mode must be one of {VAE_MODES}, got {vae_mode!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.vae_projector = nn.Linear(latent_size * latent_size, d_clip) if vae_mode == "xattn" else None
        n_in = self.n_source_tokens
        if self.n_sources > 1 and fusion == "linear":
            self.token_mixer = nn.Linear(n_in, c_fusion)  # mixes the token axis: [B, D, n_in] -> [B, D, C_fusion]
            self.null_context = None
        elif self.n_sources == 0:
            self.token_mixer = None
            self.null_context = nn.Parameter(torch.randn(1, 1, d_clip) * d_clip ** -0.5)
        else:
            self.token_mixer = self.null_context = None
        if n_findings and not use_clip_table:
            raise ValueError("the findings head reads the CLIP table tokens: n_findings needs use_clip_table=True")
        if findings_reads_image and not (n_findings and use_clip_image):
            raise ValueError("findings_reads_image reads the CLIP image tokens into the findings head: it needs "
                             "n_findings > 0 and use_clip_image=True")
        self.findings_head = (nn.Linear(2 * d_clip * (2 if findings_reads_image else 1), n_findings)
                              if n_findings else None)

    # -- what the config implies -------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        c = self.config
        return int(c.vae_mode == "xattn") + int(c.use_clip_image) + int(c.use_clip_table)

    @property
    def n_source_tokens(self) -> int:
        c = self.config
        return ((c.latent_channels if c.vae_mode == "xattn" else 0) + (c.n_image_tokens if c.use_clip_image else 0)
                + (c.max_events if c.use_clip_table else 0))

    @property
    def n_context_tokens(self) -> int:
        """Tokens of the context this adaptor outputs (what the UNet cross-attends to)."""
        if self.n_sources > 1 and self.config.fusion == "linear":
            return self.config.c_fusion
        return self.n_source_tokens if self.n_sources >= 1 else 1

    @property
    def needs_vae_latent(self) -> bool:
        return self.config.vae_mode is not None

    def findings(self, pooled_events: torch.Tensor, pooled_image: torch.Tensor | None = None) -> torch.Tensor:
        """P(finding) of the next film [B, n_findings] from the pooled table tokens [B, 2 D] and, for a head that
        reads I_prev (``findings_reads_image``), the pooled CLIP image tokens [B, 2 D] (the findings head)."""
        if self.findings_head is None:
            raise ValueError("this adaptor has no findings head (n_findings=0)")
        if self.config.findings_reads_image != (pooled_image is not None):
            raise ValueError("this findings head reads " + ("the events and I_prev's pooled CLIP image tokens"
                             if self.config.findings_reads_image else "the events only"))
        x = pooled_events if pooled_image is None else torch.cat([pooled_events, pooled_image], dim=-1)
        return torch.sigmoid(self.findings_head(x))

    # -- forward ---------------------------------------------------------------------------------
    def _pad_table(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = tokens.shape
        m = self.config.max_events
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        if mask.shape != (b, n):
            raise ValueError(f"table_mask has shape {tuple(mask.shape)}, expected {(b, n)}")
        if n > m:
            raise ValueError(f"{n} table tokens exceed max_events={m}; keep the most recent events upstream")
        tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)  # padded tokens contribute nothing
        if n < m:
            tokens = torch.cat([tokens, tokens.new_zeros(b, m - n, d)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, m - n)], dim=1)
        return tokens, mask

    def forward(self, *, vae_latent: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                table_tokens: torch.Tensor | None = None, table_mask: torch.Tensor | None = None,
                batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(context [B, T, D_CLIP], context_mask [B, T] bool or None)``.

        ``vae_latent`` is the *unscaled* posterior mean of I_prev [B, C_z, H_f, W_f] (the reference uses
        ``encode(I_prev).mode()``); ``table_mask`` is True for real event tokens. ``context_mask`` is None when
        every context token is valid (always so after token mixing).
        """
        c = self.config
        parts, masks = [], []
        if c.vae_mode == "xattn":
            if vae_latent is None:
                raise ValueError("vae_mode='xattn' needs vae_latent")
            parts.append(self.vae_projector(vae_latent.flatten(2)))  # [B, C_z, H_f*W_f] -> [B, C_z, D]
            masks.append(None)
        if c.use_clip_image:
            if image_tokens is None:
                raise ValueError("use_clip_image=True needs image_tokens")
            parts.append(image_tokens)
            masks.append(None)
        if c.use_clip_table:
            if table_tokens is None:
                raise ValueError("use_clip_table=True needs table_tokens")
            tokens, mask = self._pad_table(table_tokens, table_mask)
            parts.append(tokens)
            masks.append(mask)
        if not parts:
            if batch_size is None:
                raise ValueError("an adaptor with no context source needs batch_size")
            return self.null_context.expand(batch_size, -1, -1), None
        widths = {p.shape[-1] for p in parts}
        if widths != {c.d_clip}:
            raise ValueError(f"token widths {sorted(widths)} differ from d_clip={c.d_clip}")
        if len(parts) == 1:
            mask = masks[0]
            if mask is not None and not bool(mask.any(1).all()):
                raise ValueError("a row has no valid table token; cross-attention over an empty set is undefined "
                                 "(the table tower should emit its null token for empty event sets, decision D3)")
            return parts[0], mask
        x = torch.cat(parts, dim=1)
        if x.shape[1] != self.n_source_tokens:
            raise ValueError(f"{x.shape[1]} source tokens, expected {self.n_source_tokens} "
                             f"(image tokens must number n_image_tokens={c.n_image_tokens})")
        if c.fusion == "tokens":   # side by side: the table's padding mask, every other token valid
            mask = torch.cat([m if m is not None else torch.ones(p.shape[:2], dtype=torch.bool, device=p.device)
                              for p, m in zip(parts, masks)], dim=1)
            return x, (None if bool(mask.all()) else mask)
        return self.token_mixer(x.transpose(1, 2)).transpose(1, 2), None
