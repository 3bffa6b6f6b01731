"""Image input contract: the reference's loader (paper-reference §4) as one function.

EHRXDiff reads every CXR with PIL ``convert("RGB")`` → Resize → ToTensor → Normalize(0.5, 0.5), so the VAE and
the CLIP ViT both see a 3-channel tensor in [-1, 1] (no CLIP mean/std). Real-world files vary (8/16-bit, RGBA,
any aspect ratio): they are brought to 8-bit grey first, then to a square by resizing the whole image as the
reference does (it distorts the aspect ratio; the reference's preprocessing does the same, §4).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file named."""


def read_gray(path: str | Path) -> np.ndarray:
    """Read any PNG/JPEG as float32 grey in [0, 1] (16-bit and RGBA handled)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                hi = 65535.0 if arr.max() > 255 else 255.0
                return np.clip(arr / hi, 0, 1)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: file not found") from None
    except (OSError, SyntaxError) as e:  # PIL raises OSError for truncated / corrupt files
        raise ImageLoadError(f"{path}: unreadable image ({e})") from None


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
