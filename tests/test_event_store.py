"""The compact event store: round trip, most-recent slicing, dedup and its size against the reference layout."""
import numpy as np
import pandas as pd
import pytest

from ehrxdiff.data.embedding import HashingEmbedder
from ehrxdiff.data.event_store import EventStore, build_event_store
from ehrxdiff.data.events import EventResult


def _result() -> EventResult:
    texts = ["chartevents itemid Heart Rate value 88", "labevents itemid pO2 value 85", "outputevents itemid Foley value 350"]
    events = pd.DataFrame({
        "pair_key": ["a_b"] * 4 + ["c_d"] * 2,
        "position": [0, 1, 2, 3, 0, 1],
        "text_id": np.array([0, 1, 0, 2, 1, 1], dtype=np.int32),
        "hours": np.array([0.0, 1.5, 2.0, 3.25, 0.5, 9.0], dtype=np.float32),
        "table": ["chartevents", "labevents", "chartevents", "outputevents", "labevents", "labevents"],
    })
    return EventResult(events=events, texts=texts, report=pd.DataFrame(), text_style="plain")


@pytest.fixture
def store(tmp_path):
    return build_event_store(_result(), HashingEmbedder(dim=32, cache_path=tmp_path / "c.sqlite"), tmp_path / "store")


def test_round_trip(store, tmp_path):
    s = EventStore.open(tmp_path / "store")
    assert s.dim == 32 and s.pair_keys == ["a_b", "c_d"] and s.n_texts == 3 and s.n_events == 6
    e = s.embeddings("a_b")
    assert e.dtype == np.float16 and e.shape == (4, 32)
    np.testing.assert_array_equal(e[0], e[2])                # same text -> same stored row
    expected = HashingEmbedder(dim=32).embed(_result().texts).astype(np.float16)
    np.testing.assert_array_equal(e[3], expected[2])
    np.testing.assert_allclose(s.times("a_b"), [0.0, 1.5, 2.0, 3.25])
    assert s.texts("c_d") == ["labevents itemid pO2 value 85"] * 2


def test_max_events_keeps_most_recent(store):
    assert store.texts("a_b", max_events=2) == ["chartevents itemid Heart Rate value 88", "outputevents itemid Foley value 350"]
    np.testing.assert_allclose(store.times("a_b", max_events=2), [2.0, 3.25])
    assert store.embeddings("a_b", max_events=10).shape == (4, 32)


def test_sizes(store):
    assert store.reference_layout_bytes() == 6 * 32 * 2
    assert store.bytes_on_disk() > 0 and store.summary()["unique_texts"] == 3


def test_embeddings_are_memory_mapped(store):
    assert isinstance(store._emb, np.memmap)


def test_unknown_pair_and_missing_file(store, tmp_path):
    with pytest.raises(KeyError, match="zz"):
        store.embeddings("zz")
    (tmp_path / "store" / "event_hours.npy").unlink()
    with pytest.raises(FileNotFoundError, match="event_hours.npy"):
        EventStore.open(tmp_path / "store")


def test_rebuild_uses_cache_and_overwrites(tmp_path, store):
    emb = HashingEmbedder(dim=32, cache_path=tmp_path / "c.sqlite")
    s2 = build_event_store(_result(), emb, tmp_path / "store")
    assert emb.stats["hits"] == 3 and emb.stats["misses"] == 0
    assert s2.n_events == 6 and not (tmp_path / "store.tmp").exists()


def test_write_validates(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        EventStore.write(tmp_path / "s", ["a"], np.zeros((1, 4)), {"p": (np.array([1]), np.array([0.0]))})
    with pytest.raises(ValueError, match="indices but"):
        EventStore.write(tmp_path / "s", ["a"], np.zeros((1, 4)), {"p": (np.array([0, 0]), np.array([0.0]))})
    s = EventStore.write(tmp_path / "s", ["a", "b"], np.ones((2, 4)), {"p": (np.array([1, 0]), np.array([0.0, 1.0]))})
    assert s.texts("p") == ["b", "a"] and s.embeddings("p").dtype == np.float16


def test_streamed_build_from_folder_equals_in_memory(tmp_path, store):
    """build_event_store from the parquet folder (small batches, so pairs span batches) == from the frames."""
    res = _result()
    res.write(tmp_path / "ev")
    s2 = build_event_store(tmp_path / "ev", HashingEmbedder(dim=32), tmp_path / "store2", chunk_size=2, batch_rows=3)
    assert s2.pair_keys == store.pair_keys and s2.n_texts == store.n_texts and s2.n_events == store.n_events
    for k in store.pair_keys:
        np.testing.assert_array_equal(s2.embeddings(k), store.embeddings(k))
        np.testing.assert_array_equal(s2.times(k), store.times(k))
        assert s2.texts(k) == store.texts(k)
