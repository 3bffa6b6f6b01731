"""Sampler study: quality against the number of denoising steps, for DDIM and DPM-Solver++, with wall time.

The paper samples with DDIM, 100 steps, eta = 1 (§III-A; paper-reference §9); the pipeline also offers
DPM-Solver++ (2nd-order multistep, D6), which is meant to reach the same quality in ≤ 20 steps. Which to use is a
trade-off between minutes and AUROC that depends on the hardware, so this study measures it in one run on the
same test pairs, seed and evaluator as Table II: for each (sampler, steps) the images are generated in memory,
scored by the evaluator, and reported as weighted-macro AUROC on all / diff / same (§10.3), FID against the true
targets' features, and seconds per image (generation only, after an untimed one-image warm-up; on a shared
machine the times carry the load of whatever else runs). Without finding labels (``evaluator`` None) the
images are scored against the true targets instead: MSE, PSNR and SSIM
(:func:`ehrxdiff.evaluation.metrics.image_similarity`).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ehrxdiff.evaluation.metrics import fid, image_similarity, score_method
from ehrxdiff.simulation.whatif import EventList, evaluator_output, finding_probabilities, predict


def _features(evaluator, images: torch.Tensor) -> np.ndarray:
    return torch.cat(evaluator_output(evaluator, images, "features")).cpu().numpy()


def sampler_study(pipe, evaluator, dataset, label_rows: pd.DataFrame, *, samplers: Sequence[str],
                  steps: Sequence[int], seed: int, eta: float = 1.0, clip_x0: float | None = None,
                  batch_size: int = 32, event_guidance_scale: float = 1.0) -> pd.DataFrame:
    """Tidy rows (sampler, steps, metric, value, n_pairs) for every pair of ``dataset`` (a PairDataset).

    metrics: ``AUROC all/diff/same`` (weighted macro), ``FID`` (evaluator features of I_pred vs I_trg; small sets
    bias FID upwards, so compare rows with each other, not with published numbers), ``seconds per image``.
    ``evaluator`` None (no finding labels): ``MSE``, ``PSNR``, ``SSIM`` against I_trg instead of AUROC and FID.
    The pipeline's sampler is restored afterwards."""
    keys = dataset.pairs["pair_key"].tolist()
    items = [dataset[i] for i in range(len(dataset))]
    prev = torch.stack([it["prev_image"] for it in items])
    target = torch.stack([it["target_image"] for it in items])
    events = [EventList.from_store(dataset.store, k) for k in keys]
    if evaluator is not None:
        real = _features(evaluator, target)
        rows = label_rows[label_rows["pair_key"].isin(set(keys))]
    original = pipe.scheduler
    out = []
    try:
        for sampler in samplers:
            for n in steps:
                pipe.use_sampler(sampler, clip_x0=clip_x0)
                predict(pipe, prev[:1], events[:1], keys[:1], [seed], num_inference_steps=1, eta=eta)  # warm-up
                t0 = time.perf_counter()
                imgs = torch.cat([predict(pipe, prev[i:i + batch_size], events[i:i + batch_size],
                                          keys[i:i + batch_size], [seed], num_inference_steps=n, eta=eta,
                                          event_guidance_scale=event_guidance_scale)[:, 0]
                                  for i in range(0, len(keys), batch_size)])
                secs = (time.perf_counter() - t0) / max(len(keys), 1)
                tags = {"sampler": sampler, "steps": int(n), "n_pairs": len(keys)}
                if evaluator is None:
                    sim = image_similarity(imgs, target).mean()
                    out += [{**tags, "metric": m, "value": float(v)} for m, v in sim.items()]
                    out.append({**tags, "metric": "seconds per image", "value": secs})
                    continue
                probs = pd.DataFrame(finding_probabilities(evaluator, imgs), index=pd.Index(keys, name="pair_key"),
                                     columns=list(evaluator.labels))
                summary, _ = score_method(rows, probs, method=f"{sampler}-{n}", seed=seed)
                out += [{**tags, "metric": f"AUROC {s}", "value": float(a)}
                        for s, a in zip(summary["subset"], summary["auroc"])]
                out.append({**tags, "metric": "FID", "value": fid(real, _features(evaluator, imgs))
                            if len(keys) > 2 else np.nan})
                out.append({**tags, "metric": "seconds per image", "value": secs})
    finally:
        pipe.scheduler = original
    return pd.DataFrame(out)
