"""The evaluation step (notebooks 05–06): labels → evaluator → every method scored → Tables II–IV.

Each function maps the config onto :mod:`labels`, :mod:`evaluators`, :mod:`baselines` and :mod:`metrics`, and
writes tidy CSVs under ``run_dir/eval`` that the tables and figures are drawn from:

- ``auroc_summary.csv``   method, seed, subset, auroc, evaluator      (Tables II and IV, Fig. bars)
- ``auroc_per_label.csv`` method, seed, subset, label, auroc, n, …    (per-label heatmap)
- ``demographics.csv``    method, seed, metric (FID, age r, sex AUROC), value, evaluator   (Table III)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import study
from .config import StudyConfig
from .constants import IMAGENOME_LABELS
from .schemas import IMAGENOME_RELATIONS

BASELINES = ("GT", "previous image", "previous label", "table classifier", "table classifier w/ prev label")


def eval_dir(cfg: StudyConfig) -> Path:
    return study.run_dir(cfg, "eval")


def label_rows(cfg: StudyConfig, pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image-level labels, Table II rows) from the Chest ImaGenome relations file (§10.1)."""
    from .labels import image_labels, pair_label_rows, read_relations
    if cfg.own_cohort:  # labels come with the images table (own_cohort writes them in labels.image_labels' layout)
        path = cfg.path("run_dir") / "cohort" / "image_labels.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the evaluation needs finding columns in {cfg.own_images} "
                                    "(README, \"Your own cohort\")")
        labels = pd.read_parquet(path)
        return labels, pair_label_rows(pairs, labels)
    src = cfg.source_dirs()
    if "imagenome" not in src:
        raise FileNotFoundError("the evaluation needs Chest ImaGenome: set imagenome_dir")
    labels = image_labels(read_relations(src["imagenome"] / IMAGENOME_RELATIONS))
    return labels, pair_label_rows(pairs, labels)


def _image_table(pairs: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Unique images (prev and target) of some pairs with their labels, sex (1 = female) and age."""
    from .labels import label_matrix
    imgs = pd.concat([pairs[["prev_dicom_id", "prev_path", "gender", "age"]].set_axis(["dicom_id", "path", "gender", "age"], axis=1),
                      pairs[["target_dicom_id", "target_path", "gender", "age"]].set_axis(["dicom_id", "path", "gender", "age"], axis=1)])
    imgs = imgs.drop_duplicates("dicom_id").reset_index(drop=True)
    lab = label_matrix(labels)
    imgs = imgs.join(lab, on="dicom_id")
    imgs["sex"] = (imgs["gender"] == "F").astype(float).where(imgs["gender"].isin(["F", "M"]))
    return imgs


def train_evaluator(cfg: StudyConfig, pairs: pd.DataFrame, labels: pd.DataFrame):
    """The study's own evaluator (D9), trained on images of train-split patients only."""
    from .evaluators import DEMO_DENSENET, DENSENET121, CXREvaluator, EvaluatorImages
    from .evaluators import train_evaluator as fit
    root = cfg.source_dirs()["mimic_cxr"]
    arch = DEMO_DENSENET if cfg.evaluator_arch == "demo" else DENSENET121
    model = CXREvaluator(labels=IMAGENOME_LABELS, input_size=cfg.eval_image_size, name=cfg.evaluator_arch,
                         init_weights=cfg.xrv_weights, **arch)
    sets = {s: EvaluatorImages(_image_table(pairs[pairs["split"] == s], labels), root, image_size=cfg.image_size)
            for s in ("train", "valid")}
    best = fit(model, sets["train"], sets["valid"], output_dir=eval_dir(cfg) / "evaluator", epochs=cfg.eval_epochs,
               batch_size=cfg.eval_batch_size, seed=cfg.seed)
    return CXREvaluator.from_pretrained(best)


def score_images(cfg: StudyConfig, model, table: pd.DataFrame, root: Path):
    """Evaluator outputs for (pair_key, path) images: P(label), p_female, age, FID features."""
    from torch.utils.data import DataLoader

    from .evaluators import EvaluatorImages
    from .evaluators import score_images as run
    ds = EvaluatorImages(table, root, image_size=cfg.image_size, key_col="pair_key")
    return run(model, DataLoader(ds, batch_size=cfg.eval_batch_size))


def table_classifiers(cfg: StudyConfig, rows: pd.DataFrame, test_keys) -> dict[str, pd.DataFrame]:
    """The two event-only baselines (§10.4), initialised from the pre-trained CLIP table tower."""
    from torch.utils.data import DataLoader

    from .baselines import PairEvents, TableClassifier, collate_events, predict_table_classifier, train_table_classifier
    from .labels import prev_label_matrix, target_label_matrix
    _, store = study.load_pairs_with_events(cfg)
    clip = study.load_clip(cfg)
    keep = set(test_keys)
    masks = {"train": rows["split"] == "train", "valid": rows["split"] == "valid", "test": rows["pair_key"].isin(keep)}
    data = {s: PairEvents(store, target_label_matrix(rows[m]), prev_label_matrix(rows[m]), max_events=cfg.max_events)
            for s, m in masks.items()}
    test = DataLoader(data["test"], batch_size=cfg.eval_batch_size, collate_fn=collate_events)
    out = {}
    for name, use_prev in (("table classifier", False), ("table classifier w/ prev label", True)):
        model = train_table_classifier(TableClassifier(clip.table_tower, use_prev_label=use_prev), data["train"],
                                       data["valid"], output_dir=eval_dir(cfg) / name.replace(" ", "_").replace("/", ""),
                                       epochs=cfg.eval_epochs, batch_size=cfg.eval_batch_size, seed=cfg.seed)
        out[name] = predict_table_classifier(model, test)
    return out


def evaluate(cfg: StudyConfig, *, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Score GT, the baselines, and every trained model × seed on the test pairs; write the tidy CSVs."""
    from .baselines import generated_image_table, pair_image_table, previous_label_scores
    from .metrics import age_pearson, fid, score_method, sex_auroc, weighted_macro_auroc
    ds = study.datasets(cfg, ("test",))
    test = study.test_pairs(cfg, ds)
    samples, _ = study.load_pairs_with_events(cfg)
    labels, rows = label_rows(cfg, samples)
    evaluator = train_evaluator(cfg, samples, labels)
    tag = f"{evaluator.evaluator_id} / FID: {evaluator.feature_id}"
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
    for name in study.variants(cfg):
        seeds = cfg.sample_seeds if name in study.MAIN_MODELS else cfg.sample_seeds[:cfg.ablation_seeds]
        for seed in seeds:
            table = generated_image_table(test_pairs["pair_key"], study.sample_dir(cfg, name, seed))
            img = score_images(cfg, evaluator, table, study.sample_dir(cfg, name, seed))
            add(name, seed, img.table, img, gt.features)
    out = {"auroc_summary": pd.concat(summaries, ignore_index=True),
           "auroc_per_label": pd.concat(per_labels, ignore_index=True), "demographics": pd.DataFrame(demo)}
    if cfg.synthetic:
        from .metrics import ceiling_auroc
        gt_img = pd.read_parquet(cfg.synthetic_root / "ground_truth" / "images.parquet")
        out["ceiling"] = pd.DataFrame([ceiling_auroc(test_rows, gt_img)])
    for k, v in out.items():
        v.to_csv(eval_dir(cfg) / f"{k}.csv", index=False)
    return out


def write_tables(cfg: StudyConfig, results: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Tables II–IV (CSV + Markdown + LaTeX) and the bar chart and heatmap, from the tidy results."""
    from .reporting import auroc_table, plot_auroc_bars, plot_label_heatmap, seed_table, write_table
    fig = study.figures_dir(cfg)
    summ = results["auroc_summary"]
    ceiling = results["ceiling"].iloc[0].to_dict() if "ceiling" in results else None
    main = [*BASELINES, *study.MAIN_MODELS]
    t2 = auroc_table(summ[summ["method"].isin(main)], index_order=main, ceiling=ceiling)
    write_table(t2, "table2_imagenome_auroc", fig, caption="Table II: Chest ImaGenome weighted-macro AUROC on the test "
                "pairs (all / diff / same), mean ± std over sampling seeds")
    rows4 = [v for v in study.variants(cfg) if v not in study.MAIN_MODELS] + ["EHRXDiff"]
    t4 = auroc_table(summ[summ["method"].isin(rows4)].replace({"method": {"EHRXDiff": study.FINAL_VARIANT}}),
                     index_order=[*rows4[:-1], study.FINAL_VARIANT], ceiling=ceiling)
    write_table(t4, "table4_ablation", fig, caption="Table IV: conditioning ablation (weighted-macro AUROC)")
    demo = results["demographics"]
    order3 = ["GT", "previous image", *study.MAIN_MODELS]
    t3 = seed_table(demo[demo["method"].isin(order3)], index="method", columns="metric", index_order=order3,
                    column_order=["FID", "age r", "sex AUROC"])
    write_table(t3, "table3_fid_demographics", fig, caption="Table III: FID (↓), age Pearson r (↑), sex AUROC (↑)")
    plot_auroc_bars(summ[summ["method"].isin(main)], fig / "fig_table2_auroc_bars", hue_order=main, ceiling=ceiling)
    per = results["auroc_per_label"]
    plot_label_heatmap(per[per["method"].isin(main)], fig / "fig_auroc_per_label", index_order=[m for m in main
                       if m != "previous label"])
    return {"table2": t2, "table3": t3, "table4": t4}


def claims(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's three claims, checked on these numbers (mean over seeds): hold or not, with the values."""
    m = results["auroc_summary"].groupby(["method", "subset"])["auroc"].mean()

    def get(method, subset):
        return float(m.get((method, subset), np.nan))
    checks = [
        ("EHRXDiff_w_null beats the previous image on diff", get("EHRXDiff_w_null", "diff"), get("previous image", "diff")),
        ("EHRXDiff_w_null beats EHRXDiff on same", get("EHRXDiff_w_null", "same"), get("EHRXDiff", "same")),
        ("dropping the table events lowers diff (EHRXDiff vs best variant without CLIP-table)", get("EHRXDiff", "diff"),
         max([get(v, "diff") for v in ("concat-VAE", "xattn-VAE", "xattn-CLIPimg") if (v, "diff") in m.index],
             default=np.nan)),
    ]
    return pd.DataFrame([{"claim": c, "ours": a, "compared with": b,
                          "holds": bool(a > b) if np.isfinite(a) and np.isfinite(b) else None} for c, a, b in checks])


def qualitative_examples(cfg: StudyConfig, *, model: str = "EHRXDiff_w_null", n_diff: int = 3, n_same: int = 1,
                         n_events: int = 6) -> list[dict]:
    """Pairs for the Fig. 4-style figure: findings that changed between I_prev and I_trg (one per label, the
    most frequent first) and one where nothing changed; with the last events of S_event and the change."""
    from .images import load_image
    ds = study.datasets(cfg, ("test",))
    test = study.test_pairs(cfg, ds)
    _, rows = label_rows(cfg, test.pairs)
    events = study.load_events(cfg)
    seed = cfg.sample_seeds[0]
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
    by_key = test.pairs.set_index("pair_key")
    out = []
    for key, finding in chosen:
        p = by_key.loc[key]
        out.append({"prev": load_image(test.image_root / p["prev_path"], cfg.image_size),
                    "target": load_image(test.image_root / p["target_path"], cfg.image_size),
                    "pred": load_image(study.sample_dir(cfg, model, seed) / f"{key}.png", cfg.image_size),
                    "events": [t for t, _, _ in events.for_pair(key)][-n_events:], "finding": finding,
                    "title": f"+{p['interval_hours']:.0f} h"})
    return out
