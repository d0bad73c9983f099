r"""Does the frozen decoder underweight the anchors? An anchor stands for ``ratio`` tokens, but the
decoder's softmax gives it the weight of one. Reading each anchor's K/V ``--times m`` times adds
``log m`` to every anchor's attention logit, in every layer and head, and changes nothing else (the
copies sit at the anchor's own position). If the compressor left the anchors underweighted, some
``m > 1`` answers better than ``m = 1``.

Every other argument goes to ``python -m sac_rag.eval`` as given (give each ``m`` its own
``--label``: the prediction cache does not know ``m``):

    python benchmarks/anchor_weight_probe.py --times 2 --dataset squad-train-heldout --skip 1000 --n 300 \
        --seed 0 --batch-size 8 --threads 1 --method sac --checkpoint smollm2-135m-sac-5x \
        --label probe-anchor-weight2 --timing-samples 0 --results runs/probes.jsonl
"""

from __future__ import annotations

import argparse
import sys

from sac_rag import eval as sac_eval
from sac_rag.generation import Generator
from sac_rag.kv import AnchorKV


def read_each_anchor(times: int) -> None:
    """Make every ``Generator`` splice each anchor's K/V ``times`` times (counted once as read)."""
    splice = Generator._splice

    def repeated_splice(self, state, kv: AnchorKV, devices) -> None:
        copies = AnchorKV(keys=kv.keys.repeat_interleave(times, dim=2),
                          values=kv.values.repeat_interleave(times, dim=2),
                          positions=kv.positions.repeat_interleave(times), n_tokens=kv.n_tokens,
                          offset=kv.offset, fingerprint=kv.fingerprint)
        splice(self, state, copies, devices)
        state.cached_tokens -= copies.n_anchors - kv.n_anchors

    Generator._splice = repeated_splice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, required=True, help="how many times each anchor's K/V is read (1 = as is)")
    args, eval_args = parser.parse_known_args()
    if args.times < 1:
        parser.error(f"--times must be at least 1, got {args.times}")
    if not any(arg == "--label" or arg.startswith("--label=") for arg in eval_args):
        parser.error("give --label (one per --times): the prediction cache does not know --times")
    read_each_anchor(args.times)
    return sac_eval.main(eval_args)


if __name__ == "__main__":
    sys.exit(main())
