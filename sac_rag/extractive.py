"""Extractive decoding: the answer is a verbatim span of the source texts.

A compressed context keeps the gist of a passage better than its surface form: a 5x compressor
tends to answer "1759" where the passage says "1749", or "Betty Meggie" for "Betty Meggers".
When the answer must be a quote of the retrieved text (extractive QA, citations, numbers), the
decoder can be held to the texts the caches were made from. At every step only tokens that keep
the answer a substring of one source, starting at a word, compete; the model still chooses
which span. The answer ends where the model would end it: when it prefers an end token
(end-of-sequence, a stop token, or a token that starts a new line) to every allowed one.

This needs the texts, not the model: matching works on bytes against a trie of the
vocabulary, so it costs no forward pass.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidInputError

_SEPARATOR = 0  # between sources (a NUL inside a source becomes a space): no span crosses it


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in characters byte-level BPE tokenizers (GPT-2 style) use for bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_bytes(token: str, alphabet: dict[str, int]) -> bytes | None:
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return None


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each vocabulary id stands for (``None`` for special tokens), for byte-level BPE
    (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece (Llama 2, Mistral) vocabularies. Checked on
    a probe text: a tokenizer whose tokens do not spell their text is refused."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    alphabet = _byte_level_alphabet()
    probe = "Extractive probe: Bjørgvin, 1,230 km\n(1749) naïve"
    probe_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for spell in (lambda t: _byte_level_bytes(t, alphabet), _sentencepiece_bytes):
        spelled = [spell(tokens[i]) if tokens[i] is not None else None for i in probe_ids]
        if None not in spelled and b"".join(spelled).strip() == probe.encode("utf-8").strip():
            return [None if i in special or tok is None else spell(tok) for i, tok in enumerate(tokens)]
    raise InvalidInputError(
        f"extractive decoding cannot map the tokens of {type(tokenizer).__name__} to bytes (it supports "
        "byte-level BPE and SentencePiece vocabularies); decode without sources instead"
    )


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # tokens whose bytes end here


def _starts_a_line(data: bytes) -> bool:
    """Whether a token's bytes begin a new line (after any spaces or tabs). Such a token ends a
    quote and never continues it: where the source itself breaks the line after the answer, the
    model's newline would otherwise run the quote on into the next line."""
    return data.lstrip(b" \t").startswith((b"\n", b"\r"))


class Vocabulary:
    """A byte trie of a tokenizer's vocabulary, built once per generator."""

    def __init__(self, tokenizer, end_token_ids: Sequence[int] = ()):
        spelled = token_bytes(tokenizer)
        newline = {i for i, b in enumerate(spelled) if b and _starts_a_line(b)}
        self.root = _Node()
        for token_id, data in enumerate(spelled):
            if not data or token_id in newline:  # an end token, never a quote's next token
                continue
            node = self.root
            for byte in data:
                node = node.children.setdefault(byte, _Node())
            node.ids.append(token_id)
        self.end_ids = torch.as_tensor(sorted(set(end_token_ids) | newline), dtype=torch.long)

    def constraint(self, sources: Sequence[str]) -> SpanConstraint:
        return SpanConstraint(self, sources)


def _word_starts(text: bytes) -> list[int]:
    """Offsets where a word or number starts: a character after a space, a separator or
    punctuation (so "(1749)" offers both "(1749)" and "1749"), or any character of a script
    written without spaces (Chinese, Japanese, Thai), where every character may start an answer."""
    starts = []
    for i, byte in enumerate(text):
        if byte in b" \t\r\n\x00" or _CONTINUATION[0] <= byte <= _CONTINUATION[1]:
            continue
        before, char = _char_before(text, i), _char_at(text, i)
        if not _is_word_char(before) or _unspaced(before) or _unspaced(char):
            starts.append(i)
    return starts


_CONTINUATION = (0x80, 0xBF)  # UTF-8 bytes that continue a character
_UNSPACED = ((0x0E00, 0x0E7F), (0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
             (0x20000, 0x2FFFF))  # Thai, kana, CJK ideographs: scripts written without spaces


def _boundary(before: str, after: str) -> bool:
    """Whether an answer may end between these two characters ("" at a source's edge)."""
    return not (_is_word_char(before) and _is_word_char(after)) or _unspaced(before) or _unspaced(after)


def _is_word_char(char: str) -> bool:
    """Letters, digits and combining marks of any script. Punctuation, symbols and spaces outside
    ASCII are not: a quote may start after an opening curly quote and end before an en dash or a
    no-break space ("Iron Lady" of "“Iron Lady”", "1939" of "1939–1945", "100" of "100\u00a0km")."""
    return bool(char) and (char.isalnum() or unicodedata.category(char)[0] in "LMN")


def _unspaced(char: str) -> bool:
    return bool(char) and any(low <= ord(char) <= high for low, high in _UNSPACED)


def _char_at(text: bytes, i: int) -> str:
    """The character whose UTF-8 encoding starts at byte ``i`` ("" at a separator or the end)."""
    if i >= len(text) or text[i] == _SEPARATOR:
        return ""
    length = 1 if text[i] < 0xC0 else 2 if text[i] < 0xE0 else 3 if text[i] < 0xF0 else 4
    return text[i:i + length].decode("utf-8", "replace")[:1]


def _char_before(text: bytes, i: int) -> str:
    """The character that ends just before byte ``i`` ("" at a separator or the start)."""
    start = i - 1
    while start > 0 and _CONTINUATION[0] <= text[start] <= _CONTINUATION[1]:
        start -= 1
    return _char_at(text, start) if start >= 0 else ""


class SpanConstraint:
    """Per-answer state of extractive decoding: where in the sources the answer so far ends."""

    def __init__(self, vocabulary: Vocabulary, sources: Sequence[str]):
        if isinstance(sources, str):
            sources = [sources]
        texts = [s.replace("\x00", " ") for s in sources if isinstance(s, str) and s.strip()]
        if not texts:
            raise InvalidInputError("extractive decoding needs at least one non-empty source text")
        self.vocabulary = vocabulary
        self.text = bytes([_SEPARATOR]).join(t.encode("utf-8") for t in texts)
        self.ends: list[int] | None = None  # None before the first token
        self._allowed: dict[int, list[int]] = {}  # what the last ``mask`` allowed

    def _walk(self, start: int, first: bool) -> dict[int, int]:
        """Token id -> end offset, for every vocabulary token spelled by text[start:]."""
        found, node, i = {}, self.vocabulary.root, start
        while i < len(self.text) and self.text[i] != _SEPARATOR:
            node = node.children.get(self.text[i])
            if node is None:
                break
            i += 1
            if node.ids and not (first and self.text[start] in b" \t"
                                 and self.text[start + 1:i].strip(b" \t") == b""):
                for token_id in node.ids:
                    found.setdefault(token_id, i)
        return found

    def _candidates(self) -> dict[int, list[int]]:
        """Allowed next token -> the offsets where the answer would then end."""
        first = self.ends is None
        starts = self.ends
        if first:  # a word start, or the space before it (a token like " Betty" starts there)
            words = _word_starts(self.text)
            starts = words + [w - 1 for w in words if w and self.text[w - 1] in b" \t"]
        allowed: dict[int, list[int]] = {}
        for start in starts:
            for token_id, end in self._walk(start, first).items():
                allowed.setdefault(token_id, []).append(end)
        return allowed

    def mask(self, logits: torch.Tensor, stop_token_ids: Sequence[int] = ()) -> tuple[torch.Tensor, bool]:
        """``logits`` with every token but the allowed ones at -inf, and whether the model would
        rather end the answer here (only after at least one token): when it prefers an end token,
        or one of the call's ``stop_token_ids``, to every allowed token."""
        self._allowed = self._candidates()
        masked = torch.full_like(logits, float("-inf"))
        index = torch.as_tensor(sorted(self._allowed), dtype=torch.long, device=logits.device)
        if len(index):
            masked[index] = logits[index]
        end_ids = self.vocabulary.end_ids.to(logits.device)
        if len(stop_token_ids):
            stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=logits.device)
            end_ids = torch.cat([end_ids, stops])
        if self.ends is None:  # the answer has at least one token
            return masked, False
        if not len(index):
            return masked, True
        may_end = any(self._word_ends_at(e) for e in self.ends)  # never in the middle of a word
        return masked, may_end and bool(logits[end_ids].max() > logits[index].max())

    def _word_ends_at(self, offset: int) -> bool:
        if offset >= len(self.text):
            return True
        if _CONTINUATION[0] <= self.text[offset] <= _CONTINUATION[1]:
            return False  # never inside a character
        return _boundary(_char_before(self.text, offset), _char_at(self.text, offset))

    def advance(self, token_id: int) -> None:
        """Record the chosen token (one of the allowed ones)."""
        ends = self._allowed.get(token_id)
        if ends is None:
            raise InvalidInputError(f"token {token_id} does not continue a span of the sources")
        self.ends = sorted(set(ends))
