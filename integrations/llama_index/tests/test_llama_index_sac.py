"""llama-index-postprocessor-sac + llama-index-llms-sac: a RetrieverQueryEngine answering from
SAC caches. Tiny random Llama + untrained KV-dropping compressor: the plumbing is under test."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
from conftest import decodings, record_engine_calls
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.llms.sac import SACLLM, PromptRefusedError, sac_qa_prompt
from llama_index.postprocessor.sac import SACNodePostprocessor

from sac_rag import FingerprintMismatchError, InvalidInputError, PromptTooLongError, SACError
from sac_rag.handles import SACEngine, marker_for, markers_for
from sac_rag.store import AnchorStore, EntryNotFoundError


class KeywordRetriever(BaseRetriever):
    """Nodes sharing the most words with the query, scored by the overlap (no embeddings)."""

    def __init__(self, nodes: list[TextNode], k: int = 2):
        super().__init__()
        self.nodes, self.k = nodes, k

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        words = set(re.findall(r"\w+", query_bundle.query_str.lower()))
        scored = [(len(words & set(re.findall(r"\w+", n.text.lower()))), n) for n in self.nodes]
        ranked = sorted(scored, key=lambda s: -s[0])[: self.k]
        return [NodeWithScore(node=n, score=s / max(len(words), 1)) for s, n in ranked if s > 0]


def make_nodes(passages):
    return [TextNode(id_=f"node-{i}", text=p, metadata={"file_name": f"notes/{i}.txt", "page": i})
            for i, p in enumerate(passages)]


class Spy:
    """Records the prompts an engine decodes and the generations it returns."""

    def __init__(self, engine, monkeypatch):
        self.prompts, self.generations = [], []
        original = engine.generate

        def generate(prompts, config=None):
            self.prompts.extend(prompts)
            result = original(prompts, config)
            self.generations.extend(result)
            return result

        monkeypatch.setattr(engine, "generate", generate)


def query_engine(engine, passages, k=2, **kwargs):
    llm = SACLLM(engine=engine, max_tokens=kwargs.pop("max_tokens", 6), stop=[],
                 extractive=kwargs.pop("extractive", False))
    return RetrieverQueryEngine.from_args(
        KeywordRetriever(make_nodes(passages), k=k), llm=llm, response_mode=kwargs.pop("response_mode", "compact"),
        node_postprocessors=[SACNodePostprocessor(engine=engine)], text_qa_template=llm.qa_prompt, **kwargs)


def anchors(store, texts):
    return sum(store.get(AnchorStore.key_for(t)).n_anchors for t in texts)


def test_postprocessor_keeps_ids_scores_text_and_metadata_and_shows_the_llm_only_the_marker(engine, passages):
    nodes = [NodeWithScore(node=n, score=0.5 + i) for i, n in enumerate(make_nodes(passages[:2]))]
    out = SACNodePostprocessor(engine=engine).postprocess_nodes(nodes, query_str="who keeps bees?")
    for before, after in zip(nodes, out):
        key = AnchorStore.key_for(before.node.text)
        assert (after.node.node_id, after.score, after.node.text) == (before.node.node_id, before.score,
                                                                     before.node.text)
        assert after.node.metadata == {**before.node.metadata, "sac_key": key, "sac_keys": [key],
                                       "sac_marker": marker_for(key)}
        assert after.node.get_content(metadata_mode=MetadataMode.LLM) == marker_for(key)
        assert before.node.get_content(metadata_mode=MetadataMode.LLM).endswith(before.node.text)  # untouched
    assert not engine.resolver.memory


def test_a_reranker_after_the_postprocessor_reads_the_nodes_text_not_their_keys(engine, passages):
    """Rerankers (``SentenceTransformerRerank``) score a node by its embed view: the handle view's
    metadata values and hex keys there would rank the nodes at random."""
    nodes = [NodeWithScore(node=n, score=1.0) for n in make_nodes(passages[:2])]
    out = SACNodePostprocessor(engine=engine).postprocess_nodes(nodes, query_str="who keeps bees?")
    assert [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in out] == passages[:2]


def test_query_engine_compact_mode_answers_from_caches_and_reads_no_context_text(engine, store, passages,
                                                                                 monkeypatch, count_text_tokens):
    spy = Spy(engine, monkeypatch)
    response = query_engine(engine, passages).query("When was the lighthouse on Gull Point painted red?")

    retrieved = [n.node.text for n in response.source_nodes]
    assert retrieved and all(n.score is not None for n in response.source_nodes)
    [prompt] = spy.prompts  # compact: one LLM call sees every marker
    assert all(marker_for(AnchorStore.key_for(t)) in prompt and t not in prompt for t in retrieved)
    # back to back, as the compressor's layout puts contexts (its context_separator is ""), not the
    # blank line LlamaIndex joins nodes with
    assert markers_for([AnchorStore.key_for(t) for t in retrieved]) in prompt and len(retrieved) == 2
    [generation] = spy.generations
    assert generation.cached_tokens == anchors(store, retrieved) > 0
    assert generation.text_tokens == count_text_tokens(engine, prompt)  # template + question only
    assert isinstance(response.response, str)
    assert not engine.resolver.memory and len(store) == len(passages)


def test_an_extractive_query_engine_answers_with_a_span_of_the_retrieved_nodes(engine, passages):
    question = "When was the lighthouse on Gull Point painted red?"
    response = query_engine(engine, passages, extractive=True).query(question)
    answer = response.response.strip()
    assert answer and any(answer in n.node.text for n in response.source_nodes), answer
    free = query_engine(engine, passages).query(question)
    assert not any(free.response.strip() in n.node.text for n in free.source_nodes)  # the random model rambles


def test_llm_reports_usage_with_cached_tokens(engine, store, passages):
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[0])), query_str="When?")
    response = SACLLM(engine=engine, max_tokens=3, stop=[]).complete(prompt, formatted=True)
    usage = response.raw["usage"]
    assert usage["cached_tokens"] == anchors(store, passages[:1])
    assert usage["prompt_tokens"] == usage["text_tokens"] + usage["cached_tokens"]
    assert response.additional_kwargs["context_tokens"] > usage["cached_tokens"]


def test_beam_search_is_a_setting_of_the_llm_and_of_each_call(engine, passages, monkeypatch):
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[0])), query_str="When?")
    configs = []
    original = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, config=None: (configs.append(config),
                                                                          original(prompts, config))[1])
    beams = SACLLM(engine=engine, max_tokens=6, stop=[], num_beams=3)
    answer = beams.complete(prompt, formatted=True).text
    assert SACLLM(engine=engine, max_tokens=6, stop=[]).complete(prompt, formatted=True, num_beams=3).text == answer
    assert [c.num_beams for c in configs] == [3, 3]
    short = SACLLM(engine=engine, max_tokens=6, stop=[], num_beams=3, length_penalty=0.0)
    short = short.complete(prompt, formatted=True)
    assert short.text == beams.complete(prompt, formatted=True, length_penalty=0.0).text
    assert [c.length_penalty for c in configs[-2:]] == [0.0, 0.0]
    consensus = SACLLM(engine=engine, max_tokens=6, stop=[], num_beams=3, mbr=True).complete(prompt, formatted=True)
    assert consensus.text == beams.complete(prompt, formatted=True, mbr=True).text
    assert [c.mbr for c in configs[-2:]] == [True, True]
    assert [r.delta for r in beams.stream_complete(prompt, formatted=True) if r.delta] == [answer]  # one piece


def test_an_llm_left_on_default_decoding_answers_as_its_compressor_recommends(compressor, passages, tmp_path,
                                                                              monkeypatch):
    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    path = str(compressor.save_pretrained(tmp_path / "ckpt"))
    assert (SACLLM(compressor=path).generation_config().num_beams, SACLLM(compressor=path).engine.loaded) == (3, False)
    engine = SACEngine(compressor)  # the same compressor, loaded (the tiny model has no directory to load from)
    configs = []
    original = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, config=None: (configs.append(config),
                                                                          original(prompts, config))[1])
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[0])), query_str="When?")
    recommended = SACLLM(engine=engine, max_tokens=6, stop=[])
    assert recommended.complete(prompt, formatted=True).text == SACLLM(
        engine=engine, max_tokens=6, stop=[], num_beams=3, mbr=True).complete(prompt, formatted=True).text
    recommended.complete(prompt, formatted=True, num_beams=1)  # a call's choice wins; MBR needs beams: greedy
    SACLLM(engine=engine, max_tokens=6, stop=[], extractive=True).complete(prompt, formatted=True)  # quotes: greedy
    SACLLM(engine=engine, max_tokens=6, stop=[], num_beams=2).complete(prompt, formatted=True)  # MBR fills the rest
    assert [(c.num_beams, c.mbr, c.extractive) for c in configs] == [
        (3, True, False), (3, True, False), (1, False, False), (1, False, True), (2, True, False)]


def test_async_query_gives_the_same_answer(engine, passages):
    question = "Who keeps bees behind the old mill?"
    sync = query_engine(engine, passages).query(question)
    result = asyncio.run(query_engine(engine, passages).aquery(question))
    assert result.response == sync.response
    assert [n.node.node_id for n in result.source_nodes] == [n.node.node_id for n in sync.source_nodes]


def test_two_async_queries_overlap_in_time(engine, passages):
    qe = query_engine(engine, passages, max_tokens=16)
    spans = {}
    ticks = 0

    async def ask(name, question):
        start = time.perf_counter()
        await qe.aquery(question)
        spans[name] = (start, time.perf_counter())

    async def ticker(done):
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def main():
        done = asyncio.Event()
        tick = asyncio.create_task(ticker(done))
        await asyncio.gather(ask("a", "Who keeps bees?"), ask("b", "When does the river ferry stop?"))
        done.set()
        await tick

    asyncio.run(main())
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, spans
    assert ticks >= 2


def test_async_chat_and_its_stream_decode_in_a_worker_thread_not_the_event_loops(engine, passages, monkeypatch):
    """``achat``/``astream_chat`` (a ``SimpleChatEngine``'s async turns, agents) decode as ``acomplete``
    and ``astream_complete`` do, off the event loop, and answer as ``chat`` does."""
    threads = []
    for name in ("generate_batch", "stream_with_usage"):
        original = getattr(engine.generator, name)
        monkeypatch.setattr(engine.generator, name,
                            lambda *a, _original=original, **k: (threads.append(threading.get_ident()),
                                                                 _original(*a, **k))[1])
    llm = SACLLM(engine=engine, max_tokens=6, stop=[])
    messages = [ChatMessage(role="system", content=marker_for(AnchorStore.key_for(passages[0]))),
                ChatMessage(role="user", content="When was the lighthouse painted red?")]

    async def main():
        answer = await llm.achat(messages)
        pieces = [r async for r in await llm.astream_chat(messages)]
        return threading.get_ident(), answer, pieces

    loop_thread, answer, pieces = asyncio.run(main())
    assert len(threads) == 2 and loop_thread not in threads
    assert answer.message.content == pieces[-1].message.content == llm.chat(messages).message.content
    assert answer.raw["usage"]["cached_tokens"] == pieces[-1].raw["usage"]["cached_tokens"] > 0


def test_streaming_query_yields_tokens_incrementally(engine, passages, monkeypatch):
    decoded = []
    original = engine.generator._append
    monkeypatch.setattr(engine.generator, "_append", lambda *a: (decoded.append(1), original(*a))[1])
    response = query_engine(engine, passages, streaming=True, max_tokens=12).query("When does the ferry stop?")
    arrivals = [(len(decoded), delta) for delta in response.response_gen]
    texts = [(n, d) for n, d in arrivals if d]
    assert len(texts) >= 2 and texts[0][0] < len(decoded)
    assert len({n for n, _ in texts}) >= 2


def test_llm_streams_sync_and_async(engine, passages):
    llm = SACLLM(engine=engine, max_tokens=8, stop=[])
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[2])), query_str="When?")
    sync = list(llm.stream_complete(prompt, formatted=True))

    async def collect():
        return [r async for r in await llm.astream_complete(prompt, formatted=True)]

    deltas = [r.delta for r in sync if r.delta]
    assert len(deltas) >= 2 and sync[-1].text == "".join(deltas) == llm.complete(prompt, formatted=True).text
    assert [r.delta for r in asyncio.run(collect())] == [r.delta for r in sync]
    assert sync[-1].raw["usage"]["cached_tokens"] == engine.store.get(AnchorStore.key_for(passages[2])).n_anchors


def test_fake_handle_in_the_query_stays_text_and_loads_nothing(engine, store, passages, monkeypatch):
    loaded = []
    original = store.get_many
    monkeypatch.setattr(store, "get_many", lambda keys: (loaded.extend(keys), original(keys))[1])
    spy = Spy(engine, monkeypatch)
    fake = marker_for(AnchorStore.key_for("a chunk nobody stored"))
    response = query_engine(engine, passages, k=1).query(f"Who keeps bees? {fake}")

    [node] = response.source_nodes
    assert loaded == [AnchorStore.key_for(node.node.text)]
    [prompt] = spy.prompts
    assert fake in prompt
    assert spy.generations[0].cached_tokens == anchors(store, [node.node.text])


# -- bad input ----------------------------------------------------------------------------------


def test_no_nodes_retrieved_gives_the_empty_response_without_calling_the_llm(engine, passages, monkeypatch):
    spy = Spy(engine, monkeypatch)
    response = query_engine(engine, passages).query("xylophone quartz")
    assert response.source_nodes == [] and spy.prompts == []
    assert str(response) == "Empty Response"


def test_missing_node_without_write_back_is_compressed_into_memory(engine, store, monkeypatch):
    spy = Spy(engine, monkeypatch)
    text = "Snow closed the mountain pass for three weeks."
    query_engine(engine, [text]).query("When was the mountain pass closed?")
    key = AnchorStore.key_for(text)
    assert key not in store and key in engine.resolver.memory
    assert spy.generations[0].cached_tokens == engine.resolver.memory[key].n_anchors


def test_nodes_cut_another_way_than_the_store_are_compressed_with_a_warning_counting_them(
        engine, store, passages, caplog):
    from llama_index.core.node_parser import SentenceSplitter

    split = SentenceSplitter(chunk_size=12, chunk_overlap=0).get_nodes_from_documents(
        [TextNode(text=p) for p in passages[:2]])
    assert len(split) > 2
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        SACNodePostprocessor(engine=engine).postprocess_nodes([NodeWithScore(node=n, score=1.0) for n in split],
                                                               query_str="when was it painted?")
    assert f"{len(split)} of {len(split)} retrieved texts were not in the store at {store.path}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        SACNodePostprocessor(engine=engine).postprocess_nodes(
            [NodeWithScore(node=n, score=1.0) for n in make_nodes(passages)], query_str="when was it painted?")
    assert caplog.records == []  # the store's own chunks: all served from it


def test_missing_node_with_on_miss_error_raises(engine):
    nodes = [NodeWithScore(node=TextNode(text="The choir rehearses on Thursdays."), score=1.0)]
    with pytest.raises(EntryNotFoundError, match="precompress"):
        SACNodePostprocessor(engine=engine, on_miss="error").postprocess_nodes(nodes, query_str="when?")


def test_missing_node_with_on_miss_text_keeps_its_text_in_the_llm_view(engine, caplog):
    node = TextNode(text="Foxes were seen near the quarry.", metadata={"file_name": "f.txt"})
    with caplog.at_level(logging.WARNING):
        [out] = SACNodePostprocessor(engine=engine, on_miss="text").postprocess_nodes(
            [NodeWithScore(node=node, score=1.0)], query_str="what was seen?")
    assert out.node.get_content(metadata_mode=MetadataMode.LLM) == node.text and "uncompressed" in caplog.text


def test_store_built_for_another_model_is_refused(tmp_path, compressor, compressor_factory, store_factory, passages):
    store_factory(tmp_path / "other", compressor_factory(seed=1), passages[:1]).close()
    nodes = [NodeWithScore(node=n, score=1.0) for n in make_nodes(passages[:1])]
    with pytest.raises(FingerprintMismatchError, match="Rebuild the store"):
        SACNodePostprocessor(compressor=compressor, store=tmp_path / "other").postprocess_nodes(nodes, query_str="q?")
    with pytest.raises(FingerprintMismatchError):
        SACLLM(engine=SACEngine(compressor, tmp_path / "other")).complete("hi")


def test_empty_query_is_refused(engine, passages):
    with pytest.raises(InvalidInputError, match="question is empty"):
        query_engine(engine, passages).query("   ")
    with pytest.raises(PromptRefusedError, match="empty") as refused:
        SACLLM(engine=engine).complete("")
    assert isinstance(refused.value.__cause__, InvalidInputError)


def test_prompt_longer_than_the_model_context_is_refused(engine):
    with pytest.raises(PromptRefusedError, match="positions.*response_mode=\"refine\"") as refused:
        SACLLM(engine=engine, max_tokens=2).complete("lighthouse " * 5000)
    assert "LangChain" not in str(refused.value)  # advice for this framework only
    assert isinstance(refused.value.__cause__, PromptTooLongError) and not isinstance(refused.value, ValueError)
    with pytest.raises(PromptRefusedError, match="positions"):
        list(SACLLM(engine=engine, max_tokens=2).stream_complete("lighthouse " * 5000))


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize"])
def test_a_query_too_long_for_the_model_is_refused_not_answered_empty(engine, passages, mode):
    """LlamaIndex never splits SAC prompts (UNSPLIT_CONTEXT_WINDOW), so the model's own limit
    decides; compact and refine catch a ValueError from the LLM and answer "Empty Response"."""
    question = "When was the lighthouse painted red? " + "lighthouse " * 5000
    with pytest.raises(PromptRefusedError, match="positions"):
        query_engine(engine, passages, response_mode=mode).query(question)


def chat_engine(engine, passages, **kwargs):
    from llama_index.core.chat_engine import ContextChatEngine

    return ContextChatEngine.from_defaults(
        retriever=KeywordRetriever(make_nodes(passages), k=2), llm=kwargs.pop("llm"),
        node_postprocessors=[SACNodePostprocessor(engine=engine)], **kwargs)


def test_a_chat_engine_with_chat_memory_keeps_answering_where_the_default_memory_is_refused(
        engine, passages, monkeypatch):
    """SACLLM's unsplit window would size a chat engine's default memory at about 2**30 tokens:
    it never drops a turn, and a long conversation ends refused. ``chat_memory`` keeps the latest
    turns within half the model's positions (4,096 here), counted in the model's own tokens."""
    long_message = "When was the lighthouse on Gull Point painted red? " + "lighthouse " * 70  # 740 tokens
    unbounded = chat_engine(engine, passages, llm=SACLLM(engine=engine, max_tokens=2, stop=[]))
    with pytest.raises(PromptRefusedError, match="positions.*memory=llm.chat_memory"):
        for _ in range(8):
            unbounded.chat(long_message)

    llm = SACLLM(engine=engine, max_tokens=2, stop=[])
    memory = llm.chat_memory()
    assert memory.token_limit == engine.generator.max_positions // 2 == 2048
    bounded = chat_engine(engine, passages, llm=llm, memory=memory)
    spy = Spy(engine, monkeypatch)
    for _ in range(8):
        bounded.chat(long_message)
    assert len(spy.generations) == 8
    tokens = engine.compressor.tokenizer.encode
    assert all(len(tokens(p)) < engine.generator.max_positions for p in spy.prompts)
    assert spy.prompts[-1].count("lighthouse " * 70) == 2  # the previous message and this one: older ones dropped


def test_a_chat_engine_asks_in_the_layout_the_compressor_was_trained_with(engine, passages, monkeypatch):
    """A chat engine's prompt (a system message holding the nodes' markers, then the turns) reaches the
    model as contexts, then each question with its answer: with ``llm.chat_context_template`` the
    first turn reads exactly what a query engine with ``llm.qa_prompt`` reads."""
    question = "When was the lighthouse on Gull Point painted red?"
    spy = Spy(engine, monkeypatch)
    query_engine(engine, passages).query(question)
    llm = SACLLM(engine=engine, max_tokens=6, stop=[])
    chat = chat_engine(engine, passages, llm=llm, context_template=llm.chat_context_template)
    first = chat.chat(question)
    assert spy.prompts[-1] == spy.prompts[0] and str(first) == spy.generations[0].text.strip()
    chat.chat("And who painted it?")
    template = engine.template.question
    assert spy.prompts[-1].endswith(template.format(question=question) + str(first)
                                    + template.format(question="And who painted it?"))
    with_instructions = chat_engine(engine, passages, llm=llm)  # LlamaIndex's default context template
    with_instructions.chat(question)
    assert spy.prompts[-1].startswith("### Context:\nUse the context information below")
    assert spy.prompts[-1].endswith(template.format(question=question))


def test_a_condensing_chat_engine_is_told_once_to_use_the_context_mode(engine, passages, caplog):
    """From its second turn a condensing chat engine (``as_chat_engine``'s default mode) asks the LLM to
    rewrite the follow-up question, in a prompt with no contexts outside the SAC layout, and retrieves
    with what comes back: SACLLM says once what to use instead. Query engines and the context chat
    mode, which always prompt in the layout, hear nothing of it."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine

    question = "When was the lighthouse on Gull Point painted red?"
    llm = SACLLM(engine=engine, max_tokens=2, stop=[])
    with caplog.at_level(logging.WARNING, logger="llama_index.llms.sac.base"):
        query_engine(engine, passages).query(question)
        chat = chat_engine(engine, passages, llm=llm, context_template=llm.chat_context_template)
        chat.chat(question)
        chat.chat("And who painted it?")
        assert "chat_mode" not in caplog.text
        condensing = CondensePlusContextChatEngine.from_defaults(
            retriever=KeywordRetriever(make_nodes(passages), k=2), llm=llm,
            node_postprocessors=[SACNodePostprocessor(engine=engine)])
        condensing.chat(question)  # no history yet: nothing to rewrite
        assert "chat_mode" not in caplog.text
        condensing.chat("And who painted it?")
        condensing.chat("And when?")
    warnings = [r for r in caplog.records if 'chat_mode="context"' in r.getMessage()]
    assert len(warnings) == 1 and "condense_plus_context" in warnings[0].getMessage()


def test_a_query_engine_reading_contexts_outside_the_trained_layout_is_told_once_what_to_pass(
        engine, passages, caplog, monkeypatch):
    """LlamaIndex's own templates put the markers in a layout the compressor was not trained on:
    without ``text_qa_template``, and in ``tree_summarize``, which reads ``summary_template`` instead.
    SACLLM says once per LLM what to pass; a query engine in the layout hears nothing."""
    spy = Spy(engine, monkeypatch)
    qa = SACLLM(engine=engine).qa_prompt

    def warnings_of(**kwargs):
        caplog.clear()
        llm = SACLLM(engine=engine, max_tokens=2, stop=[])
        qe = RetrieverQueryEngine.from_args(KeywordRetriever(make_nodes(passages)), llm=llm,
                                            node_postprocessors=[SACNodePostprocessor(engine=engine)], **kwargs)
        with caplog.at_level(logging.WARNING, logger="llama_index.llms.sac.base"):
            for _ in range(2):
                qe.query("When was the lighthouse on Gull Point painted red?")
        return [r.getMessage() for r in caplog.records if "with compressed contexts" in r.getMessage()]

    [default] = warnings_of()
    assert "text_qa_template=llm.qa_prompt" in default and spy.prompts[-1].startswith("Context information")
    [tree] = warnings_of(response_mode="tree_summarize", text_qa_template=qa)
    assert "summary_template=llm.qa_prompt" in tree
    assert warnings_of(text_qa_template=qa) == []
    assert warnings_of(response_mode="tree_summarize", text_qa_template=qa, summary_template=qa) == []
    assert spy.prompts[-1] == spy.prompts[-3]  # tree_summarize then reads what compact reads


@pytest.mark.parametrize("cls, option", [(SACLLM, {"extractve": True}), (SACNodePostprocessor, {"onmiss": "error"})])
def test_a_misspelled_option_is_refused_not_ignored(cls, option):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"{next(iter(option))}\n  Extra inputs are not permitted"):
        cls(**option)


@pytest.mark.parametrize("limit", [0, -5, 2.5, True])
def test_chat_memory_refuses_a_limit_that_is_not_a_positive_count(engine, limit):
    with pytest.raises(InvalidInputError, match="token_limit"):
        SACLLM(engine=engine).chat_memory(token_limit=limit)


def test_an_llm_prints_its_settings_and_names_its_conversation_prompt(engine):
    """Its default ``messages_to_prompt`` is its own method: shown by name, as a bound method's repr
    would hold the LLM's repr again, endlessly (a RecursionError)."""
    llm = SACLLM(engine=engine, num_beams=2)
    assert "num_beams=2" in repr(llm) and "messages_to_prompt=SACLLM.conversation_prompt" in str(llm)


def test_llm_construction_loads_nothing():
    llm = SACLLM(compressor="no-such-compressor")
    postprocessor = SACNodePostprocessor(compressor="no-such-compressor")
    assert llm.engine is postprocessor.engine and not llm.engine.loaded


def test_llm_model_name_with_an_engine_is_the_engines_compressor(engine):
    llm = SACLLM(engine=engine, max_tokens=2)
    assert llm.metadata.model_name == llm.model_name == "sac:tiny-llama-0"
    llm.complete("hi", model="sac:tiny-llama-0")
    with pytest.raises(PromptRefusedError, match="serves 'sac:tiny-llama-0'"):
        llm.complete("hi", model="smollm2-135m-sac-5x")


@pytest.mark.parametrize("kwargs", [{"bogus": 3}, {"max_new_tokens": 1}])
def test_llm_refuses_unknown_call_arguments_naming_the_accepted_ones(engine, kwargs):
    llm = SACLLM(engine=engine, max_tokens=2)
    with pytest.raises(PromptRefusedError, match=f"{next(iter(kwargs))}.*accepted: .*max_tokens"):
        llm.complete("hi", **kwargs)
    with pytest.raises(PromptRefusedError, match="accepted"):
        asyncio.run(llm.acomplete("hi", **kwargs))
    assert llm.complete("hi", max_tokens=1).raw["usage"]["completion_tokens"] <= 1


def test_decoding_settings_that_cannot_be_used_are_refused_not_answered_empty(engine, passages):
    """Settings refused as an InvalidInputError (a ValueError) inside a query would be caught by
    LlamaIndex's compact and refine synthesizers and answered "Empty Response"."""
    with pytest.raises(InvalidInputError, match="beam search"):
        SACLLM(engine=engine, num_beams=4, extractive=True)  # when built, before any query
    with pytest.raises(InvalidInputError, match="temperature"):
        SACLLM(engine=engine, temperature=-1.0)
    llm = SACLLM(engine=engine, max_tokens=2, extractive=True)
    for call in (llm.complete, llm.stream_complete):
        with pytest.raises(PromptRefusedError, match="beam search"):
            call("When?", num_beams=4)
    for mode in ("compact", "refine"):
        queries = query_engine(engine, passages, response_mode=mode, extractive=True)
        queries._response_synthesizer._llm.num_beams = 4  # set after it was built: refused by the query
        with pytest.raises(PromptRefusedError, match="beam search"):
            queries.query("When was the lighthouse painted red?")  # not "Empty Response"


def test_postprocessor_accepts_documents_and_refuses_nodes_without_text(engine, passages):
    from llama_index.core.schema import Document, ImageNode

    postprocessor = SACNodePostprocessor(engine=engine)
    out = postprocessor.postprocess_nodes(
        [NodeWithScore(node=TextNode(text=passages[0]), score=1.0),
         NodeWithScore(node=Document(text=passages[1], metadata={"file_name": "b.txt"}), score=0.5)],
        QueryBundle("When was the lighthouse built?"))
    assert type(out[1].node).__name__ == "Document" and out[1].node.text == passages[1]
    assert out[1].node.get_content(MetadataMode.LLM) == marker_for(AnchorStore.key_for(passages[1]))
    assert out[1].node.metadata["file_name"] == "b.txt" and out[1].score == 0.5
    with pytest.raises(InvalidInputError, match="ImageNode without text"):
        postprocessor.postprocess_nodes([NodeWithScore(node=ImageNode(image_url="http://x/y.png"), score=1.0)],
                                        QueryBundle("q?"))


def test_llm_and_postprocessor_with_objects_serialize_them_as_names(compressor, store):
    import json

    for obj in (SACLLM(compressor=compressor, store=store), SACNodePostprocessor(compressor=compressor, store=store)):
        for dumped in (json.loads(obj.model_dump_json()), json.loads(obj.to_json())):
            assert dumped["compressor"] == "sac:tiny-llama-0" and dumped["store"] == str(store.path)


def test_the_llm_rebuilt_from_its_dict_or_a_pickle_decodes_as_the_original(store, caplog):
    """A record of every field would pass the defaults back as given (num_beams=1): the rebuilt LLM
    then decoded greedily instead of as the compressor recommends. Pickling crashed outright."""
    import pickle

    llm = SACLLM(compressor="smollm2-135m-sac-5x", store=str(store.path), max_tokens=16)
    assert llm.generation_config().num_beams == 8  # the shipped compressor's recommendation
    record = llm.to_dict()
    assert {k for k in record if k != "class_name"} == {"compressor", "store", "max_tokens"}
    pickled = pickle.loads(pickle.dumps(llm))
    for rebuilt in (SACLLM.from_dict(record), SACLLM.from_json(llm.to_json()), pickled):
        assert rebuilt.generation_config() == llm.generation_config()
    assert pickled.messages_to_prompt.__self__ is pickled  # chats are laid out in the compressor's layout
    assert llm.messages_to_prompt.__self__ is llm  # and the original keeps its own
    with_object = SACLLM(compressor="smollm2-135m-sac-5x", store=store)  # an open AnchorStore: not picklable
    pickle.dumps(with_object)
    assert with_object.store is store  # LlamaIndex drops it from the pickled copy, not from the live LLM


def test_an_llm_made_with_an_engine_records_the_engines_settings(tmp_path):
    engine = SACEngine("smollm2-135m-sac-5x", tmp_path / "s", dtype="float32")
    record = SACLLM(engine=engine, max_tokens=8).to_dict()
    assert (record["compressor"], record["store"], record["dtype"]) == ("smollm2-135m-sac-5x", str(tmp_path / "s"),
                                                                        "float32")
    assert SACLLM.from_dict(record).engine is SACEngine.shared("smollm2-135m-sac-5x", tmp_path / "s", dtype="float32")


@pytest.mark.parametrize("window", [0, -1, 64])
def test_a_context_window_that_leaves_no_room_for_the_prompt_is_refused_when_built(window):
    with pytest.raises(InvalidInputError, match=f"context_window={window!r} leaves no room for the prompt"):
        SACLLM(context_window=window, max_tokens=64)


# -- LlamaIndex re-splitting the context --------------------------------------------------------


@pytest.fixture
def long_node_engine(compressor_factory, passages):
    """An engine on 8-token chunks, and a text of 174 chunks: its markers are ~7,100 tokens to
    LlamaIndex's tokenizer, while the model reads the text's 1,391 positions (it has 4,096)."""
    return SACEngine(compressor_factory(chunk_len=8)), " ".join(passages * 6)


def decoded_prompts(engine, monkeypatch):
    """The prompts the model decodes (after markers became K/V): a list filled as it runs."""
    seen = []
    original = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch",
                        lambda prompts, config=None, sources=None: (seen.extend(prompts),
                                                                    original(prompts, config, sources))[1])
    return seen


def test_a_node_too_long_for_llama_index_windows_reaches_the_model_whole(long_node_engine, monkeypatch):
    """LlamaIndex counts a marker as the ~40 tokens of its text; left to pack the context into a
    window it would cut this node's markers. SACLLM reports a window it never splits in."""
    engine, text = long_node_engine
    spy = Spy(engine, monkeypatch)
    response = query_engine(engine, [text], k=1).query("When was the lighthouse painted red?")

    [node] = response.source_nodes
    keys = node.node.metadata["sac_keys"]
    assert len(keys) == 174
    assert len(spy.prompts) == 1  # one call, holding the node's markers whole and in order
    assert markers_for(keys) in spy.prompts[0] and not engine.resolver.cut_pieces(spy.prompts[0])
    kvs = engine.resolver.lookup(keys)  # the text repeats: so do some of its chunks
    assert spy.generations[0].cached_tokens == sum(kvs[k].n_anchors for k in keys)

    from llama_index.llms.sac import UNSPLIT_CONTEXT_WINDOW

    llm = SACLLM(compressor="no-such-compressor")
    assert llm.metadata.context_window == UNSPLIT_CONTEXT_WINDOW and not llm.engine.loaded  # loads nothing


@pytest.mark.parametrize("mode, window", [("compact", 2048), ("refine", 3000), ("tree_summarize", 2048)])
def test_a_marker_cut_by_a_small_context_window_is_refused_not_read_as_text(long_node_engine, monkeypatch, mode,
                                                                           window):
    engine, text = long_node_engine
    decoded = decoded_prompts(engine, monkeypatch)
    llm = SACLLM(engine=engine, max_tokens=6, stop=[], context_window=window)  # LlamaIndex now cuts the markers
    qe = RetrieverQueryEngine.from_args(KeywordRetriever(make_nodes([text]), k=1), llm=llm, response_mode=mode,
                                        node_postprocessors=[SACNodePostprocessor(engine=engine)],
                                        text_qa_template=llm.qa_prompt)
    with pytest.raises(SACError, match="piece.* of <sac:...> markers.*context_window") as refused:
        qe.query("When was the lighthouse painted red?")  # raised through LlamaIndex: not "Empty Response"
    from sac_rag.handles import MarkerCutError

    assert refused.type is MarkerCutError
    assert decoded == []  # refused before the model read anything


def test_a_per_call_stop_cuts_complete_and_its_streams_alike(engine, passages):
    """``complete(prompt, stop=[...])`` is accepted (CALL_ARGUMENTS) and must cut the answer; the
    streams likewise."""
    llm = SACLLM(engine=engine, max_tokens=24, stop=[])
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[0])), query_str="When?")
    full = llm.complete(prompt, formatted=True).text
    i = max(1, len(full) // 2)
    stop = full[i:i + 3]
    assert stop.strip(), full
    before = full[:full.index(stop)]
    assert llm.complete(prompt, formatted=True, stop=[stop]).text == before
    assert list(llm.stream_complete(prompt, formatted=True, stop=[stop]))[-1].text == before

    async def collect():
        return [r async for r in await llm.astream_complete(prompt, formatted=True, stop=[stop])][-1].text

    assert asyncio.run(collect()) == before


def test_every_path_decodes_each_kind_of_prompt_alike(compressor, monkeypatch):
    """No compressed context (a condensing engine's rewrite): greedy; with contexts: the compressor's
    recommendation - in complete, acomplete, stream_complete and astream_complete alike."""
    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    engine = SACEngine(compressor)
    [keys] = engine.handles_for(["The ferry runs every forty minutes."])
    calls = record_engine_calls(engine, monkeypatch)
    llm = SACLLM(engine=engine, max_tokens=4, stop=[])

    async def consume(prompt):
        await llm.acomplete(prompt, formatted=True)
        return [r async for r in await llm.astream_complete(prompt, formatted=True)]

    with_caches = f"### Context:\n{markers_for(keys)}\n### Question:\nHow often?\n### Answer:\n"
    for prompt, expected in (("### Question:\nWhat is 2+2?\n### Answer:\n", (1, False)), (with_caches, (3, True))):
        del calls[:]
        llm.complete(prompt, formatted=True)
        list(llm.stream_complete(prompt, formatted=True))
        asyncio.run(consume(prompt))
        assert decodings(calls) == [expected] * 4, (prompt, calls)


def test_a_custom_completion_to_prompt_is_applied_once_by_every_path(engine, passages, monkeypatch):
    """complete/acomplete apply ``completion_to_prompt`` to an unformatted prompt; chat/achat do not
    apply it on top of ``messages_to_prompt``."""
    calls = record_engine_calls(engine, monkeypatch, ("generate", "agenerate"))
    llm = SACLLM(engine=engine, max_tokens=2, stop=[],
                 completion_to_prompt=lambda q: f"### Question:\n{q}\n### Answer:\n")
    llm.complete("Who?")
    asyncio.run(llm.acomplete("Who?"))
    messages = [ChatMessage(role="user", content="Who?")]
    llm.chat(messages)
    asyncio.run(llm.achat(messages))
    seen = [prompt for prompts, _ in calls for prompt in prompts]
    assert seen[0] == seen[1] == "### Question:\nWho?\n### Answer:\n"
    assert seen[2] == seen[3]


def test_streamed_responses_carry_the_text_so_far_and_usage_adds_up(engine, passages):
    """Each streamed ``CompletionResponse.text`` is the answer so far (LlamaIndex's convention), and
    ``total_tokens`` = ``prompt_tokens`` + ``completion_tokens``."""
    llm = SACLLM(engine=engine, max_tokens=8, stop=[])
    prompt = sac_qa_prompt().format(context_str=marker_for(AnchorStore.key_for(passages[2])), query_str="When?")
    so_far = ""
    responses = list(llm.stream_complete(prompt, formatted=True))
    for r in responses:
        so_far += r.delta or ""
        assert r.text == so_far
    usage = llm.complete(prompt, formatted=True).raw["usage"]
    assert usage["cached_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert responses[-1].raw["usage"]["total_tokens"] == usage["total_tokens"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_postprocessor_write_back_stores_a_new_node_with_its_metadata_in_both_paths(engine, store, asynchronous):
    """A written-back node's entry cites it like a precompressed one (its metadata under ``doc``),
    from ``postprocess_nodes`` and ``apostprocess_nodes`` alike."""
    node = NodeWithScore(node=TextNode(text="The orchard's oldest pear tree was planted in 1921.",
                                       metadata={"file_name": "orchard.txt", "page": 3}), score=1.0)
    post = SACNodePostprocessor(engine=engine, write_back=True)
    query = QueryBundle("how old is the tree?")
    [out] = (asyncio.run(post.apostprocess_nodes([node], query)) if asynchronous
             else post.postprocess_nodes([node], query))
    key = out.node.metadata["sac_key"]
    assert key in store
    assert store.metadata(key)["doc"] == {"file_name": "orchard.txt", "page": 3}


def test_postprocessor_gives_a_node_with_empty_text_a_handle_rather_than_refusing_it(engine):
    """Only an image node without a caption is refused; an empty TextNode (a blank page) is not."""
    [out] = SACNodePostprocessor(engine=engine, on_miss="text").postprocess_nodes(
        [NodeWithScore(node=TextNode(text=""), score=1.0)], query_str="what?")
    assert "sac_marker" in out.node.metadata
