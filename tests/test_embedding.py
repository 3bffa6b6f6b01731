"""Embedding backends and the crash-safe cache. The openai backend runs the real ``openai`` client against
a loopback fake server (127.0.0.1, random port) that answers 429, 500, then successes, and can "die"."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ehrxdiff.data.embedding import ExternalAPIRefused, HashingEmbedder, LocalEmbedder, OpenAIEmbedder, make_embedder

DIM = 4


def fake_vector(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 97), 1.0, -1.0]


class FakeEmbeddingsAPI:
    """Answers POST .../embeddings. ``script`` = status codes for the first requests; after that 200s.
    ``die_after`` = number of successful batches after which every request gets 503 (a dead backend)."""

    def __init__(self, script=(), die_after=None, dim=DIM):
        self.script, self.die_after, self.dim = list(script), die_after, dim
        self.requested: list[list[str]] = []
        self.ok = 0
        self.paths: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.paths.append(self.path)
                if api.script:
                    status = api.script.pop(0)
                elif api.die_after is not None and api.ok >= api.die_after:
                    status = 503
                else:
                    status = 200
                if status != 200:
                    self._send(status, {"error": {"message": f"fake {status}", "type": "server_error"}})
                    return
                api.ok += 1
                api.requested.append(list(body["input"]))
                data = [{"object": "embedding", "index": i, "embedding": (fake_vector(t) * api.dim)[:api.dim]}
                        for i, t in enumerate(body["input"])]
                self._send(200, {"object": "list", "data": data, "model": body["model"],
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})

            def _send(self, status, payload):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _openai(url, cache, **kw):
    return OpenAIEmbedder(data_is_synthetic=True, base_url=url + "/v1", dim=DIM, batch_size=2, max_retries=3,
                          backoff_base=0.001, backoff_max=0.01, timeout=2.0, cache_path=cache, **kw)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-test-not-a-key")


TEXTS = [f"chartevents itemid Heart Rate value {v}" for v in range(7)]


def test_openai_retries_429_then_500_then_succeeds(api_key, tmp_path):
    with FakeEmbeddingsAPI(script=[429, 500]) as api:
        emb = _openai(api.url, tmp_path / "cache.sqlite")
        out = emb.embed(TEXTS + TEXTS[:2])  # duplicates are embedded once
    assert out.shape == (9, DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out[3], fake_vector(TEXTS[3]))
    np.testing.assert_array_equal(out[7], out[0])
    assert sum(len(r) for r in api.requested) == 7       # every unique text requested exactly once
    assert emb.n_requests == 4 + 2                         # 4 batches of <=2 + the two failed attempts
    assert emb.stats == {"texts": 9, "unique": 7, "hits": 0, "misses": 7}
    assert all(p.endswith("/v1/embeddings") for p in api.paths)


def test_openai_kill_mid_run_then_resume_requests_only_missing(api_key, tmp_path):
    cache = tmp_path / "cache.sqlite"
    with FakeEmbeddingsAPI(die_after=2) as api:
        emb = _openai(api.url, cache)
        with pytest.raises(Exception, match="503|fake"):
            emb.embed(TEXTS)
        emb.close()
    paid = [t for batch in api.requested for t in batch]
    assert paid == TEXTS[:4]                              # two batches of 2 were paid for before the death
    with FakeEmbeddingsAPI() as api2:
        emb2 = _openai(api2.url, cache)
        out = emb2.embed(TEXTS)
    assert [t for batch in api2.requested for t in batch] == TEXTS[4:]
    assert emb2.stats["hits"] == 4 and emb2.stats["misses"] == 3
    np.testing.assert_array_equal(out, np.array([fake_vector(t) for t in TEXTS], dtype=np.float32))


def test_openai_non_retryable_error_raises_at_once(api_key, tmp_path):
    with FakeEmbeddingsAPI(script=[400]) as api:
        emb = _openai(api.url, None)
        with pytest.raises(Exception, match="400|fake"):
            emb.embed(TEXTS[:1])
    assert emb.n_requests == 1


def test_openai_refuses_mimic_text_without_opt_in(api_key, tmp_path):
    with pytest.raises(ExternalAPIRefused, match="data use agreement"):
        OpenAIEmbedder(data_is_synthetic=False, base_url="http://127.0.0.1:9/v1", dim=DIM)
    with FakeEmbeddingsAPI() as api:
        emb = OpenAIEmbedder(data_is_synthetic=False, allow_external_api=True, base_url=api.url + "/v1", dim=DIM,
                             timeout=2.0)
        assert emb.embed(["x"]).shape == (1, DIM)


def test_openai_key_only_from_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIEmbedder(data_is_synthetic=True, base_url="http://127.0.0.1:9/v1", dim=DIM)


def test_azure_provider_uses_deployment_path(api_key):
    with FakeEmbeddingsAPI() as api:
        emb = OpenAIEmbedder(data_is_synthetic=True, provider="azure", azure_endpoint=api.url, model="ada-dep",
                             dim=DIM, timeout=2.0)
        emb.embed(["a b"])
    assert api.paths[0].startswith("/openai/deployments/ada-dep/embeddings?api-version=")


def test_hashing_deterministic_normalised_and_meaningful():
    emb = HashingEmbedder(dim=256)
    a, b, c = emb.embed(["chartevents itemid Heart Rate value 88 valueuom bpm",
                         "chartevents itemid Heart Rate value 90 valueuom bpm",
                         "microbiologyevents spec_type_desc SPUTUM org_name PSEUDOMONAS AERUGINOSA"])
    np.testing.assert_allclose(np.linalg.norm([a, b, c], axis=1), 1.0, rtol=1e-5)
    assert float(a @ b) > 0.5 > abs(float(a @ c))
    np.testing.assert_array_equal(HashingEmbedder(dim=256).embed(["x y"]), emb.embed(["x y"]))


def test_cache_refuses_other_backend(tmp_path):
    HashingEmbedder(dim=8, cache_path=tmp_path / "c.sqlite").embed(["a"])
    with pytest.raises(ValueError, match="cache belongs to hashing-uni-bigram-8"):
        HashingEmbedder(dim=16, cache_path=tmp_path / "c.sqlite")


def test_make_embedder_rejects_unknown_backend():
    with pytest.raises(ValueError, match="hashing"):
        make_embedder("ada")


def test_local_backend_from_bundled_model(tmp_path):
    emb = LocalEmbedder(cache_path=tmp_path / "local.sqlite", batch_size=4)
    out = emb.embed(["labevents itemid pO2 value 85", "labevents itemid pO2 value 85", "inputevents itemid Vancomycin"])
    assert out.shape == (3, emb.dim) and emb.dim == 384
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-4)
    assert emb.stats["misses"] == 2 and len(emb.cache) == 2


@pytest.mark.parametrize("provider", ["openai", "azure"])
def test_notebook_02_embeds_with_the_openai_backend_chosen_by_config(api_key, monkeypatch, tmp_path, provider):
    """Issue 16: the paper profile's backend through the study's config path (prepare.make_embedder, as notebook 02
    calls it), both providers, against the loopback server; ada-002's 1536-d vectors."""
    from ehrxdiff.study import prepare
    from ehrxdiff.config import load_config
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-test-not-a-key")
    with FakeEmbeddingsAPI(dim=1536) as api:
        net = ({"openai_base_url": api.url + "/v1"} if provider == "openai" else
               {"openai_provider": "azure", "openai_azure_endpoint": api.url, "openai_azure_deployment": "ada-dep"})
        cfg = load_config("smoke", {"embedding_backend": "openai", "data_dir": str(tmp_path / "data"),
                                    "run_dir": str(tmp_path / "run"), **net})
        step = prepare.build_events(cfg, prepare.build_cohort(cfg).pairs)
    assert step.store.summary()["unique_texts"] == len(step.events.texts) > 0
    assert step.store.summary()["dim"] == 1536
    assert api.paths and all(p.startswith("/openai/deployments/ada-dep/embeddings") if provider == "azure"
                             else p == "/v1/embeddings" for p in api.paths)


def test_openai_backend_refuses_real_data_without_opt_in_through_the_config(api_key, tmp_path):
    from ehrxdiff.study import prepare
    from ehrxdiff.config import ConfigError, load_config
    from ehrxdiff.synthetic import generate_world
    world = generate_world(tmp_path / "w", n_patients=3, seed=1, image_size=32, workers=1, progress=False)
    real = {"embedding_backend": "openai", "openai_base_url": "http://127.0.0.1:9/v1", "data_dir": str(tmp_path / "d"),
            "mimic_iv_dir": str(world / "mimiciv/2.2"), "mimic_cxr_dir": str(world / "mimic-cxr-jpg/2.0.0")}
    with pytest.raises(ExternalAPIRefused, match="data use agreement"):
        prepare.make_embedder(load_config("smoke", real))
    with pytest.raises(ConfigError, match="openai_azure_endpoint"):
        load_config("smoke", {**real, "openai_provider": "azure"})
