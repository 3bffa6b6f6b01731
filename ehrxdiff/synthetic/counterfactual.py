"""The world's true effect of a what-if edit: re-simulate a pair's interval with and without an added action.

:mod:`dynamics` keeps the physiology noise apart from the clinician's choices so that a course can be replayed
with an edited action list. The ground-truth sidecar (``ground_truth/course.parquet``) holds, per admission hour,
the state after that hour's actions (severities, fluid balance, diuretic compartment, devices) and the actions
taken. From it this module rebuilds the state at I_prev's hour, replays the recorded actions up to I_trg's hour
with one noise stream, and replays them again with the added action under the **same** noise: the difference of
the findings' severities at I_trg is the true counterfactual effect that a what-if prediction
(:mod:`ehrxdiff.simulation.whatif`) should match in sign.

Approximations (stated, small): severities are stored clipped to [0, 1] and stand in for the unclipped state;
the patient's fluid set point is not stored and is taken from its age trend (``world.fluid_set_point_mean``) (it enters
factual and counterfactual alike, so the difference hardly depends on it). :func:`true_effect` reports
``replay_error``, the mean absolute gap between the factual replay and the recorded severities at I_trg, so the
quality of the reconstruction is visible next to every effect.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ehrxdiff.constants import IMAGENOME_LABELS
from .dynamics import ACTIONS, DEVICES, State, Traits, apply_actions, evolve, severities
from .world import FLUID_SET_POINT_RANGE, fluid_set_point_mean

H = 3600.0


def _actions(row: pd.Series) -> dict:
    acts = {}
    for a in ACTIONS:
        v = row.get(f"action_{a}")
        if v is not None and not pd.isna(v):
            acts[a] = float(v)
    return acts


def state_at(course: pd.DataFrame, hour: int) -> State:
    """The state after hour ``hour``'s actions, rebuilt from one admission's course rows (sorted by hour)."""
    r = course.iloc[hour]
    s = State(fluid=float(r["fluid"]), infection=float(r["pneumonia"]), consolidation=float(r["consolidation"]),
              effusion=float(r["pleural effusion"]), pneumothorax=float(r["pneumothorax"]),
              edema=float(r["pulmonary edema/hazy opacity"]), congestion=float(r["vascular congestion"]),
              diuretic=float(r["diuretic"]))
    s.devices = {d: bool(r[d]) for d in DEVICES}
    starts = course.iloc[:hour + 1]
    starts = starts[starts["action_antibiotic_start"].notna()] if "action_antibiotic_start" in starts else starts.iloc[:0]
    if len(starts):                          # the running course: hours since its start and hours left
        h0, length = int(starts.iloc[-1]["hour"]), float(starts.iloc[-1]["action_antibiotic_start"])
        if length - (hour - h0) > 0:
            s.abx_hours, s.abx_left = float(hour - h0), length - (hour - h0)
    return s


def _traits(age: float) -> Traits:
    return Traits(sex="F", age=age, cardiac0=0.0, hilum0=0.0, mediastinum0=0.0,
                  fluid_set_point=float(np.clip(fluid_set_point_mean(age), *FLUID_SET_POINT_RANGE)))


def replay(course: pd.DataFrame, h0: int, h1: int, traits: Traits, *, seed: int,
           added: dict[int, dict] | None = None) -> dict[str, float]:
    """Severities at hour ``h1`` starting from the recorded state at ``h0``; ``added`` maps hour → extra actions
    (applied after that hour's recorded ones; an hour ≤ ``h0`` acts on the starting state)."""
    rng = np.random.default_rng(seed)
    added = added or {}
    s = state_at(course, h0)
    for h, acts in added.items():
        if h <= h0:
            apply_actions(s, acts, rng)
    for h in range(h0 + 1, h1 + 1):
        evolve(s, traits, rng)
        apply_actions(s, {**_actions(course.iloc[h]), **added.get(h, {})}, rng)
    return severities(s, traits)


def true_effect(course: pd.DataFrame, admit_time, prev_time, target_time, action: dict, hours_after_prev: float, *,
                age: float = 60.0, seed: int = 0) -> dict:
    """Per finding: severity at I_trg with ``action`` added ``hours_after_prev`` after I_prev minus without.

    ``course``: one admission's rows of ``course.parquet`` sorted by hour; times as pandas timestamps.
    Returns ``{label: delta}`` plus ``replay_error`` (see the module docstring) and the hours used.
    """
    last = len(course) - 1
    h0 = int(np.clip((pd.Timestamp(prev_time) - pd.Timestamp(admit_time)).total_seconds() // H, 0, last))
    h1 = int(np.clip((pd.Timestamp(target_time) - pd.Timestamp(admit_time)).total_seconds() // H, h0, last))
    ha = int(np.clip(h0 + np.floor(hours_after_prev), h0, h1))
    traits = _traits(age)
    base = replay(course, h0, h1, traits, seed=seed)
    cf = replay(course, h0, h1, traits, seed=seed, added={ha: dict(action)})
    rec = course.iloc[h1]
    err = float(np.mean([abs(base[lab] - float(rec[lab])) for lab in
                         ("pulmonary edema/hazy opacity", "pleural effusion", "consolidation", "pneumonia")]))
    return {**{lab: cf[lab] - base[lab] for lab in IMAGENOME_LABELS}, "replay_error": err,
            "hour_prev": h0, "hour_target": h1, "hour_action": ha}


def pair_true_effects(course: pd.DataFrame, pairs: pd.DataFrame, action: dict, hours: dict, *,
                      seed: int = 0) -> pd.DataFrame:
    """:func:`true_effect` for many pairs → tidy (pair_key, label, delta_true, replay_error).

    ``pairs``: pair_key, hadm_id, prev_time, target_time, age; ``hours``: pair_key → hours after I_prev."""
    by_adm = {h: g.sort_values("hour").reset_index(drop=True) for h, g in course.groupby("hadm_id")}
    rows = []
    for p in pairs.itertuples(index=False):
        c = by_adm.get(p.hadm_id)
        if c is None:
            continue
        eff = true_effect(c, c["time"].iloc[0], p.prev_time, p.target_time, action, hours[p.pair_key],
                          age=float(p.age), seed=seed)
        rows += [{"pair_key": p.pair_key, "label": lab, "delta_true": eff[lab], "replay_error": eff["replay_error"],
                  "interval_hours": eff["hour_target"] - eff["hour_prev"]} for lab in IMAGENOME_LABELS]
    return pd.DataFrame(rows)
