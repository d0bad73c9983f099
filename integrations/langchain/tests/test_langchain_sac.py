"""langchain-sac: SAC handles through a retrieval chain, and answers from the caches they name.

Tiny random Llama + untrained KV-dropping compressor: the answers are noise, the plumbing
(what the LLM reads, from where, and what it reports) is what these tests pin down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest
from conftest import CHATML, decodings, prompt_configs, record_engine_calls
from langchain_classic.chains import create_retrieval_chain
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.load import dumpd, load
from langchain_core.retrievers import BaseRetriever
from langchain_sac import (
    SAC_DOCUMENT_PROMPT,
    SACLLM,
    ChatSAC,
    SACContextCompressor,
    create_sac_stuff_chain,
    marker_for,
    sac_qa_prompt,
)

from sac_rag import CheckpointError, FingerprintMismatchError, InvalidInputError, PromptError, PromptTooLongError
from sac_rag.chunking import split_document
from sac_rag.handles import SACEngine, markers_for
from sac_rag.store import AnchorStore, EntryNotFoundError


class KeywordRetriever(BaseRetriever):
    """Documents sharing the most words with the query (no embedding model needed)."""

    documents: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", d.page_content.lower()))), i)
                  for i, d in enumerate(self.documents)]
        return [self.documents[i] for score, i in sorted(scored, key=lambda s: (-s[0], s[1]))[: self.k] if score > 0]


class Recorder(BaseCallbackHandler):
    """What the LLM was given and what it reported."""

    def __init__(self):
        self.prompts: list[str] = []
        self.tokens: list[str] = []
        self.results = []

    def on_llm_start(self, serialized, prompts, **kwargs):
        self.prompts.extend(prompts)

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.prompts.extend(m.content for batch in messages for m in batch)

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs):
        self.results.append(response)


def documents(passages):
    return [Document(page_content=p, id=f"doc-{i}", metadata={"source": f"notes/{i}.txt", "page": i})
            for i, p in enumerate(passages)]


def retrieval_chain(engine, llm, passages, k=2):
    retriever = ContextualCompressionRetriever(
        base_compressor=SACContextCompressor(engine=engine),
        base_retriever=KeywordRetriever(documents=documents(passages), k=k),
    )
    return create_retrieval_chain(retriever, create_sac_stuff_chain(llm, sac_qa_prompt(question_key="input")))


def anchors(store, texts):
    return sum(store.get(AnchorStore.key_for(t)).n_anchors for t in texts)


# -- the compressor --------------------------------------------------------------------------


def test_compressor_keeps_text_id_and_metadata_and_adds_a_json_safe_handle(engine, passages):
    docs = documents(passages[:2])
    out = SACContextCompressor(engine=engine).compress_documents(docs, "when was the lighthouse built?")
    for before, after in zip(docs, out):
        key = AnchorStore.key_for(before.page_content)
        assert (after.page_content, after.id) == (before.page_content, before.id)
        assert after.metadata == {**before.metadata, "sac_key": key, "sac_keys": [key], "sac_marker": marker_for(key)}
        assert "sac_key" not in before.metadata  # the inputs are not modified
    assert not engine.resolver.memory  # everything came from the store


def test_async_compressor_gives_the_same_documents(engine, passages):
    docs = documents(passages)
    query = "who keeps bees?"
    sync = SACContextCompressor(engine=engine).compress_documents(docs, query)
    assert asyncio.run(SACContextCompressor(engine=engine).acompress_documents(docs, query)) == sync


def test_construction_loads_nothing_and_the_first_use_does(passages):
    started = time.perf_counter()
    llm = ChatSAC(model="no-such-compressor", max_tokens=4)
    compressor = SACContextCompressor(compressor="no-such-compressor")
    assert time.perf_counter() - started < 1.0
    assert llm.get_engine() is compressor.get_engine()  # same arguments, one shared engine
    assert not llm.get_engine().loaded
    with pytest.raises(CheckpointError, match="no-such-compressor"):
        llm.invoke("hi")


def test_models_and_compressors_built_with_the_same_arguments_share_one_engine(compressor, store):
    llm = ChatSAC(compressor=compressor, store=store.path)
    assert SACContextCompressor(compressor=compressor, store=store.path).get_engine() is llm.get_engine()
    assert SACLLM(compressor=compressor, store=str(store.path)).get_engine() is llm.get_engine()


# -- chains answer from the caches -----------------------------------------------------------


def test_retrieval_chain_answers_from_caches_and_reads_no_context_text(engine, store, passages, count_text_tokens):
    llm = ChatSAC(engine=engine, max_tokens=6, stop=[])
    recorder = Recorder()
    result = retrieval_chain(engine, llm, passages).invoke(
        {"input": "When was the lighthouse on Gull Point painted red?"}, config={"callbacks": [recorder]})

    retrieved = [d.page_content for d in result["context"]]
    assert retrieved and all(d.metadata["sac_marker"] == marker_for(d.metadata["sac_key"]) for d in result["context"])
    [prompt] = recorder.prompts
    assert all(marker_for(AnchorStore.key_for(t)) in prompt and t not in prompt for t in retrieved)
    message = recorder.results[0].generations[0][0].message
    usage = message.usage_metadata
    assert usage["input_token_details"]["cache_read"] == anchors(store, retrieved) > 0
    # The only text the decoder read is the template and the question: zero context tokens.
    assert usage["input_tokens"] - usage["input_token_details"]["cache_read"] == count_text_tokens(engine, prompt)
    assert message.response_metadata["context_tokens"] == sum(
        len(engine.compressor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in retrieved)
    assert isinstance(result["answer"], str)
    assert not engine.resolver.memory and len(store) == len(passages)  # nothing compressed at query time


def test_text_llm_in_a_stuff_chain_reports_cache_reads(engine, store, passages):
    llm = SACLLM(engine=engine, max_tokens=4, stop=[])
    docs = SACContextCompressor(engine=engine).compress_documents(documents(passages[1:3]), "who keeps bees?")
    recorder = Recorder()
    answer = create_stuff_documents_chain_sac(llm).invoke({"context": docs, "question": "Who keeps bees?"},
                                                          config={"callbacks": [recorder]})
    assert isinstance(answer, str)
    info = recorder.results[0].generations[0][0].generation_info
    assert info["usage_metadata"]["input_token_details"]["cache_read"] == anchors(store, passages[1:3])
    assert recorder.results[0].llm_output["token_usage"]["input_token_details"]["cache_read"] == info["cached_tokens"]


def test_an_extractive_chain_answers_with_a_span_of_the_retrieved_documents(engine, passages):
    question = {"input": "When was the lighthouse on Gull Point painted red?"}
    for llm in (ChatSAC(engine=engine, max_tokens=6, stop=[], extractive=True),
                SACLLM(engine=engine, max_tokens=6, stop=[], extractive=True)):
        result = retrieval_chain(engine, llm, passages).invoke(question)
        answer = result["answer"].strip()
        assert answer and any(answer in d.page_content for d in result["context"]), answer
    free = retrieval_chain(engine, ChatSAC(engine=engine, max_tokens=6, stop=[]), passages).invoke(question)
    assert not any(free["answer"].strip() in d.page_content for d in free["context"])  # the random model rambles


def test_beam_search_is_a_setting_of_the_model_and_of_each_call(engine, passages, monkeypatch):
    configs = []
    original = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch", lambda prompts, config=None, sources=None: (
        configs.append(config), original(prompts, config, sources))[1])
    question = {"input": "When was the lighthouse on Gull Point painted red?"}
    model_setting = retrieval_chain(engine, ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3), passages)
    call_setting = retrieval_chain(engine, ChatSAC(engine=engine, max_tokens=6, stop=[]).bind(num_beams=3), passages)
    assert model_setting.invoke(question)["answer"] == call_setting.invoke(question)["answer"]
    assert [c.num_beams for c in configs] == [3, 3]
    short = ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3, length_penalty=0.0)
    assert short.invoke("Hello").content == ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3).bind(
        length_penalty=0.0).invoke("Hello").content
    assert [c.length_penalty for c in configs[-2:]] == [0.0, 0.0]
    consensus = ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3, mbr=True)
    assert consensus.invoke("Hello").content == ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3).bind(
        mbr=True).invoke("Hello").content
    assert [c.mbr for c in configs[-2:]] == [True, True]
    beams = ChatSAC(engine=engine, max_tokens=6, stop=[], num_beams=3)
    pieces = [chunk.content for chunk in beams.stream("Hello") if chunk.content]  # the last chunk has the usage
    assert pieces == [beams.invoke("Hello").content]


def create_stuff_documents_chain_sac(llm):
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    return create_stuff_documents_chain(llm, sac_qa_prompt(), document_prompt=SAC_DOCUMENT_PROMPT,
                                        document_separator="")


def test_a_stuff_chain_for_a_bound_model_lays_out_the_prompt_as_its_compressor_was_trained(compressor, passages):
    """``llm.bind(num_beams=2)`` (a setting per call), ``with_config`` and ``with_retry`` wrap the
    model: the chain still reads the layout from the compressor behind it, not the default one."""
    from sac_rag.config import PromptTemplate

    compressor.config.prompt = PromptTemplate(context_prefix="Passages:\n", context_separator="\n",
                                              question="\nQ: {question}\nA:")
    engine = SACEngine(compressor)
    llm = ChatSAC(engine=engine, max_tokens=2, stop=[])
    docs = SACContextCompressor(engine=engine).compress_documents(documents(passages[:2]), "who?")
    recorder = Recorder()
    for model in (llm, llm.bind(num_beams=2), llm.with_config(run_name="answer"), llm.with_retry()):
        create_sac_stuff_chain(model).invoke({"context": docs, "question": "Who?"}, config={"callbacks": [recorder]})
    markers = [d.metadata["sac_marker"] for d in docs]
    assert recorder.prompts == ["Passages:\n" + "\n".join(markers) + "\nQ: Who?\nA:"] * 4


def test_a_stuff_chain_given_documents_without_handles_says_how_to_give_them_one(engine, passages):
    from langchain_core.prompts import PromptTemplate

    llm = ChatSAC(engine=engine, max_tokens=2)
    chain = create_sac_stuff_chain(llm)
    plain = documents(passages[:2])
    for call in (lambda: chain.invoke({"context": plain, "question": "Who?"}),
                 lambda: asyncio.run(chain.ainvoke({"context": plain, "question": "Who?"}))):
        with pytest.raises(InvalidInputError, match="2 of 2 documents have no SAC handle .* SACContextCompressor"):
            call()
    as_text = create_sac_stuff_chain(llm, document_prompt=PromptTemplate.from_template("{page_content}"))
    assert isinstance(as_text.invoke({"context": plain, "question": "Who?"}), str)  # the text itself: no handles


def test_batch_decodes_all_prompts_in_one_batch(engine, passages, monkeypatch):
    sizes = []
    original = engine.generator.generate_batch
    monkeypatch.setattr(engine.generator, "generate_batch", lambda prompts, config=None, sources=None: (
        sizes.append(len(prompts)), original(prompts, config, sources))[1])
    markers = [marker_for(AnchorStore.key_for(p)) for p in passages[:3]]
    prompts = [sac_qa_prompt().format(context=m, question="What is it?") for m in markers]
    results = SACLLM(engine=engine, max_tokens=3, stop=[]).batch(prompts)
    assert len(results) == 3 and sizes == [3]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_batch_returning_exceptions_gives_each_prompt_its_own_answer_or_error(engine, passages, asynchronous):
    """LangChain's BaseLLM.batch gives every input the error of one: here only the prompt too long
    for the model fails, and the others are answered as they are alone."""
    good = [sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(p)), question="What is it?")
            for p in passages[:2]]
    inputs = [good[0], "word " * 5000 + "\nQuestion: Why?\nAnswer:", good[1]]
    llm = SACLLM(engine=engine, max_tokens=3, stop=[])
    out = (asyncio.run(llm.abatch(inputs, return_exceptions=True)) if asynchronous
           else llm.batch(inputs, return_exceptions=True))
    assert isinstance(out[1], PromptTooLongError)
    assert [out[0], out[2]] == [llm.invoke(good[0]), llm.invoke(good[1])]
    with pytest.raises(PromptTooLongError):
        llm.batch(inputs)


# -- streaming and async ----------------------------------------------------------------------


def test_chat_streaming_yields_tokens_incrementally_then_usage(engine, passages, monkeypatch):
    decoded = []
    original = engine.generator._append
    monkeypatch.setattr(engine.generator, "_append", lambda *a: (decoded.append(1), original(*a))[1])
    prompt = sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(passages[0])), question="When?")
    recorder = Recorder()
    arrivals = [(len(decoded), chunk) for chunk in ChatSAC(engine=engine, max_tokens=12, stop=[]).stream(
        prompt, config={"callbacks": [recorder]})]

    texts = [(n, c.content) for n, c in arrivals if c.content]
    assert len(texts) >= 2
    assert texts[0][0] < len(decoded)  # the first piece arrived before decoding ended
    steps = [n for n, _ in texts]
    assert steps == sorted(steps) and len(set(steps)) >= 2  # pieces came out step by step, as decoded
    assert [t for t in recorder.tokens if t] == [t for _, t in texts]  # on_llm_new_token saw each piece
    last = arrivals[-1][1]
    assert last.chunk_position == "last" and last.usage_metadata["input_token_details"]["cache_read"] > 0


def test_a_stream_argument_in_a_call_picks_the_streaming_path_and_is_not_refused(engine, passages):
    """``BaseChatModel`` reads ``stream=True``/``False`` in a call to choose ``_stream`` or
    ``_generate``, then passes it on to the one it chose."""
    prompt = sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(passages[0])), question="When?")
    llm = ChatSAC(engine=engine, max_tokens=5, stop=[])
    expected = llm.invoke(prompt).content
    streamed, generated = Recorder(), Recorder()
    assert llm.invoke(prompt, stream=True, config={"callbacks": [streamed]}).content == expected
    assert ChatSAC(engine=engine, max_tokens=5, stop=[], streaming=True).invoke(
        prompt, stream=False, config={"callbacks": [generated]}).content == expected
    assert "".join(streamed.tokens) == expected and generated.tokens == []
    assert asyncio.run(llm.bind(stream=True).ainvoke(prompt)).content == expected


def test_text_llm_streams_sync_and_async(engine, passages):
    llm = SACLLM(engine=engine, max_tokens=8, stop=[])
    prompt = sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(passages[2])), question="When?")
    pieces = list(llm.stream(prompt))

    async def collect():
        return [piece async for piece in llm.astream(prompt)]

    assert len([p for p in pieces if p]) >= 2
    assert "".join(asyncio.run(collect())) == "".join(pieces) == llm.invoke(prompt)


def test_two_async_queries_overlap_in_time(engine, passages):
    chain = retrieval_chain(engine, ChatSAC(engine=engine, max_tokens=16, stop=[]), passages)
    spans: dict[str, tuple[float, float]] = {}
    ticks = 0

    async def ask(name, question):
        start = time.perf_counter()
        result = await chain.ainvoke({"input": question})
        spans[name] = (start, time.perf_counter())
        return result

    async def ticker(done):
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def main():
        done = asyncio.Event()
        tick = asyncio.create_task(ticker(done))
        results = await asyncio.gather(ask("a", "Who keeps bees behind the mill?"),
                                       ask("b", "When does the river ferry stop?"))
        done.set()
        await tick
        return results

    results = asyncio.run(main())
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, spans  # each started before the other finished
    assert ticks >= 2  # and the event loop kept running meanwhile
    assert all(r["context"] for r in results)


# -- handles that must not load ------------------------------------------------------------------


def test_fake_handle_in_the_question_stays_text_and_loads_nothing(engine, store, passages, monkeypatch,
                                                                 count_text_tokens):
    loaded = []
    original = store.get_many
    monkeypatch.setattr(store, "get_many", lambda keys: (loaded.extend(keys), original(keys))[1])
    never_stored = AnchorStore.key_for("a chunk nobody stored")
    question = (f"Is {marker_for(never_stored)} the bees' mill, or <sac:{'F' * 64}> or <sac:../../etc>?")
    recorder = Recorder()
    llm = ChatSAC(engine=engine, max_tokens=3, stop=[])
    result = retrieval_chain(engine, llm, passages, k=1).invoke({"input": question}, config={"callbacks": [recorder]})

    [doc] = result["context"]
    assert loaded == [doc.metadata["sac_key"]]  # the retrieved chunk, and nothing else
    [prompt] = recorder.prompts
    assert marker_for(never_stored) in prompt
    usage = recorder.results[0].generations[0][0].message.usage_metadata
    assert usage["input_token_details"]["cache_read"] == anchors(store, [doc.page_content])
    assert usage["input_tokens"] - usage["input_token_details"]["cache_read"] == count_text_tokens(engine, prompt)
    assert not engine.resolver.memory


# -- long documents -------------------------------------------------------------------------------


def test_a_document_longer_than_one_chunk_gets_the_markers_of_all_its_chunks(tmp_path, compressor_factory,
                                                                             store_factory, passages):
    compressor = compressor_factory(chunk_len=16)
    engine = SACEngine(compressor, store_factory(tmp_path / "store", compressor, []))
    text = " ".join(passages)
    [doc] = SACContextCompressor(engine=engine, write_back=True).compress_documents(
        [Document(page_content=text, id="long")], "what is in it?")

    chunks = split_document(text, compressor.tokenizer, 16)  # what sac_rag.precompress would store
    assert len(chunks) > 1
    assert doc.metadata["sac_keys"] == [c.key for c in chunks]
    assert doc.metadata["sac_marker"] == "".join(marker_for(c.key) for c in chunks)
    assert doc.metadata["sac_key"] == AnchorStore.key_for(text) and doc.page_content == text
    assert all(c.key in engine.store for c in chunks)

    generation = engine.generate([sac_qa_prompt().format(context=doc.metadata["sac_marker"], question="What?")])[0]
    assert generation.context_tokens == sum(c.n_tokens for c in chunks)  # read back to back, whole
    assert generation.cached_tokens == sum(engine.store.get(c.key).n_anchors for c in chunks)


# -- bad input ------------------------------------------------------------------------------------


def test_no_documents_retrieved_answers_without_context(engine, passages, caplog):
    recorder = Recorder()
    llm = ChatSAC(engine=engine, max_tokens=3, stop=[])
    result = retrieval_chain(engine, llm, passages).invoke({"input": "xylophone quartz"},
                                                           config={"callbacks": [recorder]})
    assert result["context"] == [] and isinstance(result["answer"], str)
    assert recorder.results[0].generations[0][0].message.usage_metadata["input_token_details"]["cache_read"] == 0
    with caplog.at_level(logging.WARNING):  # called directly (the retriever skips it for no documents)
        assert SACContextCompressor(engine=engine).compress_documents([], "xylophone quartz?") == []
    assert "no documents retrieved" in caplog.text


def test_missing_document_without_write_back_is_compressed_into_memory(engine, store):
    new = Document(page_content="Snow closed the pass for three weeks in March.")
    [doc] = SACContextCompressor(engine=engine).compress_documents([new], "when was the pass closed?")
    key = doc.metadata["sac_key"]
    assert key not in store and key in engine.resolver.memory
    generation = engine.generate([sac_qa_prompt().format(context=doc.metadata["sac_marker"], question="When?")])[0]
    assert generation.cached_tokens == engine.resolver.memory[key].n_anchors > 0


def test_documents_cut_another_way_than_the_store_are_compressed_with_a_warning_counting_them(
        engine, store, passages, caplog):
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    split = RecursiveCharacterTextSplitter(chunk_size=40, chunk_overlap=0).split_documents(documents(passages[:2]))
    assert len(split) > 2
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        SACContextCompressor(engine=engine).compress_documents(split, "when was it painted?")
    assert f"{len(split)} of {len(split)} retrieved texts were not in the store at {store.path}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        SACContextCompressor(engine=engine).compress_documents(documents(passages), "when was it painted?")
    assert caplog.records == []  # the store's own chunks: all served from it


def test_missing_document_with_write_back_is_stored(engine, store):
    new = Document(page_content="The orchard's oldest pear tree was planted in 1911.", metadata={"when": object()})
    [doc] = SACContextCompressor(engine=engine, write_back=True).compress_documents([new], "how old is the tree?")
    key = doc.metadata["sac_key"]
    assert key in store and not engine.resolver.memory
    assert store.metadata(key)["text"] == new.page_content  # like a precompressed entry


def test_missing_document_with_on_miss_text_passes_through_uncompressed_with_a_warning(engine, store, caplog):
    new = Document(page_content="Foxes were seen near the quarry at dawn.")
    with caplog.at_level(logging.WARNING):
        [doc] = SACContextCompressor(engine=engine, on_miss="text").compress_documents([new], "what was seen?")
    assert doc.metadata["sac_marker"] == new.page_content and doc.metadata["sac_keys"] == []
    assert "uncompressed" in caplog.text and doc.metadata["sac_key"] not in store
    generation = engine.generate([sac_qa_prompt().format(context=doc.metadata["sac_marker"], question="What?")])[0]
    assert generation.cached_tokens == 0


def test_a_passed_through_document_that_quotes_a_stored_chunks_marker_stays_text(engine, store, passages):
    from sac_rag.handles import markers_for

    quoting = Document(page_content=f"Someone pasted {markers_for([AnchorStore.key_for(passages[0])])} here.")
    [doc] = SACContextCompressor(engine=engine, on_miss="text").compress_documents([quoting], "what?")
    generation = engine.generate([sac_qa_prompt().format(context=doc.metadata["sac_marker"], question="What?")])[0]
    assert generation.cached_tokens == 0  # the stored chunk is not spliced in


def test_missing_document_with_on_miss_error_raises_a_clear_error(engine):
    new = Document(page_content="The choir rehearses on Thursdays.")
    with pytest.raises(EntryNotFoundError, match="precompress"):
        SACContextCompressor(engine=engine, on_miss="error").compress_documents([new], "when?")


def test_store_built_for_another_model_is_refused(tmp_path, compressor, compressor_factory, store_factory, passages):
    other = store_factory(tmp_path / "other", compressor_factory(seed=1), passages[:1])
    other.close()
    docs = documents(passages[:1])
    with pytest.raises(FingerprintMismatchError, match="Rebuild the store"):
        SACContextCompressor(compressor=compressor, store=tmp_path / "other").compress_documents(docs, "when?")
    with pytest.raises(FingerprintMismatchError):
        ChatSAC(engine=SACEngine(compressor, tmp_path / "other")).invoke("hi")


def test_empty_question_is_refused(engine, passages):
    with pytest.raises(InvalidInputError, match="question is empty"):
        SACContextCompressor(engine=engine).compress_documents(documents(passages), "   ")
    with pytest.raises(InvalidInputError, match="empty"):
        ChatSAC(engine=engine).invoke("")
    with pytest.raises(InvalidInputError, match="empty"):
        SACLLM(engine=engine).invoke("  ")


def test_prompt_longer_than_the_model_context_is_refused(engine):
    with pytest.raises(PromptError, match="positions"):
        ChatSAC(engine=engine, max_tokens=2).invoke("lighthouse " * 5000)


@pytest.mark.parametrize("chat_template", [False, "sac", None])
def test_trim_messages_with_the_model_as_counter_keeps_a_conversation_within_the_model(
        engine, store, passages, monkeypatch, chat_template):
    """LangChain counts tokens with GPT-2's tokenizer unless a model says otherwise; SAC models
    count the positions the model reads, a marker as the tokens of its chunk."""
    import transformers
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

    def no_gpt2(*args, **kwargs):
        raise AssertionError("counted with GPT-2's tokenizer")

    monkeypatch.setattr(transformers.GPT2TokenizerFast, "from_pretrained", no_gpt2)
    chat = ChatSAC(engine=engine, max_tokens=2, chat_template=chat_template)
    marker = marker_for(AnchorStore.key_for(passages[0]))
    limit = chat.max_positions
    assert limit == engine.generator.max_positions == 4096
    turn = "When was the lighthouse painted red? " + "lighthouse " * 70
    history = [SystemMessage(content=marker)]
    for _ in range(12):
        history += [HumanMessage(content=turn), AIMessage(content="In 1874.")]
    with pytest.raises(PromptError, match="positions.*the earlier turns are read too.*trim_messages"):
        chat.invoke(history + [HumanMessage(content=turn)])
    kept = trim_messages(history, max_tokens=limit // 2, token_counter=chat, strategy="last",
                         include_system=True, start_on="human")
    assert kept[0] == history[0] and kept[-1] == history[-1] and len(kept) < len(history)
    one_turn_more = kept[:1] + history[-len(kept) - 1:]
    assert chat.get_num_tokens_from_messages(kept) <= limit // 2 < chat.get_num_tokens_from_messages(one_turn_more)
    chunk_tokens = store.get(AnchorStore.key_for(passages[0])).n_tokens
    assert chat.get_num_tokens(marker) == engine.count_positions(marker) == chunk_tokens
    assert isinstance(chat.invoke(kept + [HumanMessage(content=turn)]).content, str)  # fits now
    assert SACLLM(engine=engine).get_token_ids("lighthouse") == engine.compressor.tokenizer.encode(
        "lighthouse", add_special_tokens=False)


def test_messages_naming_no_compressed_context_are_read_in_the_base_models_chat_template(
        engine, passages, monkeypatch):
    """A history-aware retriever asks the model to rewrite the follow-up question, in messages that
    name no compressed context: the base model answers them, in its own chat template (by default,
    when its tokenizer has one), while the answer, which reads the documents' caches, stays in the
    layout the compressor was trained with. ``chat_template=False`` or ``"sac"`` keep their layouts."""
    from langchain_classic.chains import create_history_aware_retriever
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

    class FirstDocuments(KeywordRetriever):  # whatever the (random) model's rewrite says
        def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
            return self.documents[: self.k]

    engine.compressor.tokenizer.chat_template = CHATML  # the tiny tokenizer has none
    prompts = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda batch, config=None: prompts.extend(batch) or generate(batch, config))
    rewrite = ChatPromptTemplate.from_messages([("system", "Rewrite the last question so that it stands alone."),
                                                MessagesPlaceholder("chat_history"), ("human", "{input}")])
    llm = ChatSAC(engine=engine, max_tokens=4, stop=[])
    compressing = ContextualCompressionRetriever(base_compressor=SACContextCompressor(engine=engine),
                                                 base_retriever=FirstDocuments(documents=documents(passages), k=2))
    chain = create_retrieval_chain(create_history_aware_retriever(llm, compressing, rewrite),
                                   create_sac_stuff_chain(llm, sac_qa_prompt(question_key="input")))
    history = [("human", "When was the lighthouse on Gull Point built?"), ("ai", "1874")]
    chain.invoke({"input": "And when was it painted red?", "chat_history": history})
    assert prompts[0] == (
        "<|im_start|>system\nRewrite the last question so that it stands alone.<|im_end|>\n"
        "<|im_start|>user\nWhen was the lighthouse on Gull Point built?<|im_end|>\n<|im_start|>assistant\n1874"
        "<|im_end|>\n<|im_start|>user\nAnd when was it painted red?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[-1].startswith("### Context:\n<sac:") and prompts[-1].endswith(
        "### Question:\nAnd when was it painted red?\n### Answer:\n")
    bare = [HumanMessage("What is 2+2?")]
    assert llm.render(bare) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert ChatSAC(engine=engine, chat_template=False).render(bare) == "What is 2+2?"
    asked = [SystemMessage("Be brief."), HumanMessage("Who?")]
    assert ChatSAC(engine=engine, chat_template="sac").render(asked) == engine.template.conversation(
        [("system", "Be brief."), ("user", "Who?")])
    engine.compressor.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    assert llm.render(asked) == engine.template.conversation([("system", "Be brief."), ("user", "Who?")])


# -- LLM cache key, model names, serialization ---------------------------------------------------

CACHE_PROMPT = "### Context:\nThe ferry runs every forty minutes.\n### Question:\nHow often?\n### Answer:\n"


@pytest.mark.parametrize("chat_template", ["sac", None])
def test_a_conversation_is_read_in_the_layout_the_compressor_was_trained_with(
        engine, passages, monkeypatch, chat_template):
    """A chain with history puts the documents' markers in a system message, then the turns: with
    ``chat_template="sac"`` (and by default, for anything but one human message) the model reads them as
    contexts, then each question with its answer, so the first question reads exactly what
    ``create_sac_stuff_chain`` sends (one human message, read as written)."""
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

    prompts = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda batch, config=None: prompts.extend(batch) or generate(batch, config))
    question = "When was the lighthouse on Gull Point painted red?"
    reference = retrieval_chain(engine, ChatSAC(engine=engine, max_tokens=6), passages).invoke({"input": question})
    with_history = ChatPromptTemplate.from_messages(
        [("system", "{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")])
    llm = ChatSAC(engine=engine, max_tokens=6, chat_template=chat_template)
    retriever = ContextualCompressionRetriever(base_compressor=SACContextCompressor(engine=engine),
                                               base_retriever=KeywordRetriever(documents=documents(passages), k=2))
    chain = create_retrieval_chain(retriever, create_stuff_documents_chain(
        llm, with_history, document_prompt=SAC_DOCUMENT_PROMPT, document_separator=""))
    first = chain.invoke({"input": question, "chat_history": []})
    assert prompts[1] == prompts[0] and first["answer"] == reference["answer"]
    chain.invoke({"input": "And who painted it?", "chat_history": [("human", question), ("ai", first["answer"])]})
    ask = engine.template.question.format
    assert prompts[-1].endswith(ask(question=question) + first["answer"] + ask(question="And who painted it?"))
    contexts = prompts[-1][: prompts[-1].index(ask(question=question))]
    assert re.fullmatch(r"### Context:\n(<sac:[0-9a-f]{64}>)+", contexts)
    with pytest.raises(InvalidInputError, match="no question"):
        llm.invoke([("system", "context only")])
    from langchain_core.messages import HumanMessage, SystemMessage

    as_written = ChatSAC(engine=engine, chat_template=False).render([SystemMessage("<m>"), HumanMessage("Who?")])
    assert as_written == "<m>\nWho?"  # the messages' texts one after the other: not the trained layout


@pytest.mark.parametrize("chat_template", ["sac", None, True])
def test_a_streamed_answer_kept_in_the_history_is_read_as_the_answer_it_is(engine, passages, chat_template):
    """A chat that streams keeps each answer as its chunks added up, an ``AIMessageChunk`` (whose
    ``type`` is its class name, not ``"ai"``), and a ``ChatMessage`` carries its role in ``role``: both
    are read as the turns they are, as ``AIMessage`` and ``HumanMessage`` are, not as context."""
    import functools
    import operator

    from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage

    engine.compressor.tokenizer.chat_template = CHATML  # the tiny tokenizer has none
    llm = ChatSAC(engine=engine, max_tokens=4, stop=[], chat_template=chat_template)
    context = SystemMessage(marker_for(AnchorStore.key_for(passages[0])))
    question, follow_up = HumanMessage("When was the lighthouse built?"), HumanMessage("Who painted it?")
    streamed = functools.reduce(operator.add, llm.stream([context, question]))
    assert isinstance(streamed, AIMessageChunk) and streamed.content
    written = llm.render([context, question, AIMessage(streamed.content), follow_up])
    assert llm.render([context, question, streamed, follow_up]) == written
    assert llm.render([ChatMessage(role=m.type, content=m.content) for m in (context, question)]
                      + [ChatMessage(role="assistant", content=streamed.content),
                         ChatMessage(role="user", content=follow_up.content)]) == written
    if chat_template == "sac":
        ask = engine.template.question.format
        assert written.endswith(ask(question=question.content) + streamed.content + ask(question=follow_up.content))


@pytest.fixture
def llm_cache():
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    previous, cache = get_llm_cache(), InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(previous)


def _cache_key(llm) -> str:
    if isinstance(llm, ChatSAC):
        return llm._get_llm_string()
    return str(sorted({**llm._dict_for_compat(), "stop": None}.items()))  # what BaseLLM.generate keys by


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_llm_cache_is_not_shared_by_models_with_other_compressors_or_settings(cls, llm_cache, compressor,
                                                                              compressor_factory, monkeypatch):
    e0, e1 = SACEngine(compressor), SACEngine(compressor_factory(1))
    c0, c1 = (record_engine_calls(e, monkeypatch, names=("generate",)) for e in (e0, e1))
    text = (lambda r: r.content) if cls is ChatSAC else (lambda r: r)
    first = text(cls(engine=e0, max_tokens=6).invoke(CACHE_PROMPT))
    assert text(cls(engine=e0, max_tokens=6).invoke(CACHE_PROMPT)) == first and len(c0) == 1  # same model: a hit
    other = text(cls(engine=e1, max_tokens=6).invoke(CACHE_PROMPT))
    assert len(c1) == 1  # another compressor behind engine=: decoded, not the cached answer
    assert other == e1.generate([CACHE_PROMPT], prompt_configs(c1)[0])[0].text
    variants = [dict(num_beams=2), dict(extractive=True), dict(top_k=5, temperature=0.5, seed=1),
                dict(top_p=0.5, temperature=0.5, seed=1), dict(length_penalty=0.0, num_beams=2),
                dict(mbr=True, num_beams=2), dict(seed=3, temperature=0.7)]
    if cls is ChatSAC:
        variants += [dict(chat_template=True), dict(chat_template="sac"), dict(chat_template=False)]
    keys = {_cache_key(cls(engine=e0, max_tokens=6, **v)) for v in variants}
    keys |= {_cache_key(cls(engine=e0, max_tokens=6)), _cache_key(cls(engine=e1, max_tokens=6))}
    assert len(keys) == len(variants) + 2
    assert cls(engine=e0, max_tokens=6).invoke(CACHE_PROMPT, num_beams=2) is not None
    assert len(c0) == 2 and prompt_configs(c0)[-1].num_beams == 2  # a per-call setting is part of the key too


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_a_model_left_on_default_decoding_answers_as_its_compressor_recommends(cls, tmp_path, compressor, llm_cache,
                                                                                 monkeypatch):
    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    path = str(compressor.save_pretrained(tmp_path / "ckpt"))
    llm = cls(compressor=path, max_tokens=6, stop=[])
    config = llm.generation_config()
    assert (config.num_beams, config.mbr, config.max_new_tokens) == (3, True, 6) and not llm.get_engine().loaded
    # What the model or the call chooses wins; the recommendation fills the rest where it combines with it.
    chosen = [cls(compressor=path, num_beams=2).generation_config(), llm.generation_config(num_beams=1),
              cls(compressor=path, extractive=True).generation_config(), llm.generation_config(temperature=0.5),
              cls(compressor=path, extractive=False, temperature=0.0).generation_config()]
    assert [(c.num_beams, c.mbr, c.extractive, c.temperature) for c in chosen] == [
        (2, True, False, 0.0), (1, False, False, 0.0), (1, False, True, 0.0), (1, False, False, 0.5),
        (3, True, False, 0.0)]
    # Cached answers are keyed by the decoding used, not by the model's fields, which do not say it.
    assert _cache_key(cls(compressor=path)) != _cache_key(cls(compressor=path, num_beams=1))
    assert _cache_key(cls(compressor=path)) == _cache_key(cls(compressor=path, extractive=False, temperature=0.0))
    # The recommendation chosen as settings decodes prompts without compressed contexts by it too, not greedily.
    assert _cache_key(cls(compressor=path)) != _cache_key(cls(compressor=path, num_beams=3, mbr=True))
    engine = SACEngine(compressor)  # the same compressor, loaded (the tiny model has no directory to load from)
    llm = cls(engine=engine, max_tokens=6, stop=[])
    [keys] = engine.handles_for(["The ferry runs every forty minutes."])
    prompt = f"### Context:\n{markers_for(keys)}\n### Question:\nHow often?\n### Answer:\n"
    calls = record_engine_calls(engine, monkeypatch, names=("generate",))
    text = (lambda r: r.content) if cls is ChatSAC else (lambda r: r)
    recommended = text(llm.invoke(prompt))
    greedy = text(llm.invoke(prompt, num_beams=1))  # decoded again, not the cached answer
    text(llm.invoke(CACHE_PROMPT))  # no compressed context: greedy (the recommendation was measured on caches)
    configs = prompt_configs(calls)
    assert [(c.num_beams, c.mbr) for c in configs] == [(3, True), (1, False), (1, False)]
    assert recommended == engine.generate([prompt], configs[0])[0].text
    assert greedy == engine.generate([prompt], configs[1])[0].text
    if cls is SACLLM:  # a batch mixing both (prompts not asked before: no cached answers): each its own way
        del calls[:]
        plain, cached = (p.replace("How often?", "How often does it run?") for p in (CACHE_PROMPT, prompt))
        batch = [g[0].text for g in llm.generate([plain, cached]).generations]
        configs = prompt_configs(calls)
        assert [(c.num_beams, c.mbr) for c in configs] == [(1, False), (3, True)]
        assert batch == [engine.generate([plain], configs[0])[0].text, engine.generate([cached], configs[1])[0].text]


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_a_cached_answer_without_context_is_not_served_to_a_model_that_decodes_such_prompts_otherwise(
        cls, compressor, llm_cache, monkeypatch):
    """Left on defaults, a model decodes a prompt that reads no compressed context (a question rewrite,
    say) greedily; one given the recommended decoding as its settings decodes it so. They answer
    prompts with contexts alike, but the LLM cache's key does not see the prompt's kind."""
    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    engine = SACEngine(compressor)
    calls = record_engine_calls(engine, monkeypatch, names=("generate",))
    text = (lambda r: r.content) if cls is ChatSAC else (lambda r: r)
    text(cls(engine=engine, max_tokens=6, stop=[]).invoke(CACHE_PROMPT))
    chosen = text(cls(engine=engine, max_tokens=6, stop=[], num_beams=3, mbr=True).invoke(CACHE_PROMPT))
    configs = prompt_configs(calls)
    assert [(c.num_beams, c.mbr) for c in configs] == [(1, False), (3, True)]  # decoded again, its own way
    assert chosen == engine.generate([CACHE_PROMPT], configs[1])[0].text


def test_cache_key_has_the_checkpoint_fingerprint_without_loading(tmp_path, compressor):
    compressor.save_pretrained(tmp_path / "ckpt")
    llm = ChatSAC(compressor=str(tmp_path / "ckpt"), store=str(tmp_path / "s"))
    params = llm._identifying_params
    assert params["compressor_fingerprint"] == compressor.fingerprint
    assert params["store"] == str(tmp_path / "s") and not llm.get_engine().loaded


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_model_name_with_an_engine_is_the_engines_compressor(cls, compressor):
    llm = cls(engine=SACEngine(compressor), max_tokens=2)
    assert llm.model_name == "sac:tiny-llama-0"
    assert llm._get_ls_params()["ls_model_name"] == "sac:tiny-llama-0"
    if cls is ChatSAC:
        assert llm.invoke("hi").response_metadata["model_name"] == "sac:tiny-llama-0"
    llm.invoke("hi", model="sac:tiny-llama-0")
    with pytest.raises(InvalidInputError, match="serves 'sac:tiny-llama-0'"):
        llm.invoke("hi", model="smollm2-135m-sac-5x")


def test_unknown_call_argument_names_the_accepted_ones(compressor):
    with pytest.raises(InvalidInputError, match="accepted: .*num_beams"):
        ChatSAC(engine=SACEngine(compressor)).invoke("hi", bogus=3)


@pytest.mark.parametrize("cls, option", [(ChatSAC, {"num_beam": 4}), (SACLLM, {"extractve": True}),
                                         (SACContextCompressor, {"onmiss": "error"})])
def test_a_misspelled_option_is_refused_not_ignored(cls, option):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"{next(iter(option))}\n  Extra inputs are not permitted"):
        cls(**option)


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_langchains_standard_remote_parameters_are_accepted_and_unused(cls):
    model = cls(timeout=60, max_retries=2, api_key="unused", base_url="http://unused", max_tokens=3)
    assert model.max_tokens == 3 and not hasattr(model, "api_key")


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_decoding_settings_that_cannot_be_used_together_are_refused_when_the_model_is_built(cls):
    with pytest.raises(InvalidInputError, match="beam search"):
        cls(compressor="not loaded", extractive=True, num_beams=4)
    with pytest.raises(InvalidInputError, match="top_p"):
        cls(compressor="not loaded", top_p=0.0)
    assert cls(compressor="not loaded", num_beams=4).num_beams == 4  # nothing loaded to check it


def test_models_with_objects_dump_to_json_as_names(compressor, store):
    for obj in (ChatSAC(compressor=compressor, store=store), SACLLM(compressor=compressor, store=store),
                SACContextCompressor(compressor=compressor, store=store)):
        dumped = json.loads(obj.model_dump_json())
        assert dumped["compressor"] == "sac:tiny-llama-0" and dumped["store"] == str(store.path)


# -- LangChain serialization (dumpd / load) -----------------------------------------------------


def _round_trip(obj):
    record = dumpd(obj)
    assert json.loads(json.dumps(record)) == record and record["type"] == "constructor"
    assert record["id"][0] == "langchain_sac" and "engine" not in record["kwargs"]
    return load(record, allowed_objects=[type(obj)], valid_namespaces=["langchain_sac"])


def test_dumpd_gives_a_constructor_record_that_load_rebuilds_without_loading_weights(tmp_path, store):
    objects = [
        ChatSAC(model="smollm2-135m-sac-5x", store=tmp_path / "corpus.store", dtype="float32", max_tokens=7,
                stop=["\n"], num_beams=2, length_penalty=0.5, mbr=True, chat_template=True),
        SACLLM(compressor="smollm2-135m-sac-5x", store=store, extractive=True, temperature=0.5, top_k=5, seed=3),
        SACContextCompressor(compressor="smollm2-135m-sac-5x", store=str(tmp_path / "s"), write_back=True,
                             on_miss="text"),
    ]
    for obj in objects:
        loaded = _round_trip(obj)
        assert type(loaded) is type(obj) and loaded.model_dump() == obj.model_dump()
        assert loaded.engine is None and not loaded.get_engine().loaded
    assert _round_trip(objects[1]).store == str(store.path)  # an open store is recorded as its directory


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM])
def test_a_record_holds_only_the_settings_given_so_the_loaded_model_decodes_as_recommended(cls, store):
    """LangChain's record would also hold every truthy default (num_beams=1, top_p=1.0), which load
    passes as given: the loaded model then decoded greedily instead of as the compressor recommends."""
    model = cls(compressor="smollm2-135m-sac-5x", store=store, max_tokens=16)
    assert model.generation_config().num_beams == 8  # the shipped compressor's recommendation
    record = dumpd(model)
    assert set(record["kwargs"]) == {"compressor", "store", "max_tokens"}
    loaded = _round_trip(model)
    assert loaded.generation_config() == model.generation_config()
    assert loaded._identifying_params == model._identifying_params  # the LLM-cache key


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM, SACContextCompressor])
def test_a_record_made_with_an_engine_names_its_settings_and_loads_the_shared_engine_for_them(cls, tmp_path):
    engine = SACEngine("smollm2-135m-sac-5x", tmp_path / "s", dtype="float32", memory_bytes=1 << 20)
    loaded = _round_trip(cls(engine=engine))
    assert (loaded.compressor, loaded.store, loaded.dtype) == ("smollm2-135m-sac-5x", str(tmp_path / "s"), "float32")
    assert loaded.get_engine() is SACEngine.shared("smollm2-135m-sac-5x", tmp_path / "s", dtype="float32")


@pytest.mark.parametrize("cls", [ChatSAC, SACLLM, SACContextCompressor])
def test_a_loaded_compressor_is_recorded_as_a_stub_that_load_refuses(cls, compressor, store):
    for obj in (cls(compressor=compressor, store=store), cls(engine=SACEngine(compressor, store))):
        record = dumpd(obj)
        stub = record["kwargs"]["compressor"]
        assert stub["type"] == "not_implemented" and stub["id"][-1] == "SACCompressor"
        assert stub["repr"] == "sac:tiny-llama-0" and record["kwargs"]["store"] == str(store.path)
        with pytest.raises(NotImplementedError, match="doesn't implement serialization"):
            load(record, allowed_objects=[cls], valid_namespaces=["langchain_sac"])


def _call(compressor, docs, query, asynchronous):
    if asynchronous:
        return asyncio.run(compressor.acompress_documents(docs, query))
    return compressor.compress_documents(docs, query)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_write_back_stores_a_new_document_with_its_source_metadata_in_both_paths(engine, store, asynchronous):
    """A written-back chunk cites its document like a precompressed one: the store entry keeps
    the document's metadata, whether the chain ran sync or async."""
    new = Document(page_content="The orchard's oldest pear tree was planted in 1921.",
                   metadata={"source": "orchard.txt", "page": 3})
    [doc] = _call(SACContextCompressor(engine=engine, write_back=True), [new], "how old is the tree?", asynchronous)
    key = doc.metadata["sac_key"]
    assert key in store
    assert store.metadata(key)["doc"] == {"source": "orchard.txt", "page": 3}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_on_miss_is_honoured_by_the_async_path_too(engine, asynchronous):
    """on_miss="error" raises, on_miss="text" passes the text through, in ainvoke chains as in invoke ones."""
    new = Document(page_content="Snow closed the pass for three weeks in March.")
    with pytest.raises(EntryNotFoundError):
        _call(SACContextCompressor(engine=engine, on_miss="error"), [new], "when?", asynchronous)
    [doc] = _call(SACContextCompressor(engine=engine, on_miss="text"), [new], "when?", asynchronous)
    assert doc.metadata["sac_keys"] == [] and doc.metadata["sac_marker"] == new.page_content
    assert doc.metadata["sac_key"] not in engine.resolver.memory


def _stop_inside(text):
    """A stop string that occurs in ``text`` after its start, and the text before its first occurrence."""
    i = max(1, len(text) // 2)
    stop = text[i:i + 3]
    assert stop.strip(), text
    return stop, text[:text.index(stop)]


@pytest.mark.parametrize("cls", ["ChatSAC", "SACLLM"])
def test_a_per_call_stop_cuts_invoke_stream_and_astream_alike(engine, passages, cls):
    """``llm.stream(prompt, stop=[...])`` / ``astream`` stop where ``invoke(prompt, stop=[...])`` does."""
    import langchain_sac


    llm = getattr(langchain_sac, cls)(engine=engine, max_tokens=24, stop=[])

    def text(reply):
        return getattr(reply, "content", reply)

    prompt = sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(passages[0])), question="When?")
    full = text(llm.invoke(prompt))
    stop, before = _stop_inside(full)
    assert text(llm.invoke(prompt, stop=[stop])) == before

    async def collect():
        return "".join([text(c) async for c in llm.astream(prompt, stop=[stop])])

    assert "".join(text(c) for c in llm.stream(prompt, stop=[stop])) == before
    assert asyncio.run(collect()) == before


@pytest.mark.parametrize("cls", ["ChatSAC", "SACLLM"])
def test_sync_async_and_streamed_calls_decode_each_kind_of_prompt_alike(cls, compressor, monkeypatch):
    """A prompt without compressed contexts (a question rewrite) is decoded greedily, one with them
    as the compressor recommends - by invoke, ainvoke, stream and astream alike."""
    import langchain_sac


    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    engine = SACEngine(compressor)
    [keys] = engine.handles_for(["The ferry runs every forty minutes."])
    llm = getattr(langchain_sac, cls)(engine=engine, max_tokens=4, stop=[])
    calls = record_engine_calls(engine, monkeypatch)

    async def consume(prompt):
        await llm.ainvoke(prompt)
        return [c async for c in llm.astream(prompt)]

    with_caches = f"### Context:\n{markers_for(keys)}\n### Question:\nHow often?\n### Answer:\n"
    for prompt, expected in (("### Question:\nWhat is 2+2?\n### Answer:\n", (1, False)), (with_caches, (3, True))):
        del calls[:]
        llm.invoke(prompt)
        list(llm.stream(prompt))
        asyncio.run(consume(prompt))
        assert decodings(calls) == [expected] * 4, (prompt, calls)


def test_a_batchs_token_usage_sums_every_prompts_cache_reads(engine, passages):
    """``llm_output["token_usage"]`` is the batch's total."""


    prompts = [sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(p)), question="What?")
               for p in passages[:3]]
    result = SACLLM(engine=engine, max_tokens=2, stop=[]).generate(prompts)
    infos = [g[0].generation_info for g in result.generations]
    total = result.llm_output["token_usage"]
    assert total["input_token_details"]["cache_read"] == sum(i["cached_tokens"] for i in infos) > 0
    assert total["input_tokens"] == sum(i["usage_metadata"]["input_tokens"] for i in infos)


@pytest.mark.parametrize("cls", ["ChatSAC", "SACLLM"])
def test_models_with_other_stop_strings_do_not_share_cached_answers(engine, cls):
    """With an LLM cache set, ``stop`` decides the answer, so it is in the cache key."""
    import langchain_sac

    model = getattr(langchain_sac, cls)
    assert _cache_key(model(engine=engine, stop=[])) != _cache_key(model(engine=engine, stop=["."]))


def test_a_stuff_chain_for_a_model_wrapped_twice_still_reads_its_compressors_layout(compressor, passages):
    """``llm.bind(...).with_retry()`` nests two bindings."""

    from sac_rag.config import PromptTemplate

    compressor.config.prompt = PromptTemplate(context_prefix="Passages:\n", context_separator="\n",
                                              question="\nQ: {question}\nA:")
    engine = SACEngine(compressor)
    llm = ChatSAC(engine=engine, max_tokens=2, stop=[])
    docs = SACContextCompressor(engine=engine).compress_documents(
        [Document(page_content=p) for p in passages[:2]], "who?")
    prompts = []
    original = engine.generate
    engine.generate = lambda ps, config: (prompts.extend(ps), original(ps, config))[1]
    create_sac_stuff_chain(llm.bind(num_beams=2).with_retry()).invoke(
        {"context": docs, "question": "Who?"})
    assert prompts == ["Passages:\n" + "\n".join(d.metadata["sac_marker"] for d in docs) + "\nQ: Who?\nA:"]


def test_an_async_call_with_other_decoding_arguments_is_not_served_a_cached_answer(engine, passages, monkeypatch,
                                                                                   llm_cache):
    """With an LLM cache, ``ainvoke(p, num_beams=2)`` after ``ainvoke(p)`` decodes again, as ``invoke``
    does."""
    calls = record_engine_calls(engine, monkeypatch, ("agenerate",))
    prompt = sac_qa_prompt().format(context=marker_for(AnchorStore.key_for(passages[0])), question="When?")
    llm = SACLLM(engine=engine, max_tokens=3, stop=[])

    async def ask():
        await llm.ainvoke(prompt)
        await llm.ainvoke(prompt)  # cached
        await llm.ainvoke(prompt, num_beams=2)  # another decoding: not the cached answer

    asyncio.run(ask())
    assert [beams for beams, _ in decodings(calls)] == [1, 2]


def test_a_message_given_as_text_blocks_is_read_as_its_blocks_run_together(engine, passages):
    """Content given as a list of text blocks (plain strings or ``{"type": "text"}`` dicts, as
    multimodal messages carry it) is read exactly as the same text given as one string: the blocks'
    texts one after the other, nothing put between them (two markers stay adjacent, a word split
    across blocks stays one word), in every layout."""
    from langchain_core.messages import HumanMessage, SystemMessage

    first, second = (marker_for(AnchorStore.key_for(p)) for p in passages[:2])
    as_blocks = [SystemMessage([{"type": "text", "text": first}, second]),
                 HumanMessage(["When was the light", {"type": "text", "text": "house on Gull Point built?"}])]
    as_strings = [SystemMessage(first + second), HumanMessage("When was the lighthouse on Gull Point built?")]
    for chat_template in ("sac", False):
        llm = ChatSAC(engine=engine, max_tokens=4, stop=[], chat_template=chat_template)
        assert llm.render(as_blocks) == llm.render(as_strings)
    llm = ChatSAC(engine=engine, max_tokens=4, stop=[])
    assert llm.invoke(as_blocks).content == llm.invoke(as_strings).content
    assert ChatSAC(engine=engine, chat_template=False).render([HumanMessage(["Who built ", "it?"])]) == "Who built it?"
