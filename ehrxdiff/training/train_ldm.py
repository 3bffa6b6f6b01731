"""Train EHRXDiff with accelerate (§III-A; paper-reference §7.4).

The reference trains UNet + CLIP towers + adaptor with AdamW at a constant 5e-5 and an effective batch of 128
(8 per GPU x 2 GPUs x 8 accumulation steps), fp32, with an EMA of the weights (decay 0.9999, LDM's warm-up
min(decay, (1+n)/(10+n)) - diffusers ``EMAModel``'s default warm-up is the same formula). This loop does the same
on whatever accelerate is given: CPU here, ``accelerate launch`` on several GPUs with no code change, bf16/fp16
autocast where the device has it. Gradient accumulation reaches ``effective_batch`` from the loader's batch size.

State (model, optimizer, EMA, RNGs) is checkpointed through :mod:`ehrxdiff.training.loop`, so an interrupted run resumes
from its newest checkpoint, skipping the batches of the current epoch it had already seen. The loss log
``history.csv`` (step, split, loss, ...) feeds the notebook's curves. At the end the weights are exported as an
:class:`~ehrxdiff.models.pipeline.EHRXDiffPipeline` folder: ``pipeline/`` holds the EMA weights (sampling default, D6),
``pipeline_raw/`` the raw ones when asked.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ehrxdiff.constants import EFFECTIVE_BATCH, EMA_DECAY, LDM_LR
from ehrxdiff.models.ldm import EHRXDiff
from ehrxdiff.models.pipeline import EHRXDiffPipeline
from ehrxdiff.training.cache import EVENT_KEYS, PREV_KEYS
from ehrxdiff.training.loop import append_history, latest_checkpoint, load_checkpoint, save_checkpoint, trim_history


def resolve_mixed_precision(mixed_precision: str) -> str:
    """``"auto"`` -> bf16 on a GPU that supports it, fp16 on other GPUs, no autocast on CPU (fp32, as the
    reference; bf16 autocast on this 2-core CPU was only 6 % faster per step, with the same validation loss after 135
    demo steps). ``"fp32"`` is accelerate's
    ``"no"`` (the config's name: YAML reads a bare ``no`` as False)."""
    if mixed_precision == "fp32":
        return "no"
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: EHRXDiff, loader, *, seed: int = 0, max_batches: int | None = None) -> float:
    """Eq. 2 (unweighted, whatever the training weighting) on ``loader`` with noise, timesteps and the target's VAE
    posterior draw from fixed seeds, so values are comparable across steps, between raw and EMA weights, between
    cached and per-step inputs, and between conditions (:func:`conditioning_sensitivity`). The global RNG is restored
    afterwards, so training is not perturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _validation_loss(model, loader, seed=seed, max_batches=max_batches)


def batch_size_of(batch: dict) -> int:
    """Rows of a batch of :func:`ehrxdiff.data.datasets.collate_pairs` or
    :func:`ehrxdiff.training.cache.collate_cached`."""
    return len(batch["pair_key"])


def _validation_loss(model: EHRXDiff, loader, *, seed: int, max_batches: int | None) -> float:
    was_training = model.training
    model.eval()
    device = next(model.unet.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = _to_device(batch, device)
        b = batch_size_of(batch)
        s = model.unet.config.sample_size
        shape = (b, model.vae.config.latent_channels, s, s)
        noise = torch.randn(shape, generator=gen).to(device)
        post = torch.randn(shape, generator=gen).to(device)   # the target's posterior draw, fixed too
        t = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
        total += model(batch, timesteps=t, noise=noise, posterior_noise=post, weighted=False).item() * b
        n += b
    model.train(was_training)
    if n == 0:
        raise ValueError("LDM validation loader is empty")
    return total / n


class _Swapped:
    """A loader whose batches carry another pair's condition: ``keys`` rolled by one within each batch."""

    def __init__(self, loader, keys: tuple[str, ...]):
        self.loader, self.keys = loader, keys

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.roll(1, 0) if k in self.keys and torch.is_tensor(v) else v for k, v in batch.items()}


def conditioning_sensitivity(model: EHRXDiff, loader, *, max_batches: int | None = None) -> dict[str, float]:
    """Does the model use I_prev, and S_event? Eq. 2 on ``loader`` with each pair's own condition, then with I_prev,
    or the events, of another pair of the batch - same noise, timesteps and target draws (:func:`validation_loss`'s
    fixed generator). A model that uses a condition predicts the noise worse when it is swapped; equal losses mean
    it ignores it, whatever its samples look like. Works on raw and cached batches (``cache.PREV_KEYS`` /
    ``cache.EVENT_KEYS``: the image or its encodings, the events or their tokens)."""
    out = {"own condition": validation_loss(model, loader, max_batches=max_batches),
           "I_prev swapped": validation_loss(model, _Swapped(loader, PREV_KEYS), max_batches=max_batches),
           "S_event swapped": validation_loss(model, _Swapped(loader, EVENT_KEYS), max_batches=max_batches)}
    return out


def train_ldm(model: EHRXDiff, train_loader, *, output_dir: str | Path, max_steps: int, valid_loader=None,
              learning_rate: float = LDM_LR, effective_batch: int = EFFECTIVE_BATCH, weight_decay: float = 0.01,
              mixed_precision: str = "auto", ema_decay: float = EMA_DECAY, ema_scope: str = "all",
              validate_every: int = 200, max_val_batches: int | None = None, checkpoint_every: int = 500,
              checkpoint_limit: int = 2, seed: int = 23, resume: bool = True, image_size: int,
              max_events: int, event_guidance_scale: float = 1.0, guidance_reference: str = "null_set",
              export_raw: bool = False,
              max_grad_norm: float | None = None, progress: bool = True) -> dict:
    """Train for ``max_steps`` optimizer steps; returns a summary (steps, final losses, samples/s, paths).
    ``steps_this_run``, ``seconds`` and ``samples_per_second`` count this call only (a resumed run's earlier
    steps are not timed; a reloaded finished run reports NaN).

    ``train_loader`` yields batches of :func:`ehrxdiff.data.datasets.collate_pairs`. ``effective_batch`` = loader
    batch x processes x accumulation; the accumulation is derived (at least 1). ``ema_scope="all"`` averages every
    trainable weight (UNet, adaptor, CLIP towers), so the exported EMA pipeline is one consistent model;
    ``"unet"`` is the reference's LitEma over the UNet only. ``seed`` 23 is the reference's ``seed_everything``.
    ``event_guidance_scale`` is recorded in the exported pipelines as the default s of their ``__call__``, and
    ``guidance_reference`` as the no-event branch of that guidance (the condition event dropout trained).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = out / "history.csv"
    set_seed(seed)
    batch_size = train_loader.batch_size or 1
    # cpu=True on a machine without CUDA: accelerate then takes `accelerate launch`'s processes as one gloo group
    # (MULTI_CPU); without it, each CPU process would train alone on the whole data
    cpu = not torch.cuda.is_available()
    accum = max(1, math.ceil(effective_batch / (batch_size * PartialState(cpu=cpu).num_processes)))
    # a seedable sampler: each epoch's shuffle is a function of (seed, epoch), not of the global RNG at the epoch's
    # start, so a run resumed mid-epoch replays the same order (skip_first_batches) and draws as an unbroken run
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=cpu,
                              gradient_accumulation_steps=accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    params = [p for m in model.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    # foreach: one fused update for all tensors; the per-tensor loop costs thousands of tiny kernels per step on a GPU
    ema = EMAModel(list(model.ema_parameters(ema_scope)), decay=ema_decay, foreach=True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    unwrapped: EHRXDiff = accelerator.unwrap_model(model)

    step, seen, epoch = 0, 0, 0  # optimizer steps done; batches of the current epoch already consumed; epoch
    if resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        state = load_checkpoint(accelerator, ckpt)
        step, seen, epoch = int(state["step"]), int(state.get("batch_in_epoch", 0)), int(state.get("epoch", 0))
        ema.to(accelerator.device)  # EMAModel.load_state_dict leaves its shadow weights on the CPU
        if accelerator.is_main_process:   # one writer of history.csv: two processes rewriting it race
            trim_history(history, step)
        accelerator.wait_for_everyone()
    start_step = step
    if len(train_loader) == 0:
        raise ValueError("LDM train_loader is empty")
    batches_per_epoch = len(train_loader)

    bar = tqdm(total=max_steps, initial=step, desc="LDM", disable=not progress or not accelerator.is_main_process)
    samples, t0, last, last_valid = 0, time.perf_counter(), {}, None
    while step < max_steps:
        loader = accelerator.skip_first_batches(train_loader, seen) if seen else train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)   # the shuffle of this epoch (a skipping loader counts its own epochs from 0)
        if hasattr(getattr(train_loader, "dataset", None), "set_epoch"):
            train_loader.dataset.set_epoch(epoch)   # per-epoch draws of the dataset (cache.CachedPairs' null targets)
        running = []
        for batch in loader:
            seen += 1
            model.train()
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running.append(loss.detach().float().item())
            samples += batch_size_of(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            ema.step(unwrapped.ema_parameters(ema_scope))
            step += 1
            # the step's loss and null share over all processes (a collective: every process calls it)
            here = [sum(running) / len(running), float(batch["is_null"].float().mean())]
            mean = accelerator.reduce(torch.tensor(here, dtype=torch.float64, device=accelerator.device),
                                      "mean").tolist()
            last = {"step": step, "split": "train", "loss": mean[0], "null_fraction": mean[1],
                    "ema_decay": ema.cur_decay_value}
            running = []
            if accelerator.is_main_process:
                append_history(history, last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if valid_loader is not None and (step % validate_every == 0 or step == max_steps):
                row = {"step": step, "split": "valid",
                       "loss": validation_loss(unwrapped, valid_loader, max_batches=max_val_batches)}
                with ema_weights(ema, unwrapped, ema_scope):
                    row["loss_ema"] = validation_loss(unwrapped, valid_loader, max_batches=max_val_batches)
                if accelerator.is_main_process:
                    append_history(history, row)
                last_valid = row
            if step % checkpoint_every == 0 or step == max_steps:
                save_checkpoint(accelerator, out / "checkpoints", step, checkpoint_limit,
                                {"stage": "ldm", "batch_in_epoch": seen % batches_per_epoch,
                                 "epoch": epoch + seen // batches_per_epoch})
            if step >= max_steps:
                break
        else:
            seen = 0  # epoch finished
            epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    paths = {}
    if accelerator.is_main_process:
        if export_raw:
            paths["pipeline_raw"] = _export(EHRXDiffPipeline, unwrapped, out / "pipeline_raw", image_size, max_events,
                                            event_guidance_scale, guidance_reference)
        with ema_weights(ema, unwrapped, ema_scope):
            paths["pipeline"] = _export(EHRXDiffPipeline, unwrapped, out / "pipeline", image_size, max_events,
                                        event_guidance_scale, guidance_reference)
    trained = step - start_step  # 0 when a finished run was reloaded: no time or speed to report
    return {"steps": step, "steps_this_run": trained, "gradient_accumulation": accum,
            "samples_seen": step * batch_size * accelerator.num_processes * accum, "train_loss": last.get("loss"),
            "valid": last_valid, "seconds": seconds if trained else float("nan"),
            "samples_per_second": samples / seconds if trained and seconds > 0 else float("nan"), **paths}


def _export(pipeline_cls, model: EHRXDiff, path: Path, image_size: int, max_events: int,
            event_guidance_scale: float, guidance_reference: str) -> Path:
    pipe = pipeline_cls.from_model(model, sampler="ddim", image_size=image_size, max_events=max_events,
                                   event_guidance_scale=event_guidance_scale, guidance_reference=guidance_reference)
    pipe.save_pretrained(path)
    return path


class ema_weights:  # noqa: N801 - used as a context manager, like diffusers' ema_scope
    """Temporarily load the EMA weights into the model (restored on exit)."""

    def __init__(self, ema: EMAModel, model: EHRXDiff, scope: str):
        self.ema, self.params = ema, list(model.ema_parameters(scope))

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        return self

    def __exit__(self, *exc):
        self.ema.restore(self.params)
        return False
