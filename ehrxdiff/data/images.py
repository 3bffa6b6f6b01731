"""Image input contract: the reference's loader (paper-reference §4) as one function.

EHRXDiff reads every CXR with PIL ``convert("RGB")`` → Resize → ToTensor → Normalize(0.5, 0.5), so the VAE and
the CLIP ViT both see a 3-channel tensor in [-1, 1] (no CLIP mean/std). Real-world files vary; :func:`read_gray`
brings every PNG/JPEG (any format PIL decodes) to grey in [0, 1]:

- 8-bit grey/RGB/CMYK/palette: PIL's ``convert("L")`` (ITU-R 601 luma), divided by 255;
- 16-bit and 32-bit integer or float grey (``I;16*``, ``I``, ``F``): stretched by the image's own range,
  (x - min) / (max - min), so a 12-bit image stored in 16 bits is not nearly black; a constant image is 0;
- an alpha channel (RGBA, LA, transparent palette): composited onto black (transparent = no signal);
- any size and aspect ratio: resized as a whole to the square model size by :func:`to_model_tensor`, as the
  reference does (it distorts the aspect ratio; MIMIC-CXR's own non-square images go through the same path, so
  a model sees every cohort alike). Nothing is cropped or padded.

A file that cannot be used raises :class:`ImageLoadError` with ``reason`` "missing" or "unreadable" (empty,
truncated, corrupt or not an image), the file named in the message.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file named; ``reason`` is "missing" or "unreadable"."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


def read_gray(path: str | Path) -> np.ndarray:
    """Read any PNG/JPEG as float32 grey [H, W] in [0, 1] (module docstring for the conversions)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":   # 16/32-bit integer or float grey
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
            if im.mode == "P" or {"A", "a"} & set(im.getbands()):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: file not found", "missing") from None
    # PIL raises OSError for empty, truncated or corrupt files (UnidentifiedImageError is one)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: unreadable image ({e})", "unreadable") from None


def to_model_tensor(gray: np.ndarray, size: int) -> torch.Tensor:
    """Grey [H, W] in [0, 1] → [3, size, size] in [-1, 1] (bicubic resize, as the reference)."""
    im = Image.fromarray(np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Load a CXR as the model sees it: [3, size, size] float32 in [-1, 1]."""
    return to_model_tensor(read_gray(path), size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] (or [C, H, W]) in [-1, 1] → uint8 grey [B, H, W] (channel mean), for PNG/plots."""
    x = images if images.dim() == 4 else images.unsqueeze(0)
    g = ((x.float().clamp(-1, 1).mean(1) + 1) * 127.5).round()
    return g.to(torch.uint8).cpu().numpy()
