"""Fixtures shared by the framework integrations' tests: a tiny random Llama (from the core
tests' conftest), an untrained KV-dropping compressor on it, and a store holding a small
corpus precompressed with it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CORE_CONFTEST = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("_sac_rag_core_test_helpers", _CORE_CONFTEST)
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)
# Everything the core conftest defines (helpers and fixtures), so that ``from conftest import
# ...`` in the core tests finds its names whichever conftest module pytest imported last.
globals().update({name: value for name, value in vars(_core).items() if not name.startswith("__")})
make_tiny_llama = _core.make_tiny_llama

# Written for these tests.
PASSAGES = [
    "The lighthouse on Gull Point was built in 1874 and painted red in 1902.",
    "Marta keeps bees behind the old mill; her honey won a prize at the county fair.",
    "The river ferry runs every forty minutes and stops at midnight in winter.",
    "Copper wire conducts heat well, so the kettle's handle is wrapped in cork.",
]


def pytest_configure(config):
    # The langchain-tests suites have async tests without markers: run them with pytest-asyncio.
    if hasattr(config.option, "asyncio_mode") and config.option.asyncio_mode is None:
        config.option.asyncio_mode = "auto"


def make_compressor(seed: int = 0, chunk_len: int = 510):
    """An untrained uniform KV-dropping compressor (ratio 5) on a tiny random Llama."""
    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = make_tiny_llama(seed)
    config = SACConfig(base_model=f"tiny-llama-{seed}", ratio=5, chunk_len=chunk_len, lora_rank=0,
                       bidirectional=False, anchor_embedding="none")
    return SACCompressor(config, model=model, tokenizer=tokenizer)


def record_engine_calls(engine, monkeypatch, names=("generate", "agenerate", "stream", "astream")) -> list:
    """``(prompts, config)`` of every call to the engine's decoding paths ``names``, in order."""
    calls = []

    def recording(original):
        def wrapped(prompts, config):
            calls.append((prompts, config))
            return original(prompts, config)
        return wrapped

    for name in names:
        monkeypatch.setattr(engine, name, recording(getattr(engine, name)))
    return calls


def prompt_configs(calls) -> list:
    """The decoding config of each prompt ``record_engine_calls`` saw, in order (one config given
    for a batch counts once per prompt)."""
    return [c for prompts, config in calls for c in (config if isinstance(config, list) else [config] * len(prompts))]


def decodings(calls) -> list[tuple[int, bool]]:
    """``(num_beams, mbr)`` of each decoding ``record_engine_calls`` saw (a batch's configs each)."""
    return [(c.num_beams, c.mbr) for _, config in calls for c in (config if isinstance(config, list) else [config])]


def make_store(path, compressor, passages=PASSAGES):
    """A store holding ``passages`` (one chunk each), as ``sac_rag.precompress`` would write it."""
    from sac_rag.store import AnchorStore

    store = AnchorStore.create(path, compressor.fingerprint, compressor.config.ratio, "float32")
    ids = [compressor.tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
    kvs = compressor.compress_chunks(ids)
    store.put_many([(AnchorStore.key_for(p), kv, {"text": p}) for p, kv in zip(passages, kvs)])
    return store


@pytest.fixture
def compressor():
    return make_compressor()


@pytest.fixture
def store(tmp_path, compressor):
    with make_store(tmp_path / "store", compressor) as opened:
        yield opened


@pytest.fixture
def engine(compressor, store):
    from sac_rag.handles import SACEngine

    return SACEngine(compressor, store)


@pytest.fixture
def passages():
    return list(PASSAGES)


@pytest.fixture
def compressor_factory():
    return make_compressor


@pytest.fixture
def store_factory():
    return make_store


def text_tokens(engine, prompt: str) -> int:
    """Tokens the decoder reads as text for ``prompt``: its text around the markers that resolve."""
    tokenizer = engine.compressor.tokenizer
    pieces = [s for s in engine.segments(prompt) if isinstance(s, str)]
    return len(engine.generator._bos) + sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in pieces)


@pytest.fixture
def count_text_tokens():
    return text_tokens
