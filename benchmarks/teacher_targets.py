"""Training data whose answers are the teacher's own (sequence-level distillation, Kim & Rush 2016).

A training config names a SQuAD file and a seeded example order. This script takes the paragraphs
that the first ``--steps`` steps of that config read, answers each of their questions with the
Full-FT teacher reading the full text (greedy), and writes the SQuAD file back with those
questions' answers replaced: by the teacher's answer where it overlaps the gold one by at least
``--min-f1`` (SQuAD F1), otherwise left gold. Every other paragraph keeps its gold answers, so a
run of the same config on the written file reads the same paragraphs in the same order beside the
same distractors; only its answer targets differ. The teacher's answers are cached beside
``--out`` (``*.teacher-predictions.jsonl``, by question id), so an interrupted run resumes; delete
that file when the teacher changes.

    python benchmarks/teacher_targets.py --config benchmarks/configs/sac5x-stage44-risk.json --steps 60 \\
        --teacher benchmarks/checkpoints/full-ft-smollm2-135m-squad --out runs/squad-train-teacher-targets.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import torch

from sac_rag.data import LoadStats, Paragraph, open_text
from sac_rag.eval import Question, build_method, read_predictions, run
from sac_rag.metrics import squad_f1
from sac_rag.train import ExampleStream, TrainConfig, parse_config


def paragraphs_read(cfg: TrainConfig, steps: int, tokenizer, template) -> list[Paragraph]:
    """The distinct paragraphs the first ``steps`` steps of a finetune config read as gold passages."""
    stream = ExampleStream(cfg, tokenizer, template, LoadStats())
    return list({id(p): p for p in stream.upcoming(steps * cfg.batch_size)}.values())


def replace_answers(squad: dict, predictions: dict[str, str], min_f1: float) -> collections.Counter:
    """Give each question in ``predictions`` the teacher's answer as its only answer where its SQuAD
    F1 against the gold answers is at least ``min_f1`` (in place); count what each question got."""
    kept = collections.Counter()
    for article in squad["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("id") not in predictions:
                    continue
                gold = [a["text"] for a in qa["answers"]]
                prediction = predictions[qa["id"]]
                if prediction.strip() and squad_f1(prediction, gold) >= min_f1:
                    qa["answers"] = [{"text": prediction}]
                    kept["teacher"] += 1
                    kept["teacher, not a gold answer"] += prediction not in gold
                else:
                    kept["gold"] += 1
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the training config whose example order is followed")
    parser.add_argument("--steps", type=int, required=True, help="how many of its steps get the teacher's answers")
    parser.add_argument("--teacher", required=True, help="Full-FT adapter directory")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--min-f1", type=float, default=0.5,
                        help="keep the teacher's answer only if its SQuAD F1 against the gold ones is at least this")
    parser.add_argument("--out", required=True, help="SQuAD JSON to write")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = parse_config(["--config", args.config])
    if cfg.stage != "finetune" or cfg.eval_data:
        raise SystemExit("the config must be a finetune stage that holds out part of its own data (no eval_data)")
    if ".json" not in Path(cfg.data).suffixes:
        raise SystemExit(f"{cfg.data}: this script rewrites SQuAD JSON (.json, .json.xz, .json.gz)")
    teacher = build_method("full_ft", args.base_model, None, args.teacher, None, "float32")
    paragraphs = paragraphs_read(cfg, args.steps, teacher.generator.tokenizer, teacher.template)
    questions = [Question(qa.id, qa.question, qa.answers, p.context) for p in paragraphs for qa in p.questions]
    print(f"{len(paragraphs)} paragraphs, {len(questions)} questions to answer")

    out = Path(args.out)
    cache = out.with_suffix(".teacher-predictions.jsonl")
    run(teacher, questions, "train", args.batch_size, cache)
    with open_text(cfg.data) as f:
        squad = json.load(f)
    kept = replace_answers(squad, read_predictions(cache), args.min_f1)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(squad))
    os.replace(tmp, out)
    print(f"wrote {out}: answer targets {dict(kept)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
