"""Event extraction and serialization on hand-built tables with known answers (paper-reference §2.4-2.6)."""
import pandas as pd
import pytest

from ehrxdiff.data.events import EventResult, event_columns, extract_events, serialize_event
from ehrxdiff.data.sources import MissingTableError, SchemaError
from mimic_fixture import write_mimic_table

S, H, STAY = 10000001, 20000001, 30000001
PREV, TARGET = "2150-01-02 08:00:00", "2150-01-03 08:00:00"

# one golden string per table (plain style); the row that produces it is in _tables()
GOLDEN = {
    "labevents": "labevents itemid pO2 value 85 valuenum 85 valueuom mm Hg ref_range_lower 80 ref_range_upper 100 priority STAT",
    "prescriptions": ("prescriptions drug_type MAIN drug Meropenem prod_strength 500mg Vial dose_val_rx 1000 "
                      "dose_unit_rx mg form_val_disp 2 form_unit_disp VIAL doses_per_24_hrs 3 route IV"),
    "inputevents": ("inputevents itemid Furosemide (Lasix) amount 40 amountuom mg ordercategoryname 05-Med Bolus "
                    "ordercomponenttypedescription Main order parameter ordercategorydescription Drug Push "
                    "patientweight 81.6 isopenbag 0 originalamount 40 originalrate 0"),
    "chartevents": "chartevents itemid Heart Rate value 88 valuenum 88 valueuom bpm warning 0",
    "outputevents": "outputevents itemid Foley value 350 valueuom ml",
    "microbiologyevents": ("microbiologyevents spec_type_desc SPUTUM test_seq 1 test_name RESPIRATORY CULTURE "
                           "org_name PSEUDOMONAS AERUGINOSA isolate_num 1 ab_name VANCOMYCIN dilution_text <=1 "
                           "dilution_comparison <= dilution_value 1 interpretation S comments No VRE isolated."),
    "procedureevents": ("procedureevents itemid Chest Tube Placed value 1 valueuom None ordercategoryname Procedures "
                        "ordercategorydescription Task patientweight 81.6 isopenbag 0 originalamount 1 originalrate 1"),
}


def _t(hhmm: str, day: str = "2150-01-02") -> str:
    return f"{day} {hhmm}"


def _d_item(itemid, label, linksto, category):
    return {"itemid": itemid, "label": label, "abbreviation": label, "linksto": linksto, "category": category,
            "param_type": "Numeric"}


def _chart(time, itemid, value, uom, hadm=H):
    return {"subject_id": S, "hadm_id": hadm, "stay_id": STAY, "caregiver_id": 4793, "charttime": time,
            "storetime": time, "itemid": itemid, "value": value, "valuenum": value, "valueuom": uom, "warning": 0}


def _lab(time, itemid, value, valuenum, uom, hadm=H, **kw):
    return {"labevent_id": 1, "subject_id": S, "hadm_id": hadm, "specimen_id": 7, "itemid": itemid,
            "charttime": time, "storetime": time, "value": value, "valuenum": valuenum, "valueuom": uom, **kw}


def _rx(time, drug):
    return {"subject_id": S, "hadm_id": H, "pharmacy_id": 123, "poe_id": f"{S}-5", "poe_seq": 5,
            "order_provider_id": "P003F3", "starttime": time, "stoptime": _t("23:00"), "drug_type": "MAIN",
            "drug": drug, "formulary_drug_cd": "MERO500I", "prod_strength": "500mg Vial", "dose_val_rx": "1000",
            "dose_unit_rx": "mg", "form_val_disp": "2", "form_unit_disp": "VIAL", "doses_per_24_hrs": "3", "route": "IV"}


def _input(time, itemid, category, amount="40.000000001"):
    return {"subject_id": S, "hadm_id": H, "stay_id": STAY, "caregiver_id": 4793, "starttime": time,
            "endtime": time, "storetime": time, "itemid": itemid, "amount": amount, "amountuom": "mg",
            "orderid": 1, "linkorderid": 1, "ordercategoryname": category,
            "ordercomponenttypedescription": "Main order parameter", "ordercategorydescription": "Drug Push",
            "patientweight": "81.6", "isopenbag": 0, "continueinnextdept": 0, "statusdescription": "FinishedRunning",
            "originalamount": "40", "originalrate": "0"}


def _micro(time, spec, hadm=H):
    return {"microevent_id": 1, "subject_id": S, "hadm_id": hadm, "micro_specimen_id": 55,
            "chartdate": "2150-01-02 00:00:00", "charttime": time, "spec_itemid": 70062, "spec_type_desc": spec,
            "test_seq": 1, "storedate": "2150-01-03 00:00:00", "storetime": "2150-01-03 10:00:00",
            "test_itemid": 90115, "test_name": "RESPIRATORY CULTURE", "org_itemid": 80026,
            "org_name": "PSEUDOMONAS AERUGINOSA", "isolate_num": 1, "ab_itemid": 90015, "ab_name": "VANCOMYCIN",
            "dilution_text": "<=1", "dilution_comparison": "<=", "dilution_value": "1", "interpretation": "S",
            "comments": "No VRE isolated.  "}


def _proc(time, category):
    return {"subject_id": S, "hadm_id": H, "stay_id": STAY, "caregiver_id": 4793, "starttime": time,
            "endtime": time[:-2] + "01", "storetime": time + ".090", "itemid": 225433, "value": "1",
            "valueuom": "None", "orderid": 9, "linkorderid": 9, "ordercategoryname": category,
            "ordercategorydescription": "Task", "patientweight": "81.6", "isopenbag": 0, "continueinnextdept": 0,
            "statusdescription": "FinishedRunning", "ORIGINALAMOUNT": "1", "ORIGINALRATE": "1"}


def _tables():
    return {
        "hosp/d_labitems": [
            {"itemid": 50821, "label": "pO2", "fluid": "Blood", "category": "Blood Gas"},
            {"itemid": 50889, "label": "C-Reactive Protein", "fluid": "Blood", "category": "Chemistry"},
            {"itemid": 50931, "label": "Glucose", "fluid": "Blood", "category": "Chemistry"},
        ],
        "icu/d_items": [
            _d_item(220045, "Heart Rate", "chartevents", "Routine Vital Signs"),
            _d_item(220277, "O2 saturation pulseoxymetry", "chartevents", "Respiratory"),
            _d_item(228100, "Code Status", "chartevents", "ADT"),
            _d_item(221794, "Furosemide (Lasix)", "inputevents", "Medications"),
            _d_item(225798, "Vancomycin", "inputevents", "Antibiotics"),
            _d_item(225158, "NaCl 0.9%", "inputevents", "Fluids/Intake"),
            _d_item(226559, "Foley", "outputevents", "Output"),
            _d_item(225433, "Chest Tube Placed", "procedureevents", "4-Procedures"),
        ],
        "hosp/labevents": [
            _lab(_t("09:00:00"), 50821, "85", "85.0", "mm Hg", ref_range_lower="80", ref_range_upper="100", priority="STAT"),
            _lab(_t("13:00:00"), 50889, "12.345678", "12.345678", "mg/L"),
            _lab(_t("13:30:00"), 50931, "120", "120", "mg/dL"),                  # not a chest item
            _lab(_t("14:30:00"), 50821, "70", "70", "mm Hg", hadm=None),          # null hadm_id, in window
        ],
        "hosp/prescriptions": [_rx(_t("11:00:00"), "Meropenem"), _rx(_t("11:05:00"), "Tobramycin Sulfate"),
                               _rx(_t("11:10:00"), "Lorazepam")],
        "icu/inputevents": [_input(_t("12:00:00"), 221794, "05-Med Bolus"),
                            _input(_t("12:30:00"), 225798, "08-Antibiotics (IV)", amount="1"),
                            _input(_t("12:45:00"), 225158, "02-Fluids (Crystalloids)", amount="500")],
        "icu/chartevents": [
            _chart(PREV, 220045, "80", "bpm"),                                     # at prev time: inclusive
            _chart(_t("13:00:00"), 220277, "95", "%"),                             # same time as HR, first in the file
            _chart(_t("13:00:00"), 220045, "88", "bpm"),
            _chart(_t("13:15:00"), 228100, "Full code", None),                     # ADT category: filtered
            _chart(TARGET, 220045, "90", "bpm"),                                   # at target time: inclusive
            _chart("2150-01-03 08:00:01", 220045, "91", "bpm"),                    # one second after: excluded
            _chart(_t("07:59:59"), 220045, "79", "bpm"),                           # one second before prev: excluded
        ],
        "icu/outputevents": [{"subject_id": S, "hadm_id": H, "stay_id": STAY, "charttime": _t("14:00:00"),
                              "storetime": _t("14:05:00"), "itemid": 226559, "value": "350", "valueuom": "ml"}],
        "hosp/microbiologyevents": [_micro(_t("15:00:00"), "SPUTUM"), _micro(_t("15:10:00"), "URINE"),
                                    _micro(_t("15:20:00"), "SPUTUM", hadm=None), _micro(None, "SPUTUM")],
        "icu/procedureevents": [_proc(_t("16:00:00"), "Procedures"), _proc(_t("16:30:00"), "Peripheral Lines")],
    }


EXPECTED_ORDER = [
    "chartevents itemid Heart Rate value 80 valuenum 80 valueuom bpm warning 0",
    GOLDEN["labevents"],
    GOLDEN["prescriptions"],
    GOLDEN["inputevents"],
    "inputevents itemid Vancomycin amount 1 amountuom mg ordercategoryname 08-Antibiotics (IV) ordercomponenttypedescription "
    "Main order parameter ordercategorydescription Drug Push patientweight 81.6 isopenbag 0 originalamount 40 originalrate 0",
    "labevents itemid C-Reactive Protein value 12.3457 valuenum 12.3457 valueuom mg/L",
    GOLDEN["chartevents"],                       # same time as O2 saturation: ties go by the values (itemid 220045 first)
    "chartevents itemid O2 saturation pulseoxymetry value 95 valuenum 95 valueuom % warning 0",
    GOLDEN["outputevents"],
    GOLDEN["microbiologyevents"],
    GOLDEN["procedureevents"],
    "chartevents itemid Heart Rate value 90 valuenum 90 valueuom bpm warning 0",
]


@pytest.fixture(scope="module")
def mimic_iv(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimiciv")
    for stem, rows in _tables().items():
        write_mimic_table(root, stem, rows)
    return root


def _pairs():
    return pd.DataFrame({
        "pair_key": ["t_p", "t2_p2"], "subject_id": [S, S], "hadm_id": [H, H],
        "prev_time": pd.to_datetime([PREV, "2150-01-05 08:00:00"]),
        "target_time": pd.to_datetime([TARGET, "2150-01-06 08:00:00"]),
    })


@pytest.fixture(scope="module")
def result(mimic_iv):
    return extract_events(mimic_iv, _pairs(), threads=1, window_end="inclusive")   # the reference's window


def _report(res, table, startswith):
    r = res.report[(res.report["table"] == table) & res.report["what"].str.startswith(startswith)]
    assert len(r) == 1, res.report
    return r["n"].iloc[0]


def test_events_exact_order_and_text(result):
    assert [t for t, _, _ in result.for_pair("t_p")] == EXPECTED_ORDER


def test_golden_string_each_table(result):
    texts = set(result.texts)
    for table, golden in GOLDEN.items():
        assert golden in texts, table


def test_hours_since_prev(result):
    hours = [h for _, h, _ in result.for_pair("t_p")]
    assert hours[0] == 0.0 and hours[1] == pytest.approx(1.0) and hours[-1] == pytest.approx(24.0)
    assert hours == sorted(hours)


def test_event_after_target_excluded(result):
    assert not any("value 91" in t or "value 79" in t for t in result.texts)


def test_null_hadm_rows_dropped_and_counted(result):
    assert not any("value 70" in t for t in result.texts)
    assert _report(result, "labevents", "dropped: null or unparseable hadm_id") == 1
    assert _report(result, "microbiologyevents", "dropped: null or unparseable hadm_id") == 1
    assert _report(result, "microbiologyevents", "dropped: null or unparseable charttime") == 1


def test_pairs_without_events_dropped(result):
    assert result.pair_keys == ["t_p"]
    assert _report(result, "all", "dropped: pairs with no events") == 1


def test_filters_and_inputevents_switch(mimic_iv, result):
    texts = " | ".join(result.texts)
    for absent in ("Glucose", "Tobramycin", "Lorazepam", "Code Status", "URINE", "Peripheral Lines", "NaCl"):
        assert absent not in texts, absent
    unfiltered = extract_events(mimic_iv, _pairs(), filter_inputevents=False, tables=("inputevents",), threads=1)
    assert any("NaCl 0.9%" in t for t in unfiltered.texts)


def test_order_depends_on_the_data_not_the_file_order_and_duplicate_rows_are_one_event(result, tmp_path):
    """Issue 15: same-time events came out in a different order in two runs (file order is not kept by a
    parallel scan), and a duplicated row doubled an event. Every table written in reverse row order, with one
    chartevents row twice, gives the same events; the copy is counted."""
    for stem, rows in _tables().items():
        rows = rows[::-1]
        if stem == "icu/chartevents":
            rows = rows + [r for r in rows if r["value"] == "88"]     # the 13:00 heart rate, in a window
        write_mimic_table(tmp_path, stem, rows)
    res = extract_events(tmp_path, _pairs(), threads=2, window_end="inclusive")
    assert res.for_pair("t_p") == result.for_pair("t_p")
    assert _report(res, "all", "dropped: duplicate rows") == 1
    assert _report(result, "all", "dropped: duplicate rows") == 0


def test_drug_names_match_case_and_tall_man_insensitively_exact_on_request(tmp_path):
    """Issue 16: MIMIC writes tall-man and lower-case names (HydrALAZINE, vancomycin) and stray spaces; the
    reference's exact match drops them (on the real MIMIC-IV demo: 4,948 rows exact, 5,187 case-folded)."""
    for stem, rows in _tables().items():
        if stem == "hosp/prescriptions":
            rows = [_rx(_t("11:00:00"), "MEROPENEM"), _rx(_t("11:05:00"), "meropenem "), _rx(_t("11:10:00"), "Meropenem")]
        write_mimic_table(tmp_path, stem, rows)
    folded = extract_events(tmp_path, _pairs(), tables=("prescriptions",), threads=1)
    exact = extract_events(tmp_path, _pairs(), tables=("prescriptions",), threads=1, drug_matching="exact")
    assert len(folded.for_pair("t_p")) == 3 and len(exact.for_pair("t_p")) == 1
    with pytest.raises(ValueError, match="drug_matching"):
        extract_events(tmp_path, _pairs(), tables=("prescriptions",), drug_matching="fuzzy")


def test_default_window_leaves_out_the_event_charted_with_the_target(mimic_iv, result):
    """Issue 16: prev_time <= t < target_time by default; the reference's inclusive end on request."""
    default = extract_events(mimic_iv, _pairs(), threads=1)
    assert [t for t, _, _ in default.for_pair("t_p")] == EXPECTED_ORDER[:-1]      # the 08:00 heart rate at TARGET
    assert max(h for _, h, _ in default.for_pair("t_p")) < 24.0
    assert [t for t, _, _ in result.for_pair("t_p")][-1] == EXPECTED_ORDER[-1]
    with pytest.raises(ValueError, match="window_end"):
        extract_events(mimic_iv, _pairs(), window_end="open")


def test_max_events_keeps_most_recent(mimic_iv):
    res = extract_events(mimic_iv, _pairs(), max_events=3, threads=1, window_end="inclusive")
    assert [t for t, _, _ in res.for_pair("t_p")] == EXPECTED_ORDER[-3:]
    assert _report(res, "all", "dropped: events beyond") == len(EXPECTED_ORDER) - 3


def test_budget_last_tables_fill_max_events_after_all_others_and_stay_in_time_order(mimic_iv):
    """``event_budget_last``: the demo's 64 most recent events are mostly vitals, which push the doses out; with
    chartevents ranked last, the budget keeps the other tables' most recent events first, then the most recent
    chartevents in what is left, and S_event stays time-ordered."""
    order = EXPECTED_ORDER
    others = [t for t in order if not t.startswith("chartevents")]
    few = extract_events(mimic_iv, _pairs(), max_events=3, threads=1, window_end="inclusive",
                         budget_last=("chartevents",))
    assert [t for t, _, _ in few.for_pair("t_p")] == others[-3:]
    assert _report(few, "all", "dropped: events beyond the budget of 3 (chartevents fill it last)") == len(order) - 3
    room = len(others) + 1                               # every other event, and the most recent chartevents one
    last_chart = [t for t in order if t.startswith("chartevents")][-1]
    res = extract_events(mimic_iv, _pairs(), max_events=room, threads=1, window_end="inclusive",
                         budget_last=("chartevents",))
    kept = [t for t, _, _ in res.for_pair("t_p")]
    assert kept == [t for t in order if t in others or t == last_chart]
    hours = [h for _, h, _ in res.for_pair("t_p")]
    assert hours == sorted(hours)
    unchanged = extract_events(mimic_iv, _pairs(), max_events=3, threads=1, window_end="inclusive", budget_last=())
    assert [t for t, _, _ in unchanged.for_pair("t_p")] == order[-3:]
    with pytest.raises(ValueError, match="event_budget_last names \\['chart_events'\\]"):
        extract_events(mimic_iv, _pairs(), max_events=3, threads=1, budget_last=("chart_events",))


def test_genhpf_digits_style(mimic_iv):
    res = extract_events(mimic_iv, _pairs(), text_style="genhpf_digits", tables=("labevents",), threads=1)
    assert res.for_pair("t_p")[0][0] == ("labevents itemid pO 2 value 8 5 valuenum 8 5 . 0 valueuom mm Hg "
                                         "ref_range_lower 8 0 ref_range_upper 1 0 0 priority STAT")


def test_python_serializer_matches_sql(result):
    rows = _tables()
    lab = dict(rows["hosp/labevents"][0], itemid="pO2")
    values = {c: lab.get(c) for c in event_columns("labevents")}
    assert serialize_event("labevents", values) == GOLDEN["labevents"]
    proc = {k.lower(): v for k, v in rows["icu/procedureevents"][0].items()}
    proc["itemid"] = "Chest Tube Placed"
    assert serialize_event("procedureevents", {c: proc.get(c) for c in event_columns("procedureevents")}) == GOLDEN["procedureevents"]
    assert serialize_event("chartevents", {"itemid": "Heart Rate", "value": 7.412345, "valuenum": 85.0}) == \
        "chartevents itemid Heart Rate value 7.4123 valuenum 85"
    assert serialize_event("chartevents", {"valuenum": 85.0, "x": None, "y": "  a  b "}, text_style="genhpf_digits") == \
        "chartevents valuenum 8 5 . 0 y a b"


def test_missing_table_and_column_errors(mimic_iv, tmp_path):
    with pytest.raises(MissingTableError, match="hosp/d_labitems.csv.gz"):
        extract_events(tmp_path, _pairs(), tables=("labevents",), threads=1)
    write_mimic_table(tmp_path, "hosp/d_labitems", _tables()["hosp/d_labitems"])
    with pytest.raises(MissingTableError, match="hosp/labevents.csv.gz"):
        extract_events(tmp_path, _pairs(), tables=("labevents",), threads=1)
    for stem, rows in _tables().items():
        drop = ("charttime",) if stem == "icu/chartevents" else ()
        write_mimic_table(tmp_path, stem, rows, drop_columns=drop)
    with pytest.raises(SchemaError, match=r"chartevents.csv.gz: missing column 'charttime'"):
        extract_events(tmp_path, _pairs(), tables=("chartevents",), threads=1)


def test_whitespace_and_rounding_sql_equals_python(tmp_path):
    write_mimic_table(tmp_path, "icu/d_items", [_d_item(226559, "Foley", "outputevents", "Output")])
    odd = {"subject_id": S, "hadm_id": H, "stay_id": STAY, "charttime": _t("14:00:00"), "itemid": 226559,
           "value": "-0.00001", "valueuom": " m  l\tx "}
    write_mimic_table(tmp_path, "icu/outputevents", [odd], gz=False)  # the gunzipped .csv layout is accepted too
    res = extract_events(tmp_path, _pairs(), tables=("outputevents",), threads=1)
    expected = serialize_event("outputevents", {"itemid": "Foley", "value": "-0.00001", "valueuom": " m  l\tx "})
    assert res.texts == [expected] == ["outputevents itemid Foley value 0 valueuom m l x"]


_GOLDEN_ROW = {"labevents": ("hosp/labevents", 0, "pO2"), "prescriptions": ("hosp/prescriptions", 0, None),
               "inputevents": ("icu/inputevents", 0, "Furosemide (Lasix)"), "chartevents": ("icu/chartevents", 2, "Heart Rate"),
               "outputevents": ("icu/outputevents", 0, "Foley"), "microbiologyevents": ("hosp/microbiologyevents", 0, None),
               "procedureevents": ("icu/procedureevents", 0, "Chest Tube Placed")}


@pytest.mark.parametrize("style", ["plain", "genhpf_digits"])
def test_sql_serializer_equals_python_on_every_golden_row(mimic_iv, result, style):
    """The text built in SQL by the streaming extraction == serialize_event() on the same row, per table."""
    res = result if style == "plain" else extract_events(mimic_iv, _pairs(), text_style=style, threads=1)
    for table, (stem, i, label) in _GOLDEN_ROW.items():
        row = {k.lower(): v for k, v in _tables()[stem][i].items()}
        if label is not None:
            row["itemid"] = label
        text = serialize_event(table, {c: row.get(c) for c in event_columns(table)}, text_style=style)
        if style == "plain":
            assert text == GOLDEN[table]
        assert text in res.texts, (table, text)


def test_streamed_files_read_back_identically(mimic_iv, result, tmp_path):
    from ehrxdiff.data.events import EventResult, extract_events_to_dir
    out = extract_events_to_dir(mimic_iv, _pairs(), tmp_path / "ev", threads=1, window_end="inclusive")
    assert not (out / "_work").exists()
    back = EventResult.read(out)
    pd.testing.assert_frame_equal(back.events, result.events)
    assert back.texts == result.texts and back.root == out
    assert pd.read_parquet(out / "event_pairs.parquet")["pair_key"].tolist() == ["t_p"]


def test_gunzip_thread_gives_identical_files_and_raises_on_a_truncated_gzip(mimic_iv, result, tmp_path):
    """Inflating the .csv.gz on a second thread into a named pipe changes nothing in the output; a truncated
    gzip stream is an error, never a silently shorter table."""
    import shutil
    from ehrxdiff.data.events import EventResult, extract_events_to_dir
    out = extract_events_to_dir(mimic_iv, _pairs(), tmp_path / "ev", threads=2, gunzip_thread=True,
                                window_end="inclusive")
    back = EventResult.read(out)
    pd.testing.assert_frame_equal(back.events, result.events)
    assert back.texts == result.texts
    assert not (out / "_work").exists()
    broken = tmp_path / "broken"
    shutil.copytree(mimic_iv, broken)
    gz = broken / "icu" / "chartevents.csv.gz"
    gz.write_bytes(gz.read_bytes()[:-12])  # drop the gzip trailer and the end of the deflate stream
    with pytest.raises(RuntimeError, match="chartevents.csv.gz"):
        extract_events_to_dir(broken, _pairs(), tmp_path / "ev2", tables=("chartevents",), threads=2, gunzip_thread=True)


def test_events_command_line_extracts_a_cohort_and_names_bad_inputs(mimic_iv, tmp_path, capsys):
    """``python -m ehrxdiff.data.events`` (issue 15 item 6): the cohort's pairs.parquet in, notebook 02's files out;
    a missing file or column is one line naming it, exit status 2."""
    from ehrxdiff.data.events import main
    _pairs().to_parquet(tmp_path / "pairs.parquet", index=False)
    assert main(["--mimic-iv", str(mimic_iv), "--cohort", str(tmp_path), "--out", str(tmp_path / "ev"),
                 "--threads", "1"]) == 0
    out = EventResult.read(tmp_path / "ev")
    assert out.for_pair("t_p") == extract_events(mimic_iv, _pairs(), threads=1).for_pair("t_p")
    assert "events of 1 pair(s) (1 of 2 pairs have no event)" in capsys.readouterr().out
    assert main(["--mimic-iv", str(mimic_iv), "--cohort", str(tmp_path / "nope.parquet"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "nope.parquet: no such file" in capsys.readouterr().out
    _pairs().drop(columns=["hadm_id"]).to_parquet(tmp_path / "bad.parquet", index=False)
    assert main(["--mimic-iv", str(mimic_iv), "--cohort", str(tmp_path / "bad.parquet"), "--out",
                 str(tmp_path / "y")]) == 2
    assert "bad.parquet: missing column(s) hadm_id" in capsys.readouterr().out
    assert main(["--mimic-iv", str(tmp_path / "empty"), "--cohort", str(tmp_path), "--out", str(tmp_path / "z"),
                 "--threads", "1"]) == 2
    assert capsys.readouterr().out.startswith("error: ")
