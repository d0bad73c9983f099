"""How often is an answer a verbatim span of its passage, and what F1 do those answers and the
others score? A reader that has the passage's words answers SQuAD with a span; one that has lost
them paraphrases or garbles it. Mean F1 splits exactly into the two parts:

    F1 = share of span answers x F1 of span answers + (1 - share) x F1 of the others

    P=benchmarks/results/predictions   # ???????? = the compressor's fingerprint
    python benchmarks/answers_in_passage.py --n 1000 \\
        $P/full-ft-fp32-float32-squad-dev-n1000-s0.jsonl \\
        $P/sac-5x-soup16-17-fp32-????????-float32-squad-dev-n1000-s0.jsonl

An answer is a span when, after SQuAD normalisation (lower case, no punctuation or articles), its
words occur consecutively in the normalised passage; an empty answer is not a span. Which
questions a reader answers with a span is its own choice (it may fall back to a paraphrase on the
hard ones), so the F1 of the two parts describes its answers, not what it would score if every
answer were a span: extractive decoding (``python -m sac_rag.eval --extractive``) measures that.
Single-passage datasets only: the passage is each question's gold paragraph.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from sac_rag.errors import exit_with_message
from sac_rag.eval import Question, add_subset_arguments, predictions_for, subset_questions
from sac_rag.metrics import normalize_answer, squad_f1


def is_span(answer: str, passage: str) -> bool:
    """Whether the normalised answer's words occur consecutively in the normalised passage."""
    words = normalize_answer(answer)
    return bool(words) and f" {words} " in f" {normalize_answer(passage)} "


@dataclass
class SpanSplit:
    """One method's answers split by whether they are spans of their passage (F1 in 0..100)."""

    n: int
    spans: int
    span_f1: float
    other_f1: float

    @property
    def share(self) -> float:
        return self.spans / self.n

    @property
    def f1(self) -> float:
        return self.share * self.span_f1 + (1 - self.share) * self.other_f1


def split_by_span(questions: list[Question], predictions: list[str]) -> SpanSplit:
    scored = [(is_span(p, q.context), 100 * squad_f1(p, q.answers)) for q, p in zip(questions, predictions)]
    span = [f1 for inside, f1 in scored if inside]
    other = [f1 for inside, f1 in scored if not inside]
    return SpanSplit(len(scored), len(span), sum(span) / max(len(span), 1), sum(other) / max(len(other), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="prediction files written by python -m sac_rag.eval")
    add_subset_arguments(parser)
    args = parser.parse_args(argv)

    questions = subset_questions(args)
    print(f"{args.dataset}, n={len(questions)}, seed {args.seed}\n")
    print("| predictions | F1 | answers that are a span of the passage | their F1 | the others' F1 |")
    print("|---|---|---|---|---|")
    for path in args.predictions:
        split = split_by_span(questions, predictions_for(Path(path), questions))
        print(f"| {Path(path).name} | {split.f1:.1f} | {100 * split.share:.1f}% | {split.span_f1:.1f} "
              f"| {split.other_f1:.1f} |")
    return 0


if __name__ == "__main__":
    exit_with_message(main)
