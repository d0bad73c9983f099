"""SACEngine under concurrency and failure: a call that fails, is interrupted or is cancelled
affects only itself, and leaves no queued request, held lock or pinned chunk behind."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from types import SimpleNamespace

import pytest
from test_handles import PASSAGES, kv_dropping, small_memory_engine

from sac_rag import GenerationConfig, InvalidInputError
from sac_rag.handles import BoundedMemory, CacheResolver, SACEngine, markers_for

CONFIG = GenerationConfig(max_new_tokens=2)


class Abort(BaseException):
    """What interrupts a decoding without being an ``Exception`` (a ``KeyboardInterrupt``, say)."""


def wait_until(condition, what: str) -> None:
    """Poll ``condition`` (another thread's progress that no event marks) for at most a minute."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def queued_calls(engine: SACEngine, calls: dict[str, tuple[str, GenerationConfig]]) -> dict[str, object]:
    """Run each ``name: (prompt, config)`` as a ``generate`` call in its own thread, all queued while
    the model is busy, then let them go; each name's answer, or the exception it raised."""
    state = engine._state()
    outcome: dict[str, object] = {}

    def call(name: str) -> None:
        prompt, config = calls[name]
        try:
            outcome[name] = engine.generate([prompt], config)[0]
        except BaseException as err:  # noqa: BLE001 - what the caller saw
            outcome[name] = err

    threads = [threading.Thread(target=call, args=(name,), daemon=True) for name in calls]
    with state.lock:  # the model is busy: the calls queue up
        for thread in threads:
            thread.start()
        wait_until(lambda: len(state.pending) == len(calls), "every call is queued")
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a queued call never returned"
    return outcome


def counting_batches(engine: SACEngine, monkeypatch, fail_first: BaseException | None = None) -> list[int]:
    """The sizes of the batches the engine decodes, from now on; with ``fail_first``, the first batch
    raises it instead."""
    sizes: list[int] = []
    original = engine.generator.generate_batch

    def generate_batch(prompts, config=None, sources=None):
        sizes.append(len(prompts))
        if fail_first is not None and len(sizes) == 1:
            raise fail_first
        return original(prompts, config, sources)

    monkeypatch.setattr(engine.generator, "generate_batch", generate_batch)
    return sizes


def test_a_decoding_interrupted_mid_batch_leaves_the_other_callers_to_decode_their_own(monkeypatch):
    engine = SACEngine(kv_dropping()).load()
    sizes = counting_batches(engine, monkeypatch, fail_first=Abort())
    outcome = queued_calls(engine, {name: (f"Q: {name}?\nA:", CONFIG) for name in "abc"})
    aborted = [name for name, result in outcome.items() if isinstance(result, Abort)]
    assert len(aborted) == 1, outcome  # the thread that was decoding the batch sees its interruption...
    answered = [result for name, result in outcome.items() if name not in aborted]
    assert all(result.token_ids for result in answered), outcome  # ...the others still get their answers
    assert sizes == [3, 2] and engine._state().pending == []
    assert engine.generate(["Q: later?\nA:"], CONFIG)[0].token_ids  # the model is free again


def test_requests_queued_with_different_configs_are_each_decoded_with_their_own(monkeypatch):
    engine = SACEngine(kv_dropping()).load()
    engine.generator.eos_token_ids = set()  # answers run to max_new_tokens
    sizes = counting_batches(engine, monkeypatch)
    long = GenerationConfig(max_new_tokens=5)
    outcome = queued_calls(engine, {"a": ("Q: a?\nA:", CONFIG), "b": ("Q: b?\nA:", long),
                                    "c": ("Q: c?\nA:", CONFIG), "too long": ("word " * 5000, long)})
    assert [len(outcome[name].token_ids) for name in "abc"] == [2, 5, 2]
    assert "positions" in str(outcome["too long"])  # fails alone, in the batch of its config
    assert sorted(sizes) == [1, 1, 2, 2] and engine._state().pending == []  # "long" batch split on failure


def test_a_cancelled_agenerate_withdraws_its_queued_prompts_and_releases_its_chunks(monkeypatch):
    engine = small_memory_engine()
    state = engine._state()
    sizes = counting_batches(engine, monkeypatch)
    [keys] = engine.handles_for(["Snow closed the pass in March."])
    memory = engine.resolver.memory
    assert memory.pinned == set(keys)

    async def main():
        with state.lock:  # the model is busy past the caller's timeout
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.agenerate([f"{markers_for(keys)}\nQ: when?\nA:"], CONFIG), 0.2)
            assert state.pending == []  # withdrawn at once, not left to be decoded
        return await engine.agenerate(["Q: next?\nA:"], CONFIG)

    [answer] = asyncio.run(main())  # returns once the cancelled call's thread is done too
    assert answer.token_ids and sizes == [1]  # only the call still waiting was decoded
    assert memory.pinned == set() and not state.lock.locked()


def test_an_agenerate_cancelled_before_its_thread_starts_releases_its_prompts_chunks():
    """Its job still waits for a worker of the loop's executor (all busy with other requests) when
    the caller's timeout cancels it: nothing will decode the prompt, so its chunks are not left
    pinned, over memory_bytes, for PIN_SECONDS."""
    from concurrent.futures import ThreadPoolExecutor

    engine = small_memory_engine()
    [keys] = engine.handles_for(["Snow closed the pass in March."])
    memory = engine.resolver.memory
    assert memory.pinned == set(keys)
    executor, free = ThreadPoolExecutor(1), threading.Event()
    decoded = []
    engine.generator.generate_batch = lambda *args, **kwargs: decoded.append(args)

    async def main():
        asyncio.get_running_loop().set_default_executor(executor)
        busy = asyncio.get_running_loop().run_in_executor(None, free.wait, 60)  # another request's thread
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.agenerate([f"{markers_for(keys)}\nQ: when?\nA:"], CONFIG), 0.2)
        free.set()
        await busy

    asyncio.run(main())
    executor.shutdown(wait=True)  # the cancelled call's job, had it run, has run by now
    assert memory.pinned == set() and decoded == []


@pytest.mark.parametrize("arguments", [{"on_miss": "bogus"}, {"metadata": [{}, {}, {}]}])
@pytest.mark.parametrize("texts", [["Bees."], ["Bees.", "Wasps nest in paper."]], ids=["found", "one new"])
def test_ahandles_for_refuses_what_handles_for_refuses_before_it_pins_anything(texts, arguments):
    engine = small_memory_engine()
    [[key]] = engine.handles_for(["Bees."])
    engine.resolver.release([key])
    memory = engine.resolver.memory
    with pytest.raises(InvalidInputError):
        engine.handles_for(texts, **arguments)
    with pytest.raises(InvalidInputError):
        asyncio.run(engine.ahandles_for(texts, **arguments))
    assert memory.pinned == set()
    found = engine.lookup_handles(texts)  # called apart, with arguments complete_handles refuses
    with pytest.raises(InvalidInputError):
        engine.complete_handles(texts, found, **arguments)
    assert memory.pinned == set()


@pytest.mark.parametrize("phase", ["lookup_handles", "complete_handles"])
def test_a_cancelled_ahandles_for_leaves_no_chunk_pinned(monkeypatch, phase):
    engine = small_memory_engine()
    state = engine._state()
    memory = engine.resolver.memory
    texts = ["Bees.", " ".join(PASSAGES)]
    [[key]] = engine.handles_for(texts[:1])  # the first text is one chunk in memory: the lookup pins it
    engine.resolver.release([key])
    entered, cancelled = threading.Event(), threading.Event()
    original = getattr(engine, phase)

    def entering(*args, **kwargs):
        entered.set()
        if phase == "lookup_handles":
            assert cancelled.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, phase, entering)

    async def main():
        state.lock.acquire()  # complete_handles waits for the model
        try:
            task = asyncio.ensure_future(engine.ahandles_for(texts))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            cancelled.set()
            state.lock.release()

    asyncio.run(main())  # returns once the threads of the cancelled call are done
    assert memory.pinned == set()
    if phase == "complete_handles":  # its thread ran on: the chunks it compressed are kept, unpinned
        assert engine.handles_for(texts, on_miss="error")


def test_an_ahandles_for_cancelled_before_its_thread_starts_releases_what_the_lookup_pinned(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    engine = small_memory_engine()
    memory = engine.resolver.memory
    texts = ["Bees.", " ".join(PASSAGES)]
    [[key]] = engine.handles_for(texts[:1])
    engine.resolver.release([key])
    executor = ThreadPoolExecutor(1)
    looked_up, free = threading.Event(), threading.Event()
    original = engine.lookup_handles
    completed = []
    monkeypatch.setattr(engine, "complete_handles", lambda *a, **k: completed.append(a))

    def lookup_handles(texts):
        found = original(texts)
        executor.submit(free.wait, 60)  # the only worker is busy when complete_handles is queued
        looked_up.set()
        return found

    monkeypatch.setattr(engine, "lookup_handles", lookup_handles)

    async def main():
        asyncio.get_running_loop().set_default_executor(executor)
        task = asyncio.ensure_future(engine.ahandles_for(texts))
        while not looked_up.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the task queues complete_handles
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        free.set()

    asyncio.run(main())
    assert completed == [] and memory.pinned == set()


@pytest.mark.parametrize("write_back", [False, True])
def test_calls_handed_the_same_texts_at_once_compress_each_chunk_once(tmp_path, monkeypatch, write_back):
    compressor = kv_dropping(chunk_len=8)
    engine = SACEngine(compressor, tmp_path / "store" if write_back else None).load()
    texts = [" ".join(PASSAGES), "Snow closed the pass in March."]
    callers = 4
    compressed: list[int] = []
    original_compress = compressor.compress_chunks
    monkeypatch.setattr(compressor, "compress_chunks",
                        lambda ids, *a, **k: (compressed.append(len(ids)), original_compress(ids, *a, **k))[1])
    # every caller looks the texts up (both lookups) before any compresses
    together, seen = threading.Barrier(callers, timeout=60), threading.local()
    original_present = engine.resolver.present

    def present(keys, pin=False):
        seen.calls = getattr(seen, "calls", 0) + 1
        keys = list(keys)
        if seen.calls <= 2:
            together.wait()
        return original_present(keys, pin)

    monkeypatch.setattr(engine.resolver, "present", present)
    handles, errors = [], []

    def call():
        try:
            handles.append(engine.handles_for(texts, write_back=write_back))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(handles) == callers and all(h == handles[0] for h in handles)
    keys = [k for text_keys in handles[0] for k in text_keys]
    assert sum(compressed) == len(set(keys)) > 2  # once each, by whichever call came first
    if write_back:
        assert len(engine.store) == len(set(keys)) and engine.resolver.memory.pinned == set()
    else:
        for _ in range(callers):  # each call pinned them once: they stay until every call has generated
            assert engine.resolver.memory.pinned == set(keys)
            engine.resolver.release(keys)
        assert engine.resolver.memory.pinned == set()
    answer = engine.generate([f"{markers_for(handles[0][0])}\nQ: who?\nA:"], CONFIG)[0]
    assert answer.cached_tokens > 0


def test_a_call_waiting_for_a_chunk_another_call_failed_to_keep_compresses_it_itself(monkeypatch):
    engine = small_memory_engine()
    text = "Snow closed the pass in March."
    original_keep, original_claim = engine._keep, engine._claim
    first_in, fail, waits = threading.Event(), threading.Event(), threading.Event()

    def keep(*args, **kwargs):
        if not first_in.is_set():  # the first call compressed the chunk, and fails to keep it
            first_in.set()
            assert fail.wait(60)
            raise OSError("No space left on device")
        return original_keep(*args, **kwargs)

    def claim(keys):
        claimed, waiting = original_claim(keys)
        if waiting:
            waits.set()
        return claimed, waiting

    monkeypatch.setattr(engine, "_keep", keep)
    monkeypatch.setattr(engine, "_claim", claim)
    outcome = {}

    def call(name):
        try:
            outcome[name] = engine.handles_for([text])
        except Exception as err:  # noqa: BLE001
            outcome[name] = err

    first = threading.Thread(target=call, args=("first",), daemon=True)
    first.start()
    assert first_in.wait(60)
    second = threading.Thread(target=call, args=("second",), daemon=True)
    second.start()
    assert waits.wait(60)  # the second call waits for the first one's chunk...
    fail.set()
    for thread in (first, second):
        thread.join(60)
    assert isinstance(outcome["first"], OSError)
    [keys] = outcome["second"]  # ...and, the first having failed, compresses it itself
    assert engine.resolver.memory.pinned == set(keys) and engine._claims == {}


def test_texts_remembered_by_concurrent_calls_are_all_kept():
    class Interleaving(BoundedMemory):
        """Lets another call remember a chunk while this memory is asked what it holds."""

        meanwhile = None

        def __contains__(self, key):
            held = super().__contains__(key)
            other, self.meanwhile = self.meanwhile, None
            if other is not None:
                other.start()
                other.join(0.5)  # it may have to wait for this call
            return held

    fingerprint = kv_dropping().fingerprint
    memory = Interleaving(max_bytes=1)  # keeps only the latest chunk
    resolver = CacheResolver(fingerprint, memory=memory, text_bytes=0)  # forgets the texts of those it drops

    def entry():
        return SimpleNamespace(fingerprint=fingerprint, offset=0, nbytes=1)

    resolver.remember("old", entry(), "old text")
    errors = []

    def remember(key):
        try:
            resolver.remember(key, entry(), f"text of {key}")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    other = threading.Thread(target=remember, args=("b",), daemon=True)
    memory.meanwhile = other
    remember("a")  # forgets the texts of dropped chunks while "b" is remembered
    other.join(60)
    assert errors == [] and resolver.texts_of(["b"]) == {"b": "text of b"}


def test_context_aware_decoding_is_refused_by_every_engine_path_not_skipped_in_streams():
    """generate refused it, while stream and astream quietly decoded without the contrast."""
    engine = SACEngine(kv_dropping()).load()
    config = GenerationConfig(max_new_tokens=2, context_contrast=0.5)
    with pytest.raises(InvalidInputError, match="context_contrast .* use SAC.answer"):
        engine.generate(["Who?"], config)
    with pytest.raises(InvalidInputError, match="context_contrast .* use SAC.answer"):
        list(engine.stream("Who?", config))

    async def astream():
        return [piece async for piece in engine.astream("Who?", config)]

    with pytest.raises(InvalidInputError, match="context_contrast .* use SAC.answer"):
        asyncio.run(astream())


def test_a_stream_closed_or_dropped_before_it_is_read_releases_its_chunks():
    """A stream decodes (and releases its prompt's chunks) only once read: one never read held them
    pinned until they lapsed (PIN_SECONDS), keeping memory over its limit meanwhile."""
    engine = small_memory_engine()
    memory = engine.resolver.memory
    text = "Snow closed the pass in March."

    def handed() -> str:
        [keys] = engine.handles_for([text])
        assert memory.pinned == set(keys)
        return f"{markers_for(keys)}\nQ: when?\nA:"

    stream = engine.stream(handed(), CONFIG)
    del stream
    gc.collect()
    assert memory.pinned == set()
    engine.stream(handed(), CONFIG).close()
    assert memory.pinned == set()
    astream = engine.astream(handed(), CONFIG)
    del astream
    gc.collect()
    assert memory.pinned == set()
    asyncio.run(engine.astream(handed(), CONFIG).aclose())
    assert memory.pinned == set()

    prompt = handed()
    [keys] = engine.handles_for([text])  # another call handed the same chunks: pinned twice
    read = engine.stream(prompt, CONFIG)
    assert list(read)[-1].cached_tokens > 0
    del read
    gc.collect()
    assert memory.pinned == set(keys)  # released once, by its decoding; not again when dropped

    async def read_async():
        return [piece async for piece in engine.astream(prompt, CONFIG)]

    assert asyncio.run(read_async())[-1].cached_tokens > 0
    assert memory.pinned == set()

    contrast = GenerationConfig(max_new_tokens=2, context_contrast=0.5)  # refused: the calls release too
    with pytest.raises(InvalidInputError, match="context_contrast"):
        engine.generate([handed()], contrast)
    assert memory.pinned == set()
    with pytest.raises(InvalidInputError, match="context_contrast"):
        list(engine.stream(handed(), contrast))
    assert memory.pinned == set()
