"""A streamed answer against the same answer from ``answer``: how much streaming costs.

    python benchmarks/stream_speed.py --threads 2       # rows -> benchmarks/results/stream_speed.jsonl

One ``SAC`` answers the same SQuAD-dev questions from the same compressed paragraphs (compressed
once, beforehand) four ways, alternating question by question and round by round so that drifts
in the machine's speed hit all alike: ``answer``; ``stream`` read to its end; ``stream``'s first
piece; and ``answer`` reading the prompt's opening text (before its first compressed context) every
time instead of reusing its kept K/V, as before ``113a2b1``. The figures are medians over every
question and round, with the ratios of the whole stream and of the opening read every time to
``answer`` (1.0: no cost); answers that differ between ``answer`` and ``stream`` are counted.
Greedy, and with ``--num-beams`` beam search, whose stream hands its answer out whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sac_rag  # noqa: E402
from sac_rag import SAC, GenerationConfig  # noqa: E402
from sac_rag.errors import exit_with_message  # noqa: E402
from sac_rag.eval import at_least, dataset_questions  # noqa: E402
from sac_rag.files import append_jsonl  # noqa: E402
from sac_rag.pipeline import LAYOUT_STOP, load_compressor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressor", default="smollm2-135m-sac-5x")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--questions", type=at_least(1), default=10)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--new-tokens", type=at_least(1), default=32)
    parser.add_argument("--num-beams", type=at_least(1), default=1, help="1: greedy, token by token")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default="benchmarks/results/stream_speed.jsonl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sac = SAC(load_compressor(args.compressor, device="cpu", dtype=args.dtype))
    config = GenerationConfig(max_new_tokens=args.new_tokens, stop=LAYOUT_STOP, num_beams=args.num_beams)
    questions = dataset_questions(args.data_root, "squad-dev", args.questions, seed=0)
    asked = [(q.question, sac.compress(q.context)) for q in questions]

    def answered(question, contexts) -> str:
        return sac.answer(question, contexts, config=config).text

    def streamed(question, contexts) -> str:
        return "".join(sac.stream(question, contexts, config=config))

    def first_piece(question, contexts) -> str:
        stream = sac.stream(question, contexts, config=config)
        piece = next(stream, "")
        stream.close()
        return piece

    def answered_reading_the_opening(question, contexts) -> str:  # as before sac_rag kept it (113a2b1)
        sac.generator._openings.clear()
        return answered(question, contexts)

    ways = {"answer": answered, "stream": streamed, "first_piece": first_piece,
            "answer_reading_the_opening": answered_reading_the_opening}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    texts: dict[str, list[str]] = {name: [] for name in ways}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for question, contexts in asked:
            for name, way in ways.items():
                start = time.perf_counter()
                text = way(question, contexts)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
                elif name in ("answer", "stream"):
                    texts[name].append(text)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    row = {
        "compressor": args.compressor, "dtype": args.dtype, "num_beams": args.num_beams,
        "questions": len(asked), "rounds": args.rounds, "new_tokens": args.new_tokens,
        "answer_s": median["answer"], "stream_s": median["stream"], "first_piece_s": median["first_piece"],
        "stream_over_answer": median["stream"] / median["answer"],
        "answer_reading_the_opening_s": median["answer_reading_the_opening"],
        "opening_read_over_kept": median["answer_reading_the_opening"] / median["answer"],
        "answers_identical": sum(a == b for a, b in zip(texts["answer"], texts["stream"])),
        "threads": torch.get_num_threads(), "sac_rag_commit": _library_commit(),
        "command": "python benchmarks/stream_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "command"}))
    append_jsonl(args.results, [row])
    return 0


def _library_commit() -> str | None:
    """The commit of the sac_rag that ran (a checkout of an earlier one, for a before/after pair),
    with "+changes" if its working tree differs; None outside a git checkout."""
    where = Path(sac_rag.__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=where, capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


if __name__ == "__main__":
    exit_with_message(main)
