"""Anchor selection: the exact index rule of METHOD.md and the alternative strategies."""

import math
import random

import pytest
import torch

from sac_rag import (
    ImportanceAnchors,
    InvalidInputError,
    RandomAnchors,
    RarestInBlockAnchors,
    UniformAnchors,
    anchor_count,
)
from sac_rag.anchors import make_selector

FULL = list(range(510))


@pytest.mark.parametrize(
    "ratio, count, first, last",
    [(5, 102, 2, 507), (15, 34, 7, 502), (51, 10, 25, 484)],
)
def test_uniform_anchors_of_a_full_chunk_match_the_reference_rule(ratio, count, first, last):
    idx = UniformAnchors().select(FULL, ratio)
    assert len(idx) == count == anchor_count(510, ratio)
    assert idx[0] == first and idx[-1] == last
    assert idx == list(range((ratio - 1) // 2, 510, ratio))


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (12, 5, [2, 7]),  # ceil((12 - 2) / 5) = 2
        (13, 5, [2, 7, 12]),
        (3, 5, [2]),
        (2, 5, [0]),  # s = 2 >= n: the first token stands for the chunk
        (1, 51, [0]),
        (40, 15, [7, 22, 37]),
        (100, 51, [25, 76]),
        (7, 1, [0, 1, 2, 3, 4, 5, 6]),  # ratio 1 keeps every token
    ],
)
def test_uniform_anchors_of_partial_chunks(n, ratio, expected):
    assert UniformAnchors().select(list(range(n)), ratio) == expected
    assert anchor_count(n, ratio) == len(expected)


@pytest.mark.parametrize("ratio", [0, -3, 2.5, True])
def test_ratio_must_be_a_positive_integer(ratio):
    with pytest.raises(InvalidInputError, match="ratio"):
        UniformAnchors().select(FULL, ratio)


@pytest.mark.parametrize("selector", [UniformAnchors(), RandomAnchors(), RarestInBlockAnchors(),
                                      ImportanceAnchors(scorer=lambda ids: [float(i) for i in ids])],
                         ids=lambda selector: selector.name)
def test_token_ids_read_once_are_refused_naming_their_type(selector):
    with pytest.raises(InvalidInputError, match="a sequence of token ids.*got a generator"):
        selector.select((token for token in FULL), 5)


def test_counts_are_whole_numbers_numpy_s_too():
    import numpy as np

    assert anchor_count(np.int64(510), np.int64(5)) == anchor_count(510, 5) == 102
    for n_tokens in (float("nan"), 2.5, 0):
        with pytest.raises(InvalidInputError, match=r"a chunk needs a whole number of tokens, at least one"):
            anchor_count(n_tokens, 5)


def test_random_anchors_keep_the_uniform_count_and_are_reproducible_per_chunk():
    chunk = list(range(100, 610))
    a = RandomAnchors(seed=3).select(chunk, 15)
    assert len(a) == 34 and a == sorted(set(a)) and all(0 <= i < 510 for i in a)
    assert a == RandomAnchors(seed=3).select(chunk, 15)
    assert a != RandomAnchors(seed=4).select(chunk, 15)
    assert a != UniformAnchors().select(chunk, 15)
    assert a != RandomAnchors(seed=3).select(list(range(200, 710)), 15)  # another chunk of the same length
    ones = {tuple(RandomAnchors(seed=3).select(list(range(i, i + 5)), 5)) for i in range(20)}
    assert all(len(one) == 1 for one in ones) and len(ones) > 1  # one anchor, still at random


def test_importance_anchors_take_the_highest_scores_in_order():
    scores = [0.0] * 20
    for i in (17, 3, 11, 9):
        scores[i] = 1.0 + i
    selector = ImportanceAnchors(scorer=lambda ids: scores)
    assert selector.select(list(range(20)), 5) == [3, 9, 11, 17]


def test_importance_scorer_returning_wrong_length_is_reported():
    selector = ImportanceAnchors(scorer=lambda ids: [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="scorer returned"):
        selector.select(list(range(20)), 5)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 11, 64, 510])
@pytest.mark.parametrize("ratio", [1, 2, 5, 15])
def test_rarest_in_block_keeps_the_uniform_count_one_anchor_per_block(n, ratio):
    ids = [(7 * i) % 13 for i in range(n)]
    uniform = UniformAnchors().select(ids, ratio)
    rarest = RarestInBlockAnchors().select(ids, ratio)
    assert len(rarest) == len(uniform) == anchor_count(n, ratio)
    assert [i // ratio for i in rarest] == [p // ratio for p in uniform]


def test_rarest_in_block_takes_the_highest_token_id_nearest_the_uniform_anchor_on_ties():
    ids = [5, 900, 7, 7, 900,   1, 1, 1, 1, 1,   4, 2, 8000, 2, 4]
    # block 0: 900 at 1 and 4, 1 is nearer the uniform anchor 2; block 1: all equal, the uniform 7
    assert RarestInBlockAnchors().select(ids, 5) == [1, 7, 12]
    assert make_selector("rarest_in_block").select(ids, 5) == [1, 7, 12]


def test_importance_scores_with_nan_are_refused():
    # Before: topk ranks NaN above every score, so each token scored NaN silently became an anchor.
    scores = [0.1, float("nan"), 0.3, 0.2, 0.9, 0.0]
    for scorer in (lambda ids: scores, lambda ids: torch.tensor(scores)):
        with pytest.raises(InvalidInputError, match="NaN.*token 1"):
            ImportanceAnchors(scorer=scorer).select(list(range(6)), 2)
    infinite = [0.1, float("inf"), 0.3, float("-inf"), 0.9, 0.0]  # ordered: keep, never keep
    assert ImportanceAnchors(scorer=lambda ids: infinite).select(list(range(6)), 3) == [1, 4]


def test_every_strategy_picks_sorted_unique_in_range_anchors_of_the_documented_count():
    rng = random.Random(7)
    for _ in range(400):
        n = rng.choice([1, 2, 3, 5, rng.randint(1, 600)])
        ratio = rng.choice([1, 2, 3, 5, 15, 51, rng.randint(1, 700)])
        ids = [rng.randint(0, 50_000) for _ in range(n)]
        scores = [rng.random() for _ in range(n)]
        count = anchor_count(n, ratio)
        assert count == max(1, math.ceil((n - (ratio - 1) // 2) / ratio))
        for selector in (UniformAnchors(), RandomAnchors(seed=n), RarestInBlockAnchors(),
                         ImportanceAnchors(scorer=lambda ids, scores=scores: scores)):
            picked = selector.select(ids, ratio)
            assert len(picked) == count and picked == sorted(set(picked)), (selector, n, ratio)
            assert all(type(i) is int and 0 <= i < n for i in picked)
            assert selector.select(torch.tensor(ids), ratio) == picked  # tensor ids: the same anchors
