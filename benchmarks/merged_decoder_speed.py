"""Answer time with the decoder adapter merged into a copy of the weights vs. run beside them.

    python benchmarks/merged_decoder_speed.py --threads 2       # row -> benchmarks/results/merged_decoder_speed.jsonl

Both generators come from one compressor in one process and answer the same SQuAD-dev questions
from the same compressed passages, alternating round by round (so drifts in the machine's speed
hit both alike); the figures are medians over rounds and their ratio. Also counts the answers
that differ between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sac_rag import GenerationConfig, Generator, SACCompressor  # noqa: E402
from sac_rag.errors import exit_with_message  # noqa: E402
from sac_rag.eval import at_least, dataset_questions, distinct_counts  # noqa: E402
from sac_rag.files import append_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressor", default="smollm2-135m-sac-5x")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--questions", type=at_least(1), default=8,
                        help="questions timed, in batches of each --batch-sizes")
    parser.add_argument("--batch-sizes", type=distinct_counts, default="1,8",
                        help="batch sizes to time, comma-separated")
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--new-tokens", type=at_least(1), default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default="benchmarks/results/merged_decoder_speed.jsonl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    compressor = SACCompressor.from_pretrained(args.compressor, device="cpu", dtype=args.dtype)
    generators = {"adapter": Generator.from_compressor(compressor),
                  "merged": Generator.from_compressor(compressor, merge_decoder=True)}
    questions = dataset_questions(args.data_root, "squad-dev", args.questions, seed=0)
    template = compressor.config.prompt
    prompts = [template.build([compressor.compress(q.context)], q.question) for q in questions]
    config = GenerationConfig(max_new_tokens=args.new_tokens)  # greedy; an answer ends at EOS or new_tokens
    command = "python benchmarks/merged_decoder_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = []
    for batch in args.batch_sizes:
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        seconds: dict[str, list[float]] = {name: [] for name in generators}
        answers: dict[str, list[list[int]]] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, generator in generators.items():
                start = time.perf_counter()
                out = [g.token_ids for group in groups for g in generator.generate_batch(group, config)]
                if round_:
                    seconds[name].append(time.perf_counter() - start)
                answers[name] = out
        tokens = {name: sum(map(len, out)) for name, out in answers.items()}
        median = {name: statistics.median(s) for name, s in seconds.items()}
        rows.append({
            "compressor": args.compressor, "dtype": args.dtype, "batch_size": batch, "questions": len(prompts),
            "new_tokens": args.new_tokens, "rounds": args.rounds,
            "adapter_s": median["adapter"], "merged_s": median["merged"],
            "adapter_tokens_per_s": tokens["adapter"] / median["adapter"],
            "merged_tokens_per_s": tokens["merged"] / median["merged"],
            "speedup": median["adapter"] / median["merged"],
            "answers_identical": sum(a == b for a, b in zip(answers["adapter"], answers["merged"])),
            "threads": torch.get_num_threads(),
            "command": command,
        })
        shown = ("batch_size", "adapter_s", "merged_s", "speedup", "answers_identical")
        print(json.dumps({k: rows[-1][k] for k in shown}))
    append_jsonl(args.results, rows)
    return 0


if __name__ == "__main__":
    exit_with_message(main)
