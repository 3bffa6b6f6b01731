"""Notebook 07's building blocks (issue 7 items 1-3, 5) on tiny random models: immutable edits, the empty edit's
zero difference, shapes of uncertainty and rollout outputs, the sampler study's table, and the world's truth."""
import numpy as np
import pandas as pd
import pytest
import torch

from ehrxdiff.constants import IMAGENOME_LABELS
from ehrxdiff.simulation.rollout import admission_chains, rollout, step_metrics
from ehrxdiff.simulation.sampler_study import sampler_study
from ehrxdiff.synthetic.counterfactual import true_effect
from ehrxdiff.simulation.uncertainty import calibration_table, pixel_std, probability_spread, sample_many
from ehrxdiff.constants import WHATIF_INTERVENTIONS
from ehrxdiff.simulation.whatif import EventList, agreement, predict, what_if
from test_pipeline import EVENT_DIM, PX, tiny_pipe

torch.set_num_threads(1)


def embed(texts):
    """A deterministic stand-in for the study's embedder: the text's length and character sums."""
    return np.array([[len(t) % 7, sum(map(ord, t)) % 11] + [0.1 * j for j in range(EVENT_DIM - 2)] for t in texts],
                    np.float32)


class Store:
    """The read side of an EventStore, in memory."""

    def __init__(self, keys, n=3):
        rng = np.random.default_rng(0)
        self.pair_keys = list(keys)
        self._e = {k: rng.standard_normal((n, EVENT_DIM)).astype(np.float16) for k in keys}
        self._t = {k: [f"chartevents itemid Heart Rate value {60 + i} valuenum {60 + i} valueuom bpm"
                       for i in range(n - 1)] + ["prescriptions drug_type MAIN drug Furosemide route IV"] for k in keys}
        self.dim = EVENT_DIM

    def embeddings(self, k, max_events=None):
        return self._e[k]

    def texts(self, k, max_events=None):
        return self._t[k]

    def times(self, k, max_events=None):
        return np.arange(len(self._t[k]), dtype=np.float32)


class Dataset:
    """A PairDataset stand-in: pairs frame, store, items with images."""

    def __init__(self, pairs):
        self.pairs = pairs.reset_index(drop=True)
        self.store = Store(self.pairs["pair_key"])
        g = torch.Generator().manual_seed(1)
        self._img = {k: torch.rand(3, PX, PX, generator=g) * 2 - 1 for k in
                     set(self.pairs["prev_dicom_id"]) | set(self.pairs["target_dicom_id"])}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        r = self.pairs.iloc[i]
        return {"pair_key": r["pair_key"], "prev_image": self._img[r["prev_dicom_id"]],
                "target_image": self._img[r["target_dicom_id"]]}


class Evaluator(torch.nn.Module):
    """A tiny evaluator with the CXREvaluator interface (pathology logits, features)."""
    labels = IMAGENOME_LABELS

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(PX * PX, len(self.labels))

    def forward(self, x):
        f = x.flatten(1)
        return {"pathology": self.lin(f), "features": f[:, :4]}


def chain_pairs():
    """Admission 1: images a→b→c→d (consecutive) plus the all-earlier pair a→c; admission 2: x→y."""
    t = pd.Timestamp("2150-01-01")
    rows = [("b_a", "a", "b", 1, 0, 10), ("c_b", "b", "c", 1, 10, 20), ("c_a", "a", "c", 1, 0, 20),
            ("d_c", "c", "d", 1, 20, 30), ("y_x", "x", "y", 2, 0, 5)]
    return pd.DataFrame([{"pair_key": k, "prev_dicom_id": p, "target_dicom_id": q, "hadm_id": h,
                          "prev_time": t + pd.Timedelta(hours=a), "target_time": t + pd.Timedelta(hours=b)}
                         for k, p, q, h, a, b in rows])


def test_edits_never_mutate_the_original():
    store = Store(["k"])
    orig = EventList.from_store(store, "k")
    before = (orig.texts, orig.hours.copy(), orig.embeddings().copy())
    dropped = orig.drop([0], table="prescriptions")
    added = orig.add("prescriptions", {"drug": "Vancomycin", "drug_type": "MAIN", "route": "IV"}, 0.5, embedder=embed)
    iv = orig.add_intervention("diuretic", 1.0, embedder=embed)
    assert (orig.texts, list(orig.hours)) == (before[0], list(before[1]))
    assert np.array_equal(orig.embeddings(), before[2])
    assert len(dropped) == 1 and len(added) == 4 and len(iv) == 3 + len(WHATIF_INTERVENTIONS["diuretic"]["events"])
    # columns in the table's serialization order, inserted after events of the same time
    assert added.texts[1] == "prescriptions drug_type MAIN drug Vancomycin route IV" and added.events[1].added
    assert orig.drop(item="furosemide").texts == orig.texts[:2]
    with pytest.raises(ValueError):
        orig.events[0].embedding[0] = 1.0            # read-only embeddings
    with pytest.raises(ValueError, match="unknown column"):
        orig.add("prescriptions", {"dose": 1}, 0.0, embedder=embed)
    assert orig.window(2).texts == orig.texts[1:]
    # the extraction's event_budget_last rule: a dose added to a full list pushes out the oldest vital sign
    hr60, vanco, hr61, furo = added.texts
    assert added.window(3, ["chartevents"]).texts == [vanco, hr61, furo]
    assert added.window(2, ["chartevents"]).texts == [vanco, furo] and added.window(2).texts == [hr61, furo]


def test_what_if_difference_is_exactly_zero_for_an_empty_edit():
    pipe = tiny_pipe()
    factual = EventList.from_store(Store(["k"]), "k")
    prev = torch.rand(3, PX, PX) * 2 - 1
    res = what_if(pipe, prev, factual, factual.drop(), pair_key="k", seeds=[0, 1], num_inference_steps=2,
                  evaluator=Evaluator())
    assert res.factual.shape == (2, 3, PX, PX) and torch.equal(res.difference, torch.zeros(PX, PX))
    assert set(res.probabilities["history"]) == {"factual", "counterfactual"} and len(res.probabilities) == 40
    edited = what_if(pipe, prev, factual, factual.drop([0, 1, 2]), pair_key="k", seeds=[0, 1], num_inference_steps=2)
    assert torch.equal(edited.factual, res.factual) and edited.difference.abs().max() > 0


def test_uncertainty_shapes_and_calibration():
    pipe, ev = tiny_pipe(), Evaluator()
    keys = ["a", "b"]
    store = Store(keys)
    samples = sample_many(pipe, torch.zeros(2, 3, PX, PX), [EventList.from_store(store, k) for k in keys], keys,
                          n_samples=3, num_inference_steps=2, batch_pairs=1)
    assert samples.shape == (2, 3, 3, PX, PX) and pixel_std(samples).shape == (2, PX, PX)
    one = predict(pipe, torch.zeros(1, 3, PX, PX), [EventList.from_store(store, "a")], ["a"], [0],
                  num_inference_steps=2)[0, 0]
    assert torch.allclose(samples[0, 0], one, atol=1e-5)          # sample k = seed k (batch shape aside)
    spread = probability_spread(ev, samples, keys)
    assert len(spread) == 2 * len(IMAGENOME_LABELS) and (spread["min"] <= spread["max"]).all()
    rows = pd.DataFrame({"method": "m", "label": "x", "relation": [0, 0, 1, 1], "score": [0.05, 0.15, 0.85, 0.95]})
    cal = calibration_table(rows, bins=2)
    assert cal["n"].tolist() == [2, 2] and cal["frequency"].tolist() == [0.0, 1.0]
    assert cal["ece"].iloc[0] == pytest.approx(0.1)


def test_admission_chains_follow_consecutive_pairs():
    ch = admission_chains(chain_pairs(), max_steps=5)
    assert ch[ch["chain"] == 0]["pair_key"].tolist() == ["b_a", "c_b", "d_c"] and ch["step"].max() == 3
    assert "c_a" not in set(ch["pair_key"])
    assert admission_chains(chain_pairs(), max_steps=2)["step"].max() == 2


def test_rollout_shapes_and_metrics():
    pipe, ev = tiny_pipe(), Evaluator()
    ds = Dataset(chain_pairs())
    ch = admission_chains(ds.pairs, max_steps=3)
    preds = rollout(pipe, ds, ch, seeds=[0, 1], num_inference_steps=2)
    assert set(preds["rollout"]) == set(zip(ch["chain"], ch["step"]))
    assert preds["rollout"][(0, 2)].shape == (2, 3, PX, PX)
    assert torch.equal(preds["rollout"][(0, 1)], preds["one_step"][(0, 1)])     # step 1 starts from the truth
    assert not torch.equal(preds["rollout"][(0, 2)], preds["one_step"][(0, 2)])  # later steps from the prediction
    rows = pd.DataFrame([{"pair_key": k, "label": lab, "relation": int(i % 2)} for k in ds.pairs["pair_key"]
                         for i, lab in enumerate(IMAGENOME_LABELS)])
    m = step_metrics(ev, ds, ch, preds, rows, [0, 1])
    assert set(m["method"]) == {"rollout", "one-step (true I_prev)", "first image carried forward", "GT"}
    gt = m[(m["method"] == "GT") & (m["metric"] == "pixel MAE")]
    assert (gt["value"] == 0).all()


def test_sampler_study_table():
    pipe, ev = tiny_pipe(), Evaluator()
    ds = Dataset(chain_pairs())
    rows = pd.DataFrame([{"pair_key": k, "label": lab, "relation": int((i + j) % 2), "prev_relation": 0}
                         for j, k in enumerate(ds.pairs["pair_key"]) for i, lab in enumerate(IMAGENOME_LABELS)])
    scheduler = pipe.scheduler
    t = sampler_study(pipe, ev, ds, rows, samplers=["ddim", "dpm"], steps=[1, 2], seed=0, batch_size=2)
    assert pipe.scheduler is scheduler
    assert set(t["metric"]) == {"AUROC all", "AUROC diff", "AUROC same", "FID", "seconds per image"}
    assert len(t) == 2 * 2 * 5 and (t[t["metric"] == "seconds per image"]["value"] > 0).all()


def test_world_truth_diuretic_lowers_edema_and_agreement_counts_signs():
    hours = 30
    course = pd.DataFrame({"hour": range(hours), "time": pd.date_range("2150-01-01", periods=hours, freq="h"),
                           **{lab: 0.2 for lab in IMAGENOME_LABELS}, "pulmonary edema/hazy opacity": 0.6,
                           "fluid": 0.8, "diuretic": 0.0, "endotracheal_tube": False, "central_line": False,
                           "ng_tube": False, "chest_tube": False, "action_antibiotic_start": np.nan})
    eff = true_effect(course, course["time"][0], course["time"][2], course["time"][20], {"furosemide_mg": 40.0}, 1.0)
    assert eff["pulmonary edema/hazy opacity"] < -0.05 and eff["pleural effusion"] < 0
    assert eff["pneumothorax"] == 0 and eff["hour_action"] == 3
    effects = pd.DataFrame({"intervention": "diuretic", "label": "pleural effusion",
                            "delta_p": [-0.1, -0.2, 0.1, 0.05], "delta_true": [-0.1, -0.1, -0.1, 0.0]})
    s = agreement(effects).iloc[0]
    assert s["lowers_rate"] == 0.5 and s["n_true_effect"] == 3 and s["agreement"] == pytest.approx(2 / 3)


def test_an_own_cohort_intervention_reaches_the_model_as_its_extracted_row_would(tmp_path):
    """Issue 16: a what-if defined in an own cohort's terms is written exactly as extract_own_events writes the
    same row (column order as given, free text last), and agreement scores the findings it was defined to lower."""
    from ehrxdiff.config import load_config
    from ehrxdiff.data.own_cohort import extract_own_events
    definition = {"drugs": {"events": [{"table": "drugs", "item": "Furosemide", "value": 40, "unit": "mg",
                                        "text": "route IV"}], "lowers": ["pleural effusion"]}}
    cfg = load_config("smoke", {"own_images": "i.csv", "own_events": "e.csv", "whatif_definitions": definition})
    edit = cfg.interventions()["drugs"]
    iv = EventList(()).add_intervention(edit, 2.0, embedder=embed)
    t0 = pd.Timestamp("2150-01-01")
    pd.DataFrame([{"subject_id": "1", "time": t0 + pd.Timedelta(hours=2), "table": "drugs", "item": "Furosemide",
                   "value": "40", "unit": "mg", "text": "route IV"}]).to_csv(tmp_path / "events.csv", index=False)
    pairs = pd.DataFrame({"pair_key": ["k"], "subject_id": ["1"], "prev_time": [t0],
                          "target_time": [t0 + pd.Timedelta(hours=5)]})
    extracted = extract_own_events(tmp_path / "events.csv", pairs)
    assert iv.texts == list(extracted.texts) == ["drugs item Furosemide value 40 unit mg route IV"]
    effects = pd.DataFrame({"intervention": "drugs", "label": ["pleural effusion", "pneumonia"],
                            "delta_p": [-0.1, -0.1], "delta_true": [np.nan, np.nan]})
    scored = agreement(effects, lowers={k: v["lowers"] for k, v in cfg.interventions().items()})
    assert list(scored["label"]) == ["pleural effusion"] and np.isnan(scored["agreement"].iloc[0])
