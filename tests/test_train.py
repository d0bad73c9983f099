"""python -m sac_rag.train on a tiny random Llama: learning, exact resume, DDP, bad input."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import SACCompressor
from sac_rag.errors import CheckpointError, SACError
from sac_rag.train import idle_options, parse_config, train

REPO = Path(__file__).resolve().parents[1]

FACTS = [
    ("The tower was finished in 1889 by the company of the engineer.", "When was the tower finished?", "1889"),
    ("Paris is the capital of France and its largest city.", "What is the capital of France?", "Paris"),
    ("The quick brown fox jumps over the lazy dog every morning.", "What does the fox jump over?", "the lazy dog"),
    ("Anchors carry the meaning of a chunk to the decoder.", "What carries the meaning?", "Anchors"),
]


@pytest.fixture
def workspace(tmp_path):
    """A saved tiny model (so the trainer loads it by path) and a small SQuAD-format dataset."""
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "tiny-model")
    tokenizer.save_pretrained(tmp_path / "tiny-model")
    articles = []
    for i in range(12):
        context, question, answer = FACTS[i % len(FACTS)]
        articles.append({"title": f"article-{i}", "paragraphs": [{
            "context": f"{context} Note {i}.",
            "qas": [{"id": f"q{i}-{j}", "question": question, "answers": [{"text": answer, "answer_start": 0}]}
                    for j in range(3)],
        }]})
    (tmp_path / "qa.json").write_text(json.dumps({"data": articles}))
    (tmp_path / "lm.jsonl").write_text("\n".join(json.dumps({"text": (c + " ") * 6}) for c, _, _ in FACTS))
    return tmp_path


def _args(ws: Path, out: str, *extra: str) -> list[str]:
    # Full-FT has no compressor: the compressor's shape options are refused with it
    shape = [] if "full_ft" in extra else ["--ratio", "2", "--chunk-len", "64"]
    return [
        "--base-model", str(ws / "tiny-model"), "--data", str(ws / "qa.json"), "--out-dir", str(ws / out),
        *shape, "--lora-rank", "4", "--lora-alpha", "8",
        "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1",
        "--eval-every", "0", "--eval-questions", "4", "--checkpoint-every", "2", "--precision", "fp32",
        "--held-out-fraction", "0.2", *extra,
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_few_steps_on_a_tiny_model_reduce_the_loss(workspace):
    # The same batch over and over: the loss must fall if gradients reach the compressor.
    final = train(parse_config(_args(workspace, "run", "--max-steps", "12", "--batch-size", "2",
                                     "--micro-batch-size", "2", "--held-out-fraction", "0.9", "--lr", "2e-2")))
    losses = _losses(workspace / "run")
    assert min(losses[s] for s in (10, 11, 12)) < losses[1] * 0.88
    first = json.loads((workspace / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["input_tokens"] > first["target_tokens"] > 0  # tok/s counts every token read, not only targets
    assert (final / "config.json").exists() and (workspace / "run" / "loss_curve.png").exists()
    model, tokenizer = make_tiny_llama()
    SACCompressor.from_pretrained(final, model=model, tokenizer=tokenizer)
    with pytest.raises(SACError, match="a training run's directory .* pass the compressor it saved, .*final'"):
        SACCompressor.from_pretrained(workspace / "run", model=model, tokenizer=tokenizer)


def test_resume_continues_exactly_like_an_uninterrupted_run(workspace):
    train(parse_config(_args(workspace, "straight", "--max-steps", "6")))
    train(parse_config(_args(workspace, "split", "--max-steps", "4")))
    train(parse_config(_args(workspace, "split", "--max-steps", "6", "--resume")))
    straight, split = _losses(workspace / "straight"), _losses(workspace / "split")
    for step in (5, 6):
        assert split[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)
    # the run's recorded config is now the one a fresh run would need to repeat it
    assert json.loads((workspace / "split" / "train_config.json").read_text()) == \
        json.loads((workspace / "straight" / "train_config.json").read_text()) | {"out_dir": str(workspace / "split")}


def test_held_out_evaluation_leaves_the_frozen_base_models_dropout_off(workspace):
    """A base model whose config has dropout (Phi-2's resid_pdrop, here attention dropout) is frozen
    and read without it; evaluating during the run must not switch it on for the steps after, so a
    run with evaluations trains exactly as one without."""
    model, tokenizer = make_tiny_llama()
    model.config.attention_dropout = 0.5
    model.save_pretrained(workspace / "dropout-model")
    tokenizer.save_pretrained(workspace / "dropout-model")
    for out, every in (("quiet", "0"), ("evaluated", "1")):
        args = _args(workspace, out, "--max-steps", "4", "--eval-every", every)
        args[args.index("--base-model") + 1] = str(workspace / "dropout-model")
        train(parse_config(args))
    assert len(_eval_rows(workspace / "evaluated")) == 4 > len(_eval_rows(workspace / "quiet"))  # the end's only
    quiet, evaluated = _losses(workspace / "quiet"), _losses(workspace / "evaluated")
    assert evaluated == pytest.approx(quiet, rel=1e-6, abs=1e-7)


def test_kill_9_leaves_a_readable_checkpoint_and_resume_finishes(workspace):
    cmd = [sys.executable, "-m", "sac_rag.train", *_args(workspace, "killed", "--max-steps", "400",
                                                         "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = workspace / "killed" / "latest"
    try:
        while not (latest.exists() and proc.poll() is None and latest.read_text() >= "step-0000003"):
            assert proc.poll() is None, "training exited before it could be killed"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    train(parse_config(_args(workspace, "killed", "--max-steps", "6", "--resume")))
    steps = _steps(workspace / "killed")
    assert steps == list(range(1, max(steps) + 1)) and max(steps) >= 6  # each step logged once
    assert (workspace / "killed" / "final" / "config.json").exists()
    assert not list((workspace / "killed").rglob(".staging-*"))


def test_a_run_into_a_directory_a_live_run_trains_into_is_refused_until_that_run_ends(workspace):
    """A --resume started beside a live run (or beside DDP workers a killed launcher left behind)
    would write the same checkpoints and log; once the live run is killed, it resumes."""
    cmd = [sys.executable, "-m", "sac_rag.train", *_args(workspace, "live", "--max-steps", "400",
                                                         "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = workspace / "live" / "latest"
    try:
        while not (latest.exists() and latest.read_text() >= "step-0000002"):
            assert proc.poll() is None, "training exited before a second run could start beside it"
            time.sleep(0.05)
        with pytest.raises(SACError, match=r"another process is training into .*live .*\.run\.lock"):
            train(parse_config(_args(workspace, "live", "--max-steps", "400", "--resume")))
        assert proc.poll() is None  # the live run goes on
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the lock goes with the process
        proc.wait()
    reached = int(latest.read_text().removeprefix("step-"))
    train(parse_config(_args(workspace, "live", "--max-steps", str(reached + 2), "--resume")))
    assert _steps(workspace / "live") == list(range(1, reached + 3))


def test_two_process_ddp_run_completes_and_matches_one_process(workspace):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port, so reruns never collide with a closing one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "sac_rag.train", *_args(workspace, "ddp", "--max-steps", "3")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks agree" in done.stderr
    train(parse_config(_args(workspace, "single", "--max-steps", "3")))
    from safetensors.torch import load_file

    ddp = load_file(workspace / "ddp" / "final" / "compressor.safetensors")
    single = load_file(workspace / "single" / "final" / "compressor.safetensors")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-4, rtol=1e-3)
    # The last layer's queries reach no kept K/V: no gradient, so no weight decay either, in both
    last = max(int(m[1]) for m in map(re.compile(r"layers\.(\d+)\.").search, single) if m)
    untouched = [name for name in single if f"layers.{last}.self_attn.q_proj.lora_A" in name]
    assert untouched and all(torch.equal(ddp[name], single[name]) for name in untouched)
    # metrics.jsonl reports the whole batch (both ranks' shares), as the single process does
    rows = {run: [json.loads(line) for line in (workspace / run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)] for run in ("ddp", "single")}
    for ddp_row, single_row in zip(rows["ddp"], rows["single"], strict=True):
        assert ddp_row["target_tokens"] == single_row["target_tokens"]
        assert ddp_row["input_tokens"] == single_row["input_tokens"]
        assert ddp_row["loss"] == pytest.approx(single_row["loss"], rel=1e-3)
    assert rows["ddp"][0]["loss"] == pytest.approx(rows["single"][0]["loss"], rel=1e-6)  # same weights at step 1


def test_pretrain_stage_reads_plain_text(workspace):
    final = train(parse_config(_args(workspace, "lm", "--stage", "pretrain", "--data", str(workspace / "lm.jsonl"),
                                     "--lm-min-tokens", "20", "--lm-max-tokens", "60", "--max-steps", "2",
                                     "--distill-weight", "1.0")))
    assert (final / "config.json").exists()
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(workspace / "lm").values())


def test_full_ft_baseline_trains_a_decoder_adapter(workspace):
    final = train(parse_config(_args(workspace, "fullft", "--method", "full_ft", "--max-steps", "2")))
    assert (final / "adapter_model.safetensors").exists()


def test_resume_with_another_config_is_refused(workspace):
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    with pytest.raises(SACError, match="ratio: 2 -> 3"):
        train(parse_config(_args(workspace, "run", "--max-steps", "4", "--resume", "--ratio", "3")))
    with pytest.raises(SACError, match="--resume"):
        train(parse_config(_args(workspace, "run", "--max-steps", "4")))


def test_resume_on_a_data_file_whose_contents_changed_is_refused(workspace):
    """The checkpoint's data position counts examples of the file the run started on: the same
    path with other contents would silently go on with another list."""
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    original = (workspace / "qa.json").read_text()
    data = json.loads(original)
    data["data"] = data["data"][:6]
    (workspace / "qa.json").write_text(json.dumps(data))
    with pytest.raises(SACError, match="the --data file changed since the run started"):
        train(parse_config(_args(workspace, "run", "--max-steps", "4", "--resume")))
    (workspace / "qa.json").write_text(original)  # the file it started on: resumes
    train(parse_config(_args(workspace, "run", "--max-steps", "4", "--resume")))
    assert max(_losses(workspace / "run")) == 4


def test_resume_needs_only_the_run_directory_and_what_changes(workspace):
    """Without --config, --resume reads the options the run recorded; the flags given override them."""
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    cfg = parse_config(["--out-dir", str(workspace / "run"), "--resume", "--max-steps", "3"])
    assert (cfg.data, cfg.ratio, cfg.lora_rank, cfg.max_steps) == (str(workspace / "qa.json"), 2, 4, 3)
    train(cfg)
    assert max(_losses(workspace / "run")) == 3


def test_resuming_a_run_whose_init_from_checkpoint_is_gone_says_resume_reads_it(workspace):
    first = train(parse_config(_args(workspace, "first", "--max-steps", "1")))
    train(parse_config(_args(workspace, "second", "--max-steps", "2", "--init-from", str(first))))
    first.rename(workspace / "elsewhere")
    with pytest.raises(CheckpointError, match=r"--resume rebuilds the run's compressor from its --init-from "
                                              r".*first/final .*put that checkpoint back"):
        train(parse_config(["--out-dir", str(workspace / "second"), "--resume", "--max-steps", "3"]))


def test_an_anchor_strategy_the_command_line_cannot_give_is_refused_before_anything_loads(workspace):
    for option in ("--anchor-strategy", "--init-anchor-strategy"):
        with pytest.raises(SACError, match="strategy must be one of .* scorer function"):
            parse_config(_args(workspace, "run", option, "importance", "--init-from", str(workspace)))
    with pytest.raises(SACError, match="one of .*'uniform'"):
        parse_config(_args(workspace, "run", "--anchor-strategy", "middle"))


def test_missing_or_malformed_data_is_reported(workspace):
    with pytest.raises(SACError, match="does not exist"):
        train(parse_config(_args(workspace, "x", "--data", str(workspace / "nope.json"))))
    (workspace / "bad.json").write_text("{not json")
    with pytest.raises(SACError, match="not SQuAD JSON"):
        train(parse_config(_args(workspace, "y", "--data", str(workspace / "bad.json"))))


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for option in ("--questions-per-context", "--distractors", "--distill-weight", "--bidir-anneal-steps",
                   "--memory", "--decoder-lora-rank", "--resume", "--ae-weight", "--anchor-lr", "--adapters-from"):
        assert option in text
    assert "(default: 'finetune')" in text and "(default: None)" not in text  # real defaults, once


def test_a_run_started_before_an_option_existed_still_resumes(workspace):
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    saved = json.loads((workspace / "run" / "train_config.json").read_text())
    del saved["distractor_source"]  # as written by a version without the option
    (workspace / "run" / "train_config.json").write_text(json.dumps(saved))
    train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume")))
    assert max(_losses(workspace / "run")) == 3


def test_a_run_started_before_loss_weighting_existed_resumes_only_with_the_weighting_it_had(workspace):
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    saved = json.loads((workspace / "run" / "train_config.json").read_text())
    del saved["loss_weighting"]  # as written by a version that weighted micro-batches' tokens
    (workspace / "run" / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(SACError, match="loss_weighting: 'micro_batch_tokens' -> 'example'"):
        train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume")))
    train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume", "--loss-weighting",
                             "micro_batch_tokens")))
    assert max(_losses(workspace / "run")) == 3


@pytest.mark.parametrize("weighting", ["example", "micro_batch_tokens"])
def test_with_example_weighting_a_step_is_the_same_whatever_the_micro_batch_size(workspace, weighting):
    """Every example weighs the same in a step, however the step is split (answers of 1 to 3 tokens here):
    the logged losses and the update agree for 1, 2 or 4 examples per forward pass. Weighting each
    micro-batch's tokens (the shipped stages' weighting) makes the step depend on the split."""
    losses = {}
    for micro in (1, 2, 4):
        out = f"{weighting}-{micro}"
        train(parse_config(_args(workspace, out, "--max-steps", "2", "--micro-batch-size", str(micro),
                                 "--loss-weighting", weighting, "--lr", "2e-2")))
        losses[micro] = _losses(workspace / out)
    same = [losses[micro][step] == pytest.approx(losses[1][step], rel=1e-5) for micro in (2, 4) for step in (1, 2)]
    assert all(same) if weighting == "example" else not any(same)


def test_with_example_weighting_a_resumed_run_may_split_its_steps_differently(workspace):
    train(parse_config(_args(workspace, "straight", "--max-steps", "4")))
    train(parse_config(_args(workspace, "split", "--max-steps", "2")))
    train(parse_config(_args(workspace, "split", "--max-steps", "4", "--resume", "--micro-batch-size", "1")))
    straight, split = _losses(workspace / "straight"), _losses(workspace / "split")
    assert [split[step] for step in (3, 4)] == pytest.approx([straight[step] for step in (3, 4)], rel=1e-5)
    train(parse_config(_args(workspace, "tokens", "--max-steps", "2", "--loss-weighting", "micro_batch_tokens")))
    with pytest.raises(SACError, match="micro_batch_size: 2 -> 1"):
        train(parse_config(_args(workspace, "tokens", "--max-steps", "4", "--resume", "--micro-batch-size", "1",
                                 "--loss-weighting", "micro_batch_tokens")))


def test_precision_is_checked_and_may_change_when_a_run_resumes(workspace):
    # "auto" resolves per machine, so a run resumed on another machine may compute in another precision
    with pytest.raises(SACError, match="precision"):
        parse_config(_args(workspace, "p", "--precision", "fp16"))
    train(parse_config(_args(workspace, "p", "--max-steps", "2")))
    train(parse_config(_args(workspace, "p", "--max-steps", "3", "--resume", "--precision", "auto")))
    assert max(_losses(workspace / "p")) == 3


def test_a_distractor_share_outside_0_to_1_is_refused():
    with pytest.raises(SACError, match="distractor_share"):
        parse_config(["--distractor-share", "25"])


def test_unknown_distractor_source_is_refused():
    with pytest.raises(SACError, match="distractor_source"):
        parse_config(["--distractor-source", "nearest"])


def test_unknown_distillation_divergence_is_refused():
    with pytest.raises(SACError, match="distill_divergence must be one of"):
        parse_config(["--distill-divergence", "jensen-shannon"])
    assert parse_config(["--distill-divergence", "reverse"]).distill_divergence == "reverse"


def test_a_distillation_temperature_that_is_not_positive_or_has_no_kl_to_soften_is_refused():
    with pytest.raises(SACError, match="distill_temperature must be > 0"):
        parse_config(["--distill-temperature", "0", "--distill-weight", "1"])
    with pytest.raises(SACError, match="distill_temperature is set but distill_weight is 0"):
        parse_config(["--distill-temperature", "2"])
    assert parse_config(["--distill-temperature", "2", "--distill-weight", "1"]).distill_temperature == 2.0


def test_minimum_risk_training_needs_questions_and_at_least_one_sample():
    with pytest.raises(SACError, match="risk_samples, risk_max_tokens >= 1"):
        parse_config(["--risk-weight", "1", "--risk-samples", "0"])
    with pytest.raises(SACError, match="needs stage 'finetune' and method 'sac'"):
        parse_config(["--risk-weight", "1", "--stage", "pretrain"])
    config = parse_config(["--risk-weight", "0.5", "--risk-samples", "2"])
    assert (config.risk_weight, config.risk_samples, config.risk_max_tokens) == (0.5, 2, 12)


def test_distillation_from_a_full_ft_teacher_trains_and_logs_the_kl(workspace):
    teacher = train(parse_config(_args(workspace, "teacher", "--method", "full_ft", "--max-steps", "1")))
    train(parse_config(_args(workspace, "student", "--max-steps", "2", "--distill-weight", "1.0",
                             "--distill-teacher", str(teacher), "--distill-tokens", "all",
                             "--distill-hidden-weight", "0.5", "--distill-on-policy-tokens", "4")))
    rows = [json.loads(line) for line in (workspace / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["kl"] > 0 and r["hidden"] > 0 and r["distilled_tokens"] > r["target_tokens"]
        assert 0 < r["on_policy_tokens"] < r["distilled_tokens"]
        assert r["loss"] == pytest.approx(r["ce"] + r["kl"] + 0.5 * r["hidden"], rel=1e-4)


def test_a_teacher_trained_on_another_base_model_is_refused_naming_both(workspace):
    from sac_rag.errors import FingerprintMismatchError

    other, tokenizer = make_tiny_llama(seed=7)
    other.save_pretrained(workspace / "other-model")
    tokenizer.save_pretrained(workspace / "other-model")
    teacher = train(parse_config(_args(workspace, "teacher", "--method", "full_ft", "--max-steps", "1",
                                       "--base-model", str(workspace / "other-model"))))
    with pytest.raises(FingerprintMismatchError, match="distillation teacher") as err:
        train(parse_config(_args(workspace, "student", "--max-steps", "1", "--distill-weight", "1.0",
                                 "--distill-teacher", str(teacher))))
    assert err.value.expected != err.value.found


def test_a_teacher_without_weight_or_without_adapter_is_an_error(workspace):
    with pytest.raises(SACError, match="distill_weight and distill_hidden_weight are 0"):
        parse_config(_args(workspace, "x", "--distill-teacher", str(workspace)))
    with pytest.raises(SACError, match="must be >= 0"):
        parse_config(_args(workspace, "x", "--distill-hidden-weight", "-1"))
    with pytest.raises(SACError, match="on-policy rows are only distilled"):
        parse_config(_args(workspace, "x", "--distill-on-policy-tokens", "8"))
    with pytest.raises(SACError, match="distill_on_policy_tokens must be >= 0"):
        parse_config(_args(workspace, "x", "--distill-on-policy-tokens", "-1", "--distill-weight", "1"))
    with pytest.raises(SACError, match="not a Full-FT checkpoint"):
        train(parse_config(_args(workspace, "y", "--distill-weight", "1", "--distill-teacher", str(workspace))))


def test_a_compressor_started_from_full_ft_reads_every_token_exactly_as_full_ft(workspace):
    # Encoder and decoder adapters copied from the Full-FT checkpoint, a causal encoder at ratio 1:
    # the compressed context must give the Full-FT model's logits on the full text.
    from sac_rag import Generator
    from sac_rag.train import build_model, load_teacher

    full_ft = train(parse_config(_args(workspace, "fullft", "--method", "full_ft", "--max-steps", "2")))
    cfg = parse_config(_args(workspace, "sac", "--adapters-from", str(full_ft), "--ratio", "1",
                             "--no-bidirectional", "--anchor-embedding", "none",
                             "--decoder-lora-rank", "4", "--decoder-lora-alpha", "8"))
    comp, _ = build_model(cfg, torch.device("cpu"))
    teacher = load_teacher(str(full_ft), comp, torch.device("cpu"))
    context, question, _ = FACTS[0]
    question_text = f"\n### Question:\n{question}\n### Answer:\n"
    ids = comp.tokenizer(context + question_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = teacher(input_ids=torch.tensor([ids])).logits[0]
        with comp.model.disable_adapter():
            untrained = comp.base_model(input_ids=torch.tensor([ids])).logits[0]
    got = Generator.from_compressor(comp).prompt_logits([comp.compress(context), question_text])
    torch.testing.assert_close(got, expected[-got.shape[0]:], atol=1e-4, rtol=0)
    assert (untrained[-got.shape[0]:] - got).abs().max() > 1e-2  # the copy is what made them equal


def test_adapters_from_a_full_ft_checkpoint_of_another_shape_is_refused(workspace):
    full_ft = train(parse_config(_args(workspace, "fullft", "--method", "full_ft", "--max-steps", "1")))
    with pytest.raises(SACError, match="rank, alpha and target modules"):
        train(parse_config(_args(workspace, "sac", "--adapters-from", str(full_ft), "--lora-rank", "8")))
    with pytest.raises(SACError, match="init_from"):
        parse_config(_args(workspace, "x", "--adapters-from", str(full_ft), "--init-from", str(full_ft)))


def test_a_run_that_resume_starts_fresh_still_starts_its_adapters_from_full_ft(workspace):
    # --resume with nothing to resume starts a fresh run (benchmarks/ablations.sh starts-or-continues so):
    # it must be the run --adapters-from describes, not one with untrained adapters
    full_ft = train(parse_config(_args(workspace, "fullft", "--method", "full_ft", "--max-steps", "2")))
    for run, extra in (("plain", ()), ("resumed", ("--resume",))):
        train(parse_config(_args(workspace, run, "--adapters-from", str(full_ft), "--max-steps", "1", *extra)))
    assert _losses(workspace / "resumed")[1] == pytest.approx(_losses(workspace / "plain")[1], rel=1e-6)


@pytest.mark.parametrize("parts, trained_prefix", [("decoder", "decoder_lora."), ("encoder", "lora.")])
def test_train_parts_trains_the_chosen_weights_and_leaves_the_others_bit_identical(workspace, parts, trained_prefix):
    adapter = ("--decoder-lora-rank", "4", "--decoder-lora-alpha", "8")
    start = train(parse_config(_args(workspace, "start", "--max-steps", "1", *adapter)))
    final = train(parse_config(_args(workspace, parts, "--max-steps", "2", "--init-from", str(start),
                                     "--train-parts", parts, "--lr", "1e-2")))
    model, tokenizer = make_tiny_llama()
    before = SACCompressor.from_pretrained(start, model=model, tokenizer=tokenizer).trainable_tensors()
    model, tokenizer = make_tiny_llama()
    after = SACCompressor.from_pretrained(final, model=model, tokenizer=tokenizer).trainable_tensors()
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    in_part = {n for n in before if n.startswith(trained_prefix) or (parts == "encoder" and n == "anchor_embedding")}
    assert changed and changed <= in_part  # only the chosen part moved
    assert any(n.startswith(trained_prefix) and "lora_B" in n for n in changed)


def test_train_parts_refuses_what_it_cannot_do(workspace):
    with pytest.raises(SACError, match="train_parts must be one of"):
        parse_config(_args(workspace, "x", "--train-parts", "both"))
    with pytest.raises(SACError, match="needs method 'sac'"):
        parse_config(_args(workspace, "x", "--method", "full_ft", "--train-parts", "decoder"))
    with pytest.raises(SACError, match="has none: add one with --decoder-lora-rank"):
        train(parse_config(_args(workspace, "x", "--max-steps", "1", "--train-parts", "decoder")))


def test_a_checkpoint_can_be_trained_on_at_another_ratio(workspace):
    first = train(parse_config(_args(workspace, "r2", "--max-steps", "1")))
    final = train(parse_config(_args(workspace, "r4", "--max-steps", "1", "--init-from", str(first),
                                     "--init-ratio", "4")))
    assert json.loads((final / "config.json").read_text())["config"]["ratio"] == 4
    with pytest.raises(SACError, match="init_ratio"):
        parse_config(_args(workspace, "x", "--init-ratio", "4"))


def test_a_checkpoints_recommended_decoding_is_not_passed_on_to_what_training_from_it_makes(workspace):
    """The decoding a compressor recommends was measured on its weights; a run started from them makes
    others, whose checkpoints recommend none until one is measured on them."""
    from sac_rag.compressor import recommend_decoding

    first = train(parse_config(_args(workspace, "measured", "--max-steps", "1")))
    recommend_decoding(first, {"num_beams": 2, "mbr": True})
    assert SACCompressor.from_pretrained(first).recommended_decoding == {"num_beams": 2, "mbr": True}
    final = train(parse_config(_args(workspace, "next", "--max-steps", "1", "--init-from", str(first))))
    assert "recommended_decoding" not in json.loads((final / "config.json").read_text())
    assert SACCompressor.from_pretrained(final).recommended_decoding == {}


def test_a_checkpoint_can_be_trained_on_with_anchors_placed_another_way(workspace):
    first = train(parse_config(_args(workspace, "uniform", "--max-steps", "1")))
    final = train(parse_config(_args(workspace, "rarest", "--max-steps", "1", "--init-from", str(first),
                                     "--init-anchor-strategy", "rarest_in_block")))
    assert json.loads((final / "config.json").read_text())["config"]["anchor_strategy"] == "rarest_in_block"
    with pytest.raises(SACError, match="init_anchor_strategy"):
        parse_config(_args(workspace, "x", "--init-anchor-strategy", "rarest_in_block"))


def test_a_checkpoint_widened_to_a_larger_rank_starts_from_the_same_loss_and_resumes(workspace):
    first = train(parse_config(_args(workspace, "r4", "--max-steps", "1")))
    narrow = train(parse_config(_args(workspace, "narrow", "--max-steps", "1", "--init-from", str(first))))
    widen = ("--init-from", str(first), "--init-widen-rank", "16")
    train(parse_config(_args(workspace, "wide", "--max-steps", "2", *widen)))
    train(parse_config(_args(workspace, "wide", "--max-steps", "3", "--resume", *widen)))
    train(parse_config(_args(workspace, "straight", "--max-steps", "3", *widen)))
    assert _losses(workspace / "wide")[1] == pytest.approx(_losses(narrow.parent)[1], rel=1e-5)
    assert _losses(workspace / "wide")[3] == pytest.approx(_losses(workspace / "straight")[3], rel=1e-5)
    saved = json.loads((workspace / "wide" / "final" / "config.json").read_text())["config"]
    assert (saved["lora_rank"], saved["lora_alpha"]) == (16, 32)
    with pytest.raises(SACError, match="init_widen_rank"):
        parse_config(_args(workspace, "x", "--init-widen-rank", "16"))
    with pytest.raises(SACError, match="need --method sac"):
        parse_config(_args(workspace, "x", "--method", "full_ft", *widen))


def test_lr_decay_goes_linearly_to_zero_over_the_last_steps(workspace):
    train(parse_config(_args(workspace, "run", "--max-steps", "6", "--warmup-steps", "2",
                             "--lr-decay-steps", "4")))
    rows = [json.loads(line) for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    # warm-up 1/2, 2/2, then the decay (6 - step) / 4 from step 2 on: 4/4, 3/4, 2/4, 1/4
    assert lrs == pytest.approx([3e-3 * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)])
    with pytest.raises(SACError, match="lr_decay_steps"):
        parse_config(_args(workspace, "run2", "--lr-decay-steps", "-1"))


def test_a_negative_number_of_span_questions_is_refused_by_the_cli():
    with pytest.raises(SACError, match="span_questions must be >= 0"):
        parse_config(["--span-questions", "-2"])


def test_snapshots_keep_the_weights_of_every_nth_step_after_checkpoints_are_pruned(workspace):
    from safetensors.torch import load_file

    final = train(parse_config(_args(workspace, "run", "--max-steps", "4", "--keep-checkpoints", "1",
                                     "--snapshot-every", "2")))
    snapshots = workspace / "run" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (workspace / "run" / "checkpoints").iterdir()) == ["step-0000004"]
    weights = {p.name: load_file(p / "compressor.safetensors") for p in snapshots.iterdir()}
    last = load_file(final / "compressor.safetensors")
    assert all(torch.equal(weights["step-0000004"][k], last[k]) for k in last)
    assert any(not torch.equal(weights["step-0000002"][k], last[k]) for k in last)
    model, tokenizer = make_tiny_llama()
    SACCompressor.from_pretrained(snapshots / "step-0000002", model=model, tokenizer=tokenizer)
    with pytest.raises(SACError, match="snapshot_every"):
        parse_config(_args(workspace, "run2", "--snapshot-every", "-1"))


# -- bad input: options, command line, data, checkpoints, leftovers of killed runs ---------------


@pytest.mark.parametrize("flags, message", [
    (["--keep-checkpoints", "-1"], r"keep_checkpoints \(--keep-checkpoints\) must be >= 1"),
    (["--keep-checkpoints", "0"], r"keep_checkpoints \(--keep-checkpoints\) must be >= 1"),
    (["--checkpoint-every", "0"], r"checkpoint_every \(--checkpoint-every\) must be >= 1"),
    (["--max-steps", "-5"], r"max_steps \(--max-steps\) must be >= 1, got -5"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1"),
    (["--micro-batch-size", "0"], r"micro_batch_size \(--micro-batch-size\) must be >= 1"),
    (["--lr", "-0.001"], r"lr \(--lr\) must be > 0"),
    (["--lr", "nan"], r"lr \(--lr\) must be > 0"),
    (["--held-out-fraction", "1"], r"held_out_fraction \(--held-out-fraction\) .* in \[0, 1\)"),
    (["--held-out-fraction", "-0.1"], r"held_out_fraction \(--held-out-fraction\) .* in \[0, 1\)"),
    (["--eval-every", "-1"], r"eval_every \(--eval-every\) must be >= 0"),
    (["--grad-clip", "0"], r"grad_clip \(--grad-clip\) .* > 0"),
    (["--betas", "0.9"], r"betas \(--betas\) must be two numbers in \[0, 1\)"),
    (["--weight-decay", "-0.1"], r"weight_decay \(--weight-decay\) must be >= 0"),
])
def test_an_option_out_of_range_is_refused_naming_it_and_its_range(flags, message):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        parse_config(flags)


def test_a_config_file_is_checked_like_the_flags(tmp_path):
    from sac_rag.errors import InvalidInputError

    def config(text: str) -> str:
        (tmp_path / "c.json").write_text(text)
        return str(tmp_path / "c.json")

    with pytest.raises(InvalidInputError, match=r"max_steps \(--max-steps\) must be int, got '10'"):
        parse_config(["--config", config('{"max_steps": "10"}')])
    with pytest.raises(InvalidInputError, match="lora_target_modules .* must be a non-empty list of str"):
        parse_config(["--config", config('{"lora_target_modules": "q_proj"}')])
    with pytest.raises(InvalidInputError, match=r"c\.json sets unknown options \['max_step'\]"):
        parse_config(["--config", config('{"max_step": 10}')])
    with pytest.raises(InvalidInputError, match=r"c\.json is not valid JSON"):
        parse_config(["--config", config('{"max_steps": 10')])
    with pytest.raises(InvalidInputError, match="must hold a JSON object of options, got list"):
        parse_config(["--config", config("[1]")])
    with pytest.raises(InvalidInputError, match="nope.json cannot be read"):
        parse_config(["--config", str(tmp_path / "nope.json")])
    assert parse_config(["--config", config('{"lr": 1, "max_steps": 10}')]).lr == 1  # an int is a float


def test_the_command_line_shows_one_error_line_not_a_traceback(tmp_path):
    for argv, message in ((["--stage", "foo"], "error: stage must be 'pretrain' or 'finetune', got 'foo'"),
                          (["--out-dir", str(tmp_path / "run")], "error: --data is required for stage 'finetune'")):
        done = subprocess.run([sys.executable, "-m", "sac_rag.train", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.startswith(message) and "Traceback" not in done.stderr


def test_qa_jsonl_without_titles_trains_with_the_default_held_out_fraction(workspace):
    rows = [{"context": f"{c} Note {i}.", "question": q, "answers": [a]} for i, (c, q, a) in enumerate(FACTS * 2)]
    (workspace / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(parse_config(_args(workspace, "run", "--data", str(workspace / "qa.jsonl"), "--max-steps", "1",
                             "--held-out-fraction", "0.05")))
    rows = [json.loads(line) for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_n"] for r in rows if "eval_n" in r] == [1]  # one of the eight paragraphs held out


def test_data_without_a_usable_example_is_reported_with_what_was_held_out_and_skipped(workspace):
    rows = [{"context": "Some text.", "question": "Q?", "answers": [""]}] * 3
    (workspace / "empty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SACError, match=r"no usable training examples in .*empty.jsonl: 0 paragraph\(s\) held out "
                                       r".*records skipped: \{'no answer': 3\}"):
        train(parse_config(_args(workspace, "run", "--data", str(workspace / "empty.jsonl"))))


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_resume_after_a_kill_leaves_clean_metrics_and_no_leftover_staging(workspace):
    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    # What a kill during step 4 leaves: logged steps past the checkpoint, a cut line, half-published dirs
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in (run / "checkpoints" / f".staging-step-0000004-{dead.pid}", run / f".staging-final-{dead.pid}"):
        stale.mkdir()
        (stale / "half-written").write_text("x")
    live = run / "checkpoints" / f".staging-step-0000009-{os.getppid()}"  # a live process's: not ours to touch
    live.mkdir()
    train(parse_config(_args(workspace, "run", "--max-steps", "4", "--resume")))
    assert _steps(run) == [1, 2, 3, 4]
    assert _losses(run)[3] != 9.0
    assert sorted(p.name for p in run.rglob(".staging-*")) == [live.name]


def test_metrics_on_disk_hold_every_finished_step_while_the_run_goes(workspace, monkeypatch):
    # Read between checkpoints (here: none until the end): each step's row is on disk before the next.
    import sac_rag.train as train_module

    run, seen = workspace / "run", []
    reduce = train_module._reduce_step_stats

    def observe(stats, world, device):  # called once per step, before that step's row is written
        seen.append(_steps(run))
        return reduce(stats, world, device)

    monkeypatch.setattr(train_module, "_reduce_step_stats", observe)
    train(parse_config(_args(workspace, "run", "--max-steps", "3", "--checkpoint-every", "100")))
    assert seen == [[], [1], [1, 2]]


@pytest.mark.parametrize("swap", [True, False], ids=["swapped", "renamed-aside"])
def test_stale_staging_is_removed_and_a_directory_set_aside_is_put_back(tmp_path, monkeypatch, swap):
    import sac_rag.train as train_module
    from sac_rag.train import publish_dir, remove_stale_staging

    if not swap:  # as on a file system or platform that cannot swap two directories
        monkeypatch.setattr(train_module, "exchange_paths", lambda a, b: False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    publish_dir(tmp_path / "best", lambda d: (d / "v").write_text("1"))
    publish_dir(tmp_path / "best", lambda d: (d / "v").write_text("2"))  # replaced, nothing left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["best"] and (tmp_path / "best" / "v").read_text() == "2"
    # killed between setting the old final/ aside and renaming the new one in: the old one comes back
    (tmp_path / f".old-final-{dead.pid}").mkdir()
    (tmp_path / f".old-final-{dead.pid}" / "v").write_text("old")
    (tmp_path / f".staging-final-{dead.pid}").mkdir()
    (tmp_path / f".old-best-{dead.pid}").mkdir()  # best/ itself was published: this one is garbage
    remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]
    assert (tmp_path / "final" / "v").read_text() == "old" and (tmp_path / "best" / "v").read_text() == "2"


def test_a_published_directory_is_swapped_in_so_a_reader_never_finds_it_missing(tmp_path, monkeypatch):
    import sac_rag.train as train_module
    from sac_rag.files import exchange_paths

    probe = [tmp_path / "a", tmp_path / "b"]
    for directory in probe:
        directory.mkdir()
    if not exchange_paths(*probe):
        pytest.skip("this file system cannot swap two directories in one step")
    renamed = []
    monkeypatch.setattr(train_module.os, "rename", lambda a, b: renamed.append((a, b)) or os.replace(a, b))
    train_module.publish_dir(tmp_path / "best", lambda d: (d / "v").write_text("1"))
    train_module.publish_dir(tmp_path / "best", lambda d: (d / "v").write_text("2"))
    assert (tmp_path / "best" / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "best"]  # the old one is gone
    assert renamed == [(tmp_path / f".staging-best-{os.getpid()}", tmp_path / "best")]  # only the first


def test_a_checkpoint_a_run_set_aside_is_named_when_its_replacement_is_missing(tmp_path):
    from sac_rag.compressor import resolve_pretrained

    (tmp_path / ".old-final-4242").mkdir()
    (tmp_path / ".old-final-4242" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"set its previous version aside as .*\.old-final-4242.*--resume"):
        resolve_pretrained(tmp_path / "final")


def test_pruning_keeps_the_checkpoint_latest_names_beside_a_later_one_a_killed_run_left(workspace):
    import shutil

    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "2", "--keep-checkpoints", "1")))
    shutil.copytree(run / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000009")
    train(parse_config(_args(workspace, "run", "--max-steps", "4", "--keep-checkpoints", "1", "--resume")))
    assert (run / "latest").read_text() == "step-0000004"
    assert (run / "checkpoints" / "step-0000004" / "trainer_state.json").exists()


@pytest.mark.parametrize("broken, keep, advice", [
    ("optimizer.safetensors", "2", "An older checkpoint is kept, .*step-0000002: to resume from it, write its name "
                                   "into .*latest \\(echo step-0000002 > .*latest\\)"),
    ("compressor.safetensors", "2", "echo step-0000002 >"),
    ("trainer_state.json", "1", "no older checkpoint is kept: start the run again in a new --out-dir"),
])
def test_a_truncated_checkpoint_is_reported_with_the_older_one_to_resume_from(workspace, broken, keep, advice):
    from sac_rag.errors import CheckpointError

    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "4", "--keep-checkpoints", keep)))
    path = run / "checkpoints" / "step-0000004" / broken
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    resume = _args(workspace, "run", "--max-steps", "5", "--keep-checkpoints", keep, "--resume")
    with pytest.raises(CheckpointError, match=f"cannot resume from checkpoint .*step-0000004: .*{advice}"):
        train(parse_config(resume))
    if keep == "2":  # the advice works
        (run / "latest").write_text("step-0000002")
        train(parse_config(resume))
        assert _steps(run) == [1, 2, 3, 4, 5]


def test_a_data_path_that_is_no_file_is_refused_before_the_model_loads(workspace):
    # no model at --base-model: the data is checked first
    args = _args(workspace, "run", "--base-model", str(workspace / "no-model"))
    with pytest.raises(SACError, match="--data .*nope.json does not exist"):
        train(parse_config([*args, "--data", str(workspace / "nope.json")]))
    with pytest.raises(SACError, match="--data .* is a directory, not a data file"):
        train(parse_config([*args, "--data", str(workspace)]))
    with pytest.raises(SACError, match="--eval-data .*nope.json does not exist"):
        train(parse_config([*args, "--eval-data", str(workspace / "nope.json")]))


# -- audit fixes: pretraining data, the best checkpoint across --resume, options that do nothing -------


def _pretrain(ws: Path, out: str, data: Path, *extra: str) -> list[str]:
    return _args(ws, out, "--stage", "pretrain", "--data", str(data), "--held-out-fraction", "0", *extra)


def test_pretraining_on_documents_all_shorter_than_lm_min_tokens_is_refused_not_a_hang(workspace):
    short = workspace / "short.txt"
    short.write_text("Hi there.\n\nA short one.\n")
    with pytest.raises(SACError, match=r"no document in .*short.txt reaches --lm-min-tokens 510: the longest of "
                                       r"its 2 documents has \d+ tokens"):
        train(parse_config(_pretrain(workspace, "run", short, "--max-steps", "2")))


def test_the_example_stream_stops_after_a_full_pass_without_a_usable_document(workspace, monkeypatch):
    from sac_rag.config import PromptTemplate
    from sac_rag.data import DataError, LoadStats
    from sac_rag.train import ExampleStream

    short = workspace / "short.txt"
    short.write_text("Hi there.\n\nA short one.\n")
    monkeypatch.setattr(ExampleStream, "_check_documents", lambda self, tokenizer: None)  # only the loop's guard
    _, tokenizer = make_tiny_llama()
    stream = ExampleStream(parse_config(_pretrain(workspace, "run", short)), tokenizer, PromptTemplate(), LoadStats())
    with pytest.raises(DataError, match="a full pass over its 2 documents found none"):
        stream.next_batch(4, 0, 1)


@pytest.mark.parametrize("value", ["1", "2"])
def test_lm_min_tokens_below_what_a_window_needs_is_refused_saying_why(value):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=rf"lm_min_tokens \(--lm-min-tokens\) must be >= 3, got {value}: "
                                                r"a window's first half is compressed"):
        parse_config(["--stage", "pretrain", "--lm-min-tokens", value, "--lm-max-tokens", "4"])


def test_pretraining_logs_short_and_long_documents_and_trains_with_the_smallest_window(workspace, caplog):
    docs = workspace / "docs.md"
    docs.write_text("A\n\n" + " ".join(["Paris is the capital of France."] * 8) + "\n\n"
                    + " ".join(["The tower was finished in 1889."] * 4) + "\n")
    with caplog.at_level("INFO", logger="sac_rag.train"):
        train(parse_config(_pretrain(workspace, "run", docs, "--lm-min-tokens", "3", "--lm-max-tokens", "6",
                                     "--max-steps", "2")))
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(workspace / "run").values())
    text = caplog.text
    assert "1 of 3 documents are shorter than --lm-min-tokens 3 and are skipped" in text
    assert re.search(r"2 of 3 documents are longer than --lm-max-tokens 6 \(the longest has \d+ tokens\): each "
                     r"epoch trains on one random window of 3-6 tokens per document, about \d+% of", text)


def test_help_says_a_long_document_is_read_one_window_per_epoch(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ONE random window of lm_min..lm_max tokens per document" in text
    assert "needs --anchor-embedding per_slot" in text


def test_pretraining_refuses_qa_json_and_counts_empty_rows(workspace, caplog):
    with pytest.raises(SACError, match=r"qa.json: pretraining reads .*\(.jsonl\) or a plain-text file .*"
                                       r"\(.txt, .md\).*got a .json file"):
        train(parse_config(_pretrain(workspace, "run", workspace / "qa.json")))
    rows = workspace / "rows.jsonl"
    rows.write_text((workspace / "lm.jsonl").read_text() + "\n" + json.dumps({"text": ""}) + "\n")
    with caplog.at_level("INFO", logger="sac_rag.train"):
        train(parse_config(_pretrain(workspace, "run", rows, "--lm-min-tokens", "20", "--lm-max-tokens", "60",
                                     "--max-steps", "1")))
    assert "rows.jsonl: skipped {'empty text': 1}" in caplog.text


def _eval_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_f1" in r]


def test_the_last_checkpoint_records_the_f1_best_holds_and_a_finished_run_is_not_evaluated_twice(workspace):
    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    state = json.loads((run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert (run / "best").is_dir()
    assert state["best_f1"] == _eval_rows(run)[-1]["eval_f1"] >= 0  # not -1: the evaluation came first
    train(parse_config(_args(workspace, "run", "--max-steps", "2", "--resume")))  # nothing left to do
    assert [r["step"] for r in _eval_rows(run)] == [2]


def test_the_end_of_run_evaluation_leaves_resume_exact(workspace):
    # evaluated at step 2 before its checkpoint; the resumed steps are those of an uninterrupted run
    train(parse_config(_args(workspace, "straight", "--max-steps", "4")))
    train(parse_config(_args(workspace, "split", "--max-steps", "2")))
    train(parse_config(_args(workspace, "split", "--max-steps", "4", "--resume")))
    straight, split = _losses(workspace / "straight"), _losses(workspace / "split")
    for step in (3, 4):
        assert split[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)
    assert [r["step"] for r in _eval_rows(workspace / "split")] == [2, 4]


@pytest.mark.parametrize("flags, message", [
    (["--method", "full_ft", "--distill-weight", "1", "--ae-weight", "1", "--bidir-anneal-steps", "5"],
     r"--distill-weight 1.0, --ae-weight 1.0, --bidir-anneal-steps 5 would do nothing with --method full_ft"),
    (["--method", "full_ft", "--ratio", "3", "--no-bidirectional"],
     r"--ratio 3, --no-bidirectional would do nothing with --method full_ft"),
    (["--stage", "pretrain", "--distractors", "2", "--span-questions", "1", "--questions-per-context", "3"],
     r"--questions-per-context 3, --span-questions 1, --distractors 2 would do nothing with --stage pretrain"),
    (["--lm-max-tokens", "100", "--lm-min-tokens", "50"],
     r"--lm-min-tokens 50, --lm-max-tokens 100 would do nothing with --stage finetune"),
    (["--memory", "compression_tokens"], r"--memory compression_tokens needs --anchor-embedding per_slot"),
])
def test_an_option_that_does_nothing_in_its_combination_is_refused_naming_it(flags, message):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        parse_config(flags)


def test_options_at_their_defaults_are_accepted_in_any_combination(tmp_path):
    # a run's saved train_config.json restates every default: it must load as before
    config = tmp_path / "c.json"
    defaults = json.loads(json.dumps(dataclasses.asdict(parse_config([]))))
    config.write_text(json.dumps(defaults | {"method": "full_ft", "stage": "pretrain"}))
    assert parse_config(["--config", str(config)]).method == "full_ft"
    assert parse_config(["--method", "full_ft", "--distill-weight", "0", "--ratio", "5"]).ratio == 5


def test_every_shipped_config_still_loads():
    paths = sorted((REPO / "benchmarks" / "configs").rglob("*.json"))
    paths += sorted((REPO / "sac_rag" / "pretrained").glob("*/train_config*.json"))
    assert len(paths) > 40
    for path in paths:
        parse_config(["--config", str(path)])


def test_shape_options_that_differ_from_the_init_from_checkpoint_are_refused_naming_both(workspace, caplog):
    from sac_rag.errors import InvalidInputError

    first = str(train(parse_config(_args(workspace, "first", "--max-steps", "1"))))
    with pytest.raises(InvalidInputError, match=r"--init-from .*first/final brings its own compressor shape.*"
                                                r"--ratio 3 \(the checkpoint has ratio 2\); --chunk-len 32 \(the "
                                                r"checkpoint has chunk_len 64\); --lora-rank 8 \(the checkpoint has "
                                                r"lora_rank 4\).*--no-bidirectional \(the checkpoint has "
                                                r"bidirectional True\)"):
        train(parse_config(_args(workspace, "x", "--max-steps", "1", "--init-from", first, "--ratio", "3",
                                 "--chunk-len", "32", "--lora-rank", "8", "--no-bidirectional")))
    # a flag is a choice even at its default value
    none = str(train(parse_config(_args(workspace, "none", "--max-steps", "1", "--anchor-embedding", "none"))))
    with pytest.raises(InvalidInputError, match=r"--anchor-embedding shared \(the checkpoint has anchor_embedding "
                                                r"'none'\)"):
        train(parse_config(_args(workspace, "y", "--max-steps", "1", "--init-from", none,
                                 "--anchor-embedding", "shared")))
    # a config file restating a default (as saved train_config.json files do) is warned about, not refused
    config = workspace / "c.json"
    config.write_text(json.dumps({"anchor_embedding": "shared", "lora_rank": 4}))
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        train(parse_config(["--config", str(config), *_args(workspace, "z", "--max-steps", "1", "--init-from", none)]))
    assert "restates defaults that --init-from" in caplog.text and "anchor_embedding 'shared'" in caplog.text
    # the init_* options change the shape on purpose: --ratio may name the checkpoint's ratio or the new one
    train(parse_config(_args(workspace, "r4", "--max-steps", "1", "--init-from", first, "--init-ratio", "4")))
    train(parse_config(_args(workspace, "r4b", "--max-steps", "1", "--init-from", first, "--init-ratio", "4",
                             "--ratio", "4")))


def test_a_full_ft_init_from_adapter_of_another_rank_is_refused(workspace):
    from sac_rag.errors import InvalidInputError

    first = str(train(parse_config(_args(workspace, "ft", "--method", "full_ft", "--max-steps", "1"))))
    with pytest.raises(InvalidInputError, match=r"--lora-rank 8 \(the adapter has 4\)"):
        train(parse_config(_args(workspace, "ft2", "--method", "full_ft", "--max-steps", "1", "--init-from", first,
                                 "--lora-rank", "8")))


def test_an_init_from_checkpoint_of_another_base_model_is_refused_naming_both(workspace):
    from sac_rag.errors import FingerprintMismatchError

    other, tokenizer = make_tiny_llama(seed=1)
    other.save_pretrained(workspace / "other-model")
    tokenizer.save_pretrained(workspace / "other-model")
    for method in ([], ["--method", "full_ft"]):
        first = str(train(parse_config(_args(workspace, f"first{len(method)}", *method, "--max-steps", "1"))))
        args = _args(workspace, f"x{len(method)}", *method, "--max-steps", "1", "--init-from", first)
        args[args.index("--base-model") + 1] = str(workspace / "other-model")
        with pytest.raises(FingerprintMismatchError, match=r"--init-from .*first\d/final was built for "
                                                           r"'.*tiny-model@[0-9a-f]+'.*in use is '.*other-model@"):
            train(parse_config(args))
    # the same weights under another name or in another place are the same base model: a checkpoint
    # whose base model moved is trained on from where it is now, and the new checkpoint names that place
    (workspace / "tiny-model").rename(workspace / "moved-model")
    args = _args(workspace, "z", "--max-steps", "1", "--init-from", str(workspace / "first0" / "final"))
    args[args.index("--base-model") + 1] = str(workspace / "moved-model")
    moved = train(parse_config(args))
    assert json.loads((moved / "config.json").read_text())["config"]["base_model"] == str(workspace / "moved-model")
    (workspace / "moved-model").rename(workspace / "tiny-model")
    same, tokenizer = make_tiny_llama()
    same.save_pretrained(workspace / "copy-of-tiny-model")
    tokenizer.save_pretrained(workspace / "copy-of-tiny-model")
    args = _args(workspace, "y", "--max-steps", "1", "--init-from", str(workspace / "first0" / "final"))
    args[args.index("--base-model") + 1] = str(workspace / "copy-of-tiny-model")
    assert (train(parse_config(args)) / "config.json").exists()


def test_an_anneal_with_a_causal_encoder_is_warned_about(workspace, caplog):
    # benchmarks/configs/ablations/no-mask.json sets this combination: it must still run
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        train(parse_config(_args(workspace, "run", "--max-steps", "1", "--no-bidirectional",
                                 "--bidir-anneal-steps", "5")))
    assert "--bidir-anneal-steps 5 would do nothing: --no-bidirectional" in caplog.text


def test_an_option_that_tunes_another_one_left_off_is_named_with_what_it_needs():
    def idle(*args):
        return idle_options(parse_config(["--data", "x.json", "--out-dir", "o", *args]))

    assert idle() == [] and idle("--distractors", "2", "--distractor-share", "0.5") == []
    assert idle("--distractor-share", "0.5", "--distractor-source", "same_article") == [
        "--distractor-source same_article, --distractor-share 0.5 would do nothing: --distractors is 0"]
    assert idle("--distill-divergence", "reverse", "--risk-samples", "8") == [
        "--distill-divergence reverse would do nothing: --distill-weight is 0: it chooses the KL term's direction",
        "--risk-samples 8 would do nothing: --risk-weight is 0"]
    assert idle("--distill-tokens", "all", "--distill-hidden-weight", "1") == []  # the hidden term reads them too
    assert idle("--anchor-embedding", "none", "--anchor-lr", "0.01")[0].startswith("--anchor-lr 0.01 would do nothing")
    assert idle("--decoder-lora-alpha", "8") == ["--decoder-lora-alpha 8 would do nothing: --decoder-lora-rank is 0"]
    assert idle("--held-out-fraction", "0.2", "--eval-data", "y.json")[0].startswith("--held-out-fraction 0.2")
    assert idle("--held-out-fraction", "0", "--eval-every", "50") == [
        "--eval-every 50 would do nothing: --held-out-fraction is 0 and no --eval-data is given: there are no "
        "questions to evaluate on (and no best/)"]
    assert idle("--eval-every", "50", "--eval-data", "y.json") == []


def test_paths_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch):
    """The shell leaves "--out-dir=~/run" as written: it names the home folder's run, not ./~/run."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config(["--data=~/qa.json", "--out-dir=~/run", "--init-from", "~/ckpt", "--base-model", "~/model"])
    assert (cfg.data, cfg.out_dir, cfg.init_from, cfg.base_model) == tuple(
        str(tmp_path / name) for name in ("qa.json", "run", "ckpt", "model"))
    (tmp_path / "c.json").write_text(json.dumps({"data": "~/qa.json", "out_dir": "~/run2"}))
    assert parse_config(["--config", "~/c.json"]).out_dir == str(tmp_path / "run2")


def test_resume_with_no_checkpoint_says_there_is_nothing_to_resume(workspace, caplog):
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        train(parse_config(_args(workspace, "run", "--max-steps", "1", "--resume")))
    assert re.search(r"--resume: nothing to resume, .*run holds no checkpoint", caplog.text)


@pytest.mark.parametrize("method", ["sac", "full_ft"])
def test_an_unknown_lora_target_module_is_one_line_naming_the_models_modules(workspace, method):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"--lora-target-modules: nosuch is not a module of .*tiny-model; "
                                                r"its linear modules are .*k_proj.*q_proj"):
        train(parse_config(_args(workspace, "run", "--method", method, "--max-steps", "1",
                                 "--lora-target-modules", "q_proj", "nosuch")))


def test_records_skipped_in_the_eval_data_are_reported(workspace, caplog):
    rows = [{"context": "Paris is in France.", "question": "Where?", "answers": ["France"]},
            {"context": "Paris is in France.", "question": "Where?", "answers": [""]}]
    (workspace / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        train(parse_config(_args(workspace, "run", "--max-steps", "1", "--eval-data", str(workspace / "eval.jsonl"))))
    assert re.search(r"--eval-data .*eval.jsonl: skipped \{'no answer': 1\}", caplog.text)


# -- audit: contexts past the model's positions, resuming moved or mis-recorded runs, odd values ----------


def _short_model(ws: Path, positions: int) -> Path:
    """The tiny model, saved with only ``positions`` positions."""
    model, tokenizer = make_tiny_llama()
    model.config.max_position_embeddings = positions
    model.save_pretrained(ws / "short-model")
    tokenizer.save_pretrained(ws / "short-model")
    return ws / "short-model"


def test_contexts_longer_than_the_models_positions_are_split_not_read_past_them(workspace, caplog):
    from sac_rag.data import LoadStats
    from sac_rag.train import ExampleStream

    long = " ".join(f"Sentence {i} says the tower was finished in {1800 + i}." for i in range(60))
    rows = [{"context": f"{c} Note {i}.", "question": q, "answers": [a]} for i, (c, q, a) in enumerate(FACTS * 2)]
    rows += [{"context": long, "question": "When was the tower finished, in sentence 55?", "answers": ["1855"]},
             {"context": "Some text.", "question": "Q?", "answers": [""]}]
    (workspace / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workspace / "eval.jsonl").write_text(json.dumps(rows[-2]) + "\n")
    args = _args(workspace, "run", "--data", str(workspace / "qa.jsonl"), "--eval-data", str(workspace / "eval.jsonl"),
                 "--max-steps", "2", "--base-model", str(_short_model(workspace, 256)))
    with caplog.at_level("INFO", logger="sac_rag.train"):
        final = train(parse_config(args))  # the held-out evaluation of the long context no longer fails
    assert (final / "config.json").exists() and _eval_rows(workspace / "run")[-1]["eval_n"] == 1
    for what in ("--data", "--eval-data"):
        assert re.search(rf"{what} .*: 1 context\(s\) longer than \d+ tokens \(what the model's positions leave",
                         caplog.text)
    assert "qa.jsonl: skipped {'no answer': 1}" in caplog.text  # said at the start, not only at the end
    _, tokenizer = make_tiny_llama()

    def longest(stream) -> int:
        return max(len(tokenizer(p.context)["input_ids"]) for p in stream.items + stream.held_out)

    stream = ExampleStream(parse_config(args), tokenizer, _template(), LoadStats(), 256)
    assert longest(stream) <= stream.context_limit < 256 - 40 and len(stream.items) > len(rows) - 2
    # --max-context-tokens sets a lower limit
    capped = parse_config([*args, "--max-context-tokens", "30"])
    stream = ExampleStream(capped, tokenizer, _template(), LoadStats(), 256)
    assert stream.context_limit == 30 and longest(stream) <= 30


def _template():
    from sac_rag.config import PromptTemplate

    return PromptTemplate()


def test_a_pretraining_window_longer_than_the_models_positions_is_refused(workspace):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"--lm-max-tokens 300 does not fit the model's 256 positions"):
        train(parse_config(_args(workspace, "run", "--stage", "pretrain", "--data", str(workspace / "lm.jsonl"),
                                 "--held-out-fraction", "0", "--lm-min-tokens", "20", "--lm-max-tokens", "300",
                                 "--base-model", str(_short_model(workspace, 256)))))


def test_a_moved_run_directory_and_paths_spelled_otherwise_still_resume(workspace, monkeypatch):
    import shutil

    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    shutil.copytree(workspace / "run", workspace / "moved")
    train(parse_config(_args(workspace, "moved", "--max-steps", "3", "--resume")))
    assert _steps(workspace / "moved") == [1, 2, 3]
    monkeypatch.chdir(workspace)  # the same files, named relative to here; and another device name for the CPU
    args = _args(workspace, "run", "--max-steps", "3", "--resume", "--device", "cpu")
    for option, relative in (("--data", "qa.json"), ("--out-dir", "run"), ("--base-model", "tiny-model")):
        args[args.index(option) + 1] = relative
    train(parse_config(args))
    assert _losses(workspace / "run") == _losses(workspace / "moved")
    saved = json.loads((workspace / "run" / "train_config.json").read_text())
    assert saved["data"] == str(workspace / "qa.json")  # the run keeps the spelling it was started with


def test_resuming_with_max_steps_below_the_checkpoint_is_refused_and_changes_nothing(workspace):
    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "4")))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(SACError, match=r"cannot resume .*run with --max-steps 2: its latest checkpoint is already "
                                       r"at step 4. Pass --max-steps 4 or more"):
        train(parse_config(_args(workspace, "run", "--max-steps", "2", "--resume")))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_resuming_with_other_held_out_questions_is_refused_as_best_compares_f1_on_one_set(workspace):
    """best/ holds the step with the highest held-out F1: scores on 4 questions and on 2 do not compare."""
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    with pytest.raises(SACError, match=r"different configuration \(eval_questions: 4 -> 2\)"):
        train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume", "--eval-questions", "2")))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_run_without_a_readable_train_config_is_checked_against_its_checkpoint(workspace, damage, caplog):
    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "2")))
    config = run / "train_config.json"
    config.unlink() if damage == "delete" else config.write_text(config.read_text()[:20])
    with pytest.raises(SACError, match=r"different configuration \(ratio: 2 -> 3\)"):
        train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume", "--ratio", "3")))
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        train(parse_config(_args(workspace, "run", "--max-steps", "3", "--resume")))
    assert "checking the options against those recorded in" in caplog.text and _steps(run) == [1, 2, 3]


def test_a_compressor_with_nothing_to_train_is_refused_before_a_step(workspace):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(SACError, match=r"nothing to train: this compressor \(lora_rank 0, anchor_embedding 'none'"):
        train(parse_config(_args(workspace, "run", "--max-steps", "1", "--lora-rank", "0",
                                 "--anchor-embedding", "none")))
    with pytest.raises(InvalidInputError, match=r"lora_rank \(--lora-rank\) must be >= 1, got 0: Full-FT trains"):
        parse_config(["--method", "full_ft", "--lora-rank", "0"])
    with pytest.raises(InvalidInputError, match=r"lora_rank \(--lora-rank\) must be >= 0, got -1"):
        parse_config(["--lora-rank", "-1"])


def test_a_device_torch_does_not_know_or_this_machine_lacks_is_one_error_line(workspace, monkeypatch):
    # which GPU 'auto' and 'cuda' are for each rank: tests/test_devices.py
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"device='foo' is not a torch device"):
        train(parse_config(_args(workspace, "run", "--device", "foo")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match=r"device='cuda:1', but this torch sees no CUDA GPU"):
        train(parse_config(_args(workspace, "run", "--device", "cuda:1")))


def test_an_out_dir_that_is_a_file_is_refused_before_the_model_loads(workspace):
    from sac_rag.errors import InvalidInputError

    (workspace / "a-file").write_text("x")
    args = _args(workspace, "run", "--base-model", str(workspace / "no-model"))
    with pytest.raises(InvalidInputError, match=r"--out-dir .*a-file is a file, not a directory"):
        train(parse_config([*args, "--out-dir", str(workspace / "a-file")]))


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--distill-weight", "nan"], ["--risk-weight", "nan"],
                                   ["--bidir-anneal-start-bias", "inf"], ["--anchor-lr", "inf"]])
def test_an_infinite_or_nan_weight_or_rate_is_refused(flags):
    from sac_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=rf"\(--{flags[0][2:]}\) must be a finite number, got {flags[1]}"):
        parse_config(flags)
    assert parse_config(["--grad-clip", "inf"]).grad_clip == float("inf")  # no clipping: meaningful


def test_eval_data_without_a_usable_question_is_refused(workspace):
    (workspace / "eval.jsonl").write_text(json.dumps({"context": "c", "question": "q?", "answers": [""]}) + "\n")
    with pytest.raises(SACError, match=r"--eval-data .*eval.jsonl holds no usable question to evaluate on: "
                                       r"records skipped: \{'no answer': 1\}"):
        train(parse_config(_args(workspace, "run", "--max-steps", "1", "--eval-data", str(workspace / "eval.jsonl"))))


def test_best_holds_the_weights_of_the_best_f1_and_says_which_step_they_are(workspace, monkeypatch):
    from safetensors.torch import load_file

    import sac_rag.train as train_module

    scores = iter([10.0, 30.0, 20.0])
    monkeypatch.setattr(train_module, "evaluate_qa", lambda *a, **k: {"f1": next(scores), "em": 0.0, "n": 2,
                                                                     "examples": []})
    run = workspace / "run"
    train(parse_config(_args(workspace, "run", "--max-steps", "6", "--eval-every", "2", "--snapshot-every", "2")))
    assert json.loads((run / "best" / "best_eval.json").read_text()) == {"step": 4, "eval_f1": 30.0, "eval_em": 0.0,
                                                                         "eval_n": 2}
    best, step4 = (load_file(d / "compressor.safetensors") for d in (run / "best", run / "snapshots" / "step-0000004"))
    assert all(torch.equal(best[k], step4[k]) for k in best)


@pytest.mark.parametrize("device, refused", [("cuda:0", True), ("cuda", False), ("auto", False)])
def test_under_torchrun_a_gpu_named_by_index_is_refused_as_every_process_would_share_it(
        monkeypatch, workspace, device, refused):
    """On a machine whose processes each see several GPUs, --device cuda:0 (typed, or recorded by a
    one-GPU run and read back by `--out-dir RUN --resume`) would put both ranks on GPU 0, and NCCL
    would fail at its first collective; "cuda" and "auto" give each rank its own."""
    import torch.distributed as dist

    from sac_rag import train as train_module

    started = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda gpu: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: started.append(kwargs["backend"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    gpus = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        cfg = parse_config(_args(workspace, "run", "--device", device))
        if refused:
            with pytest.raises(SACError, match="puts all 2 processes on that one GPU: pass --device cuda"):
                train_module._setup_distributed(cfg)
        else:
            gpus.append(train_module._setup_distributed(cfg)[2])
    assert started == ([] if refused else ["nccl", "nccl"])
    assert gpus == ([] if refused else [torch.device("cuda", 0), torch.device("cuda", 1)])


def test_each_rank_resumes_from_its_own_rng_state(workspace):
    # ranks draw different numbers (sampled answers stop at data-dependent lengths): rank 0's state alone
    # would put every other rank on another stream than the uninterrupted run's
    from sac_rag.data import LoadStats
    from sac_rag.train import ExampleStream, build_model, build_optimizer, load_checkpoint, save_checkpoint

    cfg = parse_config(_args(workspace, "run"))
    model, _ = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    stream = ExampleStream(cfg, model.tokenizer, model.config.prompt, LoadStats())
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (10, 11)]
    (workspace / "run").mkdir()
    save_checkpoint(workspace / "run", 1, model, optimizer, stream, -1.0, cfg, [{"cpu": s} for s in states])
    for rank, expected in ((1, states[1]), (0, states[0]), (2, states[0])):  # a rank the run lacked: rank 0's
        torch.manual_seed(99)
        load_checkpoint(workspace / "run", model, optimizer, stream, rank)
        assert torch.equal(torch.get_rng_state(), expected)


def test_without_matplotlib_a_run_finishes_and_says_the_loss_curve_needs_the_train_extra(workspace, monkeypatch,
                                                                                        caplog):
    # matplotlib comes with `pip install 'sac-rag[train]'`; without it the run still writes final/
    from sac_rag.train import plot_metrics

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(plot_metrics, "warned", False, raising=False)  # warned once per process
    with caplog.at_level("WARNING", logger="sac_rag.train"):
        final = train(parse_config(_args(workspace, "run", "--max-steps", "2", "--checkpoint-every", "1")))
    assert (final / "config.json").exists() and not (workspace / "run" / "loss_curve.png").exists()
    assert caplog.text.count("matplotlib is not installed (pip install 'sac-rag[train]')") == 1


def test_the_optimizer_steps_with_the_scheduled_rates_of_both_groups(workspace, monkeypatch):
    applied = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        applied.append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(parse_config(_args(workspace, "run", "--max-steps", "6", "--warmup-steps", "2", "--lr-decay-steps", "4",
                             "--anchor-lr", "1e-2")))
    factors = (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)
    assert [lrs[0] for lrs in applied] == pytest.approx([3e-3 * f for f in factors])
    assert [lrs[1] for lrs in applied] == pytest.approx([1e-2 * f for f in factors])  # the anchor embedding's
    rows = [json.loads(line) for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([lrs[0] for lrs in applied])


def test_the_optimiser_uses_the_given_betas_weight_decay_and_gradient_clip(workspace, monkeypatch):
    from sac_rag.train import TrainConfig

    assert (TrainConfig().betas, TrainConfig().weight_decay,
            TrainConfig().grad_clip, TrainConfig().warmup_steps) == ([0.9, 0.95], 0.1, 2.0, 300)  # paper defaults
    seen, clips = [], []
    original_step, original_clip = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_

    def step(self, *args, **kwargs):
        seen.append({(tuple(g["betas"]), g["weight_decay"]) for g in self.param_groups})
        return original_step(self, *args, **kwargs)

    def clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return original_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train(parse_config(_args(workspace, "run", "--max-steps", "2", "--betas", "0.8", "0.9", "--weight-decay", "0.05",
                             "--grad-clip", "0.5")))
    assert seen == [{((0.8, 0.9), 0.05)}] * 2 and clips == [0.5, 0.5]


def test_with_distractors_every_training_example_fits_the_models_positions(workspace):
    from sac_rag.data import LoadStats
    from sac_rag.train import ExampleStream

    long = " ".join(f"Sentence {i} says the tower was finished in {1800 + i}." for i in range(60))
    rows = [{"context": f"{c} Note {i}.", "question": q, "answers": [a]} for i, (c, q, a) in enumerate(FACTS * 2)]
    rows += [{"context": long + f" Copy {k}.", "question": f"When, in sentence 5{k}?", "answers": [f"185{k}"]}
             for k in range(4)]
    (workspace / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _args(workspace, "run", "--data", str(workspace / "qa.jsonl"), "--distractors", "2",
                 "--held-out-fraction", "0")
    _, tokenizer = make_tiny_llama()
    stream = ExampleStream(parse_config(args), tokenizer, _template(), LoadStats(), 256)
    head = len(tokenizer(_template().prefix + _template().context_prefix, add_special_tokens=False)["input_ids"]) + 1
    for example in stream.next_batch(3 * len(stream.items), 0, 1):
        read = head + sum(map(len, example.passages)) + max(len(p) + len(t) for p, t in example.rows)
        assert read <= 256


def test_each_epoch_reads_the_examples_in_another_order(workspace):
    from sac_rag.data import LoadStats
    from sac_rag.train import ExampleStream

    _, tokenizer = make_tiny_llama()
    stream = ExampleStream(parse_config(_args(workspace, "run")), tokenizer, _template(), LoadStats(), 256)
    n = len(stream.items)
    epochs = [[stream._index(p) for p in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_held_out_evaluation_decodes_in_batches_the_answers_of_one_question_at_a_time():
    """The held-out F1 decodes EVAL_BATCH prompts at once: the same questions drawn in the same order,
    and the same answers and scores as decoding each prompt alone."""
    import random

    from sac_rag import GenerationConfig, Generator, SACConfig
    from sac_rag.data import Paragraph, QAItem
    from sac_rag.metrics import summarize
    from sac_rag.train import EVAL_BATCH, EVAL_NEW_TOKENS, evaluate_qa

    model, tokenizer = make_tiny_llama()
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4), model=model,
                         tokenizer=tokenizer)
    paragraphs = [Paragraph(f"{context} Note {i}.", [QAItem(question, [answer]), QAItem(f"And {question}", ["x"])])
                  for i in range(EVAL_BATCH + 4) for context, question, answer in [FACTS[i % len(FACTS)]]]
    template, generator = comp.config.prompt, Generator.from_compressor(comp)
    result = evaluate_qa(generator, template, paragraphs, len(paragraphs), compress=comp.compress, seed=3)
    rng = random.Random(3)
    alone, golds = [], []
    for para in rng.sample(paragraphs, len(paragraphs)):
        qa = para.questions[rng.randrange(len(para.questions))]
        prompt = template.build([comp.compress(para.context)], qa.question)
        alone.append(generator.generate(prompt, GenerationConfig(max_new_tokens=EVAL_NEW_TOKENS, stop=("\n",))).text)
        golds.append(qa.answers)
    expected = summarize([text.strip() for text in alone], golds)
    assert result["n"] == len(paragraphs) > EVAL_BATCH and {k: result[k] for k in expected} == expected
    assert [p for p, _ in result["examples"]] == [text.strip() for text in alone[:5]]
