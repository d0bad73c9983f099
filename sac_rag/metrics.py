"""Answer-quality metrics.

Standard SQuAD metrics (what users compare against): answers normalised (lower case, no
punctuation or articles, single spaces), EM and token F1 taken as the max over gold answers.
The paper's metrics (METHOD.md, "Metrics"): ROUGE-1 F between the prediction and the *first*
gold answer on whitespace tokens, case-sensitive ("F1"), and raw string equality ("EM").
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: list[str], gold: list[str]) -> float:
    common = Counter(prediction) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, golds: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 against the best gold answer, as the official SQuAD v1.1 script scores it: no
    shared token is 0, also when both sides normalise to nothing (gold "." against an empty
    answer, or "The" against gold "the A": EM 1, F1 0 there)."""
    pred = normalize_answer(prediction).split()
    return max(_token_f1(pred, normalize_answer(g).split()) for g in golds)


def answer_agreement(answer: str, other: str) -> float:
    """How far two answers agree, for a consensus among candidates (minimum Bayes risk): their
    token F1, as ``squad_f1`` scores it, except that two answers that both normalise to nothing
    (empty, or only articles and punctuation) agree fully. Unlike the official metric's 0, which
    scores a prediction against a gold answer, this keeps such candidates' consensus as it was
    measured (the committed MBR scores)."""
    mine, theirs = normalize_answer(answer).split(), normalize_answer(other).split()
    return 1.0 if not mine and not theirs else _token_f1(mine, theirs)


def paper_rouge1_f(prediction: str, golds: Sequence[str]) -> float:
    return _token_f1(prediction.split(), golds[0].split())


def paper_raw_em(prediction: str, golds: Sequence[str]) -> float:
    return float(prediction.strip() == golds[0].strip())


def score(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-example scores (in percent) under all four metrics."""
    rows = {"em": [], "f1": [], "paper_em": [], "paper_f1": []}
    for pred, gold in zip(predictions, golds, strict=True):
        rows["em"].append(100 * squad_em(pred, gold))
        rows["f1"].append(100 * squad_f1(pred, gold))
        rows["paper_em"].append(100 * paper_raw_em(pred, gold))
        rows["paper_f1"].append(100 * paper_rouge1_f(pred, gold))
    return rows


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    n = len(values)
    return _percentile_interval([sum(values[i] for i in sample) / n for sample in _resamples(n, resamples, seed)])


def paired_difference(values: Sequence[float], reference: Sequence[float], resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` minus ``reference``, item by item (both scored on the same items), and its
    95% bootstrap interval: (mean, low, high). One resample serves both, so the interval is much
    tighter than comparing two separate intervals."""
    if len(values) != len(reference) or not values:
        raise ValueError("need the same, non-zero number of values and reference values")
    differences = [a - b for a, b in zip(values, reference)]
    return (sum(differences) / len(differences), *bootstrap_ci(differences, resamples, seed))


def bootstrap_share_ci(values: Sequence[float], reference: Sequence[float], resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(values) / mean(reference), e.g. the share of an upper
    bound's F1 that a method keeps (both scored on the same questions). A resample whose reference
    sums to 0 has no share and is left out (it used to count as a share of 0, or of about 1e13);
    (nan, nan) when every resample is such."""
    if len(values) != len(reference) or not values:
        raise ValueError("need the same, non-zero number of values and reference values")
    shares = []
    for sample in _resamples(len(values), resamples, seed):
        total = sum(reference[i] for i in sample)
        if total:
            shares.append(sum(values[i] for i in sample) / total)
    return _percentile_interval(shares) if shares else (float("nan"), float("nan"))


def _resamples(n: int, resamples: int, seed: int):
    rng = random.Random(seed)
    for _ in range(resamples):
        yield [rng.randrange(n) for _ in range(n)]


def _percentile_interval(statistics: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles: the same number of statistics, floor(2.5%), left out
    below and above. (The upper end used to be ``ordered[int(0.975 n) - 1]``, which is that only
    when n is a multiple of 40, as for the default 1,000 resamples; a share interval whose
    zero-reference resamples were left out, or another resample count, lost its top point
    besides, e.g. (0, 8) for the statistics 0..9 where the symmetric interval is (0, 9).)"""
    ordered = sorted(statistics)
    cut = int(0.025 * len(ordered))
    return ordered[cut], ordered[len(ordered) - 1 - cut]


def summarize(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Means and 95% CIs: {"em", "f1", "paper_em", "paper_f1", "f1_ci": [lo, hi], ...}."""
    rows = score(predictions, golds)
    out: dict = {"n": len(predictions)}
    for name, values in rows.items():
        out[name] = sum(values) / len(values) if values else float("nan")
        out[f"{name}_ci"] = list(bootstrap_ci(values))
    return out


def headline_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """The scores a results row carries: ``{"f1", "em", "f1_ci"}`` (percent; the F1's bootstrap 95% CI)."""
    scores = summarize(predictions, golds)
    return {name: scores[name] for name in ("f1", "em", "f1_ci")}


def headline_text(row: dict) -> str:
    """A row's scores as printed: ``"F1 42.5 (36.7-47.9), EM 26.0"``."""
    return f"F1 {row['f1']:.1f} ({row['f1_ci'][0]:.1f}-{row['f1_ci'][1]:.1f}), EM {row['em']:.1f}"
