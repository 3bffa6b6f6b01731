"""Notebooks 01–02: the cohort of (I_prev, I_trg) pairs (§II-B, Table I) and each pair's S_event; the finding labels
of the pairs (Chest ImaGenome or the own cohort's columns), which notebooks 04 (event_global: findings) to 07 read.

Each step is idempotent (it reuses what an earlier run wrote, so a notebook can be re-run or resumed cheaply) and maps
the :class:`~ehrxdiff.config.StudyConfig` onto the explicit keyword arguments of the modules that do the work. Every
path under ``run_dir`` comes from :mod:`ehrxdiff.study.layout` (``layout(cfg)``), which names them all in one place.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ehrxdiff.config import StudyConfig
from ehrxdiff.data import cohort, embedding
from ehrxdiff.data.cohort import assign_splits, format_table1, table1
from ehrxdiff.data.datasets import PairDataset
from ehrxdiff.data.event_store import EventStore, build_event_store
from ehrxdiff.data.events import EventResult, extract_events_to_dir
from ehrxdiff.data.labels import image_labels, pair_label_rows, read_relations
from ehrxdiff.data.own_cohort import build_own_cohort, extract_own_events
from ehrxdiff.data.schemas import IMAGENOME_RELATIONS
from ehrxdiff.reporting.tables import write_table
from ehrxdiff.study.layout import layout
from ehrxdiff.study.shared import figures_dir
from ehrxdiff.synthetic import generate_world

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- 01
def prepare_sources(cfg: StudyConfig) -> dict[str, Path]:
    """The release roots: real downloads when configured, otherwise the synthetic world (generated once)."""
    if cfg.own_cohort:
        for key in ("own_images", "own_events"):
            if not cfg.path(key).is_file():
                raise FileNotFoundError(f"{key}: {cfg.path(key)} does not exist")
    if cfg.synthetic:
        t0 = time.perf_counter()
        generate_world(cfg.synthetic_root, n_patients=cfg.synthetic_n_patients, seed=cfg.synthetic_seed,
                       image_size=cfg.synthetic_image_size)
        log.info("synthetic world ready in %.1f s", time.perf_counter() - t0)
    dirs = cfg.source_dirs()
    for name, p in dirs.items():
        if not p.exists():
            raise FileNotFoundError(f"{name} directory {p} does not exist (check the *_dir parameters)")
    return dirs


def build_cohort(cfg: StudyConfig, *, force: bool = False):
    """Pairs and the drop funnel (paper-reference §2), cached under ``run_dir/cohort``."""
    out = layout(cfg).cohort
    if not force and layout(cfg).pairs.exists() and (out / "cohort_report.csv").exists():
        res = cohort.CohortResult(pd.read_parquet(layout(cfg).pairs), pd.read_csv(out / "cohort_report.csv"))
        check_pairs(res.pairs, where=f"the cohort in {out}", report=res.report)
        return res
    src = prepare_sources(cfg)
    # the pairing and split keys both sources take (cohort.pair_images is the one pairing step)
    pairing = dict(pairing=cfg.pairing, max_interval_hours=cfg.max_interval_hours, split_seed=cfg.split_seed,
                   test_fraction=cfg.test_fraction, valid_fraction=cfg.valid_fraction, split_file=cfg.split_file,
                   check_images=cfg.check_images, threads=cfg.duckdb_threads)
    if cfg.own_cohort:
        res = build_own_cohort(cfg.path("own_images"), image_root=src["mimic_cxr"], **pairing)
        where = f"the own cohort ({cfg.path('own_images')})"
    else:
        res = cohort.build_cohort(src["mimic_iv"], src["mimic_cxr"], min_age=cfg.min_age,
                                  memory_limit=cfg.duckdb_memory_limit, **pairing)
        where = f"the cohort of {src['mimic_iv']} and {src['mimic_cxr']}"
    res.write(out)
    check_pairs(res.pairs, where=where, report=res.report)
    return res


class EmptyCohortError(ValueError):
    """The study would go on with no pairs, or with a split that has none: said where it happens (notebook 01/02),
    not later by a trainer or an AUROC with an unrelated message."""


class StaleEventsError(ValueError):
    """A run folder's extracted events were made with other event settings than the config's: reusing them would
    train and score on an S_event the config does not describe."""


# config key -> the key extract_events_to_dir records in event_meta.json (and what an older folder's absence meant)
_EVENT_SETTINGS = {"max_events": ("max_events", None), "text_style": ("text_style", None),
                   "event_window_end": ("window_end", None), "drug_matching": ("drug_matching", None),
                   "event_budget_last": ("budget_last", [])}


def check_events_match(cfg: StudyConfig, ev_dir: Path) -> None:
    """Refuse ``ev_dir`` when its ``event_meta.json`` records event settings that differ from ``cfg``'s (a folder
    extracted before ``event_budget_last`` existed used the most recent ``max_events``). Folders that record none
    (an own cohort's) are not checked."""
    meta_path = ev_dir / "event_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "max_events" not in meta:
        return
    diff = [f"{key} {meta.get(rec, absent)!r} (config: {getattr(cfg, key)!r})"
            for key, (rec, absent) in _EVENT_SETTINGS.items()
            if (rec in meta or absent is not None) and meta.get(rec, absent) != getattr(cfg, key)]
    if diff:
        raise StaleEventsError(f"{meta_path}: these events were extracted with {'; '.join(diff)}. Delete "
                               f"{ev_dir} and {layout(cfg).event_store} (and the models trained on them), or use "
                               "another run_dir, to extract them again.")


def _funnel_text(report: pd.DataFrame) -> str:
    """The cohort report's funnel in one line: each kept count and the drops that emptied it."""
    parts = []
    for r in report.itertuples():
        if r.kind == "kept" or int(r.n):
            parts.append(f"{r.what}: {int(r.n):,}" + ("" if r.kind == "kept" else " dropped"))
    return "; ".join(parts)


def check_pairs(pairs: pd.DataFrame, *, where: str, report: pd.DataFrame | None = None,
                splits=("train", "valid", "test")) -> None:
    """Stop with :class:`EmptyCohortError` when ``pairs`` is empty or one of ``splits`` has no pair (issue 15)."""
    if not len(pairs):
        why = f" The funnel (cohort_report.csv): {_funnel_text(report)}." if report is not None else ""
        raise EmptyCohortError(f"{where}: 0 pairs.{why} Check that the images link to admissions (times, ids) and "
                               "that max_interval_hours / pairing / min_age keep some pairs.")
    counts = pairs["split"].value_counts() if "split" in pairs else pd.Series(dtype=int)
    empty = [s for s in splits if int(counts.get(s, 0)) == 0]
    if empty:
        raise EmptyCohortError(f"{where}: {len(pairs):,} pairs, but none in the {', '.join(empty)} split(s) "
                               f"(counts: {counts.to_dict()}). Use more patients, change test_fraction / "
                               "valid_fraction, or give a split_file that fills every split.")
    if "subject_id" in pairs and "valid" in splits:
        # one patient's pairs are one sex and one course: the evaluator's and the models' selection on valid
        # (AUROC, sex AUROC, age r) is then NaN or meaningless, which no later message explains
        patients = pairs[pairs["split"] == "valid"]["subject_id"].nunique()
        if patients < 2:
            warnings.warn(f"{where}: the valid split holds {patients} patient(s) ({int(counts.get('valid', 0))} "
                          "pairs): model selection on it (the evaluator's best epoch by AUROC / sex AUROC / age r) is "
                          "meaningless. Raise valid_fraction or give a split_file with at least 2 patients in valid.",
                          stacklevel=2)


def write_table1(cfg: StudyConfig, pairs: pd.DataFrame) -> pd.DataFrame:
    """Table I (patients, admissions, samples, mean interval per split) as CSV, Markdown and LaTeX; returns it as
    written (counts as integers, not the floats a numeric frame shows)."""
    t1 = table1(pairs)
    shown = format_table1(t1)
    write_table(shown, "table1_cohort", figures_dir(cfg), caption="Table I: cohort statistics per split")
    return shown


# ---------------------------------------------------------------------------------------------------- 02
@dataclass
class EventsStep:
    events: object          # ehrxdiff.data.events.EventResult
    store: object           # ehrxdiff.data.event_store.EventStore
    embedder_stats: dict
    samples: pd.DataFrame | None = None   # the study's samples (pairs with >= 1 event, re-split): Table I's rows


def make_embedder(cfg: StudyConfig):
    """The configured backend with its on-disk cache (shared by runs: keyed by backend and model)."""
    cache = cfg.path("data_dir") / "cache" / f"embeddings-{cfg.embedding_backend}.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cfg.embedding_backend == "hashing":
        return embedding.make_embedder("hashing", cache_path=cache, dim=cfg.embedding_dim)
    if cfg.embedding_backend == "local":
        return embedding.make_embedder("local", cache_path=cache, model_path=cfg.embedding_model_path)
    common = dict(cache_path=cache, data_is_synthetic=cfg.synthetic, allow_external_api=cfg.allow_external_api,
                  provider=cfg.openai_provider)
    if cfg.openai_provider == "azure":   # Azure addresses a deployment of the model, under its endpoint
        return embedding.make_embedder("openai", **common, model=cfg.openai_azure_deployment or cfg.openai_model,
                                       azure_endpoint=cfg.openai_azure_endpoint, api_version=cfg.openai_api_version)
    return embedding.make_embedder("openai", **common, model=cfg.openai_model, base_url=cfg.openai_base_url)


def load_events(cfg: StudyConfig):
    """The extracted events as notebook 02 wrote them (read-only: no re-split, no embedding)."""
    ev_dir = layout(cfg).events
    if not (ev_dir / "events.parquet").exists():
        raise FileNotFoundError(f"{ev_dir}/events.parquet not found: run notebook 02 first")
    return EventResult.read(ev_dir, cfg.text_style)


def build_events(cfg: StudyConfig, pairs: pd.DataFrame, *, force: bool = False) -> EventsStep:
    """S_event per pair (§II-D) → unique texts → embeddings → the compact event store (D8).

    ``pairs`` must be the whole cohort: the study's samples are re-split from it (``_resplit``). Readers
    that only need the events call :func:`load_events`."""
    ev_dir, store_dir = layout(cfg).events, layout(cfg).event_store
    if not force and (ev_dir / "events.parquet").exists():
        check_events_match(cfg, ev_dir)
        ev = load_events(cfg)
    else:
        src = prepare_sources(cfg)
        if cfg.own_cohort:
            extract_own_events(cfg.path("own_events"), pairs, max_events=cfg.max_events, text_style=cfg.text_style,
                               threads=cfg.duckdb_threads, window_end=cfg.event_window_end,
                               budget_last=tuple(cfg.event_budget_last)).write(ev_dir)
        else:  # streamed by DuckDB to parquet (bounded memory at full MIMIC scale), then read back
            extract_events_to_dir(src["mimic_iv"], pairs, ev_dir, max_events=cfg.max_events,
                                  text_style=cfg.text_style, filter_inputevents=cfg.filter_inputevents,
                                  drug_matching=cfg.drug_matching, window_end=cfg.event_window_end,
                                  budget_last=tuple(cfg.event_budget_last),
                                  memory_limit=cfg.duckdb_memory_limit, threads=cfg.duckdb_threads)
        ev = load_events(cfg)
    samples = _resplit(cfg, pairs, ev.pair_keys)
    if not force and store_dir.exists():
        return EventsStep(ev, EventStore.open(store_dir), {}, samples)
    emb = make_embedder(cfg)
    store = build_event_store(ev_dir, emb, store_dir, progress=True)  # streams from the parquet files
    stats = dict(getattr(emb, "stats", {}) or {})
    emb.close()
    return EventsStep(ev, store, stats, samples)


def _resplit(cfg: StudyConfig, pairs: pd.DataFrame, kept_keys) -> pd.DataFrame:
    """The samples of the study: pairs that kept ≥ 1 event, split *after* that filter as the reference does
    (ehr.py make_input: drop pairs with < 1 event, then the patient-level split, §2.7), written as notebook 02's own
    ``events/samples.parquet`` (notebook 01's pairs stay as they are). Table I is drawn again from these (the paper
    counts samples with events)."""
    out = layout(cfg).samples
    kept = pairs[pairs["pair_key"].isin(set(kept_keys))].reset_index(drop=True)
    if cfg.split_file is None:
        kept["split"] = assign_splits(kept, split_seed=cfg.split_seed, test_fraction=cfg.test_fraction,
                                      valid_fraction=cfg.valid_fraction).to_numpy()
    kept.to_parquet(out, index=False)
    write_table1(cfg, kept)
    check_pairs(kept, where=f"the study's samples (pairs with >= 1 event, {out})")
    return kept


def load_pairs_with_events(cfg: StudyConfig) -> tuple[pd.DataFrame, object]:
    """The study's samples (pairs with events, split after the event filter) and the event store."""
    pairs = pd.read_parquet(layout(cfg).samples)
    store = EventStore.open(layout(cfg).event_store)
    return pairs[pairs["pair_key"].isin(set(store.pair_keys))].reset_index(drop=True), store


def datasets(cfg: StudyConfig, splits=("train", "valid", "test")) -> dict:
    """PairDatasets per split, images from the MIMIC-CXR root at ``image_size``."""
    pairs, store = load_pairs_with_events(cfg)
    root = cfg.source_dirs()["mimic_cxr"]
    return {s: PairDataset(pairs, root, store, image_size=cfg.image_size, max_events=cfg.max_events, split=s)
            for s in splits}


# ------------------------------------------------------------------------------------------ finding labels


def missing_labels_reason(cfg: StudyConfig) -> str | None:
    """Why this study has no finding labels (None when it has them): the one sentence every skip record and
    message repeats, so a user reads the same cause in notebooks 05, 06 and 07."""
    if cfg.own_cohort:
        path = layout(cfg).image_labels
        if not path.exists():
            return (f"no finding labels: the images table {cfg.own_images} has no finding columns "
                    f"({path.name} was not written; docs/own-cohort.md)")
        return None
    if not cfg.synthetic and "imagenome" not in cfg.source_dirs():
        return "no finding labels: imagenome_dir (Chest ImaGenome) is not set"
    return None


def has_labels(cfg: StudyConfig) -> bool:
    """Whether the finding labels exist, i.e. whether Tables II/IV, calibration and the what-if probabilities
    can be computed (:func:`missing_labels_reason` says why not)."""
    return missing_labels_reason(cfg) is None


def label_rows(cfg: StudyConfig, pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image-level labels, Table II rows) from the Chest ImaGenome relations file (§10.1)."""
    if cfg.own_cohort:  # labels come with the images table (own_cohort writes them in labels.image_labels' layout)
        path = layout(cfg).image_labels
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the evaluation needs finding columns in {cfg.own_images} "
                                    "(docs/own-cohort.md)")
        labels = pd.read_parquet(path)
        return labels, pair_label_rows(pairs, labels)
    src = cfg.source_dirs()
    if "imagenome" not in src:
        raise FileNotFoundError("the evaluation needs Chest ImaGenome: set imagenome_dir")
    labels = image_labels(read_relations(src["imagenome"] / IMAGENOME_RELATIONS))
    return labels, pair_label_rows(pairs, labels)
