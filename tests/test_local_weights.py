"""Every local-weight key of the config loads a small file made in the real release's format, through the
study's own config path (issue 16, item 4): a wrong key name or layout fails here, not on a user's GPU.

The files come from ``weight_files`` (open_clip state dict, Cheff's LDM checkpoint, torchxrayvision's pickled
DenseNet, the Riken TorchScript archive); the config keys are set exactly as a user sets them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchxrayvision as xrv
from PIL import Image

from ehrxdiff.study import evaluation
from ehrxdiff.study import models
from ehrxdiff.models.clip import EHRCLIP, ImageTower
from ehrxdiff.config import ConfigError, load_config
from ehrxdiff.evaluation.evaluators import DEMO_DENSENET, EvaluatorImages, RikenAgeModel
from ehrxdiff.models.vae import build_vae
from weight_files import write_cheff_checkpoint, write_open_clip_visual, write_riken_torchscript, write_xrv_densenet

torch.set_num_threads(1)


def test_clip_image_weights_through_the_config(tmp_path):
    base = load_config("smoke")
    torch.manual_seed(3)
    source = ImageTower(image_size=base.image_size, patch_size=base.clip_patch_size, width=base.clip_width,
                        layers=base.clip_layers, heads=base.clip_heads)
    path = write_open_clip_visual(source.vit, tmp_path / "open_clip_vit.pt")
    cfg = load_config("smoke", {"clip_image_weights": str(path)})
    model = EHRCLIP.from_config(models.clip_model_config(cfg, event_dim=cfg.embedding_dim))
    for name, want in source.vit.state_dict().items():
        torch.testing.assert_close(model.image_tower.vit.state_dict()[name], want, msg=name)
    # the trained model is self-contained: it reloads with the weights file gone (the study's later notebooks
    # and another machine never need it)
    model.save_pretrained(tmp_path / "clip")
    path.unlink()
    again = EHRCLIP.from_pretrained(tmp_path / "clip")
    torch.testing.assert_close(again.image_tower.vit.conv1.weight, source.vit.conv1.weight)


def test_vae_weights_through_the_config(tmp_path):
    base = load_config("smoke")
    torch.manual_seed(4)
    source = build_vae(block_out_channels=tuple(base.vae_channels), latent_channels=base.vae_latent_channels,
                       image_size=base.image_size, norm_num_groups=8, layers_per_block=base.vae_layers_per_block)
    path = write_cheff_checkpoint(source, tmp_path / "cheff_ldm.ckpt")
    cfg = load_config("smoke", {"vae_weights": str(path), "latent_scale": 0.18215})
    vae = models.train_vae(cfg, ds=None).eval()        # loaded, not trained: no data is touched
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, source.eval().encode(x).latent_dist.mean)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    # an autoencoder of another width is refused with the file named
    wide = build_vae(block_out_channels=(8, 16, 32), latent_channels=base.vae_latent_channels,
                     image_size=base.image_size, norm_num_groups=8, layers_per_block=base.vae_layers_per_block)
    bad = load_config("smoke", {"vae_weights": str(write_cheff_checkpoint(wide, tmp_path / "wide.ckpt"))})
    with pytest.raises(ValueError, match=r"wide\.ckpt.*does not match"):
        models.train_vae(bad, ds=None)


def _images(tmp_path, n=3):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"{i}.png")
    return root, pd.DataFrame({"pair_key": [f"k{i}" for i in range(n)], "path": [f"{i}.png" for i in range(n)]})


def test_xrv_and_age_model_weights_through_the_config(tmp_path):
    torch.manual_seed(5)
    source = xrv.models.DenseNet(weights=None, **DEMO_DENSENET)
    xrv_path = write_xrv_densenet(source, tmp_path / "xrv-densenet.pt")
    age_path, age_net = write_riken_torchscript(tmp_path / "riken_age.pt")
    cfg = load_config("smoke", {"evaluator_arch": "demo", "xrv_weights": str(xrv_path),
                                "age_model_weights": str(age_path)})
    evaluator = evaluation.build_evaluator(cfg)
    for name, want in source.features.state_dict().items():
        torch.testing.assert_close(evaluator.backbone.features.state_dict()[name], want, msg=name)
    assert "+xrv-densenet.pt" in evaluator.evaluator_id

    root, table = _images(tmp_path)
    scores = evaluation.score_images(cfg, evaluator, table, root)
    plain = evaluation.score_images(load_config("smoke", {"evaluator_arch": "demo"}), evaluator, table, root)
    ds = EvaluatorImages(table, root, image_size=cfg.image_size, key_col="pair_key")
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        want = RikenAgeModel(age_path)(x).numpy()
    np.testing.assert_allclose(scores.table["age_pred"].to_numpy(), want, rtol=1e-5)
    assert not np.allclose(plain.table["age_pred"].to_numpy(), want)    # the evaluator's own head differs
    assert scores.age_model == "riken-age:riken_age.pt"
    assert evaluation.evaluator_tag(cfg, evaluator).endswith("/ age: riken-age:riken_age.pt")
    assert 40 < want.mean() < 80 and np.ptp(want) > 0      # the archive's network ran on the images


def test_wrong_or_missing_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"vae_weights: no such file .*nope\.ckpt"):
        load_config("smoke", {"vae_weights": str(tmp_path / "nope.ckpt")})
    state_dict = tmp_path / "age_state_dict.pt"
    torch.save({"head.weight": torch.zeros(1, 3)}, state_dict)      # a state dict where TorchScript is needed
    with pytest.raises(ValueError, match=r"age_model_weights .*age_state_dict\.pt: not a TorchScript archive"):
        RikenAgeModel(state_dict)
    other = tmp_path / "resnet.pt"
    torch.save({"layer1.0.weight": torch.zeros(2)}, other)
    cfg = load_config("smoke", {"evaluator_arch": "demo", "xrv_weights": str(other)})
    with pytest.raises(ValueError, match=r"resnet\.pt: no 'features\.\*' weights"):
        evaluation.build_evaluator(cfg)
