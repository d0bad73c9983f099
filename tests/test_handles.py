"""Handles: markers in a prompt become cached K/V only for entries of the compressor in use."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import (
    FingerprintMismatchError,
    GenerationConfig,
    InvalidInputError,
    PromptTooLongError,
    SACCompressor,
    SACConfig,
)
from sac_rag.handles import (
    CacheResolver,
    MarkerCutError,
    SACEngine,
    keys_in,
    marker_for,
    markers_for,
    plain_text,
    reads_caches,
    split_prompt,
)
from sac_rag.kv import AnchorKV
from sac_rag.store import AnchorStore, EntryNotFoundError, NotAStoreError

PASSAGES = ["The lighthouse on Gull Point was built in 1874.", "Marta keeps bees behind the old mill."]


def kv_dropping(seed: int = 0, chunk_len: int = 510) -> SACCompressor:
    model, tokenizer = make_tiny_llama(seed)
    config = SACConfig(base_model=f"tiny-{seed}", ratio=5, chunk_len=chunk_len, lora_rank=0,
                       bidirectional=False, anchor_embedding="none")
    return SACCompressor(config, model=model, tokenizer=tokenizer)


@pytest.fixture
def compressor():
    return kv_dropping()


@pytest.fixture
def store(tmp_path, compressor):
    store = AnchorStore.create(tmp_path / "store", compressor.fingerprint, 5, "float32")
    ids = [compressor.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PASSAGES]
    store.put_many([(AnchorStore.key_for(p), kv) for p, kv in zip(PASSAGES, compressor.compress_chunks(ids))])
    with store:
        yield store


def test_marker_is_the_store_key_in_sac_brackets_and_parses_back():
    key = AnchorStore.key_for("some chunk")
    assert marker_for(key) == f"<sac:{key}>"
    assert keys_in(f"a {marker_for(key)} b {markers_for([key, key])}") == [key]
    for bad in ("", "abc", key.upper(), key + "0", None):
        with pytest.raises(InvalidInputError):
            marker_for(bad)


def test_split_prompt_replaces_only_markers_that_resolve():
    real, fake = AnchorStore.key_for("real"), AnchorStore.key_for("fake")
    entry = object()
    asked = []

    def resolve(key):
        asked.append(key)
        return entry if key == real else None

    prompt = f"A{marker_for(real)}B{marker_for(fake)}C<sac:{real.upper()}>{marker_for(real)}"
    assert split_prompt(prompt, resolve) == ["A", entry, f"B{marker_for(fake)}C<sac:{real.upper()}>", entry]
    assert asked == [real, fake]  # once per distinct key
    assert split_prompt("no markers", resolve) == ["no markers"]


def test_resolver_refuses_a_store_of_another_compressor(store):
    with pytest.raises(FingerprintMismatchError, match="Rebuild the store"):
        CacheResolver(kv_dropping(seed=1).fingerprint, store)


def test_resolver_keeps_only_this_compressors_chunks_in_memory(compressor):
    resolver = CacheResolver(compressor.fingerprint)
    other = kv_dropping(seed=1).compress("Marta keeps bees.")[0]
    with pytest.raises(FingerprintMismatchError):
        resolver.remember(AnchorStore.key_for("Marta keeps bees."), other)
    mine = compressor.compress("Marta keeps bees.")[0]
    resolver.remember(AnchorStore.key_for("Marta keeps bees."), mine)
    assert resolver(AnchorStore.key_for("Marta keeps bees.")) is mine
    assert resolver(AnchorStore.key_for("unknown")) is None and resolver("not a key") is None


def test_a_prompt_with_markers_decodes_exactly_like_the_same_entries_given_directly(compressor, store):
    engine = SACEngine(compressor, store)
    template = compressor.config.prompt
    question = "Who keeps bees?"
    kvs = store.get_many([AnchorStore.key_for(p) for p in PASSAGES])
    direct = template.build(kvs, question)
    markers = [markers_for([AnchorStore.key_for(p)]) for p in PASSAGES]
    via_markers = engine.segments(template.build(markers, question)[0])
    assert [isinstance(s, str) for s in via_markers] == [isinstance(s, str) for s in direct]  # text, caches, text
    logits = engine.generator.prompt_logits(via_markers), engine.generator.prompt_logits(direct)
    torch.testing.assert_close(*logits)


def test_count_positions_is_what_the_model_reads_a_marker_as_its_chunks_tokens(compressor, store):
    engine = SACEngine(compressor, store)
    unknown = marker_for("0" * 64)  # names no chunk: read as text
    prompt = compressor.config.prompt.build([markers_for([AnchorStore.key_for(p)]) for p in PASSAGES],
                                            "Who keeps bees? " + unknown)[0]
    [generation] = engine.generate([prompt], GenerationConfig(max_new_tokens=1))
    assert engine.count_positions(prompt) == generation.text_tokens + generation.context_tokens
    chunk_tokens = sum(len(compressor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PASSAGES)
    assert generation.context_tokens == chunk_tokens
    assert engine.count_positions("") == 0
    with pytest.raises(InvalidInputError, match="str"):
        engine.count_positions(["a list"])


def test_texts_are_looked_up_then_compressed_on_a_miss(compressor, store):
    engine = SACEngine(compressor, store)
    new = "Snow closed the pass in March."
    handles = engine.handles_for([PASSAGES[0], new, "  "])
    assert handles == [[AnchorStore.key_for(PASSAGES[0])], [AnchorStore.key_for(new)], []]
    assert AnchorStore.key_for(new) in engine.resolver.memory and AnchorStore.key_for(new) not in store
    with pytest.raises(EntryNotFoundError, match="precompress"):
        engine.handles_for(["Another unseen text."], on_miss="error")
    assert engine.handles_for(["Another unseen text."], on_miss="text") == [None]


def test_texts_that_miss_the_store_are_counted_in_one_warning(compressor, store, caplog):
    """A store serves only texts identical to its chunks: texts cut another way (a text splitter)
    are compressed on the fly, and the user is told how many."""
    engine = SACEngine(compressor, store)
    split = ["The lighthouse on Gull Point", "was built in 1874."]  # PASSAGES[0], cut in two
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        engine.handles_for([*split, PASSAGES[1]])
    [record] = caplog.records
    assert f"2 of 3 retrieved texts were not in the store at {store.path}" in record.getMessage()
    assert "identical to the chunks sac_rag.precompress stored" in record.getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        engine.handles_for(PASSAGES)  # all in the store
        engine.handles_for(split)  # compressed by the first call: in memory now
        SACEngine(compressor).handles_for(["Snow closed the pass."])  # no store: nothing bypassed
        engine.handles_for(["Snow closed the pass."], write_back=True)  # the store keeps it
    assert caplog.records == []


def test_an_empty_answer_warns_that_the_prompt_is_outside_the_trained_layout(compressor, store, caplog):
    engine = SACEngine(compressor, store)
    engine.generator.eos_token_ids = set(range(len(compressor.tokenizer)))  # every token ends the answer
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        [answer] = engine.generate(["What is 2+2?"], GenerationConfig(max_new_tokens=4))
        final = list(engine.stream("What is 2+2?", GenerationConfig(max_new_tokens=4)))[-1]
    assert answer.text == final.text == "" and answer.finish_reason == "stop"
    assert [r.getMessage()[:34] for r in caplog.records] == ["1 of 1 answers are empty: the mode"] * 2
    assert "### Answer:" in caplog.text and "sac_qa_prompt" in caplog.text

    caplog.clear()
    engine.generator.eos_token_ids = set()
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        [answer] = engine.generate(["What is 2+2?"], GenerationConfig(max_new_tokens=4))
    assert answer.text.strip() and caplog.records == []


def test_a_long_text_becomes_its_chunks_in_order(tmp_path):
    compressor = kv_dropping(chunk_len=8)
    engine = SACEngine(compressor, tmp_path / "new-store")  # created by the first write-back
    text = " ".join(PASSAGES)
    [keys] = engine.handles_for([text], write_back=True)
    assert len(keys) > 1 and all(k in engine.store for k in keys)
    stored = [engine.store.metadata(k)["text"] for k in keys]
    assert "".join(stored) == text  # chunks back to back are the text
    assert engine.store.manifest["extra"]["chunk_tokens"] == 8


def test_construction_loads_nothing():
    engine = SACEngine("no-such-compressor", "/nonexistent/store")
    assert not engine.loaded
    assert SACEngine.shared("no-such-compressor") is SACEngine.shared("no-such-compressor")
    assert SACEngine.shared("no-such-compressor", merge_decoder=True) is not SACEngine.shared("no-such-compressor")


def test_settings_that_load_the_same_model_share_one_engine_without_loading_it():
    shared = SACEngine.shared("no-such-compressor", dtype="float32")
    assert SACEngine.shared("no-such-compressor", dtype="fp32", device="cpu") is shared
    if not torch.cuda.is_available():  # None and "auto" name the CPU here
        assert SACEngine.shared("no-such-compressor", dtype="float32", device="auto") is shared
    assert SACEngine.shared("no-such-compressor", dtype="float16") is not shared
    assert not shared.loaded


def test_on_a_gpu_the_same_settings_name_one_engine_before_and_after_cuda_starts(monkeypatch):
    """Loading the first engine's weights initialises CUDA: the same call afterwards, or the GPU it
    meant named by its index, is still that engine, not a second copy of the weights."""
    initialised = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    before = SACEngine.shared("no-such-compressor")
    initialised = True
    assert SACEngine.shared("no-such-compressor") is before
    for same in ("auto", "cuda", "cuda:0"):
        assert SACEngine.shared("no-such-compressor", device=same) is before
    assert SACEngine.shared("no-such-compressor", device="cuda:1") is not before
    assert SACEngine.shared("no-such-compressor", dtype="float16") is not before


def test_a_marker_another_engine_of_the_compressor_handed_out_resolves_in_this_one(compressor, store, caplog):
    """A document compressor and an LLM built with settings that differ (the store as an open
    AnchorStore and as its directory) have engines of their own: a chunk one compressed in memory
    is still read as its cache by the other, not as the marker's hex digits."""
    compressing, answering = SACEngine(compressor, store), SACEngine(compressor, str(store.path))
    text = "Snow closed the pass over the ridge in March."
    [keys] = compressing.handles_for([text])
    assert keys[0] not in store
    prompt = markers_for(keys) + "\nWhen did snow close the pass?"
    caplog.clear()  # the store's miss, warned by handles_for
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        segments = answering.segments(prompt)
    assert caplog.records == [] and [s.fingerprint for s in segments[:-1]] == [compressor.fingerprint] * len(keys)
    assert answering.resolver.texts_of(keys) == {keys[0]: text}  # adopted with its text: extractive quotes it
    without_store = SACEngine(compressor, None)  # an LLM given no store, beside a compressor given one
    segments = without_store.segments(f"{marker_for(AnchorStore.key_for(PASSAGES[0]))}\nWhen was it built?")
    assert isinstance(segments[0], AnchorKV) and segments[0].fingerprint == compressor.fingerprint
    other = SACEngine(kv_dropping(seed=1), None)  # another compressor: nothing to adopt
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        assert all(isinstance(s, str) for s in other.segments(prompt))
    assert "name no entry of this compressor" in caplog.text


def test_an_engine_refuses_a_store_path_that_is_no_store_before_it_loads_the_model(tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the store path was checked")

    monkeypatch.setattr(SACCompressor, "from_pretrained", load)
    (tmp_path / "notes.txt").write_text("not a store")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not a store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="notes.txt is a file"):
        SACEngine("some-compressor", tmp_path / "notes.txt").load()
    with pytest.raises(InvalidInputError, match="folder is a non-empty directory that is not a store"):
        SACEngine("some-compressor", tmp_path / "folder").load()
    for new in (tmp_path / "new-store", tmp_path / "empty"):  # stores yet to be made: the model comes first
        with pytest.raises(AssertionError, match="the model was loaded"):
            SACEngine("some-compressor", new).load()


def test_an_engine_given_an_empty_folder_makes_its_store_there_on_write_back(tmp_path):
    (tmp_path / "store").mkdir()
    engine = SACEngine(kv_dropping(chunk_len=8), tmp_path / "store")
    assert engine.store is None  # nothing to read yet
    [keys] = engine.handles_for(["Bees."], write_back=True)
    with AnchorStore.open(tmp_path / "store") as store:
        assert keys[0] in store


def test_an_engine_with_a_merged_decoder_answers_from_the_store_as_the_adapter_does(tmp_path):
    model, tokenizer = make_tiny_llama()
    compressor = SACCompressor(SACConfig(base_model="tiny-0", ratio=5, chunk_len=64, lora_rank=4, decoder_lora_rank=4),
                               model=model, tokenizer=tokenizer)
    with torch.no_grad():  # LoRA B starts at zero; give the adapters an effect
        for name, param in compressor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    store = AnchorStore.create(tmp_path / "store", compressor.fingerprint, 5, "float32")
    store.put(AnchorStore.key_for(PASSAGES[1]), compressor.compress(PASSAGES[1])[0])
    prompt = compressor.config.prompt.build([markers_for([AnchorStore.key_for(PASSAGES[1])])], "Who keeps bees?")
    merged, live = SACEngine(compressor, store, merge_decoder=True), SACEngine(compressor, store)
    assert merged.generator.reader is not None and live.generator.reader is None
    answers = [engine.generator.generate(engine.segments(prompt[0]), GenerationConfig(max_new_tokens=6))
               for engine in (merged, live)]
    assert answers[0].token_ids == answers[1].token_ids and answers[0].cached_tokens > 0


def test_concurrent_generate_calls_are_decoded_as_one_batch(compressor, store, monkeypatch):
    engine = SACEngine(compressor, store).load()
    sizes = []
    original = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch",
                        lambda prompts, config=None, sources=None: (sizes.append(len(prompts)),
                                                                    original(prompts, config, sources))[1])
    prompts = [f"{marker_for(AnchorStore.key_for(p))}\nQ: {i}?\nA:" for i, p in enumerate(PASSAGES * 2)]
    config = GenerationConfig(max_new_tokens=3)
    answers = {}
    state = engine._state()
    with state.lock:  # the model is busy: the calls queue up
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, engine.generate([prompts[i]], config)))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(state.pending) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert sizes == [len(prompts)]
    assert [answers[i][0].text for i in range(len(prompts))] == [g.text for g in engine.generate(prompts, config)]


def test_a_failing_prompt_in_a_batch_fails_alone(compressor, store):
    engine = SACEngine(compressor, store)
    good = f"{marker_for(AnchorStore.key_for(PASSAGES[0]))}\nQ: when?\nA:"
    with pytest.raises(InvalidInputError, match="empty"):
        engine.generate([good, " "])
    results = {}
    engine.load()
    state = engine._state()
    errors = {}

    def run(name, prompt):
        try:
            results[name] = engine.generate([prompt], GenerationConfig(max_new_tokens=2))
        except Exception as err:  # noqa: BLE001
            errors[name] = err

    with state.lock:
        threads = [threading.Thread(target=run, args=("good", good)),
                   threading.Thread(target=run, args=("long", "word " * 5000))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(state.pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert "good" in results and "positions" in str(errors["long"])


def test_stream_yields_text_then_the_generation_with_usage(compressor, store):
    engine = SACEngine(compressor, store)
    prompt = f"{marker_for(AnchorStore.key_for(PASSAGES[1]))}\nQ: who?\nA:"
    pieces = list(engine.stream(prompt, GenerationConfig(max_new_tokens=6)))
    *texts, final = pieces
    assert all(isinstance(t, str) for t in texts) and "".join(texts) == final.text
    assert final.cached_tokens == store.get(AnchorStore.key_for(PASSAGES[1])).n_anchors
    assert final.text == engine.generate([prompt], GenerationConfig(max_new_tokens=6))[0].text


def test_an_engine_refuses_prompts_and_configs_of_the_wrong_type_saying_what_to_pass(compressor):
    """Not a TypeError from list() or len(), nor an AttributeError from reading a dict's settings."""
    engine = SACEngine(compressor)
    for prompts in (None, (p for p in ["Q: who?\nA:"])):
        with pytest.raises(InvalidInputError, match="generate takes a non-empty list of prompts, got"):
            engine.generate(prompts)
    for prompt in (None, 42, b"Q: who?"):
        with pytest.raises(InvalidInputError, match=f"a prompt is a string .* got {type(prompt).__name__}"):
            engine.generate([prompt])
        with pytest.raises(InvalidInputError, match=f"a prompt is a string .* got {type(prompt).__name__}"):
            list(engine.stream(prompt))
    with pytest.raises(InvalidInputError, match=r"config must be a GenerationConfig.*got dict \(GenerationConfig\("):
        list(engine.stream("Q: who?\nA:", {"max_new_tokens": 2}))
    with pytest.raises(InvalidInputError, match="a prompt is a string"):
        asyncio.run(engine.agenerate([None]))


def test_extractive_answers_quote_the_chunks_their_markers_name(compressor, store, tmp_path):
    extractive = GenerationConfig(max_new_tokens=6, extractive=True)
    written = SACEngine(compressor, tmp_path / "texts")
    [keys] = written.handles_for([PASSAGES[1]], write_back=True)  # the store keeps the text
    fresh = SACEngine(compressor, tmp_path / "texts")  # another process: the text comes from the store
    in_memory = SACEngine(compressor, store)
    [[memory_key]] = in_memory.handles_for(["Snow closed the pass in March."])
    for engine, key, text in [(fresh, keys[0], PASSAGES[1]), (in_memory, memory_key, "Snow closed the pass in March.")]:
        prompt = f"{marker_for(key)}\nQ: who?\nA:"
        answer = engine.generate([prompt], extractive)[0]
        assert answer.cached_tokens > 0 and answer.text and answer.text in text + "\nQ: who?\nA:"
        assert "".join(p for p in engine.stream(prompt, extractive) if isinstance(p, str)) == answer.text
    untexted = f"{marker_for(AnchorStore.key_for(PASSAGES[0]))}\nQ: when?\nA:"  # stored without metadata
    with pytest.raises(InvalidInputError, match="no text to quote"):
        in_memory.generate([untexted], extractive)
    assert in_memory.generate([untexted], GenerationConfig(max_new_tokens=2))[0].cached_tokens > 0


def test_extractive_answers_quote_the_contexts_not_the_question_or_the_layout(compressor, store):
    """In the compressor's layout only the contexts section is quotable: the chunks' texts and a
    document passed through as text, not the question (nor a chat's earlier turns)."""
    engine = SACEngine(compressor, store)
    [keys] = engine.handles_for(["Snow closed the pass in March."])
    question = "Which is right: the Zorbulon Express or the Quintaplex Ferry?"
    prompt = compressor.config.prompt.conversation(
        [("system", markers_for(keys) + "\n" + plain_text("Marta keeps bees.")), ("user", "Who?"),
         ("assistant", "Marta"), ("user", question)])
    sources = engine._sources(prompt, GenerationConfig(extractive=True))
    assert sources == ["Snow closed the pass in March.", "\nMarta keeps bees.\n"]
    answer = engine.generate([prompt], GenerationConfig(max_new_tokens=6, extractive=True))[0]
    assert "Zorbulon" not in answer.text and "Quintaplex" not in answer.text
    outside = f"{markers_for(keys)}\nQ: who?\nA:"  # not the layout: nothing tells the contexts apart
    assert engine._sources(outside, GenerationConfig(extractive=True)) == ["Snow closed the pass in March.",
                                                                          "\nQ: who?\nA:"]


def test_memory_never_drops_the_chunks_of_the_call_that_hands_them_out(caplog):
    compressor = kv_dropping(chunk_len=8)
    probe = compressor.compress_chunks([compressor.tokenizer(PASSAGES[0], add_special_tokens=False)["input_ids"][:8]])
    engine = SACEngine(compressor, memory_bytes=probe[0].nbytes * 3)  # room for about 3 chunks
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        [keys] = engine.handles_for([" ".join(PASSAGES * 3)])
    assert len(keys) > 3 and set(engine.resolver.lookup(keys)) == set(keys)
    assert "over the" in caplog.text and "kept anyway" in caplog.text
    prompt = f"{markers_for(keys)}\nQ: who?\nA:"
    answer = engine.generate([prompt], GenerationConfig(max_new_tokens=2))[0]
    assert answer.cached_tokens == sum(kv.n_anchors for kv in engine.resolver.lookup(keys).values())

    engine.handles_for(["Snow closed the pass in March."])  # a later call: old chunks are dropped then
    assert not set(keys) & set(engine.resolver.memory)


def test_bounded_memory_drops_the_least_recently_used_first():
    from sac_rag.handles import BoundedMemory

    class Entry:
        nbytes = 10

    memory = BoundedMemory(max_bytes=30)
    for key in "abc":
        memory[key] = Entry()
    memory.touch(["a"])
    memory["d"] = Entry()
    assert list(memory) == ["c", "a", "d"] and memory.was_evicted("b") and not memory.was_evicted("a")
    memory.put_many([(k, Entry()) for k in "efgh"], keep=["a"])  # the whole call is kept: 50 bytes
    assert sorted(memory) == ["a", "e", "f", "g", "h"] and memory.nbytes == 50
    memory["b"] = Entry()
    assert not memory.was_evicted("b") and memory.nbytes == 30


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_half_read_stream_does_not_block_other_calls_from_the_same_thread(compressor, store, num_beams):
    engine = SACEngine(compressor, store)
    prompt = f"{marker_for(AnchorStore.key_for(PASSAGES[1]))}\nQ: who?\nA:"
    config = GenerationConfig(max_new_tokens=6, num_beams=num_beams)
    engine.generator.eos_token_ids = set()  # the answer runs to max_new_tokens
    outcome = {}

    def user():  # a LlamaIndex streaming response read in part, then another query
        stream = engine.stream(prompt, config)
        outcome["first"] = next(stream)
        outcome["second"] = engine.generate([prompt], config)[0].text
        outcome["rest"] = list(stream)
        stream.close()
        half = engine.stream(prompt, config)
        next(half)
        half.close()  # left early: the model is free again
        outcome["third"] = engine.generate([prompt], config)[0].text

    thread = threading.Thread(target=user, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "a second call while a stream was open deadlocked"
    *texts, final = [outcome["first"], *outcome["rest"]]
    assert "".join(texts) == final.text == outcome["second"] == outcome["third"]


def test_without_a_config_prompts_that_read_caches_decode_as_the_compressor_recommends(compressor, store, monkeypatch):
    engine = SACEngine(compressor, store)
    compressor.recommended_decoding = {"num_beams": 2, "mbr": True}
    configs = []
    decode = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch", lambda prompts, config=None, sources=None: (
        configs.append(config), decode(prompts, config, sources))[1])
    cached = f"{marker_for(AnchorStore.key_for(PASSAGES[1]))}\nQ: who?\nA:"
    engine.generate([cached])
    engine.generate(["Q: who?\nA:"])  # no compressed context: greedy (the recommendation was measured on caches)
    mixed = engine.generate(["Q: who?\nA:", cached])  # a call mixing both: each prompt its own way, in order
    assert [(c.num_beams, c.mbr) for c in configs] == [(2, True), (1, False), (1, False), (2, True)]
    assert all(c.stop == ("\n###",) for c in configs)  # as SAC stops: at the layout's next section
    assert [g.text for g in mixed] == [engine.generate(["Q: who?\nA:"])[0].text, engine.generate([cached])[0].text]
    per_prompt = [GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=3, num_beams=2)]
    engine.generate([cached, cached], per_prompt)  # or one config per prompt, each kept
    assert [(c.num_beams, c.max_new_tokens) for c in configs[-2:]] == [(1, 3), (2, 3)]
    for wrong in ([per_prompt[0]], {"num_beams": 2}, [per_prompt[0], None]):
        with pytest.raises(InvalidInputError, match="one GenerationConfig for all prompts, or a list of one per"):
            engine.generate([cached, cached], wrong)
    pieces = engine.generator._pieces
    monkeypatch.setattr(engine.generator, "_pieces", lambda states, tracks, config, plain=None, lock=None: (
        configs.append(config), pieces(states, tracks, config, plain, lock))[1])
    *_, final = engine.stream(cached)
    assert configs[-1].num_beams == 2 and final.text == engine.generate([cached])[0].text


def test_a_prompt_of_segments_holding_a_texts_chunks_as_one_list_decodes_as_the_compressor_recommends(
        compressor, monkeypatch):
    """A compressed text's chunks as one segment (``compressor.compress(text)``, as ``Generator``
    reads them) read compressed contexts, as the same chunks spread out do: not decoded greedily."""
    engine = SACEngine(compressor)
    compressor.recommended_decoding = {"num_beams": 2, "mbr": True}
    configs = []
    decode = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch", lambda prompts, config=None, sources=None: (
        configs.append(config), decode(prompts, config, sources))[1])
    chunks = compressor.compress(PASSAGES[1])
    grouped, spread = [chunks, "\nQ: who?\nA:"], [*chunks, "\nQ: who?\nA:"]
    assert reads_caches([grouped]) and reads_caches([tuple(grouped)]) and not reads_caches([["\nQ: who?\nA:"]])
    together, apart = engine.generate([grouped])[0], engine.generate([spread])[0]
    assert [(c.num_beams, c.mbr) for c in configs] == [(2, True), (2, True)]
    assert together.token_ids == apart.token_ids
    *_, final = engine.stream(grouped)
    assert final.token_ids == together.token_ids


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_stream_is_decoded_in_the_callers_thread(compressor, store, monkeypatch, num_beams):
    """In a worker thread beside the caller's, the two OpenMP thread teams slowed CPU decoding 1.6x on
    2 cores; the stream takes the model for each step instead (the test above: it is free between pieces)."""
    engine = SACEngine(compressor, store)
    prompt = f"{marker_for(AnchorStore.key_for(PASSAGES[1]))}\nQ: who?\nA:"
    config = GenerationConfig(max_new_tokens=4, num_beams=num_beams)
    threads = []
    start = engine.generator._start
    monkeypatch.setattr(engine.generator, "_start", lambda *a: (threads.append(threading.current_thread()),
                                                                start(*a))[1])
    *pieces, final = engine.stream(prompt, config)
    assert "".join(pieces) == final.text == engine.generate([prompt], config)[0].text
    assert set(threads) == {threading.current_thread()}


def test_a_loaded_compressor_has_one_shared_engine_whatever_dtype_or_device_say(compressor, caplog):
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        plain = SACEngine.shared(compressor)
        assert SACEngine.shared(compressor, dtype="float32", device="cpu") is plain  # its own: no warning
        assert SACEngine.shared(compressor, dtype="fp32", device="auto") is plain  # named as anywhere else
        assert caplog.records == []
        assert SACEngine.shared(compressor, dtype="bfloat16") is plain
    assert "dtype='bfloat16'" in caplog.text and "ignored" in caplog.text
    [[key]] = plain.handles_for(["Snow closed the pass in March."])
    assert key in SACEngine.shared(compressor, device="cpu").resolver.memory
    assert SACEngine.shared(kv_dropping(seed=1), dtype="float32") is not plain


def test_the_shared_engine_of_a_loaded_compressor_or_an_open_store_is_freed_with_it(tmp_path):
    """A notebook that reloads a compressor or reopens a store, and builds its LLM again, must not
    keep every earlier compressor's weights and chunks alive through the shared engines."""
    import gc
    import weakref

    freed = []
    for seed in range(3):
        compressor = kv_dropping(seed=seed)
        engine = SACEngine.shared(compressor)
        assert SACEngine.shared(compressor) is engine  # shared while the object lives
        engine.handles_for(["Snow closed the pass in March."])
        freed.append(weakref.ref(compressor))
        del compressor, engine
    store_path = tmp_path / "s"
    kept = kv_dropping(seed=9)
    for _ in range(3):
        store = AnchorStore.create(store_path, kept.fingerprint, 5, "float32", exist_ok=True)
        engine = SACEngine.shared(kept, store)
        assert SACEngine.shared(kept, store) is engine
        freed.append(weakref.ref(store))
        store.close()
        del store, engine
    gc.collect()
    assert [ref() for ref in freed] == [None] * 6


def test_a_compressor_directory_retrained_in_place_gets_an_engine_with_its_new_weights(tmp_path):
    """A service that rebuilds its chain after a nightly retraining into the same directory must
    answer with the new weights (or settings), not with the engine the old ones were loaded into."""
    from sac_rag.compressor import recommend_decoding
    from sac_rag.handles import _SHARED

    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = SACConfig(base_model=str(tmp_path / "base"), ratio=5, chunk_len=64, lora_rank=0, bidirectional=False)

    def trained(step: float) -> SACCompressor:
        compressor = SACCompressor(config, model=model, tokenizer=tokenizer)
        with torch.no_grad():
            compressor.anchor_embedding.fill_(step)
        return compressor

    directory = tmp_path / "final"
    trained(0.1).save_pretrained(directory)
    before = SACEngine.shared(directory)
    assert SACEngine.shared(str(directory)) is before
    old_fingerprint = before.compressor.fingerprint
    retrained = trained(0.2)
    retrained.save_pretrained(directory)
    after = SACEngine.shared(directory)
    assert after is not before and after.compressor.fingerprint != old_fingerprint
    assert torch.allclose(after.compressor.anchor_embedding.float(), retrained.anchor_embedding, atol=1e-2)  # bf16
    assert before not in _SHARED.values()  # not kept for the process's life

    retrained.config.refine_steps = 2  # the same weights saved again with other settings: another compressor
    retrained.save_pretrained(directory)
    refining = SACEngine.shared(directory)
    assert refining is not after and refining.compressor.config.refine_steps == 2
    recommend_decoding(directory, {"num_beams": 2})  # and with another recommended decoding
    assert SACEngine.shared(directory) is not refining


def test_plain_text_keeps_markers_in_passed_through_texts_as_text(compressor, store):
    from sac_rag.handles import plain_text

    engine = SACEngine(compressor, store)
    stored = marker_for(AnchorStore.key_for(PASSAGES[1]))
    post = f"A forum post quoting a handle: {stored} end."
    assert engine.handles_for([post], on_miss="text") == [None]  # passed through: the adapter uses its text
    prompt = f"{plain_text(post)}\nQ: what is in the post?\nA:"
    assert all(isinstance(s, str) for s in engine.segments(prompt)) and keys_in(prompt) == []
    assert plain_text(post).replace("\u200b", "") == post and plain_text("no markers") == "no markers"


def test_a_process_that_leaves_a_stream_unfinished_exits_cleanly():
    """The stream's decoding thread is done when the stream is closed: none is left in torch code
    at interpreter exit (which aborts the process: "terminate called without an active exception")."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r}); import test_handles\n"
            "from sac_rag import GenerationConfig\n"
            "from sac_rag.handles import SACEngine\n"
            "engine = SACEngine(test_handles.kv_dropping())\n"
            "for piece in engine.stream('The quick brown fox', GenerationConfig(max_new_tokens=200)):\n"
            "    break\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tests.parent)
    assert done.returncode == 0, done.stderr[-500:]


def small_memory_engine(chunks: int = 3) -> SACEngine:
    """An engine on 8-token chunks whose memory holds about ``chunks`` of them."""
    compressor = kv_dropping(chunk_len=8)
    probe = compressor.compress_chunks([compressor.tokenizer(PASSAGES[0], add_special_tokens=False)["input_ids"][:8]])
    return SACEngine(compressor, memory_bytes=probe[0].nbytes * chunks)


def test_a_concurrent_call_making_room_keeps_the_chunks_another_call_was_handed():
    engine = small_memory_engine()
    config = GenerationConfig(max_new_tokens=2)
    [mine] = engine.handles_for(["Snow closed the pass in March."])  # call A: handed its markers...
    [theirs] = engine.handles_for([" ".join(PASSAGES * 3)])  # ...then call B compresses many chunks
    memory = engine.resolver.memory
    assert set(mine) <= set(memory)  # not dropped to make room for B's
    answer = engine.generate([f"{markers_for(mine)}\nQ: when?\nA:"], config)[0]  # A reads its chunks
    assert answer.cached_tokens == sum(kv.n_anchors for kv in engine.resolver.lookup(mine).values())
    assert memory.pinned == set(theirs)  # A's chunks are released once A has generated; B's are still out
    engine.generate([f"{markers_for(theirs)}\nQ: who?\nA:"], config)
    assert memory.pinned == set()

    engine.handles_for(["The ferry stops at midnight."])  # nothing out: memory is back under its limit
    assert memory.nbytes <= memory.max_bytes


def test_two_threads_each_read_the_chunks_they_were_handed():
    engine = small_memory_engine()
    config = GenerationConfig(max_new_tokens=2)
    handed, answers, errors = threading.Event(), {}, {}
    texts = {"a": "Snow closed the pass in March.", "b": " ".join(PASSAGES * 3)}

    def call(name: str, before: threading.Event | None, after: threading.Event | None) -> None:
        try:
            [keys] = engine.handles_for([texts[name]])
            if after is not None:
                after.set()
            if before is not None:
                assert before.wait(60)
            answers[name] = engine.generate([f"{markers_for(keys)}\nQ: what?\nA:"], config)[0]
        except Exception as err:  # noqa: BLE001
            errors[name] = err

    made_room = threading.Event()
    a = threading.Thread(target=call, args=("a", made_room, handed))  # generates once b has made room
    b = threading.Thread(target=lambda: (handed.wait(60), call("b", None, made_room)))
    for t in (a, b):
        t.start()
    for t in (a, b):
        t.join(120)
    assert errors == {} and answers["a"].cached_tokens > 0 and answers["b"].cached_tokens > 0
    assert engine.resolver.memory.pinned == set()


def test_bounded_memory_keeps_pinned_entries_until_unpinned_or_lapsed(monkeypatch):
    from types import SimpleNamespace

    from sac_rag import handles
    from sac_rag.handles import BoundedMemory

    class Entry:
        nbytes = 10

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(handles, "time", SimpleNamespace(monotonic=lambda: clock.now))
    memory = BoundedMemory(max_bytes=30, pin_seconds=60)
    memory.put_many([("a", Entry())], pin=True)
    memory.put_many([(k, Entry()) for k in "bc"])
    assert memory.pin(["b", "x"]) == {"b"}  # only entries held are pinned
    memory.put_many([(k, Entry()) for k in "de"])
    assert sorted(memory) == ["a", "b", "d", "e"] and memory.was_evicted("c")  # "a" and "b" stay, pinned
    memory.unpin(["b", "x"])
    assert memory.pinned == {"a"}
    memory["f"] = Entry()
    assert sorted(memory) == ["a", "e", "f"]  # unpinned, "b" is dropped by the next call (then "d", older than "e")
    memory.pin(["e"])
    memory.pin(["e"])  # two calls were handed "e": it stays pinned until both have generated
    memory.unpin(["e"])
    assert memory.pinned == {"a", "e"}
    clock.now += 61  # the pins lapse: a call that never generated does not hold memory for ever
    assert memory.pinned == set()
    memory["g"] = Entry()
    assert sorted(memory) == ["e", "f", "g"] and memory.nbytes == 30


def test_a_generation_releases_the_chunks_of_its_prompt_even_when_it_fails_or_stops_early():
    engine = small_memory_engine()
    config = GenerationConfig(max_new_tokens=4)
    memory = engine.resolver.memory

    def handed(text: str) -> str:
        [keys] = engine.handles_for([text])
        assert memory.pinned == set(keys)
        return f"{markers_for(keys)}\nQ: when?\nA:"

    with pytest.raises(PromptTooLongError, match="positions"):
        engine.generate([handed("Snow closed the pass in March.") + " pass" * 5000], config)
    assert memory.pinned == set()
    assert list(engine.stream(handed("Snow closed the pass in March."), config))[-1].cached_tokens > 0
    assert memory.pinned == set()
    stream = engine.stream(handed("The ferry stops at midnight."), config)
    next(stream)
    stream.close()  # left early
    assert memory.pinned == set()

    async def astream_one_piece():
        async for _ in engine.astream(handed("Snow closed the pass in March."), config):
            break

    asyncio.run(astream_one_piece())
    assert memory.pinned == set()


def test_chunks_not_handed_out_stay_unpinned():
    engine = small_memory_engine()
    memory = engine.resolver.memory
    text = "Snow closed the pass in March, and the ferry stops at midnight."
    [keys] = engine.handles_for([text])  # compressed into memory, pinned until a generation reads them
    engine.resolver.release(keys)
    with pytest.raises(EntryNotFoundError):
        engine.handles_for([text, "Bees."], on_miss="error")  # refused: nothing is handed out
    assert memory.pinned == set()
    longer = text + " Bees."  # its first chunks are the text's, its last is new
    assert engine.handles_for([longer], on_miss="text") == [None]  # passed through as text
    assert memory.pinned == set()


def test_pieces_of_a_cut_marker_are_found_and_hex_text_is_not(compressor):
    from sac_rag.handles import MIN_CUT_PIECE, plain_text

    resolver = CacheResolver(compressor.fingerprint)
    key, other = AnchorStore.key_for("issued"), AnchorStore.key_for("never issued")
    resolver.issue([key])
    marker = marker_for(key)
    for i in (5 + MIN_CUT_PIECE, 40, len(marker) - 1):  # cut after the first i characters
        assert resolver.cut_pieces(f"Context: {marker[:i]}\n\nQ: when?") == [marker[:i]]
    for i in (2, 30, len(marker) - 1 - MIN_CUT_PIECE):  # the rest of the marker, from character i on
        assert resolver.cut_pieces(f"{marker[i:]}<sac:{key}>Q: when?") == [key[max(i - 5, 0):] + ">"]

    fine = [
        f"{marker} and {marker_for(other)}{marker}",  # whole markers
        plain_text(f"a post quoting {marker}"),  # a marker put in as text
        f"cite {key} or {key[:12]}, {key[-20:]}; commit {key[3:13]}",  # hex text: no <sac: before, no > after
        f"<sac:{key[:MIN_CUT_PIECE - 1]}... {key[-MIN_CUT_PIECE + 1:]}>",  # too short to tell from chance
        f"<sac:{key[:8]}> is what a marker looks like",  # a marker typed short, closed
        f"<sac:{other[:30]} {other[30:]}>",  # pieces of a key never handed out
        f"<b>{key[-6:].upper()}>",
    ]
    for prompt in fine:
        assert resolver.cut_pieces(prompt) == [], prompt


def test_an_engine_refuses_a_prompt_holding_a_piece_of_a_marker_it_handed_out(compressor, store):
    engine = SACEngine(compressor, store)
    [keys] = engine.handles_for([PASSAGES[0]])
    prompt = f"{markers_for(keys)}\nQ: when?\nA:"
    with pytest.raises(MarkerCutError, match="piece.* of <sac:...> markers") as refused:
        engine.segments(prompt[:30] + "\n" + prompt[30:])
    assert not isinstance(refused.value, ValueError)  # LlamaIndex's synthesizers catch those and carry on
    assert len(engine.segments(prompt)) == 2
    quoted = f"Q: which chunk is {keys[0]} (starts {keys[0][:10]})?\nA:"
    assert engine.segments(quoted) == [quoted]


def test_a_chunk_found_in_memory_by_lookup_is_pinned_until_a_generation_reads_it(compressor):
    """As ``handles_for`` pins what it compresses, ``lookup_handles`` pins what it finds: a
    concurrent call making room cannot drop a chunk between handing it out and reading it."""
    engine = SACEngine(compressor)
    [keys] = engine.handles_for([PASSAGES[0]])
    engine.resolver.release(keys)  # as if its call had generated
    assert engine.resolver.memory.pinned == set()
    assert engine.lookup_handles([PASSAGES[0]]) == [keys]
    assert engine.resolver.memory.pinned == set(keys)
    engine.generate([f"{markers_for(keys)}\nQ: when?\nA:"], GenerationConfig(max_new_tokens=1))
    assert engine.resolver.memory.pinned == set()


def test_a_call_refused_for_its_arguments_leaves_no_chunk_pinned(compressor):
    engine = SACEngine(compressor)
    engine.handles_for(PASSAGES)  # compressed into memory, pinned for that call
    engine.resolver.release(AnchorStore.key_for(p) for p in PASSAGES)  # which has generated
    for bad in ({"on_miss": "later"}, {"metadata": [{"source": "a"}]}):
        with pytest.raises(InvalidInputError):
            engine.handles_for(PASSAGES, **bad)
    assert engine.resolver.memory.pinned == set()


def counting_compressions(compressor: SACCompressor, monkeypatch) -> list[int]:
    """How many chunks each ``compress_chunks`` call of ``compressor`` compresses, from now on."""
    counts: list[int] = []
    original = compressor.compress_chunks
    monkeypatch.setattr(compressor, "compress_chunks",
                        lambda ids, *a, **k: (counts.append(len(ids)), original(ids, *a, **k))[1])
    return counts


def test_a_handed_out_chunk_memory_dropped_is_compressed_again_from_its_text(monkeypatch, caplog):
    """Pins are released once per prompt generated, so a prompt generated twice (a retry, a refine step,
    a chat history repeating old markers) releases the pin of another call handed the same chunk, which
    memory may then drop. That call's prompt still reads the chunk, compressed again as it was."""
    engine = small_memory_engine()
    roomy = SACEngine(engine.compressor)  # the same compressor, with room for every chunk
    CacheResolver._live.discard(roomy.resolver)  # a reference only: ``engine`` must not adopt its chunks
    config = GenerationConfig(max_new_tokens=4)
    for e in (engine, roomy):
        e.generator.eos_token_ids = set()  # answers run to max_new_tokens
    text = "Snow closed the pass in March."
    [mine] = engine.handles_for([text])
    [theirs] = engine.handles_for([text])  # a concurrent call handed the same chunks: pinned twice
    prompt = f"{markers_for(theirs)}\nQ: when?\nA:"
    for _ in range(2):  # the first call generates its prompt twice: both pins are released
        engine.generate([f"{markers_for(mine)}\nQ: when?\nA:"], config)
    [made_room] = engine.handles_for([" ".join(PASSAGES * 3)])  # a third call makes room
    memory = engine.resolver.memory
    assert not set(theirs) & set(memory)

    roomy.handles_for([text])
    compressed = counting_compressions(engine.compressor, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        answer = engine.generate([prompt], config)[0]
    assert compressed == [len(set(theirs))]  # compressed again, all in one batch, instead of being lost
    assert "compressed again from their text" in caplog.text
    assert set(theirs) <= set(memory) and memory.pinned == set(made_room)  # back in memory, not left pinned

    expected = roomy.generate([prompt], config)[0]
    assert answer.token_ids == expected.token_ids and answer.cached_tokens == expected.cached_tokens > 0
    again, direct = engine.segments(prompt), roomy.segments(prompt)
    for ours, reference in zip(again[:len(theirs)], direct[:len(theirs)]):
        torch.testing.assert_close(ours.keys, reference.keys)
        torch.testing.assert_close(ours.values, reference.values)
    assert compressed == [len(set(theirs))]  # in memory again: read as they are

    engine.handles_for([" ".join(reversed(PASSAGES))])  # dropped again: positions are counted as the model reads
    assert not set(theirs) & set(memory)
    assert engine.count_positions(prompt) == roomy.count_positions(prompt)


def test_a_dropped_chunk_whose_text_is_forgotten_too_is_refused_and_a_typed_marker_stays_text():
    engine = small_memory_engine()
    engine.resolver.text_bytes = 0  # no text of a dropped chunk is kept
    config = GenerationConfig(max_new_tokens=2)
    [keys] = engine.handles_for(["Snow closed the pass in March."])
    prompt = f"{markers_for(keys)}\nQ: when?\nA:"
    engine.generate([prompt], config)  # read: no longer pinned
    engine.handles_for([" ".join(PASSAGES)])  # a later call: the chunks are dropped
    assert not set(keys) & set(engine.resolver.memory) and engine.resolver.remembered_texts(keys) == {}
    with pytest.raises(EntryNotFoundError, match="dropped to stay under memory_bytes.* forgotten too.* handles_for"):
        engine.generate([prompt], config)  # a marker this engine issued that no longer resolves is an error...
    typed = f"{marker_for(AnchorStore.key_for('never compressed'))}\nQ: who?\nA:"
    assert engine.segments(typed) == [typed]  # ...while one that never named anything stays text


def test_the_resolver_keeps_texts_of_dropped_chunks_up_to_its_budget_least_recently_handed_out_first():
    import sys
    from types import SimpleNamespace

    from sac_rag.handles import TEXT_MEMORY_BYTES, BoundedMemory

    fingerprint = kv_dropping().fingerprint
    resolver = CacheResolver(fingerprint, memory=BoundedMemory(max_bytes=2))  # holds 2 chunks
    assert resolver.text_bytes == TEXT_MEMORY_BYTES
    resolver.text_bytes = 3 * sys.getsizeof("text a")  # 3 texts

    def remember(key: str) -> None:
        resolver.remember(key, SimpleNamespace(fingerprint=fingerprint, offset=0, nbytes=1), f"text {key}")

    remember("a")
    remember("b")
    resolver.issue(["a"])  # handed out again: its text is the last to go
    remember("c")
    remember("d")
    assert sorted(resolver.memory) == ["c", "d"]
    assert resolver.remembered_texts("abcd") == {k: f"text {k}" for k in "acd"}  # "b"'s forgotten first
    resolver.text_bytes = 0
    remember("e")  # the texts of chunks memory holds are kept whatever the budget (extractive answers quote them)
    assert resolver.remembered_texts("abcde") == {k: f"text {k}" for k in "de"}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_write_back_stores_chunks_found_in_memory_without_compressing_them_again(tmp_path, monkeypatch,
                                                                                asynchronous):
    """A chunk an earlier call compressed without write_back lives in memory only: a write_back call
    that is handed it stores it too, from memory, with the metadata a written-back chunk gets."""
    compressor = kv_dropping(chunk_len=8)
    engine = SACEngine(compressor, tmp_path / "store")  # the store is created by the first write-back
    texts = ["Bees.", " ".join(PASSAGES)]  # one chunk (found by its key), several (found once split)
    handles = engine.handles_for(texts)
    assert len(handles[0]) == 1 and len(handles[1]) > 1 and engine.store is None
    keys = [k for text_keys in handles for k in text_keys]

    compressed = counting_compressions(compressor, monkeypatch)
    sources = [{"source": "short.txt"}, {"source": "long.txt"}]
    if asynchronous:
        again = asyncio.run(engine.ahandles_for(texts, write_back=True, metadata=sources))
    else:
        again = engine.handles_for(texts, write_back=True, metadata=sources)
    assert again == handles and compressed == []

    fresh = SACEngine(compressor, tmp_path / "store")  # another process reads them from the store
    stored = fresh.resolver.lookup(keys)
    assert set(stored) == set(keys) and fresh.resolver.memory.nbytes == 0
    for key in keys:
        torch.testing.assert_close(stored[key].keys, engine.resolver.memory[key].keys)
    [short] = handles[0]
    n_tokens = len(compressor.tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert fresh.store.metadata(short) == {"text": "Bees.", "chunk_index": 0, "n_tokens": n_tokens, "start_char": 0,
                                           "end_char": 5, "doc": sources[0], "created_by": "sac_rag.handles"}
    assert "".join(fresh.store.metadata(k)["text"] for k in handles[1]) == texts[1]
    assert {fresh.store.metadata(k)["doc"]["source"] for k in handles[1]} == {"long.txt"}


def test_a_write_back_call_that_finds_every_chunk_does_not_wait_for_the_model(tmp_path):
    engine = SACEngine(kv_dropping(), tmp_path / "store")
    text = "Snow closed the pass in March."
    [keys] = engine.handles_for([text])  # in memory only
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(keys=engine.handles_for([text], write_back=True)[0]),
                              daemon=True)
    with engine._state().lock:  # the model is busy decoding
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "a write_back call with nothing to compress waited for the model"
    assert outcome["keys"] == keys and engine.store.missing(keys) == []


@pytest.mark.parametrize("cuda_initialised, loads_on", [(True, torch.device("cuda", 1)),
                                                        (False, torch.device("cuda", 0))])
def test_an_engine_loads_on_the_gpu_current_where_it_was_made_even_from_a_worker_thread(
        monkeypatch, cuda_initialised, loads_on):
    """The current GPU is per thread: a worker thread's is GPU 0. An engine made where another one is
    current (after torch.cuda.set_device, which initialises CUDA) loads there from any thread; where
    CUDA is not initialised yet every thread's is GPU 0, and it is not read (reading initialises CUDA)."""
    main = threading.current_thread()
    asked = []

    def current_device():
        asked.append(threading.current_thread())
        return 1 if threading.current_thread() is main else 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_initialised)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    loads = []

    def from_pretrained(spec, device=None, dtype=None):
        loads.append(device)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(SACCompressor, "from_pretrained", from_pretrained)
    engine = SACEngine("some-compressor", device="cuda")
    assert asked == ([main] if cuda_initialised else [])
    worker = threading.Thread(target=lambda: pytest.raises(RuntimeError, engine.load))
    worker.start()
    worker.join()
    assert loads == [loads_on] and engine.device == "cuda"  # the setting itself is kept as given
