"""A radiograph-like renderer: anatomy from the patient, findings from the latent state, nuisance from the study.

Brightness stands for attenuation as on a real film: aerated lung is dark, soft tissue grey, bone white.
Every finding is drawn where a radiologist would look for it, graded by its severity, so that a classifier
can learn it and a diffusion model has something real to predict:

- pleural effusion: fluid fills the costophrenic angles upward with a meniscus (lower zones brighten);
- enlarged cardiac silhouette: the heart widens; pulmonary edema: perihilar "butterfly" haze;
- vascular congestion: upper-zone vessel markings; enlarged hilum: hilar densities grow;
- consolidation: a dense lobar patch at the admission's affected lobe; pneumonia: patchy haze around it;
- lung opacity: the union of the above; pneumothorax: a lucent apical-lateral rim without lung markings;
- mediastinal widening: the upper mediastinum widens (age-related aortic unfolding).
Devices are thin bright lines. Sex and age shape the anatomy (thorax width, breast shadows, bone density,
heart and aorta) so that age and sex are learnable as in the paper's Table III. Acquisition nuisance
(rotation, scale, shift, exposure, noise, AP magnification) differs between studies — the misalignment
that makes "predict the next image" harder than pixel copying.

The balance between the two is what makes a previous film informative. Measured on 150 patients x 2 films
(no findings, 64 px, correlation of the deviations from the mean image): 0.07 when patients differed only by
+-4 % width and a little heart and lung geometry and the nuisance was larger (rotation SD 2.5 deg, shift 3 %,
exposure +-15 %) - the population's average film then predicted the next film better than the previous one did;
0.61 with the per-patient habitus below and the nuisance halved (0.84 without any geometric nuisance).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ehrxdiff.constants import IMAGENOME_LABELS


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c)  # u: left→right of the image, v: top→bottom


def _ellipse(u, v, cx, cy, a, b, sharp=12.0):
    r = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2
    return 1.0 / (1.0 + np.exp(np.clip(sharp * (r - 1.0), -30, 30)))


def _gauss(u, v, cx, cy, sx, sy):
    return np.exp(-(((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2))


def _polyline(u, v, pts, width):
    """Soft mask of a polyline (min distance to its segments)."""
    d2 = np.full(u.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        d2 = np.minimum(d2, (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2)
    return np.exp(-d2 / width ** 2)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return up / 127.5 - 1.0


def patient_anatomy(rng: np.random.Generator, sex: str, age: float, size: int) -> dict:
    """Fixed per patient, in a canonical (un-posed) frame: geometry, textures and the static layers
    (body, lungs, ribs, clavicles, spine, breasts) that every one of the patient's films shares."""
    male = sex == "M"
    a = {
        "width": (1.0 if male else 0.93) * rng.uniform(0.86, 1.12),
        "lung_h": rng.uniform(0.45, 0.62), "heart_x": rng.uniform(0.02, 0.14),
        "bone": float(np.clip(1.15 - 0.009 * (age - 20) + (0.08 if male else 0.0), 0.35, 1.2)),
        "female": not male, "age": age,
        "lobe": (float(rng.choice([-0.36, 0.36])), float(rng.uniform(0.05, 0.3))),
        "ptx_side": float(rng.choice([-1.0, 1.0])),
        "vessels": smooth_noise(rng, size, 24), "patchy": smooth_noise(rng, size, 12),
        # Habitus: soft-tissue density, a right hemidiaphragm higher than the left by a patient-specific amount,
        # the lungs' vertical position, heart size at rest and coarse density (old scars, chest-wall shape).
        "tissue": rng.uniform(0.38, 0.56), "right_dome": rng.uniform(0.0, 0.08), "lung_y": rng.uniform(-0.13, -0.03),
        "heart": rng.uniform(0.9, 1.1), "coarse": smooth_noise(rng, size, 5),
    }
    u, v = _grid(size)
    w, lh, bone = a["width"], a["lung_h"], a["bone"]
    body = _ellipse(u, v, 0, 0.12, 0.9 * w, 1.1, 8)
    # per lung (patient's right = image left first): vertical centre and half-height; apices level, domes not
    a["lung_cy"] = [a["lung_y"] - a["right_dome"] / 2, a["lung_y"]]
    a["lung_hh"] = [lh - a["right_dome"] / 2, lh]
    lungs = [_ellipse(u, v, side * 0.37 * w, cy, 0.27 * w, hh, 10) * (v > -0.8)
             for side, cy, hh in zip((-1, 1), a["lung_cy"], a["lung_hh"])]
    base = 0.06 + a["tissue"] * body + 0.05 * a["coarse"] * body
    base += 0.12 * bone * (np.abs(u) < 0.045) * (0.75 + 0.25 * np.cos(v * 45))
    ribs = np.clip(np.cos(2 * np.pi * 7 * (v + 0.35 * u ** 2)), 0, 1) ** 4
    base += 0.09 * bone * ribs * body * (np.abs(u) < 0.85 * w) * (v < 0.55)
    for side in (-1, 1):
        base += 0.22 * bone * _polyline(u, v, [(side * 0.06, -0.74), (side * 0.58 * w, -0.82)], 0.03)
    if a["female"]:
        base += 0.07 * (_gauss(u, v, -0.42 * w, 0.42, 0.22, 0.18) + _gauss(u, v, 0.42 * w, 0.42, 0.22, 0.18))
    a.update(u=u, v=v, lungs=lungs, lung=np.maximum(*lungs), base=base.astype(np.float32),
             upper=np.clip(-v + 0.1, 0, 1), bfly=_gauss(u, v, -0.2 * w, 0.0, 0.2, 0.3) + _gauss(u, v, 0.2 * w, 0.0, 0.2, 0.3),
             haze=_gauss(u, v, a["lobe"][0] * w, a["lobe"][1], 0.28, 0.35) * np.clip(0.6 + a["patchy"], 0, 1.6))
    return a


DEVICE_PATHS = {  # canonical-frame polylines, scaled by thorax width where lateral
    "endotracheal_tube": lambda w: [(0.0, -1.1), (0.0, -0.42)],
    "ng_tube": lambda w: [(0.02, -1.1), (0.03, 0.1), (0.25, 0.7)],
    "central_line": lambda w: [(-0.6 * w, -0.78), (-0.15, -0.62), (-0.06, -0.25)],
    "chest_tube": lambda w: [(-0.98 * w, 0.4), (-0.62 * w, 0.25), (-0.48 * w, -0.35)],
}


def render_frontal(sev: dict, devices: dict, anat: dict, pose: dict, size: int,
                   rng: np.random.Generator) -> np.ndarray:
    """A frontal (PA/AP) image as float32 grey [size, size] in [0, 1]."""
    assert set(sev) == set(IMAGENOME_LABELS)
    u, v, w, lh = anat["u"], anat["v"], anat["width"], anat["lung_h"]
    lungs, lung, texture = anat["lungs"], anat["lung"], anat["vessels"]
    d = anat["base"] - lung * (0.34 - 0.03 * texture * (1 + 2.5 * sev["vascular congestion"] * anat["upper"]))
    # Effusion: fluid from the costophrenic angle upward, meniscus higher laterally; patient's right worse.
    for i, (side, lm, k) in enumerate(((-1, lungs[0], 1.0), (1, lungs[1], 0.75))):
        h = 0.75 * lh * sev["pleural effusion"] * k
        if h > 0.005:
            lateral = np.abs(u - side * 0.37 * w) / (0.27 * w)
            level = (anat["lung_cy"][i] + anat["lung_hh"][i]) - 2 * h + 0.25 * h * lateral * (u * side > 0.37 * w)
            d = d + 0.3 * lm / (1 + np.exp(np.clip(-(v - level) * 40, -30, 30)))
    # Edema: perihilar butterfly haze. Consolidation: dense lobar patch; pneumonia: patchy haze around it.
    d = d + 0.25 * sev["pulmonary edema/hazy opacity"] * anat["bfly"] * lung
    if sev["consolidation"] > 0.01:
        lx, ly = anat["lobe"]
        c = sev["consolidation"]
        d = d + 0.32 * c * _ellipse(u, v, lx * w, ly, 0.1 + 0.08 * c, 0.1 + 0.1 * c, 6) * lung
    d = d + 0.16 * sev["pneumonia"] * anat["haze"] * lung
    # Heart (magnified on AP), hila, mediastinum.
    cs = sev["enlarged cardiac silhouette"]
    hw = (0.2 + 0.2 * cs) * w * anat["heart"] * (1.08 if pose["ap"] else 1.0)
    d = d + 0.22 * _ellipse(u, v, anat["heart_x"], 0.3, hw, 0.24 + 0.05 * cs, 9)
    hs = 0.05 + 0.05 * sev["enlarged hilum"]
    d = d + (0.12 + 0.2 * sev["enlarged hilum"]) * (_gauss(u, v, -0.17 * w, -0.1, hs, hs * 1.4)
                                                    + _gauss(u, v, 0.17 * w, -0.1, hs, hs * 1.4))
    d = d + 0.14 * _ellipse(u, v, 0.0, -0.35, 0.07 + 0.12 * sev["mediastinal widening"], 0.55, 6)
    # Pneumothorax: lucent apical-lateral rim of one lung with a visible pleural line.
    px = sev["pneumothorax"]
    if px > 0.01:
        s = anat["ptx_side"]
        i = 0 if s < 0 else 1
        lm, cy, hh = lungs[i], anat["lung_cy"][i], anat["lung_hh"][i]
        edge = np.abs(u - s * 0.37 * w) / (0.27 * w) + 0.6 * np.clip(-(v + 0.1), 0, 1)
        rim = lm * (edge > 1.0 - 0.6 * px)
        d = d - 0.06 * rim - 0.03 * texture * rim
        inner = 0.27 * w * (1 - 0.55 * px)
        d = d + 0.05 * lm * _ellipse(u, v, s * 0.37 * w, cy, inner, hh, 60) * (
            1 - _ellipse(u, v, s * 0.37 * w, cy, inner - 0.02, hh - 0.02, 60))
    for name, path in DEVICE_PATHS.items():
        if devices.get(name):
            d = d + 0.35 * _polyline(u, v, path(w), 0.014)
    return _expose(_pose(np.clip(d, 0, 1), pose, size), pose, rng)


def _pose(img: np.ndarray, pose: dict, size: int) -> np.ndarray:
    """Acquisition geometry as one affine warp of the canonical image (rotation, scale, shift, AP magnification)."""
    th = np.deg2rad(pose["rotation"])
    sc = pose["scale"] * (1.06 if pose["ap"] else 1.0)
    c, s, half = np.cos(th), np.sin(th), size / 2.0
    # output pixel (x, y) samples input at R^-1 ((x, y) - centre - shift) / scale + centre
    a, b = c / sc, s / sc
    d_, e = -s / sc, c / sc
    tx, ty = half + pose["shift_x"] * half, half + pose["shift_y"] * half
    coeffs = (a, b, half - a * tx - b * ty, d_, e, half - d_ * tx - e * ty)
    im = Image.fromarray(img.astype(np.float32), mode="F")
    return np.asarray(im.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0.06),
                      dtype=np.float32)


def _expose(img: np.ndarray, pose: dict, rng: np.random.Generator) -> np.ndarray:
    """Exposure (gamma, gain, offset) and quantum noise."""
    img = np.clip(img, 0, 1) ** pose["gamma"] * pose["gain"] + pose["offset"]
    img += rng.normal(0, pose["noise"], img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def render_lateral(anat: dict, pose: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """A lateral view (the cohort drops it; it exists so the frontal-only rule has something to drop)."""
    u, v = _grid(size)
    d = 0.06 + 0.45 * _ellipse(u, v, 0, 0.1, 0.75, 1.1, 8)
    d -= 0.3 * _ellipse(u, v, -0.05, -0.1, 0.45, 0.55, 10)
    d += 0.3 * _ellipse(u, v, -0.25, 0.3, 0.3, 0.25, 9)
    d += 0.3 * anat["bone"] * (np.abs(u - 0.55) < 0.07) * (0.8 + 0.2 * np.cos(v * 40))
    return _expose(_pose(np.clip(d, 0, 1), pose, size), pose, rng)


def random_pose(rng: np.random.Generator, ap: bool) -> dict:
    """Acquisition nuisance between studies; portable AP films are noisier and less well aligned."""
    k = 1.6 if ap else 1.0
    return {
        "ap": ap, "rotation": float(rng.normal(0, 1.5 * k)), "scale": float(rng.uniform(0.97, 1.03)),
        "shift_x": float(rng.normal(0, 0.02 * k)), "shift_y": float(rng.normal(0, 0.02 * k)),
        "gamma": float(rng.uniform(0.92, 1.08)), "gain": float(rng.uniform(0.95, 1.03)),
        "offset": float(rng.uniform(0.0, 0.03)), "noise": float(rng.uniform(0.006, 0.015) * k),
    }
