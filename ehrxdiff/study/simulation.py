"""Notebook 07's steps: the study config mapped onto what-if, uncertainty, rollout and the sampler study.

Beyond the paper (issue 7): the paper closes by calling EHRXDiff a potential clinical simulation tool and names
long-term forecasting as future work (§V). These steps use the model notebook 04 trained
(``simulation_model``), the evaluator notebook 05 trained, and the study's test split; each writes a tidy CSV
under ``run_dir/simulation`` and its figure (PNG + PDF) under ``figures_dir``:

    whatif_effects.csv / whatif_agreement.csv   fig_whatif_example, fig_whatif_effects      (:mod:`whatif`)
    uncertainty_spread.csv / calibration.csv    fig_uncertainty, fig_calibration            (:mod:`uncertainty`)
    rollout.csv                                 fig_rollout, fig_rollout_example            (:mod:`rollout`)
    sampler_study.csv                           fig_sampler_study                           (:mod:`sampler_study`)

Sizes come from the config block "beyond the paper" (``whatif_pairs``, ``uncertainty_samples``, …); sampling
uses the study's ``sampler``, ``sample_steps``, ``sample_eta`` and ``sample_clip_x0``, as notebook 04 does.

Without finding labels (:func:`ehrxdiff.study.prepare.has_labels`) there is no evaluator whose P(finding) means
anything, so every part that reads probabilities is skipped, printed and recorded in ``skipped.csv`` (what,
why), and the rest runs on the images: the what-if example shows the predictions and their difference map
only (the population what-if is skipped); uncertainty reports the per-pixel std (``uncertainty_spread.csv``:
pair_key, mean/max pixel std) and skips calibration; the rollout is scored by pixel MAE, PSNR and SSIM against
the true films; the sampler study by MSE, PSNR, SSIM and seconds per image.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ehrxdiff.config import StudyConfig
from ehrxdiff.evaluation.baselines import generated_image_table, pair_image_table
from ehrxdiff.evaluation.evaluators import CXREvaluator
from ehrxdiff.evaluation.metrics import image_similarity, score_method
from ehrxdiff.reporting.figures import (plot_calibration, plot_effects, plot_rollout, plot_rollout_example,
                                        plot_sampler_study, plot_uncertainty, plot_what_if)
from ehrxdiff.reporting.tables import write_table
from ehrxdiff.simulation.rollout import admission_chains, rollout, step_metrics
from ehrxdiff.simulation.sampler_study import sampler_study
from ehrxdiff.simulation.uncertainty import calibration_table, pixel_spread, probability_spread, sample_many
from ehrxdiff.simulation.whatif import EventList, agreement, intervention_effects, observed_association, what_if
from ehrxdiff.study import models, prepare, shared
from ehrxdiff.study.evaluation import score_images
from ehrxdiff.study.layout import layout
from ehrxdiff.study.prepare import label_rows, missing_labels_reason
from ehrxdiff.synthetic.counterfactual import pair_true_effects

log = logging.getLogger(__name__)


def sim_dir(cfg: StudyConfig) -> Path:
    return layout(cfg).simulation


def load_evaluator(cfg: StudyConfig):
    """The evaluator notebook 05 trained (D9)."""
    best = layout(cfg).evaluator_best
    if not best.is_dir():
        raise FileNotFoundError(f"{best} not found: run notebook 05 first")
    return CXREvaluator.from_pretrained(best)


@dataclass
class Context:
    """What every step needs, loaded once: the model, the evaluator, the test pairs and their labels."""
    cfg: StudyConfig
    pipe: object                 # EHRXDiffPipeline (EMA weights, the study's sampler)
    evaluator: object            # CXREvaluator; None without finding labels
    test: object                 # PairDataset: the whole test split
    scored: object               # PairDataset: the test pairs notebooks 04-05 generated and scored
    label_rows: pd.DataFrame | None  # Table II rows (pair_key, label, relation, prev_relation); None without labels
    timings: dict
    labels_missing: str | None = None   # why there are no finding labels (prepare.missing_labels_reason)

    @property
    def has_labels(self) -> bool:
        return self.labels_missing is None

    def skip(self, what: str, why: str) -> None:
        """Record a part not computed without labels: printed, and appended to ``simulation/skipped.csv``."""
        print(f"skipped: {what}: {why} ({self.labels_missing})")
        path = sim_dir(self.cfg) / "skipped.csv"
        old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["what", "why", "reason"])
        row = pd.DataFrame([{"what": what, "why": why, "reason": self.labels_missing}])
        pd.concat([old[old["what"] != what], row], ignore_index=True).to_csv(path, index=False)

    @property
    def steps(self) -> dict:
        c = self.cfg
        s = models.guidance_scale(c, c.simulation_model)
        return dict(num_inference_steps=c.sample_steps, eta=c.sample_eta, event_guidance_scale=s)

    @property
    def whatif_seeds(self) -> list[int]:
        """The first ``whatif_seeds`` of the study's sampling seeds (at least one), shared by both histories."""
        return list(self.cfg.sample_seeds[:max(self.cfg.whatif_seeds, 1)])

    def subset(self, n: int, *, pool=None):
        """The first ``n`` of a fixed random order of the test pairs (``pool`` defaults to the whole split)."""
        ds = pool or self.test
        return ds.with_pairs(ds.pairs.sample(frac=1.0, random_state=self.cfg.seed).head(n).sort_values("pair_key"))


def context(cfg: StudyConfig) -> Context:
    """Load everything once. Without finding labels the evaluator is not loaded (even one trained on sex/age has
    an untrained finding head) and the label rows are None (module docstring)."""
    pipe = models.load_pipeline(cfg, cfg.simulation_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_sampler(cfg.sampler, clip_x0=cfg.sample_clip_x0)
    ds = prepare.datasets(cfg, ("test",))
    reason = missing_labels_reason(cfg)
    if reason is not None:
        print(f"{reason}: the parts that read the evaluator's P(finding) are skipped; the rest is scored on images")
        (sim_dir(cfg) / "skipped.csv").unlink(missing_ok=True)
        return Context(cfg, pipe, None, ds["test"], models.test_pairs(cfg, ds), None, {}, reason)
    samples, _ = prepare.load_pairs_with_events(cfg)
    _, rows = label_rows(cfg, samples)
    return Context(cfg, pipe, load_evaluator(cfg), ds["test"], models.test_pairs(cfg, ds), rows, {})


def _timed(ctx: Context, name: str, t0: float) -> None:
    ctx.timings[name] = round(time.perf_counter() - t0, 1)
    log.info("%s: %.1f s", name, ctx.timings[name])


# ---------------------------------------------------------------------------------------------------- what-if
def added_hours(events) -> float:
    """When a scripted edit adds its events: at the oldest event the model still sees (inside the max_events
    window, so the edit is not truncated away), never before I_prev."""
    return max(float(events.hours[0]), 0.0) if len(events) else 0.0


def what_if_example(ctx: Context, intervention: str | None = None, pair_key: str | None = None):
    """One pair's what-if (figure ``fig_whatif_example``) with a configured intervention (default: ``diuretic``
    when configured, else the first; none configured: skipped). Default pair: on the synthetic world, the scored
    test pair whose I_prev has the most edema (where a diuretic matters); otherwise the first scored pair."""
    cfg = ctx.cfg
    defined = cfg.interventions()
    if not defined:
        ctx.skip("what-if example", "no intervention configured (whatif_interventions / whatif_definitions)")
        return None
    intervention = intervention or ("diuretic" if "diuretic" in defined else next(iter(defined)))
    if intervention not in defined:
        raise ValueError(f"intervention {intervention!r} is not configured (configured: {', '.join(defined)})")
    pairs = ctx.scored.pairs
    if pair_key is None:
        pair_key = pairs["pair_key"].iloc[0]
        gt = models.ground_truth_images(cfg)
        if gt is not None:
            sev = gt["pulmonary edema/hazy opacity"].reindex(pairs["prev_dicom_id"]).to_numpy()
            pair_key = pairs["pair_key"].iloc[int(np.nanargmax(sev))] if np.isfinite(sev).any() else pair_key
    i = int(np.flatnonzero(pairs["pair_key"].to_numpy() == pair_key)[0])
    item = ctx.scored[i]
    factual = EventList.from_store(ctx.scored.store, pair_key)
    emb = prepare.make_embedder(cfg)
    edited = factual.add_intervention(defined[intervention], added_hours(factual), embedder=emb.embed,
                                      text_style=cfg.text_style).window(cfg.max_events, cfg.event_budget_last)
    emb.close()
    res = what_if(ctx.pipe, item["prev_image"], factual, edited, pair_key=pair_key,
                  seeds=ctx.whatif_seeds, evaluator=ctx.evaluator, **ctx.steps)
    plot_what_if(res, shared.figures_dir(cfg) / "fig_whatif_example",
                 title=f"{pair_key[:8]}…: + {intervention} at +{added_hours(factual):.1f} h after I_prev")
    return res


def run_what_if(ctx: Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each configured intervention added to ``whatif_pairs`` test pairs: the model's change in P(finding) next
    to the world's true severity change (synthetic data only; on real data the truth columns are NaN).
    Without labels: skipped (empty tables), since both effects are changes in P(finding)."""
    defined = ctx.cfg.interventions()
    if not defined:
        ctx.skip("what-if effects and agreement", "no intervention configured (whatif_interventions / "
                 "whatif_definitions)")
    elif not ctx.has_labels:
        ctx.skip("what-if effects and agreement", "they compare changes in the evaluator's P(finding)")
    if not defined or not ctx.has_labels:
        return (pd.DataFrame(columns=["pair_key", "intervention", "hours", "label", "delta_p", "delta_true"]),
                pd.DataFrame(columns=["intervention", "label", "n_pairs", "lowers_rate", "agreement"]))
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ds = ctx.subset(cfg.whatif_pairs)
    keys = ds.pairs["pair_key"].tolist()
    hours = {k: added_hours(EventList.from_store(ds.store, k)) for k in keys}
    emb = prepare.make_embedder(cfg)
    course = pd.read_parquet(layout(cfg).ground_truth("course")) if cfg.synthetic else None
    # the shuffled-events control (issue 14): the same edit on another what-if pair's S_event (a fixed, recorded
    # permutation), added at that history's oldest visible hour; scored against this pair's true effect
    kinds, events_of, shuffled_hours = ("own",), None, None
    if len(keys) >= 2:   # one pair has no other pair's events to borrow
        perm = models.shuffled_events(cfg, ds.pairs)
        perm.to_csv(sim_dir(cfg) / "whatif_shuffled_events.csv", index=False)
        events_of = dict(zip(perm["pair_key"], perm["events_of"]))
        shuffled_hours = {k: added_hours(EventList.from_store(ds.store, events_of[k])) for k in keys}
        kinds = ("own", "shuffled")
    parts, truths = [], {}
    for iv, events in ((iv, ev) for iv in defined for ev in kinds):
        shuffled = events == "shuffled"
        eff = intervention_effects(ctx.pipe, ctx.evaluator, ds, keys, iv, hours=shuffled_hours if shuffled else hours,
                                   embedder=emb.embed, seeds=ctx.whatif_seeds, text_style=cfg.text_style,
                                   batch_size=cfg.sample_batch_size, events_of=events_of if shuffled else None,
                                   definition=defined[iv], budget_last=cfg.event_budget_last, **ctx.steps)
        if course is not None and defined[iv]["action"] is not None:   # the world knows this action's effect
            if iv not in truths:
                truths[iv] = pair_true_effects(course, ds.pairs, defined[iv]["action"], hours, seed=cfg.seed)
            eff = eff.merge(truths[iv], on=["pair_key", "label"], how="left")
        else:
            eff = eff.assign(delta_true=np.nan, replay_error=np.nan, interval_hours=np.nan)
        parts.append(eff)
    emb.close()
    effects = pd.concat(parts, ignore_index=True)
    summary = agreement(effects, lowers={k: v["lowers"] for k, v in defined.items()})
    effects.to_csv(sim_dir(cfg) / "whatif_effects.csv", index=False)
    summary.to_csv(sim_dir(cfg) / "whatif_agreement.csv", index=False)
    write_table(summary.round(4), "table_whatif_agreement", shared.figures_dir(cfg), index=False,
                caption=f"What-if agreement with the world ({cfg.simulation_model}, {len(keys)} test pairs, "
                        f"{len(ctx.whatif_seeds)} seed(s), event guidance s = {ctx.steps['event_guidance_scale']:g}): "
                        "the share of pairs with a true effect (|Δ severity| ≥ 0.01) where the model's P(finding) "
                        "moved the same way; shuffled: the same edit on another pair's S_event (fixed permutation, "
                        "simulation/whatif_shuffled_events.csv)")
    plot_effects(effects, summary, shared.figures_dir(cfg) / "fig_whatif_effects")
    _timed(ctx, "what-if", t0)
    return effects, summary


def run_observed_association(ctx: Context) -> pd.DataFrame:
    """Next to the what-if: what the *train* pairs say about each configured intervention
    (:func:`ehrxdiff.simulation.whatif.observed_association`) - the next film's rate of each finding it is meant to
    lower, with and without it in S_event, at the same previous-film label. The association a model fitted to these
    pairs learns; where it has the opposite sign to the world's effect, the what-if asks for more than Eq. 2 fits.
    Written to ``simulation/whatif_observed.csv`` and ``table_whatif_observed``. Without labels or interventions:
    skipped (an empty table)."""
    defined = ctx.cfg.interventions()
    if not defined or not ctx.has_labels:
        ctx.skip("observed association of the interventions",
                 "no intervention configured" if not defined else "it counts the next film's finding labels")
        return pd.DataFrame()
    cfg = ctx.cfg
    train = ctx.label_rows[ctx.label_rows["split"] == "train"]
    table = observed_association(train, ctx.test.store.texts, defined, max_events=cfg.max_events)
    table.to_csv(sim_dir(cfg) / "whatif_observed.csv", index=False)
    write_table(table.round(4), "table_whatif_observed", shared.figures_dir(cfg), index=False,
                caption=f"Observed association (train pairs, {cfg.max_events} most recent events): the next film's "
                        "rate of each finding an intervention is meant to lower, among pairs whose S_event holds the "
                        "intervention and among those whose S_event does not, at the same previous-film label. "
                        "What a model of P(I_trg | I_prev, S_event) learns; compare the world's effect of adding it "
                        "(table_whatif_agreement, mean_delta_true)")
    return table


# ---------------------------------------------------------------------------------------------- uncertainty
def run_uncertainty(ctx: Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``uncertainty_samples`` predictions for ``uncertainty_pairs`` test pairs (pixel std, P spread), and the
    calibration of P(finding) on the scored test pairs, from the images notebook 04 generated (every seed).
    Without labels: the per-pixel std per pair (``pixel_spread``) and no calibration (empty table)."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ds = ctx.subset(cfg.uncertainty_pairs, pool=ctx.scored)
    keys = ds.pairs["pair_key"].tolist()
    items = [ds[i] for i in range(len(ds))]
    prev = torch.stack([it["prev_image"] for it in items])
    samples = sample_many(ctx.pipe, prev, [EventList.from_store(ds.store, k) for k in keys], keys,
                          n_samples=cfg.uncertainty_samples, **ctx.steps)
    if not ctx.has_labels:
        spread = pixel_spread(samples, keys)
        spread.to_csv(sim_dir(cfg) / "uncertainty_spread.csv", index=False)
        plot_uncertainty(prev, samples, torch.stack([it["target_image"] for it in items]), None, keys,
                         shared.figures_dir(cfg) / "fig_uncertainty")
        ctx.skip("P(finding) spread and calibration", "they need the evaluator's P(finding) and the findings of I_trg")
        _timed(ctx, "uncertainty", t0)
        return spread, pd.DataFrame(columns=["method", "bin", "mean_score", "frequency", "n", "ece"])
    spread = probability_spread(ctx.evaluator, samples, keys)
    spread.to_csv(sim_dir(cfg) / "uncertainty_spread.csv", index=False)
    plot_uncertainty(prev, samples, torch.stack([it["target_image"] for it in items]), spread, keys,
                     shared.figures_dir(cfg) / "fig_uncertainty")
    # calibration on every scored test pair: the model's images (all seeds pooled), I_trg and I_prev for reference
    pairs, root = ctx.scored.pairs, cfg.source_dirs()["mimic_cxr"]
    rows = ctx.label_rows[ctx.label_rows["pair_key"].isin(set(pairs["pair_key"]))][["pair_key", "label", "relation"]]
    scored = []
    for seed in cfg.sample_seeds:
        d = models.sample_dir(cfg, cfg.simulation_model, seed)
        try:
            table = generated_image_table(pairs["pair_key"], d)
        except FileNotFoundError:
            continue
        scored.append((cfg.simulation_model, score_images(cfg, ctx.evaluator, table, d).table))
    scored.append(("I_trg (evaluator on the truth)", score_images(cfg, ctx.evaluator, pair_image_table(pairs, "target"),
                                                                 root).table))
    scored.append(("I_prev (previous image)", score_images(cfg, ctx.evaluator, pair_image_table(pairs, "prev"),
                                                           root).table))
    long = []
    for method, table in scored:
        t = table[list(ctx.evaluator.labels)].rename_axis("pair_key").reset_index()
        t = t.melt(id_vars="pair_key", var_name="label", value_name="score")
        long.append(rows.merge(t, on=["pair_key", "label"]).assign(method=method))
    calib = calibration_table(pd.concat(long, ignore_index=True))
    calib.to_csv(sim_dir(cfg) / "calibration.csv", index=False)
    plot_calibration(calib, shared.figures_dir(cfg) / "fig_calibration")
    _timed(ctx, "uncertainty", t0)
    return spread, calib


# --------------------------------------------------------------------------------------------------- rollout
def run_rollout(ctx: Context) -> pd.DataFrame:
    """Up to ``rollout_chains`` chains of ≤ ``rollout_max_steps`` consecutive test pairs, rolled out."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    chains = admission_chains(ctx.test.pairs, max_steps=cfg.rollout_max_steps, max_chains=cfg.rollout_chains)
    seeds = cfg.sample_seeds[:max(cfg.rollout_seeds, 1)]
    if chains.empty:
        log.warning("no chain of consecutive test pairs: rollout skipped")
        return pd.DataFrame()
    preds = rollout(ctx.pipe, ctx.test, chains, seeds=seeds, **ctx.steps)
    metrics = step_metrics(ctx.evaluator, ctx.test, chains, preds, ctx.label_rows, seeds)
    if not ctx.has_labels:
        ctx.skip("rollout Brier score and AUROC", "no findings of the true films to score P(finding) against; "
                 "compared by pixel MAE, PSNR and SSIM instead")
    metrics.to_csv(sim_dir(cfg) / "rollout.csv", index=False)
    chains.to_csv(sim_dir(cfg) / "rollout_chains.csv", index=False)
    plot_rollout(metrics, shared.figures_dir(cfg) / "fig_rollout")
    plot_rollout_example(ctx.test, chains, preds, int(chains["chain"].iloc[0]),
                         shared.figures_dir(cfg) / "fig_rollout_example")
    _timed(ctx, "rollout", t0)
    return metrics


# --------------------------------------------------------------------------------------------- sampler study
def run_sampler_study(ctx: Context) -> pd.DataFrame:
    """DDIM and DPM-Solver++ at each of ``sampler_study_steps`` on ``sampler_study_pairs`` scored test pairs.
    Without labels: image similarity to I_trg and seconds per image, the previous image as the reference line."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ds = ctx.subset(cfg.sampler_study_pairs, pool=ctx.scored)
    table = sampler_study(ctx.pipe, ctx.evaluator, ds, ctx.label_rows, samplers=cfg.sampler_study_samplers,
                          steps=cfg.sampler_study_steps, seed=cfg.sample_seeds[0], eta=cfg.sample_eta,
                          clip_x0=cfg.sample_clip_x0, batch_size=cfg.sample_batch_size,
                          event_guidance_scale=ctx.steps["event_guidance_scale"])
    table.to_csv(sim_dir(cfg) / "sampler_study.csv", index=False)
    if not ctx.has_labels:
        items = [ds[i] for i in range(len(ds))]
        prev = image_similarity(torch.stack([it["prev_image"] for it in items]),
                                torch.stack([it["target_image"] for it in items]))
        plot_sampler_study(table, shared.figures_dir(cfg) / "fig_sampler_study", reference=prev.mean().to_dict())
        ctx.skip("sampler study AUROC and FID", "no findings to score and no evaluator features; "
                 "image similarity to I_trg and seconds per image instead")
        _timed(ctx, "sampler study", t0)
        return table
    prev = score_images(cfg, ctx.evaluator, pair_image_table(ds.pairs, "prev"), cfg.source_dirs()["mimic_cxr"])
    rows = ctx.label_rows[ctx.label_rows["pair_key"].isin(set(ds.pairs["pair_key"]))]
    summary, _ = score_method(rows, prev.table, method="previous image")
    ref = {f"AUROC {s}": a for s, a in zip(summary["subset"], summary["auroc"])}
    plot_sampler_study(table, shared.figures_dir(cfg) / "fig_sampler_study", reference=ref)
    _timed(ctx, "sampler study", t0)
    return table


# ------------------------------------------------------------------------------------------ interactive panel
def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def what_if_panel(ctx: Context):
    """JupyterLab panel: pick a scored test pair, untick events to drop them, add an intervention at an hour,
    press *predict*. Under papermill the widgets are built but no callback runs (nothing is predicted)."""
    import ipywidgets as w  # optional: JupyterLab's widgets
    cfg, pairs = ctx.cfg, ctx.scored.pairs
    defined = cfg.interventions()
    pick = w.Dropdown(options=pairs["pair_key"].tolist(), description="pair")
    events = w.SelectMultiple(rows=10, description="events on", layout=w.Layout(width="95%"))
    add = w.Dropdown(options=["(none)", *defined], description="add")
    hours = w.FloatText(value=0.0, description="at hour")
    go = w.Button(description="predict", button_style="primary")
    out = w.Output()

    def load(_=None):
        lst = EventList.from_store(ctx.scored.store, pick.value)
        events.options = [(f"{i:3d} +{e.hours:5.1f} h  {e.text[:110]}", i) for i, e in enumerate(lst.events)]
        events.value = tuple(range(len(lst)))
        hours.value = added_hours(lst)

    def predict(_=None):
        factual = EventList.from_store(ctx.scored.store, pick.value)
        edited = factual.drop([i for i in range(len(factual)) if i not in set(events.value)])
        if add.value != "(none)":
            emb = prepare.make_embedder(cfg)
            edited = edited.add_intervention(defined[add.value], hours.value, embedder=emb.embed,
                                             text_style=cfg.text_style).window(cfg.max_events, cfg.event_budget_last)
            emb.close()
        i = int(np.flatnonzero(pairs["pair_key"].to_numpy() == pick.value)[0])
        with out:
            out.clear_output(wait=True)
            res = what_if(ctx.pipe, ctx.scored[i]["prev_image"], factual, edited, pair_key=pick.value,
                          seeds=ctx.whatif_seeds, evaluator=ctx.evaluator, **ctx.steps)
            plot_what_if(res, title=f"{pick.value[:8]}…: {len(factual)} factual events → {len(edited)} edited")
            plt.show()

    pick.observe(load, names="value")
    go.on_click(predict)
    load()
    return w.VBox([pick, events, w.HBox([add, hours, go]), out])
