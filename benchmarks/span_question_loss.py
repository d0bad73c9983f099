"""Does a compressor spell out what a question locates? Cross-entropy per answer token of its
decoder reading each paragraph compressed, on the paragraphs' real questions and on synthetic span
questions (``Which words follow "<four words>" in the context?``, the rows ``--span-questions``
trains on), with no distillation. Lower is better; compare checkpoints on the same paragraphs.

    python benchmarks/span_question_loss.py benchmarks/checkpoints/sac5x-soup16-17 \\
        benchmarks/checkpoints/sac5x-stage25

Paragraphs are a seeded sample of SQuAD dev (not trained on); each gets two of its questions and
two span questions.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from sac_rag.compressor import SACCompressor
from sac_rag.data import Paragraph, read_qa
from sac_rag.objectives import ExampleBuilder, SACObjective

KINDS = {"real questions": (2, 0), "span questions": (0, 2)}  # (questions, span questions) per paragraph


def answer_loss(comp: SACCompressor, paragraphs: list[Paragraph], questions: int, span_questions: int,
                micro_batch: int = 8) -> tuple[float, int]:
    """Mean cross-entropy per answer token (and the number of tokens) over the paragraphs."""
    prefix = comp.config.prompt.prefix + comp.config.prompt.context_prefix
    objective = SACObjective(comp, prefix_text=prefix, weighting="micro_batch_tokens")  # per token, summed below
    builder = ExampleBuilder(comp.tokenizer, comp.config.prompt, questions_per_context=questions,
                             span_questions=span_questions, seed=3)
    examples = [builder.qa(p, i, paragraphs) for i, p in enumerate(paragraphs)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), micro_batch):
            stats = objective.loss(examples[start : start + micro_batch])[1]
            total += stats["ce"] * stats["target_tokens"]
            tokens += stats["target_tokens"]
    return total / tokens, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="compressor directories or short names")
    parser.add_argument("--data", default="../shared/data/squad-v1.1/dev-v1.1.json.xz")
    parser.add_argument("--paragraphs", type=int, default=48)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paragraphs = read_qa(Path(args.data))
    sample = random.Random(args.seed).sample(paragraphs, min(args.paragraphs, len(paragraphs)))
    print("| checkpoint | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    for checkpoint in args.checkpoints:
        comp = SACCompressor.from_pretrained(checkpoint, dtype="float32")
        cells = [answer_loss(comp, sample, *counts) for counts in KINDS.values()]
        print(f"| {checkpoint} | " + " | ".join(f"{ce:.2f} ({n} tokens)" for ce, n in cells) + " |")


if __name__ == "__main__":
    main()
