"""Answering from compressed contexts: the frozen decoder reads a prompt made of text segments
and ``AnchorKV`` chunks, with the chunks' K/V spliced into its cache.

Positions follow METHOD.md: a chunk placed at running position p is rotated so its first token
sits at p, and the running position then advances by the chunk's *token* count, not its anchor
count, so the text after it continues at the true context length. Full-text prompts (contexts
given as strings) go through the same code, which keeps every comparison on one path.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F

from .config import prompt_ids
from .devices import input_device, layer_devices
from .errors import FingerprintMismatchError, InvalidInputError, PromptError, PromptTooLongError
from .extractive import SpanConstraint, Vocabulary, token_bytes
from .fingerprint import base_model_fingerprint, same_base_model, same_model
from .kv import AnchorKV
from .metrics import answer_agreement
from .rope import KeyRotator

Segment = str | AnchorKV
Prompt = Sequence[Segment | Sequence[AnchorKV]]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, checked when made and fixed after (``dataclasses.replace(config, ...)``
    makes a changed copy, checked again). ``temperature=0`` is greedy; otherwise sampling with optional
    top-k / top-p, reproducible with ``seed``: each prompt draws from its own random stream seeded
    with it, so a prompt's answer is the same alone or in any batch (equal prompts in one call draw
    equal answers; give them different seeds, or none, for different ones). ``num_beams`` > 1 is
    beam search (greedy only), answers scored by log-probability / length ** ``length_penalty`` as
    in transformers; with ``mbr`` (minimum Bayes risk), of its finished answers the one that agrees
    best with the others (highest expected word-overlap F1, each weighted by its probability)
    instead of the top-scored;
    with ``mbr_samples`` S >= 2, S answers are also sampled at temperature 1 (the model's own
    distribution, or context-aware decoding's scores; reproducible with ``seed``), and every finished
    beam and sample is scored by its mean F1 against the S samples (a Monte Carlo estimate of its
    expected F1) instead.
    ``extractive``: each answer is a verbatim span of its prompt's source texts (``extractive``
    module; the sources are passed with the prompts), without the whitespace around it.
    ``context_contrast`` a > 0 is context-aware decoding (Shi et al., 2024): each next token is
    scored by (1 + a) log p(token | prompt) - a log p(token | the same prompt without its contexts),
    which favours what the contexts say over what the model would answer from the question alone;
    the prompts without contexts are passed with the prompts (``contrast_prompts``) and read in the
    same model state. Tokens whose probability given the prompt is below ``contrast_plausibility``
    times the likeliest token's are never chosen (the adaptive plausibility constraint of Li et al.,
    2023), so the contrast only reorders tokens the model finds plausible, the end of the answer
    among them."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    extractive: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    mbr: bool = False
    mbr_samples: int = 0
    context_contrast: float = 0.0
    contrast_plausibility: float = 0.1

    def __post_init__(self):
        self._check_types()
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(
                f"temperature must be >= 0 (0 decodes greedily, 1 samples from the model), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(
                f"top_p must be in (0, 1] (1 samples from every token), got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (0 samples from every token), got {self.top_k}")
        if self.seed is not None and not _SEEDS[0] <= self.seed <= _SEEDS[1]:
            raise InvalidInputError(
                f"seed must be a whole number from {_SEEDS[0]} to {_SEEDS[1]} (what torch can seed), got {self.seed}")
        if self.num_beams < 1:
            raise InvalidInputError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and (self.temperature > 0 or self.extractive):
            raise InvalidInputError("beam search (num_beams > 1) decodes greedily and freely: set temperature=0 "
                                    "and extractive=False, or num_beams=1")
        if not self.context_contrast >= 0:
            raise InvalidInputError(
                f"context_contrast must be >= 0 (0 decodes without contrast), got {self.context_contrast}")
        if not 0 <= self.contrast_plausibility <= 1:
            raise InvalidInputError(f"contrast_plausibility must be in [0, 1], got {self.contrast_plausibility}")
        if self.mbr and self.num_beams < 2:
            raise InvalidInputError("mbr chooses among beam search's answers: set num_beams >= 2, or mbr=False")
        if self.mbr_samples and not (self.mbr and self.mbr_samples >= 2):
            raise InvalidInputError(
                f"mbr_samples={self.mbr_samples}: sampled answers are the evidence of minimum Bayes risk, and an "
                "expected F1 needs at least 2 of them: set mbr=True (with num_beams >= 2) and mbr_samples >= 2, "
                "or mbr_samples=0")

    def _check_types(self) -> None:
        """Whole numbers where counts are meant, finite numbers elsewhere; a single stop string or
        token id is read as a tuple of one (a string is not split into characters), and ``None`` as
        none (as frameworks pass ``stop=None``)."""
        for name in ("max_new_tokens", "top_k", "num_beams", "mbr_samples", "seed"):
            value = getattr(self, name)
            if (value is not None or name != "seed") and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise InvalidInputError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p", "length_penalty", "context_contrast", "contrast_plausibility"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
        for name in ("extractive", "mbr"):  # "no" or "False" would read as true
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        stop = _as_tuple(self.stop, str, "stop", "stop strings")
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidInputError(f"stop strings must be non-empty strings, got {stop!r}")
        stop_token_ids = _as_tuple(self.stop_token_ids, Integral, "stop_token_ids", "token ids (whole numbers)")
        if not all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
            raise InvalidInputError(f"stop_token_ids must be token ids (whole numbers >= 0), got {stop_token_ids!r}")
        object.__setattr__(self, "stop", stop)  # frozen: set once, here
        object.__setattr__(self, "stop_token_ids", stop_token_ids)

    @classmethod
    def from_call(cls, defaults: object, call: Mapping[str, Any], stop: Iterable[str] | None = None,
                  recommended: Mapping[str, Any] | None = None) -> GenerationConfig:
        """One call's settings in a framework wrapper: ``max_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``seed``, ``extractive``, ``num_beams``, ``length_penalty`` and ``mbr`` from the call's
        keyword arguments, else the wrapper's attributes of those names; stop strings are the
        wrapper's ``stop`` and then the call's, once each. ``recommended`` (the compressor's
        ``recommended_decoding``) fills the settings that neither the call nor the wrapper (a pydantic
        model: the fields it was built or assigned with) chose, unless what was chosen does not
        combine with it (``temperature`` > 0 or ``extractive`` with beams, ``num_beams=1`` with
        ``mbr``): then it is left out whole."""
        chosen = {*call, *getattr(defaults, "model_fields_set", ())}

        def setting(name: str) -> Any:
            return call.get(name, getattr(defaults, name))

        stops = dict.fromkeys([*(getattr(defaults, "stop", None) or []), *(stop or [])])
        settings = dict(max_new_tokens=setting("max_tokens"), temperature=setting("temperature"),
                        top_k=setting("top_k"), top_p=setting("top_p"), seed=setting("seed"),
                        stop=tuple(s for s in stops if s), extractive=setting("extractive"),
                        num_beams=setting("num_beams"), length_penalty=setting("length_penalty"), mbr=setting("mbr"))
        return cls._recommended_over(settings, recommended, chosen)

    def with_recommended(self, recommended: Mapping[str, Any] | None, chosen: Iterable[str] = ()) -> GenerationConfig:
        """This config with a compressor's ``recommended`` decoding in every setting not in ``chosen``,
        or this config as it is if the two do not combine (say ``extractive=True`` chosen and beams
        recommended)."""
        return self._recommended_over({f.name: getattr(self, f.name) for f in fields(self)}, recommended, chosen)

    @classmethod
    def _recommended_over(cls, settings: Mapping[str, Any], recommended: Mapping[str, Any] | None,
                          chosen: Iterable[str]) -> GenerationConfig:
        """``settings`` with ``recommended`` in every setting not in ``chosen``, or ``settings`` alone if the two
        do not combine. Judged together, not ``settings`` first: ``mbr=True`` chosen alone takes the
        recommended beams instead of being refused for having none."""
        chosen = set(chosen)
        filled = {k: v for k, v in (recommended or {}).items() if k not in chosen}
        try:
            return cls(**{**settings, **filled})
        except InvalidInputError:
            return cls(**settings)


_SEEDS = (-(2 ** 63), 2 ** 64 - 1)  # the seeds torch.Generator.manual_seed takes
# The K/V of the text before a prompt's first compressed context (a template's context prefix) that a
# Generator keeps for the next prompts: this many of them, each of at most this many tokens.
KEPT_OPENINGS = 4
KEPT_OPENING_TOKENS = 128

DECODING_STRATEGY = ("temperature", "top_k", "top_p", "num_beams", "length_penalty", "mbr", "extractive")
"""The settings that choose how an answer is decoded (not how long it may be, where it stops or its
seed). A compressor's ``recommended_decoding`` holds only these, and fills those a caller leaves unset
(``GenerationConfig.with_recommended``)."""


def check_recommended_decoding(settings: object, source: str) -> dict[str, Any]:
    """A recommended decoding as a plain dict, refused (``InvalidInputError`` naming ``source``) unless
    it is a mapping of ``DECODING_STRATEGY`` settings that ``GenerationConfig`` takes together."""
    if not isinstance(settings, Mapping):
        raise InvalidInputError(f"the recommended decoding in {source} must be a mapping of decoding settings, "
                                f"e.g. {{'num_beams': 8, 'mbr': True}}, got {settings!r}")
    unknown = set(settings) - set(DECODING_STRATEGY)
    if unknown:
        raise InvalidInputError(f"the recommended decoding in {source} names {sorted(unknown)}: it may set only "
                                f"{', '.join(DECODING_STRATEGY)}")
    try:
        GenerationConfig(**settings)
    except InvalidInputError as err:
        raise InvalidInputError(f"the recommended decoding in {source} is not a valid decoding: {err}") from None
    return dict(settings)


def checked_config(config: object, name: str = "config") -> GenerationConfig | None:
    """``config`` if it is a ``GenerationConfig`` (or None: the default settings); anything else is
    refused, naming ``name`` and saying what to pass."""
    if config is None or isinstance(config, GenerationConfig):
        return config
    hint = f" (GenerationConfig(**{name}))" if isinstance(config, Mapping) else ""
    raise InvalidInputError(f"{name} must be a GenerationConfig, e.g. GenerationConfig(max_new_tokens=32), got "
                            f"{type(config).__name__}{hint}")


def _as_tuple(value: Any, single: type, name: str, what: str) -> tuple:
    """A setting that holds several values as a tuple: ``None`` is none, a ``single`` value is one;
    anything else must be iterable (a list, a tuple)."""
    if value is None:
        return ()
    if isinstance(value, single):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be {what}, one or a list of them, got {value!r}") from None


@dataclass
class Generation:
    """One answer and what producing it cost. ``text`` never ends inside a character: an answer
    that stopped after part of a character's bytes (at the length limit, or with an end token the
    model chose there) is shown without them, though ``token_ids`` keeps their tokens; an extractive
    answer's text has no whitespace at either end, and an answer to a prompt in its compressor's
    layout (ending with the template's ``answer_opening``) none at its start."""

    text: str
    token_ids: list[int]  # every token the answer generated (not its end token)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text_tokens: int  # prompt tokens the decoder read as text
    cached_tokens: int  # K/V entries spliced in from compressed contexts
    context_tokens: int  # tokens those compressed contexts stand for


@dataclass
class _Prefilled:
    cache: object  # transformers DynamicCache
    position: int  # position of the next token
    logits: torch.Tensor  # [vocab] for the next token; or [tokens, vocab] with all_logits
    text_tokens: int = 0
    cached_tokens: int = 0
    context_tokens: int = 0
    reads_cache: bool = False  # the prompt has compressed contexts (decoded in decoder_mode)
    opens_answer: bool = False  # the prompt ends where its template's answer begins (``Generator.answer_opening``)


@dataclass
class _Reading:
    """Prompts decoded together: their merged cache, which of its entries each row sees, each row's
    next position and its next-token logits."""

    cache: object
    mask: torch.Tensor  # [rows, entries]
    positions: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]


@dataclass
class _Track:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    span: SpanConstraint | None = None  # extractive decoding: the answer quotes these sources


class Generator:
    """Greedy or sampled decoding from prompts of text and compressed contexts.

    Build it from a compressor (``Generator.from_compressor``: the same model object, adapter
    off) or from any causal LM (``Generator(model, tokenizer)``) for full-text baselines.

    ``decoder_mode`` is the model state for prompts that read compressed contexts (the frozen
    LM, or the LM with a compressor's decoder adapter); ``text_mode`` the state for prompts of
    text only (default: the same). A compressor's decoder adapter was trained to read its caches
    only, so ``from_compressor`` answers text-only prompts with the frozen LM: full-text
    baselines through a SAC generator are the plain model's. ``reader``, if given, is a separate
    model that reads the prompts with compressed contexts instead of ``model`` in ``decoder_mode``
    (``from_compressor(..., merge_decoder=True)``: the decoder adapter merged into a copy).

    With ``GenerationConfig(extractive=True)``, ``sources`` gives each prompt the texts its
    answer must quote (the texts its compressed contexts were made from).

    It keeps the K/V of the text that opens recent prompts before their first compressed context
    (a template's context prefix, read the same for every prompt) and reuses them while the model
    and its weights stay as they were (``_read_opening``): the same numbers, one forward pass less.
    """

    def __init__(self, model, tokenizer, decoder_mode: Callable[[], contextlib.AbstractContextManager] | None = None,
                 base_fingerprint: str | None = None, accepts: Callable[[str], bool] | None = None,
                 text_mode: Callable[[], contextlib.AbstractContextManager] | None = None, reader=None):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder_mode = decoder_mode or contextlib.nullcontext
        self.text_mode = text_mode or self.decoder_mode
        self.reader = reader  # a separate model for prompts with compressed contexts (replaces decoder_mode)
        self.base_fingerprint = base_fingerprint or base_model_fingerprint(model, tokenizer)
        # Which compressed data this decoder can read: by default anything made on the same base
        # model (the decoder is the frozen base); a compressor with a decoder adapter narrows it.
        self._accepts = accepts or (lambda fingerprint: same_base_model(fingerprint, self.base_fingerprint))
        self.reads = lambda: self.base_fingerprint  # the fingerprint a refusal names as what this decoder reads
        self.rotator = KeyRotator.from_model(model)
        text_config = model.config.get_text_config(decoder=True)
        self.num_layers = text_config.num_hidden_layers
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self._bos = bos_ids(tokenizer)
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_token_ids = {e for e in eos if e is not None}
        self._vocabulary: Vocabulary | None = None
        # A prompt that ends with this text (its template's, after the question) is answered without
        # leading whitespace: the decoder was trained to begin the answer right there, so a space or
        # line break it puts first (`` Miriam Rees``) is no part of the answer.
        self.answer_opening: str | None = None
        self._openings: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    @classmethod
    def from_compressor(cls, compressor, merge_decoder: bool = False) -> Generator:
        """A generator sharing the compressor's model. ``merge_decoder``: read compressed contexts
        with ``compressor.merged_decoder()`` instead, a copy with the decoder adapter merged into
        its weights, which decodes faster (no LoRA layers per step) and costs one more copy of the
        adapted weights. The copy is a snapshot, so the generator then reads only caches made by the
        compressor's weights as they were when it was built."""
        accepts = text_mode = reader = None
        if merge_decoder:
            reader = compressor.merged_decoder()
        if compressor.config.decoder_lora_rank:  # its decoder was trained with its own encoder, on caches
            snapshot = compressor.fingerprint  # what a merged copy holds; the live weights may move on
            accepts = lambda fingerprint: same_model(  # noqa: E731
                fingerprint, snapshot if merge_decoder else compressor.fingerprint)
            text_mode = compressor.frozen_mode
        generator = cls(compressor.base_model, compressor.tokenizer, compressor.decoder_mode,
                        compressor.base_fingerprint, accepts, text_mode=text_mode, reader=reader)
        if compressor.config.decoder_lora_rank:
            generator.reads = lambda: snapshot if merge_decoder else compressor.fingerprint
        generator.answer_opening = compressor.config.prompt.answer_opening
        return generator

    @property
    def device(self) -> torch.device:
        """Where the model reads its inputs (the first GPU of a model sharded with ``device_map``)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # -- public API ---------------------------------------------------------------------------

    def generate(self, prompt: Prompt, config: GenerationConfig | None = None,
                 sources: Sequence[str] | None = None, contrast_prompt: Prompt | None = None) -> Generation:
        return self.generate_batch([prompt], config, None if sources is None else [sources],
                                   None if contrast_prompt is None else [contrast_prompt])[0]

    def generate_batch(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None,
                       sources: Sequence[Sequence[str]] | None = None,
                       contrast_prompts: Sequence[Prompt] | None = None) -> list[Generation]:
        """Decode several prompts together (their caches may differ in length). ``sources``: with
        extractive decoding, the texts each answer may quote; ``contrast_prompts``: with
        ``context_contrast``, each prompt without its contexts."""
        config = checked_config(config) or GenerationConfig()
        if isinstance(prompts, (str, AnchorKV)) or not isinstance(prompts, Sequence) or not len(prompts):
            raise InvalidInputError(f"generate_batch takes a non-empty list of prompts, got {prompts!r:.40}")
        _check_sources(config, sources, len(prompts))
        _check_contrast(config, contrast_prompts, len(prompts))
        if self.text_mode is not self.decoder_mode or self.reader is not None:  # text-only prompts decode otherwise
            groups = grouped([any(isinstance(s, AnchorKV) for s in self._segments(p)) for p in prompts])
            if len(groups) > 1:
                results: dict[int, Generation] = {}
                for _, index in groups:
                    results.update(zip(index, self.generate_batch(
                        [prompts[i] for i in index], config, None if sources is None else [sources[i] for i in index],
                        None if contrast_prompts is None else [contrast_prompts[i] for i in index])))
                return [results[i] for i in range(len(prompts))]
        states, tracks = self._start(prompts, sources)
        plain = self._start_contrast(contrast_prompts, states)
        if config.num_beams > 1:
            return [self._result(state, self._search(state, config, None if plain is None else plain[i]))
                    for i, state in enumerate(states)]
        for _ in self._decode(states, tracks, config, plain):
            pass
        return [self._result(s, t) for s, t in zip(states, tracks)]

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None,
               sources: Sequence[str] | None = None, contrast_prompt: Prompt | None = None,
               lock: contextlib.AbstractContextManager | None = None) -> Iterator[str]:
        """Yield the answer's text as it is decoded (never a partial stop string); with beam search
        (``num_beams`` > 1), which settles on its answer only at the end, the whole answer at once.

        Nothing runs before the first piece is asked for. Each step takes ``lock`` (the one every
        user of the model holds, if any) and puts the model in its decoding state (a compressor's
        adapters switched) only while it computes, so between pieces the model is free: the caller
        may compress, answer or stream with it, from this thread or another."""
        for item in self.stream_with_usage(prompt, config, sources, contrast_prompt, lock):
            if isinstance(item, str):
                yield item

    def stream_with_usage(self, prompt: Prompt, config: GenerationConfig | None = None,
                          sources: Sequence[str] | None = None, contrast_prompt: Prompt | None = None,
                          lock: contextlib.AbstractContextManager | None = None) -> Iterator[str | Generation]:
        """``stream``'s pieces, then the finished ``Generation`` (its usage figures)."""
        config = checked_config(config) or GenerationConfig()
        sources = None if sources is None else [sources]
        contrast_prompts = None if contrast_prompt is None else [contrast_prompt]
        _check_sources(config, sources, 1)
        _check_contrast(config, contrast_prompts, 1)
        with lock or contextlib.nullcontext():
            states, tracks = self._start([prompt], sources)
            plain = self._start_contrast(contrast_prompts, states)
        yield from self._pieces(states, tracks, config, plain, lock)
        yield self._result(states[0], tracks[0])

    def _pieces(self, states: list[_Prefilled], tracks: list[_Track], config: GenerationConfig,
                plain: list[_Prefilled] | None = None,
                lock: contextlib.AbstractContextManager | None = None) -> Iterator[str]:
        """Decode the one prompt of ``states``, yielding its text as ``stream`` does, each step holding
        ``lock`` (if any); ``tracks[0]`` is then the finished answer."""
        lock = lock or contextlib.nullcontext()
        track, emitted = tracks[0], 0  # ``emitted``: how much of the answer's shown text was yielded
        if config.num_beams > 1:
            with lock:
                tracks[0] = track = self._search(states[0], config, None if plain is None else plain[0])
        else:
            for _ in self._decode(states, tracks, config, plain, step_lock=lock):
                shown = _shown(states[0], track.text[:self._safe_length(track, config)])
                if len(shown) > emitted:
                    yield shown[emitted:]
                    emitted = len(shown)
        shown = _shown(states[0], track.text)
        if len(shown) > emitted:
            yield shown[emitted:]

    @torch.no_grad()
    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits ``[tokens, vocab]`` over the prompt's final text segment (for exactness checks)."""
        return self._prefill(prompt, all_logits=True).logits

    # -- prefill --------------------------------------------------------------------------------

    def _start(self, prompts: Sequence[Prompt],
               sources: Sequence[Sequence[str]] | None = None) -> tuple[list[_Prefilled], list[_Track]]:
        if isinstance(prompts, (str, AnchorKV)) or not len(prompts):
            raise InvalidInputError("generate_batch takes a non-empty list of prompts")
        if sources is None:
            tracks = [_Track() for _ in prompts]
        else:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer, self.eos_token_ids)
            tracks = [_Track(span=self._vocabulary.constraint(texts)) for texts in sources]
        with torch.no_grad():
            states = [self._prefill(p) for p in prompts]
        return states, tracks

    def _start_contrast(self, contrast_prompts: Sequence[Prompt] | None,
                        states: list[_Prefilled]) -> list[_Prefilled] | None:
        """The prompts without contexts, prefilled in the model state of the prompts they stand beside
        (a compressor's decoder adapter reads both, so only the contexts differ)."""
        if contrast_prompts is None:
            return None
        if any(isinstance(seg, AnchorKV) for p in contrast_prompts for seg in self._segments(p)):
            raise InvalidInputError("a contrast prompt is its prompt without the contexts: it must be text only")
        with torch.no_grad():
            return [self._prefill(p, reads_cache=s.reads_cache) for p, s in zip(contrast_prompts, states)]

    def _segments(self, prompt: Prompt) -> list[Segment]:
        if isinstance(prompt, (str, AnchorKV)):
            prompt = [prompt]
        if not isinstance(prompt, Iterable):
            raise PromptError(f"a prompt is a str or a list of segments (str, AnchorKV or a list of AnchorKV); got "
                              f"{type(prompt).__name__}")
        flat: list[Segment] = []
        for seg in prompt:
            if isinstance(seg, (str, AnchorKV)):
                flat.append(seg)
            elif isinstance(seg, Sequence) and all(isinstance(s, AnchorKV) for s in seg):
                flat.extend(seg)
            else:
                raise PromptError(
                    f"a prompt segment must be a str, an AnchorKV or a list of AnchorKV; got {type(seg).__name__}"
                )
        flat = [s for s in flat if not (isinstance(s, str) and s == "")]
        if not flat or not isinstance(flat[-1], str):
            raise PromptError(
                "the prompt must end with text (e.g. the question): the decoder needs a token to "
                "predict the answer from"
            )
        return flat

    def _prefill(self, prompt: Prompt, all_logits: bool = False, reads_cache: bool | None = None) -> _Prefilled:
        """Read a prompt into a fresh cache, in the decoder's state for compressed contexts if it has
        any (or if ``reads_cache`` says so), else in the state for text."""
        from transformers import DynamicCache

        segments = self._segments(prompt)
        cache = DynamicCache(config=self.model.config)
        if reads_cache is None:
            reads_cache = any(isinstance(seg, AnchorKV) for seg in segments)
        opens_answer = bool(self.answer_opening) and segments[-1].endswith(self.answer_opening)
        state = _Prefilled(cache=cache, position=0, logits=None, reads_cache=reads_cache, opens_answer=opens_answer)
        parts = self._token_parts(segments)
        # the whole prompt's positions, before any is read (the error then names them all)
        self._check_room(len(self._bos) + sum(p.n_tokens if isinstance(p, AnchorKV) else len(p) for p in parts))
        pending: list[int] = list(self._bos)
        with self._reading_model(state.reads_cache) as model:
            devices = None
            for i, seg in enumerate(parts):
                if isinstance(seg, list):
                    pending += seg
                    if i == len(parts) - 1:
                        self._read_text(model, state, pending, all_logits)
                    continue
                if pending:
                    if state.position == 0:
                        self._read_opening(model, state, pending)
                    else:
                        self._read_text(model, state, pending, all_logits=False)
                    pending = []
                devices = devices or layer_devices(model, self.num_layers)
                self._splice(state, seg, devices)
        return state

    def _token_parts(self, segments: Sequence[Any]) -> list:
        """``segments`` with each text one as the token ids the decoder reads it as (a BOS token the
        prompt writes itself dropped: the decoder puts its own first); others as they are."""
        parts = []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                ids = prompt_ids(self.tokenizer, seg)  # the user's text in it read as plain text
                if i == 0 and self._bos and ids[:1] == self._bos:
                    ids = ids[1:]  # the prompt writes the BOS token itself (a chat template did): read once
                seg = ids
            parts.append(seg)
        return parts

    def text_positions(self, segments: Sequence[Any]) -> int:
        """The positions the text of a prompt's ``segments`` takes as the decoder reads it, its BOS token
        included; the other segments (compressed contexts, or stand-ins for them) are not counted."""
        return len(self._bos) + sum(len(p) for p in self._token_parts(segments) if isinstance(p, list))

    @contextlib.contextmanager
    def _reading_model(self, reads_cache: bool) -> Iterator[Any]:
        """The model that reads a prompt, in its state: ``reader`` for prompts with compressed
        contexts if there is one, else ``model`` in ``decoder_mode`` (or ``text_mode``)."""
        if reads_cache and self.reader is not None:
            yield self.reader
            return
        with (self.decoder_mode if reads_cache else self.text_mode)():
            yield self.model

    def _check_room(self, position: int) -> None:
        if self.max_positions is not None and position > self.max_positions:
            raise PromptTooLongError(
                f"the prompt needs {position} positions but the model has {self.max_positions}: "
                "retrieve fewer or shorter contexts (compressed contexts keep their tokens' positions), "
                "or shorten the question (in a chat, the earlier turns are read too: keep fewer of them)"
            )

    def _read_text(self, model, state: _Prefilled, ids: list[int], all_logits: bool) -> None:
        self._check_room(state.position + len(ids))
        device = self.device
        past = state.cache.get_seq_length()
        out = model(
            input_ids=torch.as_tensor([ids], device=device),
            position_ids=torch.arange(state.position, state.position + len(ids), device=device)[None],
            attention_mask=torch.ones(1, past + len(ids), dtype=torch.long, device=device),
            cache=state.cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        state.logits = out.logits[0] if all_logits else out.logits[0, -1]
        state.position += len(ids)
        state.text_tokens += len(ids)

    def _read_opening(self, model, state: _Prefilled, ids: list[int]) -> None:
        """Read the text before the prompt's first compressed context. It is the same for every
        prompt of a template (its context prefix: one more forward pass per prompt, as long as
        reading the question on a CPU, where a pass over a few tokens costs what reading the weights
        costs), so its K/V are kept and put back, exactly as read, while the model, its state and
        its weights stay the same (torch's per-tensor version counters: an in-place update, an
        optimizer step or a load, changes them)."""
        if len(ids) > KEPT_OPENING_TOKENS:
            self._read_text(model, state, ids, all_logits=False)
            return
        key = (id(model), tuple(ids), state.reads_cache, *((p._version, p.data_ptr()) for p in model.parameters()))
        kept = self._openings.get(key)
        if kept is None:
            self._read_text(model, state, ids, all_logits=False)
            self._openings[key] = [(layer.keys.clone(), layer.values.clone()) for layer in state.cache.layers]
            while len(self._openings) > KEPT_OPENINGS:
                self._openings.popitem(last=False)
            return
        self._openings.move_to_end(key)
        self._check_room(state.position + len(ids))
        for layer, (keys, values) in zip(state.cache.layers, kept):
            layer.update(keys.clone(), values.clone())
        state.position += len(ids)
        state.text_tokens += len(ids)

    def _splice(self, state: _Prefilled, kv: AnchorKV, devices: Sequence[torch.device]) -> None:
        """Put ``kv`` at the prompt's running position: each layer's K/V on the device of the layer
        that reads them (``devices``; a model sharded over GPUs has several) in the decoder's dtype."""
        if not self._accepts(kv.fingerprint):
            advice = ("compress it again with the compressor in use, or decode with the compressor it was made by"
                      if self.reader is None else
                      "the merged decoder (merge_decoder=True) is a copy of the compressor's weights as they were "
                      "when it was made, and reads only caches of those weights: if the compressor's weights have "
                      "changed since, make the merged decoder again (SAC(..., merge_decoder=True)), or decode with "
                      "the compressor the context was made by")
            raise FingerprintMismatchError("a compressed context", self.reads(), kv.fingerprint, advice)
        self._check_room(state.position + kv.n_tokens)
        # Rotated in float32 (as KeyRotator computes) and rounded to the decoder's dtype once, after.
        work = torch.float64 if kv.keys.dtype == torch.float64 else torch.float32
        placed = kv.to(self.device, work).at_offset(state.position, self.rotator)
        targets = []  # (device, dtype) per layer: where its cache is, else where the layer computes
        for layer in range(self.num_layers):
            cached = state.cache.layers[layer]
            ready = getattr(cached, "is_initialized", False) and isinstance(getattr(cached, "keys", None), torch.Tensor)
            targets.append((cached.keys.device, cached.keys.dtype) if ready else (devices[layer], self.dtype))
        if any(dtype == torch.float16 for _, dtype in targets):
            _check_float16_range(placed)
        if len(set(targets)) == 1:  # one device (a model on one GPU): one copy each
            keys, values = (placed.keys.to(*targets[0]), placed.values.to(*targets[0]))
        else:
            keys = [k.to(*target) for k, target in zip(placed.keys, targets)]
            values = [v.to(*target) for v, target in zip(placed.values, targets)]
        for layer, (k, v) in enumerate(zip(keys, values)):
            state.cache.layers[layer].update(k[None], v[None])
        state.position += kv.n_tokens
        state.cached_tokens += kv.n_anchors
        state.context_tokens += kv.n_tokens

    # -- decode ---------------------------------------------------------------------------------

    def _merged_cache(self, states: list[_Prefilled]):
        """One batch cache from per-prompt caches, left-padded; pads are masked as keys."""
        from transformers import DynamicCache

        lengths = [s.cache.get_seq_length() for s in states]
        width = max(lengths)
        mask = torch.zeros(len(states), width, dtype=torch.long, device=self.device)
        for b, n in enumerate(lengths):
            mask[b, width - n:] = 1
        if len(states) == 1:
            return states[0].cache, mask
        data = []
        for layer in range(self.num_layers):
            keys, values = [], []
            for s in states:
                # A sliding-window layer holds only a prompt's last window of entries; left-padded to
                # the batch's width as well, the merged cache crops it to the window again
                lay = s.cache.layers[layer]
                keys.append(F.pad(lay.keys, (0, 0, width - lay.keys.shape[-2], 0)))
                values.append(F.pad(lay.values, (0, 0, width - lay.values.shape[-2], 0)))
            data.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=data, config=self.model.config), mask

    @torch.no_grad()
    def _decode(self, states: list[_Prefilled], tracks: list[_Track], config: GenerationConfig,
                plain: list[_Prefilled] | None = None, one_stream: bool = False,
                step_lock: contextlib.AbstractContextManager | None = None) -> Iterator[None]:
        """Decode the prompts of ``states`` together into ``tracks``, yielding after each step. Each
        row may generate up to its own room before the model's position limit (``_step_budget``), so
        a long prompt in the batch does not cut the others' answers short. Sampling draws each row
        from its own random stream seeded with ``config.seed`` (the batch does not change a row's
        answer), or with ``one_stream`` all rows from one (copies of one prompt then draw different
        answers). The model is held in its reading state throughout; with ``step_lock``, only within
        each step, which takes the lock (a stream: the model is free while it is suspended)."""
        reading = self._reading(states)
        contrast = None if plain is None else self._reading(plain)
        readings = [r for r in (reading, contrast) if r is not None]
        farthest = torch.stack([r.positions for r in readings]).amax(0).tolist()  # per row, with or without contexts
        budgets = [self._step_budget(position, config) for position in farthest]
        generator = None
        if config.temperature > 0:  # on the device of the logits it samples from (a sharded model's last GPU)
            device = reading.logits.device
            generator = (_random_stream(config.seed, device) if one_stream
                         else [_random_stream(config.seed, device) for _ in states])
        stop_ids = self.eos_token_ids | set(config.stop_token_ids)
        reads_cache = states[0].reads_cache  # generate_batch groups prompts by model
        with contextlib.nullcontext() if step_lock else self._reading_model(reads_cache) as whole:
            for step in range(max(budgets)):
                with step_lock or contextlib.nullcontext():  # the tokenizer is not shared between threads either
                    logits = _contrasted(reading.logits, None if contrast is None else contrast.logits, config)
                    logits = self._held_to_spans(logits, tracks, config.stop_token_ids, reading.logits)
                    tokens = next_tokens(logits, config, generator)
                    for track, token, budget in zip(tracks, tokens.tolist(), budgets):
                        if track.finish_reason is None:
                            if track.span is not None:
                                track.span.advance(token)
                            self._append(track, token, stop_ids, config)
                            if track.finish_reason is None and step == budget - 1:
                                self._finish(track, "length")
                yield None
                if all(t.finish_reason for t in tracks):  # at the last step, every row has reached its budget
                    break
                stepping = self._locked_reading(step_lock, reads_cache) if step_lock else contextlib.nullcontext(whole)
                with stepping as model:
                    for batch in readings:
                        self._advance(model, batch, tokens)

    @contextlib.contextmanager
    def _locked_reading(self, lock: contextlib.AbstractContextManager, reads_cache: bool) -> Iterator[Any]:
        """``_reading_model`` entered holding ``lock``: one step of a stream."""
        with lock, self._reading_model(reads_cache) as model:
            yield model

    def _reading(self, states: list[_Prefilled]) -> _Reading:
        cache, mask = self._merged_cache(states)
        return _Reading(cache, mask, torch.as_tensor([s.position for s in states], device=self.device),
                        torch.stack([s.logits for s in states]))

    def _advance(self, model, reading: _Reading, tokens: torch.Tensor) -> None:
        """Each row of ``reading`` reads its next token: new logits, one more position."""
        reading.mask = torch.cat([reading.mask, reading.mask.new_ones(len(tokens), 1)], dim=1)
        reading.logits = self._step(model, tokens, reading.positions, reading.mask, reading.cache)
        reading.positions = reading.positions + 1
        if self.max_positions is not None:  # a row at the limit has finished: it reads on (unused) at the last one
            reading.positions = reading.positions.clamp(max=self.max_positions - 1)

    def _step_budget(self, position: int, config: GenerationConfig) -> int:
        """How many tokens one prompt may generate from ``position`` (its next token's): ``max_new_tokens``,
        or fewer at the model's context limit (the answer then finishes with "length")."""
        if self.max_positions is None:
            return config.max_new_tokens
        if position >= self.max_positions:  # the prompt was read, but its first answer token has no position
            raise PromptTooLongError(
                f"the prompt fills all {self.max_positions} positions of the model and leaves none for the answer: "
                "retrieve fewer or shorter contexts (compressed contexts keep their tokens' positions), or shorten "
                "the question"
            )
        return min(config.max_new_tokens, self.max_positions - position)

    def _search(self, state: _Prefilled, config: GenerationConfig, plain: _Prefilled | None = None) -> _Track:
        """Beam search's answer for one prefilled prompt: the best finished one, or with ``mbr`` their
        consensus (``_consensus``), weighed against ``mbr_samples`` sampled answers when asked."""
        samples = self._sample_answers(state, config, plain) if config.mbr_samples else None
        finished = self._beam_search(state, config, plain)
        return _consensus(finished, samples) if config.mbr else finished[0][1]

    def _sample_answers(self, state: _Prefilled, config: GenerationConfig, plain: _Prefilled | None) -> list[_Track]:
        """``config.mbr_samples`` answers to one prompt, sampled at temperature 1 from copies of its cache
        (so the beam search that follows starts from the prompt as it was)."""
        sampling = replace(config, temperature=1.0, top_k=0, top_p=1.0, num_beams=1, mbr=False, mbr_samples=0)
        n = config.mbr_samples
        tracks = [_Track() for _ in range(n)]
        for _ in self._decode([state] * n, tracks, sampling, None if plain is None else [plain] * n, one_stream=True):
            pass
        return tracks

    @torch.no_grad()
    def _beam_search(self, state: _Prefilled, config: GenerationConfig,
                     plain: _Prefilled | None = None) -> list[tuple[float, _Track]]:
        """Beam search from one prefilled prompt, as transformers' ``num_beams`` with its default
        ``early_stopping=False``. Each step scores every running answer's continuations and takes the
        (1 + end tokens) x ``num_beams`` best (``_beam_candidates``): those that end the answer (a stop
        token or string, or the length limit) and rank among the first ``num_beams`` are finished
        answers, scored by summed log-probability / length ** ``length_penalty`` (the ending token
        counted); the best ``num_beams`` others run on.
        The search ends when ``num_beams`` answers are finished and the best running one, scored at
        its current length, no longer beats the worst of them. Returns the finished answers with their
        summed log-probabilities, best-scored first. With ``plain`` (the prompt without its contexts), the
        log-probabilities are those of ``context_contrast``'s scores."""
        beams, lp = config.num_beams, config.length_penalty
        stop_ids = self.eos_token_ids | set(config.stop_token_ids)
        candidates = _beam_candidates(beams, len(stop_ids))
        states = [state, *([plain] if plain is not None else [])]
        steps = self._step_budget(max(s.position for s in states), config)
        running: list[tuple[_Track, float]] = [(_Track(), 0.0)]
        finished: list[tuple[float, float, _Track]] = []  # (normalised score, log-probability, answer), best first
        logits = state.logits[None]
        plain_logits = None if plain is None else plain.logits[None]
        with self._reading_model(state.reads_cache) as model:
            for step in range(steps):
                scores = torch.as_tensor([score for _, score in running], device=logits.device)[:, None]
                scores = scores + _contrasted(logits, plain_logits, config).float().log_softmax(-1)
                top = scores.flatten().topk(min(candidates, scores.numel()))
                parents, next_running = [], []
                for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    if score == float("-inf"):  # ruled out (context-aware decoding's plausibility), as all after it
                        break
                    parent, token = divmod(index, scores.shape[1])
                    track = _Track(ids=list(running[parent][0].ids), text=running[parent][0].text)
                    self._append(track, token, stop_ids, config)
                    if track.finish_reason is None and step == steps - 1:
                        self._finish(track, "length")
                    if track.finish_reason is not None:
                        if rank < beams:
                            finished.append((score / (step + 1) ** lp, score, track))
                    elif len(next_running) < beams:
                        parents.append(parent)
                        next_running.append((track, score))
                finished = sorted(finished, key=lambda f: -f[0])[:beams]
                if not next_running:
                    break
                best_running = next_running[0][1] / (step + 1) ** lp
                if len(finished) == beams and best_running <= finished[-1][0]:
                    break
                running = next_running
                tokens = torch.as_tensor([track.ids[-1] for track, _ in running], device=self.device)
                for s in states:
                    _select_rows(s.cache, parents)
                logits, *rest = [self._step(
                    model, tokens, torch.full((len(running),), s.position + step, device=self.device),
                    torch.ones(len(running), s.cache.get_seq_length() + 1, dtype=torch.long, device=self.device),
                    s.cache,
                ) for s in states]
                plain_logits = rest[0] if rest else None
        return [(log_prob, track) for _, log_prob, track in finished]

    def _step(self, model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step: each row reads its token ``[rows]`` at its position ``[rows]`` after
        its cache (``mask``: which cache entries and this token it may attend to); next-token logits."""
        out = model(input_ids=tokens[:, None], position_ids=positions[:, None], attention_mask=mask,
                         cache=cache, use_cache=True)
        return out.logits[:, -1]

    def _held_to_spans(self, logits: torch.Tensor, tracks: list[_Track], stop_token_ids: Sequence[int] = (),
                       plain_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Extractive decoding: mask each constrained row to the tokens that continue a span of its
        sources; a row whose model would rather end the answer (an end token or one of
        ``stop_token_ids``) finishes here. Where ``logits`` (context-aware decoding's scores) rule
        out every token a span allows, the row is held to the spans by ``plain_logits`` instead."""
        if all(t.span is None for t in tracks):
            return logits
        logits = logits.clone()
        for row, track in enumerate(tracks):
            if track.span is None or track.finish_reason is not None:
                continue
            masked, would_end = track.span.mask(logits[row], stop_token_ids)
            if not would_end and plain_logits is not None and not torch.isfinite(masked).any():
                masked, would_end = track.span.mask(plain_logits[row], stop_token_ids)
            if would_end:
                self._finish(track, "stop")
            else:
                logits[row] = masked
        return logits

    def _append(self, track: _Track, token: int, stop_ids: set[int], config: GenerationConfig) -> None:
        if token in stop_ids:
            self._finish(track, "stop")
            return
        track.ids.append(token)
        track.text = self._text(track.ids, quote=track.span is not None)
        cut = min((i for i in (track.text.find(s) for s in config.stop) if i >= 0), default=-1)
        if cut >= 0:
            track.text = track.text[:cut]
            self._finish(track, "stop", whole=False)

    def _text(self, ids: list[int], quote: bool) -> str:
        """The text of answer tokens ``ids``; a quote's without leading whitespace (it may start
        with the space before its first word)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.lstrip() if quote else text

    def _finish(self, track: _Track, reason: str, whole: bool = True) -> None:
        """End ``track``'s answer with ``reason`` and settle its text: without a character the answer
        stopped inside (``whole``: the text is all the answer's, not cut before a stop string, which
        follows it) and, for a quote, without trailing whitespace (it may end with the space before
        the word it stopped at). Streaming holds both back until then (``_safe_length``)."""
        track.finish_reason = reason
        if whole:
            track.text = self._without_partial_character(track)
        if track.span is not None:
            track.text = track.text.rstrip()

    def _without_partial_character(self, track: _Track) -> str:
        """``track``'s text without the U+FFFD that decoding shows for the bytes of a character the
        answer began and did not finish (one or more, depending on the tokenizer's decoder). Decoding
        the answer with that character completed tells them apart: the text then ends in the completed
        character, and what precedes it is the answer's text. A U+FFFD the answer spells in full, or
        bytes no continuation makes a character, stay. Without the vocabulary's bytes, every trailing
        U+FFFD is taken for part of a character, as streaming takes it."""
        if not track.text.endswith("\ufffd"):
            return track.text
        if self._spelling is None:
            return track.text.rstrip("\ufffd")
        spelled, byte_ids = self._spelling
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(spelled[i] or b"" for i in track.ids if i < len(spelled)))
        partial = decoder.getstate()[0]  # the bytes of a character begun and not finished, if any
        if not partial:
            return track.text
        completion = [byte_ids.get(byte) for byte in _completing_bytes(partial)]
        if None in completion:
            return track.text.rstrip("\ufffd")
        return self._text(track.ids + completion, quote=track.span is not None)[:-1]

    @functools.cached_property
    def _spelling(self) -> tuple[list[bytes | None], dict[int, int]] | None:
        """The bytes each token id stands for and the token id of each byte that is a token of its own
        (built once); ``None`` for a vocabulary ``token_bytes`` cannot spell."""
        try:
            spelled = token_bytes(self.tokenizer)
        except InvalidInputError:
            return None
        byte_ids: dict[int, int] = {}
        for token_id, data in enumerate(spelled):
            if data is not None and len(data) == 1:
                byte_ids.setdefault(data[0], token_id)
        return spelled, byte_ids

    @staticmethod
    def _safe_length(track: _Track, config: GenerationConfig) -> int:
        """How much of the text can be shown: hold back an incomplete UTF-8 character, any suffix
        that could still become a stop string and a quote's trailing whitespace (``_finish`` settles
        them; what is shown is always the start of the final text)."""
        text = track.text
        if track.finish_reason:
            return len(text)
        end = len(text.rstrip("\ufffd"))
        for stop in config.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        if track.span is not None:
            end = len(text[:end].rstrip())
        return end

    def _result(self, state: _Prefilled, track: _Track) -> Generation:
        return Generation(
            text=_shown(state, track.text),
            token_ids=track.ids,
            finish_reason=track.finish_reason or "length",
            text_tokens=state.text_tokens,
            cached_tokens=state.cached_tokens,
            context_tokens=state.context_tokens,
        )


def grouped(keys: Sequence) -> list[tuple[Any, list[int]]]:
    """Each distinct key (by ``==``, so unhashable ones too), in order of first appearance, with the
    indices where it occurs: to decode a batch in groups that share settings, then answer in order."""
    groups: list[tuple[Any, list[int]]] = []
    for i, key in enumerate(keys):
        found = next((index for seen, index in groups if seen == key), None)
        if found is None:
            groups.append((key, [i]))
        else:
            found.append(i)
    return groups


def bos_ids(tokenizer) -> list[int]:
    """``[BOS]`` for a tokenizer that starts every text with its BOS token (Llama, Mistral, Gemma),
    else ``[]`` (SmolLM2, Qwen): what a prompt begins with, in training as in answering."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


_FLOAT16_OVERFLOW = 65520.0  # the least magnitude float16 rounds to inf (its largest value is 65504)


def _check_float16_range(placed: AnchorKV) -> None:
    """Refuse a chunk (placed, in float32) whose K/V do not fit float16: a float16 decoder would
    read them as inf, and answer from NaN. A chunk made in bfloat16 or float32 can hold such values,
    and moving it (a rotation) can take a key a little past float16's range too. One sync per chunk."""
    largest = torch.maximum(placed.keys.abs().amax(), placed.values.abs().amax())
    if bool(largest >= _FLOAT16_OVERFLOW):
        raise InvalidInputError(
            f"a compressed context's K/V hold values up to {float(largest):g}, beyond float16's range (65504), "
            "which this float16 decoder would read as inf (and answer from NaN): decode in bfloat16 or float32 "
            "(dtype='bfloat16'), or compress with the float16 model")


def _select_rows(cache, rows: Sequence[int]) -> None:
    """Keep rows ``rows`` of every layer of ``cache`` (in that order), each layer indexed on its own
    device: the layers of a model sharded over GPUs cache on different ones."""
    index = torch.as_tensor(rows, dtype=torch.long)
    on_device: dict[torch.device, torch.Tensor] = {}
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            device = layer.keys.device
            if device not in on_device:
                on_device[device] = index.to(device)
            layer.batch_select_indices(on_device[device])


def _beam_candidates(beams: int, end_tokens: int) -> int:
    """How many continuations beam search weighs at each step, as transformers does: (1 + the number of
    end tokens) x ``beams``, at least 2 x ``beams``. Each end token can end one continuation of every
    beam, so with fewer, the best ``beams`` of them could all end (an EOS id and a stop token id among
    them) and leave fewer than ``beams`` answers running; the search would then explore less than
    transformers' and find other answers."""
    return max(2, 1 + end_tokens) * beams


def _check_per_prompt(needed: bool, given, n_prompts: int, unneeded: str, missing: str, count: str) -> None:
    """An input a decoding setting reads beside the prompts (one per prompt): given exactly when the
    setting asks for it; ``unneeded``, ``missing`` and ``count`` (which names what was given) say why not."""
    if not needed:
        if given is not None:
            raise InvalidInputError(unneeded)
        return
    if given is None:
        raise InvalidInputError(missing)
    if isinstance(given, (str, AnchorKV)) or len(given) != n_prompts:
        raise InvalidInputError(f"got {len(given)} {count} for {n_prompts} prompts; give one per prompt")


def _check_sources(config: GenerationConfig, sources, n_prompts: int) -> None:
    _check_per_prompt(config.extractive, sources, n_prompts,
                      "sources are the texts extractive answers quote: set GenerationConfig(extractive=True), "
                      "or pass no sources",
                      "extractive decoding needs the texts the answers may quote: pass sources (one list of texts "
                      "per prompt, e.g. the contexts before compression)", "lists of sources")


def _check_contrast(config: GenerationConfig, contrast_prompts, n_prompts: int) -> None:
    _check_per_prompt(bool(config.context_contrast), contrast_prompts, n_prompts,
                      "contrast prompts are read by context-aware decoding: set GenerationConfig(context_contrast=a) "
                      "with a > 0, or pass no contrast prompts",
                      "context-aware decoding (context_contrast > 0) needs each prompt without its contexts: pass "
                      "contrast_prompt= to generate/stream or contrast_prompts= to generate_batch (e.g. "
                      "compressor.template.build([], question)); SAC.answer builds them itself", "contrast prompts")


def _completing_bytes(partial: bytes) -> bytes:
    """Continuation bytes that complete the UTF-8 character ``partial`` begins (a valid start of
    one): the lowest allowed, 0x80, except after the leads E0 and F0, whose next byte is higher
    (lower ones would spell a shorter form)."""
    size = 2 if partial[0] < 0xE0 else 3 if partial[0] < 0xF0 else 4
    second = bytes([{0xE0: 0xA0, 0xF0: 0x90}.get(partial[0], 0x80)]) if len(partial) == 1 else b""
    return second + b"\x80" * (size - max(len(partial), 2))


def _contrasted(logits: torch.Tensor, plain_logits: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Context-aware decoding's scores: (1 + a) log p(. | prompt) - a log p(. | prompt without contexts),
    -inf for the tokens the plausibility constraint rules out; ``logits`` unchanged without contrast."""
    a = config.context_contrast
    if plain_logits is None or not a:
        return logits
    log_p = logits.float().log_softmax(-1)
    scores = (1 + a) * log_p - a * plain_logits.float().log_softmax(-1)
    if config.contrast_plausibility > 0:
        floor = log_p.max(-1, keepdim=True).values + math.log(config.contrast_plausibility)
        scores = scores.masked_fill(log_p < floor, float("-inf"))
    return scores


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits`` / ``temperature``, each row shifted first so that its largest is 0 (the same
    distribution): with a very small temperature the others go to -inf and the likeliest token stays
    at 0, where dividing the logits themselves overflows to inf (and samples from NaN). A temperature
    below the dtype's smallest normal number would round to 0 and divide 0 by 0: it divides by that
    number instead, which leaves the same distribution (only the likeliest tokens). A row of -inf only
    (every token ruled out) stays as it is."""
    top = logits.amax(dim=-1, keepdim=True)
    return (logits - top.masked_fill(~torch.isfinite(top), 0)) / max(temperature, torch.finfo(logits.dtype).tiny)


def _random_stream(seed: int | None, device: torch.device) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed``, or with a fresh random seed (leaving
    torch's global generator as it was)."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def next_tokens(logits: torch.Tensor, config: GenerationConfig,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: argmax when greedy, else temperature / top-k / top-p sampling, drawn
    from ``generator``, or from each row's own if given one per row."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    scores = _tempered(logits.float(), config.temperature)
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > config.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probabilities = scores.softmax(-1)
    if isinstance(generator, torch.Generator) or generator is None:
        return torch.multinomial(probabilities, 1, generator=generator)[:, 0]
    return torch.cat([torch.multinomial(row[None], 1, generator=g)[:, 0] for row, g in zip(probabilities, generator)])


def _shown(state: _Prefilled, text: str) -> str:
    """An answer's text as it is shown: without leading whitespace after a prompt that opens the
    answer (``Generator.answer_opening``). Stop strings are searched in the text as decoded, so an
    answer that begins with a line break and a stop string still stops there."""
    return text.lstrip() if state.opens_answer else text


def _consensus(answers: Sequence[tuple[float, _Track]], samples: Sequence[_Track] | None = None) -> _Track:
    """Minimum Bayes risk over ``(log-probability, answer)`` pairs: the answer with the highest
    expected word-overlap F1 (SQuAD-normalised) against all of them, each weighted by its
    probability renormalised over the pairs. With ``samples`` (answers drawn from the model), the
    samples are candidates too, and each candidate's expected F1 is its mean F1 against the samples,
    whatever the pairs' log-probabilities. A tie goes to the earlier candidate (the pairs first)."""
    candidates = [track for _, track in answers]
    if samples:
        candidates += samples
        evidence = [(1 / len(samples), sample) for sample in samples]
    else:
        weights = torch.as_tensor([log_prob for log_prob, _ in answers], dtype=torch.float64).softmax(0).tolist()
        evidence = list(zip(weights, candidates))
    expected = [sum(w * answer_agreement(track.text, other.text) for w, other in evidence) for track in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (expected[i], -i))]
