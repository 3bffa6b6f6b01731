"""The results page's numbers, assembled from a finished run's files — so no number there is carried by hand.

``python -m ehrxdiff.study.results_digest runs/demo figures --readme docs/results.md`` replaces the block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in that page with: run times (``timings.csv``), Tables I–IV
(``figures/table*.md``), the diffusion models' training (``ldm/training_summary.csv``) and conditioning
sensitivity (``figures/table_conditioning_sensitivity.md``), the event guidance sweep
(``figures/table_guidance_sweep.md``), patient re-identification (``samples/reidentification.csv``), the paper's claims
(``eval/claims.csv``), CLIP retrieval (``clip/retrieval_valid.csv``) and notebook 07's what-if agreement, calibration,
rollout and sampler study (``simulation/*.csv``). A part whose file is missing is left out with a line saying so.
The prose that interprets the numbers stays outside the block, written by a person who has read them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ehrxdiff.reporting.tables import TABLE_NAMES, reidentification_summary, to_markdown
from ehrxdiff.study.layout import RunLayout

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _num(x, digits: int = 3):
    return round(float(x), digits) if pd.notna(x) else "–"


def _timings(run: Path) -> str:
    t = pd.read_csv(run / "timings.csv")
    rows = t[["notebook", "seconds"]].astype({"seconds": int})
    total = int(rows["seconds"].sum())
    body = to_markdown(rows, index=False)
    upto06 = int(rows.loc[~rows["notebook"].str.startswith("07"), "seconds"].sum())
    return (f"**Run times** (`{run}/timings.csv`): {total} s = {total / 60:.1f} min in all; notebooks 01–06 "
            f"(Tables I–IV and the paper's figures) {upto06 / 60:.1f} min.\n\n{body}")


def _reidentification(run: Path) -> str:
    r = pd.read_csv(RunLayout(run).reidentification)
    df = reidentification_summary(r)
    n, chance = int(r["n"].iloc[0]), float(r["chance_top1"].iloc[0])
    return (f"**Do the predictions follow the previous image?** Patient re-identification from I_prev on the {n} scored "
            f"test pairs (`ehrxdiff.evaluation.identity`; chance: top-1 {chance:.3f}, rank 0.5; GT = the real next film):\n\n"
            + to_markdown(df.rename_axis("method").reset_index(), index=False))


def _training(run: Path) -> str:
    t = pd.read_csv(run / "ldm" / "training_summary.csv", index_col=0)
    out = t[[c for c in ("steps", "samples_seen", "seconds", "samples_per_second") if c in t]].copy()
    out["seconds"] = out["seconds"].round(0)
    out["samples_per_second"] = out["samples_per_second"].round(1)
    return (f"**Diffusion models trained** (`{run}/ldm/training_summary.csv`; samples/s of each model's own process):\n\n"
            + to_markdown(out.rename_axis("model").reset_index(), index=False))


def _claims(run: Path) -> str:
    c = pd.read_csv(run / "eval" / "claims.csv")
    for col in ("ours", "ours sd", "compared with", "compared sd", "difference", "spread", "margin"):
        if col in c:
            c[col] = c[col].map(_num)
    return f"**The paper's claims, checked on these numbers** (`{run}/eval/claims.csv`):\n\n" + to_markdown(c, index=False)


def _retrieval(run: Path) -> str:
    r = pd.read_csv(run / "clip" / "retrieval_valid.csv")
    r = r[r["k"].isin([1, 5, 10])].copy()
    for col in ("recall", "chance", "z"):
        r[col] = r[col].map(_num)
    return (f"**CLIP pre-training** (`{run}/clip/retrieval_valid.csv`, {int(r['n'].iloc[0])} validation pairs; "
            "z = margin over chance in SDs of the hit count under random ranking):\n\n"
            + to_markdown(r[["direction", "k", "recall", "chance", "z"]], index=False))


def _whatif(run: Path) -> str:
    w = pd.read_csv(run / "simulation" / "whatif_agreement.csv")
    cols = {"intervention": "added", "label": "finding", "events": "S_event", "n_pairs": "pairs",
            "lowers_rate": "model: P fell (share)",
            "mean_delta_p": "model: mean ΔP", "true_lowers_rate": "world: severity fell (share)",
            "mean_delta_true": "world: mean Δseverity", "agreement": "agreement", "n_true_effect": "pairs with a true effect"}
    w = w[[c for c in cols if c in w]].rename(columns=cols)
    for c in ("model: P fell (share)", "world: severity fell (share)", "agreement"):
        w[c] = w[c].map(lambda x: _num(x, 2))
    for c in ("model: mean ΔP", "world: mean Δseverity"):
        w[c] = w[c].map(lambda x: f"{x:+.2g}" if pd.notna(x) else "–")
    w["pairs with a true effect"] = w["pairs with a true effect"].astype(int)
    return (f"**What-if** (notebook 07; `{run}/simulation/whatif_agreement.csv`; the world's true effect from "
            "re-simulating the same course with the intervention added; shuffled S_event: the same edit on another "
            "pair's events, scored against this pair's truth):\n\n" + to_markdown(w, index=False))


def _observed(run: Path) -> str:
    o = pd.read_csv(run / "simulation" / "whatif_observed.csv")
    cols = {"intervention": "in S_event", "label": "finding", "previous_label": "previous film", "n_with": "pairs with",
            "rate_with": "next film: rate with", "n_without": "pairs without", "rate_without": "rate without",
            "difference": "difference"}
    o = o[list(cols)].rename(columns=cols)
    for c in ("next film: rate with", "rate without"):
        o[c] = o[c].map(lambda x: _num(x, 3))
    o["difference"] = o["difference"].map(lambda x: f"{x:+.3f}" if pd.notna(x) else "–")
    return (f"**Observed association** (notebook 07; `{run}/simulation/whatif_observed.csv`; train pairs: the next "
            "film's rate of each finding an intervention is meant to lower, with and without it among the events "
            "the model sees, at the same previous-film label - what a model fitted to the pairs learns):\n\n"
            + to_markdown(o, index=False))


def _calibration(run: Path) -> str:
    c = pd.read_csv(run / "simulation" / "calibration.csv").groupby("method", sort=False)["ece"].first()
    return ("**Calibration** (ECE of P(finding) against the true target's labels): "
            + ", ".join(f"{m} {v:.3f}" for m, v in c.items()) + ".")


def _rollout(run: Path) -> str:
    r = pd.read_csv(run / "simulation" / "rollout.csv")
    r = r[r["metric"] == "AUROC (pooled)"]
    t = r.groupby(["method", "step"], sort=False)["value"].mean().unstack("step").round(3)
    t.columns = [f"step {c}" for c in t.columns]
    return ("**Rollout** over admissions (pooled AUROC of the evaluator against the true image's labels, by step):\n\n"
            + to_markdown(t.rename_axis("method").reset_index(), index=False))


def _sampler(run: Path) -> str:
    s = pd.read_csv(run / "simulation" / "sampler_study.csv")
    t = s.pivot_table(index=["sampler", "steps"], columns="metric", values="value", sort=False).round(3)
    n = int(s["n_pairs"].iloc[0])
    return (f"**Sampler study** (same {n} pairs and seed; with few pairs the *diff* subset is small and noisy):\n\n"
            + to_markdown(t.reset_index(), index=False))


def digest(run_dir: str | Path, figures_dir: str | Path) -> str:
    """The results block (module docstring) as Markdown."""
    run, fig = Path(run_dir), Path(figures_dir)
    parts = []
    for name, fn in (("timings", lambda: _timings(run)),
                     *((t, (lambda t=t: (fig / f"{t}.md").read_text().strip())) for t in TABLE_NAMES),
                     ("training", lambda: _training(run)),
                     ("conditioning sensitivity",
                      lambda: (fig / "table_conditioning_sensitivity.md").read_text().strip()),
                     ("guidance sweep", lambda: (fig / "table_guidance_sweep.md").read_text().strip()),
                     ("re-identification", lambda: _reidentification(run)), ("claims", lambda: _claims(run)),
                     ("CLIP retrieval", lambda: _retrieval(run)), ("what-if", lambda: _whatif(run)),
                     ("observed association", lambda: _observed(run)),
                     ("calibration", lambda: _calibration(run)), ("rollout", lambda: _rollout(run)),
                     ("sampler study", lambda: _sampler(run))):
        try:
            parts.append(fn())
        except FileNotFoundError as e:
            parts.append(f"*{name}: not in this run ({Path(e.filename).name if e.filename else e} missing).*")
    return "\n\n".join(p.strip() for p in parts)


def update_readme(readme: str | Path, block: str) -> None:
    """Replace the text between the results markers (both must be present, in order)."""
    path = Path(readme)
    text = path.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path}: needs {BEGIN} ... {END} around the results block")
    path.write_text(text[: i + len(BEGIN)] + "\n" + block + "\n" + text[j:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("figures_dir")
    ap.add_argument("--readme", help="update this page's results block (docs/results.md) instead of printing")
    a = ap.parse_args(argv)
    block = digest(a.run_dir, a.figures_dir)
    if a.readme:
        update_readme(a.readme, block)
    else:
        print(block)


if __name__ == "__main__":
    main()
