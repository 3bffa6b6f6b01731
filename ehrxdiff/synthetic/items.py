"""The world's dictionaries: real MIMIC-IV itemids, labels, categories and units (mimic-schemas §4, §5).

Items the reference filter keeps (blood gases, CRP, respiratory/vital chart items, cardio-lung drugs, respiratory
specimens, chest procedures) carry the state; distractors it must drop (chemistry labs, GCS, ward drugs, blood and
urine cultures, peripheral lines) are emitted alongside so the filters have something to do.
"""
from __future__ import annotations

import numpy as np

# hosp/d_labitems: itemid, label, fluid, category
D_LABITEMS = [
    (52033, "Specimen Type", "Blood", "Blood Gas"), (50821, "pO2", "Blood", "Blood Gas"),
    (50818, "pCO2", "Blood", "Blood Gas"), (50820, "pH", "Blood", "Blood Gas"),
    (50813, "Lactate", "Blood", "Blood Gas"), (50817, "Oxygen Saturation", "Blood", "Blood Gas"),
    (50889, "C-Reactive Protein", "Blood", "Chemistry"), (51652, "High-Sensitivity CRP", "Blood", "Chemistry"),
    (50931, "Glucose", "Blood", "Chemistry"), (50983, "Sodium", "Blood", "Chemistry"),
    (50912, "Creatinine", "Blood", "Chemistry"), (51301, "White Blood Cells", "Blood", "Hematology"),
    (51222, "Hemoglobin", "Blood", "Hematology"), (50963, "NTproBNP", "Blood", "Chemistry"),
]

# icu/d_items: itemid, label, abbreviation, linksto, category, unitname, param_type, low, high
D_ITEMS = [
    (220045, "Heart Rate", "HR", "chartevents", "Routine Vital Signs", "bpm", "Numeric", None, None),
    (220210, "Respiratory Rate", "RR", "chartevents", "Respiratory", "insp/min", "Numeric", None, None),
    (220277, "O2 saturation pulseoxymetry", "SpO2", "chartevents", "Respiratory", "%", "Numeric", None, None),
    (223761, "Temperature Fahrenheit", "Temperature F", "chartevents", "Routine Vital Signs", "°F", "Numeric", None, None),
    (220179, "Non Invasive Blood Pressure systolic", "NBPs", "chartevents", "Routine Vital Signs", "mmHg", "Numeric", None, None),
    (220180, "Non Invasive Blood Pressure diastolic", "NBPd", "chartevents", "Routine Vital Signs", "mmHg", "Numeric", None, None),
    (223835, "Inspired O2 Fraction", "FiO2", "chartevents", "Respiratory", None, "Numeric", None, None),
    (226732, "O2 Delivery Device(s)", "O2 Delivery Device(s)", "chartevents", "Respiratory", None, "Text", None, None),
    (223849, "Ventilator Mode", "Ventilator Mode", "chartevents", "Respiratory", None, "Text", None, None),
    (220739, "GCS - Eye Opening", "GCS - Eye Opening", "chartevents", "Neurological", None, "Text", None, None),
    (223900, "GCS - Verbal Response", "GCS - Verbal Response", "chartevents", "Neurological", None, "Text", None, None),
    (223901, "GCS - Motor Response", "GCS - Motor Response", "chartevents", "Neurological", None, "Text", None, None),
    (225158, "NaCl 0.9%", "NaCl 0.9%", "inputevents", "Fluids/Intake", "mL", "Solution", None, None),
    (225828, "LR", "LR", "inputevents", "Fluids/Intake", "mL", "Solution", None, None),
    (221794, "Furosemide (Lasix)", "Furosemide (Lasix)", "inputevents", "Medications", "mg", "Solution", None, None),
    (225798, "Vancomycin", "Vancomycin", "inputevents", "Antibiotics", "dose", "Solution", None, None),
    (225893, "Piperacillin/Tazobactam (Zosyn)", "Zosyn", "inputevents", "Antibiotics", "dose", "Solution", None, None),
    (225851, "Cefepime", "Cefepime", "inputevents", "Antibiotics", "dose", "Solution", None, None),
    (225975, "Heparin Sodium (Prophylaxis)", "Heparin Sodium (Prophylaxis)", "inputevents", "Medications", "dose", "Solution", None, None),
    (226559, "Foley", "Foley", "outputevents", "Output", "mL", "Numeric", None, None),
    (226588, "Chest Tube #1", "Chest Tube #1", "outputevents", "Output", "mL", "Numeric", None, None),
    (225792, "Invasive Ventilation", "Invasive Ventilation", "procedureevents", "2-Ventilation", None, "Process", None, None),
    (224385, "Intubation", "Intubation", "procedureevents", "1-Intubation/Extubation", None, "Process", None, None),
    (227194, "Extubation", "Extubation", "procedureevents", "1-Intubation/Extubation", None, "Process", None, None),
    (225433, "Chest Tube Placed", "Chest Tube Placed", "procedureevents", "4-Procedures", None, "Process", None, None),
    (227712, "Chest Tube Removed", "Chest Tube Removed", "procedureevents", "4-Procedures", None, "Process", None, None),
    (225479, "Thoracentesis", "Thoracentesis", "procedureevents", "4-Procedures", None, "Process", None, None),
    (224263, "Multi Lumen", "Multi Lumen", "procedureevents", "Access Lines - Invasive", None, "Process", None, None),
    (224275, "20 Gauge", "20 Gauge", "procedureevents", "Access Lines - Peripheral", None, "Process", None, None),
    (225459, "Chest X-Ray", "Chest X-Ray", "procedureevents", "5-Imaging", None, "Process", None, None),
]

# (prescriptions drug name, inputevents itemid) of the antibiotic courses; names from the reference drug list.
ANTIBIOTIC_COURSES = [("Vancomycin", 225798), ("Piperacillin-Tazobactam", 225893), ("CefePIME", 225851)]
# Drugs every ward patient gets; none is in the reference's cardiac/lung or antibiotic lists.
WARD_DRUGS = [("Acetaminophen", "PO/NG"), ("Pantoprazole", "IV"), ("Docusate Sodium", "PO"),
              ("Senna", "PO"), ("Sodium Chloride 0.9%  Flush", "IV")]

O2_DEVICES = ["None", "Nasal cannula", "Face tent", "Non-rebreather", "High flow nasal cannula"]


def vitals(s, rng: np.random.Generator, hour: int, j: int) -> list[tuple]:
    """One set of chart vitals that reflect the state: (itemid, value text, valuenum, valueuom)."""
    load = s.respiratory_load
    vent = s.devices["endotracheal_tube"]
    hr = rng.normal(78 + 30 * s.infection + 12 * s.fluid, 6)
    rr = rng.normal(15 + 9 * min(load, 2.0), 2) if not vent else rng.normal(16, 1)
    spo2 = float(np.clip(rng.normal(98 - 7 * min(load, 2.0) + (3 if vent else 0), 1.2), 70, 100))
    out = [(220045, f"{hr:.0f}", round(hr), "bpm"), (220210, f"{rr:.0f}", round(rr), "insp/min"),
           (220277, f"{spo2:.0f}", round(spo2), "%")]
    sbp = rng.normal(125 - 18 * s.infection + 10 * s.fluid, 9)
    out += [(220179, f"{sbp:.0f}", round(sbp), "mmHg"), (220180, f"{sbp * 0.55:.0f}", round(sbp * 0.55), "mmHg")]
    if hour % 4 == 0 and j == 0:
        temp = rng.normal(98.3 + 4.0 * s.infection * (0.5 if s.abx_hours >= 12 else 1.0), 0.4)
        out.append((223761, f"{temp:.1f}", round(temp, 1), "°F"))
        dev = "Endotracheal tube" if vent else O2_DEVICES[int(np.clip(load * 2.5, 0, 4))]
        out.append((226732, dev, None, None))
    if vent and j == 0:
        fio2 = float(np.clip(round(30 + 35 * min(load, 2.0) / 2, -1), 30, 100))
        out += [(223835, f"{fio2:.0f}", fio2, None), (223849, "CMV/ASSIST/AutoFlow", None, None)]
    return out


def chart_distractors(rng: np.random.Generator) -> list[tuple]:
    """GCS items: category Neurological, outside the reference chart categories."""
    return [(220739, "Spontaneously", 4.0, None), (223900, "Oriented", 5.0, None), (223901, "Obeys Commands", 6.0, None)]


def lab_distractors(s, rng: np.random.Generator) -> list[tuple]:
    """Chemistry/haematology (itemid, value, valuenum, uom, lo, hi); WBC and BNP carry signal but are filtered."""
    wbc = max(1.0, rng.normal(8 + 10 * s.infection, 1.5))
    bnp = max(20.0, rng.normal(300 + 4000 * max(s.fluid, 0), 200))
    glu, na, cr = rng.normal(120, 20), rng.normal(139, 3), max(0.3, rng.normal(1.0, 0.25))
    hb = rng.normal(11, 1.2)
    return [(51301, f"{wbc:.1f}", round(wbc, 1), "K/uL", 4.0, 11.0), (50963, f"{bnp:.0f}", round(bnp), "pg/mL", 0.0, 353.0),
            (50931, f"{glu:.0f}", round(glu), "mg/dL", 70.0, 100.0), (50983, f"{na:.0f}", round(na), "mEq/L", 133.0, 145.0),
            (50912, f"{cr:.1f}", round(cr, 1), "mg/dL", 0.5, 1.2), (51222, f"{hb:.1f}", round(hb, 1), "g/dL", 12.0, 16.0)]
