"""``ChatSAC``: a LangChain chat model that answers from compressed contexts.

The messages are rendered to one prompt string; every ``<sac:KEY>`` marker in it that names an
entry of the compressor's store (or a chunk compressed in this process) is replaced by that
chunk's cached K/V, the rest is read as text (``sac_rag.handles``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from sac_rag import Generation, GenerationConfig, InvalidInputError, PromptTooLongError
from sac_rag.handles import MARKER_PATTERN

from ._base import LangChainSerializable, SACModelMethods, SACModelParams, generation_info, usage_metadata

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}
# By class, not ``message.type``: a chunk's type is its class name ("AIMessageChunk", what a streamed
# answer adds up to in a chat history), and a ``ChatMessage``'s role is its ``role``.
_CLASS_ROLES = ((HumanMessage, "user"), (AIMessage, "assistant"), (SystemMessage, "system"), (ToolMessage, "tool"),
                (FunctionMessage, "tool"))


class ChatSAC(LangChainSerializable, SACModelMethods, BaseChatModel, SACModelParams):
    """Chat model over SAC caches.

    How the messages become the prompt the decoder reads (``chat_template``):

    - ``False``: their text contents, one after the other: a single human message - what a RAG
      chain sends - reaches the decoder exactly as written, in the layout the compressor was
      trained with (see ``sac_qa_prompt``);
    - ``"sac"``: the conversation in that layout (``PromptTemplate.conversation``): the system
      messages - where a chain with history puts the documents' markers - as the context, then
      each human message as a question and each AI message as its answer;
    - ``True``: the tokenizer's chat template (e.g. ChatML), which the compressor was not trained on;
    - ``None`` (default): messages that name no compressed context - a history-aware retriever's
      request to rewrite the question, a bare ``invoke("What is 2+2?")`` - in the chat template if the
      tokenizer has one: the base model answers them, without the decoder adapter, and follows its
      own format best (on 150 SQuAD-dev follow-ups the rewrite retrieved the right paragraph for 53.3%
      in it, 34.0% in the compressor's layout; ``benchmarks/followup_questions.py``). Otherwise
      ``False`` for a single human message, ``"sac"`` for anything else.

    The decoder is trained to answer compressed contexts in the SAC layout: put questions in
    ``sac_qa_prompt()`` (``create_sac_stuff_chain`` does).

    ``langchain_core.load.dumpd`` gives a constructor record of its settings, which ``load`` with
    ``valid_namespaces=["langchain_sac"]`` rebuilds (see ``LangChainSerializable``).

    >>> llm = ChatSAC(store="corpus.store")   # instant: weights load on first use   # doctest: +SKIP
    """

    chat_template: bool | Literal["sac"] | None = None
    streaming: bool = False
    """Answer ``invoke`` through the streaming path (LangChain's convention)."""

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """The public module, kept in serialized records whatever module defines the class."""
        return ["langchain_sac", "chat_models"]

    @property
    def _llm_type(self) -> str:
        return "sac-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self.identifying_params(), "chat_template": self.chat_template}

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """The LLM-cache key: every setting that decides an answer (``_identifying_params``, with
        the compressor's fingerprint) and the call's arguments - not the serialized record that
        ``BaseChatModel`` keys serializable models by, which names a loaded compressor only by its
        base model (two compressors on one base model would share cached answers)."""
        return str(sorted({**self._get_invocation_params(stop=stop, **kwargs), **kwargs,
                           **self.decoding_params(**kwargs)}.items()))

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="sac", ls_model_name=kwargs.get("model") or self.model_name, ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def generation_config(self, stop: list[str] | None = None, prompts: Sequence[str] | None = None,
                          **kwargs: Any) -> GenerationConfig:
        """As ``SACModelParams.generation_config``; a call's ``stream=True``/``False`` is
        ``BaseChatModel``'s choice between ``_stream`` and ``_generate``, which it passes on to both."""
        kwargs.pop("stream", None)
        return super().generation_config(stop, prompts, **kwargs)

    def render(self, messages: Sequence[BaseMessage], asking: bool = True) -> str:
        """The prompt string the decoder reads (markers still in it); ``asking=False`` lays out
        messages only to count them (with ``chat_template="sac"``, they need no question)."""
        turns = [(_role(m), _text(m)) for m in messages]
        if not turns:
            raise InvalidInputError("no messages: pass at least the question")
        layout = self.chat_template
        if layout is None and not any(MARKER_PATTERN.search(text) for _, text in turns):
            tokenizer = self.get_engine().compressor.tokenizer  # no compressed context: the base model answers
            if getattr(tokenizer, "chat_template", None):  # in its own format
                try:
                    return _in_chat_template(tokenizer, turns)
                except Exception:  # noqa: BLE001 - a template refusing these turns (roles that do not alternate,
                    pass  # say: jinja2's TemplateError), or no jinja2 to render it: the layout below
        if layout is None:  # one human message holds a whole prompt (a RAG chain's); several are a chat
            layout = False if len(turns) == 1 and turns[0][0] == "user" else "sac"
        if layout is False:
            return "\n".join(text for _, text in turns)
        if layout == "sac":
            return self.get_engine().template.conversation(turns, asking)
        tokenizer = self.get_engine().compressor.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError("chat_template=True, but this model's tokenizer has no chat template")
        return _in_chat_template(tokenizer, turns)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """The positions ``messages`` take as the model reads them (rendered as ``render`` does, a marker
        counting as its chunk's tokens): what ``trim_messages(history, max_tokens=N, token_counter=llm)``
        trims a conversation by, to keep it within the model."""
        if tools:
            raise InvalidInputError("ChatSAC does not call tools: count the messages without them")
        return self.get_num_tokens(self.render(messages, asking=False)) if messages else 0

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        prompt = self.render(messages)
        with _trimming_advised():
            generation = self.get_engine().generate([prompt], self.generation_config(stop, [prompt], **kwargs))[0]
        return self._result(generation)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        prompt = self.render(messages)
        with _trimming_advised():
            generation = (await self.get_engine().agenerate([prompt], self.generation_config(stop, [prompt],
                                                                                             **kwargs)))[0]
        return self._result(generation)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt = self.render(messages)
        with _trimming_advised():
            for piece in self.get_engine().stream(prompt, self.generation_config(stop, [prompt], **kwargs)):
                chunk = self._chunk(piece)
                if run_manager and isinstance(piece, str):
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt = self.render(messages)
        with _trimming_advised():
            async for piece in self.get_engine().astream(prompt, self.generation_config(stop, [prompt], **kwargs)):
                chunk = self._chunk(piece)
                if run_manager and isinstance(piece, str):
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk

    def _result(self, generation: Generation) -> ChatResult:
        info = generation_info(generation)
        message = AIMessage(content=generation.text, usage_metadata=usage_metadata(generation),
                            response_metadata={"model_name": self.model_name, "model_provider": "sac", **info})
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _chunk(self, piece: str | Generation) -> ChatGenerationChunk:
        if isinstance(piece, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=piece))
        info = generation_info(piece)  # the end of the stream: usage figures, no text
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage_metadata(piece), chunk_position="last",
                                   response_metadata={"model_name": self.model_name, "model_provider": "sac",
                                                      **info}),
            generation_info=info,
        )


def _in_chat_template(tokenizer, turns: Sequence[tuple[str, str]]) -> str:
    return tokenizer.apply_chat_template([{"role": role, "content": text} for role, text in turns],
                                         tokenize=False, add_generation_prompt=True)


@contextlib.contextmanager
def _trimming_advised() -> Iterator[None]:
    """A prompt too long for the model refused with how to keep a conversation within it."""
    try:
        yield
    except PromptTooLongError as err:
        raise PromptTooLongError(f"{err}; with LangChain: trim_messages(history, max_tokens=llm.max_positions // 2, "
                                 "token_counter=llm, include_system=True)") from err


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return _ROLES.get(message.role, message.role)
    role = next((role for cls, role in _CLASS_ROLES if isinstance(message, cls)), None)
    return role or _ROLES.get(message.type, message.type)


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidInputError(f"ChatSAC reads text only; got a {kind!r} content block")
    return "".join(parts)
