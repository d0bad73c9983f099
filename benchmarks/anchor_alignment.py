"""Which answer tokens does a compressed context lose? For every gold-answer token, whether it
was an anchor (its own K/V kept) or not (only carried by a nearby anchor), and whether the
prediction reproduces it. Full-text reading should not care; a compressor whose anchors do not
carry their neighbours does.

    P=benchmarks/results/predictions   # ???????? = the compressor's fingerprint
    python benchmarks/anchor_alignment.py --n 1000 --ratio 5 \\
        $P/full-ft-squad-dev-n1000-s0.jsonl $P/sac-5x-distill-decay-????????-squad-dev-n1000-s0.jsonl

The answer's tokens are those of the first verbatim occurrence of the first gold answer in the
paragraph (questions whose answer does not occur verbatim are skipped and counted), tokenised
as the compressor tokenises a passage (``chunk_len``-token sub-contexts, anchors chosen by
``--anchor-strategy``). A token counts as reproduced when its text (lower-cased, at least two
characters, so single letters and punctuation are left out) occurs in the lower-cased
prediction. How often depends on how long the predictions are (a verbose model "reproduces" more
words), so compare the two columns within a row: the difference is what the anchors' own K/V
adds over their neighbours'. The last two columns split the questions whose answer is a single
such token by whether that token was an anchor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sac_rag.anchors import make_selector
from sac_rag.errors import exit_with_message
from sac_rag.eval import add_subset_arguments, predictions_for, subset_questions
from sac_rag.metrics import squad_f1
from sac_rag.models import load_tokenizer


def answer_tokens(tokenizer, selector, question, ratio: int, chunk_len: int) -> list[tuple[str, bool]] | None:
    """``(text, is_anchor)`` of each answer token, or None when the answer is not in the passage."""
    answer = question.answers[0]
    start = question.context.find(answer)
    if start < 0:
        return None
    end = start + len(answer)
    encoded = tokenizer(question.context, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    anchors = set()
    for chunk_start in range(0, len(ids), chunk_len):
        chunk = ids[chunk_start : chunk_start + chunk_len]
        anchors.update(chunk_start + i for i in selector.select(chunk, ratio))
    pieces = []
    for i, (lo, hi) in enumerate(offsets):
        if lo < end and hi > start:
            text = question.context[max(lo, start) : min(hi, end)].strip().lower()
            if len(text) >= 2:
                pieces.append((text, i in anchors))
    return pieces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="prediction files written by python -m sac_rag.eval")
    add_subset_arguments(parser)
    parser.add_argument("--ratio", type=int, required=True, help="the compression ratio the anchors are chosen at")
    parser.add_argument("--chunk-len", type=int, default=510)
    parser.add_argument("--anchor-strategy", default="uniform")
    parser.add_argument("--base-model", default="smollm2-135m", help="whose tokenizer splits the passages")
    args = parser.parse_args(argv)

    questions = subset_questions(args)
    tokenizer = load_tokenizer(args.base_model)
    selector = make_selector(args.anchor_strategy)
    tokens = {q.id: answer_tokens(tokenizer, selector, q, args.ratio, args.chunk_len) for q in questions}
    skipped = sum(t is None for t in tokens.values())
    print(f"{args.dataset}, n={len(questions)} ({skipped} skipped: answer not verbatim in the passage), "
          f"anchors at ratio {args.ratio} ({args.anchor_strategy})\n")
    print("| predictions | answer tokens that are anchors: reproduced | other answer tokens: reproduced | difference "
          "| F1 on one-token answers: an anchor | not an anchor |")
    print("|---|---|---|---|---|---|")
    for path in args.predictions:
        hits = {True: [0, 0], False: [0, 0]}
        one_token_f1 = {True: [], False: []}
        for q, prediction in zip(questions, predictions_for(Path(path), questions)):
            pieces = tokens[q.id] or []
            for text, is_anchor in pieces:
                hits[is_anchor][0] += text in prediction.lower()
                hits[is_anchor][1] += 1
            if len(pieces) == 1:
                one_token_f1[pieces[0][1]].append(squad_f1(prediction, q.answers))
        rates = [100 * h / max(n, 1) for h, n in (hits[True], hits[False])]
        f1 = [f"{100 * sum(v) / max(len(v), 1):.1f} (n={len(v)})" for v in (one_token_f1[True], one_token_f1[False])]
        print(f"| {Path(path).name} | {rates[0]:.1f}% of {hits[True][1]} | {rates[1]:.1f}% of {hits[False][1]} "
              f"| {rates[0] - rates[1]:+.1f} | {f1[0]} | {f1[1]} |")
    return 0


if __name__ == "__main__":
    exit_with_message(main)
