"""The LangChain chain on the real packaged SmolLM2-135M: with every token kept as an anchor
(ratio 1, causal, no adapter) the cached chunks are exactly the text's own K/V, so the chain
must answer exactly as the model reading the same retrieved text."""

from __future__ import annotations

import logging

import pytest
from conftest import requires_smollm2
from langchain_classic.chains import create_retrieval_chain
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_sac import ChatSAC, SACContextCompressor, create_sac_stuff_chain, sac_qa_prompt
from test_langchain_sac import KeywordRetriever, Recorder

from sac_rag import GenerationConfig, SACCompressor, SACConfig
from sac_rag.handles import SACEngine
from sac_rag.store import AnchorStore


@requires_smollm2
@pytest.mark.real_model
def test_chain_keeping_every_token_answers_exactly_like_reading_the_text(tmp_path, smollm2_fp32, passages):
    model, tokenizer = smollm2_fp32
    config = SACConfig(base_model="smollm2-135m", ratio=1, lora_rank=0, bidirectional=False, anchor_embedding="none")
    compressor = SACCompressor(config, model=model, tokenizer=tokenizer)
    store = AnchorStore.create(tmp_path / "store", compressor.fingerprint, 1, "float32")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
    store.put_many([(AnchorStore.key_for(p), kv) for p, kv in zip(passages, compressor.compress_chunks(ids))])
    engine = SACEngine(compressor, store)
    llm = ChatSAC(engine=engine, max_tokens=12)
    retriever = ContextualCompressionRetriever(
        base_compressor=SACContextCompressor(engine=engine),
        base_retriever=KeywordRetriever(documents=[Document(page_content=p) for p in passages], k=2))
    chain = create_retrieval_chain(retriever, create_sac_stuff_chain(llm, sac_qa_prompt(question_key="input")))
    question = "When was the lighthouse on Gull Point painted red?"
    recorder = Recorder()
    result = chain.invoke({"input": question}, config={"callbacks": [recorder]})

    texts = [d.page_content for d in result["context"]]
    layout = compressor.config.prompt  # the same segments, the retrieved texts read as text
    segments = [layout.prefix + layout.context_prefix, *texts, layout.question.format(question=question)]
    full_text = engine.generator.generate(segments, GenerationConfig(max_new_tokens=12, stop=("\n###",)))
    assert result["answer"] == full_text.text
    usage = recorder.results[0].generations[0][0].message.usage_metadata
    assert usage["input_token_details"]["cache_read"] == sum(len(i) for i, p in zip(ids, passages) if p in texts)
    assert usage["input_tokens"] == full_text.text_tokens  # the same tokens, the context ones from caches


@requires_smollm2
@pytest.mark.real_model
def test_a_bare_question_is_answered_in_the_chat_template_and_as_written_gets_an_empty_answer_and_a_warning(caplog):
    """A bare question names no compressed context: by default ChatSAC gives it to the base model in
    its chat template, and the instruction-tuned model answers it. Read as written
    (``chat_template=False``), the shipped decoder ends its answer at once (EOS, whatever the stop
    strings), and the user is told why; the SAC layout gets an answer."""
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        templated = ChatSAC(max_tokens=16, stop=[]).invoke("What is 2+2?")
    assert "4" in templated.content and caplog.records == []
    llm = ChatSAC(max_tokens=8, stop=[], chat_template=False)
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        bare = llm.invoke("What is 2+2?")
    assert bare.content == "" and bare.response_metadata["finish_reason"] == "stop"
    assert "answers are empty" in caplog.text and "sac_qa_prompt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sac_rag.handles"):
        laid_out = llm.invoke(sac_qa_prompt().format(context="", question="What is 2+2?"))
    assert "4" in laid_out.content and caplog.records == []
