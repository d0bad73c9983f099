"""Anchor selection: which tokens of a chunk keep their K/V (METHOD.md, "Anchor selection").

Each strategy is one small dataclass with one method, ``select(token_ids, ratio)``, returning
sorted local indices into the chunk. The mechanism that uses them lives in ``compressor``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidInputError


def anchor_count(n_tokens: int, ratio: int) -> int:
    """Anchors a chunk of ``n_tokens`` keeps at ``ratio``: ceil((n - s) / r), at least 1,
    where s = floor((r - 1) / 2). 102 / 34 / 10 for a 510-token chunk at 5x / 15x / 51x."""
    _check(n_tokens, ratio)
    start = (ratio - 1) // 2
    return max(1, math.ceil((n_tokens - start) / ratio))


def _length(token_ids: Sequence[int]) -> int:
    """A chunk's token count. Its ids are a sequence read more than once (a list, tuple, tensor or
    array); an iterator or generator is refused, naming its type, rather than half consumed."""
    try:
        return len(token_ids)
    except TypeError:
        raise InvalidInputError(f"token_ids must be a sequence of token ids (a list, tuple or tensor), got a "
                                f"{type(token_ids).__name__}: pass list(...) of it") from None


def _check(n_tokens: int, ratio: int) -> None:
    """Whole numbers (numpy's too): a ratio of at least 1 and a chunk of at least one token."""
    if not isinstance(ratio, numbers.Integral) or isinstance(ratio, bool) or ratio < 1:
        raise InvalidInputError(f"ratio must be an integer >= 1, got {ratio!r}")
    if not isinstance(n_tokens, numbers.Integral) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise InvalidInputError(f"a chunk needs a whole number of tokens, at least one, got {n_tokens!r}")


@dataclass
class AnchorSelector:
    """Base class: a policy that picks anchor positions in a chunk."""

    name = "base"

    def select(self, token_ids: Sequence[int], ratio: int) -> list[int]:
        raise NotImplementedError

    def identity(self) -> str:
        """What decides which anchors this selector picks. A compressor whose selector is not the
        one its config names puts this in its fingerprint, so caches made with other anchors are
        never mistaken for its own."""
        return self.name


@dataclass
class UniformAnchors(AnchorSelector):
    """Every r-th token, starting at s = floor((r-1)/2) so each anchor sits in the middle of
    the r tokens it stands for (EPL's rule, the reference code's default)."""

    name = "uniform"

    def select(self, token_ids: Sequence[int], ratio: int) -> list[int]:
        n = _length(token_ids)
        _check(n, ratio)
        start = (ratio - 1) // 2
        if start >= n:
            return [0]
        return list(range(start, n, ratio))


@dataclass
class RandomAnchors(AnchorSelector):
    """Random positions, as many as the uniform rule keeps (paper ablation: worse, 59.5 vs
    63.6 ID F1 at 5x). Seeded by ``seed`` and the chunk's tokens, so the same chunk always gets
    the same anchors (cached data stays reproducible)."""

    seed: int = 0
    name = "random"

    def select(self, token_ids: Sequence[int], ratio: int) -> list[int]:
        n = _length(token_ids)
        k = anchor_count(n, ratio)
        # The ids as plain ints: a tensor's or numpy array's elements print otherwise ("tensor(5)"),
        # which would give the same chunk other anchors than the same ids in a list.
        digest = hashlib.sha256(repr((self.seed, [int(t) for t in token_ids])).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    def identity(self) -> str:
        return f"random(seed={self.seed})"


@dataclass
class RarestInBlockAnchors(AnchorSelector):
    """As many anchors as the uniform rule, one in each of its r-token blocks, but on the block's
    rarest token rather than its middle one: answers (names, numbers, dates) are rare tokens, and
    a token that is an anchor keeps its own K/V. Rarity is read off the token id, which in
    byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM) is the merge rank: later merges are
    rarer strings. In vocabularies not ordered that way the choice is arbitrary. Ties go to the
    token nearest the block's uniform anchor. Experimental (model card's history, "Anchor placement")."""

    name = "rarest_in_block"

    def select(self, token_ids: Sequence[int], ratio: int) -> list[int]:
        start, n = (ratio - 1) // 2, _length(token_ids)
        return [  # the block of uniform anchor p: p - start .. p - start + ratio - 1
            max(range(max(0, p - start), min(p - start + ratio, n)), key=lambda i, p=p: (token_ids[i], -abs(i - p)))
            for p in UniformAnchors().select(token_ids, ratio)
        ]


@dataclass
class ImportanceAnchors(AnchorSelector):
    """The ``k`` highest-scoring tokens, where ``scorer(token_ids)`` returns one score per token
    (e.g. LLMLingua-2 keep-probabilities; paper: on par with uniform). A hook: the scorer is
    code, so it is not saved with a checkpoint and must be passed again when loading.

    ``scorer_name`` (default: the scorer's module and qualified name) enters the compressor's
    fingerprint: give a scorer whose scores change a new name, so that stores of the old anchors
    refuse the new compressor instead of mixing the two."""

    scorer: Callable[[Sequence[int]], Sequence[float]] = field(default=None, repr=False)
    scorer_name: str = ""
    name = "importance"

    def identity(self) -> str:
        module, qualname = getattr(self.scorer, "__module__", "?"), getattr(self.scorer, "__qualname__", "?")
        scorer = self.scorer_name or f"{module}.{qualname}"
        return f"importance({scorer})"

    def select(self, token_ids: Sequence[int], ratio: int) -> list[int]:
        if self.scorer is None:
            raise InvalidInputError("ImportanceAnchors needs a scorer(token_ids) -> scores callable")
        n = _length(token_ids)
        raw = self.scorer(token_ids)
        if isinstance(raw, torch.Tensor):  # read at once (element by element: one GPU sync per token)
            scores = raw.detach().to(device="cpu", dtype=torch.float64)
        else:
            scores = torch.as_tensor(list(raw), dtype=torch.float64)
        if scores.shape != (n,):
            raise InvalidInputError(
                f"the importance scorer returned {tuple(scores.shape)} scores for {n} tokens"
            )
        if scores.isnan().any():  # topk ranks NaN above every score: it would always be kept
            raise InvalidInputError(
                f"the importance scorer returned NaN for token {int(scores.isnan().nonzero()[0])}"
            )
        k = anchor_count(n, ratio)
        return sorted(torch.topk(scores, k).indices.tolist())


_BY_NAME = {cls.name: cls for cls in (UniformAnchors, RandomAnchors, RarestInBlockAnchors, ImportanceAnchors)}
NAMED_STRATEGIES = tuple(name for name, cls in _BY_NAME.items() if cls is not ImportanceAnchors)
"""The strategies a saved name alone rebuilds (importance needs a scorer function, given in code)."""


def make_selector(name: str, **kwargs) -> AnchorSelector:
    """Build a strategy from its saved name (``SACConfig.anchor_strategy``)."""
    try:
        cls = _BY_NAME[name]
    except KeyError as err:
        raise InvalidInputError(f"unknown anchor strategy {name!r}; choose one of {sorted(_BY_NAME)}") from err
    if cls is RandomAnchors:
        return RandomAnchors(seed=kwargs.get("seed", 0))
    if cls is ImportanceAnchors:
        return ImportanceAnchors(scorer=kwargs.get("scorer"))
    return cls()
