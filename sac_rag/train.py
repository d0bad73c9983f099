"""Train a SAC compressor (or the Full-FT baseline): ``python -m sac_rag.train --help``.

Reads top to bottom: parse the config, build data, build the model, loop (accumulate, clip,
step), evaluate, checkpoint. Runs as one process on CPU or GPU, or data-parallel under
``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPU): each rank takes its share of every
batch and gradients are averaged across ranks before each step; every example weighs the same in a
step, so how it is split into ranks and micro-batches does not change it. Checkpoints are atomic and
``--resume`` continues exactly (weights, optimizer, data position, RNG).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .anchors import NAMED_STRATEGIES
from .config import PromptTemplate, SACConfig, text_ids
from .data import (
    DEFAULT_HELD_OUT_FRACTION,
    TEXT_FORMATS,
    DataError,
    LoadStats,
    check_text_format,
    iter_texts,
    read_qa,
    split_by_title,
    split_long_contexts,
)
from .devices import bf16_is_fast, resolve_device
from .errors import CheckpointError, FingerprintMismatchError, InvalidInputError, SACError, exit_with_message
from .files import HAVE_FILE_LOCKS, FileLock, atomic_write, exchange_paths, fsync_dir
from .fingerprint import base_record
from .generation import bos_ids
from .objectives import (
    DISTILL_DIVERGENCES,
    DISTILL_TOKENS,
    DISTRACTOR_SOURCES,
    LOSS_WEIGHTINGS,
    SPAN_QUESTION,
    ExampleBuilder,
    FullTextObjective,
    SACObjective,
)

logger = logging.getLogger("sac_rag.train")

DIST_TIMEOUT = timedelta(hours=1)  # how long ranks wait for each other at a collective
# Fields that may differ between a run and its resumption: bookkeeping, where the run lives (a run
# directory may be moved or named by another path), and what computes it ("auto" resolves per machine).
# Not --eval-questions: best/ is the checkpoint with the highest held-out F1, which means something
# only while every evaluation of the run asks the same questions.
_RESUMABLE_CHANGES = {"max_steps", "eval_every", "checkpoint_every", "resume", "keep_checkpoints",
                      "snapshot_every", "precision", "device", "out_dir"}
# With every example weighing the same in a step, how a step is split into micro-batches changes only
# rounding (and the order of sampling draws): a resumed run may take another split, say to fit memory.
_RESUMABLE_BY_EXAMPLE = {"micro_batch_size"}
# How runs started before an option existed behaved, where that is not the option's default now.
_BEFORE_OPTION_EXISTED = {"loss_weighting": "micro_batch_tokens"}
# Fields naming files or directories: the same one under another spelling (relative, absolute) is no change.
_PATH_OPTIONS = ("data", "eval_data", "init_from", "adapters_from", "distill_teacher", "base_model")
PRECISIONS = ("auto", "bf16", "fp32")
# A pretraining window's first half is compressed and its second half read as text: its first token
# is the decoder's input and at least one more is predicted, so a window needs 1 + 2 tokens.
LM_MIN_TOKENS = 3
TRAIN_PARTS = ("all", "encoder", "decoder")
# A context's token budget (see ExampleStream._context_limit): the held-out evaluation's answer length,
# room for a span question's cue, a margin for tokenizing the prompt's parts together rather than apart,
# and the least a passage may be given.
EVAL_NEW_TOKENS = 32
EVAL_BATCH = 16  # held-out prompts decoded together
SPAN_CUE_ROOM = 32
POSITION_MARGIN = 8
MIN_CONTEXT_TOKENS = 8


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Every option of a training run. A JSON file (--config) sets any of them; flags override."""

    stage: str = _help("'pretrain' (LM on plain text) or 'finetune' (QA)", default="finetune")
    method: str = _help("'sac' (train the compressor) or 'full_ft' (decoder LoRA on full text)", default="sac")
    data: str = _help("training data: JSONL/TXT for pretrain; SQuAD JSON or QA JSONL for finetune (.xz/.gz ok)",
                      default="")
    eval_data: str = _help("held-out QA data; default: the last held_out_fraction of the training "
                           "articles (finetune)", default="")
    held_out_fraction: float = _help("fraction of training articles held out when eval_data is unset",
                                     default=DEFAULT_HELD_OUT_FRACTION)
    out_dir: str = _help("run directory: checkpoints, metrics.jsonl, loss_curve.png, final/", default="runs/sac")
    init_from: str = _help("start from this compressor checkpoint (e.g. the pretrain stage's final/)", default="")
    adapters_from: str = _help("start a new compressor's encoder adapter, and its decoder adapter if it has one, "
                               "from this Full-FT checkpoint (same rank, alpha and target modules): with a "
                               "causal mask at ratio 1 the compressor then answers exactly as Full-FT does, and "
                               "training only has to learn to compress", default="")
    init_ratio: int = _help("with init_from: train its weights at this compression ratio instead of the "
                            "checkpoint's (a warm start for another ratio; 0 = keep)", default=0)
    init_widen_rank: int = _help("with init_from: enlarge its encoder LoRA to this rank (0 = keep); the added "
                                 "components start with no effect, so training begins from the same outputs "
                                 "with more adapter capacity", default=0)
    init_widen_decoder_rank: int = _help("with init_from: likewise enlarge its decoder adapter (0 = keep)", default=0)
    init_anchor_strategy: str = _help("with init_from: place its anchors by this strategy (see anchor_strategy) "
                                      "instead of the checkpoint's ('' = keep)", default="")
    resume: bool = _help("continue the run in out_dir from its latest checkpoint; without --config, the options "
                         "it recorded (out_dir/train_config.json) are read, so --out-dir DIR --resume is enough",
                         default=False)
    # compressor (ignored with init_from, which brings its own)
    base_model: str = _help("base causal LM: built-in name, local path or hub id; an init_from checkpoint "
                            "must have been trained on it (a compressor checkpoint brings its own, so it may be "
                            "left out, or name where that model is now)", default="smollm2-135m")
    ratio: int = _help("compression ratio r", default=5)
    chunk_len: int = _help("tokens per sub-context", default=510)
    lora_rank: int = _help("LoRA rank (paper: 128)", default=128)
    lora_alpha: int = _help("LoRA alpha (paper: 256)", default=256)
    lora_target_modules: list[str] = _help("modules that get LoRA", default_factory=lambda: ["q_proj", "v_proj"])
    anchor_embedding: str = _help("'shared' | 'per_slot' | 'none' (ablation)", default="shared")
    anchor_strategy: str = _help("'uniform' | 'random' (ablation) | 'rarest_in_block' (experimental: one anchor "
                                 "per r-token block, on its rarest token)", default="uniform")
    bidirectional: bool = _help("bidirectional encoder (False = ablation 'no mask')", default=True)
    memory: str = _help("'anchors' (SAC) | 'compression_tokens' (prior-art baseline; it needs --anchor-embedding "
                        "per_slot, the only anchor embedding that gives each compression token its own)",
                        default="anchors")
    decoder_lora_rank: int = _help("rank of a decoder-side LoRA used only when reading compressed contexts "
                                   "(0 = frozen decoder, the paper's default); may be added to an init_from "
                                   "checkpoint", default=0)
    decoder_lora_alpha: int = _help("its alpha (0 = 2 x rank)", default=0)
    train_parts: str = _help("which of a compressor's weights train: 'all'; 'encoder' (its LoRA and the anchor "
                             "embedding; a decoder adapter stays as it is); or 'decoder' (the decoder adapter "
                             "only, so the caches the compressor writes stay the same)", default="all")
    # objective
    questions_per_context: int = _help("questions trained per compressed paragraph (SQuAD has ~5)", default=1)
    span_questions: int = _help("synthetic questions per example quoting 4 words of the gold passage and asking "
                                "for the 1-5 that follow (finetune; trained by CE, not distilled; 0 = off)", default=0)
    distractors: int = _help("distractor passages compressed beside the gold one (finetune)", default=0)
    distractor_source: str = _help("'random' (any training paragraph) or 'same_article' (like retrieval "
                                   "neighbours; falls back to random for short articles)", default="random")
    distractor_share: float = _help("fraction of examples given distractors (seeded per example); the rest "
                                    "read the gold passage alone, so one run trains both settings", default=1.0)
    distill_weight: float = _help("weight of the KL to a teacher reading the full text", default=0.0)
    distill_teacher: str = _help("the teacher: a Full-FT adapter directory (train one with --method full_ft) "
                                 "on the same base model; empty = the frozen base model", default="")
    distill_tokens: str = _help("'answer' (distil answer tokens) or 'all' (every question and answer token)",
                                default="answer")
    distill_divergence: str = _help("'forward' KL(teacher || student), or 'reverse' KL(student || teacher): "
                                    "the student's mass on the teacher's likeliest tokens (mode seeking)",
                                    default="forward")
    distill_temperature: float = _help("softmax temperature of both distributions in the KL (Hinton et al.: > 1 "
                                       "shows the student the teacher's less likely tokens too); the term is "
                                       "scaled by its square so its gradient keeps its size", default=1.0)
    distill_on_policy_tokens: int = _help("also distil on the compressor's own greedy answers, up to this many "
                                          "tokens each, never trained by CE (on-policy distillation; 0 = off)",
                                          default=0)
    risk_weight: float = _help("weight of minimum risk training: the expected 1 - F1 of the compressor's "
                               "sampled answers and the gold one, weighted by their renormalised "
                               "probabilities (finetune; 0 = off)", default=0.0)
    risk_samples: int = _help("answers sampled per question for the risk term", default=4)
    risk_max_tokens: int = _help("longest sampled answer, in tokens", default=12)
    distill_hidden_weight: float = _help("weight of matching the teacher's hidden states: every decoder layer's "
                                         "output, RMS-normalised, at the distilled tokens (0 = off)", default=0.0)
    ae_weight: float = _help("weight of the autoencoding loss (+AE ablation; paper: hurts)", default=0.0)
    lm_min_tokens: int = _help(f"pretrain: shortest document window (>= {LM_MIN_TOKENS}); shorter documents are "
                               "skipped", default=510)
    lm_max_tokens: int = _help("pretrain: longest document window. Each epoch trains on ONE random window of "
                               "lm_min..lm_max tokens per document, so a longer document is only partly read per "
                               "epoch (the share is logged at the start)", default=2040)
    max_answer_tokens: int = _help("finetune: answers truncated to this many tokens", default=48)
    max_context_tokens: int = _help("finetune: split a context longer than this many tokens into overlapping "
                                    "pieces, each question kept with the piece holding its answer (one whose "
                                    "answer no piece holds is skipped and counted in the log). 0 = as long as "
                                    "the model's positions allow beside the prompt, the longest question, the "
                                    "answer and the distractors; a context longer than that is always split, "
                                    "held-out ones too", default=0)
    bidir_anneal_steps: int = _help("steps over which the encoder goes from ~causal to bidirectional", default=0)
    bidir_anneal_start_bias: float = _help("attention-score penalty on later tokens at step 0", default=8.0)
    # optimisation (paper defaults)
    lr: float = _help("learning rate of the LoRA weights (paper: 1e-4 pretrain, 5e-5 finetune)", default=5e-5)
    anchor_lr: float = _help("learning rate of the anchor embedding (0 = same as lr)", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    betas: list[float] = _help("AdamW betas", default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = _help("linear warm-up steps, then constant", default=300)
    lr_decay_steps: int = _help("decay the learning rates linearly to 0 over the last N steps before "
                                "max_steps (warmup-stable-decay; 0 = constant to the end, the paper's); "
                                "the decay follows max_steps, also when --resume changes it", default=0)
    grad_clip: float = _help("gradient-norm clip", default=2.0)
    batch_size: int = _help("examples per optimizer step (across all ranks)", default=16)
    micro_batch_size: int = _help("examples per forward pass (gradient accumulation)", default=4)
    loss_weighting: str = _help("how a step averages its examples' losses: 'example' (each example's mean over its "
                                "own tokens, then the mean over examples: the same step whatever --micro-batch-size "
                                "and the number of processes) or 'micro_batch_tokens' (the mean over each "
                                "micro-batch's tokens, which the shipped stages were trained with; a step then "
                                "depends on --micro-batch-size)", default="example")
    max_steps: int = _help("optimizer steps", default=1000)
    seed: int = _help("seed for data order and sampling", default=0)
    precision: str = _help("'bf16' autocast, 'fp32', or 'auto': bf16 where the device computes it natively "
                           "(CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32", default="auto")
    device: str = _help("'auto' (CUDA if present), 'cpu', 'cuda:0', ...", default="auto")
    # bookkeeping
    checkpoint_every: int = _help("steps between checkpoints", default=100)
    keep_checkpoints: int = _help("checkpoints kept (plus best/)", default=2)
    snapshot_every: int = _help("also keep the weights (no optimizer state) of every N-th step in snapshots/step-N, "
                                "never pruned: sources for averaging along the run (benchmarks/"
                                "average_compressors.py); 0 = none", default=0)
    eval_every: int = _help("steps between held-out evaluations (0 = only at the end); the weights of the best "
                            "held-out F1 so far are kept in best/, its step and scores in best/best_eval.json",
                            default=200)
    eval_questions: int = _help("held-out questions per evaluation", default=200)

    def __post_init__(self):
        self._check_types_and_ranges()
        for name in (*_PATH_OPTIONS, "out_dir"):  # "--out-dir=~/x" reaches us unexpanded: the home folder's
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        if self.stage not in ("pretrain", "finetune"):
            raise SACError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if self.method not in ("sac", "full_ft"):
            raise SACError(f"method must be 'sac' or 'full_ft', got {self.method!r}")
        if self.batch_size % self.micro_batch_size:
            raise SACError("batch_size must be a multiple of micro_batch_size")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise SACError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.distractor_source not in DISTRACTOR_SOURCES:
            raise SACError(f"distractor_source must be one of {DISTRACTOR_SOURCES}, got {self.distractor_source!r}")
        if self.span_questions < 0:
            raise SACError(f"span_questions must be >= 0, got {self.span_questions}")
        if not 0.0 <= self.distractor_share <= 1.0:
            raise SACError(f"distractor_share is a fraction of examples, in [0, 1]; got {self.distractor_share}")
        if self.distill_tokens not in DISTILL_TOKENS:
            raise SACError(f"distill_tokens must be one of {DISTILL_TOKENS}, got {self.distill_tokens!r}")
        if self.distill_divergence not in DISTILL_DIVERGENCES:
            raise SACError(f"distill_divergence must be one of {DISTILL_DIVERGENCES}, "
                           f"got {self.distill_divergence!r}")
        if self.adapters_from and (self.init_from or self.method != "sac"):
            raise SACError("adapters_from starts a new compressor's adapters: it cannot be combined with "
                           "init_from (which brings its own) and needs --method sac")
        changes_init_checkpoint = (self.init_ratio or self.init_widen_rank or self.init_widen_decoder_rank
                                   or self.init_anchor_strategy)
        if changes_init_checkpoint and not self.init_from:
            raise SACError("init_ratio / init_widen_rank / init_widen_decoder_rank / init_anchor_strategy change an "
                           "init_from checkpoint: set init_from, or use --ratio / --lora-rank / "
                           "--decoder-lora-rank / --anchor-strategy")
        if changes_init_checkpoint and self.method != "sac":
            raise SACError("init_ratio / init_widen_rank / init_widen_decoder_rank / init_anchor_strategy change a "
                           "compressor: they need --method sac")
        for option in ("anchor_strategy", "init_anchor_strategy"):
            strategy = getattr(self, option)
            if strategy and strategy not in NAMED_STRATEGIES:
                needs = (" ('importance' places anchors by a scorer function, which only Python code can give: "
                         "sac_rag.anchors.ImportanceAnchors(scorer=...))" if strategy == "importance" else "")
                raise SACError(f"{option} must be one of {NAMED_STRATEGIES}, got {strategy!r}{needs}")
        if self.precision not in PRECISIONS:
            raise SACError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if 0 < self.max_context_tokens < MIN_CONTEXT_TOKENS:
            raise InvalidInputError(f"max_context_tokens (--max-context-tokens) must be 0 (the model's limit) or >= "
                                    f"{MIN_CONTEXT_TOKENS}, got {self.max_context_tokens}")
        if self.lr_decay_steps < 0:
            raise SACError(f"lr_decay_steps must be >= 0, got {self.lr_decay_steps}")
        if self.snapshot_every < 0:
            raise SACError(f"snapshot_every must be >= 0 (0 = no snapshots), got {self.snapshot_every}")
        if self.distill_weight < 0 or self.distill_hidden_weight < 0:
            raise SACError("distill_weight and distill_hidden_weight must be >= 0")
        if not self.distill_temperature > 0:
            raise SACError(f"distill_temperature must be > 0 (1 = the plain KL), got {self.distill_temperature}")
        if self.distill_temperature != 1.0 and not self.distill_weight:
            raise SACError("distill_temperature is set but distill_weight is 0: the temperature softens only the "
                           "KL term, so give it a weight")
        if self.distill_on_policy_tokens < 0:
            raise SACError(f"distill_on_policy_tokens must be >= 0 (0 = off), got {self.distill_on_policy_tokens}")
        if self.distill_on_policy_tokens and not (self.distill_weight or self.distill_hidden_weight):
            raise SACError("distill_on_policy_tokens is set but distill_weight and distill_hidden_weight are 0: "
                           "on-policy rows are only distilled, so give the KL term a weight")
        if self.train_parts not in TRAIN_PARTS:
            raise SACError(f"train_parts must be one of {TRAIN_PARTS}, got {self.train_parts!r}")
        if self.train_parts != "all" and self.method != "sac":
            raise SACError("train_parts chooses between a compressor's encoder and decoder: it needs method 'sac'")
        if self.risk_weight < 0 or self.risk_samples < 1 or self.risk_max_tokens < 1:
            raise SACError("risk_weight must be >= 0 and risk_samples, risk_max_tokens >= 1, got "
                           f"{self.risk_weight}, {self.risk_samples}, {self.risk_max_tokens}")
        if self.risk_weight and (self.stage != "finetune" or self.method != "sac"):
            raise SACError("risk_weight scores answers to questions: it needs stage 'finetune' and method 'sac'")
        if self.distill_teacher and not (self.distill_weight or self.distill_hidden_weight):
            raise SACError("distill_teacher is set but distill_weight and distill_hidden_weight are 0: "
                           "give the KL term (or the hidden-state term) a weight")
        if self.lora_rank < 0 or (self.method == "full_ft" and self.lora_rank < 1):
            raise InvalidInputError(f"lora_rank (--lora-rank) must be >= {1 if self.method == 'full_ft' else 0}, got "
                                    f"{self.lora_rank}" + (": Full-FT trains a decoder LoRA" if self.method == "full_ft"
                                                           else " (0 = no encoder adapter)"))
        if self.memory == "compression_tokens" and self.anchor_embedding != "per_slot":
            raise InvalidInputError(f"--memory compression_tokens needs --anchor-embedding per_slot (got "
                                    f"{self.anchor_embedding!r}): each compression token has its own learned "
                                    f"embedding, and per_slot is the only choice that gives it one")
        self._check_ignored_options()

    def _check_ignored_options(self) -> None:
        """Refuse options set away from their defaults in a combination where they do nothing."""
        changed = [name for name in _IGNORED_WITH[self.method == "full_ft"] if _differs_from_default(self, name)]
        if self.method == "full_ft" and changed:
            raise InvalidInputError(f"{_options(self, changed)} would do nothing with --method full_ft, which trains "
                                    f"a decoder LoRA on the full text: options of the compressor or its objective "
                                    f"(distillation, +AE, mask anneal) apply to --method sac only. Drop them or use "
                                    f"--method sac")
        stage_only = _FINETUNE_ONLY if self.stage == "pretrain" else _PRETRAIN_ONLY
        changed = [name for name in stage_only if _differs_from_default(self, name)]
        if changed:
            why = ("pretraining predicts the continuation of a document; it asks no questions and "
                   "compresses no distractors" if self.stage == "pretrain" else
                   "they shape pretraining's document windows")
            raise InvalidInputError(f"{_options(self, changed)} would do nothing with --stage {self.stage}: {why}")

    def _check_types_and_ranges(self) -> None:
        """Every option has its default's type (a config file may hold anything), and numbers are in range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, list):
                kind, wanted = type(default[0]), f"a non-empty list of {type(default[0]).__name__}"
                ok = isinstance(value, list) and value and all(_is(v, kind) for v in value)
            else:
                ok, wanted = _is(value, type(default)), type(default).__name__
            if not ok:
                raise InvalidInputError(f"{f.name} (--{_flag(f.name)}) must be {wanted}, got {value!r}")
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if not value >= low:  # also refuses NaN
                raise InvalidInputError(f"{name} (--{_flag(name)}) must be >= {low}, got {value}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr (--lr) must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise InvalidInputError(f"grad_clip (--grad-clip) is a gradient-norm limit, > 0; got {self.grad_clip}")
        if not 0 <= self.held_out_fraction < 1:
            raise InvalidInputError(f"held_out_fraction (--held-out-fraction) is a fraction of the training articles, "
                                    f"in [0, 1) (0 = hold none out); got {self.held_out_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InvalidInputError(f"betas (--betas) must be two numbers in [0, 1), got {self.betas}")
        if self.lm_min_tokens < LM_MIN_TOKENS:
            raise InvalidInputError(f"lm_min_tokens (--lm-min-tokens) must be >= {LM_MIN_TOKENS}, got "
                                    f"{self.lm_min_tokens}: a window's first half is compressed and the decoder "
                                    f"reads the first token of its second half to predict at least one more")
        if self.lm_max_tokens < self.lm_min_tokens:
            raise InvalidInputError(f"lm_max_tokens ({self.lm_max_tokens}) must be >= lm_min_tokens "
                                    f"({self.lm_min_tokens})")
        # a weight, rate or bias of inf (or NaN) turns the loss into inf or NaN a step later
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and f.name not in _MAY_BE_INFINITE:
                raise InvalidInputError(f"{f.name} (--{_flag(f.name)}) must be a finite number, got {value}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _default(name: str):
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _differs_from_default(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) != _default(name)


def _options(cfg: TrainConfig, names: list[str]) -> str:
    """``--flag value`` for each option, as the user would have given it."""
    return ", ".join(_shown(cfg, name) for name in names)


def _shown(cfg: TrainConfig, name: str) -> str:
    value = getattr(cfg, name)
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{_flag(name)}"
    return f"--{_flag(name)} {' '.join(map(str, value)) if isinstance(value, list) else value}"


# Options that do nothing in a combination (only refused when set away from their defaults).
_COMPRESSOR_SHAPE = ("ratio", "chunk_len", "lora_rank", "lora_alpha", "lora_target_modules", "anchor_embedding",
                     "anchor_strategy", "bidirectional", "memory")
_IGNORED_WITH = {
    False: (),  # method 'sac'
    True: ("ratio", "chunk_len", "anchor_embedding", "anchor_strategy", "bidirectional", "memory",
           "decoder_lora_rank", "decoder_lora_alpha", "anchor_lr", "distill_weight", "distill_hidden_weight",
           "distill_tokens", "distill_divergence", "distill_temperature", "distill_on_policy_tokens", "ae_weight",
           "bidir_anneal_steps", "bidir_anneal_start_bias"),  # method 'full_ft'
}
# Options that only tune another one: set while that one is off, they do nothing. Warned about, not
# refused (as the combinations above are), so that the configs and runs that set them (e.g.
# benchmarks/configs/ablations/no-mask*.json, no-anchor-embedding.json) still run and resume as they did.
_TUNING = (
    (("distractor_source", "distractor_share"), lambda c: c.distractors == 0, "--distractors is 0"),
    (("distill_divergence",), lambda c: not c.distill_weight, "--distill-weight is 0: it chooses the KL term's "
                                                             "direction"),
    (("distill_tokens",), lambda c: not (c.distill_weight or c.distill_hidden_weight),
     "--distill-weight and --distill-hidden-weight are 0"),
    (("risk_samples", "risk_max_tokens"), lambda c: not c.risk_weight, "--risk-weight is 0"),
    (("bidir_anneal_start_bias",), lambda c: not c.bidir_anneal_steps, "--bidir-anneal-steps is 0"),
    (("bidir_anneal_steps",), lambda c: not c.bidirectional,
     "--no-bidirectional: a causal encoder never attends to later tokens, so there is no mask to anneal (the "
     "logged future_bias has no effect)"),
    (("decoder_lora_alpha",), lambda c: not (c.decoder_lora_rank or c.init_from), "--decoder-lora-rank is 0"),
    (("anchor_lr",), lambda c: c.anchor_embedding == "none", "--anchor-embedding none: there is no anchor "
                                                              "embedding to train"),
    (("held_out_fraction",), lambda c: c.stage == "pretrain" or bool(c.eval_data),
     "pretraining holds nothing out, and --eval-data replaces the held-out split"),
    (("eval_every", "eval_questions"), lambda c: c.stage == "finetune" and not c.eval_data and not c.held_out_fraction,
     "--held-out-fraction is 0 and no --eval-data is given: there are no questions to evaluate on (and no best/)"),
)


def idle_options(cfg: TrainConfig) -> list[str]:
    """One warning per group of options set away from their defaults that do nothing, as the option
    they tune is off (``_TUNING``)."""
    warnings = []
    for names, idle, why in _TUNING:
        changed = [name for name in names if _differs_from_default(cfg, name)]
        if changed and idle(cfg):
            warnings.append(f"{_options(cfg, changed)} would do nothing: {why}")
    return warnings


_FINETUNE_ONLY = ("questions_per_context", "span_questions", "distractors", "distractor_source", "distractor_share",
                  "max_answer_tokens", "max_context_tokens")
_PRETRAIN_ONLY = ("lm_min_tokens", "lm_max_tokens")


def _is(value, kind: type) -> bool:
    """``isinstance``, except that a bool is no number and an int is also a float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


# The lowest value of each numeric option (whole numbers unless noted).
_AT_LEAST = {
    "batch_size": 1, "micro_batch_size": 1, "max_steps": 1, "checkpoint_every": 1,
    "keep_checkpoints": 1,  # the checkpoint `latest` names is always kept
    "eval_every": 0, "eval_questions": 1, "warmup_steps": 0, "questions_per_context": 1, "distractors": 0,
    "max_answer_tokens": 1, "max_context_tokens": 0, "bidir_anneal_steps": 0, "bidir_anneal_start_bias": 0.0,
    "init_ratio": 0, "init_widen_rank": 0, "init_widen_decoder_rank": 0, "decoder_lora_rank": 0,
    "decoder_lora_alpha": 0, "lora_alpha": 1, "anchor_lr": 0.0, "weight_decay": 0.0, "ae_weight": 0.0,
}


# Float options for which infinity means something (no gradient clipping); NaN is refused by the range checks.
_MAY_BE_INFINITE = ("grad_clip",)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    # Each help text states its own default (argparse's defaults are None so that only the flags
    # actually given override the config file).
    parser = argparse.ArgumentParser(prog="python -m sac_rag.train", description=__doc__)
    parser.add_argument("--config", help="JSON file with any of the options below")
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['help']} (default: {default})")
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, nargs="+", type=type(default[0]), default=None,
                                help=f"{f.metadata['help']} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None,
                                help=f"{f.metadata['help']} (default: {default!r})")
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    config_file = config_file and os.path.expanduser(config_file)
    if args["out_dir"]:
        args["out_dir"] = os.path.expanduser(args["out_dir"])  # where --resume reads the run's options
    values = _read_config_file(config_file) if config_file else _recorded_options(args)
    in_file = set(values)
    given = {k for k, v in args.items() if v is not None}
    values.update({k: args[k] for k in given})
    cfg = TrainConfig(**values)
    # which options were set, and where (not fields: never saved, never compared on resume)
    cfg.given_on_command_line, cfg.given_in_config_file = frozenset(given), frozenset(in_file - given)
    return cfg


def _recorded_options(args: dict) -> dict:
    """With --resume and no --config, the options the run in --out-dir recorded, so that
    ``--out-dir DIR --resume`` is enough; none if its record is missing or unreadable (the run is then
    checked against its checkpoint's)."""
    if not (args["resume"] and args["out_dir"]):
        return {}
    try:
        return _read_config_file(str(Path(args["out_dir"]) / "train_config.json"))
    except InvalidInputError:
        return {}


def _read_config_file(path: str) -> dict:
    """The options a --config JSON file sets; InvalidInputError if it is unreadable, not an object of
    options, or names an option that does not exist."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as err:
        raise InvalidInputError(f"--config {path} cannot be read: {err.strerror or err}") from err
    except ValueError as err:
        raise InvalidInputError(f"--config {path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise InvalidInputError(f"--config {path} must hold a JSON object of options, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise InvalidInputError(f"--config {path} sets unknown options {unknown} (see --help; names use '_')")
    return values


# -- distributed --------------------------------------------------------------------------------


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)  # 'auto' and 'cuda' are this rank's GPU (LOCAL_RANK under torchrun)
    if world > 1 and device.type == "cuda" and cfg.device not in ("auto", "cuda") and torch.cuda.device_count() > 1:
        # NCCL would fail at the first collective ("Duplicate GPU detected"), after the model loaded
        raise InvalidInputError(f"--device {cfg.device} puts all {world} processes on that one GPU: pass --device "
                                "cuda (or auto), and each process takes its own (LOCAL_RANK)")
    if world > 1 and not dist.is_initialized():
        # Rank 0 evaluates and writes checkpoints while the others wait at the next collective: a
        # timeout of an hour, not NCCL's 10 minutes, so that a long evaluation does not abort them.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Each gradient averaged over the ranks (a missing one as zeros, so that every rank makes the
    same collectives), in one all-reduce per device and dtype: one per tensor would wait for a round
    trip per LoRA matrix, hundreds per step on a large model. A gradient no rank has stays missing,
    as in one process, where the optimizer then leaves its parameter alone (no weight decay)."""
    if world == 1:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))
    dist.all_reduce(had, op=dist.ReduceOp.SUM)
    for p, ranks_with_it in zip(params, had.tolist()):
        if not ranks_with_it:
            p.grad = None


def _check_ranks_agree(model, world: int) -> None:
    """Every rank must end with identical weights; a mismatch means a broken all-reduce."""
    from .fingerprint import hash_tensors

    params = model.model.named_parameters() if hasattr(model, "generator") else model.named_parameters()
    digest = hash_tensors((n, p) for n, p in params if p.requires_grad)
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise SACError(f"data-parallel ranks diverged: weight hashes {digests}")
    if dist.get_rank() == 0:  # said once, not by every rank
        logger.info("all %d ranks agree on the trained weights (%s)", world, digest[:12])


# -- model --------------------------------------------------------------------------------------


FULL_FT_META = "sac_full_ft.json"  # beside a Full-FT adapter: its prompt and base model
BEST_EVAL = "best_eval.json"  # in best/: the step whose weights it holds and their held-out scores
RUN_LOCK = ".run.lock"  # in a run's directory: held by the process training into it (_run_lock)


class _FullFTModel:
    """The Full-FT baseline's trainable state: a peft LoRA on the base model (decoder side)."""

    def __init__(self, cfg: TrainConfig, device):
        from peft import LoraConfig, PeftModel, get_peft_model

        from .fingerprint import base_model_fingerprints
        from .models import load_base_model

        base, self.tokenizer = load_base_model(cfg.base_model, device=device, dtype="float32")
        self.base_model = cfg.base_model
        self.base_fingerprint, self._base_fingerprint_float16 = base_model_fingerprints(base, self.tokenizer)
        if cfg.init_from:
            _check_full_ft_init_shape(cfg)
            _check_full_ft_init_base(cfg, self.base_fingerprint)
            self.model = PeftModel.from_pretrained(base, cfg.init_from, is_trainable=True)
        else:
            _check_target_modules(cfg, base)
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules))
            self.model = get_peft_model(base, lora)
        self.template = PromptTemplate()

    def save_pretrained(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        meta = {"prompt": dataclasses.asdict(self.template), "base_model": self.base_model,
                **base_record(self.base_fingerprint, self._base_fingerprint_float16)}
        atomic_write(directory / FULL_FT_META, json.dumps(meta).encode())

    def load_weights(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(directory / "adapter_model.safetensors"))

    def generator(self):
        from .generation import Generator

        return Generator(self.model, self.tokenizer)


def build_model(cfg: TrainConfig, device: torch.device, resuming: bool = False):
    """Returns (trainable model wrapper, objective). Weights in fp32; autocast does the rest.
    ``resuming``: a checkpoint's weights are loaded next, so --adapters-from is not read."""
    if cfg.method == "full_ft":
        model = _FullFTModel(cfg, device)
        model.model.train()
        context_head = model.template.prefix + model.template.context_prefix
        return model, FullTextObjective(model.model, model.tokenizer, context_head, weighting=cfg.loss_weighting)
    from .compressor import SACCompressor

    if cfg.init_from:
        comp = _init_compressor(cfg, device, resuming)
        if comp.recommended_decoding:  # measured on the weights training starts from, not on what it makes
            if _is_main_process():
                logger.info("--init-from %s recommends decoding with %s, measured on its own weights: this run's "
                            "checkpoints recommend none (greedy) until one is measured and recorded "
                            "(sac_rag.compressor.recommend_decoding)", cfg.init_from, comp.recommended_decoding)
            comp.recommended_decoding = {}
        saved = dataclasses.replace(comp.config)
        if cfg.decoder_lora_rank and not comp.config.decoder_lora_rank:
            comp.add_decoder_adapter(cfg.decoder_lora_rank, cfg.decoder_lora_alpha)
        if cfg.init_ratio:
            comp.retarget_ratio(cfg.init_ratio)
        if cfg.init_anchor_strategy:
            comp.use_anchors(cfg.init_anchor_strategy)
        if cfg.init_widen_rank or cfg.init_widen_decoder_rank:
            comp = comp.widened(cfg.init_widen_rank, cfg.init_widen_decoder_rank)
        _check_init_shape(cfg, saved, comp.config)
    else:
        try:
            comp = SACCompressor(
                SACConfig(
                    base_model=cfg.base_model, ratio=cfg.ratio, chunk_len=cfg.chunk_len, lora_rank=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha, lora_target_modules=list(cfg.lora_target_modules),
                    anchor_embedding=cfg.anchor_embedding, anchor_strategy=cfg.anchor_strategy,
                    bidirectional=cfg.bidirectional, memory=cfg.memory,
                    decoder_lora_rank=cfg.decoder_lora_rank, decoder_lora_alpha=cfg.decoder_lora_alpha,
                ),
                device=device, dtype="float32",
            )
        except ValueError:  # peft's, e.g. for a target module the model lacks: name the ones it has
            from .models import load_base_model

            _check_target_modules(cfg, load_base_model(cfg.base_model, device="cpu", dtype="float32")[0])
            raise
        _check_target_modules(cfg, comp.base_model)  # peft skips a missing one if another is found
        if cfg.adapters_from and not resuming:  # a resumed run loads its own checkpoint
            start_adapters_from_full_ft(comp, cfg.adapters_from)
    if cfg.train_parts == "decoder" and not comp.config.decoder_lora_rank:
        raise SACError("train_parts='decoder' trains the decoder adapter, and this compressor has none: "
                       "add one with --decoder-lora-rank")
    for name, param in comp.named_parameters():
        part = "decoder" if ".decoder." in name else "encoder"  # peft: lora_A.decoder.weight is the decoder's
        param.requires_grad_(("lora_" in name or name == "anchor_embedding") and cfg.train_parts in ("all", part))
    if not any(param.requires_grad and param.numel() for param in comp.parameters()):
        shape = comp.config
        raise SACError(f"nothing to train: this compressor (lora_rank {shape.lora_rank}, anchor_embedding "
                       f"{shape.anchor_embedding!r}, decoder_lora_rank {shape.decoder_lora_rank}) has no weight that "
                       f"--train-parts {cfg.train_parts} trains; give it an encoder adapter (--lora-rank) or an "
                       f"anchor embedding (--anchor-embedding shared)")
    prefix = "" if cfg.stage == "pretrain" else comp.config.prompt.prefix + comp.config.prompt.context_prefix
    teacher = load_teacher(cfg.distill_teacher, comp, device) if cfg.distill_teacher else None
    objective = SACObjective(comp, prefix_text=prefix, distill_weight=cfg.distill_weight, ae_weight=cfg.ae_weight,
                             teacher=teacher, distill_tokens=cfg.distill_tokens,
                             hidden_weight=cfg.distill_hidden_weight, divergence=cfg.distill_divergence,
                             temperature=cfg.distill_temperature,
                             on_policy_tokens=cfg.distill_on_policy_tokens, risk_weight=cfg.risk_weight,
                             risk_samples=cfg.risk_samples, risk_max_tokens=cfg.risk_max_tokens,
                             weighting=cfg.loss_weighting)
    return comp.train(), objective  # its adapters' dropout on; the base model (the decoder too) stays in eval


def _max_positions(model) -> int | None:
    """The positions the base model reads (``max_position_embeddings``), or None if it states none."""
    base = model.model if isinstance(model, _FullFTModel) else model.base_model
    config = base.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def _explicit(cfg: TrainConfig, name: str) -> bool:
    """Whether an option was chosen: given as a flag, or set away from its default (a config file
    that restates a default, as a run's saved train_config.json does, chose nothing)."""
    return name in getattr(cfg, "given_on_command_line", ()) or _differs_from_default(cfg, name)


def _check_init_shape(cfg: TrainConfig, saved, now) -> None:
    """An init_from checkpoint brings its own shape: refuse a shape option chosen otherwise (the
    init_* options and an added decoder adapter change it on purpose: their result is accepted)."""
    def same(a, b) -> bool:
        return sorted(a) == sorted(b) if isinstance(a, list) else a == b

    names = [*_COMPRESSOR_SHAPE, "decoder_lora_rank"] + (["decoder_lora_alpha"] if cfg.decoder_lora_alpha else [])
    conflicts, restated = [], []
    for name in names:
        value = getattr(cfg, name)
        if same(value, getattr(saved, name)) or same(value, getattr(now, name)):
            continue
        if name == "decoder_lora_rank" and value == 0:
            continue  # 0 = add none; the checkpoint's adapter is kept
        if _explicit(cfg, name):
            conflicts.append(f"{_shown(cfg, name)} (the checkpoint has {name} {getattr(saved, name)!r})")
        elif name in getattr(cfg, "given_in_config_file", ()):
            restated.append(f"{name} {value!r} (the checkpoint's: {getattr(saved, name)!r})")
    if conflicts:
        raise InvalidInputError(f"--init-from {cfg.init_from} brings its own compressor shape, which these options "
                                f"would not change: {'; '.join(conflicts)}. Drop them, or change the checkpoint "
                                f"with --init-ratio / --init-widen-rank / --init-widen-decoder-rank / "
                                f"--init-anchor-strategy")
    if restated:
        logger.warning("the config file restates defaults that --init-from %s does not use: %s; the checkpoint's "
                       "values are trained", cfg.init_from, ", ".join(restated))


def _init_compressor(cfg: TrainConfig, device, resuming: bool = False):
    """The init_from checkpoint, in float32, on the base model it names; or on --base-model where that
    names another, which must be the same weights under another name or in another place (a local
    copy of a hub id, a directory that moved), else it is refused with both fingerprints. A resumed
    run reads it too (its shape and what is not trained come from it), which an error says if it is gone."""
    from .compressor import SACCompressor, checkpoint_meta
    from .fingerprint import base_model_fingerprint, same_base_model
    from .models import load_base_model

    try:
        meta = checkpoint_meta(cfg.init_from)
    except SACError as err:
        if not resuming:
            raise
        raise CheckpointError(f"--resume rebuilds the run's compressor from its --init-from {cfg.init_from} (as "
                              f"{Path(cfg.out_dir) / 'train_config.json'} records it) before loading the "
                              f"checkpoint, and that cannot be read ({err}): put that checkpoint back where it "
                              "was (the run is resumed with the options it started with)") from err
    if not _explicit(cfg, "base_model") or cfg.base_model == meta["config"].get("base_model"):
        return SACCompressor.from_pretrained(cfg.init_from, device=device, dtype="float32")
    model, tokenizer = load_base_model(cfg.base_model, device=device, dtype="float32")
    named = base_model_fingerprint(model, tokenizer)
    if not same_base_model(named, meta["base_fingerprint"]):
        raise FingerprintMismatchError(f"--init-from {cfg.init_from}", named, meta["base_fingerprint"],
                                       "drop --base-model (the checkpoint brings its own), or start from a "
                                       "checkpoint trained on that base model")
    comp = SACCompressor.from_pretrained(cfg.init_from, model=model, tokenizer=tokenizer)
    comp.config.base_model = model.sac_model_id  # where it is now: what the new checkpoint names
    return comp


def _check_full_ft_init_base(cfg: TrainConfig, base_fingerprint: str) -> None:
    """--method full_ft --init-from: the adapter must have been trained on --base-model's weights."""
    from .fingerprint import same_base_model

    try:
        recorded = json.loads((Path(cfg.init_from) / FULL_FT_META).read_text()).get("base_fingerprint")
    except (OSError, ValueError, AttributeError):
        return  # an adapter without sac_rag's metadata (e.g. trained elsewhere): nothing to compare
    if recorded and not same_base_model(recorded, base_fingerprint):
        raise FingerprintMismatchError(f"--init-from {cfg.init_from}", base_fingerprint, recorded,
                                       "set --base-model to the model the adapter was trained on")


def _check_full_ft_init_shape(cfg: TrainConfig) -> None:
    """--method full_ft --init-from: the adapter brings its rank, alpha and target modules."""
    try:
        peft = json.loads((Path(cfg.init_from) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return  # peft reports a missing or broken adapter itself
    theirs = {"lora_rank": peft.get("r"), "lora_alpha": peft.get("lora_alpha"),
              "lora_target_modules": sorted(peft.get("target_modules") or [])}
    conflicts = [f"--{_flag(name)} {getattr(cfg, name)} (the adapter has {theirs[name]})" for name in theirs
                 if _explicit(cfg, name) and theirs[name] is not None
                 and (sorted(getattr(cfg, name)) if name == "lora_target_modules" else getattr(cfg, name))
                 != theirs[name]]
    if conflicts:
        raise InvalidInputError(f"--init-from {cfg.init_from} brings its own LoRA shape, which these options would "
                                f"not change: {'; '.join(conflicts)}. Drop them")


def _check_target_modules(cfg: TrainConfig, base) -> None:
    """Refuse --lora-target-modules naming no module of the base model, listing the ones it has."""
    names = [name.removesuffix(".base_layer") for name, _ in base.named_modules() if "lora_" not in name]
    linear = sorted({name.removesuffix(".base_layer").rsplit(".", 1)[-1] for name, module in base.named_modules()
                     if "lora_" not in name and (isinstance(module, torch.nn.Linear)
                                                 or type(module).__name__ == "Conv1D")})
    missing = [m for m in cfg.lora_target_modules if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:
        raise InvalidInputError(f"--lora-target-modules: {', '.join(missing)} is not a module of {cfg.base_model}; "
                                f"its linear modules are {', '.join(linear)}")


def load_teacher(adapter_dir: str, comp, device: torch.device):
    """The distillation teacher: the compressor's base model with a Full-FT adapter merged in, as a
    separate frozen copy. Refused when the adapter was trained on another base model."""
    from peft import PeftModel

    from .models import load_base_model

    directory, _ = _full_ft_checkpoint(adapter_dir, comp, "distillation teacher")
    base, _ = load_base_model(comp.config.base_model, device=device, dtype="float32")
    teacher = PeftModel.from_pretrained(base, str(directory)).merge_and_unload().eval()
    teacher.requires_grad_(False)
    return teacher


def start_adapters_from_full_ft(comp, adapter_dir: str) -> None:
    """Copy a Full-FT adapter into the compressor's encoder adapter and, if it has one, its
    decoder adapter. The context's K/V are then the Full-FT model's, and the question is read by
    the Full-FT model: at ratio 1 with a causal encoder (before the mask anneal) this is Full-FT
    exactly, so training starts from the upper bound's reading and only has to learn to compress."""
    from safetensors.torch import load_file

    directory, meta = _full_ft_checkpoint(adapter_dir, comp, "adapters_from")
    peft_config = json.loads((directory / "adapter_config.json").read_text())
    cfg = comp.config
    theirs = (peft_config.get("r"), peft_config.get("lora_alpha"), sorted(peft_config.get("target_modules") or []))
    ours = [(cfg.lora_rank, cfg.lora_alpha, sorted(cfg.lora_target_modules))]
    if cfg.decoder_lora_rank:
        ours.append((cfg.decoder_lora_rank, cfg.decoder_lora_alpha or 2 * cfg.decoder_lora_rank,
                     sorted(cfg.lora_target_modules)))
    if any(shape != theirs for shape in ours):
        raise SACError(f"adapters_from {adapter_dir} has rank, alpha and target modules {theirs}, the compressor "
                       f"{ours}: set --lora-rank/--lora-alpha/--lora-target-modules (and the decoder's) to match")
    if meta.get("prompt") and PromptTemplate(**meta["prompt"]) != cfg.prompt:
        raise SACError(f"adapters_from {adapter_dir} was trained with another prompt layout than the compressor's")
    weights = load_file(directory / "adapter_model.safetensors")
    try:
        for adapter in ("default", "decoder") if cfg.decoder_lora_rank else ("default",):
            comp.set_adapter_weights(weights, adapter)
    except InvalidInputError as err:
        raise SACError(f"adapters_from {adapter_dir}: {err}") from err


def _full_ft_checkpoint(adapter_dir: str, comp, option: str) -> tuple[Path, dict]:
    """A Full-FT checkpoint directory and its metadata (prompt, base model), checked to be one
    and to share the compressor's base model."""
    from .fingerprint import same_base_model

    directory = Path(adapter_dir)
    if not (directory / "adapter_model.safetensors").exists() or not (directory / FULL_FT_META).exists():
        raise SACError(f"{option} {adapter_dir} is not a Full-FT checkpoint (it needs "
                       f"adapter_model.safetensors and {FULL_FT_META}): pass a checkpoint directory of "
                       f"python -m sac_rag.train --method full_ft")
    meta = json.loads((directory / FULL_FT_META).read_text())
    recorded = meta.get("base_fingerprint")
    if not recorded:
        raise SACError(f"{directory / FULL_FT_META} records no base-model fingerprint (written by an older "
                       f"sac_rag), so its base model cannot be checked: retrain the Full-FT checkpoint")
    if not same_base_model(recorded, comp.base_fingerprint):
        raise FingerprintMismatchError(f"{option} {adapter_dir}", comp.base_fingerprint, recorded,
                                       "train the Full-FT checkpoint on the compressor's base model")
    return directory, meta


def build_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    trained = model.model if cfg.method == "full_ft" else model
    named = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
    anchor = [p for n, p in named if n == "anchor_embedding"]
    lora = [p for n, p in named if n != "anchor_embedding"]
    groups = [{"params": lora, "lr": cfg.lr}]
    if anchor:
        groups.append({"params": anchor, "lr": cfg.anchor_lr or cfg.lr})
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup: int, max_steps: int = 0, decay_steps: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (paper, App. A); with ``decay_steps``,
    a linear decay to 0 over the last ``decay_steps`` of ``max_steps`` (step ``max_steps - 1``,
    the last one taken, still gets a small non-zero rate)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay_steps > 0:
        factor = min(factor, (max_steps - step) / decay_steps)
    return factor


# -- data ---------------------------------------------------------------------------------------


DATA_FORMATS = {
    "pretrain": TEXT_FORMATS,
    "finetune": "a SQuAD JSON file or a JSONL file of {\"context\", \"question\", \"answers\"} rows",
}


def _require_data(cfg: TrainConfig) -> None:
    """Refuse a missing --data (or --eval-data) file, or an --out-dir that is a file, before anything slow starts."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out-dir {out_dir} is a file, not a directory: name a directory for the run")
    if not cfg.data:
        raise InvalidInputError(f"--data is required for stage {cfg.stage!r}: {DATA_FORMATS[cfg.stage]} "
                                f"(.xz/.gz ok)")
    for option, path in (("--data", Path(cfg.data)), ("--eval-data", Path(cfg.eval_data) if cfg.eval_data else None)):
        if path and not path.is_file():
            problem = "is a directory, not a data file" if path.is_dir() else "does not exist"
            raise DataError(f"{option} {path} {problem}")
    if cfg.stage == "pretrain":
        check_text_format(cfg.data)


class ExampleStream:
    """Deterministic example order: epoch e is a seeded permutation; position = examples used.
    Resuming needs only the position."""

    def __init__(self, cfg: TrainConfig, tokenizer, template: PromptTemplate, stats: LoadStats,
                 max_positions: int | None = None):
        """Reads --data (and --eval-data, into ``held_out``); contexts longer than ``context_limit``
        tokens (--max-context-tokens, and what ``max_positions``, the model's, leave them) are split."""
        self.cfg = cfg
        self.stats = stats
        self.eval_stats = LoadStats()  # --eval-data's
        self.builder = ExampleBuilder(
            tokenizer, template, questions_per_context=cfg.questions_per_context, span_questions=cfg.span_questions,
            distractors=cfg.distractors,
            distractor_source=cfg.distractor_source, distractor_share=cfg.distractor_share,
            max_answer_tokens=cfg.max_answer_tokens,
            lm_min_tokens=cfg.lm_min_tokens, lm_max_tokens=cfg.lm_max_tokens, seed=cfg.seed,
        )
        self.held_out = []
        _require_data(cfg)
        if cfg.stage == "pretrain":
            if max_positions and cfg.lm_max_tokens + 1 > max_positions:  # a window and its end token
                raise InvalidInputError(f"--lm-max-tokens {cfg.lm_max_tokens} does not fit the model's "
                                        f"{max_positions} positions (a window and its end token): lower it to "
                                        f"{max_positions - 1} or less")
            self.items = list(iter_texts(cfg.data, stats))
            if stats.skipped and _is_main_process():
                logger.info("%s: skipped %s", cfg.data, stats.skipped)
            if self.items:
                self._check_documents(tokenizer)
        else:
            paragraphs = read_qa(cfg.data, stats)
            if cfg.eval_data:
                self.items = paragraphs
            else:
                self.items, self.held_out = split_by_title(paragraphs, cfg.held_out_fraction)
        if cfg.eval_data:
            self.held_out = read_qa(cfg.eval_data, self.eval_stats)
        self.context_limit = self._context_limit(tokenizer, template, max_positions)
        if self.context_limit:
            if cfg.stage == "finetune":
                self.items = self._split(self.items, tokenizer, stats, f"--data {cfg.data}")
            self.held_out = self._split(self.held_out, tokenizer, self.eval_stats if cfg.eval_data else stats,
                                        f"--eval-data {cfg.eval_data}" if cfg.eval_data else "held-out")
        if cfg.stage == "finetune" and stats.skipped and _is_main_process():
            logger.info("%s: skipped %s", cfg.data, stats.skipped)
        if cfg.eval_data and self.eval_stats.skipped and _is_main_process():
            # by reason: an empty context counts once, a question without an answer once per question
            logger.warning("--eval-data %s: skipped %s", cfg.eval_data, self.eval_stats.skipped)
        if cfg.eval_data and not self.held_out:
            raise DataError(f"--eval-data {cfg.eval_data} holds no usable question to evaluate on: records "
                            f"skipped: {self.eval_stats.skipped or 'none'}")
        if not self.items:
            held = (f"{len(self.held_out)} paragraph(s) held out for evaluation (--held-out-fraction "
                    f"{cfg.held_out_fraction}), " if cfg.stage == "finetune" and not cfg.eval_data else "")
            raise DataError(f"no usable training examples in {cfg.data}: {held}records skipped: "
                            f"{stats.skipped or 'none'}")
        self.position = 0
        self._order_epoch, self._order = -1, []

    def _context_limit(self, tokenizer, template: PromptTemplate, max_positions: int | None) -> int | None:
        """The most tokens a context may have: --max-context-tokens, and what the model's positions
        leave each passage beside the prompt head, the longest question, the answer (or the held-out
        evaluation's) and the distractors read with it. None = no limit."""
        cfg = self.cfg
        paragraphs = [*(self.items if cfg.stage == "finetune" else []), *self.held_out]
        limits = [cfg.max_context_tokens] if cfg.max_context_tokens else []
        if max_positions and paragraphs:
            prompts = [template.question.format(question=qa.question) for p in paragraphs for qa in p.questions]
            if cfg.span_questions:  # their cue is four words of the passage: room for long ones
                prompts.append(template.question.format(question=SPAN_QUESTION.format(cue=" ".join(["word"] * 4))))
            lengths = [len(ids) for start in range(0, len(prompts), 1024)
                       for ids in text_ids(tokenizer, prompts[start : start + 1024])]  # at least the ids read
            question = max(lengths) + (SPAN_CUE_ROOM if cfg.span_questions else 0)
            head = len(bos_ids(tokenizer)) + len(tokenizer(template.prefix + template.context_prefix,
                                                           add_special_tokens=False)["input_ids"])
            answer = max(cfg.max_answer_tokens + 1, EVAL_NEW_TOKENS)  # + 1: the end token
            passage = (max_positions - head - question - answer - POSITION_MARGIN) // (1 + cfg.distractors)
            if passage < MIN_CONTEXT_TOKENS:
                raise DataError(f"the model's {max_positions} positions leave {passage} tokens per passage beside "
                                f"the prompt ({head} tokens), the longest question ({question}), the answer "
                                f"({answer}) and {cfg.distractors} distractor(s): use shorter questions, fewer "
                                f"--distractors or a model with more positions")
            limits.append(passage)
        return min(limits) if limits else None

    def _split(self, paragraphs: list, tokenizer, stats: LoadStats, what: str) -> list:
        """``paragraphs`` with every context longer than ``context_limit`` split (``split_long_contexts``), logged."""
        kept, report = split_long_contexts(paragraphs, tokenizer, self.context_limit, stats)
        if report.contexts and _is_main_process():
            why = ("--max-context-tokens" if self.context_limit == self.cfg.max_context_tokens else
                   "what the model's positions leave a passage beside the prompt, question, answer and distractors")
            logger.info("%s: %d context(s) longer than %d tokens (%s) split into overlapping pieces: %d piece(s) "
                        "hold their questions; %d question(s) whose answer is in no piece skipped", what,
                        report.contexts, self.context_limit, why, report.pieces, report.questions_skipped)
        return kept

    def _check_documents(self, tokenizer) -> None:
        """Refuse documents of which none reaches lm_min_tokens (they would all be skipped, for ever),
        and say how many are skipped as too short, and how much of the long ones a window covers."""
        cfg, lengths = self.cfg, []
        for start in range(0, len(self.items), 256):  # the builder's tokenization, batched
            batch = text_ids(tokenizer, self.items[start : start + 256])
            lengths += [len(ids) for ids in batch]
        usable = sum(n >= cfg.lm_min_tokens for n in lengths)
        if not usable:
            raise DataError(f"no document in {cfg.data} reaches --lm-min-tokens {cfg.lm_min_tokens}: the longest "
                            f"of its {len(lengths)} documents has {max(lengths)} tokens. Lower --lm-min-tokens "
                            f"(>= {LM_MIN_TOKENS}) or use longer documents")
        if not _is_main_process():
            return
        if usable < len(lengths):
            logger.info("%d of %d documents are shorter than --lm-min-tokens %d and are skipped",
                        len(lengths) - usable, len(lengths), cfg.lm_min_tokens)
        long = [n for n in lengths if n > cfg.lm_max_tokens]
        if long:
            window = (cfg.lm_min_tokens + cfg.lm_max_tokens) / 2  # the mean of a uniform window length
            logger.info("%d of %d documents are longer than --lm-max-tokens %d (the longest has %d tokens): each "
                        "epoch trains on one random window of %d-%d tokens per document, about %.0f%% of those "
                        "documents' tokens", len(long), len(lengths), cfg.lm_max_tokens, max(long),
                        cfg.lm_min_tokens, cfg.lm_max_tokens, 100 * window * len(long) / sum(long))

    def _index(self, position: int) -> int:
        epoch, within = divmod(position, len(self.items))
        if epoch != self._order_epoch:
            self._order = list(range(len(self.items)))
            random.Random(self.cfg.seed + 7919 * epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order[within]

    def upcoming(self, n: int) -> list:
        """The items the next ``n`` positions read, without reading them (QA: one example per
        position, so these are the paragraphs of the next ``n`` examples)."""
        return [self.items[self._index(p)] for p in range(self.position, self.position + n)]

    def next_batch(self, n: int, rank: int, world: int) -> list:
        """The next ``n`` usable examples; this rank's share (every world-th)."""
        batch, skipped_in_a_row = [], 0
        while len(batch) < n:
            position = self.position
            self.position += 1
            item = self.items[self._index(position)]
            if self.cfg.stage == "pretrain":
                example = self.builder.lm(item, position)
                if example is None:
                    self.stats.skip(f"document shorter than {self.cfg.lm_min_tokens} tokens")
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= len(self.items):  # a full pass, and nothing usable
                        raise DataError(f"no document in {self.cfg.data} reaches --lm-min-tokens "
                                        f"{self.cfg.lm_min_tokens}: a full pass over its {len(self.items)} "
                                        f"documents found none")
                    continue
                skipped_in_a_row = 0
            else:
                example = self.builder.qa(item, position, self.items)
            batch.append(example)
        # Contiguous blocks, so that ranks see the same micro-batches a single process would.
        share = len(batch) // world
        return batch[rank * share : (rank + 1) * share]


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_qa(generator, template: PromptTemplate, paragraphs, n_questions: int, compress=None,
                max_new_tokens: int = EVAL_NEW_TOKENS, seed: int = 0) -> dict:
    """SQuAD EM/F1 on a seeded subset: one question per paragraph, contexts compressed with
    ``compress(text) -> list[AnchorKV]`` or read as text when ``compress`` is None."""
    from .generation import GenerationConfig
    from .metrics import summarize

    rng = random.Random(seed)
    chosen = rng.sample(paragraphs, min(n_questions, len(paragraphs)))
    predictions, golds = [], []
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop=("\n",))
    # EVAL_BATCH prompts decoded together (32 held-out questions took 1/1.25 of the time one at a time took)
    for start in range(0, len(chosen), EVAL_BATCH):
        prompts = []
        for para in chosen[start:start + EVAL_BATCH]:
            qa = para.questions[rng.randrange(len(para.questions))]
            context = compress(para.context) if compress else para.context
            prompts.append(template.build([context], qa.question))
            golds.append(qa.answers)
        predictions += [r.text.strip() for r in generator.generate_batch(prompts, config)]
    return summarize(predictions, golds) | {"examples": list(zip(predictions[:5], [g[0] for g in golds[:5]]))}


# -- checkpoints --------------------------------------------------------------------------------


def publish_dir(target: Path, write) -> None:
    """Fill ``target`` atomically: ``write(staging)`` fills a staging directory beside it, whose
    files are synced before it takes ``target``'s place. An old ``target`` is swapped with it in one
    step where the file system can (Linux), so a reader (an evaluation of ``best/``, a server on
    ``final/``) never finds ``target`` missing, and the old one, then in staging, is removed.
    Elsewhere the old one is first renamed aside: a kill between the two renames leaves it aside,
    which ``remove_stale_staging`` puts back. A kill never leaves a half-written ``target``."""
    staging = target.parent / f".staging-{target.name}-{os.getpid()}"
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    _fsync_files(staging)
    if target.exists() and exchange_paths(staging, target):
        old = staging
    else:
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


_LEFTOVER = re.compile(r"\.(staging|old)-(.+)-(\d+)")


def remove_stale_staging(out_dir: Path) -> None:
    """Clean up after killed processes: remove the ``.staging-*`` directories ``publish_dir`` left,
    and put back an old directory set aside (``.old-*``) whose replacement never arrived. Only the
    leftovers of processes no longer alive are touched (and this process's own, as it publishes
    nothing yet), so a run started by mistake beside a live one does not break it."""
    for parent in (out_dir, out_dir / "checkpoints", out_dir / "snapshots"):
        leftovers = [(p, _LEFTOVER.fullmatch(p.name)) for p in parent.glob(".*-*")] if parent.is_dir() else []
        for path, match in leftovers:
            if not match or _pid_alive(int(match[3])):
                continue
            target = parent / match[2]
            if match[1] == "old" and not target.exists():
                os.rename(path, target)
                logger.info("restored %s, which a killed process had set aside", target)
            else:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed %s, left by a killed process", path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def rng_states(world: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG states (CPU, and the GPU's when training on one), gathered on every rank
    (a collective: all ranks call it). Each rank draws its own numbers (sampled answers, say), so a
    resumed rank must go on from its own state, not rank 0's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out_dir: Path, step: int, model, optimizer, stream: ExampleStream, best: float, cfg: TrainConfig,
                    rngs: list[dict[str, torch.Tensor]] | None = None):
    """Write checkpoints/step-N atomically, then point `latest` at it. ``rngs``: every rank's RNG
    states (``rng_states``; default: this process's alone)."""
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        state = optimizer.state_dict()
        tensors, layout = {}, {}
        for index, per_param in state["state"].items():
            layout[str(index)] = {}
            for key, value in per_param.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
                    layout[str(index)][key] = "tensor"
                else:
                    layout[str(index)][key] = value
        ranks = rngs or [{"cpu": torch.get_rng_state()}]
        tensors["torch_rng"] = ranks[0]["cpu"].clone()  # rank 0's, also where older versions look
        for r, rank_rngs in enumerate(ranks):
            for kind, value in rank_rngs.items():
                tensors[f"{kind}_rng.rank{r}"] = value.cpu()
        save_file(tensors, staging / "optimizer.safetensors")
        trainer_state = {
            "step": step, "position": stream.position, "best_f1": best, "param_groups": state["param_groups"],
            "layout": layout, "python_rng": repr(random.getstate()), "skipped": stream.stats.skipped,
            "config": dataclasses.asdict(cfg),
        }
        atomic_write(staging / "trainer_state.json", json.dumps(trainer_state).encode())

    final = out_dir / "checkpoints" / f"step-{step:07d}"
    publish_dir(final, write)
    atomic_write(out_dir / "latest", final.name.encode())
    # The newest keep_checkpoints - 1 others stay beside it (a killed run may have left a later step-N).
    others = sorted(p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith("step-") and p != final)
    for old in others[: max(0, len(others) - (cfg.keep_checkpoints - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, model, optimizer, stream: ExampleStream, rank: int = 0,
                    device: torch.device | None = None) -> tuple[int, float]:
    """Restore the run in ``out_dir`` from the checkpoint `latest` names: weights, optimizer, data
    position, and this rank's RNG states (rank 0's if the checkpoint has none of its own, e.g. when
    the run had fewer ranks); returns (step, best F1)."""
    from ast import literal_eval

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = (out_dir / "latest").read_text().strip()
    directory = out_dir / "checkpoints" / name
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
        model.load_weights(directory)
        tensors = load_file(directory / "optimizer.safetensors")
        rank0 = tensors.pop("torch_rng")
        rngs = {key: tensors.pop(key) for key in [k for k in tensors if re.fullmatch(r"\w+_rng\.rank\d+", k)]}
        torch.set_rng_state(rngs.get(f"cpu_rng.rank{rank}", rank0))
        if device is not None and device.type == "cuda" and f"cuda_rng.rank{rank}" in rngs:
            torch.cuda.set_rng_state(rngs[f"cuda_rng.rank{rank}"], device)
        opt_state = {"state": {}, "param_groups": state["param_groups"]}
        for index, keys in state["layout"].items():
            opt_state["state"][int(index)] = {
                k: tensors[f"{index}.{k}"] if v == "tensor" else v for k, v in keys.items()
            }
        optimizer.load_state_dict(opt_state)
        random.setstate(literal_eval(state["python_rng"]))
        stream.position = state["position"]
        stream.stats.skipped = state["skipped"]
        return state["step"], state["best_f1"]
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, SyntaxError, RuntimeError,
            SafetensorError) as err:
        raise CheckpointError(_unreadable_checkpoint(out_dir, directory, err)) from err


def _unreadable_checkpoint(out_dir: Path, directory: Path, err: Exception) -> str:
    """What went wrong with the checkpoint ``latest`` names, and how to resume from an older one."""
    message = f"cannot resume from checkpoint {directory}: it is unreadable or incomplete ({type(err).__name__}: {err})"
    older = sorted(p for p in (out_dir / "checkpoints").glob("step-*")
                   if p.name < directory.name and (p / "trainer_state.json").is_file())
    if not older:
        return f"{message}; no older checkpoint is kept: start the run again in a new --out-dir"
    return (f"{message}. An older checkpoint is kept, {older[-1]}: to resume from it, write its name into "
            f"{out_dir / 'latest'} (echo {older[-1].name} > {out_dir / 'latest'}) and rerun with --resume")


def _fsync_files(path: Path) -> None:
    """Flush every file in ``path`` to disk (before the directory is renamed into place)."""
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())


def _saved_config(out_dir: Path) -> dict:
    """The settings the run in ``out_dir`` went on with: its train_config.json or, if that is gone or
    unreadable, those its latest checkpoint recorded."""
    path = out_dir / "train_config.json"
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict):
            return saved
        problem = f"holds a JSON {type(saved).__name__}, not an object of options"
    except (OSError, ValueError) as err:
        problem = f"cannot be read ({type(err).__name__}: {err})"
    latest = out_dir / "checkpoints" / (out_dir / "latest").read_text().strip() / "trainer_state.json"
    try:
        saved = json.loads(latest.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot resume {out_dir}: its {path.name} {problem}, and its latest checkpoint "
                              f"records no configuration either ({latest}: {type(err).__name__}: {err})") from err
    logger.warning("%s %s: checking the options against those recorded in %s", path, problem, latest.parent)
    return saved


def _same_option(name: str, saved, current) -> bool:
    if saved == current:
        return True
    if name in _PATH_OPTIONS and isinstance(saved, str) and isinstance(current, str) and saved and current:
        try:  # the same file under another spelling (from this directory)
            return os.path.samefile(saved, current)
        except OSError:
            return False
    return False


def _with_recorded_paths(cfg: TrainConfig, recorded: dict) -> TrainConfig:
    """``cfg`` with the path options given under another spelling of the same file spelled as the run
    recorded them (which resolve here too): the run's records, and a checkpoint's base model, stay as
    they were."""
    if not recorded:
        return cfg
    respelled = dataclasses.replace(cfg, **recorded)
    respelled.given_on_command_line = getattr(cfg, "given_on_command_line", frozenset())
    respelled.given_in_config_file = getattr(cfg, "given_in_config_file", frozenset())
    return respelled


def _check_resumable(out_dir: Path, cfg: TrainConfig) -> dict:
    """Refuse to resume ``out_dir`` with options that change the run; returns the path options given
    under another spelling of the same file, with the spelling the run recorded."""
    saved = _saved_config(out_dir)
    current = dataclasses.asdict(cfg)
    # Options added after a run started were at their defaults in it, or at what a new default replaced.
    saved = {**_BEFORE_OPTION_EXISTED, **saved}
    try:
        saved = {**dataclasses.asdict(TrainConfig(**{k: v for k, v in saved.items() if k in current})), **saved}
    except (SACError, TypeError) as err:
        raise SACError(f"cannot resume {out_dir}: its recorded configuration is not one this version accepts "
                       f"({err}); use another --out-dir") from err
    resumable = _RESUMABLE_CHANGES | (_RESUMABLE_BY_EXAMPLE if cfg.loss_weighting == "example" else set())
    differ = {k for k in current if k not in resumable and not _same_option(k, saved.get(k), current[k])}
    if differ:
        raise SACError(
            f"cannot resume {out_dir}: it was started with a different configuration "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {current[k]!r}' for k in sorted(differ))}); "
            f"use another --out-dir or the original settings"
        )
    return {k: saved[k] for k in _PATH_OPTIONS if saved.get(k) != current[k]}


DATA_RECORD = "data.json"  # in a run's directory: the data files it reads, by option (data_identity)


def data_identity(cfg: TrainConfig) -> dict:
    """The size and SHA-256 digest of the --data and --eval-data files, by option: a checkpoint's data
    position counts examples of these files, so a run resumes only on the same bytes."""
    identity = {}
    for option in ("data", "eval_data"):
        path = getattr(cfg, option)
        if path:
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            identity[option] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    return identity


def _check_same_data(out_dir: Path, data: dict) -> None:
    """Refuse to resume ``out_dir`` on data files whose contents differ from those it started on (a run
    started before they were recorded is not checked)."""
    path = out_dir / DATA_RECORD
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    changed = sorted(o for o in set(saved) | set(data) if saved.get(o) != data.get(o))
    if changed:
        def digest(record: dict | None) -> str:
            return f"sha256 {record['sha256'][:12]}, {record['bytes']} bytes" if record else "none"

        raise SACError(
            f"cannot resume {out_dir}: "
            + "; ".join(f"the --{o.replace('_', '-')} file changed since the run started ({digest(saved.get(o))} -> "
                        f"{digest(data.get(o))})" for o in changed)
            + ". The checkpoint's data position counts examples of the file it started on: restore that file, "
            "or start a new run in another --out-dir")


def drop_metrics_after(out_dir: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the rows past ``step``: those of a killed run's
    steps after its last checkpoint, which the resumed run writes again (and a line a kill cut short)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept).encode())


def plot_metrics(out_dir: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the [train] extra; without it the curves stay in metrics.jsonl only
        if not getattr(plot_metrics, "warned", False):
            logger.warning("matplotlib is not installed (pip install 'sac-rag[train]'): no loss_curve.png")
            plot_metrics.warned = True
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_f1" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.6, alpha=0.5, label="loss")
        window = round(len(train) ** 0.5)  # 8 steps of a 60-step run, 32 of 1,000: a trend through the noise
        if window > 1:
            recent = [[r["loss"] for r in train[max(0, i + 1 - window):i + 1]] for i in range(len(train))]
            smooth = [sum(losses) / len(losses) for losses in recent]  # the mean of the last `window` steps
            ax.plot([r["step"] for r in train], smooth, lw=1.5, label=f"loss (mean of the last {window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    lines = ax.get_lines()
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_f1"] for r in evals], "o-", color="tab:red", label="held-out F1")
        ax2.set_ylabel("held-out SQuAD F1")
        lines += ax2.get_lines()
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(out_dir.name)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out_dir / "loss_curve.png", png.getvalue())


# -- the loop -----------------------------------------------------------------------------------


# Per-micro-batch statistics that are token counts (summed over a step); the rest are means.
SUMMED_STATS = ("target_tokens", "distilled_tokens", "on_policy_tokens", "risk_candidates", "input_tokens")


def _reduce_step_stats(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The step's statistics over all ranks: token counts summed, means averaged (every rank holds
    an equal share of the batch, so this is the mean one process computes over the same batch)."""
    if world == 1:
        return stats
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(stats))
    names = sorted(set().union(*keys))  # a rank may lack a statistic (e.g. no distilled row): it adds 0
    values = torch.tensor([float(stats.get(k, 0.0)) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    reduced = {k: float(v) if k in SUMMED_STATS else float(v) / world for k, v in zip(names, values.tolist())}
    return {k: reduced[k] for k in [*stats, *(k for k in names if k not in stats)]}


class _rng_kept:
    """Restore the Python and torch RNGs (CPU and the device's) on exit."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.python, self.cpu = random.getstate(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def __exit__(self, *exc):
        random.setstate(self.python)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def train(cfg: TrainConfig) -> Path:
    rank, world, device = _setup_distributed(cfg)
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise SACError(f"batch_size {cfg.batch_size} must split evenly into {world} ranks x micro_batch_size")
    _require_data(cfg)  # before the model loads
    with _run_lock(out_dir) if is_main else contextlib.nullcontext():
        return _train(cfg, rank, world, device)


@contextlib.contextmanager
def _run_lock(out_dir: Path):
    """Held by the run's main process while it trains into ``out_dir`` (created here): a second
    run into the same directory (a ``--resume`` started beside a live run, say, or beside workers
    a killed launcher left behind) is refused instead of writing the same checkpoints and log."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidInputError(f"--out-dir {out_dir} cannot be created: {err.strerror or err}") from err
    if not HAVE_FILE_LOCKS:  # pragma: no cover - Windows: nothing to lock with
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(FileLock(out_dir / RUN_LOCK, wait=False))
        except BlockingIOError:
            raise SACError(f"another process is training into {out_dir} (it holds {out_dir / RUN_LOCK}; "
                           f"`fuser -v {out_dir / RUN_LOCK}` names it): wait for it to end or stop it, then "
                           "--resume, or choose another --out-dir") from None
        yield


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    from tqdm.auto import tqdm

    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    if is_main:
        remove_stale_staging(out_dir)
        for warning in idle_options(cfg):
            logger.warning(warning)

    resuming = cfg.resume and (out_dir / "latest").exists()
    if not cfg.resume and (out_dir / "latest").exists():  # before the model loads and the data is read
        raise SACError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out-dir")
    data = data_identity(cfg)
    if resuming:  # before the model loads: a changed option, or data file, is refused at once
        cfg = _with_recorded_paths(cfg, _check_resumable(out_dir, cfg))
        _check_same_data(out_dir, data)

    model, objective = build_model(cfg, device, resuming)  # --resume with nothing to resume starts fresh
    tokenizer = model.tokenizer
    template = model.template if cfg.method == "full_ft" else model.config.prompt
    params = objective.parameters()
    optimizer = build_optimizer(cfg, model)
    stats = LoadStats()
    stream = ExampleStream(cfg, tokenizer, template, stats, _max_positions(model))
    held_out = stream.held_out
    if is_main and held_out and cfg.eval_every and len(held_out) < cfg.eval_questions:
        logger.info("held-out evaluation: %d questions, one per held-out paragraph (fewer than --eval-questions %d)",
                    len(held_out), cfg.eval_questions)

    step, best = 0, -1.0
    if cfg.resume and not resuming:
        # benchmarks/ablations.sh passes --resume to start-or-continue: so a warning, not an error
        logger.warning("--resume: nothing to resume, %s holds no checkpoint (no %s): starting a fresh run",
                       out_dir, out_dir / "latest")
    if resuming:
        step, best = load_checkpoint(out_dir, model, optimizer, stream, rank, device)
        if step > cfg.max_steps:  # before anything is written: the run stays as it was
            raise SACError(f"cannot resume {out_dir} with --max-steps {cfg.max_steps}: its latest checkpoint is "
                           f"already at step {step}. Pass --max-steps {step} or more")
        logger.info("resumed %s at step %d (example %d)", out_dir, step, stream.position)
    if is_main:
        drop_metrics_after(out_dir, step)  # a fresh run starts a clean log; a resumed one repeats no step
        # the settings the run goes on with (on resume, e.g. a new --max-steps), as a fresh run takes them
        atomic_write(out_dir / "train_config.json",
                     json.dumps(dataclasses.asdict(dataclasses.replace(cfg, resume=False)), indent=2).encode())
        atomic_write(out_dir / DATA_RECORD, json.dumps(data, indent=2).encode())
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_is_fast(device))
    if is_main:
        n_trainable = sum(p.numel() for p in params)
        logger.info("training %s (%s), %d trainable parameters, %d examples, world %d, %s",
                    cfg.method, cfg.stage, n_trainable, len(stream.items), world,
                    "bf16 autocast" if use_bf16 else "fp32")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    per_rank = cfg.batch_size // world
    metrics = open(out_dir / "metrics.jsonl", "a") if is_main else None
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc=f"{cfg.method}/{cfg.stage}", unit="step")
    tokens_seen, t0 = 0, time.time()  # tokens the trained model read on this process: passages, prompts, answers

    def evaluate(step: int) -> None:
        """Held-out F1 at ``step``; a new best is published to best/ before the checkpoint of the
        same step is saved, so that checkpoint records the F1 best/ holds."""
        nonlocal best
        if not held_out or not is_main:
            return
        from .compressor import evaluating

        if cfg.method == "full_ft":
            with evaluating(model.model):
                result = evaluate_qa(model.generator(), template, held_out, cfg.eval_questions, seed=cfg.seed)
        else:
            from .generation import Generator

            with evaluating(model):  # and back: the frozen base model (the decoder) stays out of training mode
                result = evaluate_qa(Generator.from_compressor(model), template, held_out, cfg.eval_questions,
                                     compress=model.compress, seed=cfg.seed)
        row = {"step": step, "eval_f1": result["f1"], "eval_em": result["em"], "eval_n": result["n"],
               "eval_examples": result["examples"]}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        bar.write(f"step {step}: held-out F1 {result['f1']:.1f} EM {result['em']:.1f} (n={result['n']}) "
                  f"e.g. {result['examples'][:2]}")
        if result["f1"] > best:
            best = result["f1"]

            def write_best(directory: Path) -> None:  # the weights and what they scored, published together
                model.save_pretrained(directory)
                atomic_write(directory / BEST_EVAL, json.dumps({k: v for k, v in row.items()
                                                                 if k != "eval_examples"}).encode())

            publish_dir(out_dir / "best", write_best)

    while step < cfg.max_steps:
        examples = stream.next_batch(cfg.batch_size, rank, world)
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.lr_decay_steps)
        for group, base_lr in zip(optimizer.param_groups, [cfg.lr, cfg.anchor_lr or cfg.lr]):
            group["lr"] = base_lr * factor
        future_bias = 0.0
        if cfg.bidir_anneal_steps > 0:
            future_bias = cfg.bidir_anneal_start_bias * max(0.0, 1 - step / cfg.bidir_anneal_steps)
        optimizer.zero_grad(set_to_none=True)
        step_stats: dict[str, float] = {}
        for start in range(0, per_rank, cfg.micro_batch_size):
            micro = examples[start : start + cfg.micro_batch_size]
            with autocast:
                loss, stats_ = objective.loss(micro, future_bias=future_bias)
            (loss * len(micro) / per_rank).backward()
            for k, v in stats_.items():
                share = 1.0 if k in SUMMED_STATS else len(micro) / per_rank
                step_stats[k] = step_stats.get(k, 0.0) + v * share
        _average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        step_stats = _reduce_step_stats(step_stats, world, device)  # the whole batch's, as one process logs them
        tokens_seen += int(step_stats["input_tokens"])
        if is_main:
            row = {"step": step, **step_stats, "lr": cfg.lr * factor, "grad_norm": float(grad_norm),
                   "future_bias": future_bias, "examples_seen": stream.position, "time": time.time() - t0}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()  # readable as the run goes; a resume drops the rows past its checkpoint
            bar.set_postfix(loss=f"{step_stats['loss']:.3f}", lr=f"{cfg.lr * factor:.1e}",
                            tok_s=f"{tokens_seen / max(1e-9, time.time() - t0):.0f}")
            bar.update(1)
        if not math.isfinite(step_stats["loss"]):  # the reduced loss: every rank stops
            raise SACError(f"loss became {step_stats['loss']} at step {step}: lower the learning rate")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            evaluate(step)
        elif step == cfg.max_steps:
            # the end-of-run evaluation, before this step's checkpoint so that it records the best F1;
            # the RNG is kept as it was, so the checkpoint (and a run resumed from it) is as before
            with _rng_kept(device):
                evaluate(step)
        if is_main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            publish_dir(out_dir / "snapshots" / f"step-{step:07d}", model.save_pretrained)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            rngs = rng_states(world, device)  # every rank's, gathered by all
            if is_main:
                save_checkpoint(out_dir, step, model, optimizer, stream, best, cfg, rngs)
                plot_metrics(out_dir)
        if world > 1:
            dist.barrier()
    if is_main:
        publish_dir(out_dir / "final", model.save_pretrained)
        metrics.close()
        plot_metrics(out_dir)
        if stats.skipped:
            logger.info("skipped examples: %s%s", stats.skipped, " (a short document counted each time a pass "
                        "over the data met it)" if cfg.stage == "pretrain" else "")
    bar.close()
    if world > 1:
        _check_ranks_agree(model, world)
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
        # Free the group's last references now, while the interpreter is whole: a gloo group
        # destroyed during interpreter finalization can abort the process after a good run.
        gc.collect()
    return out_dir / "final"


def main(argv: list[str] | None = None) -> int:
    """The command line; a SACError (bad options, data or checkpoint) ends it with a one-line
    ``error: ...`` (see ``exit_with_message``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_config(argv))
    return 0


if __name__ == "__main__":
    exit_with_message(main)
