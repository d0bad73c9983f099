"""Prompts that carry SAC handles through LangChain's document chains.

``create_stuff_documents_chain(llm, sac_qa_prompt(), document_prompt=SAC_DOCUMENT_PROMPT,
document_separator="")`` - or ``create_sac_stuff_chain(llm)`` - formats each document as its
``sac_marker`` and the question in the layout the compressor was trained with.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from langchain_core.language_models import BaseLanguageModel
from langchain_core.prompts import BasePromptTemplate, PromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.runnables.base import RunnableBindingBase

from sac_rag import InvalidInputError
from sac_rag.config import PromptTemplate as SACPromptTemplate

from ._base import SACModelParams

SAC_DOCUMENT_PROMPT = PromptTemplate.from_template("{sac_marker}")
"""Document prompt emitting each document's handle (set by ``SACContextCompressor``)."""


def sac_qa_prompt(template: SACPromptTemplate | None = None, *, context_key: str = "context",
                  question_key: str = "question") -> PromptTemplate:
    """A LangChain prompt with the SAC layout (``"### Context:\\n{context}\\n### Question:\\n
    {question}\\n### Answer:\\n"`` by default): contexts, then the question, as in training.
    With no documents (the retriever found none: ``SACContextCompressor`` warns) the empty context
    heading stays, where ``SAC.answer(question, [])`` opens with the question, so the two may answer
    such a question differently."""
    template = template or SACPromptTemplate()
    before, _, after = template.question.partition("{question}")
    text = (_escape(template.prefix + template.context_prefix) + "{" + context_key + "}" + _escape(before)
            + "{" + question_key + "}" + _escape(after))
    return PromptTemplate.from_template(text)


def create_sac_stuff_chain(llm: BaseLanguageModel, prompt: BasePromptTemplate | None = None,
                           **kwargs: Any) -> Runnable:
    """``create_stuff_documents_chain`` wired for SAC: documents appear as their markers,
    joined by the compressor's context separator; the default prompt is ``sac_qa_prompt`` in
    the layout of ``llm``'s compressor (also through ``bind``, ``with_config`` or ``with_retry``).
    Input: ``{"context": documents, "question": str}``."""
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    model = llm
    while isinstance(model, RunnableBindingBase):  # llm.bind(...), .with_config(...), .with_retry()
        model = model.bound
    template = model.prompt_template if isinstance(model, SACModelParams) else SACPromptTemplate()
    kwargs.setdefault("document_prompt", SAC_DOCUMENT_PROMPT)
    kwargs.setdefault("document_separator", template.context_separator)
    chain = create_stuff_documents_chain(llm, prompt or sac_qa_prompt(template), **kwargs)
    if kwargs["document_prompt"] is not SAC_DOCUMENT_PROMPT:
        return chain
    check = partial(_check_handles, kwargs.get("document_variable_name", "context"))
    return (RunnableLambda(check, afunc=_in_async(check)).with_config(run_name="check_sac_markers")
            | chain).with_config(run_name="stuff_documents_chain")


def _check_handles(variable: str, inputs: Any) -> Any:
    """``inputs``, if each of its documents carries a handle (``sac_marker``, which
    ``SACContextCompressor`` sets); else a message saying how to give them one, rather than
    LangChain's about missing metadata variables."""
    documents = inputs.get(variable) if isinstance(inputs, dict) else None
    without = [d for d in documents or () if "sac_marker" not in (getattr(d, "metadata", None) or {})]
    if without:
        raise InvalidInputError(
            f"{len(without)} of {len(documents)} documents have no SAC handle (metadata 'sac_marker'): pass "
            "the retrieved documents through SACContextCompressor first (ContextualCompressionRetriever("
            "base_compressor=SACContextCompressor(...), base_retriever=...)), or send their text as it is with "
            "create_sac_stuff_chain(llm, document_prompt=PromptTemplate.from_template(\"{page_content}\"))")
    return inputs


def _in_async(check):
    async def acheck(inputs: Any) -> Any:
        return check(inputs)

    return acheck


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
