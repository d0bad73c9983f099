"""What ``SACLLM`` and ``ChatSAC`` share: their settings, how sac_rag's ``Generation`` figures
become LangChain usage metadata, and (with ``SACContextCompressor``) the engine they run on and
how they serialize the LangChain way."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from sac_rag import DEFAULT_COMPRESSOR, Generation, GenerationConfig, InvalidInputError, SACCompressor, SACError
from sac_rag.compressor import checkpoint_meta
from sac_rag.config import PromptTemplate
from sac_rag.handles import SACEngine, describe, reads_caches, spec_name
from sac_rag.store import AnchorStore

DEFAULT_STOP = ("\n###",)  # the next section of the SAC prompt layout

# Settings that change what is decoded (and so belong in LangChain's LLM-cache key).
DECODING_SETTINGS = ("temperature", "max_tokens", "top_p", "top_k", "seed", "extractive", "num_beams",
                     "length_penalty", "mbr")
CALL_ARGUMENTS = (*DECODING_SETTINGS, "model")


class SACEngineSettings(BaseModel):
    """The settings of the engine a SAC model or ``SACContextCompressor`` runs on. Nothing is
    loaded when the object is built: the weights load, and the store opens, on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # a misspelled option: refused

    compressor: Any = DEFAULT_COMPRESSOR
    """Built-in compressor name, compressor directory, or a loaded ``SACCompressor`` (which
    ``model_dump``/``model_dump_json`` write as its name, ``sac:<base model>``: an object is not
    serializable, rebuild the object with it)."""
    store: Any = None
    """Anchor store (directory or ``AnchorStore``) whose entries the markers name (an
    ``AnchorStore`` is serialized as its directory). A ``SACContextCompressor`` creates a missing
    directory on its first write-back."""
    engine: SACEngine | None = Field(default=None, exclude=True)
    """Share one engine explicitly; by default SAC models and compressors built with the same
    ``compressor``/``store``/``device``/``dtype`` share one (``SACEngine.shared``)."""
    device: str | None = None
    dtype: str | None = None

    @field_serializer("compressor", "store")
    def _serialize_spec(self, value: Any) -> Any:
        return spec_name(value)

    def get_engine(self) -> SACEngine:
        if self.engine is not None:
            return self.engine
        return SACEngine.shared(self.compressor, self.store, device=self.device, dtype=self.dtype)


ENGINE_SETTINGS = ("compressor", "store", "device", "dtype")


class LangChainSerializable:
    """LangChain serialization (``langchain_core.load.dumpd``/``load``) for the SAC classes, listed
    first among their bases: a constructor record of their settings, from which
    ``load(record, allowed_objects=[cls], valid_namespaces=["langchain_sac"])`` builds an equal
    object. There are no secrets: the model runs locally.

    The engine is named by its settings, not serialized: with ``engine=``, the record holds that
    engine's compressor, store, device and dtype, and the loaded object shares the engine
    ``SACEngine.shared`` makes for them (not the object passed, nor its ``memory_bytes`` or
    ``merge_decoder``). A store or checkpoint directory is recorded as its path. A loaded
    ``SACCompressor`` cannot be: nothing records where its weights came from, so it becomes
    LangChain's ``not_implemented`` stub naming it (``sac:<base model>``), and ``load`` refuses the
    record instead of building a model that would fail on first use. Pass the compressor's name or
    directory to get a record that loads."""

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {}

    def to_json(self) -> Any:
        """LangChain's record, holding only the settings that were given (and the engine settings
        in force): LangChain's own also writes every truthy default (``num_beams=1``, ``top_p=1.0``),
        which ``load`` would then pass as given, and a decoding setting left unset would no longer
        take the compressor's recommendation (``generation_config``)."""
        record = super().to_json()
        kwargs = record.get("kwargs")
        if isinstance(kwargs, dict):
            given = set(self.model_fields_set) | set(self.lc_attributes)
            record["kwargs"] = {name: value for name, value in kwargs.items() if name in given}
        return record

    @property
    def lc_attributes(self) -> dict[str, Any]:
        """The engine settings in force (the engine's, if one was passed), as JSON values."""
        engine = self.engine
        if engine is not None:
            settings = dict(zip(ENGINE_SETTINGS, (engine.compressor_spec, engine.store_spec, engine.device,
                                                  engine.dtype)))
        else:
            settings = {name: getattr(self, name) for name in ENGINE_SETTINGS}
        return {name: lc_spec(value) for name, value in settings.items()
                if value is not None or getattr(self, name) is not None}


def lc_spec(value: Any) -> Any:
    """A compressor or store spec in a LangChain constructor record: a name or directory as a
    string; anything else (a loaded ``SACCompressor``) as a ``NotSerialized`` stand-in, which
    ``dumpd`` writes as the ``not_implemented`` stub that makes ``load`` refuse the record."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (os.PathLike, AnchorStore)):
        return spec_name(value)
    return NotSerialized(value)


class SACModelMethods:
    """What ``SACLLM`` and ``ChatSAC`` do otherwise than LangChain's base class (so they list it
    before it): decoding settings that cannot be used together are refused when the model is
    built, not at its first call; tokens are counted in the model's own terms (LangChain's counts
    come from GPT-2's tokenizer, fetched from the hub), which ``trim_messages(...,
    token_counter=llm)`` and ``get_num_tokens`` read."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.generation_config()  # e.g. num_beams=4 with extractive=True: refused here

    def get_token_ids(self, text: str) -> list[int]:
        """``text``'s token ids in the model's tokenizer (markers as their text)."""
        return self.get_engine().compressor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def get_num_tokens(self, text: str) -> int:
        """The positions ``text`` takes as the model reads it: a marker naming a chunk counts as the
        tokens of that chunk (``SACEngine.count_positions``), which is what the model's limit bounds."""
        return self.get_engine().count_positions(text)

    @property
    def max_positions(self) -> int | None:
        """The positions the model reads at most (prompt and answer; None if it states no limit):
        the budget ``get_num_tokens`` counts against, e.g. ``trim_messages(history,
        max_tokens=llm.max_positions // 2, token_counter=llm, include_system=True)``, which leaves
        the other half for the retrieved documents and the answer. Loads the model."""
        return self.get_engine().generator.max_positions


class NotSerialized:
    """Stands for a loaded object in a record: ``dumpd`` writes LangChain's ``not_implemented``
    stub for it, under the object's class, its ``repr`` the object's short name (``describe``)
    rather than the object's own (a whole model's module tree)."""

    def __init__(self, value: Any):
        self.__module__ = type(value).__module__
        self.__name__ = type(value).__name__
        self.name = describe(value)

    def __repr__(self) -> str:
        return self.name


def compressor_fingerprint(spec: Any) -> str | None:
    """The fingerprint of a compressor spec, without loading weights: a loaded ``SACCompressor``'s
    own, else the one its checkpoint's ``config.json`` records (None if it cannot be read: loading
    will report why)."""
    if isinstance(spec, SACCompressor):
        return spec.fingerprint
    try:
        return checkpoint_meta(spec).get("fingerprint")
    except (SACError, OSError, ValueError, TypeError, AttributeError):
        return None


# LangChain's standard chat-model parameters for a remote provider, which generic code passes to
# any model: accepted and unused, as the model runs in this process. Any other unknown option is refused.
REMOTE_ONLY_PARAMS = ("timeout", "max_retries", "api_key", "base_url")


class SACModelParams(SACEngineSettings):
    """Settings of a SAC language model: its engine's, and how it decodes."""

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_only_params(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if k not in REMOTE_ONLY_PARAMS}
        return values

    compressor: Any = Field(default=DEFAULT_COMPRESSOR, alias="model")
    """Built-in compressor name, compressor directory, or a loaded ``SACCompressor`` (see
    ``SACEngineSettings``); ``model`` is its alias."""
    temperature: float = 0.0
    max_tokens: int = 64
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = Field(default_factory=lambda: list(DEFAULT_STOP))
    """Stop strings (the answer is cut before them); per-call ``stop`` adds to these."""
    extractive: bool = False
    """Answer with a verbatim span of the retrieved documents' text (``sac_rag.extractive``):
    no misquoted names or numbers. The texts come from the store or the compressor's memory."""
    num_beams: int = 1
    """Beam search over this many answers (1: greedy, or sampling with ``temperature`` > 0)."""
    length_penalty: float = 1.0
    """Beam search scores a finished answer by log-probability / length ** this: 0 favours short
    answers, 1 (transformers' default) longer ones."""
    mbr: bool = False
    """Beam search answers with the finished answer that agrees best with the others (minimum Bayes
    risk: highest expected word-overlap F1) instead of the top-scored one."""

    @property
    def compressor_spec(self) -> Any:
        """The compressor this model answers with: the engine's when one was passed."""
        return self.engine.compressor_spec if self.engine is not None else self.compressor

    @property
    def model_name(self) -> str:
        return describe(self.compressor_spec)

    def identifying_params(self) -> dict[str, Any]:
        """Everything that decides an answer, for LangChain's LLM-cache key and traces: the
        compressor (name and fingerprint, read without loading weights), the store, the dtype and
        every decoding setting."""
        engine = self.engine
        if engine is not None and engine.loaded:
            fingerprint = engine.compressor.fingerprint
        else:
            fingerprint = compressor_fingerprint(self.compressor_spec)
        store = engine.store_spec if engine is not None else self.store
        return {
            "model_name": self.model_name,
            "compressor_fingerprint": fingerprint,
            "store": spec_name(store),
            "dtype": engine.dtype if engine is not None else self.dtype,
            **self.decoding_params(),
            "model_stop": list(self.stop or []),  # LangChain puts the per-call stop under "stop"
        }

    @property
    def prompt_template(self) -> PromptTemplate:
        """The prompt layout the compressor was trained with (no weights loaded)."""
        return self.get_engine().template

    def decoding_params(self, **call: Any) -> dict[str, Any]:
        """The decoding settings (``DECODING_SETTINGS``) a call with these arguments uses, as
        ``generation_config`` resolves them with the compressor's recommendation, and under
        ``decoding_without_context`` those it uses for a prompt that reads no compressed context
        (without the recommendation): what cache keys must hold, as the model's fields and the
        call's arguments alone do not say it, nor does the key say which kind of prompt it is for
        (left on defaults, a question rewrite is decoded greedily; with the recommendation chosen as
        settings, by it)."""
        call = {k: v for k, v in call.items() if k in CALL_ARGUMENTS}

        def settings(config: GenerationConfig) -> dict[str, Any]:
            return {name: getattr(config, "max_new_tokens" if name == "max_tokens" else name)
                    for name in DECODING_SETTINGS}

        return {**settings(self.generation_config(**call)),
                "decoding_without_context": settings(self.generation_config(prompts=[""], **call))}

    def generation_config(self, stop: list[str] | None = None, prompts: Sequence[str] | None = None,
                          **kwargs: Any) -> GenerationConfig:
        """Decoding settings of one call: the model's, overridden by per-call keyword arguments;
        the compressor's ``recommended_decoding`` (read without loading weights; the shipped one's:
        8 beams + MBR) fills the settings neither chose, unless it does not combine with them
        (``GenerationConfig.with_recommended``: ``num_beams=1`` gives greedy answers), or the call's
        ``prompts`` do not all read compressed contexts (it was measured answering from caches)."""
        # ``ls_*`` keys are LangChain's tracing hints, not generation arguments.
        unknown = {k for k in kwargs if not k.startswith("ls_")} - set(CALL_ARGUMENTS)
        if unknown:
            raise InvalidInputError(
                f"unsupported generation arguments {sorted(unknown)}; accepted: {', '.join(CALL_ARGUMENTS)}")
        if kwargs.get("model") not in (None, self.model_name, self.compressor_spec):
            raise InvalidInputError(
                f"this model serves {self.model_name!r}; build another SAC model for {kwargs['model']!r}")
        recommended = self.get_engine().recommended_decoding if prompts is None or reads_caches(prompts) else {}
        return GenerationConfig.from_call(self, kwargs, stop, recommended)


def usage_metadata(generation: Generation) -> UsageMetadata:
    """Input tokens = text tokens read + cached K/V entries spliced in (``cache_read``)."""
    input_tokens = generation.text_tokens + generation.cached_tokens
    output_tokens = len(generation.token_ids)
    return UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_token_details=InputTokenDetails(cache_read=generation.cached_tokens),
    )


def generation_info(generation: Generation) -> dict[str, Any]:
    """Per-answer figures: ``context_tokens`` is how many text tokens the cached entries stand for."""
    return {
        "finish_reason": generation.finish_reason,
        "text_tokens": generation.text_tokens,
        "cached_tokens": generation.cached_tokens,
        "context_tokens": generation.context_tokens,
    }


def add_usage(total: dict[str, Any], usage: UsageMetadata) -> dict[str, Any]:
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        total[name] = total.get(name, 0) + usage[name]
    details = total.setdefault("input_token_details", {})
    details["cache_read"] = details.get("cache_read", 0) + usage["input_token_details"]["cache_read"]
    return total
