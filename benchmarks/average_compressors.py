r"""Average the trained weights of compressors of one lineage (same settings, each trained on from
another). Two with ``--t``: ``(1 - t) * first + t * second``, WiSE-FT style; a later stage that
gained in domain and lost out of domain can be pulled back part of the way without training.
More than two: their uniform average (or ``--weights``), e.g. snapshots along one run, as in
stochastic weight averaging. With ``--extrapolate``, weights outside [0, 1]: a step past one
compressor, away from another. The anchor embedding and each LoRA factor are averaged. Beside the
weights, ``interpolation.json`` names every source (fingerprint, weights hash, weight).

Averaging the factors A and B is not averaging the adapters' products B @ A: for two the
difference is ``t (1 - t) (B2 - B1) @ (A2 - A1)``, small when the two are close. The script
prints it, relative to the exact average of the products, per adapter, so the approximation is
measured rather than assumed.

    python benchmarks/average_compressors.py benchmarks/checkpoints/sac5x-stage11 \
        benchmarks/checkpoints/sac5x-stage13 runs/sac5x-soup11-13 --t 0.5
    python benchmarks/average_compressors.py runs/X/snapshots/step-{20,40,60,80,100} runs/X-swa
"""

import argparse
import json
from pathlib import Path

import torch

from sac_rag.compressor import SACCompressor, checkpoint_meta
from sac_rag.files import atomic_write


def average(sources: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * sources[i]``, tensor by tensor, in float32."""
    names = set(sources[0])
    for other in sources[1:]:
        if set(other) != names:
            raise SystemExit(f"the compressors hold different tensors: {sorted(names ^ set(other))[:5]}")
    mixed = {}
    for k in sources[0]:
        total = weights[0] * sources[0][k].float()
        for source, weight in zip(sources[1:], weights[1:]):
            total = total + weight * source[k].float()
        mixed[k] = total
    return mixed


def interpolate(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return average([first, second], [1 - t, t])


def product_error(sources: list[dict], weights: list[float], mixed: dict) -> dict[str, float]:
    """Per adapter ('lora.' / 'decoder_lora.'): ||B_mix A_mix - sum_i w_i B_i A_i|| / ||sum_i w_i B_i A_i||,
    summed over modules."""
    errors: dict[str, list[float]] = {}
    for name in mixed:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        exact = sum(w * s[b_name] @ s[name] for s, w in zip(sources, weights))
        approx = mixed[b_name] @ mixed[name]
        sums = errors.setdefault(name.split(".", 1)[0], [0.0, 0.0])
        sums[0] += float((approx - exact).norm() ** 2)
        sums[1] += float(exact.norm() ** 2)
    return {adapter: (num / den) ** 0.5 for adapter, (num, den) in errors.items()}


def source_weights(n_sources: int, t: float | None, weights: list[float] | None,
                   extrapolate: bool = False) -> list[float]:
    """The weight of each source: ``(1 - t, t)`` for two, ``weights`` as given, or uniform. Weights
    outside [0, 1] (still summing to 1) only with ``extrapolate``."""
    if n_sources < 2:
        raise SystemExit(f"averaging needs at least two compressors, got {n_sources}")
    if t is not None and weights is not None:
        raise SystemExit("give --t or --weights, not both")
    if t is not None:
        if n_sources != 2:
            raise SystemExit(f"--t interpolates two compressors; got {n_sources} (use --weights)")
        if not (extrapolate or 0.0 <= t <= 1.0):
            raise SystemExit(f"--t must lie in [0, 1], got {t} (--extrapolate allows any)")
        return [1 - t, t]
    if weights is None:
        return [1 / n_sources] * n_sources
    if len(weights) != n_sources:
        raise SystemExit(f"--weights gives {len(weights)} weights for {n_sources} compressors")
    if abs(sum(weights) - 1) > 1e-6:
        raise SystemExit(f"--weights must sum to 1, got {weights}")
    if not extrapolate and any(w < 0 for w in weights):
        raise SystemExit(f"--weights must be non-negative, got {weights} (--extrapolate allows negative ones)")
    return weights


def align_settings(compressors: list[SACCompressor], anchor_strategy: str = "", ratio: int = 0) -> None:
    """Place every compressor's anchors by ``anchor_strategy`` and at ``ratio`` (each if given),
    then refuse any whose settings still differ from the first's: only one lineage can be averaged."""
    for compressor in compressors:
        if anchor_strategy:
            compressor.use_anchors(anchor_strategy)
        if ratio:
            compressor.retarget_ratio(ratio)
    first = compressors[0].config.to_dict()
    for other in compressors[1:]:
        settings = other.config.to_dict()
        if settings != first:
            differing = sorted(k for k in first.keys() | settings.keys() if settings.get(k) != first.get(k))
            raise SystemExit(f"the compressors were saved with different settings ({', '.join(differing)}); "
                             "only one lineage can be averaged")


def check_output(out: Path) -> None:
    """Refuse an output directory that exists with anything in it: a source's weights would be replaced
    by the average (its fingerprint then recorded as the average's), or another compressor's files
    (model card, train configs) left beside weights they do not describe."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{out} exists and is not an empty directory: write the average to a new directory "
                         "(never into a source, whose weights it would replace)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="two or more compressor directories or short names of the same settings")
    parser.add_argument("out", help="directory to write the averaged compressor to")
    parser.add_argument("--t", type=float, default=None,
                        help="two sources only: the weight of the second (the first gets 1 - t)")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one weight per source, summing to 1 (default: uniform)")
    parser.add_argument("--extrapolate", action="store_true",
                        help="allow weights outside [0, 1] (a negative one: a step past the others, away from it, "
                             "e.g. --t 1.5 goes half as far again from the first past the second)")
    parser.add_argument("--anchor-strategy", default="",
                        help="place every compressor's anchors by this strategy before averaging (sac_rag.anchors, "
                             "e.g. rarest_in_block: averages a stage trained with it and one trained without)")
    parser.add_argument("--ratio", type=int, default=0,
                        help="compress every compressor at this ratio before averaging (e.g. 5: averages a stage "
                             "trained at another ratio with one trained at 5x; 0 = keep)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="saved precision")
    args = parser.parse_args()
    weights = source_weights(len(args.sources), args.t, args.weights, args.extrapolate)
    check_output(Path(args.out))
    compressors = [SACCompressor.from_pretrained(s, device="cpu", dtype="float32") for s in args.sources]
    align_settings(compressors, args.anchor_strategy, args.ratio)
    tensors = [{k: v.detach().float().clone() for k, v in c.trainable_tensors().items()} for c in compressors]
    mixed = average(tensors, weights)
    errors = product_error(tensors, weights, mixed)
    compressors[0]._load_tensors(dict(mixed), Path(args.out))
    compressors[0].save_pretrained(args.out, dtype=getattr(torch, args.dtype))
    sources = []
    for source, weight in zip(args.sources, weights):
        meta = checkpoint_meta(source)
        sources.append({"path": str(source), "weight": weight,
                        **{k: meta[k] for k in ("fingerprint", "weights_sha256")}})
    provenance = {"sources": sources, "dtype": args.dtype, "anchor_strategy": compressors[0].config.anchor_strategy,
                  "ratio": compressors[0].config.ratio,
                  "made_by": "benchmarks/average_compressors.py", "product_error": errors}
    atomic_write(Path(args.out) / "interpolation.json", json.dumps(provenance, indent=2).encode())
    reloaded = SACCompressor.from_pretrained(args.out, device="cpu", dtype=args.dtype)
    recorded = checkpoint_meta(args.out)["fingerprint"]
    assert reloaded.fingerprint == recorded, "the averaged weights do not reload as saved"
    terms = " + ".join(f"{source} x {weight:g}" for source, weight in zip(args.sources, weights))
    print(f"{terms} -> {args.out}, fingerprint {recorded}")
    for adapter, error in errors.items():
        print(f"  {adapter}: averaging the factors is {100 * error:.2f}% off averaging the products (relative norm)")


if __name__ == "__main__":
    main()
