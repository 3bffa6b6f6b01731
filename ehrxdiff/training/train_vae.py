"""Training the first-stage VAE on the cohort's own images (the paper uses Cheff's pretrained autoencoder, §II-C;
its weights are external, so the demo trains one and ``vae_weights`` loads Cheff's checkpoint instead).

The model and its objective are in :mod:`ehrxdiff.models.vae`; this is the loop, with the checkpoint/resume and
history utilities every loop shares (:mod:`ehrxdiff.training.loop`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ehrxdiff.models.vae import CHEFF_KL_WEIGHT, VAEObjective, evaluate_vae, images_of
from ehrxdiff.training.loop import append_history, latest_checkpoint, load_checkpoint, save_checkpoint, trim_history


def train_vae(vae: AutoencoderKL, train_loader, *, output_dir: str | Path, max_steps: int,
              learning_rate: float = 1e-4, kl_weight: float = CHEFF_KL_WEIGHT, reconstruction: str = "l1",
              image_keys: tuple[str, ...] = ("target_image",), valid_loader=None, validate_every: int = 200,
              checkpoint_every: int = 500, checkpoint_limit: int = 2, mixed_precision: str = "no",
              seed: int = 0, resume: bool = True, progress: bool = True) -> AutoencoderKL:
    """Train the VAE with accelerate on batches of images (tensors, or dicts read at ``image_keys``).

    Checkpoint/resume goes through the shared :mod:`ehrxdiff.training.loop` utilities; the loss log is
    ``output_dir/history.csv`` (columns step, split, loss, reconstruction, kl, psnr). The trained weights are
    written with ``save_pretrained`` to ``output_dir/vae`` and returned.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    objective = VAEObjective(vae, kl_weight=kl_weight, reconstruction=reconstruction)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=learning_rate)
    objective, optimizer, train_loader = accelerator.prepare(objective, optimizer, train_loader)
    step = 0
    if resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        step = int(load_checkpoint(accelerator, ckpt)["step"])
        if accelerator.is_main_process:   # one writer of history.csv: two processes rewriting it race
            trim_history(out / "history.csv", step)
        accelerator.wait_for_everyone()
    if len(train_loader) == 0:
        raise ValueError("VAE train_loader is empty")

    def images(batch):
        return torch.cat([images_of(batch, k) for k in image_keys])

    bar = tqdm(total=max_steps, initial=step, desc="VAE", disable=not progress or not accelerator.is_main_process)
    while step < max_steps:
        epoch_start = step % len(train_loader)
        loader = accelerator.skip_first_batches(train_loader, epoch_start) if epoch_start else train_loader
        for batch in loader:
            objective.train()
            with accelerator.autocast():
                terms = objective(images(batch))
            accelerator.backward(terms["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
            if accelerator.is_main_process:
                append_history(out / "history.csv", {"step": step, "split": "train", "loss": terms["loss"].item(),
                                                     "reconstruction": terms["reconstruction"].item(),
                                                     "kl": terms["kl"].item(), "psnr": float("nan")})
            if valid_loader is not None and (step % validate_every == 0 or step == max_steps):
                row = evaluate_vae(vae, valid_loader, image_keys=image_keys,
                                   kl_weight=kl_weight, reconstruction=reconstruction)
                if accelerator.is_main_process:
                    append_history(out / "history.csv", {"step": step, "split": "valid", **row})
            if step % checkpoint_every == 0 or step == max_steps:
                save_checkpoint(accelerator, out / "checkpoints", step, checkpoint_limit, {"stage": "vae"})
            if step >= max_steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.save_pretrained(out / "vae")
    return vae
