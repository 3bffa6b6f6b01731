"""The compact event store (decision D8): unique texts once, one fp16 matrix, per-pair index lists.

The reference stores, for every pair, its own fp16 [n_events, 1536] array in HDF5 (paper-reference §3),
so an event shared by many overlapping pairs (every pair of one admission sees the same vitals) is stored
many times. Here each unique text is embedded and stored once; a pair is a slice of two flat arrays:

    texts.parquet        column ``text``; row i = text id i
    embeddings.npy       float16 [n_texts, dim], opened with mmap_mode="r" (datasets read lazily)
    event_text_ids.npy   int32  [n_events_total], pair after pair, time-ordered within a pair
    event_hours.npy      float32 [n_events_total], hours since the pair's previous image
    pairs.parquet        pair_key, offset (int64), count (int32) into the two flat arrays
    meta.json            dim, counts, format version, embedder identity
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["EventStore", "build_event_store"]

FORMAT_VERSION = 1
_FILES = ("texts.parquet", "embeddings.npy", "event_text_ids.npy", "event_hours.npy", "pairs.parquet", "meta.json")


class EventStore:
    """Read side; ``EventStore.open(dir)``. Cheap to open (only the pair index is read eagerly)."""

    def __init__(self, root: Path, meta: dict, pair_index: pd.DataFrame) -> None:
        self.root = root
        self.meta = meta
        self.dim = int(meta["dim"])
        self.pair_keys: list[str] = pair_index["pair_key"].astype(str).tolist()
        self._row = {k: i for i, k in enumerate(self.pair_keys)}
        self._offset = pair_index["offset"].to_numpy(np.int64)
        self._count = pair_index["count"].to_numpy(np.int64)
        self._emb = np.load(root / "embeddings.npy", mmap_mode="r")
        self._ids = np.load(root / "event_text_ids.npy", mmap_mode="r")
        self._hours = np.load(root / "event_hours.npy", mmap_mode="r")
        self._texts: list[str] | None = None

    @classmethod
    def open(cls, root: str | Path) -> "EventStore":
        root = Path(root)
        for name in _FILES:
            if not (root / name).is_file():
                raise FileNotFoundError(f"event store {root}: missing {name}")
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{root / 'meta.json'}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        return cls(root, meta, pd.read_parquet(root / "pairs.parquet"))

    def __len__(self) -> int:
        return len(self.pair_keys)

    def __contains__(self, pair_key: str) -> bool:
        return pair_key in self._row

    def _slice(self, pair_key: str, max_events: int | None) -> slice:
        try:
            i = self._row[pair_key]
        except KeyError:
            raise KeyError(f"pair {pair_key!r} not in event store {self.root}") from None
        start, n = int(self._offset[i]), int(self._count[i])
        if max_events is not None and n > max_events:  # keep the most recent (the end of the slice)
            start, n = start + n - int(max_events), int(max_events)
        return slice(start, start + n)

    def text_ids(self, pair_key: str, max_events: int | None = None) -> np.ndarray:
        return np.asarray(self._ids[self._slice(pair_key, max_events)])

    def embeddings(self, pair_key: str, max_events: int | None = None) -> np.ndarray:
        """float16 [n, dim], time-ordered; with ``max_events`` the most recent ``max_events`` rows."""
        return np.asarray(self._emb[self.text_ids(pair_key, max_events)])

    def times(self, pair_key: str, max_events: int | None = None) -> np.ndarray:
        """float32 [n]: hours since the pair's previous image."""
        return np.asarray(self._hours[self._slice(pair_key, max_events)], dtype=np.float32)

    def texts(self, pair_key: str, max_events: int | None = None) -> list[str]:
        if self._texts is None:
            self._texts = pd.read_parquet(self.root / "texts.parquet")["text"].tolist()
        return [self._texts[i] for i in self.text_ids(pair_key, max_events)]

    @property
    def n_texts(self) -> int:
        return int(self._emb.shape[0])

    @property
    def n_events(self) -> int:
        return int(self._ids.shape[0])

    def bytes_on_disk(self) -> int:
        return sum((self.root / name).stat().st_size for name in _FILES)

    def reference_layout_bytes(self) -> int:
        """What the reference's one fp16 [n_events, dim] array per pair would take (payload only)."""
        return self.n_events * self.dim * 2

    def summary(self) -> dict:
        return {"pairs": len(self), "events": self.n_events, "unique_texts": self.n_texts, "dim": self.dim,
                "bytes_on_disk": self.bytes_on_disk(), "reference_layout_bytes": self.reference_layout_bytes(),
                "ratio": self.bytes_on_disk() / max(1, self.reference_layout_bytes())}

    # -- write side ---------------------------------------------------------------------------

    @staticmethod
    def write(root: str | Path, texts: list[str], embeddings: np.ndarray | None,
              pairs: dict[str, tuple[np.ndarray, np.ndarray]], *, identity: str = "unknown",
              _embeddings_file: Path | None = None) -> "EventStore":
        """Write a store atomically (into ``root.tmp``, then renamed).

        ``pairs``: pair_key -> (text indices int array, hours float array), both time-ordered.
        ``embeddings``: [len(texts), dim], stored as float16.
        """
        root = Path(root)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(texts)
        if _embeddings_file is not None:
            os.replace(_embeddings_file, tmp / "embeddings.npy")
            emb = np.load(tmp / "embeddings.npy", mmap_mode="r")
        else:
            emb = np.asarray(embeddings)
            np.save(tmp / "embeddings.npy", emb.astype(np.float16))
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"embeddings must be [{n}, dim], got {emb.shape}")
        keys = list(pairs)
        counts = np.array([len(pairs[k][0]) for k in keys], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if keys else np.zeros(0, np.int64)
        ids = np.concatenate([np.asarray(pairs[k][0], dtype=np.int64) for k in keys]) if keys else np.zeros(0, np.int64)
        hours = np.concatenate([np.asarray(pairs[k][1], dtype=np.float32) for k in keys]) if keys else np.zeros(0, np.float32)
        for k in keys:
            if len(pairs[k][0]) != len(pairs[k][1]):
                raise ValueError(f"pair {k!r}: {len(pairs[k][0])} indices but {len(pairs[k][1])} times")
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"text indices out of range [0, {n})")
        np.save(tmp / "event_text_ids.npy", ids.astype(np.int32))
        np.save(tmp / "event_hours.npy", hours.astype(np.float32))
        pd.DataFrame({"text": pd.Series(list(texts), dtype="str")}).to_parquet(tmp / "texts.parquet", index=False)
        pd.DataFrame({"pair_key": keys, "offset": offsets, "count": counts.astype(np.int32)}).to_parquet(
            tmp / "pairs.parquet", index=False)
        meta = {"format_version": FORMAT_VERSION, "dim": int(emb.shape[1]), "n_texts": n, "n_events": int(ids.size),
                "n_pairs": len(keys), "embedder": identity}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        del emb
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
        return EventStore.open(root)


def _event_batches(source, batch_rows: int):
    """(pair_key as an Arrow string array, text_id, hours arrays) in store order, a batch at a time: from
    ``events.parquet`` when the source is a folder (or an EventResult read from one), else from the in-memory
    frame. The keys stay Arrow strings (compared in C++), never a numpy unicode array."""
    root = source if isinstance(source, (str, Path)) else getattr(source, "root", None)
    if root is not None and (Path(root) / "events.parquet").is_file():
        f = pq.ParquetFile(Path(root) / "events.parquet")
        total = f.metadata.num_rows

        def gen():
            for b in f.iter_batches(batch_size=batch_rows, columns=["pair_key", "text_id", "hours"]):
                k = b.column(0)
                k = k.dictionary_decode() if pa.types.is_dictionary(k.type) else k
                yield (k, b.column(1).to_numpy().astype(np.int64),
                       b.column(2).to_numpy().astype(np.float32))
        return total, gen()
    ev = source.events
    return len(ev), iter([(pa.array(ev["pair_key"].astype(str).tolist(), pa.string()),
                           ev["text_id"].to_numpy(np.int64), ev["hours"].to_numpy(np.float32))])


def _text_batches(source, batch_rows: int):
    """(number of texts, iterator of text lists) from ``event_texts.parquet`` or the in-memory list."""
    root = source if isinstance(source, (str, Path)) else getattr(source, "root", None)
    if root is not None and (Path(root) / "event_texts.parquet").is_file():
        f = pq.ParquetFile(Path(root) / "event_texts.parquet")
        return f.metadata.num_rows, (b.column(0).to_pylist() for b in f.iter_batches(batch_size=batch_rows,
                                                                                          columns=["text"]))
    texts = list(source.texts)
    return len(texts), (texts[i:i + batch_rows] for i in range(0, len(texts), batch_rows))


def build_event_store(event_result, embedder, out_dir: str | Path, *, chunk_size: int = 65536,
                      progress: bool = False, batch_rows: int = 1 << 20) -> EventStore:
    """Embed the unique texts (cached ones are not recomputed) chunk by chunk into a float16 memory-mapped
    file, and write the store to ``out_dir``.

    ``event_result``: an :class:`ehrxdiff.data.events.EventResult`, or the folder written by
    :func:`ehrxdiff.data.events.extract_events_to_dir` (or ``EventResult.write``). From a folder everything streams:
    ``batch_rows`` events and ``chunk_size`` texts at a time, never all events as Python objects."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_texts, text_chunks = _text_batches(event_result, chunk_size)
    mm = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n_texts, embedder.dim))
    i = 0
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(tmp / "texts.parquet", schema) as tw:
        for chunk in text_chunks:
            mm[i:i + len(chunk)] = embedder.embed(chunk, progress=progress).astype(np.float16)
            tw.write_table(pa.table({"text": pa.array(chunk, pa.string())}, schema=schema))
            i += len(chunk)
    mm.flush()
    del mm
    n_events, batches = _event_batches(event_result, batch_rows)
    ids = np.lib.format.open_memmap(tmp / "event_text_ids.npy", mode="w+", dtype=np.int32, shape=(n_events,))
    hours = np.lib.format.open_memmap(tmp / "event_hours.npy", mode="w+", dtype=np.float32, shape=(n_events,))
    keys: list[str] = []
    counts: list[int] = []
    seen: set[str] = set()
    pos = 0
    for k, t, h in batches:
        n = len(k)
        if n and (t.min() < 0 or t.max() >= n_texts):
            raise ValueError(f"text indices out of range [0, {n_texts})")
        ids[pos:pos + n] = t
        hours[pos:pos + n] = h
        pos += n
        # events are ordered by pair then position: split at pair boundaries (a pair may span two batches)
        if n:
            change = pc.not_equal(k.slice(1), k.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.r_[True, change])
        else:
            starts = np.zeros(0, np.int64)
        ends = np.r_[starts[1:], n]
        run_keys = k.take(pa.array(starts, pa.int64())).to_pylist()
        for s_, e_, key in zip(starts, ends, run_keys):
            if keys and keys[-1] == key and s_ == 0:
                counts[-1] += int(e_ - s_)
                continue
            if key in seen:
                raise ValueError("event_result.events is not grouped by pair_key")
            seen.add(key)
            keys.append(key)
            counts.append(int(e_ - s_))
    ids.flush()
    hours.flush()
    del ids, hours
    c = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) if len(c) else np.zeros(0, np.int64)
    pd.DataFrame({"pair_key": keys, "offset": offsets, "count": c.astype(np.int32)}).to_parquet(
        tmp / "pairs.parquet", index=False)
    meta = {"format_version": FORMAT_VERSION, "dim": int(embedder.dim), "n_texts": int(n_texts),
            "n_events": int(n_events), "n_pairs": len(keys), "embedder": getattr(embedder, "identity", "unknown")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return EventStore.open(out_dir)
