"""One synthetic patient at a time: admissions, the hourly course, the events it leaves, and its CXR studies.

Everything a patient produces comes from ``np.random.default_rng([seed, index, ...])``, so the world is
byte-identical per seed whatever the number of worker processes. Rows are emitted in each table's real column
order (:mod:`ehrxdiff.data.schemas`); :mod:`ehrxdiff.synthetic.tables` assigns row ids and writes the files.

Linkage traps that real MIMIC has and the cohort rules must survive: studies taken in the ED before the
admission time, outpatient studies outside any admission, lateral-only studies, studies with two frontal
images, admissions with a single image, lab rows with no hadm_id, and patients younger than 18 at admission.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dynamics import DEVICES, State, Traits, initial_state, severities, simulate
from .events_emit import emit_events, procedure_row, ts
from .items import ANTIBIOTIC_COURSES

H = 3600  # seconds per hour
EPOCH = np.datetime64("1970-01-01T00:00:00", "s")


def year_of(sec: float) -> int:
    return int((EPOCH + np.timedelta64(int(sec), "s")).astype("datetime64[Y]").astype(int)) + 1970


@dataclass
class PatientRecord:
    """Rows per table (tuples in schema order, ids filled later) plus the images to render."""
    rows: dict = field(default_factory=lambda: {})
    images: list = field(default_factory=list)    # dicts: ids, time, view, severities, devices, pose
    hourly: list = field(default_factory=list)    # ground-truth course, one dict per admission-hour

    def add(self, table: str, row: tuple) -> None:
        self.rows.setdefault(table, []).append(row)


FLUID_SET_POINT_RANGE = (-0.2, 0.8)


def fluid_set_point_mean(age: float) -> float:
    """The age trend of a patient's fluid set point (older patients retain more); traits scatter around it."""
    return 0.05 + 0.004 * (age - 40)


def make_traits(rng: np.random.Generator, sex: str, age: float) -> Traits:
    male = sex == "M"
    return Traits(
        sex=sex, age=age,
        cardiac0=float(np.clip(0.05 + 0.006 * (age - 20) + (0.05 if male else 0) + rng.normal(0, 0.1), 0, 0.9)),
        hilum0=float(np.clip(rng.normal(0.2, 0.12), 0, 0.7)),
        mediastinum0=float(np.clip(0.008 * (age - 30) + rng.normal(0, 0.12), 0, 0.95)),
        fluid_set_point=float(np.clip(rng.normal(fluid_set_point_mean(age), 0.15), *FLUID_SET_POINT_RANGE)),
    )


def dicom_id(rng: np.random.Generator) -> str:
    h = "".join(f"{x:08x}" for x in rng.integers(0, 2**32, 5, dtype=np.uint64))
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def patient(seed: int, index: int, subject_id: int, chart_sets_per_hour: int = 1) -> PatientRecord:
    """Simulate one patient end to end (see module docstring)."""
    rng = np.random.default_rng([seed, index])
    rec = PatientRecord()
    sex = "M" if rng.random() < 0.55 else "F"
    anchor_age = int(np.clip(rng.normal(64, 16), 18, 91))
    anchor_year = int(rng.integers(2110, 2200))
    group = ["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"][int(rng.integers(0, 4))]
    n_adm = int(rng.choice([1, 1, 1, 2, 2, 3]))
    # A few anchors at 18 with the admission a year before the anchor year: age 17 at admission (dropped).
    minor = anchor_age == 18 or rng.random() < 0.01
    if minor:
        anchor_age = 18
    traits = make_traits(rng, sex, anchor_age)
    t_cursor = (np.datetime64(f"{anchor_year - (1 if minor else 0)}-01-01", "s") - EPOCH).astype(int) \
        + rng.uniform(0, 200) * 24 * H
    dod = None
    rec.add("hosp/patients", (subject_id, sex, anchor_age, anchor_year, group, None))
    study_seq = 0
    if rng.random() < 0.3:  # outpatient films months before the first admission: no admission to link
        for _ in range(int(rng.integers(1, 3))):
            t_out = t_cursor - rng.uniform(30, 200) * 24 * H
            study_seq = _study(rec, rng, subject_id, index, study_seq, t_out, None, None, traits, State(), False)
    for k in range(n_adm):
        hadm_id = 20000000 + index * 10 + k
        stay_id = 30000000 + index * 10 + k
        admit = t_cursor + rng.uniform(0, 3) * H
        los_h = int(rng.integers(48, 9 * 24))
        disch = admit + los_h * H + rng.uniform(0, 3600)
        ed = rng.random() < 0.7
        edreg = admit - rng.uniform(2, 8) * H if ed else None
        age_at = anchor_age + year_of(admit) - anchor_year
        scenario = str(rng.choice(["pneumonia", "heart_failure", "mixed", "other"], p=[.35, .3, .15, .2]))
        style = {"diurese": rng.uniform(0.3, 1.5), "fluids": rng.uniform(0.5, 2.0),
                 "treat": 0.0 if rng.random() < 0.15 else rng.uniform(0.5, 1.5),
                 "abx_interval": int(rng.choice([8, 12, 24])), "line_hour": int(rng.integers(1, 6))
                 if rng.random() < 0.6 else -1}
        s0 = initial_state(scenario, traits, rng)
        states, actions = simulate(s0, traits, los_h, style, physiology_seed=int(rng.integers(2**31)),
                                   policy_rng=rng)
        died = rng.random() < 0.05
        rec.add("hosp/admissions", (
            subject_id, hadm_id, ts(admit), ts(disch), ts(disch) if died else None,
            "EW EMER." if ed else str(rng.choice(["URGENT", "ELECTIVE", "DIRECT EMER."])),
            f"P{rng.integers(0, 36**5):05X}"[:6] if rng.random() < 0.8 else None,
            "EMERGENCY ROOM" if ed else str(rng.choice(["TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL"])),
            "DIED" if died else str(rng.choice(["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB"])),
            str(rng.choice(["Medicare", "Medicaid", "Other"])), "ENGLISH" if rng.random() < 0.9 else "?",
            str(rng.choice(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"])),
            str(rng.choice(["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "UNKNOWN"])),
            ts(edreg) if ed else None, ts(admit - 0.5 * H) if ed else None, int(died)))
        if died:
            dod = int(disch // (24 * H) * 24 * H)
        icu_in = admit + rng.uniform(0, 4) * H
        icu_out = max(icu_in + 24 * H, disch - rng.uniform(0, 36) * H)
        rec.add("icu/icustays", (subject_id, hadm_id, stay_id, "Medical Intensive Care Unit (MICU)",
                                 "Medical Intensive Care Unit (MICU)", ts(icu_in), ts(icu_out),
                                 round((icu_out - icu_in) / (24 * H), 6)))
        ctx = dict(rec=rec, rng=rng, sid=subject_id, hadm=hadm_id, stay=stay_id, admit=admit, traits=traits,
                   icu=(icu_in, icu_out), sets=chart_sets_per_hour, abx=ANTIBIOTIC_COURSES[int(rng.integers(0, 3))])
        emit_events(ctx, states, actions)
        # Studies: optional ED film before admission (the linkage trap), then irregular in-stay films.
        times = []
        if ed and rng.random() < 0.35:
            times.append(edreg + rng.uniform(0.2, 1.0) * H)
        t = admit + rng.uniform(0.5, 10) * H
        single = rng.random() < 0.12
        while t < disch and len(times) < 7:
            times.append(t)
            if single:
                break
            gap = rng.choice([rng.uniform(3, 30), rng.uniform(30, 60), rng.uniform(60, 120)], p=[.6, .3, .1])
            t += gap * H
        for t in times:
            h = int(np.clip((t - admit) // H, 0, los_h - 1))
            st = states[h] if t >= admit else s0
            ap = bool(st.devices["endotracheal_tube"] or rng.random() < 0.6)
            study_seq = _study(rec, rng, subject_id, index, study_seq, t, hadm_id, stay_id if icu_in <= t < icu_out
                               else None, traits, st, ap, age=age_at)
        for h, st in enumerate(states):
            rec.hourly.append({"subject_id": subject_id, "hadm_id": hadm_id, "hour": h, "time": ts(admit + h * H),
                               **severities(st, traits), **{d: st.devices[d] for d in DEVICES},
                               "fluid": st.fluid, "diuretic": st.diuretic, "on_antibiotics": st.abx_hours >= 12,
                               **{f"action_{a}": v for a, v in actions[h].items()}})
        t_cursor = disch + rng.uniform(30, 400) * 24 * H
    if dod is not None:
        rec.rows["hosp/patients"][0] = rec.rows["hosp/patients"][0][:5] + (dod,)
    return rec


def _study(rec, rng, sid, index, seq, t, hadm, stay, traits, st, ap, age=None) -> int:
    """One CXR study: frontal (AP/PA) ± lateral, sometimes two frontals, sometimes lateral only."""
    study_id = 50000000 + index * 100 + seq
    r = rng.random()
    views = ["LATERAL"] if r < 0.03 else [("AP" if ap else "PA")] * (2 if r < 0.07 else 1)
    if not ap and views[0] == "PA" and rng.random() < 0.6:
        views.append("LATERAL")
    sev = severities(st, traits)
    for view in views:
        rec.images.append({"dicom_id": dicom_id(rng), "subject_id": sid, "study_id": study_id,
                           "hadm_id": hadm, "stay_id": stay, "time": ts(t), "view": view, "ap": view == "AP",
                           "severity": sev, "devices": dict(st.devices), "age": traits.age if age is None else age,
                           "sex": traits.sex})  # time: seconds since 1970
    if stay is not None:
        rec.add("icu/procedureevents", procedure_row(rng, sid, hadm, stay, t, t + 1, 225459, 0, "None", "Imaging"))
    return seq + 1
