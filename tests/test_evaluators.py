"""Evaluators (D9) and Table II baselines on tiny random models built from config."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ehrxdiff.evaluation import baselines, evaluators
from ehrxdiff.constants import IMAGENOME_LABELS

torch.set_num_threads(1)
TINY = dict(input_size=32, growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, name="tiny")


def test_xrv_input_range_crop_and_size():
    x = torch.full((2, 3, 40, 60), 1.0)
    x[:, :, :, :10] = -1.0                                  # left band is cropped away (long side = width)
    y = evaluators.to_xrv_input(x, 16)
    assert y.shape == (2, 1, 16, 16)
    assert torch.allclose(y, torch.full_like(y, 1024.0))
    assert evaluators.to_xrv_input(-torch.ones(1, 1, 8, 8), 8).min() == -1024.0


def test_forward_shapes_and_provenance():
    torch.manual_seed(0)
    m = evaluators.CXREvaluator(**TINY).eval()
    out = m(torch.rand(3, 3, 48, 48) * 2 - 1)
    assert out["pathology"].shape == (3, len(IMAGENOME_LABELS))
    assert out["sex"].shape == (3,) and out["age"].shape == (3,)
    assert out["features"].shape == (3, m.feature_dim)
    assert m.evaluator_id == "tiny@32px" and m.feature_id.endswith(f"{m.feature_dim}d")
    assert evaluators.CXREvaluator(input_size=224).feature_dim == 1024   # DenseNet-121 default


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = evaluators.CXREvaluator(**TINY).eval()
    m.age_mean.fill_(50.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m.save_pretrained(tmp_path / "ev")
    m2 = evaluators.CXREvaluator.from_pretrained(tmp_path / "ev")
    assert torch.allclose(m(x)["age"], m2(x)["age"]) and torch.allclose(m(x)["features"], m2(x)["features"])
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        evaluators.CXREvaluator.from_pretrained(tmp_path)


def test_local_xrv_weights_file(tmp_path):
    import torchxrayvision as xrv
    torch.manual_seed(1)
    src = xrv.models.DenseNet(weights=None, growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8)
    torch.save(src, tmp_path / "xrv.pt")                    # XRV ships a pickled whole model
    m = evaluators.CXREvaluator(**{**TINY, "init_weights": tmp_path / "xrv.pt"})
    assert torch.equal(m.backbone.features.conv0.weight, src.features.conv0.weight)
    assert "+xrv.pt" in m.evaluator_id
    with pytest.raises(ValueError, match="does not fit"):
        evaluators.CXREvaluator(**{**TINY, "growth_rate": 6, "init_weights": tmp_path / "xrv.pt"})
    with pytest.raises(FileNotFoundError):
        evaluators.CXREvaluator(**{**TINY, "init_weights": tmp_path / "nope.pt"})


def test_loss_masks_missing_targets():
    m = evaluators.CXREvaluator(**TINY)
    out = {"pathology": torch.zeros(2, 10, requires_grad=True), "sex": torch.zeros(2), "age": torch.zeros(2)}
    batch = {"labels": torch.full((2, 10), float("nan")), "sex": torch.full((2,), float("nan")),
             "age": torch.full((2,), float("nan"))}
    batch["labels"][0, 3] = 1.0
    loss = evaluators.evaluator_loss(m, out, batch)
    assert loss.item() == pytest.approx(np.log(2), rel=1e-5)          # only the one known label counts
    loss.backward()
    assert out["pathology"].grad.count_nonzero() == 1


@pytest.fixture
def image_table(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append({"dicom_id": f"d{i}", "path": f"im{i}.png", "pleural effusion": i % 2,
                     "pneumothorax": np.nan if i < 4 else float(i % 2 == 0), "sex": float(i % 2), "age": 30.0 + i})
    return pd.DataFrame(rows)


def test_score_images_dataframe_and_features(tmp_path, image_table):
    torch.manual_seed(0)
    m = evaluators.CXREvaluator(**TINY)
    ds = evaluators.EvaluatorImages(image_table, tmp_path, image_size=32)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and torch.isnan(item["labels"][2])   # lung opacity absent
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    s = evaluators.score_images(m, loader)
    assert list(s.table.index) == image_table["dicom_id"].tolist()
    assert set(IMAGENOME_LABELS) | {"p_female", "age_pred"} == set(s.table.columns)
    assert s.features.shape == (8, m.feature_dim) and s.evaluator == "tiny@32px"
    with pytest.raises(ValueError, match="path"):
        evaluators.EvaluatorImages(image_table.drop(columns="path"), tmp_path, image_size=32)
    with pytest.raises(ValueError, match="'sex' must be 0/1"):
        evaluators.EvaluatorImages(image_table.assign(sex=2.0), tmp_path, image_size=32)


def test_train_evaluator_saves_best_and_resumes(tmp_path, image_table):
    torch.manual_seed(0)
    ds = evaluators.EvaluatorImages(image_table, tmp_path, image_size=32)
    m = evaluators.CXREvaluator(**TINY)
    best = evaluators.train_evaluator(m, ds, ds, output_dir=tmp_path / "run", epochs=1, batch_size=4,
                                      warmup_steps=0)
    assert (best / "model.safetensors").is_file()
    assert evaluators.CXREvaluator.from_pretrained(best).age_mean.item() == pytest.approx(33.5)
    evaluators.train_evaluator(evaluators.CXREvaluator(**TINY), ds, ds, output_dir=tmp_path / "run",
                               epochs=2, batch_size=4, warmup_steps=0)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist["epoch"].tolist() == [1, 2] and "val_macro_auroc" in hist.columns


def test_two_fresh_evaluator_runs_give_identical_weights(tmp_path, image_table):
    """Issue 15: notebook 05's evaluator, trained twice from the same seed in fresh folders, is the same model."""
    from safetensors.torch import load_file
    ds = evaluators.EvaluatorImages(image_table, tmp_path, image_size=32)
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        best = evaluators.train_evaluator(evaluators.CXREvaluator(**TINY), ds, ds, output_dir=tmp_path / run,
                                          epochs=2, batch_size=4, warmup_steps=0, seed=3)
        weights.append(load_file(best / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


# --- baselines -------------------------------------------------------------------------------------

def _tower():
    from ehrxdiff.models.clip import TableTower
    return TableTower(event_dim=8, width=8, layers=1, heads=2, out_dim=6, dropout=0.0)


def test_table_classifier_shapes_and_prev_label_token():
    torch.manual_seed(0)
    tower = _tower()
    ev, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    plain = baselines.TableClassifier(tower).eval()
    assert plain(ev, mask).shape == (2, 10)
    assert plain.tower is not tower                                       # CLIP tower is not fine-tuned in place
    wp = baselines.TableClassifier(tower, use_prev_label=True).eval()
    a = wp(ev, mask, torch.zeros(2, 10))
    b = wp(ev, mask, torch.ones(2, 10))
    assert not torch.allclose(a, b)                                       # the prev-label token is read
    with pytest.raises(ValueError, match="prev_labels"):
        wp(ev, mask)


class _Store:
    def __init__(self, keys, dim=8, seed=0):
        rng = np.random.default_rng(seed)
        self.pair_keys = list(keys)
        self._ev = {k: rng.normal(size=(int(rng.integers(0, 4)), dim)).astype(np.float16) for k in keys}

    def embeddings(self, key, max_events=None):
        e = self._ev[key]
        return e if max_events is None else e[-max_events:]


def test_train_and_predict_table_classifier(tmp_path):
    torch.manual_seed(0)
    keys = [f"p{i}" for i in range(10)]
    targets = pd.DataFrame(np.random.default_rng(0).integers(0, 2, (11, 10)).astype(np.float32),
                           index=keys + ["no_events"], columns=list(IMAGENOME_LABELS))
    targets.iloc[0, 0] = np.nan
    prev = targets.fillna(0)
    ds = baselines.PairEvents(_Store(keys), targets, prev)
    assert len(ds) == 10 and ds.n_without_events == 1
    model = baselines.TableClassifier(_tower(), use_prev_label=True)
    model = baselines.train_table_classifier(model, ds, ds, output_dir=tmp_path, epochs=2, batch_size=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=baselines.collate_events)
    probs = baselines.predict_table_classifier(model, loader)
    assert list(probs.index) == keys and probs.shape == (10, 10) and probs.to_numpy().max() <= 1
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2]


def test_previous_label_and_image_tables(tmp_path):
    rows = pd.DataFrame({"pair_key": ["a"], "label": ["x"], "relation": [1], "prev_relation": [0]})
    assert baselines.previous_label_scores(rows)["score"].tolist() == [0.0]
    pairs = pd.DataFrame({"pair_key": ["t_p"], "prev_path": ["p.jpg"], "target_path": ["t.jpg"]})
    assert baselines.pair_image_table(pairs, "prev")["path"].tolist() == ["p.jpg"]
    (tmp_path / "t_p.png").write_bytes(b"")
    assert baselines.generated_image_table(["t_p"], tmp_path)["path"].tolist() == ["t_p.png"]
    with pytest.raises(FileNotFoundError, match="missing"):
        baselines.generated_image_table(["t_p", "u_q"], tmp_path)
