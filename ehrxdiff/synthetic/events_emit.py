"""Turning the hourly course into MIMIC rows: events that reflect the state and records of what was done.

Split from :mod:`world` so each reads in one sitting. Row tuples follow :data:`ehrxdiff.data.schemas.COLUMNS`;
ids that must be unique across the world (labevent_id, orderid, ...) are assigned when the tables are written.
"""
from __future__ import annotations

import numpy as np

from .items import chart_distractors, lab_distractors, WARD_DRUGS, vitals

H = 3600
DAY = 24 * H


def ts(sec: float) -> int:
    """Timestamps travel as whole seconds since 1970; the writer turns each column into datetimes at once."""
    return int(sec)


def _blood_gas(s, rng) -> list[tuple]:
    """An arterial blood gas whose oxygenation falls with the respiratory load (itemid, value, num, uom, lo, hi)."""
    load = min(s.respiratory_load, 2.0)
    po2 = max(40.0, rng.normal(95 - 28 * load + (25 if s.devices["endotracheal_tube"] else 0), 8))
    pco2 = rng.normal(40 + 4 * load, 4)
    ph = rng.normal(7.41 - 0.04 * load - 0.04 * s.infection, 0.03)
    lac = max(0.4, rng.normal(1.1 + 2.2 * s.infection * s.infection, 0.3))
    return [(52033, "ART.", None, None, None, None), (50821, f"{po2:.0f}", round(po2), "mm Hg", 85.0, 105.0),
            (50818, f"{pco2:.0f}", round(pco2), "mm Hg", 35.0, 45.0), (50820, f"{ph:.2f}", round(ph, 2), "units", 7.35, 7.45),
            (50813, f"{lac:.1f}", round(lac, 1), "mmol/L", 0.5, 2.0)]


def _labs(c: dict, t: float, results: list[tuple], h: int) -> None:
    rng, rec = c["rng"], c["rec"]
    specimen = int(rng.integers(10**7, 10**8))
    # ~2 % of results carry no hadm_id (as outpatient labs do in MIMIC): lost to the hadm_id join, and counted.
    hadm = None if rng.random() < 0.02 else c["hadm"]
    stat = results[0][0] == 52033
    for itemid, value, num, uom, lo, hi in results:
        flag = "abnormal" if num is not None and lo is not None and not lo <= num <= hi else None
        rec.add("hosp/labevents", (None, c["sid"], hadm, specimen, itemid, None, ts(t), ts(t + rng.uniform(600, 5400)),
                                   value, num, uom, lo, hi, flag, "STAT" if stat else "ROUTINE", None))


def _rx(c: dict, t: float, drug: str, route: str, hours: float, dose: str = "1", unit: str = "TAB") -> None:
    rng = c["rng"]
    c["rec"].add("hosp/prescriptions", (
        c["sid"], c["hadm"], int(rng.integers(10**6, 10**8)), None, None, None, ts(t), ts(t + hours * H), "MAIN",
        drug, None, None, None, None, None, dose, unit, dose, unit, None, route))


def _input(c: dict, t: float, itemid: int, amount: float, uom: str, cat: str, desc: str,
           secondary: str | None = None, total: float | None = None) -> None:
    rng = c["rng"]
    order = int(rng.integers(10**6, 10**7))
    c["rec"].add("icu/inputevents", (
        c["sid"], c["hadm"], c["stay"], int(rng.integers(1000, 99999)), ts(t), ts(t + 60), ts(t + rng.uniform(60, 1800)),
        itemid, amount, uom, None, None, order, order, cat, secondary, "Main order parameter", desc,
        round(float(rng.normal(80, 15)), 1), total, "ml" if total else None, 0, 0, "FinishedRunning", amount, 0))


def _micro(c: dict, t: float, spec: str, spec_itemid: int, positive: bool) -> None:
    """A culture: one row if negative; organism (+ susceptibility) rows if positive (mimic-schemas §5)."""
    rng, rec = c["rng"], c["rec"]
    spec_id = int(rng.integers(10**6, 10**7))
    test = {"SPUTUM": (90039, "RESPIRATORY CULTURE"), "BLOOD CULTURE": (90201, "Blood Culture, Routine"),
            "URINE": (90039, "URINE CULTURE")}[spec]
    day = int(t // DAY * DAY)
    base = (None, c["sid"], c["hadm"], spec_id, None, day, ts(t), spec_itemid, spec, 1, day + 2 * DAY,
            ts(t + 48 * H), test[0], test[1])
    if not positive:
        rec.add("hosp/microbiologyevents", base + (None,) * 10 + (None,))
        return
    org = [(80076, "STREPTOCOCCUS PNEUMONIAE"), (80023, "STAPH AUREUS COAG +"), (80004, "KLEBSIELLA PNEUMONIAE"),
           (80002, "ESCHERICHIA COLI")][int(rng.integers(0, 2 if spec == "SPUTUM" else 4))]
    qty = "MODERATE GROWTH" if spec == "SPUTUM" else None
    rec.add("hosp/microbiologyevents", base + (org[0], org[1], 1, qty, None, None, None, None, None, None, None))
    for ab_id, ab in ((90015, "VANCOMYCIN"), (90025, "LEVOFLOXACIN"), (90018, "CEFTRIAXONE")):
        interp = "S" if rng.random() < 0.8 else "R"
        rec.add("hosp/microbiologyevents", base + (org[0], org[1], 1, qty, ab_id, ab,
                                                    "<=1" if interp == "S" else "=>8", "<=" if interp == "S" else "=>",
                                                    1.0 if interp == "S" else 8.0, interp, None))


def _actions(c: dict, s, a: dict, t0: float, in_icu: bool) -> None:
    """Record what the clinician did this hour in the tables where MIMIC records it."""
    rng, rec = c["rng"], c["rec"]
    t = t0 + rng.uniform(0, 0.5) * H
    if "furosemide_mg" in a:
        _rx(c, t - 600, "Furosemide", "IV", 1, f"{a['furosemide_mg']:.0f}", "mg")
        if in_icu:
            _input(c, t, 221794, a["furosemide_mg"], "mg", "05-Med Bolus", "Drug Push")
    if "fluid_ml" in a:
        if in_icu:
            _input(c, t, 225158 if rng.random() < 0.6 else 225828, a["fluid_ml"], "ml", "03-IV Fluid Bolus", "Bolus",
                   total=a["fluid_ml"])
        else:
            _rx(c, t - 600, "Sodium Chloride 0.9%", "IV", 2, f"{a['fluid_ml']:.0f}", "mL")
    drug, itemid = c["abx"]
    if "antibiotic_start" in a:
        _rx(c, t - 900, drug, "IV", a["antibiotic_start"], "1", "g")
    if ("antibiotic_start" in a or "antibiotic_dose" in a) and in_icu:
        _input(c, t, itemid, 1.0, "dose", "08-Antibiotics (IV)", "Drug Push", "02-Fluids (Crystalloids)", 100.0)
    if in_icu:
        for key, item, cat in (("intubate", 224385, "Intubation/Extubation"), ("extubate", 227194, "Intubation/Extubation"),
                               ("thoracentesis", 225479, "Procedures"), ("chest_tube_in", 225433, "Procedures"),
                               ("chest_tube_out", 227712, "Procedures")):
            if a.get(key):
                rec.add("icu/procedureevents", procedure_row(rng, c["sid"], c["hadm"], c["stay"], t, t + 1, item, 1,
                                                             "None", cat))


def procedure_row(rng, sid, hadm, stay, start, end, itemid, value, uom, ordercat, location=None, loccat=None):
    # storetime carries milliseconds now and then, as in the v2.2 demo (parsers must cope).
    store = int(start + rng.uniform(60, 3600)) + (int(rng.integers(1, 1000)) / 1000 if rng.random() < 0.1 else 0)
    desc = "ContinuousProcess" if uom == "min" else "Task"
    return (sid, hadm, stay, int(rng.integers(1000, 99999)), ts(start), ts(end), store, itemid, value, uom,
            location, loccat, None, None, ordercat, desc, round(float(rng.normal(80, 15)), 1), 0, 0,
            "FinishedRunning", 1, 0)


def emit_events(c: dict, states: list[State], actions: list[dict]) -> None:
    """Emit the seven event tables (and distractors) hour by hour from the course."""
    rec, rng, sid, hadm, stay, admit = c["rec"], c["rng"], c["sid"], c["hadm"], c["stay"], c["admit"]
    icu_in, icu_out = c["icu"]
    vent_start = line_start = None
    sputum_done = False
    for h, (s, a) in enumerate(zip(states, actions)):
        t0 = admit + h * H
        in_icu = icu_in <= t0 < icu_out
        if in_icu:
            for j in range(c["sets"]):
                tc = t0 + (j + rng.uniform(0, 1)) * H / c["sets"]
                for itemid, value, num, uom in vitals(s, rng, h, j):
                    rec.add("icu/chartevents", (sid, hadm, stay, int(rng.integers(1000, 99999)), ts(tc),
                                                ts(tc + rng.uniform(60, 900)), itemid, value, num, uom, 0))
            if h % 4 == 0:
                for itemid, value, num, uom in chart_distractors(rng):
                    rec.add("icu/chartevents", (sid, hadm, stay, None, ts(t0 + 600), ts(t0 + 900), itemid, value,
                                                num, uom, 0))
            if h % 2 == 0:
                urine = max(5.0, rng.normal(60 + 140 * s.diuretic, 15))
                rec.add("icu/outputevents", (sid, hadm, stay, None, ts(t0 + 1800), ts(t0 + 2400), 226559,
                                             round(urine), "ml"))
            if s.devices["chest_tube"] and h % 4 == 0:
                rec.add("icu/outputevents", (sid, hadm, stay, None, ts(t0 + 1200), ts(t0 + 1500), 226588,
                                             round(max(0.0, rng.normal(40 + 200 * s.effusion, 20))), "ml"))
        # Labs: blood gas (more often when ventilated), daily CRP and chemistry distractors.
        if h % (6 if s.devices["endotracheal_tube"] else 12) == 0:
            _labs(c, t0 + rng.uniform(0, H), _blood_gas(s, rng), h)
        if h % 24 == 3:
            crp = max(0.5, rng.normal(3 + 180 * s.infection, 8))
            _labs(c, t0 + rng.uniform(0, H), [(50889, f"{crp:.1f}", round(crp, 1), "mg/L", 0.0, 5.0)]
                  + lab_distractors(s, rng), h)
        if h == 0:
            for drug, route in WARD_DRUGS:
                _rx(c, t0 + 1800, drug, route, 72)
        _actions(c, s, a, t0, in_icu)
        if a.get("intubate") and in_icu:
            vent_start = t0
        if (a.get("extubate") or h == len(states) - 1) and vent_start is not None and in_icu:
            rec.add("icu/procedureevents", procedure_row(rng, sid, hadm, stay, vent_start, t0, 225792,
                                                 round((t0 - vent_start) / 60), "min", "Ventilation"))
            vent_start = None
        if a.get("central_line") and in_icu:
            line_start = t0
        if h == len(states) - 1 and line_start is not None:
            rec.add("icu/procedureevents", procedure_row(rng, sid, hadm, stay, line_start, t0, 224263,
                                                 round((t0 - line_start) / 60), "min", "Invasive Lines",
                                                 "Right IJ", "Invasive Venous"))
        if h == 2 and in_icu:
            rec.add("icu/procedureevents", procedure_row(rng, sid, hadm, stay, t0, t0 + 60 * H, 224275, 3600, "min",
                                                 "Peripheral Lines", "Left Antecubital", "Peripheral"))
        # Microbiology: sputum culture when pneumonia is suspected; blood/urine cultures as distractors.
        if not sputum_done and s.infection > 0.3 and rng.random() < 0.1:
            sputum_done = True
            _micro(c, t0 + rng.uniform(0, H), "SPUTUM", 70062, positive=s.infection > 0.35)
        if h == 1:
            _micro(c, t0 + 900, "BLOOD CULTURE", 70012, positive=rng.random() < 0.05)
            if rng.random() < 0.5:
                _micro(c, t0 + 1200, "URINE", 70079, positive=rng.random() < 0.2)

