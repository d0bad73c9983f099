"""NVIDIA kvpress peer baselines on the same questions, prompt and decoding as ``sac_rag.eval``.

Run it with the separate venv of this folder (kvpress needs transformers<5.3):

    HF_HUB_OFFLINE=1 benchmarks/kvpress/.venv/bin/python benchmarks/kvpress/run_kvpress.py --n 200

For every decoder x press x ratio it answers the seeded SQuAD-dev subset of
``sac_rag.eval.load_questions`` (nested subsets, same seed) with the prompt layout of
``sac_rag.config.PromptTemplate``: the context part (prefix + "### Context:\\n" + context) is
prefilled under the press, which prunes its K/V to a fraction 1/r (kvpress compression_ratio =
1 - 1/r); the question part ("\\n### Question:\\n{q}\\n### Answer:\\n") is then read uncompressed
at the positions that follow the original context (as kvpress's own pipeline does), and the
answer is decoded greedily (max 32 new tokens, cut at the first newline, stripped). Scores come
from ``sac_rag.metrics.summarize``, exactly as in ``sac_rag.eval.run``. Costs (batch 1, on the
first --timing-samples questions): time to first token including prefill and press, decode
tokens/s, K/V bytes held when the answer is decoded, peak RSS.

Decoders: ``frozen`` (SmolLM2-135M as is) and ``full-ft`` (the QA-trained decoder LoRA, merged
into the weights before kvpress sees the model). Press ``none`` is a no-compression control
that must reproduce sac_rag.eval's full-context / full_ft answers.

Per-example predictions are cached in <results dir>/predictions/<label>-<dataset>-n<N>-s<seed>.jsonl,
so an interrupted run resumes; a new file's first line records the settings that made it (press,
ratio, decoder, dtype, base model, adapter, kvpress version), and a run with other settings is
refused instead of reusing its answers (files from before that line are reused); one JSON row
per (decoder, press, ratio) is appended to --results.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT = Path("../shared/data")  # as python -m sac_rag.eval: run from the repository root
DEFAULT_ADAPTER = REPO / "benchmarks/checkpoints/full-ft-smollm2-135m-squad"
PRESSES = ("snapkv", "streamingllm", "knorm", "expected_attention", "none")
DECODERS = ("frozen", "full-ft")

logger = logging.getLogger("kvpress_bench")


def make_press(name: str, compression_ratio: float):
    import kvpress

    if name == "none":
        return None
    cls = {
        "snapkv": kvpress.SnapKVPress,
        "streamingllm": kvpress.StreamingLLMPress,
        "knorm": kvpress.KnormPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
    }[name]
    return cls(compression_ratio=compression_ratio)


def load_decoder(name: str, base_model: str, dtype: torch.dtype, adapter: Path):
    """The decoder, its tokenizer and the base model's fingerprint (taken before an adapter is merged)."""
    from sac_rag.fingerprint import base_model_fingerprint
    from sac_rag.models import load_base_model

    if name == "frozen":
        model, tokenizer = load_base_model(base_model, device="cpu", dtype=dtype)
        fingerprint = base_model_fingerprint(model, tokenizer)
    else:
        from peft import PeftModel

        # Merge in fp32, then cast: one rounding of W + BA instead of a bf16 sum.
        model, tokenizer = load_base_model(base_model, device="cpu", dtype=torch.float32)
        fingerprint = base_model_fingerprint(model, tokenizer)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model = model.to(dtype)
    return model.eval(), tokenizer, fingerprint


class Runner:
    """Prefill the context under a press, read the question, decode greedily (kvpress's
    pipeline ``_forward`` + ``generate_answer``, with our tokenization and a newline stop)."""

    def __init__(self, model, tokenizer, template):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos.discard(None)
        from sac_rag.eval import kv_entry_bytes

        cfg = model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        # keys + values of one head at one position (presses keep different counts per head)
        self.head_entry_bytes = kv_entry_bytes(model, model.dtype) // (self.layers * self.kv_heads)

    def split(self, question) -> tuple[list[int], list[int]]:
        """Token ids of the compressed part and of the uncompressed question part: the same
        strings ``PromptTemplate.build(passages, question)`` yields, split after the last passage
        (the gold paragraph, or the retrieved ones in the RAG setting)."""
        (prompt,) = self.template.build(list(question.read), question.question)
        passages = self.template.context_separator.join(question.read)
        head = self.template.prefix + self.template.context_prefix + passages
        assert prompt.startswith(head)
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return enc(head), enc(prompt[len(head):])

    @torch.no_grad()
    def answer(self, question, press, max_new_tokens: int, stop_at_newline: bool = True) -> dict:
        from transformers import DynamicCache

        ctx_ids, q_ids = self.split(question)
        ctx = torch.tensor([ctx_ids])
        t0 = time.perf_counter()
        cache = DynamicCache()
        window_reduced = False
        if press is not None and hasattr(press, "window_size") and len(ctx_ids) <= press.window_size:
            # SnapKV asserts context > window (64); a few SQuAD paragraphs are shorter.
            press = type(press)(compression_ratio=press.compression_ratio, window_size=len(ctx_ids) // 2,
                                kernel_size=press.kernel_size)
            window_reduced = True
        with press(self.model) if press is not None else _null():
            self.model.model(input_ids=ctx, past_key_values=cache)
        kept = sum(cache.layers[i].keys.shape[-2] * cache.layers[i].keys.shape[-3] for i in range(len(cache)))
        position = len(ctx_ids)
        positions = torch.arange(position, position + len(q_ids)).unsqueeze(0)
        out = self.model(input_ids=torch.tensor([q_ids]), past_key_values=cache, position_ids=positions,
                         logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        # K/V entries held when decoding starts: kept context entries + question entries
        # (sac_rag.eval counts prompt text tokens + spliced anchors the same way).
        held_entries = sum(cache.layers[i].keys.shape[-2] * cache.layers[i].keys.shape[-3]
                           for i in range(len(cache)))
        ids = [token]
        pos = position + len(q_ids)
        text = ""
        while True:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if ids[-1] in self.eos or len(ids) >= max_new_tokens or (stop_at_newline and "\n" in text):
                break
            out = self.model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                             position_ids=torch.tensor([[pos]]))
            pos += 1
            ids.append(int(out.logits[0, -1].argmax()))
        t2 = time.perf_counter()
        return {
            "text": text.split("\n", 1)[0].strip() if stop_at_newline else text,
            "ttft_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": len(ids),
            "context_tokens": len(ctx_ids), "question_tokens": len(q_ids),
            "kept_context_entries_per_layer_head": kept / (self.layers * self.kv_heads),
            "kv_bytes_context": kept * self.head_entry_bytes, "kv_bytes_held": held_entries * self.head_entry_bytes,
            "window_reduced": window_reduced,
        }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def predictions_path(results: Path, label: str, dataset: str, questions: list, seed: int) -> Path:
    """The file of a run's predictions, beside ``results``: named by what was asked. Questions that
    read retrieved passages (``--retrieval``) also by a digest of those: other passages (another
    corpus, store or retriever) are other questions to answer, not ones answered already."""
    read = ""
    if any(q.passages for q in questions):
        read = "-p" + hashlib.sha256(json.dumps([list(q.passages) for q in questions]).encode()).hexdigest()[:8]
    return results.parent / "predictions" / f"{label}-{dataset}{read}-n{len(questions)}-s{seed}.jsonl"


def run_one(runner, questions, press, label, cache_path: Path, max_new_tokens: int,
            settings: dict) -> tuple[list[str], int]:
    """Answer the questions ``cache_path`` does not hold yet, appending each answer there; the file
    is held to ``settings`` (``sac_rag.eval.claim_predictions``: another run's file is refused)."""
    from tqdm.auto import tqdm

    from sac_rag.eval import claim_predictions, read_predictions
    from sac_rag.files import open_for_appending

    claim_predictions(cache_path, {**settings, "max_new_tokens": max_new_tokens},
                      other_file="pass --results in another folder (its predictions/ folder is beside it)")
    done = read_predictions(cache_path)
    todo = [q for q in questions if q.id not in done]
    window = getattr(press, "window_size", None)
    reduced = sum(len(runner.split(q)[0]) <= window for q in questions) if window else 0
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open_for_appending(cache_path) as f, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                          desc=label, unit="q", file=sys.stderr) as bar:
        for q in todo:
            r = runner.answer(q, press, max_new_tokens)
            done[q.id] = r["text"]
            f.write(json.dumps({"id": q.id, "prediction": done[q.id]}) + "\n")
            f.flush()
            bar.update(1)
    return [done[q.id] for q in questions], reduced


def measure_costs(runner, questions, press, samples: int, new_tokens: int = 16) -> dict:
    """Batch 1 on the first ``samples`` questions: TTFT (prefill + press + question + first
    token), decode tokens/s over ``new_tokens`` forced tokens, K/V bytes held; medians."""
    ttft, tps, held, ctx_bytes, kept = [], [], [], [], []
    runner.answer(questions[0], press, 2, stop_at_newline=False)  # warm-up
    for q in questions[:samples]:
        r = runner.answer(q, press, new_tokens, stop_at_newline=False)
        ttft.append(r["ttft_s"])
        tps.append((r["new_tokens"] - 1) / max(1e-9, r["decode_s"]))
        held.append(r["kv_bytes_held"])
        ctx_bytes.append(r["kv_bytes_context"])
        kept.append(r["kept_context_entries_per_layer_head"])
    return {
        "ttft_s": statistics.median(ttft),
        "decode_tokens_per_s": statistics.median(tps),
        "kv_bytes_per_query": statistics.median(held),
        "kv_bytes_context_per_query": statistics.median(ctx_bytes),
        "kept_context_tokens_median": statistics.median(kept),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timing_samples": min(samples, len(questions)),
    }


def with_retrieved_passages(questions, path: str | None, parser) -> list:
    """The questions, each reading its retrieved paragraphs instead of the gold one."""
    import dataclasses

    if not path or not Path(path).is_file():
        parser.error(f"--dataset squad-dev-rag needs --retrieval FILE (benchmarks/rag_squad.py --export-retrieval); "
                     f"got {path!r}")
    rows = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = tuple(row["passages"])
    missing = [q.id for q in questions if q.id not in rows]
    if missing:
        parser.error(f"{path} lacks {len(missing)} of the {len(questions)} questions (e.g. {missing[0]}): export it "
                     f"with the same --n and --seed")
    return [dataclasses.replace(q, passages=rows[q.id]) for q in questions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="seeded subset size (nested across sizes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presses", default="snapkv,streamingllm,knorm,expected_attention",
                        help=f"comma-separated, from {','.join(PRESSES)} (none = uncompressed control)")
    parser.add_argument("--ratios", default="5,15",
                        help="SAC-style ratios r; kvpress compression_ratio = 1 - 1/r")
    parser.add_argument("--decoders", default="frozen,full-ft", help="comma-separated, from frozen,full-ft")
    parser.add_argument("--skip", default="",
                        help="comma-separated decoder:ratio pairs to leave out, e.g. full-ft:15")
    parser.add_argument("--results", default=str(REPO / "benchmarks/results/kvpress.jsonl"))
    parser.add_argument("--dataset", default="squad-dev",
                        choices=["squad-dev", "squadshifts-new-wiki", "squad-dev-rag"],
                        help="question set, as in python -m sac_rag.eval; squad-dev-rag: SQuAD-dev questions "
                        "reading the paragraphs listed in --retrieval")
    parser.add_argument("--retrieval", help="squad-dev-rag: JSON lines {id, passages} written by "
                        "benchmarks/rag_squad.py --export-retrieval")
    parser.add_argument("--data-root", default=str(DATA_ROOT), help="folder holding the datasets")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="Full-FT decoder LoRA (peft)")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timing-samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default). On a shared 2-core host use 1: with 2 OpenMP "
                        "threads competing with other jobs a decode step took 7.2 s, not 0.22 s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    import kvpress  # noqa: F401  (patches attention functions)
    import transformers

    from sac_rag.config import PromptTemplate
    from sac_rag.errors import SACError
    from sac_rag.eval import adapter_fingerprint, dataset_questions
    from sac_rag.files import append_jsonl
    from sac_rag.metrics import summarize

    presses = [p for p in args.presses.split(",") if p]
    ratios = [int(r) for r in args.ratios.split(",") if r]
    decoders = [d for d in args.decoders.split(",") if d]
    skip = {s for s in args.skip.split(",") if s}
    for p in presses:
        if p not in PRESSES:
            parser.error(f"unknown press {p!r}: choose from {PRESSES}")
    for d in decoders:
        if d not in DECODERS:
            parser.error(f"unknown decoder {d!r}: choose from {DECODERS}")
    dtype = getattr(torch, args.dtype)
    questions = dataset_questions(args.data_root, args.dataset.removesuffix("-rag"), args.n, args.seed)
    dataset = args.dataset
    if args.dataset == "squad-dev-rag":  # named as benchmarks/rag_squad.py names it
        questions = with_retrieved_passages(questions, args.retrieval, parser)
        dataset = f"squad-dev-rag-top{max(len(q.passages) for q in questions)}"
    results = Path(args.results)
    command = "python benchmarks/kvpress/run_kvpress.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    versions = {"transformers": transformers.__version__, "kvpress": version("kvpress"), "torch": torch.__version__}
    logger.info("%d questions; presses %s; ratios %s; decoders %s; %s", len(questions), presses, ratios,
                decoders, versions)

    for decoder in decoders:
        model, tokenizer, base_fingerprint = load_decoder(decoder, args.base_model, dtype, Path(args.adapter))
        runner = Runner(model, tokenizer, PromptTemplate())
        kept = [ratio for ratio in ratios if f"{decoder}:{ratio}" not in skip]
        for ratio in kept:
            for press_name in presses:
                if press_name == "none" and ratio != kept[0]:
                    continue  # the control does not depend on the ratio: run once, at the first ratio kept
                r = 1 if press_name == "none" else ratio
                compression_ratio = 1 - 1 / r
                press = make_press(press_name, compression_ratio)
                method = "kvpress-" + press_name.replace("_", "-")
                suffix = "+fullft-decoder" if decoder == "full-ft" else ""
                label = f"{method}{'' if r == 1 else f'-{r}x'}{suffix}"
                cache = predictions_path(results, label, dataset, questions, args.seed)
                settings = {"press": press_name, "ratio": r, "decoder": decoder, "dtype": args.dtype,
                            "base_model": base_fingerprint, "kvpress": versions["kvpress"],
                            "adapter": adapter_fingerprint(args.adapter) if decoder == "full-ft" else None}
                t_start = time.time()
                try:
                    preds, reduced = run_one(runner, questions, press, label, cache, args.max_new_tokens, settings)
                    costs = measure_costs(runner, questions, press, args.timing_samples) if args.timing_samples else {}
                except SACError:  # the run's own input refused (another run's predictions file): no press failed
                    raise
                except Exception as exc:  # a press that breaks on this model/version: record and go on
                    logger.exception("%s failed", label)
                    row = {"method": method + suffix, "label": label, "press": press_name, "ratio": r,
                           "decoder": decoder, "error": f"{type(exc).__name__}: {exc}", "command": command}
                    append_jsonl(results, [row])
                    continue
                scores = summarize(preds, [q.answers for q in questions])
                row = {
                    "method": method + suffix, "label": label,
                    "press": type(press).__name__ if press is not None else "none",
                    "ratio": r, "compression_ratio": compression_ratio, "decoder": decoder,
                    "dataset": dataset, "n": scores.pop("n"), **scores, **costs,
                    "snapkv_window_reduced": reduced if press_name == "snapkv" else None,
                    "wall_s": round(time.time() - t_start, 1),
                    "seed": args.seed, "base_model": args.base_model,
                    "checkpoint": args.adapter if decoder == "full-ft" else None,
                    "dtype": args.dtype, "threads": torch.get_num_threads(), **versions, "command": command,
                }
                append_jsonl(results, [row])
                print(json.dumps({k: row.get(k) for k in ("label", "n", "f1", "em", "f1_ci", "ttft_s",
                                                           "kv_bytes_per_query")}), flush=True)
        del model, runner
    return 0


if __name__ == "__main__":
    from sac_rag.errors import exit_with_message

    exit_with_message(main)
