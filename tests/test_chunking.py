"""Specification of ``sac_rag.chunking``: documents split into token-bounded chunks that are exact
substrings of the document, fit the limit when tokenized on their own, cover the document, and
are cut the same way on every run (their keys name store entries). Runs on the real SmolLM2
tokenizer (byte-level BPE, what the shipped compressor uses) and the tiny one from conftest."""

from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
import pytest
from conftest import _tiny_tokenizer, requires_smollm2

from sac_rag import chunking
from sac_rag.chunking import iter_chunks, split_document
from sac_rag.errors import InvalidInputError
from sac_rag.store import AnchorStore


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from sac_rag.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request):
    if request.param == "smollm2":
        if requires_smollm2.mark.args[0]:
            pytest.skip(requires_smollm2.mark.kwargs["reason"])
        return request.getfixturevalue("smollm2_tokenizer")
    return request.getfixturevalue("tiny_tokenizer")


def own_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_chunks(text: str, chunks, tokenizer, limit: int, overlap: int = 0, doc_id: str = "d") -> None:
    """Every promise of the module for one document's chunks."""
    for i, c in enumerate(chunks):
        assert (c.id, c.doc_id, c.index) == (f"{doc_id}#{i}", doc_id, i)
        assert text[c.start_char:c.end_char] == c.text  # an exact substring
        assert c.text.strip()  # whitespace-only stretches yield no chunk
        assert list(c.token_ids) == own_ids(tokenizer, c.text)  # its own tokenization ...
        assert c.n_tokens <= limit  # ... within the limit
        assert c.key == AnchorStore.key_for(c.text)
    for a, b in zip(chunks, chunks[1:]):
        assert a.start_char <= b.start_char and a.start_token < b.start_token
        assert a.end_char < b.end_char  # each reaches further: none repeats or lies inside the one before
        assert not text[a.end_char:b.start_char].strip()  # only whitespace between chunks
        if overlap == 0:
            assert a.end_char <= b.start_char  # back to back
    covered = np.zeros(len(text), dtype=bool)
    for c in chunks:
        covered[c.start_char:c.end_char] = True
    missed = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
    assert not missed, f"characters not in any chunk: {[text[i] for i in missed[:10]]}"


HARD_TEXTS = {
    "cjk without spaces": "東京は日本の首都です。人口は約千四百万人で、世界最大の都市圏の一つである。" * 4,
    "emoji": "👨‍👩‍👧‍👦 family 🇫🇷🇩🇪 flags 👍🏽 thumbs 🏳️‍🌈 " * 5,
    "combining characters": "e\u0301e\u0301 cafe\u0301 n\u0303o " * 6 + "Z\u0351\u0352\u0353\u0354\u0355\u0356" * 4,
    "long url": "see https://example.com/" + "a1b2c3/" * 60 + "?q=" + "x" * 150 + " for more",
    "one long word": "x" * 700,
    "crlf and form feeds": "line one\r\nline two\r\n\fpage two\x0b vt\u2028ls\u00a0nbsp\r\n\r\n" * 5,
    "mixed scripts": "日本語 English Ελληνικά русский العربية ǅ ﬁ ß 한국어 " * 5,
    "control characters": "a\x00b\x01c\td\x7f " * 8,
    "whitespace runs inside": "first part." + " " * 40 + "\n" * 30 + "second part." + "\t" * 20 + "end",
}


@pytest.mark.parametrize("limit,overlap", [(4, 0), (7, 3), (16, 0), (16, 15)])
@pytest.mark.parametrize("name", sorted(HARD_TEXTS))
def test_hard_texts_give_exact_substrings_within_the_limit_covering_the_document(tokenizer, name, limit, overlap):
    text = HARD_TEXTS[name]
    chunks = split_document(text, tokenizer, limit, overlap, "d")
    assert chunks
    check_chunks(text, chunks, tokenizer, limit, overlap)
    if overlap == 0:  # back to back, the chunks and the whitespace between them are the document
        rebuilt = text[:chunks[0].start_char]
        for a, b in zip(chunks, chunks[1:] + [None]):
            rebuilt += a.text + (text[a.end_char:b.start_char] if b else text[a.end_char:])
        assert rebuilt == text


# Texts whose tokens and characters disagree: a character that is several byte-level tokens (all
# ending where the character ends), or a token that ends inside a character.
TOKENS_ACROSS_CHARACTERS = {
    "japanese": HARD_TEXTS["cjk without spaces"],
    "chinese": "我们今天去北京看长城，然后吃烤鸭。这是一个没有空格的句子！" * 3,
    "emoji in words": HARD_TEXTS["emoji"],
    "emoji only": "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩👍🏽👨‍👩‍👧" * 3,
    "mixed scripts": HARD_TEXTS["mixed scripts"],
}


@pytest.mark.parametrize("name", sorted(TOKENS_ACROSS_CHARACTERS))
def test_every_chunk_reaches_further_even_where_tokens_and_characters_disagree(tokenizer, name):
    # Moving on by one token need not move on by one character, and a chunk shortened to fit
    # its own tokenization can end where the one before ended: with an overlap near the chunk
    # size this used to emit the same chunk twice in a row, or one inside the one before.
    text = TOKENS_ACROSS_CHARACTERS[name]
    for limit in (4, 5, 6, 8, 11, 16):
        for overlap in sorted({0, 1, limit // 2, limit - 2, limit - 1}):
            chunks = split_document(text, tokenizer, limit, overlap, "d")
            assert chunks
            check_chunks(text, chunks, tokenizer, limit, overlap)
            spans = [(c.start_char, c.end_char) for c in chunks]
            assert len(set(spans)) == len(spans), (limit, overlap)


@requires_smollm2
def test_chunks_that_would_repeat_or_lie_inside_the_one_before_are_left_out(smollm2_tokenizer):
    # SmolLM2 makes most of these characters two or three tokens. Walking one token at a time
    # (overlap 3 of 4) gave 16 chunks: 京は, は日, 本の and 都で twice each and 首 inside の首;
    # the emoji gave 🏽 three times and 👍 three times. What remains is the same walk without them.
    chunks = split_document("東京は日本の首都です。", smollm2_tokenizer, 4, 3, "d")
    assert [(c.text, c.start_char, c.end_char) for c in chunks] == [
        ("東京", 0, 2), ("京は", 1, 3), ("は日", 2, 4), ("日本", 3, 5), ("日本の", 3, 6),
        ("の首", 5, 7), ("都", 7, 8), ("都で", 7, 9), ("です", 8, 10), ("です。", 8, 11)]
    chunks = split_document("👍🏽👍🏽 ok", smollm2_tokenizer, 4, 3, "d")
    assert [c.text for c in chunks] == ["👍", "🏽", "👍", "🏽", "🏽 ok"]
    assert [c.index for c in chunks] == list(range(5))  # numbered as emitted


def test_iter_chunks_yields_what_split_document_returns(tokenizer):
    text = HARD_TEXTS["mixed scripts"]
    assert list(iter_chunks(text, tokenizer, 9, 2, "x")) == split_document(text, tokenizer, 9, 2, "x")


@pytest.mark.parametrize("text", ["", " ", "\n", "   \n\t  \r\n \f\x0b\u2028\u3000\u00a0 "])
def test_empty_and_whitespace_only_documents_have_no_chunks(tokenizer, text):
    assert split_document(text, tokenizer, 8) == []
    assert split_document(text, tokenizer, 8, 7) == []


def test_a_document_exactly_at_the_limit_is_one_chunk_and_one_token_more_is_two(tokenizer):
    for words in range(3, 12):
        text = " ".join(["word"] * words) + "."
        n = len(own_ids(tokenizer, text))
        if n < 5:
            continue
        (whole,) = split_document(text, tokenizer, n, doc_id="d")
        assert (whole.text, whole.start_char, whole.end_char, whole.n_tokens) == (text, 0, len(text), n)
        two = split_document(text, tokenizer, n - 1, doc_id="d")
        assert len(two) == 2
        check_chunks(text, two, tokenizer, n - 1)
        assert "".join(c.text for c in two) == text


def test_overlap_must_be_smaller_than_the_chunk_and_the_largest_still_terminates(tokenizer):
    text = "hello world, this is a test of overlapping chunks. " * 4
    for overlap in (8, 9, 100, -1):
        with pytest.raises(InvalidInputError, match="overlap_tokens"):
            split_document(text, tokenizer, 8, overlap)
    chunks = split_document(text, tokenizer, 8, 7, "d")
    check_chunks(text, chunks, tokenizer, 8, 7)
    assert len(chunks) >= len(own_ids(tokenizer, text)) - 8  # one token further each time
    plain = split_document(text, tokenizer, 8, 0)
    assert len(plain) < len(chunks)


def test_overlapping_chunks_share_about_overlap_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 3
    chunks = split_document(text, tokenizer, 12, 4, "d")
    check_chunks(text, chunks, tokenizer, 12, 4)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_token == a.start_token + len(own_ids(tokenizer, text[a.start_char:b.start_char]))
        assert a.end_char > b.start_char  # they share text


@pytest.mark.parametrize("bad", [3, 0, -5, True, 8.0, "8", None])
def test_chunk_tokens_must_be_an_integer_of_at_least_4(tiny_tokenizer, bad):
    with pytest.raises(InvalidInputError, match="chunk_tokens"):
        split_document("some text", tiny_tokenizer, bad)


def test_numpy_integers_are_integers(tiny_tokenizer):
    text = HARD_TEXTS["mixed scripts"]
    assert split_document(text, tiny_tokenizer, np.int64(9), np.int32(2)) == split_document(text, tiny_tokenizer, 9, 2)
    with pytest.raises(InvalidInputError, match="overlap_tokens"):
        split_document(text, tiny_tokenizer, 9, 2.0)


def test_text_must_be_a_str_of_valid_unicode(tiny_tokenizer):
    with pytest.raises(InvalidInputError, match="must be a str"):
        split_document(b"bytes", tiny_tokenizer, 8)
    # A lone surrogate (half of a JSON-escaped pair): refused by name, not a TypeError from the tokenizer.
    with pytest.raises(InvalidInputError, match=r"lone surrogate .* at character 4"):
        split_document("abc \ud800 def", tiny_tokenizer, 8, doc_id="doc-1")
    chunks = split_document("abc \U0001F600 def", tiny_tokenizer, 8)  # a proper pair is one character
    assert "".join(c.text for c in chunks) == "abc \U0001F600 def"


def test_pieces_of_a_huge_document_change_nothing_of_the_promises(tokenizer, monkeypatch):
    # A long document is tokenized in pieces of PIECE_CHARS characters; make them tiny so that
    # piece boundaries fall everywhere (inside CJK runs, emoji sequences, \r\n, long words).
    text = "".join(HARD_TEXTS.values())
    monkeypatch.setattr(chunking, "PIECE_CHARS", 37)
    monkeypatch.setattr(chunking, "_PIECE_SEARCH", 11)
    for limit, overlap in ((6, 0), (16, 5)):
        chunks = split_document(text, tokenizer, limit, overlap, "d")
        check_chunks(text, chunks, tokenizer, limit, overlap)


# The chunks (their keys, places and first tokens) of one document as the code cut them when the
# stores and results in this repository were made. A change here would orphan stored entries.
PINNED_TEXT = ("The Eiffel Tower was designed by Gustave Eiffel's company.\r\n\fIn 1889 it was finished; "
               "東京は日本の首都です。 emoji 👨‍👩‍👧 and cafe\u0301. https://example.com/" + "ab12/" * 30 + "\n\n   \n"
               "Paris is the capital of France. ") * 3
PINNED = {
    ("smollm2", 16, 0): (39, "270b7ee6b591a26f"),
    ("smollm2", 16, 4): (52, "0293e6062760b5b6"),
    ("smollm2", 5, 2): (204, "3985c5c4f5fd87ff"),
    ("tiny", 16, 0): (59, "fc44c4bd4644b2e1"),
    ("tiny", 16, 4): (78, "48a9a8eecf59a7dc"),
    # Was (315, "d1b51affe124a0c2"): 6 of those chunks repeated or lay inside the one before
    # (tokens ending inside a character); the other 309 are unchanged.
    ("tiny", 5, 2): (309, "479f21909fe3d7e3"),
}


@pytest.mark.parametrize("limit,overlap", [(16, 0), (16, 4), (5, 2)])
def test_chunks_of_a_pinned_document_are_cut_as_they_always_were(request, tokenizer, limit, overlap):
    name = "tiny" if tokenizer is request.getfixturevalue("tiny_tokenizer") else "smollm2"
    chunks = split_document(PINNED_TEXT, tokenizer, limit, overlap, "d")
    digest = hashlib.sha256("\n".join(f"{c.key}:{c.start_char}:{c.end_char}:{c.start_token}"
                                      for c in chunks).encode()).hexdigest()[:16]
    assert (len(chunks), digest) == PINNED[name, limit, overlap]


class WordTokenizer:
    """A tokenizer without offset mapping (as slow, pure-Python tokenizers are): one token per
    word with its leading whitespace."""

    is_fast = False

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab))
                              for w in re.findall(r"\s*\S+|\s+$", text)]}

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[i] for i in ids)


def test_a_tokenizer_without_offset_mapping_gets_decoded_chunks_within_the_limit(caplog, monkeypatch):
    monkeypatch.setattr(chunking, "_warned_slow", set())
    tokenizer = WordTokenizer()
    text = "one two three four five six seven eight nine ten eleven"
    with caplog.at_level(logging.WARNING, logger="sac_rag.chunking"):
        chunks = split_document(text, tokenizer, 4, 1, "w")
        assert split_document("   \n ", tokenizer, 4) == [] and split_document("", tokenizer, 4) == []
    assert [c.text for c in chunks] == ["one two three four", " four five six seven",
                                        " seven eight nine ten", " ten eleven"]
    assert all(c.start_char == -1 and c.end_char == -1 for c in chunks)  # not located in the text
    assert all(c.n_tokens <= 4 and list(c.token_ids) == tokenizer(c.text)["input_ids"] for c in chunks)
    assert [c.id for c in chunks] == [f"w#{i}" for i in range(4)]
    # Warned once, not once per document of a corpus.
    assert sum("no offset mapping" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(InvalidInputError, match="overlap_tokens"):
        split_document(text, tokenizer, 4, 4)


class OffsetlessTokenizer:
    """A byte-level BPE tokenizer seen without offset mapping, so that chunks are decoded token
    spans: tokens end inside characters here as well."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, add_special_tokens=True, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return {"input_ids": own_ids(self.tokenizer, text)}

    def decode(self, ids):
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("name", ["japanese", "emoji only"])
def test_decoded_chunks_also_reach_further_each_time(tiny_tokenizer, monkeypatch, name):
    monkeypatch.setattr(chunking, "_warned_slow", {"OffsetlessTokenizer"})
    tokenizer, text = OffsetlessTokenizer(tiny_tokenizer), TOKENS_ACROSS_CHARACTERS[name]
    ids = own_ids(tiny_tokenizer, text)
    for limit in (4, 6, 9):
        for overlap in (limit - 2, limit - 1):
            chunks = split_document(text, tokenizer, limit, overlap, "d")
            assert all(c.n_tokens <= limit for c in chunks)
            # The document tokens a chunk was decoded from: the longest span from its start
            # (the longest that fits is what the chunker takes) that decodes to its text.
            ends = [c.start_token + next(k for k in range(min(limit, len(ids) - c.start_token), 0, -1)
                                         if tokenizer.decode(ids[c.start_token:c.start_token + k]) == c.text)
                    for c in chunks]
            assert ends == sorted(set(ends)), (limit, overlap)  # strictly increasing
            assert ends[-1] == len(ids)
