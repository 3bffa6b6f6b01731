"""Tables render with the expected numbers; figure functions write PNG + PDF."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ehrxdiff.reporting import figures, tables  # noqa: E402
from ehrxdiff.reporting.tables import write_table  # noqa: E402


@pytest.fixture
def table2_results():
    rows = []
    for seed, (a, d, s) in enumerate([(0.70, 0.55, 0.80), (0.72, 0.57, 0.82), (0.74, 0.59, 0.84)]):
        for subset, v in zip(("all", "diff", "same"), (a, d, s)):
            rows.append({"method": "EHRXDiff_w_null", "seed": seed, "subset": subset, "auroc": v,
                         "evaluator": "tiny@64px"})
    for subset, v in zip(("all", "diff", "same"), (0.672, 0.0, 1.0)):
        rows.append({"method": "previous label", "seed": 0, "subset": subset, "auroc": v, "evaluator": "labels"})
    return pd.DataFrame(rows)


def test_format_mean_std():
    assert tables.format_mean_std(0.7221, 0.0031) == "0.722 ± 0.003"
    assert tables.format_mean_std(0.5, float("nan")) == "0.500"
    assert tables.format_mean_std(float("nan")) == "–"


def test_table2_written_three_ways(tmp_path, table2_results):
    table = tables.auroc_table(table2_results, index_order=["previous label", "EHRXDiff_w_null"],
                                  ceiling={"all": 0.9, "diff": 0.8, "same": 0.95})
    assert list(table.columns) == ["all", "all ceiling", "diff", "diff ceiling", "same", "same ceiling",
                                   "evaluator"]
    assert table.loc["EHRXDiff_w_null", "all"] == "0.720 ± 0.020"
    assert table.loc["previous label", "diff"] == "0.000" and table.loc["previous label", "diff ceiling"] == "0.800"
    paths = tables.write_table(table, "table2_imagenome_auroc", tmp_path, caption="Table II")
    assert {p.name for p in paths.values()} == {f"table2_imagenome_auroc.{e}" for e in ("csv", "md", "tex")}
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    assert "| EHRXDiff_w_null | 0.720 ± 0.020 |" in md
    assert r"EHRXDiff\_w\_null & 0.720 $\pm$ 0.020" in tex and r"\toprule" in tex
    csv = pd.read_csv(paths["csv"], index_col=0)
    assert csv.loc["EHRXDiff_w_null", "same"] == "0.820 ± 0.020"


def test_seed_table_missing_column_is_named(table2_results):
    with pytest.raises(ValueError, match="'metric'"):
        tables.seed_table(table2_results, index="method", columns="metric", value="auroc")


def test_table3_generic_layout(tmp_path):
    res = pd.DataFrame({"method": ["GT", "GT", "m", "m", "m", "m"], "seed": [0, 0, 0, 1, 0, 1],
                        "metric": ["age r", "sex AUROC", "FID", "FID", "age r", "age r"],
                        "value": [0.7, 0.99, 5.0, 6.0, 0.4, 0.5]})
    t = tables.seed_table(res, index="method", columns="metric", column_order=["FID", "age r", "sex AUROC"])
    assert t.loc["GT", "FID"] == "–" and t.loc["m", "FID"] == "5.500 ± 0.707"
    tables.write_table(t, "table3_fid_demographics", tmp_path)
    assert "5.500 ± 0.707" in (tmp_path / "table3_fid_demographics.md").read_text()


def _exists(stem):
    return all(stem.with_suffix(s).stat().st_size > 0 for s in (".png", ".pdf"))


def test_bar_chart_and_heatmap(tmp_path, table2_results):
    fig = figures.plot_auroc_bars(table2_results, tmp_path / "fig_table2", ceiling={"all": 0.9})
    plt.close(fig)
    assert _exists(tmp_path / "fig_table2")
    per = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": 0, "subset": "all",
                        "label": ["pneumonia", "pneumothorax"] * 2, "auroc": [0.6, 0.7, 0.8, np.nan]})
    fig = figures.plot_label_heatmap(per, tmp_path / "fig_heat", subsets=("all",))
    plt.close(fig)
    assert _exists(tmp_path / "fig_heat")


def test_qualitative_and_difference_figures(tmp_path):
    img = torch.rand(3, 32, 32) * 2 - 1
    ex = [{"prev": img, "target": np.zeros((32, 32), np.uint8), "pred": img.numpy()[0] * 0.5,
           "events": [f"labevents itemid pO2 value {i}" for i in range(9)], "finding": "pleural effusion resolved",
           "title": "t_p (12 h)"},
          {"prev": img, "target": img, "pred": img, "events": [], "finding": ""}]
    plt.close(figures.plot_qualitative(ex, tmp_path / "fig_qual"))
    plt.close(figures.plot_difference_maps(ex, tmp_path / "fig_diff"))
    assert _exists(tmp_path / "fig_qual") and _exists(tmp_path / "fig_diff")
    assert figures._event_text(ex[0]["events"], 6, 40).startswith("(+3 earlier events)")


def test_own_cohort_tables_are_ranked_by_event_salience_not_by_mimic_names():
    """Issue 16: an own cohort's tables ("drugs", "vitals") have no MIMIC rank; ``event_salience`` gives one, and
    the caption says the rule that chose (never "treatments, labs, then vitals" for tables it did not rank)."""
    ev = [(f"vitals item spo2 value {90 + i}", float(i), "vitals") for i in range(6)]
    ev.insert(1, ("drugs item furosemide value 40", 0.5, "drugs"))
    no_order = figures.salient_events(ev, 2, ())
    assert no_order == ["+0 h drugs item furosemide value 40", "+5 h vitals item spo2 value 95"]   # distinct items
    assert figures.salient_events(ev, 1, ("drugs",)) == ["+0 h drugs item furosemide value 40"]
    assert figures.salient_events(ev, 1, ("vitals",)) == ["+5 h vitals item spo2 value 95"]
    assert figures.salience_rule(()) == "distinct items, most recent first"
    assert figures.salience_rule(["drugs"]) == "drugs first, distinct items, most recent first"
    head = figures._event_text(no_order, 6, 60, total=len(ev), rule=figures.salience_rule(())).splitlines()[0]
    assert head == "(2 of 7 events: distinct items, most recent first)"


def test_salient_events_show_treatments_before_vitals_in_time_order():
    ev = [(f"chartevents itemid Heart Rate value {i}", float(i), "chartevents") for i in range(10)]
    ev.insert(3, ("prescriptions drug Furosemide dose 40", 2.5, "prescriptions"))
    ev.insert(7, ("labevents itemid CRP value 80", 5.5, "labevents"))
    lines = figures.salient_events(ev, 4)
    head = figures._event_text(lines, 6, 60, total=len(ev)).splitlines()[0]
    assert head == "(4 of 12 events: treatments, labs, then vitals)"
    assert lines == ["+2 h prescriptions drug Furosemide dose 40", "+6 h labevents itemid CRP value 80",
                         "+8 h chartevents itemid Heart Rate value 8", "+9 h chartevents itemid Heart Rate value 9"]
    ev.insert(5, ("chartevents itemid SpO2 value 97", 3.0, "chartevents"))    # a second item beats a repeat
    assert figures.salient_events(ev, 4) == ["+2 h prescriptions drug Furosemide dose 40",
                                               "+3 h chartevents itemid SpO2 value 97",
                                               "+6 h labevents itemid CRP value 80",
                                               "+9 h chartevents itemid Heart Rate value 9"]
    assert figures.salient_events(ev[:2], 4) == ["+0 h chartevents itemid Heart Rate value 0",
                                                   "+1 h chartevents itemid Heart Rate value 1"]


def test_compare_tables_finds_identical_and_differing_tables(tmp_path):
    """Issue 15's check of two runs: byte-identical tables pass, a moved number is found and measured."""
    from ehrxdiff.reporting.provenance import compare_tables, main, write_environment
    a, b = tmp_path / "a", tmp_path / "b"
    t = pd.DataFrame({"all": ["0.687 ± 0.050", "0.700"], "FID": [100.875, 16.5]}, index=["EHRXDiff", "previous image"])
    for d in (a, b):
        write_table(t, "table2_x", d)
    write_table(t, "table3_y", a)
    write_table(t.assign(all=["0.689 ± 0.050", "0.700"]), "table3_y", b)
    res = compare_tables(a, b).set_index("table")
    assert bool(res.loc["table2_x.csv", "identical"]) and not bool(res.loc["table3_y.csv", "identical"])
    assert res.loc["table3_y.csv", "cells_differ"] == 1
    assert res.loc["table3_y.csv", "max_abs_diff"] == pytest.approx(0.002)
    assert main(["compare", str(a), str(a)]) == 0 and main(["compare", str(a), str(b)]) == 1
    env = json.loads(write_environment(a).read_text())          # written next to the tables by write_table too
    assert (a / "environment.json").is_file() and env["packages"]["torch"] and env["cpu_capability"]
