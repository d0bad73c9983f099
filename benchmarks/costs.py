"""Cost of each method, measured back to back in one process on the same questions.

    python benchmarks/costs.py            # rows -> benchmarks/results/costs.jsonl

``python -m sac_rag.eval`` measures costs too, but each method in its own process, at whatever
load the machine had then. Here every method is built in turn in one process and timed on the
same ``--samples`` questions at batch size 1 (``sac_rag.eval.measure_costs``: compression time
per chunk, time to first token with compression excluded, decode tokens/s, K/V bytes held), and
each figure is also given as a ratio to full context read by the frozen decoder in this run.
``--paragraphs 1,3,10`` repeats it with contexts of 1, 3 and 10 SQuAD paragraphs (the question's
own first, then distinct others): what a cached context saves grows with its length.

The machine's speed drifts over a run (on the 2-core CPU this was written on, by up to 2x over 20
minutes), and a method timed late would read slow against a reference timed first. So full context
is timed again after every method, and each method's ratios are to the mean of the two timings of
full context around it (``reference_ttft_s``, ``reference_decode_tokens_per_s``). Full context's
own row holds the mean of all its timings, and ``reference_spread``, the slowest of its times to
first token over the fastest: how far the machine drifted in the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sac_rag.devices import dtype_name, resolve_device, resolve_dtype  # noqa: E402
from sac_rag.errors import InvalidInputError, exit_with_message  # noqa: E402
from sac_rag.eval import (  # noqa: E402
    DATASETS,
    DTYPES,
    Question,
    at_least,
    build_method,
    check_results_file,
    dataset_questions,
    distinct_counts,
    measure_costs,
)
from sac_rag.files import append_jsonl  # noqa: E402

FULL_FT = "benchmarks/checkpoints/full-ft-smollm2-135m-squad"
# (row label, method, ratio, checkpoint, decoder adapter merged into a copy of the weights)
METHODS = [
    ("full-context", "full_context", 1, None, False),
    ("full-ft", "full_ft", 1, FULL_FT, False),
    ("full-ft-merged", "full_ft", 1, FULL_FT, True),
    ("no-context", "no_context", 1, None, False),
    ("sac-5x", "sac", 5, "smollm2-135m-sac-5x", False),
    ("sac-5x-merged", "sac", 5, "smollm2-135m-sac-5x", True),
    ("kv-dropping-5x", "kv_dropping", 5, None, False),
    ("text-truncate-5x", "text_truncate", 5, None, False),
    ("kv-dropping-15x", "kv_dropping", 15, None, False),
]


def with_paragraphs(pool: list[Question], samples: int, k: int) -> list[Question]:
    """The first ``samples`` questions of ``pool``, each reading its own paragraph and then ``k - 1``
    distinct others (question i's from the i * k-th distinct paragraph of the pool on, wrapping
    around past the last), joined by blank lines. A pool with fewer than ``k`` distinct paragraphs
    is refused: the rows would claim contexts of ``k`` paragraphs that hold fewer."""
    paragraphs = list(dict.fromkeys(q.context for q in pool))
    if len(paragraphs) < k:
        raise InvalidInputError(f"contexts of {k} paragraphs need {k} distinct paragraphs, but the questions "
                                f"have {len(paragraphs)}: give smaller --paragraphs or a larger dataset")
    settings = []
    for i, question in enumerate(pool[:samples]):
        start = i * k % len(paragraphs)
        others = [p for p in paragraphs[start:] + paragraphs[:start] if p != question.context][:k - 1]
        settings.append(replace(question, context="\n\n".join([question.context, *others])))
    return settings


def add_ratios(rows: list[dict]) -> None:
    """Each row's ttft, decode speed and K/V bytes also as a ratio to full context's (frozen decoder)
    at the same number of paragraphs in this run: to the row's own ``reference_*`` timings where it
    has them (full context timed around it), else to full context's row (None where either is 0 or
    missing)."""
    full = {r["paragraphs"]: r for r in rows if r["method"] == "full-context"}
    for row in rows:
        ref = full[row["paragraphs"]]
        for key in ("ttft_s", "decode_tokens_per_s", "kv_bytes_per_query"):
            reference = row.get(f"reference_{key}", ref[key])
            row[f"{key}_vs_full_context"] = row[key] / reference if row[key] and reference else None


def bracketed(method_costs: dict[int, dict], before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict]:
    """Each length's costs of a method with ``reference_ttft_s`` and ``reference_decode_tokens_per_s``:
    the mean of full context's timings ``before`` and ``after`` it at that length."""
    return {k: {**costs, **{f"reference_{key}": (before[k][key] + after[k][key]) / 2
                            for key in ("ttft_s", "decode_tokens_per_s")}}
            for k, costs in method_costs.items()}


def reference_row_costs(timings: list[dict[int, dict]]) -> dict[int, dict]:
    """Full context's costs at each length over all its timings in the run: the mean of its time to
    first token and of its decode speed, and ``reference_spread``, its slowest time to first token over
    its fastest (the machine's drift over the run)."""
    out = {}
    for k, first in timings[0].items():
        ttfts = [t[k]["ttft_s"] for t in timings]
        out[k] = {**first, "ttft_s": sum(ttfts) / len(ttfts),
                  "decode_tokens_per_s": sum(t[k]["decode_tokens_per_s"] for t in timings) / len(timings),
                  "reference_spread": max(ttfts) / min(ttfts), "reference_timings": len(timings)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=at_least(1), default=20, help="questions timed per method (median)")
    parser.add_argument("--dataset", default="squad-dev", choices=sorted(DATASETS))
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--paragraphs", type=distinct_counts, default="1,3,10",
                        help="context lengths, in SQuAD paragraphs")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS),
                        help="row labels to measure, comma-separated (full-context, the reference, always runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--results", default="benchmarks/results/costs.jsonl")
    args = parser.parse_args(argv)
    chosen = {"full-context", *args.methods.split(",")}
    if unknown := chosen - {m[0] for m in METHODS}:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[m[0] for m in METHODS]}")
    check_results_file(args.results)  # before minutes of timing, not after
    pool = dataset_questions(args.data_root, args.dataset, 0, seed=0)
    for adapter in sorted({c for label, name, _, c, _ in METHODS if label in chosen and name == "full_ft"}):
        if not Path(adapter).is_dir():
            raise InvalidInputError(f"{adapter} (the Full-FT decoder adapter) is not a folder here: run from the "
                                    "repository's root, or leave full-ft* out of --methods")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dtype_name(resolve_dtype(args.dtype, resolve_device(None)))  # what the rows were computed in
    settings = {k: with_paragraphs(pool, args.samples, k) for k in args.paragraphs}
    command = "python benchmarks/costs.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")

    def timed(method) -> dict[int, dict]:
        """The method's costs at each context length."""
        out = {}
        for k, questions in settings.items():
            with torch.no_grad():
                measure_costs(method, questions, samples=2)  # warm-up: first calls pay one-time costs
                out[k] = measure_costs(method, questions, samples=args.samples)
            out[k].pop("peak_rss_mb")  # a process-wide maximum: meaningless per method in one process
            print(json.dumps({"method": method.name, "paragraphs": k, "ttft_s": out[k]["ttft_s"],
                              "decode_tokens_per_s": out[k]["decode_tokens_per_s"]}), flush=True)
        return out

    def row(label: str, method, k: int, costs: dict) -> dict:
        questions = settings[k]
        tokens = sum(len(method.generator.tokenizer(q.context)["input_ids"]) for q in questions) / len(questions)
        return {"method": label, "ratio": method.ratio, "dataset": args.dataset, "paragraphs": k,
                "context_tokens": round(tokens), **costs, "dtype": dtype, "threads": torch.get_num_threads(),
                "run": run, "command": command}

    def build(name: str, ratio: int, checkpoint: str | None, merge_decoder: bool):
        return build_method(name, "smollm2-135m", ratio, checkpoint, None, dtype, merge_decoder=merge_decoder)

    (_, *reference_spec), *others = METHODS  # full context, the reference: timed first and after each method
    reference = build(*reference_spec)
    timings, rows = [timed(reference)], []
    for label, *spec in others:
        if label not in chosen:
            continue
        method = build(*spec)
        costs = timed(method)
        timings.append(timed(reference))
        rows += [row(label, method, k, c) for k, c in bracketed(costs, timings[-2], timings[-1]).items()]
        del method
        gc.collect()
    rows[:0] = [row("full-context", reference, k, c) for k, c in reference_row_costs(timings).items()]
    add_ratios(rows)
    append_jsonl(args.results, rows)  # all of the run's rows in one write
    return 0


if __name__ == "__main__":
    exit_with_message(main)
