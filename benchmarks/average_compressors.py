r"""Interpolate the trained weights of two compressors of one lineage (same settings, one trained on
from the other), WiSE-FT style: ``(1 - t) * first + t * second`` for the anchor embedding and for
each LoRA factor. A later stage that gained in domain and lost out of domain can be pulled back
part of the way without training. Beside the weights, ``interpolation.json`` names both sources
(fingerprint, weights hash) and ``t``.

Averaging the factors A and B is not averaging the adapters' products B @ A: the difference is
``t (1 - t) (B2 - B1) @ (A2 - A1)``, small when the two are close. The script prints it, relative
to the exact interpolation, per adapter, so the approximation is measured rather than assumed.

    python benchmarks/average_compressors.py benchmarks/checkpoints/sac5x-stage11 \
        benchmarks/checkpoints/sac5x-stage13 runs/sac5x-soup11-13 --t 0.5
"""

import argparse
import json
from pathlib import Path

import torch

from sac_rag.compressor import SACCompressor, checkpoint_meta
from sac_rag.files import atomic_write


def interpolate(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    if set(first) != set(second):
        raise SystemExit(f"the two compressors hold different tensors: {sorted(set(first) ^ set(second))[:5]}")
    return {k: (1 - t) * first[k].float() + t * second[k].float() for k in first}


def product_error(first: dict, second: dict, mixed: dict, t: float) -> dict[str, float]:
    """Per adapter ('lora.' / 'decoder_lora.'): ||B_t A_t - interp(B A)|| / ||interp(B A)||, summed over modules."""
    errors: dict[str, list[float]] = {}
    for name in mixed:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        exact = (1 - t) * first[b_name] @ first[name] + t * second[b_name] @ second[name]
        approx = mixed[b_name] @ mixed[name]
        sums = errors.setdefault(name.split(".", 1)[0], [0.0, 0.0])
        sums[0] += float((approx - exact).norm() ** 2)
        sums[1] += float(exact.norm() ** 2)
    return {adapter: (num / den) ** 0.5 for adapter, (num, den) in errors.items()}


def align_settings(first: SACCompressor, second: SACCompressor, anchor_strategy: str = "") -> None:
    """Place both compressors' anchors by ``anchor_strategy`` (if given), then refuse two whose
    settings still differ: only one lineage can be averaged."""
    if anchor_strategy:
        first.use_anchors(anchor_strategy)
        second.use_anchors(anchor_strategy)
    if first.config.to_dict() != second.config.to_dict():
        differing = sorted(k for k, v in first.config.to_dict().items() if second.config.to_dict().get(k) != v)
        raise SystemExit(f"the two compressors were saved with different settings ({', '.join(differing)}); "
                         "only one lineage can be averaged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="compressor directory or short name (t = 0)")
    parser.add_argument("second", help="compressor directory or short name of the same settings (t = 1)")
    parser.add_argument("out", help="directory to write the interpolated compressor to")
    parser.add_argument("--t", type=float, default=0.5, help="weight of the second compressor (default 0.5)")
    parser.add_argument("--anchor-strategy", default="",
                        help="place both compressors' anchors by this strategy before averaging (sac_rag.anchors, "
                             "e.g. rarest_in_block: averages a stage trained with it and one trained without)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="saved precision")
    args = parser.parse_args()
    if not 0.0 <= args.t <= 1.0:
        raise SystemExit(f"--t must lie in [0, 1], got {args.t}")
    first = SACCompressor.from_pretrained(args.first, device="cpu", dtype="float32")
    second = SACCompressor.from_pretrained(args.second, device="cpu", dtype="float32")
    align_settings(first, second, args.anchor_strategy)
    a = {k: v.detach().float().clone() for k, v in first.trainable_tensors().items()}
    b = {k: v.detach().float().clone() for k, v in second.trainable_tensors().items()}
    mixed = interpolate(a, b, args.t)
    errors = product_error(a, b, mixed, args.t)
    first._load_tensors(dict(mixed), Path(args.out))
    first.save_pretrained(args.out, dtype=getattr(torch, args.dtype))
    sources = {}
    for role, source in (("first", args.first), ("second", args.second)):
        meta = checkpoint_meta(source)
        sources[role] = {"path": str(source), **{k: meta[k] for k in ("fingerprint", "weights_sha256")}}
    provenance = {**sources, "t": args.t, "dtype": args.dtype,
                  "anchor_strategy": first.config.anchor_strategy, "made_by": "benchmarks/average_compressors.py",
                  "product_error": errors}
    atomic_write(Path(args.out) / "interpolation.json", json.dumps(provenance, indent=2).encode())
    reloaded = SACCompressor.from_pretrained(args.out, device="cpu")
    recorded = checkpoint_meta(args.out)["fingerprint"]
    assert reloaded.fingerprint == recorded, "the interpolated weights do not reload as saved"
    print(f"{args.first} x {1 - args.t:g} + {args.second} x {args.t:g} -> {args.out}, fingerprint {recorded}")
    for adapter, error in errors.items():
        print(f"  {adapter}: averaging the factors is {100 * error:.2f}% off averaging the products (relative norm)")


if __name__ == "__main__":
    main()
