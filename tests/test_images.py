"""Real-world image files through read_gray / load_image (issue 7: 8/16-bit, grey/RGB/RGBA, any size, JPEG/PNG)."""
import io

import numpy as np
import pytest
from PIL import Image

from ehrxdiff.data.images import ImageLoadError, load_image, read_gray


def _save(tmp_path, name, im: Image.Image, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_16bit_png_is_stretched_by_its_range(tmp_path):
    arr = np.array([[1000, 2000], [3000, 4000]], np.uint16)     # 12-bit data: would be near black over 65535
    p = _save(tmp_path, "a.png", Image.fromarray(arr))
    assert Image.open(p).mode.startswith("I")
    np.testing.assert_allclose(read_gray(p), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    flat = _save(tmp_path, "flat.png", Image.fromarray(np.full((3, 5), 700, np.uint16)))
    assert read_gray(flat).shape == (3, 5) and read_gray(flat).max() == 0


def test_float_tiff_and_8bit_modes(tmp_path):
    f = _save(tmp_path, "f.tif", Image.fromarray(np.array([[-1.0, 1.0]], np.float32)))
    np.testing.assert_allclose(read_gray(f), [[0, 1]])
    grey = _save(tmp_path, "g.png", Image.fromarray(np.array([[0, 255]], np.uint8)))
    np.testing.assert_allclose(read_gray(grey), [[0, 1]])
    rgb = _save(tmp_path, "c.jpg", Image.new("RGB", (30, 10), (128, 128, 128)), quality=100)
    assert read_gray(rgb).shape == (10, 30) and abs(read_gray(rgb).mean() - 128 / 255) < 0.01


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 255     # opaque row keeps its value, transparent row is black
    p = _save(tmp_path, "a.png", Image.fromarray(rgba, mode="RGBA"))
    np.testing.assert_allclose(read_gray(p), [[200 / 255] * 2, [0, 0]], atol=1 / 255)
    la = _save(tmp_path, "la.png", Image.fromarray(rgba, mode="RGBA").convert("LA"))
    np.testing.assert_allclose(read_gray(la), read_gray(p), atol=1 / 255)
    pal = Image.fromarray(rgba, mode="RGBA").convert("P")
    assert read_gray(_save(tmp_path, "p.png", pal)).shape == (2, 2)


def test_any_aspect_ratio_becomes_the_model_square(tmp_path):
    p = _save(tmp_path, "wide.jpg", Image.new("L", (64, 16), 255))
    t = load_image(p, 32)
    assert t.shape == (3, 32, 32) and float(t.min()) > 0.9     # resized whole, nothing padded or cropped


def test_bad_files_raise_with_a_reason(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found") as e:
        read_gray(tmp_path / "nope.png")
    assert e.value.reason == "missing"
    (tmp_path / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 10).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])   # header fine, data truncated
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.png", "cut.jpg", "text.png"):
        with pytest.raises(ImageLoadError, match=f"{name}: unreadable image") as e:
            read_gray(tmp_path / name)
        assert e.value.reason == "unreadable"
