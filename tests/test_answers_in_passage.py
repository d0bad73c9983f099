"""benchmarks/answers_in_passage.py: which answers are verbatim spans of their passage."""

import runpy
from pathlib import Path

import pytest

from sac_rag.eval import Question

SPANS = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "answers_in_passage.py"))
is_span, split_by_span = SPANS["is_span"], SPANS["split_by_span"]

PASSAGE = "The Normans were a people who in the 10th and 11th centuries gave their name to Normandy."


def test_a_span_is_judged_after_squad_normalisation():
    assert is_span("the 10th and 11th Centuries", PASSAGE)
    assert is_span("Normandy.", PASSAGE)


def test_words_out_of_order_partial_words_and_empty_answers_are_not_spans():
    assert not is_span("11th and 10th centuries", PASSAGE)
    assert not is_span("Norman", PASSAGE)  # a prefix of "Normans", not a word of the passage
    assert not is_span("", PASSAGE) and not is_span("the", PASSAGE)


def test_mean_f1_is_the_share_weighted_f1_of_spans_and_of_the_others():
    questions = [Question(str(i), "When?", ["10th and 11th centuries"], PASSAGE) for i in range(4)]
    predictions = ["10th and 11th centuries", "11th centuries", "in the 12th century", "never"]
    split = split_by_span(questions, predictions)
    assert (split.n, split.spans) == (4, 2)
    # "11th centuries": precision 2/2, recall 2/4, F1 2/3
    assert split.span_f1 == pytest.approx((100 + 100 * 2 / 3) / 2)
    assert split.other_f1 == pytest.approx(0.0)
    assert split.f1 == pytest.approx(split.span_f1 / 2)
