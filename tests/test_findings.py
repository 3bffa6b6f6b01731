"""The findings head of ``event_global: findings`` / ``findings_prev`` (issue 14, not in the paper; ehrxdiff.training.findings)."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from ehrxdiff.data.datasets import pad_events
from ehrxdiff.data.images import load_image
from ehrxdiff.models.ldm import ClipConditioner, pool_events, pool_image
from ehrxdiff.training.findings import fit_findings_head, pooled_image_tokens, pooled_table_tokens

torch.set_num_threads(1)


def planted(n, seed):
    """Features far from standardised (offset 50, scales 0.01-100) whose finding 0 follows a planted logistic rule
    of two of them; finding 1 is unlabelled (NaN) on every other row; finding 2 is noise."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 6)) * np.array([0.01, 1, 100, 1, 1, 1]) + 50
    logit = 3 * (x[:, 0] - 50) / 0.01 - 3 * (x[:, 2] - 50) / 100
    y = np.stack([g.random(n) < 1 / (1 + np.exp(-logit)), g.random(n) < 0.5, g.random(n) < 0.3], 1).astype(np.float32)
    y[::2, 1] = np.nan
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_fit_recovers_a_planted_rule_on_raw_features():
    """Standardisation is folded into the Linear: the fitted head reads the raw features and ranks held-out rows by
    the planted rule; the noise finding stays near chance, and NaN targets are ignored (no NaN in the weights)."""
    torch.manual_seed(0)
    head = nn.Linear(6, 3)
    xtr, ytr = planted(2000, 0)
    fit = fit_findings_head(head, xtr, ytr)
    assert fit["labelled"] == int((~torch.isnan(ytr)).sum())
    assert torch.isfinite(head.weight).all()
    xte, yte = planted(2000, 1)
    with torch.no_grad():
        p = torch.sigmoid(head(xte)).numpy()
    assert roc_auc_score(yte[:, 0], p[:, 0]) > 0.9
    assert abs(roc_auc_score(yte[:, 2], p[:, 2]) - 0.5) < 0.05
    shuffled = fit_findings_head(nn.Linear(6, 3), xtr, ytr[torch.randperm(len(ytr))])
    assert shuffled["train_bce"] > fit["train_bce"]      # the rule, not the features' scale, is what it learned


def test_fit_is_deterministic_and_checks_its_inputs():
    xtr, ytr = planted(300, 0)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        heads.append(nn.Linear(6, 3))
        fit_findings_head(heads[-1], xtr, ytr, steps=50)
    assert torch.equal(heads[0].weight, heads[1].weight) and torch.equal(heads[0].bias, heads[1].bias)
    with pytest.raises(ValueError, match=r"features must be \[N, 6\]"):
        fit_findings_head(nn.Linear(6, 3), xtr[:, :5], ytr)
    with pytest.raises(ValueError, match="targets must be"):
        fit_findings_head(nn.Linear(6, 3), xtr, ytr[:, :2])
    with pytest.raises(ValueError, match="no labelled finding"):
        fit_findings_head(nn.Linear(6, 3), xtr, torch.full_like(ytr, float("nan")))


class Store:
    """An event store's one method the pooling reads: a pair's most recent events."""
    def __init__(self, rows):
        self.rows = rows

    def embeddings(self, key, max_events=None):
        return self.rows[key][-max_events:]


def test_pooled_table_tokens_are_the_pooled_tokens_the_ldm_sees():
    torch.manual_seed(0)
    clip = ClipConditioner({"image": dict(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                            "table": dict(event_dim=8, width=16, layers=1, heads=2, out_dim=16)})
    g = np.random.default_rng(0)
    rows = {"a": g.normal(size=(9, 8)).astype(np.float32), "b": g.normal(size=(2, 8)).astype(np.float32),
            "c": np.zeros((0, 8), np.float32)}
    clip.clip.table_tower.train()
    got = pooled_table_tokens(clip, Store(rows), ["a", "b", "c"], max_events=4, batch_size=2)
    assert clip.clip.table_tower.training                     # put back as it was
    clip.clip.table_tower.eval()
    events, mask = pad_events([torch.from_numpy(rows[k][-4:]) for k in "abc"], max_events=4)
    with torch.no_grad():
        want = pool_events(*clip.table_tokens(events, mask))
    assert got.shape == (3, 32)
    assert torch.allclose(got, want, atol=1e-6)


def test_pooled_image_tokens_pool_each_i_prev_as_the_ldm_sees_it(tmp_path):
    """``event_global: findings_prev``: the head's image features are pool_image of the image tower's tokens of
    each pair's I_prev, loaded at the model's size; a film shared by two pairs gives the same row."""
    torch.manual_seed(0)
    clip = ClipConditioner({"image": dict(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                            "table": dict(event_dim=8, width=16, layers=1, heads=2, out_dim=16)})
    g = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(g.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / name)
    clip.clip.image_tower.train()
    got = pooled_image_tokens(clip, tmp_path, ["b.png", "a.png", "b.png"], image_size=16, batch_size=1)
    assert clip.clip.image_tower.training                     # put back as it was
    clip.clip.image_tower.eval()
    with torch.no_grad():
        want = pool_image(clip.image_tokens(torch.stack([load_image(tmp_path / p, 16) for p in ("b.png", "a.png")])))
    assert got.shape == (3, 32)
    assert torch.allclose(got[:2], want, atol=1e-6) and torch.equal(got[0], got[2])
