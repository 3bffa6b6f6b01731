"""Issue 14: the events controls (shuffled / no S_event), the guidance sweep's runs, and claims that can fail."""
import numpy as np
import pandas as pd
import pytest
import torch

from ehrxdiff.study import models
from ehrxdiff.config import ConfigError, load_config
from ehrxdiff.data.datasets import PairDataset, collate_pairs
from ehrxdiff.evaluation.claims import FAILS, HOLDS, UNDECIDED, claims, verdict
from ehrxdiff.models.sampling import WithEvents
from ehrxdiff.simulation.whatif import agreement, intervention_items, observed_association
from test_cache import tiny_world
from test_pipeline import tiny_pipe

torch.set_num_threads(1)


def test_shuffled_events_is_a_fixed_derangement_of_the_pairs():
    cfg = load_config("smoke")
    pairs = pd.DataFrame({"pair_key": [f"p{i:02d}" for i in range(30)]}).sample(frac=1, random_state=3)
    a, b = models.shuffled_events(cfg, pairs), models.shuffled_events(cfg, pairs.sort_values("pair_key"))
    pd.testing.assert_frame_equal(a, b)                                  # fixed: the row order does not matter
    assert (a["pair_key"] != a["events_of"]).all()                        # nobody keeps its own events
    assert sorted(a["events_of"]) == sorted(a["pair_key"])                # every pair's events used once
    other = models.shuffled_events(load_config("smoke", {"seed": 1}), pairs)
    assert not other["events_of"].equals(a["events_of"])                  # the permutation follows the seed
    with pytest.raises(ValueError, match="at least 2"):
        models.shuffled_events(cfg, pairs.head(1))


def test_with_events_swaps_only_the_events(tmp_path):
    pairs, img_dir, store = tiny_world(tmp_path)
    ds = PairDataset(pairs, img_dir, store, image_size=16)
    events_of = {"pair3": "pair5", **{k: k for k in pairs["pair_key"] if k != "pair3"}}
    i = pairs.index[pairs["pair_key"] == "pair3"][0]
    own, shuffled, none = ds[i], WithEvents(ds, events_of)[i], WithEvents(ds, None)[i]
    assert torch.equal(shuffled["events"], torch.from_numpy(ds.events("pair5")))
    assert not torch.equal(shuffled["events"], own["events"])
    assert none["events"].shape == (0, own["events"].shape[1])
    for key in ("prev_image", "target_image", "pair_key"):                # I_prev, I_trg and the noise stay own
        assert torch.equal(own[key], shuffled[key]) if torch.is_tensor(own[key]) else own[key] == shuffled[key]
    batch = collate_pairs([none, none])
    assert not batch["event_mask"].any()                                  # the null event set, as the null branch
    with pytest.raises(KeyError, match="no source pair"):
        WithEvents(ds, {"pair3": "pair5"})


def test_no_events_control_equals_the_guidance_at_zero():
    """The no-S_event run is the sweep's s = 0: sampling the null event set equals guidance 0 on own events."""
    pipe = tiny_pipe()
    g = torch.Generator().manual_seed(3)
    prev, events = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 8, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    null = collate_pairs([{"prev_image": p, "target_image": p, "events": events[0][:0], "pair_key": "k",
                           "prev_dicom_id": "", "target_dicom_id": "", "is_null": False} for p in prev])

    def run(ev, m, s):
        return pipe.generate(prev, ev, m, num_inference_steps=3, progress=False, event_guidance_scale=s,
                             generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(run(events, mask, 0.0), run(null["events"], null["event_mask"], 1.0))


def test_sample_runs_name_every_control_once_and_the_sweep_reuses_them():
    cfg = load_config("demo", {"event_guidance_scale": 2.0, "guidance_sweep": [0, 1, 2, 4],
                               "event_guidance_by_model": {}})
    runs = models.sample_runs(cfg)
    methods = [r.method for r in runs]
    assert len(set(methods)) == len(methods) and len({r.folder for r in runs}) == len(runs)
    by = {r.method: r for r in runs}
    assert by["EHRXDiff_w_null"].scale == 2.0 and by["EHRXDiff_w_null"].folder == "EHRXDiff_w_null@s2"
    assert by["EHRXDiff (shuffled S_event)"].folder == "EHRXDiff@shuffled-s2"
    assert by["EHRXDiff_w_null (no S_event)"].folder == "EHRXDiff_w_null@no-events"
    assert by["concat-VAE"].scale == 1.0 and by["concat-VAE"].folder == "concat-VAE"   # no S_event to guide
    sweep = models.guidance_sweep_runs(cfg)
    assert list(sweep) == [0.0, 1.0, 2.0, 4.0]
    assert sweep[0.0] == by["EHRXDiff_w_null (no S_event)"] and sweep[2.0] == by["EHRXDiff_w_null"]
    assert sweep[1.0].folder == "EHRXDiff_w_null" and sweep[1.0].method == "EHRXDiff_w_null (s = 1)"
    assert models.sample_dir(cfg, "EHRXDiff_w_null", 0).parent.name == "EHRXDiff_w_null@s2"  # a name = its main run
    plain = load_config("demo", {"event_guidance_scale": 1.0, "event_guidance_by_model": {}})
    assert models.sample_dir(plain, "EHRXDiff_w_null", 0).parent.name == "EHRXDiff_w_null"


def test_each_model_can_have_its_own_guidance_scale():
    cfg = load_config("demo", {"event_guidance_scale": 2.0, "event_guidance_by_model": "{EHRXDiff: 4}"})  # as -p
    by = {r.method: r for r in models.sample_runs(cfg)}
    assert by["EHRXDiff"].scale == 4.0 and by["EHRXDiff"].folder == "EHRXDiff@s4"
    assert by["EHRXDiff (shuffled S_event)"].folder == "EHRXDiff@shuffled-s4"     # its control at its own s
    assert by["EHRXDiff (no S_event)"].scale == 0.0            # the reference branch alone, whatever the reference
    assert by["EHRXDiff_w_null"].scale == 2.0 and models.guidance_sweep_runs(cfg)[2.0] == by["EHRXDiff_w_null"]
    assert models.guidance_scale(cfg, "concat-VAE") == 1.0                        # reads no S_event
    assert models.sample_dir(cfg, "EHRXDiff", 0).parent.name == "EHRXDiff@s4"
    with pytest.raises(ConfigError, match="not models of this profile that read S_event"):
        load_config("demo", {"event_guidance_by_model": {"concat-VAE": 2.0}})
    with pytest.raises(ConfigError, match="not models of this profile that read S_event"):
        load_config("demo", {"event_guidance_by_model": {"EHRXdiff": 2.0}})
    with pytest.raises(ConfigError, match="event_guidance_by_model must be dict"):
        load_config("demo", {"event_guidance_by_model": [4]})


@pytest.mark.parametrize("bad", [{"guidance_sweep": [-1]}, {"guidance_sweep": ["two"]},
                                 {"event_guidance_scale": -0.5}, {"guidance_sweep": [float("inf")]},
                                 {"event_guidance_by_model": {"EHRXDiff": -1}}])
def test_config_rejects_bad_guidance(bad):
    with pytest.raises(ConfigError, match="finite numbers >= 0"):
        load_config("smoke", bad)


def test_verdict_needs_the_margin_and_says_fails_or_undecided():
    assert verdict(0.05, 0.01, 2) == HOLDS
    assert verdict(0.015, 0.01, 2) == UNDECIDED
    assert verdict(-0.05, 0.01, 2) == FAILS
    assert verdict(np.nan, 0.01, 2) == UNDECIDED


def _summary(values: dict) -> pd.DataFrame:
    """auroc_summary rows from {(method, subset): [auroc per seed]}."""
    return pd.DataFrame([{"method": m, "subset": s, "seed": k, "auroc": v}
                         for (m, s), vs in values.items() for k, v in enumerate(vs)])


def test_claims_gate_the_previous_image_comparison_on_the_shuffled_control():
    base = {("previous image", "diff"): [0.17], ("EHRXDiff", "same"): [0.70, 0.71, 0.69],
            ("EHRXDiff", "diff"): [0.52, 0.53, 0.51], ("EHRXDiff (shuffled S_event)", "diff"): [0.52, 0.50, 0.54],
            ("EHRXDiff_w_null", "same"): [0.80, 0.81, 0.79], ("concat-VAE", "diff"): [0.60]}
    # w_null is far above the previous image on diff, but no better with its own events than with shuffled ones
    chance = claims({"auroc_summary": _summary(base | {("EHRXDiff_w_null", "diff"): [0.51, 0.52, 0.50],
                                                       ("EHRXDiff_w_null (shuffled S_event)", "diff"): [0.51, 0.50,
                                                                                                         0.52]})})
    v = dict(zip(chance["claim"], chance["verdict"]))
    assert v["EHRXDiff_w_null's own S_event beat shuffled S_event on diff (events matter)"] == UNDECIDED
    assert v["EHRXDiff_w_null beats the previous image on diff"].startswith("undecided (w_null does not beat")
    assert v["EHRXDiff_w_null beats EHRXDiff on same"] == HOLDS
    assert v["dropping the table events lowers diff (EHRXDiff vs the best variant without CLIP-table: concat-VAE)"] \
        == FAILS
    uses = claims({"auroc_summary": _summary(base | {("EHRXDiff_w_null", "diff"): [0.65, 0.66, 0.64],
                                                     ("EHRXDiff_w_null (shuffled S_event)", "diff"): [0.51, 0.50,
                                                                                                       0.52]})})
    v = dict(zip(uses["claim"], uses["verdict"]))
    assert v["EHRXDiff_w_null's own S_event beat shuffled S_event on diff (events matter)"] == HOLDS
    assert v["EHRXDiff_w_null beats the previous image on diff"] == HOLDS
    row = uses.set_index("claim").loc["EHRXDiff_w_null beats EHRXDiff on same"]
    assert row["paired"] and row["difference"] == pytest.approx(0.10) and row["margin"] == pytest.approx(0.0, abs=1e-9)
    ablation = uses.set_index("claim").iloc[-1]                              # concat-VAE: one seed, unpaired
    assert not ablation["paired"] and ablation["margin"] == pytest.approx(2 * np.std([0.52, 0.53, 0.51], ddof=1))


def test_a_paired_claim_cancels_the_noise_both_sides_share():
    """Own vs shuffled S_event on the same seeds: a seed that is hard for both does not hide a steady gain."""
    own, shuffled = [0.70, 0.50, 0.60], [0.66, 0.46, 0.56]                     # +0.04 on every seed
    c = claims({"auroc_summary": _summary({("EHRXDiff_w_null", "diff"): own,
                                           ("EHRXDiff_w_null (shuffled S_event)", "diff"): shuffled})})
    row = c.set_index("claim").loc["EHRXDiff_w_null's own S_event beat shuffled S_event on diff (events matter)"]
    assert row["paired"] and row["verdict"] == HOLDS
    assert verdict(row["difference"], np.hypot(np.std(own, ddof=1), np.std(shuffled, ddof=1)), 2) == UNDECIDED


def test_whatif_agreement_reports_own_and_shuffled_events_apart():
    eff = pd.DataFrame({"pair_key": ["a", "b", "a", "b"], "intervention": "diuretic", "label": "pleural effusion",
                        "events": ["own", "own", "shuffled", "shuffled"], "delta_p": [-0.1, -0.2, 0.1, -0.1],
                        "delta_true": [-0.3, -0.2, -0.3, -0.2]})
    out = agreement(eff).set_index("events")
    assert out.loc["own", "agreement"] == 1.0 and out.loc["shuffled", "agreement"] == 0.5


def test_observed_association_counts_the_next_films_finding_with_and_without_the_intervention_per_previous_label():
    """The association a model fitted to the pairs learns (issue 14): per previous label, the next film's rate of
    the finding among pairs whose S_event names the intervention's item (case-insensitive, within the max_events
    most recent) and among the others."""
    from ehrxdiff.config import load_config
    diuretic = load_config("smoke").interventions()["diuretic"]
    assert intervention_items(diuretic) == ("Furosemide", "Furosemide (Lasix)")
    texts = {"a": ["chartevents Heart Rate 90", "prescriptions MAIN furosemide 40 mg"],
             "b": ["inputevents Furosemide (Lasix) 40 mg", "chartevents SpO2 95"],
             "c": ["chartevents Heart Rate 80"], "d": [],
             "e": ["prescriptions MAIN Furosemide 40 mg", "x", "y"],          # out of the 2 most recent: not seen
             "f": ["chartevents Heart Rate 70"]}
    lab = "pulmonary edema/hazy opacity"
    rows = pd.DataFrame({"pair_key": list("abcdef"), "label": lab, "relation": [1, 1, 0, 1, 0, 0],
                         "prev_relation": [0, 1, 0, 1, 1, 0]})
    other = pd.DataFrame({"pair_key": ["a"], "label": "pneumonia", "relation": [1], "prev_relation": [0]})
    out = observed_association(pd.concat([rows, other]), texts.get, {"diuretic": diuretic}, max_events=2)
    assert set(out["label"]) == {lab}                          # no pleural-effusion rows: none counted
    out = out.set_index("previous_label")
    # previous 0: a (with, 1) vs c, f (without, 0 and 0); previous 1: b (with, 1) vs d, e (without, 1 and 0)
    assert out.loc[0, ["n_with", "n_without", "rate_with", "rate_without"]].tolist() == [1, 2, 1.0, 0.0]
    assert out.loc[1, ["n_with", "n_without", "rate_with", "rate_without"]].tolist() == [1, 2, 1.0, 0.5]
    assert out.loc[1, "difference"] == 0.5
    assert observed_association(rows, texts.get, {"x": {"events": [("drugs", {"value": 1})], "lowers": (lab,)}},
                                max_events=2).empty                          # no item to recognise: nothing counted


def test_a_changed_permutation_never_resumes_old_shuffled_samples(tmp_path):
    from ehrxdiff.study.models import _match_permutation
    folder = tmp_path / "EHRXDiff@shuffled"
    a = pd.DataFrame({"pair_key": ["p0", "p1", "p2"], "events_of": ["p1", "p2", "p0"]})
    _match_permutation(folder, a)
    (folder / "seed0").mkdir()
    (folder / "seed0" / "p0.png").write_bytes(b"x")
    _match_permutation(folder, a)                                   # same permutation: the PNG is resumed
    assert (folder / "seed0" / "p0.png").exists()
    b = a.assign(events_of=["p2", "p0", "p1"])
    _match_permutation(folder, b)                                   # another one: the old PNGs are gone
    assert not (folder / "seed0").exists() and pd.read_csv(folder / "shuffled_events.csv").equals(b)
