"""Paired comparison of methods that answered the same questions: mean SQuAD F1 of each and its
difference to a reference, with a 95% bootstrap interval over questions.

    P=benchmarks/results/predictions   # ???????? = the compressor's fingerprint
    python benchmarks/paired.py --dataset squad-dev --n 500 \\
        $P/ablation-sac-????????-squad-dev-n500-s0.jsonl $P/ablation-no-mask-????????-squad-dev-n500-s0.jsonl

The first prediction file is the reference; ``a.jsonl+b.jsonl`` stands for the per-question mean
of several runs (e.g. two training seeds of one variant). ``--also SKIP:N`` pools another block of
the same seeded order with the first (issue 3's rule: the headline's 1,000 and the confirmation's
500), and each method is then named by one prediction file per block, comma-joined in that order:

    python benchmarks/paired.py --n 1000 --also 5800:500 \
        $P/full-ft-...-n1000-s0.jsonl,$P/full-ft-...-n500-s0-k5800.jsonl \
        $P/sac-...-n1000-s0.jsonl,$P/sac-...-n500-s0-k5800.jsonl
 Resampling the per-question
differences (one resample for both methods) gives a much tighter interval than comparing two
unpaired CIs, which is what small ablations need. Prediction files are the per-question caches
that ``python -m sac_rag.eval`` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sac_rag.errors import InvalidInputError, exit_with_message
from sac_rag.eval import add_subset_arguments, dataset_questions, predictions_for, subset_questions
from sac_rag.metrics import bootstrap_ci, bootstrap_share_ci, paired_difference, score


def per_question_f1(path: Path, questions) -> list[float]:
    return score(predictions_for(path, questions), [q.answers for q in questions])["f1"]


def run_paths(spec: str) -> list[Path]:
    """The prediction files a spec names: itself if it is a file (the benchmarks' own names may hold a
    ``+``, e.g. ``rag-text-truncate-5x+fullft-decoder-...``), else its ``+``-joined parts."""
    return [Path(spec)] if Path(spec).is_file() else [Path(part) for part in spec.split("+")]


def averaged_f1(spec: str, questions) -> list[float]:
    """Per-question F1 of one prediction file, or the mean over ``+``-joined files."""
    runs = [per_question_f1(path, questions) for path in run_paths(spec)]
    return [sum(values) / len(values) for values in zip(*runs)]


def pooled_f1(spec: str, blocks: list[list]) -> list[float]:
    """Per-question F1 over several blocks of questions, the i-th ``,``-joined part of ``spec``
    (a file, or ``+``-joined runs) answering the i-th block."""
    parts = spec.split(",")
    if len(parts) != len(blocks):
        raise InvalidInputError(f"{spec} names {len(parts)} prediction file(s) for {len(blocks)} blocks of questions "
                                "(--n, then each --also): give one per block, comma-joined in that order")
    return [f1 for part, questions in zip(parts, blocks) for f1 in averaged_f1(part, questions)]


def block(text: str) -> tuple[int, int]:
    """``--also``'s ``SKIP:N``."""
    skip, colon, n = text.partition(":")
    if not (colon and skip.isdigit() and n.isdigit() and int(n) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not SKIP:N (e.g. 5800:500: the 500 questions after the "
                                         "first 5,800 of the seeded order)")
    return int(skip), int(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+",
                        help="prediction files (or a+b: their per-question mean); the first is the reference")
    add_subset_arguments(parser)
    parser.add_argument("--also", type=block, action="append", default=[], metavar="SKIP:N",
                        help="pool another block of the same seeded order (each method then names one file per "
                             "block, comma-joined)")
    args = parser.parse_args(argv)

    blocks = [subset_questions(args)]
    blocks += [dataset_questions(args.data_root, args.dataset, n, args.seed, skip) for skip, n in args.also]
    ids = [q.id for questions in blocks for q in questions]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"the blocks --n {args.n} --skip {args.skip} and --also "
                                f"{' '.join(f'{skip}:{n}' for skip, n in args.also)} share questions, which the pool "
                                "would count twice: give disjoint blocks of the seeded order")
    specs = args.predictions
    f1 = {spec: pooled_f1(spec, blocks) for spec in specs}  # each file read and scored once
    base = f1[specs[0]]
    print(f"{args.dataset}, n={len(base)}, seed {args.seed}; reference: {_name(specs[0])}\n")
    print("| predictions | F1 (95% CI) | F1 - reference (paired 95% CI) | F1 / reference (paired 95% CI) |")
    print("|---|---|---|---|")
    for index, spec in enumerate(specs):
        lo, hi = bootstrap_ci(f1[spec])
        delta = share = "-"
        if index:  # every file after the first, even one named twice (then +0.0, 100%)
            mean, dlo, dhi = paired_difference(f1[spec], base)
            delta = f"{mean:+.1f} ({dlo:+.1f} to {dhi:+.1f})"
            share = share_of(f1[spec], base)
        print(f"| {_name(spec)} | {sum(f1[spec]) / len(f1[spec]):.1f} ({lo:.1f}-{hi:.1f}) | {delta} | {share} |")
    return 0


def share_of(values: list[float], reference: list[float]) -> str:
    """mean(values) / mean(reference) with its paired 95% CI; no share of a reference that scored
    nothing (a ratio to 0, which the bootstrap would print as an absurd percentage)."""
    if not sum(reference):
        return "- (reference F1 is 0)"
    slo, shi = bootstrap_share_ci(values, reference)
    return f"{sum(values) / sum(reference):.1%} ({slo:.1%} to {shi:.1%})"


def _name(spec: str) -> str:
    return ", ".join(" + ".join(path.name for path in run_paths(part)) for part in spec.split(","))


if __name__ == "__main__":
    exit_with_message(main)
