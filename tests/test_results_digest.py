"""The README's results block is assembled from a run's files (ehrxdiff.study.results_digest)."""
import pandas as pd
import pytest

from ehrxdiff.study.results_digest import BEGIN, END, digest, update_readme


def test_digest_reads_the_run_files_and_names_what_is_missing(tmp_path):
    run, fig = tmp_path / "run", tmp_path / "figures"
    (run / "eval").mkdir(parents=True)
    fig.mkdir()
    pd.DataFrame({"notebook": ["01_a.ipynb", "07_b.ipynb"], "status": "ok", "seconds": [60, 120]}).to_csv(
        run / "timings.csv", index=False)
    pd.DataFrame({"claim": ["w_null beats the previous image on diff"], "ours": [0.61234], "compared with": [0.2],
                  "holds": [True]}).to_csv(run / "eval" / "claims.csv", index=False)
    (fig / "table1_cohort.md").write_text("**Table I**\n\n| a |\n|---|\n| 1 |\n")
    (run / "ldm").mkdir()
    pd.DataFrame({"steps": [600], "steps_this_run": [600], "samples_seen": [38400], "seconds": [300.4],
                  "samples_per_second": [127.84]}, index=pd.Index(["EHRXDiff"])).to_csv(run / "ldm" / "training_summary.csv")
    text = digest(run, fig)
    assert "| EHRXDiff | 600 | 38400 | 300.0 | 127.8 |" in text
    assert "*conditioning sensitivity: not in this run (table_conditioning_sensitivity.md missing).*" in text
    assert "180 s = 3.0 min in all; notebooks 01–06 (Tables I–IV and the paper's figures) 1.0 min" in text
    assert "| w_null beats the previous image on diff | 0.612 | 0.2 | True |" in text
    assert "**Table I**" in text and "*table2_imagenome_auroc: not in this run (table2_imagenome_auroc.md missing).*" in text
    assert "*re-identification: not in this run (reidentification.csv missing).*" in text


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold numbers\n{END}\nprose\n")
    update_readme(readme, "new numbers")
    assert readme.read_text() == f"intro\n{BEGIN}\nnew numbers\n{END}\nprose\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="results:begin"):
        update_readme(readme, "x")
