"""The study's own image evaluators (decision D9; paper-reference §10.2, §10.5-10.7, §12).

The paper scores images with a DINO ViT pathology classifier, the Riken age model, an XRV DenseNet-121
sex classifier and XRV DenseNet-121 features for FID; none of those weights is reachable offline.
So, as D9 decides, we train one evaluator on the study's own train split:

* backbone: torchxrayvision's DenseNet (``xrv.models.DenseNet(weights=None, ...)``), DenseNet-121 by
  default (growth 32, blocks 6/12/24/16, 64 initial features → 1024-d norm5), or a narrower variant for
  the CPU demo (same code, smaller ``growth_rate``/``block_config``; its feature width is printed in
  every result row);
* three heads on one shared backbone (multi-task, one forward pass per image): the 10 Chest ImaGenome
  labels (the DenseNet's own ``classifier``), sex (Linear → P(female)) and age (Linear → years). The
  reference uses separate networks; sharing the backbone is cheaper and keeps one evaluator per study;
* FID features = ``model.features(x)`` (pre-ReLU norm5) → global average pool, exactly the reference's
  XRV feature (§10.7); 1024-d for DenseNet-121;
* input: torchxrayvision's contract — 1 channel in [-1024, 1024], centre-cropped to a square, resized
  to ``input_size`` (§10.6). Our images are [-1, 1] = 2·p/255 − 1, and XRV's ``normalize(p, 255)`` is
  (2·p/255 − 1)·1024, so the map is ×1024 after the channel mean; resize is bilinear with
  anti-aliasing, the torch equivalent of ``XRayResizer`` (skimage resize, anti-aliased downsampling).

When the user has the real weights: ``init_weights`` (an XRV DenseNet-121 file, e.g.
``densenet121-res224-all``) initialises the backbone; :class:`XRVFeatureExtractor` gives the paper's
exact FID features; :class:`RikenAgeModel` gives the paper's age model. Files are only ever read from
the local path given — nothing downloads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.images import load_image
from ehrxdiff.evaluation.metrics import age_pearson, macro_auroc, sex_auroc
from ehrxdiff.training.loop import (append_history, cosine_with_warmup, latest_checkpoint, load_checkpoint,
                                    save_checkpoint)

XRV_RANGE = 1024.0          # torchxrayvision input range [-1024, 1024] [X utils.normalize]
DENSENET121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
DEMO_DENSENET = dict(growth_rate=12, block_config=(3, 6, 12, 8), num_init_features=24)
"""CPU demo variant: 0.33 M parameters, 193-d norm5 features; ~25 s per 5k images per epoch at 64 px on
2 cores (DenseNet-121: ~10 min), which fits the demo's ~5 min evaluation budget."""


def to_xrv_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] → [B, 1, size, size] in [-1024, 1024] (XRV preprocessing, §10.6).

    Channel mean (XRV averages colour channels), ×1024, centre crop of the long side
    (``XRayCenterCrop``), bilinear anti-aliased resize (``XRayResizer``).
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W]; got shape {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True) * XRV_RANGE
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _read_state_dict(path: str | Path) -> dict:
    """A weights file as a state dict: safetensors, a torch state dict, or XRV's pickled whole model.

    XRV ships its DenseNet weights as a pickled ``nn.Module`` (``torch.load(weights_only=False)`` in
    XRV itself), so such a file is unpickled here too: only load files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj["state_dict"]
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{path}: not a state dict or model (got {type(obj).__name__})")


def load_xrv_backbone(backbone: xrv.models.DenseNet, path: str | Path) -> None:
    """Copy the convolutional ``features.*`` weights of an XRV DenseNet file into ``backbone``.

    The XRV classifier (18 targets) is not copied: our heads are trained on the study's labels.
    """
    sd = {k: v for k, v in _read_state_dict(path).items() if k.startswith("features.")}
    if not sd:
        raise ValueError(f"{path}: no 'features.*' weights; is this an XRV DenseNet file?")
    own = backbone.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k.startswith("features.") and k not in sd]
    if bad or missing:
        raise ValueError(f"{path}: does not fit this DenseNet (unexpected/mismatched {bad[:3]}, "
                         f"missing {missing[:3]}); XRV weights need the DenseNet-121 shape")
    backbone.load_state_dict(sd, strict=False)


def _pool(features: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(features, 1).flatten(1)


class CXREvaluator(nn.Module):
    """XRV DenseNet backbone + pathology / sex / age heads (module docstring; D9).

    ``forward(images [B, C, H, W] in [-1, 1])`` → dict with ``pathology`` logits [B, L], ``sex`` logit
    [B] (female = 1), ``age`` in years [B], ``features`` [B, F] (pooled pre-ReLU norm5, for FID).
    """

    def __init__(self, *, labels=IMAGENOME_LABELS, input_size: int = 224, growth_rate: int = 32,
                 block_config=(6, 12, 24, 16), num_init_features: int = 64, drop_rate: float = 0.0,
                 name: str = "densenet121", init_weights: str | Path | None = None):
        super().__init__()
        self.labels = tuple(labels)
        self.input_size = int(input_size)
        self.backbone = xrv.models.DenseNet(weights=None, growth_rate=growth_rate,
                                            block_config=tuple(block_config),
                                            num_init_features=num_init_features, drop_rate=drop_rate,
                                            num_classes=len(self.labels), in_channels=1)
        width = self.backbone.classifier.in_features
        self.sex_head = nn.Linear(width, 1)
        self.age_head = nn.Linear(width, 1)
        # age is regressed standardised; the train set's mean/std travel with the weights
        self.register_buffer("age_mean", torch.tensor(60.0))
        self.register_buffer("age_std", torch.tensor(15.0))
        if init_weights is not None:
            load_xrv_backbone(self.backbone, init_weights)
        self.config = dict(labels=list(self.labels), input_size=self.input_size, growth_rate=growth_rate,
                           block_config=list(block_config), num_init_features=num_init_features,
                           drop_rate=drop_rate, name=name,
                           init_weights=None if init_weights is None else Path(init_weights).name)

    @property
    def feature_dim(self) -> int:
        return self.backbone.classifier.in_features

    @property
    def evaluator_id(self) -> str:
        """Names the evaluator in every result row (D9): architecture, input size, initialisation."""
        init = f"+{self.config['init_weights']}" if self.config["init_weights"] else ""
        return f"{self.config['name']}@{self.input_size}px{init}"

    @property
    def feature_id(self) -> str:
        return f"{self.evaluator_id}:norm5-avgpool-{self.feature_dim}d"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.features(to_xrv_input(images, self.input_size))
        h = _pool(F.relu(feats))                 # XRV's features2: ReLU then pool, feeds the heads
        return {"pathology": self.backbone.classifier(h),
                "sex": self.sex_head(h).squeeze(1),
                "age": self.age_head(h).squeeze(1) * self.age_std + self.age_mean,
                "features": _pool(feats)}        # pre-ReLU pooled: the reference's FID feature

    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CXREvaluator":
        d = Path(directory)
        for f in ("config.json", "model.safetensors"):
            if not (d / f).is_file():
                raise FileNotFoundError(f"evaluator directory {d}: missing {f}")
        cfg = json.loads((d / "config.json").read_text())
        init = cfg.pop("init_weights", None)
        model = cls(**cfg)
        model.config["init_weights"] = init      # provenance only; the weights come from the file
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model.eval()


class XRVFeatureExtractor(nn.Module):
    """The paper's FID feature: XRV DenseNet-121 (local weights file) norm5 → avg-pool, 1024-d (§10.7)."""

    def __init__(self, weights_path: str | Path, input_size: int = 224):
        super().__init__()
        self.backbone = xrv.models.DenseNet(weights=None)
        load_xrv_backbone(self.backbone, weights_path)
        self.input_size = input_size
        self.feature_id = f"xrv-densenet121:{Path(weights_path).name}:norm5-avgpool-1024d"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pool(self.backbone.features(to_xrv_input(images, self.input_size)))


class RikenAgeModel(nn.Module):
    """The paper's age model (Ieki et al. 2022) from a local TorchScript file (§10.5).

    Same steps as ``xrv.baseline_models.riken.AgeModel.forward`` without its download: grey repeated
    to 3 channels, resized to 320², [-1024, 1024] → [0, 1], ImageNet normalisation.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Riken age model file not found: {weights_path}")
        try:
            self.model = torch.jit.load(str(weights_path), map_location="cpu")
        except (RuntimeError, ValueError) as e:   # a state dict, a pickled module or another file
            raise ValueError(f"age_model_weights {weights_path}: not a TorchScript archive (the Riken age model "
                             f"ships as one, loaded with torch.jit.load): {str(e).splitlines()[0]}") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.model_id = f"riken-age:{Path(weights_path).name}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (to_xrv_input(images, 320) + XRV_RANGE) / (2 * XRV_RANGE)
        return self.model((x.repeat(1, 3, 1, 1) - self.mean) / self.std).reshape(-1)


@dataclass
class ImageScores:
    """Evaluator outputs for a set of images, with the provenance every result row must carry (D9)."""
    table: pd.DataFrame          # index = image key; one P(label) column per label, p_female, age_pred
    features: np.ndarray         # [N, F] FID features, rows in ``table`` order
    evaluator: str
    feature_extractor: str
    age_model: str


@torch.no_grad()
def score_images(model: CXREvaluator, batches, *, feature_extractor: XRVFeatureExtractor | None = None,
                 age_model: RikenAgeModel | None = None, device: str = "cpu") -> ImageScores:
    """Run the evaluator over ``batches`` of ``{"key": list[str], "image": [B, C, H, W] in [-1, 1]}``.

    FID features come from ``feature_extractor`` when given (the paper's XRV features), else from the
    evaluator's own backbone; age from ``age_model`` when given, else from the evaluator's age head.
    """
    model.eval().to(device)
    for extra in (feature_extractor, age_model):
        if extra is not None:
            extra.eval().to(device)
    keys, probs, sex, age, feats = [], [], [], [], []
    for batch in batches:
        x = batch["image"].to(device)
        out = model(x)
        keys += list(batch["key"])
        probs.append(torch.sigmoid(out["pathology"]).cpu())
        sex.append(torch.sigmoid(out["sex"]).cpu())
        age.append((age_model(x) if age_model is not None else out["age"]).cpu())
        feats.append((feature_extractor(x) if feature_extractor is not None else out["features"]).cpu())
    table = pd.DataFrame(torch.cat(probs).numpy(), index=pd.Index(keys, name="key"), columns=list(model.labels))
    table["p_female"] = torch.cat(sex).numpy()
    table["age_pred"] = torch.cat(age).numpy()
    return ImageScores(table=table, features=torch.cat(feats).numpy(), evaluator=model.evaluator_id,
                       feature_extractor=(feature_extractor.feature_id if feature_extractor is not None
                                          else model.feature_id),
                       age_model=age_model.model_id if age_model is not None else model.evaluator_id)


# --- data and training ---------------------------------------------------------------------------

class EvaluatorImages(torch.utils.data.Dataset):
    """Images with optional targets, for training the evaluator or scoring any image set.

    ``table`` needs ``key_col`` and ``path_col`` (relative to ``image_root``); label columns (0/1/NaN,
    NaN = not mentioned, masked in the loss), ``sex`` (1 = female, NaN unknown) and ``age`` (years) are
    used when present. Decoded images are kept as uint8 at ``image_size`` (5k images at 64 px: 20 MB).
    ``augment`` = the reference sex classifier's optional RandomAffine(10°, translate 0.1, scale 0.9-1.1).
    """

    def __init__(self, table: pd.DataFrame, image_root: str | Path, *, image_size: int,
                 labels=IMAGENOME_LABELS, key_col: str = "dicom_id", path_col: str = "path",
                 augment: bool = False):
        for col in (key_col, path_col):
            if col not in table.columns:
                raise ValueError(f"evaluator image table: missing column {col!r}; found {list(table.columns)}")
        self.keys = table[key_col].astype(str).tolist()
        self.paths = table[path_col].astype(str).tolist()
        nan = np.full(len(table), np.nan, dtype=np.float32)
        self.targets = np.stack([table[c].to_numpy(np.float32) if c in table else nan for c in labels], 1) \
            if len(table) else np.zeros((0, len(labels)), np.float32)
        self.sex = table["sex"].to_numpy(np.float32) if "sex" in table else nan
        self.age = table["age"].to_numpy(np.float32) if "age" in table else nan
        for name, v in [*zip(labels, self.targets.T), ("sex", self.sex)]:
            bad = ~(np.isnan(v) | (v == 0) | (v == 1))
            if bad.any():
                raise ValueError(f"evaluator image table: column {name!r} must be 0/1/NaN (sex: 1 = female); "
                                 f"{int(bad.sum())} value(s) are not, e.g. {v[bad][0]}")
        self.root, self.size = Path(image_root), image_size
        self._cache: dict[int, torch.Tensor] = {}
        self.augment = None
        if augment:
            from torchvision.transforms import v2  # heavy (torchvision), only for the evaluator's augmentations
            self.augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-1.0)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            img = load_image(self.root / self.paths[i], self.size)[:1]
            self._cache[i] = ((img + 1) * 127.5).round().to(torch.uint8)
        x = self._cache[i].float() / 127.5 - 1
        if self.augment is not None:
            x = self.augment(x)
        return {"key": self.keys[i], "image": x, "labels": torch.from_numpy(self.targets[i]),
                "sex": torch.tensor(self.sex[i]), "age": torch.tensor(self.age[i])}


def evaluator_loss(model: CXREvaluator, out: dict, batch: dict, weights=(1.0, 0.5, 0.5)) -> torch.Tensor:
    """Masked multi-task loss: BCE over mentioned labels + BCE on sex + MSE on standardised age.

    NaN targets (label not mentioned, sex/age unknown) are masked, never read as negatives.
    """
    total = out["pathology"].new_zeros(())
    for w, logit, y, kind in ((weights[0], out["pathology"], batch["labels"], "bce"),
                              (weights[1], out["sex"], batch["sex"], "bce"),
                              (weights[2], out["age"], batch["age"], "mse")):
        m = ~torch.isnan(y)
        if w == 0 or not m.any():
            continue
        if kind == "bce":
            total = total + w * F.binary_cross_entropy_with_logits(logit[m], y[m])
        else:
            total = total + w * F.mse_loss((logit[m] - model.age_mean) / model.age_std,
                                           (y[m] - model.age_mean) / model.age_std)
    return total


def validation_metrics(model: CXREvaluator, loader) -> dict:
    """Macro AUROC over labels with both classes (the reference selects on validation AUROC, §10.2),
    sex AUROC and age Pearson r on a labelled loader."""
    probs, ys, sex_p, sex_y, age_p, age_y = [], [], [], [], [], []
    model.eval()
    with torch.no_grad():
        for b in loader:
            out = model(b["image"])
            probs.append(torch.sigmoid(out["pathology"])); ys.append(b["labels"])
            sex_p.append(torch.sigmoid(out["sex"])); sex_y.append(b["sex"])
            age_p.append(out["age"]); age_y.append(b["age"])
    P, Y = torch.cat(probs).numpy(), torch.cat(ys).numpy()
    res = {"val_macro_auroc": macro_auroc(P, Y)}
    sy, sp = torch.cat(sex_y).numpy(), torch.cat(sex_p).numpy()
    ok = ~np.isnan(sy)
    res["val_sex_auroc"] = sex_auroc(sy[ok], sp[ok]) if np.unique(sy[ok]).size == 2 else float("nan")
    ay, ap = torch.cat(age_y).numpy(), torch.cat(age_p).numpy()
    ok = ~np.isnan(ay)
    res["val_age_r"] = age_pearson(ay[ok], ap[ok]) if ok.sum() > 2 else float("nan")
    return res


def train_evaluator(model: CXREvaluator, train_set: EvaluatorImages, valid_set: EvaluatorImages | None,
                    *, output_dir: str | Path, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                    weight_decay: float = 0.01, warmup_steps: int = 20, loss_weights=(1.0, 0.5, 0.5),
                    checkpoint_limit: int = 2, seed: int = 0, cpu: bool = True,
                    select_on: str = "val_macro_auroc") -> Path:
    """Train the evaluator with accelerate and the shared checkpoint utilities; returns ``output_dir/best``.

    AdamW (lr 1e-3, wd 0.01 as the reference sex classifier, §10.6), cosine schedule with warm-up
    stepped per optimizer step (D5), one checkpoint per epoch under ``output_dir/checkpoints`` (resumed
    automatically), loss history in ``output_dir/history.csv``, and the epoch with the best validation
    macro AUROC saved with :meth:`CXREvaluator.save_pretrained` (the last epoch if no validation set).
    ``select_on`` names the validation metric that picks the best epoch: a cohort without finding labels has no
    macro AUROC, so its evaluator (trained on sex/age only) is selected on ``val_age_r`` or ``val_sex_auroc``.
    """
    out = Path(output_dir)
    set_seed(seed)
    ages = train_set.age[~np.isnan(train_set.age)]
    if ages.size > 1:                            # standardise the age target on the train split
        model.age_mean.fill_(float(ages.mean())); model.age_std.fill_(float(max(ages.std(), 1.0)))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=False)
    vloader = (torch.utils.data.DataLoader(valid_set, batch_size=batch_size) if valid_set is not None
               and len(valid_set) else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = cosine_with_warmup(opt, min(warmup_steps, total // 10), total)  # short runs: warm up 10 % at most
    acc = Accelerator(cpu=cpu)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    state = {"epoch": 0, "best": -1.0}
    if (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        state.update({k: v for k, v in load_checkpoint(acc, ckpt).items() if k in state})
    raw = acc.unwrap_model(model)
    for epoch in range(state["epoch"], epochs):
        model.train()
        losses = []
        for batch in loader:
            loss = evaluator_loss(raw, model(batch["image"]), batch, loss_weights)
            acc.backward(loss)
            opt.step(); sched.step(); opt.zero_grad()
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
        if vloader is not None:
            row |= validation_metrics(raw, vloader)
        if acc.is_main_process:   # one writer: under `accelerate launch` every process runs this loop
            append_history(out / "history.csv", row)
        score = row.get(select_on, float(epoch))
        if vloader is None or (np.isfinite(score) and score > state["best"]) or not (out / "best").exists():
            state["best"] = float(score) if np.isfinite(score) else state["best"]
            if acc.is_main_process:
                raw.save_pretrained(out / "best")
        acc.wait_for_everyone()
        state["epoch"] = epoch + 1
        save_checkpoint(acc, out / "checkpoints", epoch + 1, checkpoint_limit, dict(state))
    return out / "best"
