"""Answer metrics: the standard SQuAD ones and the paper's (METHOD.md, "Metrics")."""

import pytest

from sac_rag.metrics import (
    answer_agreement,
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


def _official_v1_1(prediction, golds):
    """EM and F1 as the official SQuAD v1.1 evaluate-v1.1.py computes them."""
    import re
    import string
    from collections import Counter

    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    def f1(p, g):
        p, g = norm(p).split(), norm(g).split()
        same = sum((Counter(p) & Counter(g)).values())
        return 0.0 if same == 0 else 2 * (same / len(p)) * (same / len(g)) / (same / len(p) + same / len(g))

    return max(float(norm(prediction) == norm(g)) for g in golds), max(f1(prediction, g) for g in golds)


@pytest.mark.parametrize(("prediction", "golds"), [
    ("The", ["."]),  # SQuAD-dev question 5730b7ce069b5314008322c4 has the gold answer "."
    ("", ["The A"]),  # both sides normalise to nothing
    ("a", ["the", "Paris"]),
    ("Theatre, the café—Zürich", ["theatre cafe zurich", "the café—zürich"]),
    ("ÉCOLE «Normale»", ["école normale"]),
    ("an apple a day", ["An Apple-a-Day"]),
])
def test_em_and_f1_match_the_official_squad_v1_1_script(prediction, golds):
    assert (squad_em(prediction, golds), squad_f1(prediction, golds)) == pytest.approx(
        _official_v1_1(prediction, golds))


def test_a_resample_whose_reference_scored_nothing_has_no_share():
    reference = [100.0, 0.0, 0.0, 0.0]  # a quarter of the resamples (about 32%) draw no scored question
    assert bootstrap_share_ci(reference, reference) == (1.0, 1.0)  # a method against itself: 100%, always
    lo, hi = bootstrap_share_ci([50.0, 100.0, 0.0, 0.0], reference)
    assert lo >= 0.5 and hi < 1e6  # not 0 (0 / 1e-12) nor ~1e13 (100 / 1e-12)
    assert all(x != x for x in bootstrap_share_ci([1.0], [0.0]))  # no resample has a share: nan


def test_candidates_that_both_say_nothing_agree_for_a_consensus_but_score_zero_f1_against_gold():
    """MBR's agreement keeps two empty (or article-only) answers as agreeing, as its committed
    scores were measured; the SQuAD metric scores such a prediction 0 F1 against an empty gold."""
    assert answer_agreement("The", "") == 1.0 and squad_f1("The", ["."]) == 0.0
    assert answer_agreement("the Eiffel tower", "Eiffel") == squad_f1("the Eiffel tower", ["Eiffel"]) == 2 / 3
    assert answer_agreement("Paris", "") == 0.0
