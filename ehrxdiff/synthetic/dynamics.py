"""Known patient dynamics of the synthetic world: an hourly course per admission.

The world exists so that the paper's claims become checkable against ground truth. Each admission has a
hidden state that a clinician policy acts on and that the events (vitals, blood gases, CRP, cultures)
reflect; the radiographs are rendered from the same state. What an event does is written here once:

- diuretics (furosemide) lower the fluid balance over hours → edema, congestion, later effusion fall;
- large IV fluid inputs raise it (note: with the reference's inputevents filter, D2, plain crystalloids are
  *not* among the kept items, so the model sees their consequences in vitals/gases but not the bolus itself);
- antibiotics resolve pneumonia after a latency of about a day; untreated pneumonia grows; consolidation lags
  the infection;
- thoracentesis drains an effusion at once; a chest tube drains effusion and pneumothorax and stays visible;
- intubation adds the endotracheal and NG tubes, extubation removes them; a central line may cause a
  pneumothorax.

All randomness comes from the ``rng`` passed in, so a course is a pure function of (seed, patient) and can
be re-simulated with an edited action list (a counterfactual with the same noise) — see :func:`simulate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ehrxdiff.constants import IMAGENOME_LABELS

DEVICES = ("endotracheal_tube", "central_line", "ng_tube", "chest_tube")

# Action kinds the policy (or a what-if edit) can take; values are doses or volumes.
ACTIONS = ("furosemide_mg", "fluid_ml", "antibiotic_start", "antibiotic_dose", "thoracentesis",
           "chest_tube_in", "chest_tube_out", "intubate", "extubate", "central_line")


@dataclass
class Traits:
    """Chronic, per-patient anatomy and physiology (fixed across admissions)."""
    sex: str
    age: float
    cardiac0: float        # baseline cardiac silhouette size in [0, 1] (age, sex, heart disease)
    hilum0: float
    mediastinum0: float    # aortic unfolding grows with age
    fluid_set_point: float  # where the fluid balance drifts back to (heart failure propensity)


@dataclass
class State:
    fluid: float = 0.0          # hidden fluid balance F (0 = euvolaemic, 1 = overloaded)
    infection: float = 0.0      # pneumonia burden P
    consolidation: float = 0.0
    effusion: float = 0.0
    pneumothorax: float = 0.0
    edema: float = 0.0
    congestion: float = 0.0
    diuretic: float = 0.0       # pharmacodynamic compartment of the loop diuretic
    abx_hours: float = -1.0     # hours since the current antibiotic course started (-1: none)
    abx_left: float = 0.0       # hours left in the course
    devices: dict = field(default_factory=lambda: {d: False for d in DEVICES})

    def copy(self) -> "State":
        s = State(**{k: v for k, v in self.__dict__.items() if k != "devices"})
        s.devices = dict(self.devices)
        return s

    @property
    def respiratory_load(self) -> float:
        """What drives SpO2, RR and pO2: how much of the lung is not ventilating."""
        return self.edema + self.consolidation + 0.5 * self.effusion + 1.5 * self.pneumothorax


def _clip(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def severities(s: State, t: Traits) -> dict[str, float]:
    """Latent severity in [0, 1] of each of the 10 evaluation findings (the ground truth of the labels)."""
    sev = {
        "pleural effusion": _clip(s.effusion),
        "enlarged cardiac silhouette": _clip(t.cardiac0 + 0.2 * max(s.fluid, 0.0)),
        "lung opacity": _clip(max(s.consolidation, 0.9 * s.edema, 0.8 * s.infection, 0.6 * s.effusion)),
        "pulmonary edema/hazy opacity": _clip(s.edema),
        "pneumonia": _clip(s.infection),
        "consolidation": _clip(s.consolidation),
        "vascular congestion": _clip(s.congestion),
        "pneumothorax": _clip(s.pneumothorax),
        "enlarged hilum": _clip(t.hilum0 + 0.45 * s.congestion),
        "mediastinal widening": _clip(t.mediastinum0),
    }
    assert tuple(sev) == IMAGENOME_LABELS
    return sev


def apply_actions(s: State, acts: dict, rng: np.random.Generator) -> None:
    """Instantaneous effects of this hour's actions (procedures act at once, drugs via compartments)."""
    s.diuretic += acts.get("furosemide_mg", 0.0) / 40.0
    s.fluid += 0.35 * acts.get("fluid_ml", 0.0) / 1000.0
    if acts.get("antibiotic_start"):
        s.abx_hours, s.abx_left = 0.0, float(acts["antibiotic_start"])
    if acts.get("thoracentesis"):
        s.effusion *= 0.35
    if acts.get("chest_tube_in"):
        s.devices["chest_tube"] = True
        s.effusion *= 0.5
        s.pneumothorax *= 0.6
    if acts.get("chest_tube_out"):
        s.devices["chest_tube"] = False
    if acts.get("intubate"):
        s.devices["endotracheal_tube"] = s.devices["ng_tube"] = True
    if acts.get("extubate"):
        s.devices["endotracheal_tube"] = s.devices["ng_tube"] = False
    if acts.get("central_line"):
        s.devices["central_line"] = True
        if rng.random() < 0.08:  # iatrogenic pneumothorax
            s.pneumothorax = max(s.pneumothorax, 0.4 + 0.3 * rng.random())


def evolve(s: State, t: Traits, rng: np.random.Generator) -> None:
    """One hour of physiology (explicit Euler; rates are per hour)."""
    # Fluid balance: drifts to the set point, falls with the diuretic compartment (peak ~2-4 h, gone ~10 h).
    s.fluid += 0.02 * (t.fluid_set_point - s.fluid) - 0.10 * s.diuretic + rng.normal(0, 0.01)
    s.diuretic *= 0.75
    s.fluid = min(max(s.fluid, -0.3), 1.5)
    target = _clip(s.fluid)
    s.edema += 0.12 * (target - s.edema) + rng.normal(0, 0.005)
    s.congestion += 0.20 * (_clip(1.1 * s.fluid) - s.congestion) + rng.normal(0, 0.005)
    s.effusion += 0.03 * (_clip(1.3 * s.fluid - 0.05) - s.effusion) + rng.normal(0, 0.003)
    # Infection: logistic growth untreated; antibiotics act after ~12 h and clear it over a few days.
    if s.abx_hours >= 0:
        s.abx_hours += 1
        s.abx_left -= 1
        if s.abx_left <= 0:
            s.abx_hours = -1.0
    on_abx = s.abx_hours >= 12
    if on_abx:
        s.infection -= 0.04 * s.infection
    elif s.infection > 0.02:
        s.infection += 0.025 * s.infection * (1.0 - s.infection)
    s.infection += rng.normal(0, 0.004)
    s.consolidation += 0.06 * (s.infection - s.consolidation) + rng.normal(0, 0.004)
    # Pneumothorax resorbs slowly with a chest tube, persists (slowly grows) without.
    s.pneumothorax *= 0.93 if s.devices["chest_tube"] else 1.003
    if s.devices["chest_tube"]:
        s.effusion *= 0.97
    for k in ("infection", "consolidation", "effusion", "pneumothorax", "edema", "congestion"):
        setattr(s, k, _clip(getattr(s, k)))


def policy(s: State, t: Traits, hour: int, style: dict, rng: np.random.Generator) -> dict:
    """A clinician who reacts to the state with delays and variation (confounded, as real care is).

    ``style`` holds per-admission propensities (some teams diurese eagerly, some never start antibiotics),
    plus background rates so every action also happens in patients who do not need it — without them the
    effect of an action could not be told apart from the state that prompted it.
    """
    a: dict = {}
    if (s.edema > 0.35 or s.effusion > 0.45) and rng.random() < 0.10 * style["diurese"] or rng.random() < 0.008:
        a["furosemide_mg"] = float(rng.choice([20, 40, 40, 80]))
    if (s.fluid < 0.05 and rng.random() < 0.05) or rng.random() < 0.012 * style["fluids"]:
        a["fluid_ml"] = float(rng.choice([500, 1000]))
    if s.abx_hours < 0:
        if (s.infection > 0.25 and rng.random() < 0.07 * style["treat"]) or rng.random() < 0.002:
            a["antibiotic_start"] = float(rng.integers(96, 169))
    elif int(s.abx_hours) % style["abx_interval"] == 0:
        a["antibiotic_dose"] = 1.0
    intubated = s.devices["endotracheal_tube"]
    if not intubated and s.respiratory_load > 1.1 and rng.random() < 0.08:
        a["intubate"] = 1.0
    elif intubated and s.respiratory_load < 0.6 and rng.random() < 0.06:
        a["extubate"] = 1.0
    if s.effusion > 0.55 and rng.random() < 0.03:
        a["thoracentesis"] = 1.0
    if not s.devices["chest_tube"] and s.pneumothorax > 0.15 and rng.random() < 0.04:
        a["chest_tube_in"] = 1.0
    elif s.devices["chest_tube"] and s.pneumothorax < 0.05 and s.effusion < 0.3 and rng.random() < 0.03:
        a["chest_tube_out"] = 1.0
    if hour == style["line_hour"]:
        a["central_line"] = 1.0
    return a


def initial_state(scenario: str, t: Traits, rng: np.random.Generator) -> State:
    """Admission diagnoses: pneumonia, heart failure, both, or neither (post-operative / other)."""
    s = State()
    s.fluid = t.fluid_set_point + rng.normal(0, 0.1)
    if scenario in ("heart_failure", "mixed"):
        s.fluid = rng.uniform(0.55, 1.2)
    if scenario in ("pneumonia", "mixed"):
        s.infection = rng.uniform(0.2, 0.75)
        s.consolidation = s.infection * rng.uniform(0.4, 1.0)
    s.edema = _clip(s.fluid * rng.uniform(0.6, 1.0))
    s.congestion = _clip(1.1 * s.fluid)
    s.effusion = _clip((1.3 * s.fluid - 0.05) * rng.uniform(0.4, 1.1))
    if rng.random() < 0.08:
        s.pneumothorax = rng.uniform(0.3, 0.8)
    return s


def simulate(state0: State, traits: Traits, hours: int, style: dict, physiology_seed: int,
             policy_rng: np.random.Generator | None = None,
             actions: list[dict] | None = None) -> tuple[list[State], list[dict]]:
    """Run the hourly course. ``actions`` (one dict per hour) replays a fixed history instead of the policy.

    Physiology noise has its own stream (``physiology_seed``), separate from the clinician's choices, so a
    replay with an edited action list is a true counterfactual: same patient, same noise, other treatment.
    Returns the state at the *start* of every hour (after that hour's actions) and the actions taken.
    """
    rng = np.random.default_rng(physiology_seed)
    s = state0.copy()
    states, taken = [], []
    for h in range(hours):
        acts = policy(s, traits, h, style, policy_rng) if actions is None else actions[h]
        apply_actions(s, acts, rng)
        states.append(s.copy())
        taken.append(acts)
        evolve(s, traits, rng)
    return states, taken
