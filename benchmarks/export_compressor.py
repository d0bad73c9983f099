r"""Copy a trained compressor into the package (bfloat16, with its training config and loss
curve), so that ``SACCompressor.from_pretrained(NAME)`` loads it offline.

Rounding float32 training weights to bfloat16 makes a new compressor with its own fingerprint:
evaluate the exported one (by its short name), and precompress stores with it, not with the run.

    python benchmarks/export_compressor.py runs/sac5x-squad-dec/best smollm2-135m-sac-5x \
        --run-dir runs/sac5x-squad-dec
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from sac_rag.compressor import PRETRAINED_DIR, SACCompressor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a compressor directory (e.g. a run's best/ or final/)")
    parser.add_argument("name", help="short name under sac_rag/pretrained/")
    parser.add_argument("--run-dir", help="the training run, for train_config.json and loss_curve.png")
    args = parser.parse_args()
    target = PRETRAINED_DIR / args.name
    compressor = SACCompressor.from_pretrained(args.checkpoint, device="cpu", dtype="float32")
    compressor.save_pretrained(target, dtype=torch.bfloat16)
    if args.run_dir:
        for name in ("train_config.json", "loss_curve.png"):
            if (Path(args.run_dir) / name).exists():
                shutil.copy(Path(args.run_dir) / name, target / name)
    reloaded = SACCompressor.from_pretrained(args.name, device="cpu")
    recorded = json.loads((target / "config.json").read_text())["fingerprint"]
    assert reloaded.fingerprint == recorded, "the exported weights do not reload as saved"
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    print(f"exported {args.checkpoint} -> {target} ({size:.1f} MB), fingerprint {reloaded.fingerprint}")
    if reloaded.fingerprint != compressor.fingerprint:
        print(f"  (rounded to bfloat16: the checkpoint's fingerprint was {compressor.fingerprint}; "
              f"its evaluations and stores do not carry over)")


if __name__ == "__main__":
    main()
