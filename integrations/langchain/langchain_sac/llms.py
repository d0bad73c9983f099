"""``SACLLM``: a LangChain text LLM that answers from compressed contexts.

``BaseLLM.batch`` hands all prompts to one ``_generate``, which decodes them as one batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult
from langchain_core.runnables import Runnable

from sac_rag import Generation, GenerationConfig
from sac_rag.handles import reads_caches

from ._base import (
    CALL_ARGUMENTS,
    LangChainSerializable,
    SACModelMethods,
    SACModelParams,
    add_usage,
    generation_info,
    usage_metadata,
)

# The decoding arguments of the ``generate`` call in progress: ``BaseLLM`` keys its LLM cache by
# ``_identifying_params`` and ``stop`` only, so the per-call overrides are added there.
_CALL_ARGUMENTS: ContextVar[dict[str, Any] | None] = ContextVar("sac_llm_call_arguments", default=None)


class SACLLM(LangChainSerializable, SACModelMethods, BaseLLM, SACModelParams):
    """Text LLM over SAC caches: ``<sac:KEY>`` markers in the prompt that name entries of the
    compressor's store become those chunks' cached K/V; the rest is read as text.

    The decoder is trained to answer prompts in the SAC layout (``sac_qa_prompt``, which
    ``create_sac_stuff_chain`` uses): a bare question usually gets an empty answer (the model
    ends it at once; a warning says so).

    Usage per answer is in ``generation_info`` (``usage_metadata``, with ``input_token_details.
    cache_read`` = K/V entries read from caches) and summed in ``llm_output["token_usage"]``.

    ``langchain_core.load.dumpd`` gives a constructor record of its settings, which ``load`` with
    ``valid_namespaces=["langchain_sac"]`` rebuilds (see ``LangChainSerializable``).
    """

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """The public module, kept in serialized records whatever module defines the class."""
        return ["langchain_sac", "llms"]

    @property
    def _llm_type(self) -> str:
        return "sac"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        call = _CALL_ARGUMENTS.get() or {}
        return {**self.identifying_params(), **call, **self.decoding_params(**call)}

    def generate(self, *args: Any, **kwargs: Any) -> LLMResult:
        token = _CALL_ARGUMENTS.set({k: v for k, v in kwargs.items() if k in CALL_ARGUMENTS})
        try:
            return super().generate(*args, **kwargs)
        finally:
            _CALL_ARGUMENTS.reset(token)

    async def agenerate(self, *args: Any, **kwargs: Any) -> LLMResult:
        token = _CALL_ARGUMENTS.set({k: v for k, v in kwargs.items() if k in CALL_ARGUMENTS})
        try:
            return await super().agenerate(*args, **kwargs)
        finally:
            _CALL_ARGUMENTS.reset(token)

    def batch(self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
              **kwargs: Any) -> list[str]:
        """With ``return_exceptions``, each input's own answer or error: LangChain's ``BaseLLM.batch``
        would give every input the error of one (a prompt too long for the model, say). Each input
        is then invoked on its own, and the engine still decodes those that arrive together as one
        batch."""
        if return_exceptions and len(inputs) > 1:
            return Runnable.batch(self, inputs, config, return_exceptions=True, **kwargs)
        return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[str]:
        """``batch``'s asynchronous twin."""
        if return_exceptions and len(inputs) > 1:
            return await Runnable.abatch(self, inputs, config, return_exceptions=True, **kwargs)
        return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "sac"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        return params

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = self.get_engine().generate(prompts, self._configs(prompts, stop, kwargs))
        return self._result(generations)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = await self.get_engine().agenerate(prompts, self._configs(prompts, stop, kwargs))
        return self._result(generations)

    def _configs(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> list[GenerationConfig]:
        """Each prompt's decoding: one that reads compressed contexts as the compressor recommends,
        one that does not (a question rewrite, say) greedily, in the same batch."""
        by_kind: dict[bool, GenerationConfig] = {}  # one resolution per kind, not per prompt
        for prompt in prompts:
            if (kind := reads_caches([prompt])) not in by_kind:
                by_kind[kind] = self.generation_config(stop, [prompt], **kwargs)
        return [by_kind[reads_caches([prompt])] for prompt in prompts]

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for piece in self.get_engine().stream(prompt, self.generation_config(stop, [prompt], **kwargs)):
            chunk = _chunk(piece)
            if run_manager and isinstance(piece, str):
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for piece in self.get_engine().astream(prompt, self.generation_config(stop, [prompt], **kwargs)):
            chunk = _chunk(piece)
            if run_manager and isinstance(piece, str):
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _result(self, generations: list[Generation]) -> LLMResult:
        total: dict[str, Any] = {}
        rows = []
        for generation in generations:
            usage = usage_metadata(generation)
            add_usage(total, usage)
            rows.append([LCGeneration(text=generation.text,
                                      generation_info={**generation_info(generation), "usage_metadata": usage})])
        return LLMResult(generations=rows, llm_output={"token_usage": total, "model_name": self.model_name})


def _chunk(piece: str | Generation) -> GenerationChunk:
    if isinstance(piece, str):
        return GenerationChunk(text=piece)
    return GenerationChunk(text="", generation_info={**generation_info(piece), "usage_metadata": usage_metadata(piece)})
