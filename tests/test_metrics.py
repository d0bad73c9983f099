"""Answer metrics: the standard SQuAD ones and the paper's (METHOD.md, "Metrics")."""

import pytest

from sac_rag.metrics import (
    bootstrap_ci,
    bootstrap_share_ci,
    normalize_answer,
    paper_raw_em,
    paper_rouge1_f,
    squad_em,
    squad_f1,
    summarize,
)


def test_squad_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"


def test_squad_em_and_f1_take_the_best_gold_answer():
    golds = ["Denver Broncos", "the Broncos"]
    assert squad_em("broncos", golds) == 1.0
    assert squad_f1("Denver", golds) == pytest.approx(2 / 3)
    assert squad_f1("Carolina Panthers", golds) == 0.0


def test_paper_metrics_are_case_sensitive_against_the_first_gold_only():
    golds = ["Denver Broncos", "broncos"]
    assert paper_raw_em("broncos", golds) == 0.0
    assert paper_rouge1_f("Denver broncos", golds) == pytest.approx(0.5)
    assert paper_raw_em(" Denver Broncos ", golds) == 1.0


def test_summary_reports_percent_means_with_confidence_intervals():
    out = summarize(["Paris", "Rome", "x"], [["Paris"], ["Madrid"], ["x"]])
    assert out["n"] == 3 and out["em"] == pytest.approx(200 / 3)
    low, high = out["f1_ci"]
    assert 0 <= low <= out["f1"] <= high <= 100


def test_bootstrap_interval_narrows_with_more_data():
    few = bootstrap_ci([0.0, 100.0] * 5)
    many = bootstrap_ci([0.0, 100.0] * 500)
    assert (many[1] - many[0]) < (few[1] - few[0])


def test_share_interval_brackets_the_share_of_a_reference_scored_on_the_same_questions():
    reference = [100.0, 0.0, 50.0, 100.0] * 50
    assert bootstrap_share_ci([v / 2 for v in reference], reference) == (0.5, 0.5)  # paired: no spread
    noisy = [v * (0.2 if i % 3 else 1.0) for i, v in enumerate(reference)]
    lo, hi = bootstrap_share_ci(noisy, reference)
    assert lo < sum(noisy) / sum(reference) < hi
    with pytest.raises(ValueError):
        bootstrap_share_ci([1.0], [1.0, 2.0])
