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


# -- audit: percentile indices and paired resampling, against hand computations -----------------------


def _fixed_resamples(monkeypatch, samples):
    """Make every bootstrap draw exactly ``samples`` (lists of question indices), so that an
    interval can be computed by hand."""
    from sac_rag import metrics

    monkeypatch.setattr(metrics, "_resamples", lambda n, resamples, seed: iter(samples))


@pytest.mark.parametrize(("n", "expected"), [(1000, (25, 974)), (10, (0, 9)), (968, (24, 943)), (1, (0, 0))])
def test_the_interval_leaves_out_as_many_statistics_below_as_above(n, expected):
    from sac_rag.metrics import _percentile_interval

    statistics = list(range(n))
    statistics.reverse()  # sorted first
    assert _percentile_interval(statistics) == expected  # floor(2.5% of n) left out on each side


def test_bootstrap_interval_of_the_mean_by_hand(monkeypatch):
    # ten draws of three questions scored 0, 10 and 20: means 0 (once), 10 (eight times), 20 (once);
    # 2.5% of ten is no draw, so the interval is the smallest and the largest mean
    _fixed_resamples(monkeypatch, [[0, 0, 0]] + [[0, 1, 2]] * 8 + [[2, 2, 2]])
    assert bootstrap_ci([0.0, 10.0, 20.0], resamples=10) == (0.0, 20.0)  # was (0.0, 10.0): its top point lost


def test_the_share_of_a_resample_is_the_ratio_of_its_two_sums_over_the_same_questions(monkeypatch):
    # both methods read on the same drawn questions; the share of a draw is sum(values) / sum(reference)
    # (1 + 0) / (1 + 3) = 0.25, not the mean of per-question ratios (1/1 + 0/3) / 2 = 0.5
    _fixed_resamples(monkeypatch, [[0, 1], [1, 0]] * 20)
    assert bootstrap_share_ci([1.0, 0.0], [1.0, 3.0], resamples=40) == (0.25, 0.25)


def test_a_share_interval_missing_resamples_still_takes_both_ends_symmetrically(monkeypatch):
    # reference [0, 2], values [1, 1]: a draw of question 0 twice has no share (left out), question 1
    # twice 2 / 4 = 0.5, both questions 2 / 2 = 1.0; five of ten draws kept: shares 0.5 x4 and 1.0
    _fixed_resamples(monkeypatch, [[0, 0]] * 5 + [[1, 1]] * 4 + [[0, 1]])
    assert bootstrap_share_ci([1.0, 1.0], [0.0, 2.0], resamples=10) == (0.5, 1.0)  # was (0.5, 0.5)


def test_official_script_edge_cases_by_hand():
    """The official evaluate-v1.1.py on cases decided by hand: EM compares normalised strings
    (both empty: 1), F1 is 0 without a shared token (also both empty), repeated tokens count
    as often as both sides hold them (Counter), and the best gold answer counts."""
    assert (squad_em("", ["."]), squad_f1("", ["."])) == (1.0, 0.0)
    assert squad_f1("paris paris", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # precision 1/2, recall 1
    assert squad_f1("the the cat", ["a cat"]) == 1.0  # articles go before tokens are counted
    assert squad_f1("U.S.", ["US"]) == 1.0 and squad_f1("U.S.", ["U S"]) == 0.0  # punctuation removed, not spaced
    assert normalize_answer("Ça\u00a0va\tbien") == "ça va bien"  # every whitespace, as str.split does
    assert normalize_answer("“quoted”, theatre") == "“quoted” theatre"  # only string.punctuation is removed
    assert normalize_answer("“the”") == "“ ”"  # an article becomes a space, as in the official script


def test_summary_reports_em_and_f1_each_under_its_own_name():
    summary = summarize(["Denver"], [["Denver Broncos"]])
    assert summary["em"] == 0.0 and summary["f1"] == pytest.approx(200 / 3)


def test_f1_counts_a_repeated_token_as_often_as_it_occurs_on_both_sides():
    assert squad_f1("New York, New York", ["new york new york"]) == 1.0
    assert squad_f1("New York", ["new york new york"]) == pytest.approx(2 / 3)


def test_each_score_carries_its_own_interval_and_the_row_carries_the_f1_one():
    """"denver" against gold "Denver Broncos": SQuAD F1 2/3 on every question, EM 0, and the paper's
    case-sensitive ROUGE-1 0; every resample of a constant is that constant, so each CI is a point."""
    from sac_rag.metrics import headline_scores

    predictions, golds = ["denver"] * 4, [["Denver Broncos"]] * 4
    summary = summarize(predictions, golds)
    assert summary["f1_ci"] == pytest.approx([200 / 3, 200 / 3])  # not EM's [0, 0]
    assert summary["em_ci"] == [0.0, 0.0] and summary["paper_f1_ci"] == [0.0, 0.0]
    assert headline_scores(predictions, golds)["f1_ci"] == pytest.approx([200 / 3, 200 / 3])  # not ROUGE-1's


def test_the_paired_difference_is_values_minus_reference_with_an_interval_around_it():
    from sac_rag.metrics import paired_difference

    mean, low, high = paired_difference([100.0, 50.0, 0.0, 0.0], [100.0] * 4)
    assert mean == -62.5 and -100.0 <= low <= mean <= high <= 0.0
    assert paired_difference([3.0, 3.0], [1.0, 1.0]) == (2.0, 2.0, 2.0)  # a constant difference: a point
