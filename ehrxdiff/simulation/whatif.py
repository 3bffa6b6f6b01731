"""What-if simulation: edit a pair's S_event and predict the next CXR for the factual and the edited history.

The paper closes (§V) by calling EHRXDiff a potential clinical simulation tool: if the model has learned how
events change a radiograph, changing the events should change the prediction the way medicine says it would.
This module makes that a function call:

    factual = EventList.from_store(store, pair_key)
    edited = factual.drop(item="Furosemide").add_intervention("antibiotic", hours=2.0, embedder=emb)
    result = what_if(pipe, prev_image, factual, edited, pair_key=pair_key, seeds=[0, 1], evaluator=evaluator)
    result.difference      # [H, W]: mean over seeds of I_cf - I_f (same noise for both: the edit is the only change)
    result.probabilities   # tidy: history (factual / counterfactual), seed, label, probability

Edits never mutate: an :class:`EventList` is frozen and every edit returns a new one. An added event is written
with :func:`ehrxdiff.data.events.serialize_event` (the extraction's own text rules, in the table's column order) and
embedded with the study's embedder, rounded to float16 as the event store keeps it, so it reaches the model
exactly as an extracted event would. Factual and counterfactual are sampled with the **same seeds** (each image's
noise from :func:`ehrxdiff.models.sampling.pair_seed`), in separate calls of identical shape, so an empty edit gives a
difference of exactly zero.

:func:`intervention_effects` runs one intervention over many test pairs and tidies the evaluator's per-finding
probability change; :func:`ehrxdiff.synthetic.counterfactual.true_effect` gives the world's true change for the
same edit, and :func:`agreement` compares the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ehrxdiff.constants import EVENT_TABLES, WHATIF_INTERVENTIONS
from ehrxdiff.data.datasets import pad_events
from ehrxdiff.data.events import event_columns, serialize_event, unknown_columns
from ehrxdiff.data.own_cohort import serialize_own_row
from ehrxdiff.models.sampling import pair_seed

@dataclass(frozen=True)
class Event:
    """One event of S_event: its text, hours since I_prev, source table, embedding, and whether an edit added it."""
    text: str
    hours: float
    embedding: np.ndarray
    added: bool = False

    @property
    def table(self) -> str:
        return self.text.split(" ", 1)[0]       # serialize_event writes the table name first


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.float32, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class EventList:
    """A time-ordered, immutable S_event. Every edit returns a new list; the original is never touched."""
    events: tuple[Event, ...]

    @classmethod
    def from_store(cls, store, pair_key: str) -> "EventList":
        """The pair's events as the event store holds them (the ``max_events`` the extraction kept)."""
        emb, texts, hours = store.embeddings(pair_key), store.texts(pair_key), store.times(pair_key)
        return cls(tuple(Event(t, float(h), _frozen(e)) for t, h, e in zip(texts, hours, emb)))

    def __len__(self) -> int:
        return len(self.events)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.events]

    @property
    def hours(self) -> np.ndarray:
        return np.array([e.hours for e in self.events], np.float32)

    def drop(self, indices: Sequence[int] = (), *, table: str | None = None, item: str | None = None) -> "EventList":
        """Without the events at ``indices``, of ``table``, or whose text contains ``item`` (case-insensitive)."""
        gone = set(int(i) % max(len(self), 1) for i in indices)
        keep = [e for i, e in enumerate(self.events)
                if i not in gone and (table is None or e.table != table)
                and (item is None or item.lower() not in e.text.lower())]
        return EventList(tuple(keep))

    def add(self, table: str, values: dict, hours: float, *, embedder: Callable[[list[str]], np.ndarray],
            text_style: str = "plain") -> "EventList":
        """With one event of ``table`` (``values``: column → value, itemid as its label) at ``hours`` after I_prev.

        A MIMIC table (:data:`~ehrxdiff.constants.EVENT_TABLES`): columns in the table's serialization order, an
        unknown column an error (it would never appear in an extracted text). Any other table is an own cohort's
        (:mod:`ehrxdiff.data.own_cohort`): columns in the given order, a ``text`` value last, as that module writes a
        row. The new event goes after events of the same time (stable order).
        """
        if table in EVENT_TABLES:
            order = event_columns(table)
            unknown = unknown_columns(table, values)
            if unknown:
                raise ValueError(f"{table}: unknown column(s) {unknown}; serialized columns: {order}")
            text = serialize_event(table, {c: values[c] for c in order if c in values}, text_style=text_style)
        else:
            text = serialize_own_row(table, {c: v for c, v in values.items() if c != "text"}, values.get("text"),
                                     text_style=text_style)
        vec = np.asarray(embedder([text]), np.float32)[0].astype(np.float16)   # as stored (D8: fp16)
        new = Event(text, float(hours), _frozen(vec), added=True)
        at = int(np.searchsorted(self.hours, new.hours, side="right")) if len(self) else 0
        return EventList(self.events[:at] + (new,) + self.events[at:])

    def add_intervention(self, intervention: str | dict, hours: float, *, embedder,
                         text_style: str = "plain") -> "EventList":
        """With every event row of an intervention at ``hours``: a built-in's name
        (:data:`~ehrxdiff.constants.WHATIF_INTERVENTIONS`) or a definition ``{"events": [(table, values), …]}``
        as :meth:`ehrxdiff.config.StudyConfig.interventions` returns them."""
        definition = WHATIF_INTERVENTIONS[intervention] if isinstance(intervention, str) else intervention
        out = self
        for table, values in definition["events"]:
            out = out.add(table, values, hours, embedder=embedder, text_style=text_style)
        return out

    def window(self, max_events: int, budget_last: Sequence[str] = ()) -> "EventList":
        """``max_events`` of the list by the extraction's rule: the most recent (§II-D; pipeline.max_events), the
        ``budget_last`` tables' events only after every other table's (``event_budget_last``), in time order. An
        edit that adds a dose to a full list so pushes out the oldest vital sign, as the extraction would."""
        if len(self) <= max_events:
            return self
        last = set(budget_last)
        ranked = sorted(range(len(self)), key=lambda i: (self.events[i].table in last, -i))
        return EventList(tuple(self.events[i] for i in sorted(ranked[:max_events])))

    def embeddings(self, dim: int | None = None) -> np.ndarray:
        if not self.events:
            return np.zeros((0, dim or 1), np.float32)
        return np.stack([e.embedding for e in self.events]).astype(np.float32)


def stack_events(lists: Sequence[EventList], *, max_events: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded events [B, N, D] and mask [B, N] (True = real) for ``generate``, as ``collate_pairs`` builds."""
    return pad_events([lst.embeddings(dim) for lst in lists], max_events=max_events)


def predict(pipe, prev_images: torch.Tensor, event_lists: Sequence[EventList], pair_keys: Sequence[str],
            seeds: Sequence[int], *, num_inference_steps: int, eta: float = 1.0,
            event_guidance_scale: float = 1.0) -> torch.Tensor:
    """I_pred [B, S, 3, H, W] for B (I_prev, S_event) with each of S seeds; image noise = pair_seed(seed, key).

    One ``generate`` call of B x S rows: a row's result depends on its inputs and generator only, so two calls
    with the same keys and seeds see the same noise (what makes factual and counterfactual comparable).
    ``event_guidance_scale``: the study's s (:class:`ehrxdiff.models.pipeline.EHRXDiffPipeline`); 1 for models without
    S_event.
    """
    b, s = len(event_lists), len(seeds)
    dim = pipe.clip.event_dim if pipe.clip is not None else 1
    uses_table = pipe.adaptor.config.use_clip_table
    events, mask = stack_events([lst for lst in event_lists for _ in seeds], max_events=pipe.config.max_events,
                                dim=dim)
    gens = [torch.Generator(device=pipe._execution_device).manual_seed(pair_seed(seed, key))
            for key in pair_keys for seed in seeds]
    prev = prev_images.repeat_interleave(s, dim=0)
    out = pipe.generate(prev, events if uses_table else None, mask if uses_table else None,
                        num_inference_steps=num_inference_steps, eta=eta, generator=gens, progress=False,
                        event_guidance_scale=event_guidance_scale if uses_table else 1.0)
    return out.reshape(b, s, *out.shape[1:])


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit levels of the PNGs the study scores (notebook 05), so both paths see the same images."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


@torch.no_grad()
def evaluator_output(evaluator, images: torch.Tensor, key: str, batch_size: int = 64) -> list[torch.Tensor]:
    """One output of the evaluator ("pathology" logits, "features", …) per batch, for images [N, C, H, W] in
    [-1, 1] seen as the scored PNGs are (8-bit levels, first channel)."""
    evaluator.eval()
    x = quantize(images)[:, :1]
    return [evaluator(x[i:i + batch_size])[key] for i in range(0, len(x), batch_size)]


def finding_probabilities(evaluator, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """The evaluator's P(finding) [N, L] for images [N, C, H, W] in [-1, 1] (first channel, as the PNGs)."""
    out = [torch.sigmoid(o) for o in evaluator_output(evaluator, images, "pathology", batch_size)]
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(evaluator.labels)), np.float32)


@dataclass(frozen=True)
class WhatIf:
    """Factual and counterfactual predictions of one pair (same seeds) and what the evaluator reads in them."""
    pair_key: str
    prev: torch.Tensor              # [3, H, W]
    factual: torch.Tensor           # [S, 3, H, W]
    counterfactual: torch.Tensor    # [S, 3, H, W]
    probabilities: pd.DataFrame     # history, seed, label, probability (empty without an evaluator)
    factual_events: EventList
    counterfactual_events: EventList

    @property
    def difference(self) -> torch.Tensor:
        """Mean over seeds of I_cf − I_f, first channel [H, W]: where the edit changed the prediction."""
        return (self.counterfactual - self.factual).mean(0)[0]


def what_if(pipe, prev_image: torch.Tensor, factual: EventList, counterfactual: EventList, *, pair_key: str,
            seeds: Sequence[int], num_inference_steps: int, eta: float = 1.0, evaluator=None,
            event_guidance_scale: float = 1.0) -> WhatIf:
    """Predict I_trg from ``prev_image`` [3, H, W] under both histories with the same seeds (module docstring)."""
    prev = prev_image.unsqueeze(0)
    kw = dict(num_inference_steps=num_inference_steps, eta=eta, event_guidance_scale=event_guidance_scale)
    f = predict(pipe, prev, [factual], [pair_key], seeds, **kw)[0]
    cf = predict(pipe, prev, [counterfactual], [pair_key], seeds, **kw)[0]
    probs = pd.DataFrame(columns=["history", "seed", "label", "probability"])
    if evaluator is not None:
        p = finding_probabilities(evaluator, torch.cat([f, cf]))
        labels = list(evaluator.labels)
        probs = pd.DataFrame([{"history": h, "seed": seed, "label": lab, "probability": float(p[i * len(seeds) + j, k])}
                              for i, h in enumerate(("factual", "counterfactual")) for j, seed in enumerate(seeds)
                              for k, lab in enumerate(labels)])
    return WhatIf(pair_key, prev_image, f, cf, probs, factual, counterfactual)


def intervention_effects(pipe, evaluator, dataset, pair_keys: Sequence[str], intervention: str, *, hours: dict,
                         embedder, seeds: Sequence[int], num_inference_steps: int, eta: float = 1.0,
                         text_style: str = "plain", batch_size: int = 16, event_guidance_scale: float = 1.0,
                         events_of: dict[str, str] | None = None, definition: dict | None = None,
                         budget_last: Sequence[str] = ()) -> pd.DataFrame:
    """Add ``intervention`` at ``hours[pair_key]`` to each pair's S_event; per (pair, label) the evaluator's
    P(finding) under both histories (mean over seeds) and their difference ``delta_p`` = counterfactual − factual.
    ``dataset``: a :class:`ehrxdiff.data.datasets.PairDataset` holding the pairs (I_prev and the event store).
    ``events_of`` (pair_key → another pair): the shuffled-events control (issue 14) - both histories start from the
    other pair's S_event, the edit and I_prev stay this pair's, so the effect is compared with this pair's truth.
    ``definition``: the intervention's rows when it is not a built-in (``StudyConfig.interventions()``).
    ``budget_last``: the extraction's ``event_budget_last``; an edited history over the pipeline's ``max_events`` is
    cut by the same rule (:meth:`EventList.window`)."""
    edit = definition if definition is not None else intervention
    index = {k: i for i, k in enumerate(dataset.pairs["pair_key"])}
    labels = list(evaluator.labels)
    rows = []
    for start in range(0, len(pair_keys), batch_size):
        keys = list(pair_keys[start:start + batch_size])
        prev = torch.stack([dataset[index[k]]["prev_image"] for k in keys])
        fact = [EventList.from_store(dataset.store, events_of[k] if events_of else k) for k in keys]
        cf = [f.add_intervention(edit, hours[k], embedder=embedder, text_style=text_style)
              .window(pipe.config.max_events, budget_last) for f, k in zip(fact, keys)]
        kw = dict(num_inference_steps=num_inference_steps, eta=eta, event_guidance_scale=event_guidance_scale)
        pf = finding_probabilities(evaluator, predict(pipe, prev, fact, keys, seeds, **kw).flatten(0, 1))
        pc = finding_probabilities(evaluator, predict(pipe, prev, cf, keys, seeds, **kw).flatten(0, 1))
        pf, pc = (p.reshape(len(keys), len(seeds), -1).mean(1) for p in (pf, pc))
        for i, k in enumerate(keys):
            for j, lab in enumerate(labels):
                rows.append({"pair_key": k, "intervention": intervention, "hours": hours[k], "label": lab,
                             "events": "shuffled" if events_of else "own",
                             "p_factual": float(pf[i, j]), "p_counterfactual": float(pc[i, j]),
                             "delta_p": float(pc[i, j] - pf[i, j])})
    return pd.DataFrame(rows)


def agreement(effects: pd.DataFrame, *, min_true_effect: float = 0.01,
              lowers: dict[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Model vs world, per (intervention, label) the intervention is meant to lower.

    ``effects`` carries ``delta_p`` (model) and ``delta_true`` (the world's severity change for the same edit).
    ``lowers_rate``: share of pairs where the predicted probability fell; ``agreement``: share of pairs whose
    true change is at least ``min_true_effect`` in size where the model moved the same way; mean effects and
    the Spearman correlation of the two. With an ``events`` column (own / shuffled S_event, the control of
    issue 14) one row per events kind as well. ``lowers``: intervention → the findings it is meant to lower
    (default: the built-ins'; ``StudyConfig.interventions()`` gives the configured ones)."""
    lowers = lowers if lowers is not None else {k: v["lowers"] for k, v in WHATIF_INTERVENTIONS.items()}
    out = []
    effects = effects if "events" in effects else effects.assign(events="own")
    for (iv, lab, ev), g in effects.groupby(["intervention", "label", "events"], sort=False):
        if lab not in lowers.get(iv, ()):
            continue
        real = g[g["delta_true"].abs() >= min_true_effect]
        out.append({"intervention": iv, "label": lab, "events": ev, "n_pairs": len(g),
                    "lowers_rate": float((g["delta_p"] < 0).mean()),
                    "mean_delta_p": float(g["delta_p"].mean()),
                    "sem_delta_p": float(g["delta_p"].std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else np.nan,
                    "true_lowers_rate": float((g["delta_true"] < 0).mean()),
                    "mean_delta_true": float(g["delta_true"].mean()),
                    "n_true_effect": len(real),
                    "agreement": float((np.sign(real["delta_p"]) == np.sign(real["delta_true"])).mean())
                    if len(real) else np.nan,
                    "spearman": float(g["delta_p"].corr(g["delta_true"], method="spearman"))
                    if len(g) > 2 and g["delta_true"].std() > 0 and g["delta_p"].std() > 0 else np.nan})
    return pd.DataFrame(out)


ITEM_COLUMNS = ("drug", "itemid", "item")   # the columns that name an intervention row's item (MIMIC / own cohort)


def intervention_items(definition: dict) -> tuple[str, ...]:
    """The item names of an intervention's rows (``drug``, ``itemid`` or an own cohort's ``item``): how an extracted
    S_event is recognised as holding the intervention (:func:`observed_association`)."""
    return tuple(dict.fromkeys(str(values[c]) for _, values in definition["events"] for c in ITEM_COLUMNS
                               if values.get(c) not in (None, "")))


def observed_association(label_rows: pd.DataFrame, texts: Callable[[str], Sequence[str]], interventions: dict, *,
                         max_events: int) -> pd.DataFrame:
    """What the observed pairs say about an intervention, before any model: per finding it is meant to lower and
    per previous-film label (0 / 1), the next film's rate of the finding among pairs whose S_event holds the
    intervention (an event naming one of its items, :func:`intervention_items`, among the ``max_events`` most
    recent the model sees) and among pairs whose S_event does not.

    Why (issue 14): a model of P(I_trg | I_prev, S_event) fitted to observed pairs learns this association, and
    the world's causal effect of *adding* the intervention (:func:`agreement`'s truth) can point the other way. On
    the synthetic world a diuretic is given because edema rose after I_prev (the world's treatment policy), so at
    the same previous label the next film shows *more* edema after a diuretic than without one, although adding
    one lowers it: confounding by indication. A what-if that agrees with the world has to see past that.

    ``label_rows``: Table II's rows (pair_key, label, relation, prev_relation) of the pairs to count (the train
    split); ``texts``: pair_key → its S_event texts, oldest first (the event store's ``texts``). One row per
    (intervention, label, previous label): pairs and rate with and without the intervention, and their difference.
    """
    rows = []
    wanted = {iv: (intervention_items(d), tuple(d.get("lowers", ()))) for iv, d in interventions.items()}
    wanted = {iv: w for iv, w in wanted.items() if w[0] and w[1]}
    if not wanted or label_rows.empty:
        return pd.DataFrame(columns=["intervention", "label", "previous_label", "n_with", "n_without", "rate_with",
                                     "rate_without", "difference"])
    keys = sorted(set(label_rows["pair_key"]))
    recent = {k: [t.lower() for t in list(texts(k))[-max_events:]] for k in keys}
    for iv, (items, lowers) in wanted.items():
        low = [i.lower() for i in items]
        holds = pd.Series({k: any(i in t for t in recent[k] for i in low) for k in keys}, name="with")
        for lab in lowers:
            g = label_rows[(label_rows["label"] == lab) & label_rows["relation"].notna()].copy()
            g["with"] = g["pair_key"].map(holds)
            g["previous_label"] = (g["prev_relation"].fillna(0) > 0).astype(int)
            for prev, h in g.groupby("previous_label"):
                w, wo = h[h["with"]], h[~h["with"]]
                rate_w = float(w["relation"].mean()) if len(w) else np.nan
                rate_wo = float(wo["relation"].mean()) if len(wo) else np.nan
                rows.append({"intervention": iv, "label": lab, "previous_label": int(prev), "n_with": len(w),
                             "n_without": len(wo), "rate_with": rate_w, "rate_without": rate_wo,
                             "difference": rate_w - rate_wo})
    return pd.DataFrame(rows)


# --- figures ---------------------------------------------------------------------------------------------
