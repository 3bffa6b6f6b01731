"""One owner of the run folder (issue 17): every path under ``run_dir`` is named in :mod:`ehrxdiff.study.layout`, and no
stage writes into an earlier stage's folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ehrxdiff.config import load_config
from ehrxdiff.study.layout import RunLayout, layout

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


# --------------------------------------------------------------------------------------------- package layout
STAGES = ("data", "models", "training", "evaluation", "simulation", "reporting", "study", "bench")
"""The subpackages in the order data flows (raw → cohort → events → CLIP → LDM → samples → metrics → tables);
a stage may import only from the stages before it (plus ``config``, ``constants`` and the synthetic world)."""


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every ``from ehrxdiff… import`` in ``path``, local imports included."""
    import ast
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ehrxdiff"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
    return out


def test_top_level_holds_config_constants_and_the_stage_subpackages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert modules == ["__init__.py", "config.py", "constants.py"]
    assert packages == sorted(STAGES + ("synthetic",))


def test_stages_import_only_from_earlier_stages():
    offenders = []
    for stage in STAGES:
        allowed = {"config", "constants", "synthetic", stage, *STAGES[:STAGES.index(stage)]}
        for f in sorted((PACKAGE / stage).rglob("*.py")):
            for line, module, names in _imports(f):
                parts = module.split(".")
                target = parts[1] if len(parts) > 1 else None
                targets = [target] if target else names        # ``from ehrxdiff import x``
                if module.startswith("."):
                    offenders.append(f"{f.relative_to(PACKAGE)}:{line}: relative import {module}")
                offenders += [f"{f.relative_to(PACKAGE)}:{line}: {stage} imports {t}" for t in targets
                              if t not in allowed]
    assert not offenders, "imports against the data flow:\n" + "\n".join(offenders)


def test_no_private_name_is_imported_across_modules():
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    offenders = [f"{f.relative_to(PACKAGE.parent)}:{line}: {module}.{n}"
                 for f in sorted(PACKAGE.rglob("*.py")) for line, module, names in _imports(f)
                 for n in names if n.startswith("_") and not n.startswith("__")]
    for nb in sorted(notebooks.glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in __import__("json").loads(nb.read_text())["cells"]
                         if c["cell_type"] == "code")
        offenders += [f"{nb.name}: {m}" for m in re.findall(r"\b\w+\._\w+\(|import _\w+", code)]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_between_modules():
    """Module-level imports form no cycle (a cycle only works by the order modules happen to be imported in)."""
    import ast
    mods = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ehrxdiff"):
                graph[m] |= {t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in mods}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
