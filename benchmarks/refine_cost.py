"""What refinement (sac_rag.refine) costs at compression time: the paragraphs of a seeded question
subset compressed without it and with it, interleaved paragraph by paragraph in one process, and
what it buys on them (the decoder's loss re-reading each paragraph from its K/V).

    python benchmarks/refine_cost.py --n 10 --steps 5 --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sac_rag.compressor import SACCompressor
from sac_rag.eval import add_subset_arguments, subset_questions
from sac_rag.refine import rereading_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressor", default="smollm2-135m-sac-5x")
    add_subset_arguments(parser, n_default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    compressor = SACCompressor.from_pretrained(args.compressor, device="cpu", dtype=args.dtype)
    paragraphs = list(dict.fromkeys(q.context for q in subset_questions(args)))  # each once
    seconds = {0: [], args.steps: []}
    losses = {0: [], args.steps: []}
    for text in paragraphs:
        ids = compressor.split(text)
        for steps in seconds:  # interleaved: both settings see the same load on the machine
            compressor.config.refine_steps = steps
            start = time.perf_counter()
            kvs = compressor.compress_chunks(ids, batch_size=1)
            seconds[steps].append((time.perf_counter() - start) / len(ids))
            losses[steps] += [rereading_loss(compressor, kv, chunk) for kv, chunk in zip(kvs, ids)]
    plain, refined = (statistics.median(seconds[s]) for s in seconds)
    print(json.dumps({
        "compressor": args.compressor, "dataset": args.dataset, "n": args.n, "seed": args.seed, "skip": args.skip,
        "dtype": args.dtype, "threads": args.threads, "paragraphs": len(paragraphs),
        "refine_steps": args.steps, "s_per_chunk": round(plain, 3), "refined_s_per_chunk": round(refined, 3),
        "slowdown": round(refined / plain, 1), "rereading_loss": round(statistics.mean(losses[0]), 3),
        "refined_rereading_loss": round(statistics.mean(losses[args.steps]), 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
