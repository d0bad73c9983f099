"""Every setting of a compressor, saved with it (``config.json``), and the prompt layout."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InvalidInputError

ANCHOR_EMBEDDINGS = ("shared", "per_slot", "none")
POSITION_CONVENTIONS = ("global",)  # the one the encoder implements (see SACConfig)
_WHOLE_NUMBERS = ("ratio", "chunk_len", "lora_rank", "lora_alpha", "decoder_lora_rank", "decoder_lora_alpha",
                  "anchor_seed", "refine_steps")  # SACConfig's integer settings
# Chat roles that ask (each turn a question) and answer (each turn an answer); any other role's
# text is context (``PromptTemplate.conversation``).
CHAT_ASKING = ("user", "human")
CHAT_ANSWERING = ("assistant", "ai", "chatbot", "model")


class UserText(str):
    """Text a user wrote into a prompt (a question, a context read as text), as opposed to the
    layout's own text: it is read as the characters it is written with (``text_ids``), so the text
    of a special token in it (``<|im_end|>`` on a page about chat formats) is never that token."""


class PromptText(str):
    """A prompt's text segment as one string, with the pieces it joins: the layout's text and the
    ``UserText`` in it, which ``prompt_ids`` reads each its own way."""

    pieces: tuple[str, ...]

    def __new__(cls, pieces: Sequence[str]) -> PromptText:
        text = super().__new__(cls, "".join(pieces))
        text.pieces = tuple(p for p in pieces if p)
        return text

    def lstrip_newlines(self) -> PromptText:
        """The text without its leading newlines, each piece keeping what is left of it."""
        drop, pieces = len(self) - len(self.lstrip("\n")), []
        for piece in self.pieces:
            cut = min(drop, len(piece))
            drop -= cut
            pieces.append(type(piece)(piece[cut:]) if isinstance(piece, UserText) else piece[cut:])
        return PromptText(pieces)


def text_ids(tokenizer, text: str | list[str]) -> list:
    """Token ids of ``text`` (or of each of a list of texts) read as plain text, as documents,
    questions and answers are read in training and in answering: the text of a special token in it
    is spelled in ordinary tokens, never read as that control token (``<|im_end|>`` would end a
    turn, ``<|endoftext|>`` a document)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt's text segment: the layout's special tokens (a chat header) as those
    tokens; the ``UserText`` pieces of a ``PromptText`` as plain text (``text_ids``). As long as no
    user piece holds a special token's text, the segment is read whole (its pieces' boundaries
    tokenized as in one string, as every prompt without such text is)."""
    pieces = getattr(text, "pieces", ())
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    if not any(isinstance(p, UserText) and any(s in p for s in specials) for p in pieces):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for piece in pieces:
        ids += text_ids(tokenizer, piece) if isinstance(piece, UserText) else tokenizer(
            piece, add_special_tokens=False)["input_ids"]
    return ids


@dataclass
class PromptTemplate:
    """How compressed contexts and a question are laid out for the decoder (paper, App. A:
    "### Context:\\n" + context, then "\\n### Question:\\n{q}\\n### Answer:\\n").

    ``prefix`` starts the prompt (BOS/chat header if the model wants one); ``context_prefix``
    precedes the first context; ``context_separator`` goes between contexts (text, not
    compressed; empty by default); ``question`` follows the contexts.
    """

    prefix: str = ""
    context_prefix: str = "### Context:\n"
    context_separator: str = ""
    question: str = "\n### Question:\n{question}\n### Answer:\n"

    def __post_init__(self) -> None:
        for name in ("prefix", "context_prefix", "context_separator", "question"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"PromptTemplate.{name} must be a string (\"\" for none), got "
                                        f"{getattr(self, name)!r}")

    @property
    def answer_opening(self) -> str:
        """The text the prompt ends with, after the question: where the answer begins."""
        return self.question.format(question="\0").rpartition("\0")[2]  # as ``build`` formats it

    def question_text(self, question: str) -> PromptText:
        """The text that follows the contexts, with ``question`` in it as ``UserText``."""
        before, found, after = self.question.format(question="\0").partition("\0")  # as ``format`` places it
        return PromptText([before, UserText(question), after] if found else [before])

    def build(self, contexts: list, question: str) -> list:
        """Prompt segments: text strings and, in order, the given contexts (each a string for
        full-text reading, an ``AnchorKV``, or a list of ``AnchorKV`` for a multi-chunk text). The
        question and the contexts given as strings are ``UserText`` in the segments' ``PromptText``:
        read as plain text (``prompt_ids``)."""
        if not isinstance(question, str):
            raise InvalidInputError(f"the question must be a string, got {type(question).__name__}: {question!r:.40}")
        if not question.strip():
            raise InvalidInputError("the question is empty: pass the text to answer")
        segments: list = []
        head = self.prefix + self.context_prefix
        for i, context in enumerate(contexts):
            text = head if i == 0 else self.context_separator
            if text:
                segments.append(text)
            if isinstance(context, str):
                segments.append(UserText(context))
            else:
                segments.extend(context if isinstance(context, list) else [context])
        tail = self.question_text(question)
        if not contexts:
            tail = PromptText([self.prefix, *tail.lstrip_newlines().pieces])
        segments.append(tail)
        return _merge_adjacent_text(segments)

    def conversation(self, turns: Sequence[tuple[str, str]], asking: bool = True) -> str:
        """A chat as one prompt string in this layout, for a decoder trained on it rather than on
        a chat format: the text of the turns that are neither ``"user"`` nor ``"assistant"``
        (system, tool, ...; where a chat engine puts the retrieved chunks' ``<sac:...>`` markers)
        is the context, then each user turn is a question and each assistant turn its answer, in
        order. After a last user turn the prompt ends where the answer begins. ``asking``: the
        prompt is to be answered, so its last user turn must hold a question (not when the turns
        are laid out to be counted, part of a conversation at a time)."""
        context = "\n".join(text for role, text in turns if role not in CHAT_ASKING + CHAT_ANSWERING and text)
        questions = [text for role, text in turns if role in CHAT_ASKING]
        if asking and (not questions or not questions[-1].strip()):
            raise InvalidInputError("the conversation has no question: its last user message is missing or empty")
        prompt = self.prefix + self.context_prefix + context if context else self.prefix
        for role, text in turns:
            if role in CHAT_ASKING:
                question = self.question.format(question=text)
                # as in ``build``: without a context, the prompt opens with the question
                prompt += question if prompt != self.prefix else question.lstrip("\n")
            elif role in CHAT_ANSWERING:
                prompt += text
        return prompt


def _merge_adjacent_text(segments: list) -> list:
    """``segments`` with each run of text ones joined into one ``PromptText`` of their pieces."""
    merged: list = []
    for seg in segments:
        if isinstance(seg, str):
            pieces = seg.pieces if isinstance(seg, PromptText) else (seg,)
            if merged and isinstance(merged[-1], PromptText):
                pieces = merged.pop().pieces + pieces
            merged.append(PromptText(pieces))
        else:
            merged.append(seg)
    return merged


@dataclass
class SACConfig:
    """Settings of a Semantic-Anchor compressor. Defaults follow the paper (METHOD.md).

    lora_rank = 0 means no adapter: with ``bidirectional=False`` and ``anchor_embedding="none"``
    that is untrained uniform KV dropping, the floor SAC must beat.
    """

    base_model: str = "smollm2-135m"
    ratio: int = 5
    chunk_len: int = 510
    anchor_strategy: str = "uniform"  # uniform | random | rarest_in_block | importance
    anchor_seed: int = 0
    anchor_embedding: str = "shared"  # shared (paper) | per_slot (reference code) | none
    bidirectional: bool = True
    # "anchors" (SAC) or "compression_tokens": k = anchor_count learned tokens appended after
    # the chunk, at the anchors' (uniformly spread, EPL-style) positions, whose K/V is the memory
    # (the prior-art baseline, trained by the same loop).
    memory: str = "anchors"
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Optional decoder-side LoRA, active only while the decoder reads compressed contexts (an
    # extension beyond the paper's frozen decoder; 0 = frozen decoder, the paper's default).
    decoder_lora_rank: int = 0
    decoder_lora_alpha: int = 0  # 0 = 2 x decoder_lora_rank
    # Chunks of one text are encoded at their global positions (chunk c starts at the sum of
    # the earlier chunks' lengths); stored chunks are encoded at offset 0 and moved by rotation.
    position_convention: str = "global"
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    # Adam steps on each chunk's anchor K/V after encoding it, so the decoder can re-read the chunk
    # from them (``sac_rag.refine``; an extension beyond the paper; 0 = off, the paper's method).
    refine_steps: int = 0
    refine_lr: float = 0.01

    def __post_init__(self):
        if isinstance(self.prompt, dict):
            self.prompt = PromptTemplate(**self.prompt)
        if isinstance(self.base_model, os.PathLike):  # a local directory: saved as its path
            self.base_model = os.fspath(self.base_model)
        for name in _WHOLE_NUMBERS:  # numpy's integers too, saved as ints
            value = getattr(self, name)
            if not isinstance(value, (bool, int)) and isinstance(value, numbers.Integral):
                setattr(self, name, int(value))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise InvalidInputError(f"base_model must be a hub id, a local directory or a built-in name, got "
                                    f"{self.base_model!r}")
        for name in _WHOLE_NUMBERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInputError(f"{name} must be an integer, got {value!r}")
        for name, least in (("lora_alpha", 1), ("decoder_lora_rank", 0), ("decoder_lora_alpha", 0)):
            if getattr(self, name) < least:  # an alpha of 0 scales the adapter to nothing
                raise InvalidInputError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not isinstance(self.bidirectional, bool):
            raise InvalidInputError(f"bidirectional must be True or False, got {self.bidirectional!r}")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise InvalidInputError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
        modules = self.lora_target_modules
        if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules or not all(
                isinstance(m, str) and m for m in modules):
            raise InvalidInputError(f"lora_target_modules must be a non-empty list of module names, e.g. "
                                    f"['q_proj', 'v_proj'], got {modules!r}")
        if self.position_convention not in POSITION_CONVENTIONS:
            raise InvalidInputError(f"position_convention must be one of {POSITION_CONVENTIONS}, got "
                                    f"{self.position_convention!r}")
        if self.chunk_len < 1:
            raise InvalidInputError(f"chunk_len must be >= 1, got {self.chunk_len}")
        if not 1 <= self.ratio <= self.chunk_len:
            raise InvalidInputError(
                f"ratio must be between 1 (keep every token) and chunk_len={self.chunk_len} "
                f"(one anchor per chunk), got {self.ratio}"
            )
        if self.anchor_embedding not in ANCHOR_EMBEDDINGS:
            raise InvalidInputError(
                f"anchor_embedding must be one of {ANCHOR_EMBEDDINGS}, got {self.anchor_embedding!r}"
            )
        if self.memory not in ("anchors", "compression_tokens"):
            raise InvalidInputError(f"memory must be 'anchors' or 'compression_tokens', got {self.memory!r}")
        if self.memory == "compression_tokens" and self.anchor_embedding != "per_slot":
            raise InvalidInputError("compression tokens need their own embeddings: set anchor_embedding='per_slot'")
        if self.decoder_lora_rank and not self.lora_rank:
            raise InvalidInputError("a decoder adapter needs an encoder adapter too (lora_rank > 0)")
        if self.lora_rank < 0:
            raise InvalidInputError(f"lora_rank must be >= 0 (0 = no adapter), got {self.lora_rank}")
        if self.refine_steps < 0:
            raise InvalidInputError(f"refine_steps must be >= 0 (0 = no refinement), got {self.refine_steps}")
        lr = self.refine_lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
            raise InvalidInputError(f"refine_lr must be a positive number, got {lr!r}")

    def set_refinement(self, steps: int | None = None, lr: float | None = None) -> None:
        """Set ``refine_steps`` and ``refine_lr`` where given (None keeps the current one), checked."""
        if steps is not None:
            self.refine_steps = steps
        if lr is not None:
            self.refine_lr = lr
        self.validate()

    def to_dict(self) -> dict:
        """The settings as saved (and fingerprinted). Refinement's appear only when it is on: a
        compressor without it keeps the config, and so the fingerprint, it had before they existed."""
        settings = dataclasses.asdict(self)
        if not self.refine_steps:
            del settings["refine_steps"], settings["refine_lr"]
        return settings

    @classmethod
    def from_dict(cls, data: dict) -> SACConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInputError(
                f"unknown compressor settings {sorted(unknown)}: the checkpoint was written by a "
                f"newer sac_rag; upgrade it"
            )
        return cls(**data)
