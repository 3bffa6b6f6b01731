"""The evaluation step (notebooks 05–06): labels → evaluator → every method scored → Tables II–IV.

Each function maps the config onto :mod:`ehrxdiff.data.labels` and the :mod:`ehrxdiff.evaluation` modules (the
evaluator, metrics, baselines, the claims and the label-free plan hold the logic), and writes tidy CSVs under
``run_dir/eval`` that the tables and figures are drawn from:

- ``auroc_summary.csv``   method, seed, subset, auroc, evaluator      (Tables II and IV, Fig. bars)
- ``auroc_per_label.csv`` method, seed, subset, label, auroc, n, …    (per-label heatmap)
- ``demographics.csv``    method, seed, metric (FID, age r, sex AUROC), value, evaluator   (Table III)

Without finding labels (an own cohort whose images table has no finding columns, or MIMIC without Chest
ImaGenome; :func:`has_labels`) nothing that needs labels is faked. :func:`evaluate` then scores what can be
computed without them and says what it skipped and why (printed, and in ``skipped.csv``):

- ``image_similarity.csv``          method, seed, pair_key, metric (MSE, PSNR, SSIM), value: each prediction and
  the previous image against the true target (per pair);
- ``image_similarity_summary.csv``  the same, mean over pairs per (method, seed): the table's mean ± std over seeds;
- ``vs_previous_image.csv``         per model, seed and metric: model vs repeating the previous image, and the share
  of pairs where the model is closer to I_trg;
- ``demographics.csv``              FID, age r and sex AUROC, only where they mean something: the evaluator is then
  trained on the cohort's sex and/or age alone (the finding head masked out), or its backbone comes from local
  ``xrv_weights`` (FID only). With neither there is no FID: an untrained network's features would not measure
  anything, so the image-space metrics stand in.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ehrxdiff.config import StudyConfig
from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.data.images import load_image
from ehrxdiff.data.labels import label_matrix, prev_label_matrix, target_label_matrix
from ehrxdiff.evaluation.baselines import (PairEvents, TableClassifier, collate_events, generated_image_table,
                                           pair_image_table, predict_table_classifier, previous_label_scores,
                                           train_table_classifier)
from ehrxdiff.evaluation.claims import claims as check_claims
from ehrxdiff.evaluation.evaluators import (DEMO_DENSENET, DENSENET121, CXREvaluator, EvaluatorImages, RikenAgeModel,
                                            score_images as score_batches, train_evaluator as fit_evaluator)
from ehrxdiff.evaluation.label_free import label_free_plan, similarity_rows, vs_previous_image
from ehrxdiff.evaluation.metrics import (IMAGE_METRICS, age_pearson, ceiling_auroc, fid, score_method, sex_auroc,
                                         weighted_macro_auroc)
from ehrxdiff.reporting.figures import (SALIENCE, plot_auroc_bars, plot_guidance_sweep, plot_label_heatmap,
                                        salience_rule, salient_events)
from ehrxdiff.reporting.tables import auroc_table, reidentification_summary, seed_table, write_table
from ehrxdiff.study import models, prepare, shared
from ehrxdiff.study.layout import layout
from ehrxdiff.study.prepare import has_labels, label_rows, missing_labels_reason

BASELINES = ("GT", "previous image", "previous label", "table classifier", "table classifier w/ prev label")


def eval_dir(cfg: StudyConfig) -> Path:
    return layout(cfg).eval


def _image_table(pairs: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Unique images (prev and target) of some pairs with their labels, sex (1 = female) and age."""
    imgs = pd.concat([pairs[["prev_dicom_id", "prev_path", "gender", "age"]].set_axis(["dicom_id", "path", "gender", "age"], axis=1),
                      pairs[["target_dicom_id", "target_path", "gender", "age"]].set_axis(["dicom_id", "path", "gender", "age"], axis=1)])
    imgs = imgs.drop_duplicates("dicom_id").reset_index(drop=True)
    if labels is not None:       # without labels the finding targets stay NaN: masked in the evaluator's loss
        imgs = imgs.join(label_matrix(labels), on="dicom_id")
    imgs["sex"] = (imgs["gender"] == "F").astype(float).where(imgs["gender"].isin(["F", "M"]))
    return imgs


def build_evaluator(cfg: StudyConfig):
    """The evaluator network as the config sets it up, before any training: ``evaluator_arch`` (the paper's
    DenseNet-121 or the demo's small DenseNet), its backbone from the local ``xrv_weights`` file when given
    (torchxrayvision's pickled model or its state dict, :func:`ehrxdiff.evaluation.evaluators.load_xrv_backbone`;
    §10.6)."""
    arch = DEMO_DENSENET if cfg.evaluator_arch == "demo" else DENSENET121
    shared.seed_everything(cfg)       # the head's initial weights (and the backbone's without xrv_weights)
    return CXREvaluator(labels=IMAGENOME_LABELS, input_size=cfg.eval_image_size, name=cfg.evaluator_arch,
                        init_weights=cfg.weights("xrv_weights"), **arch)


@lru_cache(maxsize=2)
def _riken(path: str):
    return RikenAgeModel(path)


def age_model(cfg: StudyConfig):
    """The paper's age model (Ieki et al. 2022, §10.5) from the local TorchScript file ``age_model_weights``, or
    None: age is then the evaluator's own age head. Loaded once per file (the real model is ~100 MB)."""
    return _riken(str(cfg.weights("age_model_weights"))) if cfg.age_model_weights else None


def evaluator_tag(cfg: StudyConfig, evaluator) -> str:
    """The provenance every result row carries: the evaluator, its FID features and, when set, the age model."""
    age = age_model(cfg)
    return f"{evaluator.evaluator_id} / FID: {evaluator.feature_id}" + (f" / age: {age.model_id}" if age else "")


def train_evaluator(cfg: StudyConfig, pairs: pd.DataFrame, labels: pd.DataFrame | None,
                    select_on: str = "val_macro_auroc"):
    """The study's own evaluator (D9), trained on images of train-split patients only (``labels`` None: on sex
    and age alone, selected on ``select_on``)."""
    root = cfg.source_dirs()["mimic_cxr"]
    model = build_evaluator(cfg)
    sets = {s: EvaluatorImages(_image_table(pairs[pairs["split"] == s], labels), root, image_size=cfg.image_size)
            for s in ("train", "valid")}
    best = fit_evaluator(model, sets["train"], sets["valid"], output_dir=eval_dir(cfg) / "evaluator", epochs=cfg.eval_epochs,
               batch_size=cfg.eval_batch_size, seed=cfg.seed, select_on=select_on)
    return CXREvaluator.from_pretrained(best)


def score_images(cfg: StudyConfig, model, table: pd.DataFrame, root: Path):
    """Evaluator outputs for (pair_key, path) images: P(label), p_female, age (the Riken model's when
    ``age_model_weights`` is set, :func:`age_model`), FID features."""
    ds = EvaluatorImages(table, root, image_size=cfg.image_size, key_col="pair_key")
    return score_batches(model, DataLoader(ds, batch_size=cfg.eval_batch_size), age_model=age_model(cfg))


def table_classifiers(cfg: StudyConfig, rows: pd.DataFrame, test_keys) -> dict[str, pd.DataFrame]:
    """The two event-only baselines (§10.4), initialised from the pre-trained CLIP table tower."""
    _, store = prepare.load_pairs_with_events(cfg)
    clip = models.load_clip(cfg)
    keep = set(test_keys)
    masks = {"train": rows["split"] == "train", "valid": rows["split"] == "valid", "test": rows["pair_key"].isin(keep)}
    data = {s: PairEvents(store, target_label_matrix(rows[m]), prev_label_matrix(rows[m]), max_events=cfg.max_events)
            for s, m in masks.items()}
    test = DataLoader(data["test"], batch_size=cfg.eval_batch_size, collate_fn=collate_events)
    out = {}
    for name, use_prev in (("table classifier", False), ("table classifier w/ prev label", True)):
        shared.seed_everything(cfg)   # the head's initial weights
        model = train_table_classifier(TableClassifier(clip.table_tower, use_prev_label=use_prev), data["train"],
                                       data["valid"], output_dir=eval_dir(cfg) / name.replace(" ", "_").replace("/", ""),
                                       epochs=cfg.eval_epochs, batch_size=cfg.eval_batch_size, seed=cfg.seed)
        out[name] = predict_table_classifier(model, test)
    return out


def evaluate(cfg: StudyConfig, *, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Score GT, the baselines, and every trained model × seed on the test pairs; write the tidy CSVs.
    Without finding labels: :func:`evaluate_without_labels` (module docstring)."""
    if not has_labels(cfg):
        return evaluate_without_labels(cfg)
    ds = prepare.datasets(cfg, ("test",))
    test = models.test_pairs(cfg, ds)
    samples, _ = prepare.load_pairs_with_events(cfg)
    labels, rows = label_rows(cfg, samples)
    evaluator = train_evaluator(cfg, samples, labels)
    tag = evaluator_tag(cfg, evaluator)
    test_pairs = test.pairs
    test_rows = rows[rows["pair_key"].isin(set(test_pairs["pair_key"]))]
    root = cfg.source_dirs()["mimic_cxr"]
    summaries, per_labels, demo = [], [], []

    def add(method, seed, scores_table, img=None, real_feats=None):
        s, p = score_method(test_rows, scores_table, method=method, seed=seed, evaluator=tag)
        summaries.append(s)
        per_labels.append(p)
        if img is not None:
            t = img.table.reindex(test_pairs["pair_key"])
            demo.append({"method": method, "seed": seed, "metric": "age r",
                         "value": age_pearson(test_pairs["age"], t["age_pred"]), "evaluator": tag})
            demo.append({"method": method, "seed": seed, "metric": "sex AUROC",
                         "value": sex_auroc((test_pairs["gender"] == "F").to_numpy(), t["p_female"]), "evaluator": tag})
            if real_feats is not None and method != "GT":
                demo.append({"method": method, "seed": seed, "metric": "FID", "value": fid(real_feats, img.features),
                             "evaluator": tag})

    gt = score_images(cfg, evaluator, pair_image_table(test_pairs, "target"), root)
    add("GT", 0, gt.table, gt)
    prev = score_images(cfg, evaluator, pair_image_table(test_pairs, "prev"), root)
    add("previous image", 0, prev.table, prev, gt.features)
    pl = previous_label_scores(test_rows)
    summaries.append(pd.DataFrame([{"method": "previous label", "seed": 0, "evaluator": "report labels", "subset": k,
                                    "auroc": v} for k, v in weighted_macro_auroc(pl).items()]))
    for name, scores in table_classifiers(cfg, rows, test_pairs["pair_key"]).items():
        add(name, 0, scores)
    rec = models.reconstruction_dir(cfg)
    generated = [(models.RECONSTRUCTION, 0, rec)] if rec.is_dir() else []
    generated += [(run.method, seed, models.sample_dir(cfg, run, seed))   # every model, its controls, the sweep
                  for run in models.sample_runs(cfg) for seed in run.seeds]
    for method, seed, d in generated:   # notebook 04's PNGs (the VAE reconstructions of I_trg first)
        img = score_images(cfg, evaluator, generated_image_table(test_pairs["pair_key"], d), d)
        add(method, seed, img.table, img, gt.features)
    out = {"auroc_summary": pd.concat(summaries, ignore_index=True),
           "auroc_per_label": pd.concat(per_labels, ignore_index=True), "demographics": pd.DataFrame(demo)}
    if cfg.synthetic:
        gt_img = pd.read_parquet(layout(cfg).ground_truth("images"))
        out["ceiling"] = pd.DataFrame([ceiling_auroc(test_rows, gt_img)])
    for k, v in out.items():
        v.to_csv(eval_dir(cfg) / f"{k}.csv", index=False)
    return out


# ------------------------------------------------------------------------------------------ without labels


def write_claims(results: dict[str, pd.DataFrame], cfg: StudyConfig) -> pd.DataFrame:
    """The paper's claims checked on this run's numbers (:func:`ehrxdiff.evaluation.claims.claims`), written to
    ``eval/claims.csv``."""
    table = check_claims(results)
    table.to_csv(eval_dir(cfg) / "claims.csv", index=False)
    return table


def print_skipped(results: dict[str, pd.DataFrame]) -> None:
    """Say plainly, in the notebook, what was not computed and why (the same lines as ``skipped.csv``)."""
    skipped = results.get("skipped")
    if skipped is None or not len(skipped):
        return
    print("Evaluation without finding labels. Skipped:")
    for _, r in skipped.iterrows():
        print(f"  - {r['what']}: {r['why']}")


def evaluate_without_labels(cfg: StudyConfig) -> dict[str, pd.DataFrame]:
    """The label-free evaluation (module docstring): image similarity per method and seed against I_trg, model
    vs previous image, and FID / age r / sex AUROC where the cohort makes them meaningful; ``skipped.csv``."""
    reason = missing_labels_reason(cfg)
    ds = prepare.datasets(cfg, ("test",))
    test = models.test_pairs(cfg, ds)
    pairs, keys = test.pairs, test.pairs["pair_key"].tolist()
    plan, skipped = label_free_plan(pairs, xrv_weights=cfg.xrv_weights)
    skipped = pd.DataFrame(skipped).assign(reason=reason)
    print(f"{reason}. Scoring image similarity to I_trg (MSE, PSNR, SSIM) instead of AUROC; "
          f"skipped: {', '.join(skipped['what'])} (eval/skipped.csv).")
    root = cfg.source_dirs()["mimic_cxr"]
    items = [test[i] for i in range(len(test))]
    target = torch.stack([it["target_image"] for it in items])
    prev = torch.stack([it["prev_image"] for it in items])
    sims = [similarity_rows("previous image", 0, keys, prev, target)]
    generated = []                         # (name, seed, sample dir): every model's predictions of notebook 04
    runs = {r.method: r for r in models.sample_runs(cfg)}
    for (name, seed), pred in models.load_predictions(cfg, keys).items():
        sims.append(similarity_rows(name, seed, keys, pred, target))
        generated.append((name, seed, models.sample_dir(cfg, runs[name], seed)))
    per_pair = pd.concat(sims, ignore_index=True)[["method", "seed", "pair_key", "metric", "value"]]
    summary = (per_pair.groupby(["method", "seed", "metric"], sort=False)["value"]
               .agg(value="mean", n_pairs="count").reset_index())
    demo = []
    if plan["evaluator"] is not None:
        samples, _ = prepare.load_pairs_with_events(cfg)
        if plan["evaluator"] == "train":
            evaluator = train_evaluator(cfg, samples, None, select_on="val_age_r" if plan["age"] else "val_sex_auroc")
        else:
            evaluator = build_evaluator(cfg).eval()
        tag = evaluator_tag(cfg, evaluator) + (" (trained on sex/age only)" if plan["evaluator"] == "train" else "")
        gt = score_images(cfg, evaluator, pair_image_table(pairs, "target"), root)
        scored = [("GT", 0, gt), ("previous image", 0, score_images(cfg, evaluator, pair_image_table(pairs, "prev"),
                                                                    root))]
        scored += [(n, s, score_images(cfg, evaluator, generated_image_table(keys, d), d)) for n, s, d in generated]
        for method, seed, img in scored:
            t = img.table.reindex(keys)
            if plan["age"] and plan["evaluator"] == "train":
                known = pairs["age"].notna().to_numpy()
                demo.append({"method": method, "seed": seed, "metric": "age r", "evaluator": tag,
                             "value": age_pearson(pairs["age"][known], t["age_pred"][known])})
            if plan["sex"] and plan["evaluator"] == "train":
                known = pairs["gender"].isin(["F", "M"]).to_numpy()
                demo.append({"method": method, "seed": seed, "metric": "sex AUROC", "evaluator": tag,
                             "value": sex_auroc((pairs["gender"][known] == "F").to_numpy(), t["p_female"][known])})
            if method != "GT":
                demo.append({"method": method, "seed": seed, "metric": "FID", "evaluator": tag,
                             "value": fid(gt.features, img.features)})
    out = {"image_similarity": per_pair, "image_similarity_summary": summary,
           "vs_previous_image": vs_previous_image(per_pair),
           "demographics": pd.DataFrame(demo, columns=["method", "seed", "metric", "value", "evaluator"]),
           "skipped": skipped[["what", "why", "reason"]]}
    for k, v in out.items():
        v.to_csv(eval_dir(cfg) / f"{k}.csv", index=False)
    return out


def write_tables(cfg: StudyConfig, results: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Tables II–IV (CSV + Markdown + LaTeX) and the bar chart and heatmap, from the tidy results.
    Label-free results: :func:`write_label_free_tables`."""
    if "auroc_summary" not in results:
        return write_label_free_tables(cfg, results)
    fig = shared.figures_dir(cfg)
    summ = results["auroc_summary"]
    ceiling = results["ceiling"].iloc[0].to_dict() if "ceiling" in results else None
    main = [*BASELINES, *models.MAIN_MODELS]
    rows2 = [m for m in table2_rows(cfg) if m in set(summ["method"])]
    t2 = auroc_table(summ[summ["method"].isin(rows2)], index_order=rows2, ceiling=ceiling)
    write_table(t2, "table2_imagenome_auroc", fig, caption="Table II: Chest ImaGenome weighted-macro AUROC on the test "
                "pairs (all / diff / same), mean ± std over sampling seeds. " + _sampling_note(cfg))
    out_sweep = guidance_sweep_table(cfg, results)
    chosen = models.guidance_scale(cfg, models.GUIDANCE_SWEEP_MODEL)
    if out_sweep is not None:
        sweep_tidy, sweep_shown = out_sweep
        sweep_tidy.to_csv(eval_dir(cfg) / "guidance_sweep.csv", index=False)
        ref = "withheld" if models.guidance_reference(cfg) == "withheld" else "null"
        write_table(sweep_shown, "table_guidance_sweep", fig, caption=f"Event guidance sweep of "
                    f"{models.GUIDANCE_SWEEP_MODEL}: eps = eps(I_prev, {ref}) + s (eps(I_prev, S_event) - eps(I_prev, "
                    f"{ref})); s = 0 is the no-S_event prediction, s = 1 the paper's sampler; the study samples at s = "
                    f"{chosen:g}. Mean ± std over sampling seeds; re-id rank 0.5 = chance")
        plot_guidance_sweep(sweep_tidy, fig / "fig_guidance_sweep", chosen=chosen)
    rows4 = [v for v in models.variants(cfg) if v not in models.MAIN_MODELS] + ["EHRXDiff"]
    t4 = auroc_table(summ[summ["method"].isin(rows4)].replace({"method": {"EHRXDiff": models.FINAL_VARIANT}}),
                     index_order=[*rows4[:-1], models.FINAL_VARIANT], ceiling=ceiling)
    caption4 = "Table IV: conditioning ablation (weighted-macro AUROC)"
    if (reid := layout(cfg).reidentification).exists():  # written by notebook 04 (models.score_reidentification)
        rank = reidentification_summary(pd.read_csv(reid).replace({"method": {"EHRXDiff": models.FINAL_VARIANT}}))
        t4.insert(t4.columns.get_loc("evaluator"), "re-id rank", rank["rank percentile"].reindex(t4.index))
        caption4 += "; re-id rank: does the prediction follow I_prev (patient re-identification, chance 0.5)"
    fewer = {v: models.ldm_steps(cfg, v) for v in rows4[:-1] if models.ldm_steps(cfg, v) < cfg.ldm_steps}
    if fewer:
        caption4 += (f"; trained less than the final model ({cfg.ldm_steps:,} steps): "
                     + ", ".join(f"{v} {n:,} steps" for v, n in fewer.items()))
    write_table(t4, "table4_ablation", fig, caption=caption4)
    demo = results["demographics"]
    rec = [models.RECONSTRUCTION] if models.RECONSTRUCTION in set(demo["method"]) else []
    order3 = ["GT", "previous image", *rec, *models.MAIN_MODELS]
    t3 = seed_table(demo[demo["method"].isin(order3)], index="method", columns="metric", index_order=order3,
                    column_order=["FID", "age r", "sex AUROC"])
    write_table(t3, "table3_fid_demographics", fig, caption="Table III: FID (↓), age Pearson r (↑), sex AUROC (↑)"
                + ("; VAE reconstruction of I_trg: the first stage's own rendering of the real next film" if rec
                   else ""))
    plot_auroc_bars(summ[summ["method"].isin(main)], fig / "fig_table2_auroc_bars", hue_order=main, ceiling=ceiling)
    per = results["auroc_per_label"]
    plot_label_heatmap(per[per["method"].isin(main)], fig / "fig_auroc_per_label", index_order=[m for m in main
                       if m != "previous label"])
    out = {"table2": t2, "table3": t3, "table4": t4}
    if out_sweep is not None:
        out["guidance sweep"] = out_sweep[1]
    return out


def table2_rows(cfg: StudyConfig) -> list[str]:
    """Table II's rows: the baselines, the first stage's ceiling, then each main model with its controls."""
    runs = models.sample_runs(cfg)
    methods = [r.method for m in models.MAIN_MODELS for r in runs
               if r.model == m and (r.events != models.OWN_EVENTS or r.method == m)]
    return [*BASELINES, models.RECONSTRUCTION, *methods]


def _sampling_note(cfg: StudyConfig) -> str:
    scales = {m: models.guidance_scale(cfg, m) for m in models.MAIN_MODELS if models.uses_events(cfg, m)}
    if len(set(scales.values())) > 1:   # each model at its own s (event_guidance_by_model)
        guided = " and event guidance " + ", ".join(f"s = {s:g} ({m})" for m, s in scales.items())
    else:
        s = next(iter(scales.values()), 1.0)
        guided = f" and event guidance s = {s:g}" if s != 1 else ""
    return ("Models sampled with their own S_event" + guided
            + "; shuffled S_event: each test pair given another test pair's events (one fixed permutation, "
            "samples/shuffled_events.csv), no S_event: the model's no-event condition (s = 0: "
            + ("the withheld-events token its event dropout trained; S_null stays w_null's \"nothing happened\""
               if models.guidance_reference(cfg) == "withheld" else "the null event set")
            + ") - same model and sampling seeds (controls not in the paper)")


def guidance_sweep_table(cfg: StudyConfig, results: dict[str, pd.DataFrame]):
    """(tidy, shown): AUROC all / diff / same, FID and re-id rank of :data:`models.GUIDANCE_SWEEP_MODEL` against the
    event guidance scale s (issue 14), with the shuffled-events control at the study's s; None without a sweep."""
    sweep = models.guidance_sweep_runs(cfg)
    if not sweep:
        return None
    shuffled = [r for r in models.sample_runs(cfg) if r.model == models.GUIDANCE_SWEEP_MODEL
                and r.events == models.SHUFFLED_EVENTS]
    entries = pd.DataFrame([(s, "own", r.method) for s, r in sweep.items()]
                           + [(r.scale, "shuffled", r.method) for r in shuffled], columns=["s", "events", "method"])
    summ, demo = results["auroc_summary"], results["demographics"]
    long = [summ.assign(metric="AUROC " + summ["subset"], value=summ["auroc"]),
            demo[demo["metric"] == "FID"]]
    if (p := layout(cfg).reidentification).exists():
        reid = pd.read_csv(p)
        long.append(reid.assign(metric="re-id rank", value=reid["rank_percentile"]))
    long = pd.concat([d[["method", "seed", "metric", "value"]] for d in long], ignore_index=True)
    tidy = entries.merge(long, on="method")
    if not len(tidy):
        return None
    def label(frame):
        return [f"s = {s:g}, {e} S_event" for s, e in zip(frame["s"], frame["events"])]
    tidy["row"] = label(tidy)
    order = list(dict.fromkeys(label(entries.assign(control=entries["events"] != "own")
                                     .sort_values(["control", "s"], kind="stable"))))
    cols = [c for c in ("AUROC all", "AUROC diff", "AUROC same", "FID", "re-id rank") if c in set(tidy["metric"])]
    return tidy, seed_table(tidy, index="row", columns="metric", index_order=order, column_order=cols)


def write_label_free_tables(cfg: StudyConfig, results: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The label-free tables: image similarity (every method, mean ± std over seeds), model vs previous image,
    Table III with the columns that could be computed, and what was skipped. Each caption names the skips."""
    fig = shared.figures_dir(cfg)
    skipped = results["skipped"]
    note = "Without finding labels; skipped: " + "; ".join(skipped["what"]) + " (eval/skipped.csv)"
    summ = results["image_similarity_summary"]
    order = ["previous image", *models.variants(cfg)]
    sim = seed_table(summ, index="method", columns="metric", index_order=[m for m in order if m in set(summ["method"])],
                     column_order=IMAGE_METRICS)
    write_table(sim, "table_image_similarity", fig, caption="Image similarity of each prediction to the true I_trg "
                "(MSE ↓, PSNR dB ↑, SSIM ↑), mean over test pairs, mean ± std over sampling seeds. " + note)
    vs = results["vs_previous_image"]
    versus = seed_table(vs, index="method", columns="metric", value="share_pairs_better",
                        index_order=[m for m in order if m in set(vs["method"])], column_order=IMAGE_METRICS)
    write_table(versus, "table_vs_previous_image", fig, caption="Share of test pairs where the model's prediction is "
                "closer to I_trg than repeating the previous image (0.5 = no better), mean ± std over seeds. " + note)
    out = {"image similarity": sim, "model vs previous image (share of pairs closer to I_trg)": versus}
    demo = results["demographics"]
    if len(demo):
        order3 = ["GT", "previous image", *models.MAIN_MODELS]
        cols = [c for c in ("FID", "age r", "sex AUROC") if c in set(demo["metric"])]
        t3 = seed_table(demo[demo["method"].isin(order3)], index="method", columns="metric", index_order=order3,
                        column_order=cols)
        write_table(t3, "table3_fid_demographics", fig, caption="Table III (what the cohort allows): "
                    + ", ".join(cols) + ". " + note)
        out["table3"] = t3
    out["skipped"] = skipped.set_index("what")[["why"]]
    write_table(out["skipped"], "evaluation_skipped", fig, caption="Not computed without finding labels, and why")
    return out


def qualitative_examples(cfg: StudyConfig, *, model: str = "EHRXDiff_w_null", n_diff: int = 3, n_same: int = 1,
                         n_events: int = 6) -> list[dict]:
    """Pairs for the Fig. 4-style figure: findings that changed between I_prev and I_trg (one per label, the
    most frequent first) and one where nothing changed; with the change and up to ``n_events`` events of S_event
    (``reporting.salient_events``: on MIMIC-shaped data treatments before vitals; on an own cohort the tables
    of ``event_salience`` first, else no table order).
    Without labels the pairs are chosen by the images instead: the largest mean |I_trg − I_prev| first, and the
    smallest as the "no change" example (the caption says so rather than naming a finding)."""
    salience = cfg.event_salience if cfg.event_salience is not None else (() if cfg.own_cohort else SALIENCE)
    ds = prepare.datasets(cfg, ("test",))
    test = models.test_pairs(cfg, ds)
    events = prepare.load_events(cfg)
    seed = cfg.sample_seeds[0]
    chosen = (_finding_changes(label_rows(cfg, test.pairs)[1], n_diff, n_same) if has_labels(cfg)
              else _image_changes(test, n_diff, n_same))
    by_key = test.pairs.set_index("pair_key")
    out = []
    for key, finding in chosen:
        p = by_key.loc[key]
        out.append({"prev": load_image(test.image_root / p["prev_path"], cfg.image_size),
                    "target": load_image(test.image_root / p["target_path"], cfg.image_size),
                    "pred": load_image(models.sample_dir(cfg, model, seed) / f"{key}.png", cfg.image_size),
                    "events": salient_events(pair_events := events.for_pair(key), n_events, salience),
                    "n_events_total": len(pair_events), "events_rule": salience_rule(salience), "finding": finding,
                    "title": f"+{p['interval_hours']:.0f} h"})
    return out


def _image_changes(test, n_diff: int, n_same: int) -> list[tuple[str, str]]:
    """(pair_key, caption) of the pairs whose true image changed most, then least (mean |I_trg − I_prev|)."""
    change = pd.Series([float((test[i]["target_image"][0] - test[i]["prev_image"][0]).abs().mean())
                        for i in range(len(test))], index=test.pairs["pair_key"].to_numpy()).sort_values()
    most = list(change.index[::-1][:n_diff])
    least = [k for k in change.index if k not in set(most)][:n_same]
    return ([(k, f"large image change (mean |I_trg − I_prev| {change[k]:.3f}; no labels)") for k in most]
            + [(k, f"small image change (mean |I_trg − I_prev| {change[k]:.3f}; no labels)") for k in least])


def _finding_changes(rows: pd.DataFrame, n_diff: int, n_same: int) -> list[tuple[str, str]]:
    """(pair_key, caption): one pair per changed finding, the most frequent first, then unchanged pairs."""
    diff = rows[rows["relation"] != rows["prev_relation"]]
    chosen, used = [], set()
    for label in diff["label"].value_counts().index:
        r = diff[(diff["label"] == label) & ~diff["pair_key"].isin(used)].head(1)
        if len(r) and len(chosen) < n_diff:
            r = r.iloc[0]
            used.add(r["pair_key"])
            word = "appears" if r["relation"] == 1 else "resolves"
            chosen.append((r["pair_key"], f"{label} {word}"))
    same = rows.groupby("pair_key").filter(lambda g: (g["relation"] == g["prev_relation"]).all())
    for key in same["pair_key"].drop_duplicates().head(n_same):
        chosen.append((key, "no change in the 10 findings"))
    return chosen
