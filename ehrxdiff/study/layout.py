"""The run folder: every path under ``run_dir`` is named here and built nowhere else (issue 17: one owner).

A stage asks for its paths by name (``layout(cfg).pairs``, ``layout(cfg).sample_dir(run, seed)``) and writes only
into its own folder; the notebook in brackets is the stage that writes it, every later stage only reads it::

    runs/<profile>/                      run_dir (config; one per study, so two studies never overwrite each other)
      cohort/      pairs.parquet, cohort_report.csv, rejected_images.csv,
                   image_labels.parquet (own cohort with finding columns)                         [01]
      events/      events.parquet, event_texts.parquet, event_report.csv, event_filter_unmatched.csv,
                   samples.parquet: the pairs with >= 1 event, re-split (what 03-07 read)          [02]
      event_store/ texts, embeddings, per-pair event ids and hours (ehrxdiff.data.event_store)          [02]
      clip/        checkpoints, final/, history, retrieval_valid.csv                               [03]
      vae/         the first stage (trained, or converted from a Cheff checkpoint)                 [04]
      ldm/<model>/ checkpoints, pipeline/, history.csv; ldm/conditioning_sensitivity.csv           [04]
      latent_cache/{first_stage,conditions}-<fingerprint>/   frozen encoders' outputs (ehrxdiff.training.cache) [04]
      samples/<run>/seed<k>/<pair_key>.png, samples/shuffled_events.csv,
              samples/vae-reconstruction/seed0/, samples/reidentification.csv                      [04]
      eval/        evaluator/, *.csv (auroc_summary, demographics, claims, ...)                    [05]
      simulation/  what-if, uncertainty, rollout and sampler-study CSVs                            [07]
      notebooks/, timings.csv     the executed notebooks and their times (run_all.sh)

The synthetic world's ground-truth sidecar (``<data_dir>/synthetic/ground_truth/``, written by
:mod:`ehrxdiff.synthetic`) is read through :meth:`RunLayout.ground_truth` too, so its path is also built once.
Directories are created when asked for (:meth:`RunLayout.dir`); file paths are only named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ehrxdiff.config import StudyConfig


@dataclass(frozen=True)
class RunLayout:
    root: Path
    synthetic_root: Path | None = None

    def dir(self, *parts: str) -> Path:
        """``run_dir/<parts>``, created if missing."""
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    # -- 01-02: cohort and events ------------------------------------------------------------------------
    @property
    def cohort(self) -> Path:
        return self.dir("cohort")

    @property
    def pairs(self) -> Path:
        return self.root / "cohort" / "pairs.parquet"

    @property
    def samples(self) -> Path:
        """The pairs with >= 1 event, re-split by notebook 02 (its own output: notebook 01's ``pairs.parquet``
        is never rewritten): what notebooks 03-07 train and score on."""
        return self.root / "events" / "samples.parquet"

    @property
    def image_labels(self) -> Path:
        """An own cohort's finding labels (only when its images table has finding columns)."""
        return self.root / "cohort" / "image_labels.parquet"

    @property
    def events(self) -> Path:
        return self.dir("events")

    @property
    def event_store(self) -> Path:
        return self.root / "event_store"

    # -- 03-04: models, caches, samples -------------------------------------------------------------------
    @property
    def clip(self) -> Path:
        return self.dir("clip")

    @property
    def clip_final(self) -> Path:
        return self.root / "clip" / "final"

    @property
    def vae(self) -> Path:
        return self.dir("vae")

    def ldm(self, name: str | None = None) -> Path:
        """``ldm/`` (the models' shared tables) or ``ldm/<name>/`` (one model's training run)."""
        return self.dir("ldm", name) if name else self.dir("ldm")

    def ldm_pipeline(self, name: str) -> Path:
        return self.root / "ldm" / name / "pipeline"

    @property
    def latent_cache(self) -> Path:
        return self.dir("latent_cache")

    @property
    def samples_root(self) -> Path:
        return self.dir("samples")

    def sample_dir(self, folder: str, seed: int) -> Path:
        """One sampling run's PNGs (``folder``: ``study.SampleRun.folder``), not created (the sampler does)."""
        return self.root / "samples" / folder / f"seed{seed}"

    @property
    def reconstruction_dir(self) -> Path:
        return self.root / "samples" / "vae-reconstruction" / "seed0"

    @property
    def shuffled_events(self) -> Path:
        return self.root / "samples" / "shuffled_events.csv"

    @property
    def reidentification(self) -> Path:
        """Patient re-identification of the scored predictions (notebook 04 computes and shows it; 05 reads it)."""
        return self.root / "samples" / "reidentification.csv"

    # -- 05-07: evaluation and simulation -----------------------------------------------------------------
    @property
    def eval(self) -> Path:
        return self.dir("eval")

    @property
    def evaluator_best(self) -> Path:
        return self.root / "eval" / "evaluator" / "best"

    @property
    def simulation(self) -> Path:
        return self.dir("simulation")

    # -- the synthetic world's truth ----------------------------------------------------------------------
    def ground_truth(self, name: str) -> Path:
        """``ground_truth/<name>.parquet`` of the synthetic world (``images``, ``course``, …)."""
        if self.synthetic_root is None:
            raise FileNotFoundError("no ground truth: this study does not run on the synthetic world")
        return self.synthetic_root / "ground_truth" / f"{name}.parquet"


def layout(cfg: StudyConfig) -> RunLayout:
    """The layout of ``cfg``'s run folder (and, on the synthetic world, of its ground truth)."""
    return RunLayout(cfg.path("run_dir"), cfg.synthetic_root if cfg.synthetic else None)
