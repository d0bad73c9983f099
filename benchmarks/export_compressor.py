r"""Copy a trained compressor into the package (bfloat16, with its training config and loss
curve), so that ``SACCompressor.from_pretrained(NAME)`` loads it offline.

Rounding float32 training weights to bfloat16 makes a new compressor with its own fingerprint:
evaluate the exported one (by its short name), and precompress stores with it, not with the run.

    python benchmarks/export_compressor.py runs/sac5x-squad-dec/best smollm2-135m-sac-5x \
        --run-dir runs/sac5x-squad-dec

A built-in compressor exported again with other settings and ``--share-weights-with`` its own name
is a variant that ships its ``config.json`` only and reads the weights it shares (the refined 5x):

    python benchmarks/export_compressor.py smollm2-135m-sac-5x smollm2-135m-sac-5x-refined \
        --refine-steps 5 --share-weights-with smollm2-135m-sac-5x
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sac_rag.compressor import PRETRAINED_DIR, SACCompressor, checkpoint_meta, resolve_pretrained, variants_reading
from sac_rag.config import SACConfig
from sac_rag.errors import CheckpointError, InvalidInputError, SACError, exit_with_message
from sac_rag.files import atomic_write

RUN_FILES = ("train_config.json", "loss_curve.png")  # copied from --run-dir beside the weights
PROVENANCE = "interpolation.json"  # an averaged checkpoint's, copied with it


def export_target(name: str) -> Path:
    """The package folder ``name`` is exported to. A name with a path in it ("../x", "runs/x", an
    absolute path) is refused: it would write outside sac_rag/pretrained/, where
    ``from_pretrained(name)`` never looks for a built-in compressor."""
    if not name or name in (".", "..") or name.startswith(".") or Path(name).name != name or "\\" in name:
        raise InvalidInputError(f"name {name!r} is not a short name: give one folder name (e.g. "
                                f"smollm2-135m-sac-5x), which becomes {PRETRAINED_DIR}/<name>")
    return PRETRAINED_DIR / name


def check_same_compressor(target: Path, settings: dict) -> None:
    """Refuse to export over a package of a compressor with other settings: its files beside the new
    weights (model card, train configs, loss curves) would describe another compressor. One with the
    same settings (a later stage of it) is replaced, weights only, its other files kept."""
    if not (target / "config.json").exists():
        return
    try:
        held = checkpoint_meta(target)["config"]
    except (SACError, OSError, KeyError, TypeError, ValueError):
        held = None
    if held != settings:
        differ = sorted(k for k in set(held or {}) | set(settings) if (held or {}).get(k) != settings.get(k))
        raise InvalidInputError(f"{target} holds another compressor (settings that differ: "
                                f"{', '.join(differ) or 'its config.json cannot be read'}): export under a new name, "
                                "or remove that folder first")


def check_no_variant_left_behind(target: Path, weights_sha256: str) -> None:
    """Refuse to export other weights into a package folder whose weights variants beside it read
    (``--share-weights-with``): they would be refused from then on."""
    if not (target / "config.json").exists() or checkpoint_meta(target)["weights_sha256"] == weights_sha256:
        return
    variants = variants_reading(target)
    if variants:
        raise InvalidInputError(f"{target} holds the weights {', '.join(p.name for p in variants)} read "
                                "(--share-weights-with): exporting other weights over them would leave those "
                                "unreadable; export under a new name, or remove those variants first and export them "
                                "again afterwards")


def run_files(run_dir: str | None) -> list[Path]:
    """The files of ``RUN_FILES`` that ``run_dir`` holds. A ``--run-dir`` that is not a folder is
    refused before anything is exported (a typo would otherwise ship the weights without their
    training config, silently)."""
    if run_dir is None:
        return []
    if not Path(run_dir).is_dir():
        raise InvalidInputError(f"--run-dir {run_dir} is not a folder: name the training run's directory "
                                f"(it holds {' and '.join(RUN_FILES)}), or leave --run-dir out")
    return [Path(run_dir) / name for name in RUN_FILES if (Path(run_dir) / name).is_file()]


def exported_settings(checkpoint: str, refine_steps: int | None, refine_lr: float | None) -> dict:
    """The settings the export saves: the checkpoint's, with the refinement given (checked)."""
    config = SACConfig.from_dict(checkpoint_meta(checkpoint)["config"])
    config.set_refinement(refine_steps, refine_lr)
    if refine_lr is not None and not config.refine_steps:
        raise InvalidInputError("--refine-lr sets the rate of refinement, which this export does not do: give "
                                "--refine-steps too")
    return config.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a compressor directory (e.g. a run's best/ or final/)")
    parser.add_argument("name", help="short name under sac_rag/pretrained/")
    parser.add_argument("--run-dir", help="the training run, for train_config.json and loss_curve.png")
    parser.add_argument("--refine-steps", type=int, help="export with this many refinement steps per chunk "
                        "(sac_rag.refine; 0 = none; default: the checkpoint's), a compressor of its own fingerprint")
    parser.add_argument("--refine-lr", type=float, help="the refinement's learning rate (default: the checkpoint's)")
    parser.add_argument("--share-weights-with", metavar="NAME", help="a built-in compressor holding these very "
                        "weights in bfloat16: write config.json only, reading its weights (a variant in settings)")
    args = parser.parse_args(argv)
    target = export_target(args.name)
    sibling = None if args.share_weights_with is None else export_target(args.share_weights_with)
    copies = run_files(args.run_dir)
    settings = exported_settings(args.checkpoint, args.refine_steps, args.refine_lr)
    check_same_compressor(target, settings)  # before the model loads
    compressor = SACCompressor.from_pretrained(args.checkpoint, device="cpu", dtype="float32")
    compressor.config.set_refinement(args.refine_steps, args.refine_lr)
    check_no_variant_left_behind(target, compressor.weights_sha256(torch.bfloat16))
    compressor.save_pretrained(target, dtype=torch.bfloat16, share_weights_with=sibling)
    averaged = resolve_pretrained(args.checkpoint) / PROVENANCE
    if averaged.is_file() and sibling is None:  # an average's sources and weights (benchmarks/average_compressors.py;
        copies.append(averaged)                  # a variant leaves them with the folder holding the weights)
    elif (target / PROVENANCE).exists():  # an earlier export's, which does not describe these weights
        (target / PROVENANCE).unlink()
    for source in copies:  # each whole or not at all, as the weights are
        atomic_write(target / source.name, source.read_bytes())
    reloaded = SACCompressor.from_pretrained(target, device="cpu")  # the folder written, whatever the cwd holds
    recorded = checkpoint_meta(target)["fingerprint"]
    if reloaded.fingerprint != recorded:
        raise CheckpointError(f"the weights exported to {target} reload with fingerprint {reloaded.fingerprint}, "
                              f"but were saved as {recorded}: export again")
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file()) / 1e6
    print(f"exported {args.checkpoint} -> {target} ({size:.1f} MB), fingerprint {reloaded.fingerprint}")
    if reloaded.fingerprint != compressor.fingerprint:
        print(f"  (rounded to bfloat16: the checkpoint's fingerprint was {compressor.fingerprint}; "
              f"its evaluations and stores do not carry over)")
    return 0


if __name__ == "__main__":
    exit_with_message(main)
