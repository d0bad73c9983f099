"""``SAC``: a compressor and its decoder in one object, for the three-line use case.

>>> from sac_rag import SAC                                         # doctest: +SKIP
>>> sac = SAC.from_pretrained()                                     # doctest: +SKIP
>>> sac.answer("Who designed it?", ["The Eiffel Tower ..."]).text   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch

from .compressor import DEFAULT_COMPRESSOR, SACCompressor, checkpoint_meta
from .config import text_ids
from .errors import InvalidInputError, ModelNotAvailableError, PromptTooLongError
from .generation import Generation, GenerationConfig, Generator, checked_config, grouped
from .kv import AnchorKV
from .models import load_base_model

Context = str | AnchorKV | Sequence[AnchorKV]
LAYOUT_STOP = ("\n###",)  # the next section of the compressor's prompt layout


class SAC:
    """Compress contexts and answer questions from them with the frozen decoder.

    ``generation``: how calls that pass no ``config`` decode; by default the compressor's
    ``recommended_decoding`` (the shipped compressor's: 8 beams + minimum Bayes risk, what its scores
    were measured with) for questions that read compressed contexts, else greedy, question by
    question (in ``answer_batch`` too). ``extractive=True`` on a call without ``config`` then
    decodes greedily (beams and quoting do not combine).

    ``merge_decoder``: decode from a copy of the model with the decoder adapter merged into its
    weights (``Generator.from_compressor``): faster answers for one more copy of the adapted
    weights in memory.

    Compressing and decoding switch the shared model's adapters, so they never interleave: each
    call holds the model's lock (the one ``sac_rag.handles`` engines on the same compressor hold),
    and ``stream`` holds it for each decoding step, not while the caller holds the stream."""

    def __init__(self, compressor: SACCompressor, generation: GenerationConfig | None = None,
                 merge_decoder: bool = False):
        from .handles import model_lock  # handles imports this module

        self.compressor = compressor
        self._lock = model_lock(compressor)
        self.generator = Generator.from_compressor(compressor, merge_decoder)
        self.template = compressor.config.prompt
        self.generation = generation

    @property
    def generation(self) -> GenerationConfig:
        """How calls without a ``config`` decode (see the class). A decoding assigned here is chosen,
        as one passed to the constructor is: every such call decodes with it, also the questions
        that read no compressed context, which the recommendation leaves to greedy decoding.
        Assigning None goes back to the recommendation."""
        return self._generation

    @generation.setter
    def generation(self, config: GenerationConfig | None) -> None:
        chosen = checked_config(config, "generation")
        self._chose_generation = chosen is not None
        self._generation = chosen or GenerationConfig(stop=LAYOUT_STOP).with_recommended(
            self.compressor.recommended_decoding)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_COMPRESSOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        generation: GenerationConfig | None = None,
        merge_decoder: bool = False,
        base_model: str | os.PathLike | None = None,
    ) -> SAC:
        """Load a compressor directory or built-in name, with its decoder.

        ``base_model``: load the compressor on this base model (a local directory or hub id)
        instead of the one its checkpoint names, say after that model's directory was moved. The
        weights must be the same: another model is refused, naming both fingerprints."""
        return cls(load_compressor(name_or_path, device, dtype, base_model), generation, merge_decoder)

    @property
    def fingerprint(self) -> str:
        return self.compressor.fingerprint

    def compress(self, text: str) -> list[AnchorKV]:
        with self._lock:
            return self.compressor.compress(text)

    def prompt(self, question: str, contexts: Sequence[Context], full_text: bool = False) -> list:
        """Prompt segments; string contexts are compressed unless ``full_text`` (the baseline, which
        reads every context as text, so it takes strings only)."""
        contexts = context_list(contexts)
        self._check(question, contexts, full_text)
        return self._prompts([question], [contexts], full_text)[0]

    def _check(self, question: str, contexts: list[Context], full_text: bool) -> None:
        """One question and its contexts, checked before anything is compressed."""
        self.template.build([], question)
        if full_text:
            _check_all_text(contexts, "full_text=True reads the contexts as text (the baseline)",
                            "or full_text=False to read it from its cache")
        self._check_room([c for c in contexts if isinstance(c, str)], contexts, question, full_text)

    def _prompts(self, questions: Sequence[str], contexts: Sequence[list[Context]], full_text: bool) -> list[list]:
        """The prompts of checked questions and contexts (``_check``): the string contexts of all of
        them compressed together, each distinct text once, their chunks sharing forward passes."""
        texts = [] if full_text else list(dict.fromkeys(c for given in contexts for c in given if isinstance(c, str)))
        compressed: dict[str, list[AnchorKV]] = {}
        if texts:
            with self._lock:
                compressed = dict(zip(texts, self.compressor.compress_batch(texts)))
        return [self.template.build([(c if full_text else compressed[c]) if isinstance(c, str)
                                     else ([c] if isinstance(c, AnchorKV) else list(c)) for c in given], question)
                for question, given in zip(questions, contexts)]

    def answer(self, question: str, contexts: Sequence[Context] = (), full_text: bool = False,
               config: GenerationConfig | None = None, extractive: bool = False) -> Generation:
        """Answer from the contexts. ``extractive``: the answer is a verbatim span of the contexts'
        text (they must be given as strings; ``sac_rag.extractive``)."""
        contexts = context_list(contexts)
        config, sources = self._decoding(config, contexts, extractive, full_text)
        contrast = self._contrast_prompts(config, [question])
        prompt = self.prompt(question, contexts, full_text)
        with self._lock:
            return self.generator.generate(prompt, config, sources, contrast and contrast[0])

    def answer_batch(self, questions: Sequence[str], contexts: Sequence[Sequence[Context]],
                     full_text: bool = False, config: GenerationConfig | None = None,
                     extractive: bool = False, batch_size: int = 16) -> list[Generation]:
        """``answer`` for each question with its own contexts, in order. ``batch_size`` questions at
        most are compressed and decoded together, so memory stays bounded however many are asked
        (each answer is the same whatever the batch, up to floating-point rounding)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a whole number of questions >= 1, got {batch_size!r}")
        if isinstance(questions, str):
            raise InvalidInputError("answer_batch takes a list of questions; for one question call answer()")
        if isinstance(contexts, (str, AnchorKV)):
            raise InvalidInputError("answer_batch takes one list of contexts per question, e.g. [[text], ...]")
        questions = _in_order(questions, "answer_batch's questions", "a list of questions, e.g. [question, ...]")
        contexts = _in_order(contexts, "answer_batch's contexts",
                             "one list of contexts per question, e.g. [[text], ...]")
        if len(questions) != len(contexts):
            raise InvalidInputError(
                f"answer_batch got {len(questions)} questions and {len(contexts)} lists of contexts: give one list "
                "of contexts per question (an empty list for a question without contexts)")
        config = checked_config(config)
        if not questions:
            return []
        decodings = []  # each question's own
        for i, question in enumerate(questions):  # every input checked before anything is compressed
            try:
                contexts[i] = context_list(contexts[i])
                self._check(question, contexts[i], full_text)
                decodings.append(self._decoding(config, contexts[i], extractive, full_text))
            except InvalidInputError as err:
                raise type(err)(f"question {i}: {err}") from None  # PromptTooLongError stays one
        results: list[Generation] = []
        for start in range(0, len(questions), batch_size):
            batch = range(start, min(start + batch_size, len(questions)))
            prompts = self._prompts([questions[i] for i in batch], [contexts[i] for i in batch], full_text)
            answers: dict[int, Generation] = {}
            with self._lock:
                for chosen, index in grouped([decodings[i][0] for i in batch]):  # one batch per decoding
                    sources = [decodings[start + i][1] for i in index]
                    sources = None if sources[0] is None else sources
                    answers.update(zip(index, self.generator.generate_batch(
                        [prompts[i] for i in index], chosen, sources,
                        self._contrast_prompts(chosen, [questions[start + i] for i in index]))))
            results += [answers[i] for i in range(len(batch))]
        return results

    def stream(self, question: str, contexts: Sequence[Context] = (), full_text: bool = False,
               config: GenerationConfig | None = None, extractive: bool = False) -> Iterator[str]:
        """``answer``'s text as it is decoded. The inputs are checked and string contexts compressed
        now; decoding starts at the first piece asked for, in the calling thread, each step holding
        the model only while it computes, so other calls made while the stream is half read
        (``compress``, ``answer``, another stream) run between its pieces, each reading the model in
        its own state. With beam search, which settles on its answer only at the end, the answer
        comes in one piece."""
        contexts = context_list(contexts)
        config, sources = self._decoding(config, contexts, extractive, full_text)
        contrast = self._contrast_prompts(config, [question])
        prompt = self.prompt(question, contexts, full_text)
        return self.generator.stream(prompt, config, sources, contrast and contrast[0], lock=self._lock)

    def _decoding(self, config: GenerationConfig | None, contexts: Sequence[Context], extractive: bool,
                  full_text: bool = False) -> tuple[GenerationConfig, list[str] | None]:
        """One question's decoding settings and, for an extractive answer, the texts it may quote:
        without a ``config`` of the call's or the SAC's own, the compressor's recommendation if the
        question reads compressed contexts, else greedy."""
        for name, flag in (("full_text", full_text), ("extractive", extractive)):  # "false" would read as true
            if not isinstance(flag, bool):
                raise InvalidInputError(f"{name} must be True or False, got {flag!r}")
        chosen = checked_config(config)
        config = chosen or self.generation
        # The recommendation was measured answering from caches, and beams do not combine with quotes.
        if chosen is None and not self._chose_generation and (full_text or not contexts or extractive):
            config = GenerationConfig(stop=LAYOUT_STOP)
        if not (extractive or config.extractive):
            return config, None
        return replace(config, extractive=True), _quoted(contexts)

    def _check_room(self, texts: list[str], contexts: list[Context], question: str = "",
                    full_text: bool = False) -> None:
        """Refuse, before compressing anything, a prompt that cannot fit the decoder's positions with
        room for an answer: its contexts' tokens, its question's and those of the template's text
        around them (and a BOS token), counted as the decoder will read them. A compressed context
        keeps its tokens' positions (the cache holds fewer entries, the positions advance by the whole
        chunk), so compressing would not make room."""
        limit = self.generator.max_positions
        if limit is None:
            return
        tokenizer = self.compressor.tokenizer

        def count(text: str) -> int:
            return len(text_ids(tokenizer, text))

        tokens = sum(map(count, texts)) + sum(kv.n_tokens for c in contexts if not isinstance(c, str)
                                              for kv in ([c] if isinstance(c, AnchorKV) else c))
        if full_text:  # one text, read as a whole
            needed = self.generator.text_positions(self.template.build(list(contexts), question))
        else:  # each stretch of text between compressed contexts is read on its own
            needed = tokens + self.generator.text_positions(self.template.build([_SLOT] * len(contexts), question))
        needed += 1  # the answer's first token needs a position too
        if needed > limit:
            why = "" if full_text else ("; compressed contexts keep their tokens' positions, so compressing would "
                                        "not make room")
            other = needed - tokens
            if other > tokens:
                raise PromptTooLongError(f"the question and the prompt around it take {other} positions and the "
                                         f"model has {limit} (the contexts take {tokens} more): shorten the question")
            raise PromptTooLongError(f"the contexts hold {tokens} tokens and the model has {limit} positions (the "
                                     f"question, the prompt around it and the answer take {other} more){why}: "
                                     "retrieve fewer or shorter contexts")

    def _contrast_prompts(self, config: GenerationConfig, questions: Sequence[str]) -> list[list] | None:
        """Context-aware decoding's prompts (``context_contrast`` > 0): each question without contexts."""
        return [self.template.build([], q) for q in questions] if config.context_contrast else None


_SLOT = object()  # where a context goes in a prompt laid out to count its text (SAC._check_room)


def load_compressor(name_or_path: str | os.PathLike = DEFAULT_COMPRESSOR, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None,
                    base_model: str | os.PathLike | None = None) -> SACCompressor:
    """``SACCompressor.from_pretrained``, optionally on ``base_model`` (``SAC.from_pretrained``); a
    checkpoint whose base model cannot be loaded where it names it says how to point it elsewhere."""
    if base_model is None:
        try:
            return SACCompressor.from_pretrained(name_or_path, device=device, dtype=dtype)
        except ModelNotAvailableError as err:
            named = checkpoint_meta(name_or_path)["config"].get("base_model")
            raise ModelNotAvailableError(
                f"{err}\nThe compressor {os.fspath(name_or_path)!r} was trained on base model {named!r}; if that "
                "model is elsewhere now, load the compressor on it with SAC.from_pretrained(..., base_model=DIR) "
                "(or python -m sac_rag.precompress --base-model DIR): its weights are checked against the "
                "checkpoint's fingerprint"
            ) from err
    model, tokenizer = load_base_model(base_model, device=device, dtype=dtype)
    compressor = SACCompressor.from_pretrained(name_or_path, model=model, tokenizer=tokenizer)
    compressor.config.base_model = model.sac_model_id  # where it is now: what a store or a new checkpoint names
    return compressor


def context_list(contexts: Context | Iterable[Context]) -> list[Context]:
    """The contexts of one question as a list, each checked: a string with some text in it (compressed
    on the fly), an ``AnchorKV``, or a list/tuple of ``AnchorKV`` (the chunks of one compressed text). A
    single string or ``AnchorKV`` is one context; any other iterable (a generator too) is read once."""
    if isinstance(contexts, (str, AnchorKV)):
        return [contexts]
    contexts = _in_order(contexts, "contexts", "a list of strings or compressed chunks")
    for i, context in enumerate(contexts):
        if isinstance(context, str) and not context.strip():
            raise InvalidInputError(f"context {i} is {'empty' if not context else 'whitespace only'}: there is "
                                    "nothing in it to read; leave it out")
        if isinstance(context, (str, AnchorKV)):
            continue
        if isinstance(context, (list, tuple)) and context and all(isinstance(c, AnchorKV) for c in context):
            continue
        raise InvalidInputError(
            f"context {i} is {_kind(context)}: each context must be a string, an AnchorKV, or a list of the "
            f"AnchorKV chunks of one text (sac.compress(text)){_hint(context)}"
        )
    return contexts


def _in_order(values: object, what: str, expected: str) -> list:
    """``values`` (a list, tuple or other iterable, read once) as a list. A set is refused: its order
    changes from run to run (string hashes are salted), and with it which context comes first in the
    prompt, or which question answer_batch pairs with which contexts. So are a dict (whose keys alone
    would be read) and bytes; anything that is not iterable is refused rather than failing inside."""
    if isinstance(values, (bytes, dict, set, frozenset)) or not isinstance(values, Iterable):
        why = "; a set has no order: pass a list" if isinstance(values, (set, frozenset)) else ""
        raise InvalidInputError(f"{what} must be {expected}, got {_kind(values)}{why}")
    return list(values)


def _kind(value: object) -> str:
    """``value``'s type in words, with its article: "a dict", "an int", "a list of str"."""
    kind = type(value).__name__
    if isinstance(value, (list, tuple)):
        inner = sorted({type(v).__name__ for v in value})
        kind = f"{kind} of {', '.join(inner)}" if inner else f"empty {kind}"
    return ("an " if kind[0].lower() in "aeiou" else "a ") + kind  # "an AnchorKV", "an int"


def _hint(context: object) -> str:
    if isinstance(context, bytes):
        return "; decode bytes to text first"
    if isinstance(context, dict):
        return "; pass the text itself (e.g. doc['text']), not the record"
    if isinstance(context, (list, tuple)) and any(isinstance(c, str) for c in context):
        return "; several texts are several contexts: flatten the list"
    return ""


def _quoted(contexts: Sequence[Context]) -> list[str]:
    """The texts an extractive answer may quote: all contexts, which must be strings."""
    contexts = context_list(contexts)
    if not contexts:
        raise InvalidInputError("an extractive answer quotes its contexts: pass at least one context as text, "
                                "or extractive=False")
    _check_all_text(contexts, "an extractive answer quotes its contexts, so pass them as text",
                    "or call sac.generator.generate(prompt, GenerationConfig(extractive=True), sources=[texts]) "
                    "with the texts it was made from")
    return list(contexts)


def _check_all_text(contexts: Sequence[Context], why: str, otherwise: str) -> None:
    """Refuse precompressed contexts where only text can be read: ``why`` and ``otherwise`` say so."""
    for i, context in enumerate(contexts):
        if not isinstance(context, str):
            raise InvalidInputError(f"{why}, and context {i} is precompressed ({_kind(context)}), which keeps no "
                                    f"text: pass the text it was made from ({otherwise})")


