"""How sure is the prediction? Many samples per pair, and whether the evaluator's probabilities are calibrated.

EHRXDiff is a conditional *generative* model (§II-C): for one (I_prev, S_event) it defines a distribution over
next radiographs, and the paper reports each metric as a mean over 3 sampling seeds (§III-A) without looking at
the spread itself. Here:

* :func:`sample_many` draws N predictions per pair (seeds 0..N-1 through :func:`ehrxdiff.models.sampling.pair_seed`);
* :func:`pixel_std` is the per-pixel standard deviation over them (where the model is unsure what the film shows);
* :func:`probability_spread` is the spread of each finding's evaluator probability over the N samples;
* :func:`calibration_table` bins predicted probabilities against how often the finding is present in the true
  I_trg (Chest ImaGenome label), pooled over findings, with the expected calibration error (ECE) per method.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ehrxdiff.simulation.whatif import EventList, finding_probabilities, predict


def sample_many(pipe, prev_images: torch.Tensor, event_lists: Sequence[EventList], pair_keys: Sequence[str], *,
                n_samples: int, num_inference_steps: int, eta: float = 1.0, batch_pairs: int = 8,
                event_guidance_scale: float = 1.0) -> torch.Tensor:
    """N predictions per pair: [B, N, 3, H, W] (sample k uses seed k, so sample 0 is the study's seed-0 image
    when the study's first sampling seed is 0)."""
    out = []
    for i in range(0, len(pair_keys), batch_pairs):
        sl = slice(i, i + batch_pairs)
        out.append(predict(pipe, prev_images[sl], list(event_lists[sl]), list(pair_keys[sl]), range(n_samples),
                           num_inference_steps=num_inference_steps, eta=eta,
                           event_guidance_scale=event_guidance_scale))
    return torch.cat(out)


def pixel_std(samples: torch.Tensor) -> torch.Tensor:
    """Per-pixel standard deviation over samples [B, N, C, H, W] → [B, H, W] (first channel; images are grey)."""
    return samples[:, :, 0].std(dim=1, unbiased=samples.shape[1] > 1)


def pixel_spread(samples: torch.Tensor, pair_keys: Sequence[str]) -> pd.DataFrame:
    """Per pair: mean and max of the per-pixel std over the N samples (what is left of the uncertainty report
    without finding labels, when no evaluator probability can be read)."""
    std = pixel_std(samples)
    return pd.DataFrame({"pair_key": list(pair_keys), "mean_pixel_std": std.mean(dim=(1, 2)).numpy(),
                         "max_pixel_std": std.amax(dim=(1, 2)).numpy(), "n_samples": samples.shape[1]})


def probability_spread(evaluator, samples: torch.Tensor, pair_keys: Sequence[str]) -> pd.DataFrame:
    """Per (pair, finding): mean, std, min and max of P(finding) over the N samples of that pair."""
    b, n = samples.shape[:2]
    p = finding_probabilities(evaluator, samples.flatten(0, 1)).reshape(b, n, -1)
    rows = []
    for i, key in enumerate(pair_keys):
        for j, lab in enumerate(evaluator.labels):
            v = p[i, :, j]
            rows.append({"pair_key": key, "label": lab, "mean": float(v.mean()), "std": float(v.std(ddof=1)) if n > 1
                         else 0.0, "min": float(v.min()), "max": float(v.max()), "n_samples": n})
    return pd.DataFrame(rows)


def calibration_table(scored: pd.DataFrame, *, bins: int = 10) -> pd.DataFrame:
    """Reliability bins per method from tidy rows (method, label, relation 0/1, score = predicted probability).

    Returns method, bin, lo, hi, mean_score, frequency (share of rows with the finding in I_trg), n, and the
    method's ECE (sum over bins of n/N · |frequency − mean_score|) repeated on each row."""
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for method, g in scored.groupby("method", sort=False):
        idx = np.clip(np.digitize(g["score"], edges[1:-1]), 0, bins - 1)
        rows = []
        for b in range(bins):
            m = idx == b
            if m.any():
                rows.append({"method": method, "bin": b, "lo": edges[b], "hi": edges[b + 1],
                             "mean_score": float(g["score"][m].mean()), "frequency": float(g["relation"][m].mean()),
                             "n": int(m.sum())})
        t = pd.DataFrame(rows)
        t["ece"] = float((t["n"] / t["n"].sum() * (t["frequency"] - t["mean_score"]).abs()).sum()) if len(t) else np.nan
        out.append(t)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


# --- figures ---------------------------------------------------------------------------------------------
