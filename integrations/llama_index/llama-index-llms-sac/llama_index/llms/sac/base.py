"""``SACLLM``: a LlamaIndex LLM that answers from compressed contexts.

Every ``<sac:KEY>`` marker in the prompt that names an entry of the compressor's store (or a
chunk compressed in this process, e.g. by ``SACNodePostprocessor``) becomes that chunk's
cached K/V; the rest of the prompt - including marker-looking text typed by a user - is read
as text (``sac_rag.handles``).

LlamaIndex's response synthesizers re-split the context text to fit ``metadata.context_window``
as their tokenizer counts it. For a SAC prompt that count is meaningless - a marker is 70
characters of hex to it, while the model reads its chunk's cached entries at the positions of the
chunk's tokens - and a split inside a marker would lose its chunk and show the model hex digits.
So by default ``SACLLM`` reports a window LlamaIndex never splits in (``UNSPLIT_CONTEXT_WINDOW``):
every node's markers reach the model whole, and the model's own position limit is checked
exactly, refusing a prompt that does not fit (``PromptRefusedError``). A prompt holding a piece of
a marker anyway (a smaller window set by hand) is refused too (``MarkerCutError``). Neither is a
``ValueError``: LlamaIndex's refine and compact synthesizers catch those from the LLM, log them and
answer "Empty Response".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, field_serializer
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.memory import Memory
from llama_index.core.prompts import PromptTemplate

from sac_rag import DEFAULT_COMPRESSOR, Generation, GenerationConfig, InvalidInputError, PromptTooLongError, SACError
from sac_rag.config import PromptTemplate as SACPromptTemplate
from sac_rag.handles import MARKER_PATTERN, SACEngine, describe, reads_caches, spec_name

logger = logging.getLogger(__name__)

DEFAULT_STOP = ["\n###"]  # the next section of the SAC prompt layout
# The context window reported to LlamaIndex by default: larger than any prompt its prompt helper
# could count, so that it never splits the context text (and the markers in it).
UNSPLIT_CONTEXT_WINDOW = 1 << 30
# Per-call keyword arguments of complete/stream_complete (and their async forms).
CALL_ARGUMENTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "extractive", "num_beams",
                  "length_penalty", "mbr", "model")


class PromptRefusedError(SACError):
    """``SACLLM`` refused a call: the model cannot read the prompt as given, or the call's settings
    are not valid (the ``InvalidInputError`` it raises from, e.g. a ``PromptTooLongError`` for a
    prompt needing more positions than the model has: retrieve fewer nodes, or use
    ``response_mode="refine"`` to read one node per call). Not a ``ValueError``, unlike
    ``InvalidInputError``: LlamaIndex's refine and compact synthesizers would catch that, log it and
    answer "Empty Response"."""


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except InvalidInputError as err:
        too_long = isinstance(err, PromptTooLongError)
        hint = ("; with LlamaIndex: in a query engine, response_mode=\"refine\" reads one node per call; in a chat "
                "engine, memory=llm.chat_memory() drops the oldest turns") if too_long else ""
        raise PromptRefusedError(f"{err}{hint}") from err


def sac_qa_prompt(template: Optional[SACPromptTemplate] = None) -> PromptTemplate:
    """A ``text_qa_template`` in the SAC layout the compressor was trained with (contexts, then
    the question): ``"### Context:\\n{context_str}\\n### Question:\\n{query_str}\\n### Answer:\\n"``
    by default."""
    template = template or SACPromptTemplate()
    before, _, after = template.question.partition("{question}")
    text = (_escape(template.prefix + template.context_prefix) + "{context_str}" + _escape(before)
            + "{query_str}" + _escape(after))
    return PromptTemplate(text)


class SACLLM(CustomLLM):
    """LLM over SAC caches. Construction is instant; the weights load on first use.

    ``metadata.context_window`` is ``UNSPLIT_CONTEXT_WINDOW`` unless ``context_window`` is set:
    LlamaIndex then never re-splits the context, so no marker is cut, and a prompt longer than the
    model's position limit is refused exactly (``PromptRefusedError``: retrieve fewer nodes, or use
    ``response_mode="refine"`` to read one node per call).

    The decoder is trained to answer prompts in the SAC layout (``text_qa_template=llm.qa_prompt``
    in a query engine): a bare ``complete("What is 2+2?")`` usually gets an empty answer (the
    model ends it at once; a warning says so). Chats (``chat``, chat engines) are laid out in it
    too (``conversation_prompt``): use ``chat_mode="context"``, whose system message carries the
    nodes (``context_template=chat_context_template``). The condensing chat modes first ask the LLM
    to rewrite each follow-up question and retrieve with the rewrite: a prompt without contexts, which
    the base model answers, and at 135M parameters the rewrite retrieves worse than the follow-up as
    asked (``benchmarks/followup_questions.py``). The first prompt outside the layout and without
    contexts, such as that rewrite, logs a warning saying so; so does the first prompt with contexts
    outside it (LlamaIndex's own templates: no ``text_qa_template=llm.qa_prompt``, or the
    ``summary_template`` of ``tree_summarize``, or the ``refine_template`` of ``refine``).

    Usage per answer is in ``CompletionResponse.raw["usage"]`` and ``additional_kwargs``:
    ``prompt_tokens`` (text tokens + cached K/V entries), ``cached_tokens``, ``text_tokens``,
    ``context_tokens`` (the text tokens the cached entries stand for), ``completion_tokens``.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelled option is refused, not ignored

    compressor: Any = Field(default=DEFAULT_COMPRESSOR,
                            description="Built-in compressor name, compressor directory or SACCompressor.")
    store: Any = Field(default=None, description="Anchor store directory or AnchorStore.")
    device: Optional[str] = None
    dtype: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 64
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = Field(default_factory=lambda: list(DEFAULT_STOP))
    extractive: bool = Field(default=False, description="Answer with a verbatim span of the retrieved nodes' "
                             "text (sac_rag.extractive): no misquoted names or numbers.")
    num_beams: int = Field(default=1, description="Beam search over this many answers (1: greedy, or sampling "
                           "with temperature > 0); a stream then arrives in one piece.")
    length_penalty: float = Field(default=1.0, description="Beam search scores a finished answer by "
                                  "log-probability / length ** this: 0 favours short answers, 1 longer ones.")
    mbr: bool = Field(default=False, description="Beam search answers with the finished answer that agrees best "
                      "with the others (minimum Bayes risk: highest expected word-overlap F1), not the top-scored.")
    context_window: Optional[int] = Field(
        default=None, description="The window reported to LlamaIndex's prompt helper (default: one it never splits "
        "the context in). It counts a marker as the tokens of its text, not the positions its chunk takes, and "
        "cuts a marker when one node's markers exceed its share: SACLLM then refuses the prompt (MarkerCutError).")
    _engine: Optional[SACEngine] = PrivateAttr(default=None)
    _warned_outside_layout: set[bool] = PrivateAttr(default_factory=set)  # reads contexts or not

    def __init__(self, engine: Optional[SACEngine] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._engine = engine
        if kwargs.get("messages_to_prompt") is None:  # chats are laid out as the compressor was trained
            self.messages_to_prompt = self.conversation_prompt
        # Decoding settings that cannot be used (beams with extractive, a negative temperature) are
        # refused here: raised from a query, LlamaIndex would log them and answer "Empty Response".
        self.generation_config()
        if self.context_window is not None and self.context_window <= self.max_tokens:
            raise InvalidInputError(
                f"context_window={self.context_window!r} leaves no room for the prompt: LlamaIndex fits the prompt "
                f"into the window less the answer's max_tokens={self.max_tokens}; set a larger one, or leave it "
                "unset (a window LlamaIndex never splits the context in; the model's own limit is checked exactly)")

    @field_serializer("compressor", "store")
    def _serialize_spec(self, value: Any) -> Any:
        return spec_name(value)

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The settings given (``from_dict`` rebuilds this LLM from them): a default written out would
        be passed back as given, and a decoding setting left unset would no longer take the
        compressor's recommendation (``generation_config``)."""
        kwargs.setdefault("exclude_unset", True)
        record = super().to_dict(**kwargs)
        if self._engine is not None:  # the engine's settings, as given to it (it is not serialized itself)
            engine = self._engine
            settings = {"compressor": engine.compressor_spec, "store": engine.store_spec, "device": engine.device,
                        "dtype": engine.dtype}
            record.update({name: spec_name(value) for name, value in settings.items() if value is not None})
        return record

    def __getstate__(self) -> dict[str, Any]:
        """LlamaIndex's pickling state, made from a copy of this LLM's attributes (LlamaIndex deletes those
        it cannot pickle from the dict pydantic hands it, which is the live one) and without the default
        ``messages_to_prompt`` (this LLM's own ``conversation_prompt``, which ``__init__`` sets again): that
        bound method holds this LLM, whose state LlamaIndex's check would try to pickle again."""
        live = self.__dict__
        attributes = dict(live)
        if getattr(attributes.get("messages_to_prompt"), "__self__", None) is self:
            attributes["messages_to_prompt"] = None
        object.__setattr__(self, "__dict__", attributes)
        try:
            return super().__getstate__()
        finally:
            object.__setattr__(self, "__dict__", live)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """LlamaIndex rebuilds the object from every field; the fields given stay the only ones
        set, so that unset decoding settings still take the compressor's recommendation."""
        super().__setstate__(state)
        if "__pydantic_fields_set__" in state:
            object.__setattr__(self, "__pydantic_fields_set__", set(state["__pydantic_fields_set__"]))

    def __repr_args__(self) -> Any:
        """Pydantic's repr fields, with ``messages_to_prompt`` (by default this LLM's own
        ``conversation_prompt``) by name: a bound method's repr holds its object's, which would hold
        the method's again, endlessly."""
        for name, value in super().__repr_args__():
            if getattr(value, "__self__", None) is self:
                value = _Named(f"{type(self).__name__}.{value.__name__}")
            yield name, value

    @classmethod
    def class_name(cls) -> str:
        return "SACLLM"

    @property
    def engine(self) -> SACEngine:
        if self._engine is None:
            self._engine = SACEngine.shared(self.compressor, self.store, device=self.device, dtype=self.dtype)
        return self._engine

    @property
    def model_name(self) -> str:
        """The compressor this LLM answers with (the engine's, when one was passed)."""
        spec = self._engine.compressor_spec if self._engine is not None else self.compressor
        return describe(spec)

    @property
    def qa_prompt(self) -> PromptTemplate:
        """``sac_qa_prompt`` in this compressor's layout (read without loading weights)."""
        return sac_qa_prompt(self.engine.template)

    @property
    def chat_context_template(self) -> str:
        """A chat engine's ``context_template`` that puts only the retrieved nodes in its system
        message (``as_chat_engine(chat_mode="context", context_template=llm.chat_context_template)``):
        the first question then reads exactly what a query engine with ``qa_prompt`` reads. With
        LlamaIndex's default one, its instruction is read as context too."""
        return "{context_str}"

    @property
    def metadata(self) -> LLMMetadata:
        """What LlamaIndex plans prompts with (no weights loaded): ``context_window`` is the one set,
        else ``UNSPLIT_CONTEXT_WINDOW``, so that its prompt helper never cuts a marker."""
        return LLMMetadata(context_window=self.context_window or UNSPLIT_CONTEXT_WINDOW, num_output=self.max_tokens,
                           is_chat_model=False, model_name=self.model_name)

    def chat_memory(self, token_limit: Optional[int] = None, **kwargs: Any) -> Memory:
        """A memory for LlamaIndex's chat engines (``index.as_chat_engine(llm=llm,
        memory=llm.chat_memory())``) that keeps the conversation within the model: it counts the
        model's own tokens and keeps the latest turns within ``token_limit``, by default half the
        model's positions (the rest is for the retrieved chunks, the template and the answer).
        Without it a chat engine sizes its memory from ``metadata.context_window``, which
        ``SACLLM`` reports as one it never splits in: no turn would ever be dropped, and once the
        conversation outgrew the model every message would be refused (``PromptRefusedError``).
        ``kwargs`` go to ``Memory.from_defaults`` (e.g. ``session_id``, ``chat_store``)."""
        if token_limit is None:
            positions = self.engine.generator.max_positions
            if positions is None:
                raise InvalidInputError("the model states no position limit: pass token_limit")
            token_limit = positions // 2
        if isinstance(token_limit, bool) or not isinstance(token_limit, int) or token_limit < 1:
            raise InvalidInputError(f"token_limit must be a positive number of tokens, got {token_limit!r}")
        tokenizer = self.engine.compressor.tokenizer
        return Memory.from_defaults(token_limit=token_limit, tokenizer_fn=tokenizer.encode, **kwargs)

    def conversation_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """How ``chat`` (and a chat engine's prompts) reach the model unless ``messages_to_prompt`` is
        given: the conversation in the compressor's layout (``PromptTemplate.conversation``), the
        system messages - where a chat engine puts the retrieved nodes' markers - as the context,
        then each user message as a question and each assistant message as its answer."""
        turns = [(message.role.value, message.content or "") for message in messages]
        with _refusals():
            return self.engine.template.conversation(turns)

    def generation_config(self, prompt: Optional[str] = None, **kwargs: Any) -> GenerationConfig:
        """One call's decoding settings: the LLM's, overridden by the call's keyword arguments
        (unknown ones are refused, naming those accepted); the compressor's ``recommended_decoding``
        (read without loading weights; the shipped one's: 8 beams + MBR) fills the settings neither
        chose, unless it does not combine with them (``GenerationConfig.with_recommended``:
        ``num_beams=1`` gives greedy answers), or ``prompt`` reads no compressed context (it was
        measured answering from caches)."""
        unknown = set(kwargs) - set(CALL_ARGUMENTS)
        if unknown:
            raise InvalidInputError(
                f"unsupported generation arguments {sorted(unknown)}; accepted: {', '.join(CALL_ARGUMENTS)}")
        model = kwargs.get("model")
        if model is not None and model != self.model_name and model is not self.engine.compressor_spec:
            raise InvalidInputError(f"this LLM serves {self.model_name!r}; build another SACLLM for {model!r}")
        recommended = self.engine.recommended_decoding if prompt is None or reads_caches([prompt]) else {}
        return GenerationConfig.from_call(self, kwargs, kwargs.get("stop"), recommended)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        """The prompt the model reads: LlamaIndex's synthesizers join the nodes' markers with blank
        lines, where the compressor's layout puts its ``context_separator`` (nothing, by default)
        between contexts, as in training (and in ``create_sac_stuff_chain``)."""
        prompt = prompt if formatted else self.completion_to_prompt(prompt)
        template = self.engine.template
        reads_contexts = bool(MARKER_PATTERN.search(prompt))
        if reads_contexts not in self._warned_outside_layout and not prompt.endswith(template.answer_opening):
            self._warned_outside_layout.add(reads_contexts)  # once per LLM and kind: a chat engine sends one every turn
            logger.warning(_OUTSIDE_LAYOUT[reads_contexts], template.answer_opening)
        return _BETWEEN_MARKERS.sub(lambda match: match.group(1) + template.context_separator, prompt)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        with _refusals():
            prompt = self._prompt(prompt, formatted)
            generation = self.engine.generate([prompt], self.generation_config(prompt, **kwargs))[0]
        return _response(generation.text, None, generation)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        with _refusals():
            prompt = self._prompt(prompt, formatted)
            pieces = self.engine.stream(prompt, self.generation_config(prompt, **kwargs))

        def gen() -> CompletionResponseGen:
            text = ""
            with _refusals():
                for piece in pieces:
                    text, response = _streamed(text, piece)
                    yield response

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        with _refusals():
            prompt = self._prompt(prompt, formatted)
            generations = await self.engine.agenerate([prompt], self.generation_config(prompt, **kwargs))
        return _response(generations[0].text, None, generations[0])

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        with _refusals():
            prompt = self._prompt(prompt, formatted)
            pieces = self.engine.astream(prompt, self.generation_config(prompt, **kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            with _refusals():
                async for piece in pieces:
                    text, response = _streamed(text, piece)
                    yield response

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """``chat`` decoded as ``acomplete`` decodes, in a worker thread (``CustomLLM``'s would decode
        in the event loop's thread, blocking it until the answer is done)."""
        prompt = self.messages_to_prompt(messages)
        return completion_response_to_chat_response(await self.acomplete(prompt, formatted=True, **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """``stream_chat`` decoded as ``astream_complete`` decodes, in a worker thread."""
        prompt = self.messages_to_prompt(messages)
        return astream_completion_response_to_chat_response(
            await self.astream_complete(prompt, formatted=True, **kwargs))


class _Named(str):
    """A name shown in a repr as written, without quotes."""

    def __repr__(self) -> str:
        return str(self)


# What the first prompt that does not end where an answer begins is told, by whether it reads contexts.
_OUTSIDE_LAYOUT = {
    False: "SACLLM got a prompt with no compressed contexts that does not end where an answer begins (%r): "
           "the base model continues it as raw text, and a small model seldom follows an instruction given so. "
           "A condensing chat engine (chat_mode \"condense_plus_context\", as_chat_engine's default, or "
           "\"condense_question\") sends such a prompt to rewrite each follow-up question, and retrieves with "
           "whatever comes back (measured with SmolLM2-135M: the right passage less often than with the "
           "follow-up as asked, and no better in the model's chat template): use chat_mode=\"context\" (with "
           "context_template=llm.chat_context_template and memory=llm.chat_memory()), and "
           "text_qa_template=llm.qa_prompt in a query engine",
    True: "SACLLM got a prompt with compressed contexts that does not end where an answer begins (%r): not the "
          "layout the compressor was trained and measured in (a chat in LlamaIndex's generic layout scored half "
          "the F1 of the same chat in it: integrations/llama_index/README.md). In a query engine "
          "pass text_qa_template=llm.qa_prompt, and for response_mode=\"tree_summarize\" (which reads "
          "summary_template instead) summary_template=llm.qa_prompt too; response_mode=\"refine\" reads each "
          "node after the first in LlamaIndex's refine_template, outside the layout (\"compact\" reads them "
          "all in one call)",
}
_BETWEEN_MARKERS = re.compile(rf"({MARKER_PATTERN.pattern})\s+(?={MARKER_PATTERN.pattern})")  # whitespace only


def _streamed(text: str, piece) -> tuple[str, CompletionResponse]:
    """One streamed piece -> (the text so far, its response): a text delta, or the final usage."""
    if isinstance(piece, str):
        return text + piece, CompletionResponse(text=text + piece, delta=piece)
    return text, _response(text, "", piece)


def _response(text: str, delta: Optional[str], generation: Generation) -> CompletionResponse:
    usage = {
        "prompt_tokens": generation.text_tokens + generation.cached_tokens,
        "completion_tokens": len(generation.token_ids),
        "total_tokens": generation.text_tokens + generation.cached_tokens + len(generation.token_ids),
        "text_tokens": generation.text_tokens,
        "cached_tokens": generation.cached_tokens,
        "context_tokens": generation.context_tokens,
    }
    return CompletionResponse(text=text, delta=delta, raw={"usage": usage, "finish_reason": generation.finish_reason},
                              additional_kwargs={**usage, "finish_reason": generation.finish_reason})


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
