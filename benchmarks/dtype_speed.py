"""bfloat16 vs float32 on this machine's CPU: is bf16 native here, and what does each cost?

Times, in one run on the same machine, a prefill, a decode step and a training step (forward and
backward, bf16 autocast vs float32) of the packaged SmolLM2-135M, and prints the ratios beside
``sac_rag.devices.bf16_is_fast``, which decides what ``dtype="auto"`` and ``--precision auto``
choose. A row goes to benchmarks/results/dtype_speed.jsonl.

    python benchmarks/dtype_speed.py --threads 2
"""

import argparse
import json
import os
import statistics
import time

import torch

from sac_rag.devices import bf16_is_fast
from sac_rag.files import append_jsonl
from sac_rag.models import load_base_model


def median_seconds(repeats: int, fn) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_seconds(dtype: str, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    model, _ = load_base_model("smollm2-135m", device="cpu", dtype=dtype)
    prompt, step = ids[:, :-1], ids[:, -1:]
    with torch.no_grad():
        prefill = median_seconds(repeats, lambda: model(prompt))
        cache = model(prompt, use_cache=True).past_key_values
        length = cache.get_seq_length()

        def decode():  # one new token on the prompt's cache, then the cache back to the prompt
            model(step, past_key_values=cache, use_cache=True)
            cache.crop(-(cache.get_seq_length() - length))

        decode_step = median_seconds(repeats, decode)
    return prefill, decode_step


def training_step_seconds(autocast: bool, ids: torch.Tensor, repeats: int) -> float:
    model, _ = load_base_model("smollm2-135m", device="cpu", dtype="float32")
    model.train().requires_grad_(True)  # load_base_model hands out a frozen model

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()

    return median_seconds(repeats, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per row of the prefill")
    parser.add_argument("--train-tokens", type=int, default=128, help="tokens per row of the training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default="benchmarks/results/dtype_speed.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(100, 10_000, (args.batch, args.tokens + 1), generator=torch.Generator().manual_seed(0))
    row = {"cpu": getattr(torch.cpu, "get_capabilities", dict)().get("cpu_name", "unknown"),
           "capability": torch.backends.cpu.get_cpu_capability(),
           "bf16_is_fast": bf16_is_fast(torch.device("cpu")), "threads": args.threads, "batch": args.batch,
           "prefill_tokens": args.tokens, "train_tokens": args.train_tokens, "torch": torch.__version__,
           "load_avg_before": os.getloadavg()[0]}
    for dtype in ("float32", "bfloat16"):
        row[f"prefill_s_{dtype}"], row[f"decode_step_s_{dtype}"] = inference_seconds(dtype, ids, args.repeats)
    train_ids = ids[:, : args.train_tokens]
    row["train_step_s_float32"] = training_step_seconds(False, train_ids, args.repeats)
    row["train_step_s_bf16_autocast"] = training_step_seconds(True, train_ids, args.repeats)
    for what, bf16 in (("prefill", "prefill_s_bfloat16"), ("decode_step", "decode_step_s_bfloat16"),
                       ("train_step", "train_step_s_bf16_autocast")):
        fp32 = row[f"{what}_s_float32"]
        row[f"{what}_bf16_over_fp32"] = round(row[bf16] / fp32, 2)
    append_jsonl(args.results, [row])
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
