"""Answer-quality and cost evaluation: ``python -m sac_rag.eval --help``.

Every method answers the same seeded questions with the same base model, prompt template and
decoding settings, through the same ``Generator`` code path; only what the decoder reads
differs. Results are JSON rows (one per method x dataset) appended to ``--results``; the
per-example predictions are cached so an interrupted run resumes where it stopped (and a cache
made with other settings is refused, see ``claim_predictions``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import PromptTemplate, SACConfig, text_ids
from .data import DEFAULT_HELD_OUT_FRACTION, read_qa, split_by_title
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import InvalidInputError, SACError, exit_with_message
from .files import append_jsonl, is_json_object, open_for_appending, user_path
from .fingerprint import compressor_tag, same_base_model
from .generation import GenerationConfig, Generator
from .metrics import summarize
from .quantize import round_trip

logger = logging.getLogger("sac_rag.eval")


@dataclass(frozen=True)
class Dataset:
    """A named question set: a SQuAD-format file under ``--data-root``, or, with
    ``held_out_fraction``, only the articles of it that ``python -m sac_rag.train`` holds out by
    default (``split_by_title``): questions no compressor trained on that file has seen."""

    path: str
    held_out_fraction: float = 0.0


DATASETS = {
    "squad-dev": Dataset("squad-v1.1/dev-v1.1.json.xz"),
    "squad-train-heldout": Dataset("squad-v1.1/train-v1.1.json.xz", held_out_fraction=DEFAULT_HELD_OUT_FRACTION),
    "squadshifts-new-wiki": Dataset("squadshifts/new_wiki_v1.0.json.xz"),
}
DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum`` (argparse names the option when it is not)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def distinct_counts(text: str) -> list[int]:
    """An argparse ``type``: distinct whole numbers >= 1, comma-separated ("1,3,10")."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if any(k < 1 for k in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers >= 1, got {text!r}")
    return counts


@dataclass
class Question:
    """A question, its gold answers and gold paragraph; ``passages`` are what the prompt reads
    instead of the gold paragraph when set (e.g. the top-k retrieved paragraphs in the RAG
    setting, each compressed or shortened on its own)."""

    id: str
    question: str
    answers: list[str]
    context: str
    passages: tuple[str, ...] = ()

    @property
    def read(self) -> tuple[str, ...]:
        """The passages the prompt reads, in order."""
        return self.passages or (self.context,)


def load_questions(path: str | Path, n: int, seed: int, skip: int = 0,
                   held_out_fraction: float = 0.0) -> list[Question]:
    """A fixed, seeded subset of ``n`` questions (all of them when n <= 0). Subsets are nested:
    the first 200 of a seed are also the first 200 of its 1,000, so rows of different sizes
    compare on shared questions. ``skip`` starts after that many questions of the seeded order: a
    subset disjoint from the first ``skip``, for choosing settings that are then read on those.
    ``held_out_fraction`` > 0 reads only the articles training holds out of ``path`` at that
    fraction (``split_by_title``)."""
    paragraphs = read_qa(path)
    if held_out_fraction > 0:
        paragraphs = split_by_title(paragraphs, held_out_fraction)[1]
    questions = [
        Question(qa.id, qa.question, qa.answers, para.context)
        for para in paragraphs for qa in para.questions
    ]
    if n < 0:
        raise InvalidInputError(f"n={n}: give a subset size >= 1, or 0 for all {len(questions)} questions")
    if not questions:
        raise InvalidInputError(f"{path} holds no question with an answer: nothing to evaluate")
    random.Random(seed).shuffle(questions)
    if skip < 0 or (skip and skip >= len(questions)):
        raise InvalidInputError(f"skip={skip}: {path} has {len(questions)} questions; skip fewer")
    questions = questions[skip:]
    return questions[:n] if n > 0 else questions


def add_subset_arguments(parser: argparse.ArgumentParser, n_default: int | None = None) -> None:
    """``--dataset``, ``--data-root``, ``--n`` (required unless ``n_default``), ``--seed`` and
    ``--skip``: which seeded question subset a command reads (see ``load_questions``)."""
    parser.add_argument("--dataset", default="squad-dev", choices=sorted(DATASETS))
    parser.add_argument("--data-root", type=user_path, default="../shared/data",
                        help="folder holding the datasets' files (squad-v1.1/, squadshifts/; default: %(default)s, "
                             "relative to the current directory: where this project's machines keep them)")
    parser.add_argument("--n", type=at_least(0), default=n_default, required=n_default is None,
                        help="seeded subset size (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", type=at_least(0), default=0,
                        help="start after this many questions of the seeded order (a subset disjoint from them)")


def dataset_path(data_root: str | Path, name: str) -> Path:
    """The file of the dataset ``name`` (a key of ``DATASETS``) under ``data_root``, refused when missing."""
    path = Path(data_root) / DATASETS[name].path
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist: set --data-root to the folder that holds "
                                f"{DATASETS[name].path} (the {name} questions)")
    return path


def dataset_questions(data_root: str | Path, name: str, n: int, seed: int, skip: int = 0) -> list[Question]:
    """``load_questions`` of the dataset ``name`` (a key of ``DATASETS``) under ``data_root``."""
    return load_questions(dataset_path(data_root, name), n, seed, skip,
                          held_out_fraction=DATASETS[name].held_out_fraction)


def subset_questions(args: argparse.Namespace) -> list[Question]:
    """The subset the arguments of ``add_subset_arguments`` name."""
    return dataset_questions(args.data_root, args.dataset, args.n, args.seed, args.skip)


@dataclass
class Method:
    """One way of answering: a generator, and how a context becomes a prompt segment."""

    name: str
    ratio: int
    generator: Generator
    template: PromptTemplate
    compressor: object = None  # SACCompressor when contexts are compressed
    read_context: bool = True
    storage: str = "native"  # "fp8"/"int8": compressed contexts pass through 8-bit storage
    shorten: Callable[[str], str] | None = None  # hard text compression of the context

    def prompts(self, batch: list[Question]) -> list[list]:
        if not self.read_context:
            return self.contrast_prompts(batch)
        if self.compressor is None:
            shorten = self.shorten or (lambda text: text)
            return [self.template.build([shorten(p) for p in q.read], q.question) for q in batch]
        texts = [p for q in batch for p in q.read]
        compressed = self.compressor.compress_batch(texts, batch_size=len(texts))
        if self.storage != "native":
            compressed = [[round_trip(kv, self.storage) for kv in chunks] for chunks in compressed]
        prompts, start = [], 0
        for q in batch:
            prompts.append(self.template.build(compressed[start : start + len(q.read)], q.question))
            start += len(q.read)
        return prompts

    def contrast_prompts(self, batch: list[Question]) -> list[list]:
        """The prompts without their contexts (what context-aware decoding contrasts with)."""
        return [self.template.build([], q.question) for q in batch]


DEFAULT_BASE_MODEL = "smollm2-135m"  # what the methods but sac read with unless --base-model names another
METHODS = ("sac", "kv_dropping", "full_context", "full_ft", "no_context", "text_every_rth", "text_truncate")


def build_method(name: str, base_model: str | None, ratio: int | None, checkpoint: str | None, device, dtype,
                 decoder_adapter: str | None = None, anchor_strategy: str | None = None,
                 merge_decoder: bool = False, refine_steps: int | None = None,
                 refine_lr: float | None = None) -> Method:
    """``sac`` (a compressor checkpoint), ``kv_dropping`` (untrained anchors, causal, no adapter),
    ``full_context`` (frozen decoder, text), ``full_ft`` (decoder LoRA checkpoint, text),
    ``no_context``, and hard text compression to 1/``ratio`` of the context's tokens:
    ``text_every_rth`` (keep every r-th token) and ``text_truncate`` (keep the first tokens).
    ``ratio`` defaults to 5; for ``sac`` it defaults to the checkpoint's, and another value
    evaluates the trained weights at that ratio (``retarget_ratio``: how much of a gap is the
    compression itself). ``anchor_strategy`` likewise places the anchors of ``sac`` by another
    strategy than the one it was trained with (``SACCompressor.use_anchors``). ``refine_steps`` and
    ``refine_lr`` refine each chunk of ``sac`` after encoding it (``sac_rag.refine``), where given.

    ``decoder_adapter`` (a peft LoRA directory, e.g. the Full-FT one) makes the decoder of the
    baselines the QA-trained one, so that answer format is equal and only content differs; the
    K/V of ``kv_dropping`` still come from the frozen model. ``merge_decoder`` decodes with every
    decoder adapter merged into a copy of the weights (faster; the same answers up to rounding)."""
    from .compressor import SACCompressor
    from .models import load_base_model

    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r}; choose from {METHODS}")
    if name == "sac":  # on its checkpoint's base model, or on ``base_model`` (checked against the checkpoint)
        from .pipeline import load_compressor

        comp = load_compressor(checkpoint, device, dtype, base_model)
        if ratio is not None and ratio != comp.config.ratio:
            comp.retarget_ratio(ratio)
        if anchor_strategy is not None and anchor_strategy != comp.config.anchor_strategy:
            comp.use_anchors(anchor_strategy)
        comp.config.set_refinement(refine_steps, refine_lr)
        return Method(name, comp.config.ratio, Generator.from_compressor(comp, merge_decoder), comp.config.prompt, comp)
    ratio = 5 if ratio is None else ratio
    base_model = base_model or DEFAULT_BASE_MODEL
    if name == "full_ft":
        decoder_adapter = checkpoint
    model, tokenizer = load_base_model(base_model, device=device, dtype=dtype)
    generator = Generator(model, tokenizer)
    if decoder_adapter:
        decoder = load_decoder_adapter(load_base_model(base_model, device=device, dtype=dtype)[0], decoder_adapter,
                                       base_model, generator.base_fingerprint)
        if merge_decoder:
            decoder = decoder.merge_and_unload()
        generator = Generator(decoder, tokenizer, base_fingerprint=generator.base_fingerprint)
    if name == "kv_dropping":
        comp = SACCompressor(SACConfig(base_model=base_model, ratio=ratio, lora_rank=0, bidirectional=False,
                                       anchor_embedding="none"), model=model, tokenizer=tokenizer)
        return Method(name, ratio, generator if decoder_adapter else Generator.from_compressor(comp),
                      comp.config.prompt, comp)
    if name in ("text_every_rth", "text_truncate"):
        return Method(name, ratio, generator, PromptTemplate(), shorten=TextShortener(tokenizer, ratio, name))
    return Method(name, 1, generator, PromptTemplate(), read_context=name != "no_context")


def load_decoder_adapter(model, adapter: str, base_model: str, base_fingerprint: str):
    """``model`` with the peft LoRA ``adapter`` on it, in eval mode; an adapter made for another base
    model is refused naming both: by the base-model fingerprint a Full-FT checkpoint records
    (``sac_full_ft.json``), else by weights that do not fit ``model``."""
    from peft import PeftModel

    from .errors import FingerprintMismatchError
    from .fingerprint import FLOAT16_HINT, known_base

    meta = Path(adapter) / "sac_full_ft.json"
    record = json.loads(meta.read_text()) if meta.is_file() else {}
    dtype = model.get_input_embeddings().weight.dtype
    if record.get("base_fingerprint") and known_base(base_fingerprint, record, dtype) is None:
        hint = f". {FLOAT16_HINT}" if dtype == torch.float16 else ""
        raise FingerprintMismatchError(f"the decoder adapter {adapter}", base_fingerprint, record["base_fingerprint"],
                                       "pass --base-model of the model it was trained on, or another adapter" + hint)
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except ValueError as err:
        if "adapter_config.json" in str(err) and not (Path(adapter) / "adapter_config.json").is_file():
            # peft's "Can't find 'adapter_config.json' at ...": no such folder, nor a hub id reached
            raise InvalidInputError(f"the decoder adapter {adapter}: no peft LoRA adapter was found there ({err}); "
                                    f"pass {ADAPTER_FOLDER}") from None
        raise InvalidInputError(f"the decoder adapter {adapter} does not fit the base model {base_model} ({err}); "
                                "pass --base-model of the model it was trained on") from None
    except RuntimeError as err:  # e.g. "size mismatch for ...lora_A...": LoRA weights of another architecture
        raise InvalidInputError(f"the decoder adapter {adapter} does not fit the base model {base_model} (it was "
                                f"trained on another model: {str(err).strip().splitlines()[-1].strip()}); pass "
                                "--base-model of the model it was trained on") from None


ADAPTER_FOLDER = "the folder of a peft LoRA adapter (with adapter_config.json), e.g. the Full-FT decoder's"


def decoder_adapter_problem(adapter: str) -> str | None:
    """Why ``adapter`` cannot be a decoder adapter, found without loading anything (None if it may
    be one): a folder without ``adapter_config.json`` (a compressor, a Full-FT training run's
    folder rather than its ``final/``), a file, a built-in compressor's name, or a path that can
    only be local and does not exist. A name that may be a hub id is left to peft to look up."""
    from .compressor import list_pretrained
    from .models import _is_local_path

    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        return None
    if path.is_dir():
        if (path / "final" / "adapter_config.json").is_file():
            return f"is a training run's folder: pass its final/ ({path / 'final'}) or best/"
        if _is_compressor(path):
            return "holds no adapter_config.json: it is a compressor, not a decoder adapter"
        return f"holds no adapter_config.json: pass {ADAPTER_FOLDER}"
    if path.exists():
        return f"is a file: pass {ADAPTER_FOLDER}"
    if adapter in list_pretrained():
        return "is a built-in compressor, not a decoder adapter"
    if _is_local_path(adapter):
        return f"does not exist: pass {ADAPTER_FOLDER}"
    return None


def _is_compressor(path: Path) -> bool:
    """Whether ``path`` holds a compressor checkpoint (its weights, or a variant's config.json alone)."""
    from .compressor import WEIGHTS_FILE, checkpoint_meta

    try:
        checkpoint_meta(path)
    except SACError:
        return (path / WEIGHTS_FILE).is_file()  # one whose config.json is damaged is still no adapter
    return True


@dataclass
class TextShortener:
    """Hard text compression to a token budget (stand-in for the LLMLingua family): keep every
    ``ratio``-th token of the context, or its first ``len / ratio`` tokens."""

    tokenizer: object
    ratio: int
    how: str

    def __call__(self, text: str) -> str:
        ids = text_ids(self.tokenizer, text)
        budget = max(1, -(-len(ids) // self.ratio))  # the anchor count of uniform SAC anchors
        kept = ids[:: self.ratio][:budget] if self.how == "text_every_rth" else ids[:budget]
        return self.tokenizer.decode(kept)


def made_by(compressor) -> str:
    """Tag for prediction caches of compressed methods: a short hash of the compressor's
    fingerprint, so that retraining never reuses stale predictions ("" without a compressor)."""
    return f"-{compressor_tag(compressor.fingerprint)}" if compressor is not None else ""


def prediction_cache(results: str | Path, label: str, compressor, dtype: str, dataset: str, n: int,
                     seed: int, skip: int = 0) -> Path:
    """Where a row's per-question predictions are cached, beside its results file: named by the
    row, the compressor (``made_by``), the dtype when it is not bfloat16 (the default, untagged, so
    that answers computed in two dtypes never mix in one row), the dataset, n, seed and skip."""
    dtype_tag = "" if dtype == "bfloat16" else f"-{dtype}"
    skip_tag = f"-k{skip}" if skip else ""
    name = f"{label}{made_by(compressor)}{dtype_tag}-{dataset}-n{n}-s{seed}{skip_tag}.jsonl"
    return Path(results).parent / "predictions" / name


def read_predictions(cache_path: Path) -> dict[str, str]:
    """Question id -> cached prediction (``{"id", "prediction"}`` JSON lines after an optional
    ``{"settings": ...}`` header line, see ``claim_predictions``; none if missing). A last line
    without its newline is a write cut short (a killed run): it is not a prediction, and the next
    run answers its question again (``open_for_appending`` drops it). Any other line that is not
    a prediction is an error naming the file and line (e.g. a results file given as predictions)."""
    cache_path = Path(cache_path)
    if not cache_path.exists():
        return {}
    predictions = {}
    lines, _ = json_lines(cache_path.read_text())  # an unfinished last line is no prediction
    for number, line, row in lines:
        if isinstance(row, dict) and "settings" in row and number == 1:
            continue
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("prediction"), str)):
            raise InvalidInputError(f"{cache_path}:{number} is not a cached prediction ({line[:60]!r}): a "
                                    "prediction file holds {\"id\", \"prediction\"} JSON lines, as python -m "
                                    "sac_rag.eval writes them beside its results")
        predictions[row["id"]] = row["prediction"]
    return predictions


def json_lines(text: str) -> tuple[list[tuple[int, str, object]], str]:
    """The complete, non-blank lines of a JSONL text as ``(line number, line, its JSON value or None
    if it is not JSON)``, and the unfinished last line ("" when the text ends in a newline or in a
    whole JSON object, a row that lost only its newline, as ``files.open_for_appending`` keeps it;
    else a write cut short, e.g. by a kill)."""
    lines = text.split("\n")
    unfinished = lines.pop()
    if is_json_object(unfinished):
        lines.append(unfinished)
        unfinished = ""
    parsed = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                parsed.append((number, line, json.loads(line)))
            except ValueError:
                parsed.append((number, line, None))
    return parsed, unfinished


# The settings that set a decoding apart besides ``extractive`` (``decoding_tags``' other parameters;
# a result row stores each under its name, and ``extractive`` as ``decoding``).
DECODING_SETTINGS = ("num_beams", "length_penalty", "mbr", "mbr_samples", "context_contrast", "contrast_plausibility")


def prediction_settings(method: Method, config: GenerationConfig, adapter: str | None = None,
                        merge_decoder: bool = False) -> dict[str, Any]:
    """Everything that changes a method's answers and that its prediction file's name may not
    hold (``prediction_cache`` names the label, compressor, dtype and question subset): the
    method, its ratio, the base model's fingerprint, the decoder adapter's (``adapter_fingerprint``),
    the storage, a merged decoder and the decoding settings."""
    decoding = ("max_new_tokens", "extractive", *DECODING_SETTINGS)
    return {"method": method.name, "ratio": method.ratio, "base_model": method.generator.base_fingerprint,
            "adapter": adapter_fingerprint(adapter) if adapter else None, "storage": method.storage,
            "merge_decoder": merge_decoder, **{name: getattr(config, name) for name in decoding}}


def adapter_fingerprint(adapter: str) -> str:
    """``"<adapter>@<hash>"``: a short hash of a peft adapter directory's ``adapter_*`` files (its
    config and weights), so that an adapter retrained in place never reuses predictions; the name
    as given when it is no such directory (e.g. a hub id)."""
    files = sorted(Path(adapter).glob("adapter_*")) if Path(adapter).is_dir() else []
    if not files:
        return adapter
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return f"{adapter}@{digest.hexdigest()[:16]}"


def same_setting(name: str, recorded: Any, current: Any) -> bool:
    """Whether two values of a prediction setting give the same answers: fingerprints are compared
    by their hash (the same weights under another name or path are the same)."""
    if name == "base_model" and recorded and current:
        return same_base_model(recorded, current)
    if name == "adapter" and recorded and current:
        return recorded.rsplit("@", 1)[-1] == current.rsplit("@", 1)[-1]
    return recorded == current


def claim_predictions(cache_path: Path, settings: dict[str, Any],
                      other_file: str = "give this run another --label") -> None:
    """Hold ``cache_path`` to predictions made with ``settings`` (``prediction_settings``): a new
    (or empty) file gets them as its first line, ``{"settings": {...}}``; a file whose first line
    holds other settings is refused, naming each differing setting and both values, since its
    predictions would be scored as this run's (``other_file`` says how the caller's command gets a
    file of its own). A file without that line (written before settings were recorded) is reused
    as before: its settings are unknown, and no header is added to it."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"settings": settings}) + "\n"
    try:  # created here only if no other run has created it meanwhile (never truncated under one)
        with open(cache_path, "x") as file:
            file.write(header)
        return
    except FileExistsError:
        pass
    with open(cache_path) as file:
        first = file.readline()
    if not first.endswith("\n"):  # empty, or a header cut short by a kill: nothing was answered yet
        cache_path.write_text(header)
        return
    try:
        recorded = json.loads(first)
    except ValueError:
        recorded = None
    recorded = recorded.get("settings") if isinstance(recorded, dict) else None
    if recorded is None:
        return
    differing = [name for name in sorted(recorded.keys() | settings.keys())
                 if not same_setting(name, recorded.get(name), settings.get(name))]
    if differing:
        def values(of: dict) -> str:
            return ", ".join(f"{name}={of.get(name)!r}" for name in differing)

        raise InvalidInputError(
            f"{cache_path} holds predictions made with {values(recorded)}, but this run has {values(settings)}: "
            f"{other_file}, or delete that file to answer its questions again")


def predictions_for(cache_path: Path, questions: list[Question]) -> list[str]:
    """The cached prediction of every question, in order; an error naming what is missing
    (for scripts that compare finished runs)."""
    if not Path(cache_path).is_file():
        raise InvalidInputError(f"{cache_path} is not a file: name a prediction file that python -m sac_rag.eval "
                                "wrote (beside its results, under predictions/)")
    predictions = read_predictions(cache_path)
    missing = [q.id for q in questions if q.id not in predictions]
    if missing and len(missing) == len(questions) and predictions:
        raise InvalidInputError(f"{cache_path} holds {len(predictions)} predictions, none for these {len(questions)} "
                                f"questions (e.g. {missing[0]}): it was made on another dataset, seed or --skip; "
                                "pass the ones it was made with (its file name says them)")
    if missing:
        raise InvalidInputError(f"{cache_path} lacks {len(missing)} of the {len(questions)} questions "
                                f"(e.g. {missing[0]}); run its eval command to completion first")
    return [predictions[q.id] for q in questions]


def answer_config(max_new_tokens: int = 32, **decoding: Any) -> GenerationConfig:
    """How every benchmark answers: one line of at most ``max_new_tokens``, greedy unless
    ``decoding`` (``extractive``, ``num_beams``, ``length_penalty``, ``mbr``, ``mbr_samples``,
    ``context_contrast``) says otherwise; sampled answers are seeded (0), so a read can be repeated."""
    return GenerationConfig(max_new_tokens=max_new_tokens, stop=("\n",), seed=0, **decoding)


def decoding_tags(extractive: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
                  mbr: bool = False, context_contrast: float = 0.0, contrast_plausibility: float = 0.1,
                  mbr_samples: int = 0) -> list[str]:
    """What sets a decoding apart from greedy free decoding, as row-name suffixes (``extractive``,
    ``beam4``, ``lp0``, ``mbr``, ``samples16``, ``cad0.5``, ``plausible0``), so that its predictions and
    scores never mix with another decoding's."""
    contrast = [f"cad{context_contrast:g}", *([f"plausible{contrast_plausibility:g}"]
                                                if contrast_plausibility != 0.1 else [])] if context_contrast else []
    return [*(["extractive"] if extractive else []), *([f"beam{num_beams}"] if num_beams > 1 else []),
            *([f"lp{length_penalty:g}"] if length_penalty != 1.0 else []), *(["mbr"] if mbr else []),
            *([f"samples{mbr_samples}"] if mbr_samples else []), *contrast]


def decoding_suffix(**decoding: Any) -> str:
    """``decoding_tags(**decoding)`` as one row-name suffix (``-beam4-lp0``; empty for greedy free
    decoding)."""
    return "".join(f"-{tag}" for tag in decoding_tags(**decoding))


def run(method: Method, questions: list[Question], dataset: str, batch_size: int, cache_path: Path,
        config: GenerationConfig | None = None) -> dict:
    """Answer all questions (resuming from ``cache_path``, which ``claim_predictions`` should hold
    to this method's settings) with ``config`` (``answer_config()`` by
    default; extractive decoding holds each answer to the passages its question reads) and score them."""
    from tqdm.auto import tqdm

    config = config or answer_config()
    done = read_predictions(cache_path)
    todo = [q for q in questions if q.id not in done]
    with open_for_appending(cache_path) as cache, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                              desc=f"{method.name} {dataset}", unit="q") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            with torch.no_grad():
                sources = [list(q.read) for q in batch] if config.extractive else None
                contrast = method.contrast_prompts(batch) if config.context_contrast else None
                results = method.generator.generate_batch(method.prompts(batch), config, sources, contrast)
            for q, r in zip(batch, results):
                done[q.id] = r.text.strip()
                cache.write(json.dumps({"id": q.id, "prediction": done[q.id]}) + "\n")
            cache.flush()
            bar.update(len(batch))
    return summarize([done[q.id] for q in questions], [q.answers for q in questions])


def measure_costs(method: Method, questions: list[Question], samples: int = 10, new_tokens: int = 16) -> dict:
    """Batch-1 costs on the first ``samples`` questions: compression time per chunk, time to
    first token (compression excluded, prefill included), decode tokens/s, K/V bytes held.

    Decode speed is timed over ``new_tokens`` - 1 steps for every method: the answer goes on past
    its end token. Timed to its end instead, a method whose answers end after two tokens would
    leave its one or two steps to the noise of the two prefills the figure is the difference of.

    These are the method's costs, timed greedily whatever decoding its row answers with (the row says
    so: ``costs_timed_with``); a beam search's whole-answer time is ``benchmarks/rag_squad.py``'s
    ``answer_s``."""
    config = GenerationConfig(max_new_tokens=1)
    compress_s, ttft_s, decode_tps, kv_bytes, chunks = [], [], [], [], 0
    for q in questions[:samples]:
        t0 = time.perf_counter()
        prompt = method.prompts([q])[0]
        t1 = time.perf_counter()
        method.generator.generate(prompt, config)  # its first token: the time to it
        t2 = time.perf_counter()
        with _past_end_tokens(method.generator):
            longer = method.generator.generate(prompt, GenerationConfig(max_new_tokens=new_tokens))
        t3 = time.perf_counter()
        if method.compressor is not None:
            n_chunks = sum(1 for seg in prompt if not isinstance(seg, str))
            chunks += n_chunks
            compress_s.append((t1 - t0) / max(1, n_chunks))
        ttft_s.append(t2 - t1)
        extra = max(1, len(longer.token_ids) - 1)  # the steps after the first token
        decode_tps.append(extra / max(1e-9, (t3 - t2) - (t2 - t1)))
        entry_bytes = kv_entry_bytes(method.generator.model, method.generator.dtype)
        kv_bytes.append(entry_bytes * (longer.text_tokens + longer.cached_tokens))
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    return {
        "compress_s_per_chunk": median(compress_s),
        "ttft_s": median(ttft_s),
        "decode_tokens_per_s": median(decode_tps),
        "kv_bytes_per_query": median(kv_bytes),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timing_samples": min(samples, len(questions)),
        "costs_timed_with": "greedy decoding",
    }


@contextlib.contextmanager
def _past_end_tokens(generator: Generator) -> Iterator[None]:
    """Context in which ``generator``'s answers do not stop at an end token (only at their length)."""
    ends, generator.eos_token_ids = generator.eos_token_ids, set()
    try:
        yield
    finally:
        generator.eos_token_ids = ends


def kv_entry_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of one position's K/V across all layers of ``model`` held in ``dtype``."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize


def check_results_file(path: str | Path) -> None:
    """Refuse, before any model loads, a ``--results`` path that a row cannot be appended to as a
    JSON line: a folder, a file that cannot be written, or a file holding anything but JSON rows
    (the row would be lost after the whole run, or would corrupt another kind of file)."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"--results {path} is a folder: name a .jsonl file (rows are appended to it)")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise InvalidInputError(f"--results {path}: {folder} is not a folder")
    if not path.exists():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InvalidInputError(f"--results {path}: the folder {folder} is not writable")
        return
    if not os.access(path, os.W_OK):
        raise InvalidInputError(f"--results {path} is not writable: make it writable or name another file")
    lines, unfinished = json_lines(path.read_text(errors="replace"))
    for number, line, row in lines:
        if not isinstance(row, dict):
            raise InvalidInputError(f"--results {path} is not a JSON-lines file of result rows (line {number}: "
                                    f"{line[:60]!r}): name a .jsonl file of rows, or a new one")
        if set(row) in ({"id", "prediction"}, {"settings"}):  # a prediction cache's rows, or its header
            raise InvalidInputError(f"--results {path} is a file of cached predictions (line {number}: "
                                    f"{line[:60]!r}), which a result row would corrupt: name a results file, "
                                    "e.g. one beside the predictions/ folder")
    if unfinished and not lines:  # one line cut short, or another kind of file
        raise InvalidInputError(f"--results {path} is not a JSON-lines file of result rows ({unfinished[:60]!r}): "
                                "name a .jsonl file of rows, or a new one")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model loads, an option the method needs but lacks or would ignore."""
    from .compressor import list_pretrained

    needs = {"sac": f"a compressor directory or a built-in compressor ({', '.join(list_pretrained()) or 'none'})",
             "full_ft": "the Full-FT decoder adapter directory (peft LoRA)"}
    if args.method in needs and not args.checkpoint:
        parser.error(f"--method {args.method} needs --checkpoint: {needs[args.method]}")
    if args.checkpoint and args.method not in needs:
        parser.error("--checkpoint applies to --method sac and full_ft (another method's decoder: --decoder-adapter)")
    if args.decoder_adapter and args.method in needs:
        parser.error(f"--decoder-adapter does not apply to --method {args.method} (full_ft reads its adapter from "
                     "--checkpoint; sac decodes with the compressor's own)")
    if args.ratio is not None and args.method in ("full_context", "full_ft", "no_context"):
        parser.error(f"--ratio does not apply to --method {args.method} (it reads the whole context, or none)")
    if args.anchor_strategy and args.method != "sac":
        parser.error("--anchor-strategy applies to --method sac")
    if (args.refine_steps is not None or args.refine_lr is not None) and args.method != "sac":
        parser.error("--refine-steps and --refine-lr apply to --method sac")
    if args.refine_lr is not None and not 0 < args.refine_lr < float("inf"):
        parser.error(f"--refine-lr must be a positive number, got {args.refine_lr}")
    if args.storage != "native" and args.method not in ("sac", "kv_dropping"):
        parser.error("--storage applies to methods that read compressed contexts (sac, kv_dropping)")
    if args.num_beams == 1 and (args.length_penalty != 1.0 or args.mbr):
        parser.error("--length-penalty and --mbr apply to beam search (--num-beams > 1)")
    if args.merge_decoder and args.method not in needs and not args.decoder_adapter:
        parser.error(f"--merge-decoder applies to a decoder adapter: --method sac or full_ft, or --method "
                     f"{args.method} with --decoder-adapter (without one there is nothing to merge)")
    if args.contrast_plausibility != parser.get_default("contrast_plausibility") and not args.context_contrast:
        parser.error("--contrast-plausibility applies to context-aware decoding: give --context-contrast > 0 too")
    if args.context_contrast and args.method == "no_context":
        parser.error("--context-contrast does not apply to --method no_context (it weighs what the contexts say "
                     "against the question alone, and no_context reads the question alone)")
    for option, adapter in (("--checkpoint", args.checkpoint if args.method == "full_ft" else None),
                            ("--decoder-adapter", args.decoder_adapter)):
        problem = adapter and decoder_adapter_problem(adapter)
        if problem:
            parser.error(f"{option} {adapter} {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sac_rag.eval", description=__doc__)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--checkpoint", type=user_path,
                        help="compressor directory (sac) or adapter directory (full_ft)")
    parser.add_argument("--label", help="name of the row in the results (default: the method)")
    parser.add_argument("--base-model", default=None,
                        help=f"the model the methods read with (default {DEFAULT_BASE_MODEL}); for sac, the model "
                             "to load the compressor on instead of the one its checkpoint names (e.g. after that "
                             "directory moved; the weights are checked against the checkpoint's fingerprint)")
    parser.add_argument("--ratio", type=at_least(1), help="kv_dropping and the text_* methods: default 5; sac: default "
                        "the checkpoint's, another value evaluates its weights at that ratio")
    parser.add_argument("--anchor-strategy", help="sac: place anchors by this strategy instead of the trained one "
                        "(sac_rag.anchors, e.g. rarest_in_block)")
    parser.add_argument("--refine-steps", type=at_least(0), help="sac: refine each compressed chunk by this many "
                        "steps (sac_rag.refine; default: the checkpoint's setting, 0 = none; labels get '-refineN')")
    parser.add_argument("--refine-lr", type=float, help="sac: the refinement's learning rate (default: the "
                        "checkpoint's, else 0.01)")
    parser.add_argument("--decoder-adapter", type=user_path,
                        help="peft LoRA directory for the decoder of kv_dropping, text_* or "
                        "full_context (e.g. the Full-FT adapter: equal answer format, only content differs)")
    parser.add_argument("--merge-decoder", action="store_true",
                        help="decode with the decoder adapter (sac, full_ft, --decoder-adapter) merged into a copy "
                             "of the weights: faster, the same answers up to rounding (labels get '-merged')")
    parser.add_argument("--storage", default="native", choices=["native", "fp8", "int8"],
                        help="sac/kv_dropping: read the caches as an fp8/int8 store returns them")
    add_subset_arguments(parser, n_default=1000)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=32)
    parser.add_argument("--extractive", action="store_true",
                        help="extractive decoding: each answer is a verbatim span of the passages it reads")
    parser.add_argument("--num-beams", type=at_least(1), default=1,
                        help="beam search over this many answers instead of greedy decoding (free decoding either way)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: a finished answer scores its summed log-probability / length ** this")
    parser.add_argument("--mbr", action="store_true",
                        help="beam search: answer with the finished answer that agrees best with the others "
                             "(minimum Bayes risk, expected word-overlap F1) instead of the top-scored one")
    parser.add_argument("--mbr-samples", type=at_least(0), default=0,
                        help="with --mbr: also sample this many answers (temperature 1, seed 0) and score every "
                             "beam and sample by its mean F1 against the samples (0: weigh the beams instead)")
    parser.add_argument("--context-contrast", type=float, default=0.0,
                        help="context-aware decoding: score each token by (1 + a) log p(token | prompt) - "
                             "a log p(token | question alone), favouring what the contexts say (0: off)")
    parser.add_argument("--contrast-plausibility", type=float, default=0.1,
                        help="context-aware decoding: only tokens at least this fraction as likely as the "
                             "likeliest (given the contexts) can be chosen")
    parser.add_argument("--timing-samples", type=at_least(0), default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="bfloat16 (the committed rows'), float32 (much faster on CPUs without native bf16, "
                             "see sac_rag.devices.bf16_is_fast), float16, or auto; predictions computed in "
                             "another dtype than bfloat16 are cached apart")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a machine shared with other jobs)")
    parser.add_argument("--results", type=user_path, default="benchmarks/results/quality.jsonl",
                        help="JSON-lines file the result row is appended to (default: %(default)s, under the "
                             "current directory: this repository's results when run from its root); the "
                             "predictions are cached in predictions/ beside it")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    check_results_file(args.results)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    label = args.label or "-".join([args.method, *([args.storage] if args.storage != "native" else []),
                                    *(["adapted-decoder"] if args.decoder_adapter else [])])
    decoding = dict(extractive=args.extractive, num_beams=args.num_beams, length_penalty=args.length_penalty,
                    mbr=args.mbr, context_contrast=args.context_contrast,
                    contrast_plausibility=args.contrast_plausibility, mbr_samples=args.mbr_samples)
    try:
        config = answer_config(args.max_new_tokens, **decoding)
    except InvalidInputError as error:
        parser.error(str(error))
    for tag in [*decoding_tags(**decoding), *(["merged"] if args.merge_decoder else [])]:
        if tag not in label:
            label += f"-{tag}"

    questions = subset_questions(args)
    dtype = dtype_name(resolve_dtype(args.dtype, resolve_device(args.device)))
    method = build_method(args.method, args.base_model, args.ratio, args.checkpoint, args.device, dtype,
                          args.decoder_adapter, args.anchor_strategy, args.merge_decoder, args.refine_steps,
                          args.refine_lr)
    refine_steps = method.compressor.config.refine_steps if method.compressor is not None else 0
    if args.refine_lr is not None and not refine_steps:
        parser.error(f"--refine-lr sets the rate of refinement, which {args.checkpoint} does not do: give "
                     "--refine-steps too")
    if refine_steps and f"refine{refine_steps}" not in label:
        label += f"-refine{refine_steps}"
    method.storage = args.storage
    cache = prediction_cache(args.results, label, method.compressor, dtype, args.dataset, len(questions), args.seed,
                             args.skip)
    adapter = args.checkpoint if args.method == "full_ft" else args.decoder_adapter
    claim_predictions(cache, prediction_settings(method, config, adapter, args.merge_decoder))
    t_start, cached = time.time(), len(read_predictions(cache))
    scores = run(method, questions, args.dataset, args.batch_size, cache, config)
    costs = measure_costs(method, questions, args.timing_samples) if args.timing_samples else {}
    row = {
        "method": label, "ratio": method.ratio, "dataset": args.dataset, "n": scores.pop("n"),
        **scores, **costs, "seed": args.seed, "skip": args.skip,
        # sac decodes with its compressor's base model: the checkpoint's, or --base-model's where it was loaded on it
        "base_model": method.compressor.config.base_model if args.method == "sac" else
        args.base_model or DEFAULT_BASE_MODEL,
        "checkpoint": args.checkpoint, "decoder_adapter": args.decoder_adapter,
        "anchor_strategy": method.compressor.config.anchor_strategy if method.compressor is not None else None,
        **({"refine_steps": refine_steps, "refine_lr": method.compressor.config.refine_lr} if refine_steps else {}),
        "compressor_fingerprint": method.compressor.fingerprint if method.compressor is not None else None,
        "dtype": dtype, "storage": args.storage, "decoding": "extractive" if args.extractive else "free",
        "num_beams": args.num_beams, "length_penalty": args.length_penalty, "mbr": args.mbr,
        "mbr_samples": args.mbr_samples,
        "merge_decoder": args.merge_decoder,
        "context_contrast": args.context_contrast, "contrast_plausibility": args.contrast_plausibility,
        # Wall time of this command (answering and timing samples) and how many answers it
        # generated rather than read from the prediction cache; the load says how busy the host was.
        "wall_s": round(time.time() - t_start, 1), "newly_answered": max(0, len(questions) - cached),
        "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
        "command": "python -m sac_rag.eval " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    append_jsonl(args.results, [row])
    print(json.dumps({k: row[k] for k in ("method", "ratio", "dataset", "n", "f1", "em", "f1_ci")}))
    return 0


if __name__ == "__main__":
    exit_with_message(main)
