"""One owner of the run folder (issue 17): every path under ``run_dir`` is named in :mod:`ehrxdiff.layout`, and no
stage writes into an earlier stage's folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ehrxdiff.config import load_config
from ehrxdiff.layout import RunLayout, layout

PACKAGE = Path(__file__).resolve().parents[1] / "ehrxdiff"


def test_no_module_but_the_layout_builds_paths_under_run_dir():
    """``cfg.path("run_dir")`` (and the synthetic world's ``ground_truth/``) appear only in layout.py and in
    config.py's own CLI; any other module asking for them would be a second owner of the layout."""
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name in ("layout.py", "config.py") or "synthetic" in f.parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r'path\("run_dir"\)|"ground_truth"\s*/', line):
                offenders.append(f"{f.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not offenders, "paths under run_dir built outside ehrxdiff/layout.py:\n" + "\n".join(offenders)


def test_each_stage_writes_its_own_folder(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.pairs.parent.name == "cohort"                         # 01
    assert lay.samples.parent == tmp_path / "events"                  # 02's re-split: not in 01's folder
    assert lay.reidentification.parent == tmp_path / "samples"        # 04 computes it beside its samples
    assert lay.evaluator_best.is_relative_to(tmp_path / "eval")       # 05
    assert lay.sample_dir("EHRXDiff@own-s1", 2) == tmp_path / "samples" / "EHRXDiff@own-s1" / "seed2"
    assert not (tmp_path / "samples").exists()                         # naming a file creates nothing ...
    assert lay.ldm("EHRXDiff").is_dir() and lay.eval.is_dir()         # ... asking for a folder creates it
    with pytest.raises(FileNotFoundError, match="does not run on the synthetic world"):
        lay.ground_truth("images")


def test_layout_follows_the_config(tmp_path):
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "r")})
    lay = layout(cfg)
    assert lay.root == tmp_path / "r" and lay.ground_truth("course").name == "course.parquet"
    assert lay.ground_truth("images").parent.parent == cfg.synthetic_root
