"""Long-horizon rollout: chain predictions across an admission (the paper's future work, §V).

EHRXDiff predicts one step: I_trg from I_prev and the events in between (§II-A). To forecast further, a rollout
feeds each prediction back as the next I_prev, with the events of the next interval:

    step 1: Î_1 = f(I_0, S_0→1)      step 2: Î_2 = f(Î_1, S_1→2)      …

:func:`admission_chains` finds runs of consecutive pairs (image k-1 → image k of one admission, each a study
pair with events); :func:`rollout` predicts them step by step for a batch of chains, and also the one-step
prediction from the *true* previous image, so error that accumulates through the chain can be told apart from a
later step simply being harder. :func:`step_metrics` scores, per step, the rollout, the one-step prediction, the
baseline that carries the chain's first image forward (what is known without any new film), and the true image,
against the true later image's labels (Brier score, pooled AUROC) and pixels (mean absolute error). Without
finding labels (no evaluator) the steps are scored on the pixels alone: MAE, PSNR and SSIM against the true film.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from ehrxdiff.evaluation.metrics import image_similarity
from ehrxdiff.simulation.whatif import EventList, finding_probabilities, predict


def admission_chains(pairs: pd.DataFrame, *, max_steps: int, max_chains: int | None = None) -> pd.DataFrame:
    """Chains of consecutive pairs: rows of ``pairs`` with ``chain`` (id) and ``step`` (1…), longest first.

    A pair is consecutive when its previous image is the latest earlier image paired with that target (the
    all-earlier pairing, D1, also pairs I_0 → I_2; those are skipped). A chain follows target → next prev."""
    p = pairs.sort_values(["target_dicom_id", "prev_time"])
    cons = p.groupby("target_dicom_id", sort=False).tail(1)
    nxt = dict(zip(cons["prev_dicom_id"], cons.index))
    targets = set(cons["target_dicom_id"])
    chains = []
    for idx in cons.sort_values(["hadm_id", "prev_time"]).index:
        if cons.at[idx, "prev_dicom_id"] in targets:
            continue                                  # not a chain start
        run = [idx]
        while len(run) < max_steps and cons.at[run[-1], "target_dicom_id"] in nxt:
            run.append(nxt[cons.at[run[-1], "target_dicom_id"]])
        chains.append(run)
    chains.sort(key=lambda r: (-len(r), str(cons.at[r[0], "pair_key"])))
    chains = chains[:max_chains] if max_chains else chains
    out = [cons.loc[run].assign(chain=c, step=np.arange(1, len(run) + 1)) for c, run in enumerate(chains)]
    return pd.concat(out, ignore_index=True) if out else pairs.iloc[:0].assign(chain=[], step=[])


def rollout(pipe, dataset, chains: pd.DataFrame, *, seeds: Sequence[int], num_inference_steps: int,
            eta: float = 1.0, event_guidance_scale: float = 1.0) -> dict[str, dict]:
    """Predictions per (chain, step): {"rollout": {(chain, step): [S, 3, H, W]}, "one_step": {...}}.

    ``dataset``: a :class:`ehrxdiff.data.datasets.PairDataset` holding the chains' pairs. All chains advance together,
    one ``generate`` call per step for the rollout and one for the one-step predictions."""
    index = {k: i for i, k in enumerate(dataset.pairs["pair_key"])}
    out: dict[str, dict] = {"rollout": {}, "one_step": {}}
    for step in sorted(chains["step"].unique()):
        rows = chains[chains["step"] == step]
        keys = rows["pair_key"].tolist()
        events = [EventList.from_store(dataset.store, k) for k in keys]
        true_prev = torch.stack([dataset[index[k]]["prev_image"] for k in keys])
        kw = dict(num_inference_steps=num_inference_steps, eta=eta, event_guidance_scale=event_guidance_scale)
        one = predict(pipe, true_prev, events, keys, seeds, **kw)
        if step == 1:
            roll = one
        else:   # each seed's chain continues from that seed's own previous prediction
            prev = torch.stack([out["rollout"][(c, step - 1)] for c in rows["chain"]])          # [B, S, 3, H, W]
            roll = torch.stack([predict(pipe, prev[:, j], events, keys, [seed], **kw)[:, 0]
                                for j, seed in enumerate(seeds)], dim=1)
        for i, c in enumerate(rows["chain"]):
            out["one_step"][(c, step)] = one[i]
            out["rollout"][(c, step)] = roll[i]
    return out


def step_metrics(evaluator, dataset, chains: pd.DataFrame, preds: dict[str, dict], label_rows: pd.DataFrame,
                 seeds: Sequence[int]) -> pd.DataFrame:
    """Tidy (method, seed, step, metric, value, n): Brier score and pooled AUROC against I_trg's labels, pixel MAE
    against I_trg, for "rollout", "one-step (true I_prev)", "first image carried forward" and "GT" (I_trg).
    ``evaluator`` None (no finding labels): pixel MAE, PSNR and SSIM only, and no "GT" row (it is the reference)."""
    index = {k: i for i, k in enumerate(dataset.pairs["pair_key"])}
    first = {c: dataset[index[g.sort_values("step")["pair_key"].iloc[0]]]["prev_image"]
             for c, g in chains.groupby("chain")}
    if evaluator is not None:
        labels = list(evaluator.labels)
        lab = label_rows.pivot_table(index="pair_key", columns="label", values="relation", aggfunc="max")
        lab = lab.reindex(columns=labels)
    rows = []
    for step, g in chains.groupby("step"):
        keys, cs = g["pair_key"].tolist(), g["chain"].tolist()
        target = torch.stack([dataset[index[k]]["target_image"] for k in keys])
        cands = {"GT": {0: target}, "first image carried forward": {0: torch.stack([first[c] for c in cs])}}
        if evaluator is None:
            del cands["GT"]
        for j, seed in enumerate(seeds):
            cands.setdefault("rollout", {})[seed] = torch.stack([preds["rollout"][(c, step)][j] for c in cs])
            cands.setdefault("one-step (true I_prev)", {})[seed] = torch.stack(
                [preds["one_step"][(c, step)][j] for c in cs])
        for method, by_seed in cands.items():
            for seed, imgs in by_seed.items():
                if evaluator is None:
                    sim = image_similarity(imgs, target)
                    for metric, v in (("pixel MAE", float((imgs[:, 0] - target[:, 0]).abs().mean())),
                                      ("PSNR", float(sim["PSNR"].mean())), ("SSIM", float(sim["SSIM"].mean()))):
                        rows.append({"method": method, "seed": seed, "step": int(step), "metric": metric, "value": v,
                                     "n_pairs": len(keys)})
                    continue
                y = lab.reindex(keys).to_numpy(float)
                p = finding_probabilities(evaluator, imgs)
                known = ~np.isnan(y)
                yk, pk = y[known], p[known]
                auc = roc_auc_score(yk, pk) if np.unique(yk).size == 2 else np.nan
                mae = float((imgs[:, 0] - target[:, 0]).abs().mean())
                for metric, v in (("Brier", float(((pk - yk) ** 2).mean()) if yk.size else np.nan),
                                  ("AUROC (pooled)", float(auc)), ("pixel MAE", mae)):
                    rows.append({"method": method, "seed": seed, "step": int(step), "metric": metric, "value": v,
                                 "n_pairs": len(keys)})
    return pd.DataFrame(rows)


# --- figures ---------------------------------------------------------------------------------------------
