"""benchmarks/export_compressor.py: a run's compressor copied into the package in bfloat16, with its
training config; names and folders it would misuse are refused before anything is written."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARKS, load_benchmark, make_tiny_llama

import sac_rag.compressor
from sac_rag import SACCompressor, SACConfig
from sac_rag.errors import SACError

SCRIPT = BENCHMARKS / "export_compressor.py"



@pytest.fixture
def package(tmp_path, monkeypatch):
    """The script and sac_rag looking for built-in compressors in a folder of the test's own."""
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    script = load_benchmark("export_compressor")
    monkeypatch.setattr(script, "PRETRAINED_DIR", pretrained)
    monkeypatch.setattr(sac_rag.compressor, "PRETRAINED_DIR", pretrained)
    return script, pretrained


@pytest.fixture
def run(tmp_path):
    """A training run on the tiny Llama (saved as a folder): float32 weights, off their
    initialisation so that rounding them changes them, a train config and a loss curve."""
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "tiny-model")
    tokenizer.save_pretrained(tmp_path / "tiny-model")
    comp = SACCompressor(SACConfig(base_model=str(tmp_path / "tiny-model"), ratio=2, chunk_len=64, lora_rank=4),
                         model=model, tokenizer=tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in comp.trainable_tensors().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    comp.save_pretrained(tmp_path / "run" / "final")
    (tmp_path / "run" / "train_config.json").write_text('{"steps": 3}')
    (tmp_path / "run" / "loss_curve.png").write_bytes(b"\x89PNG curve")
    return tmp_path / "run", comp


def test_the_export_is_the_checkpoint_rounded_to_bfloat16_with_its_run_files(package, run, capsys):
    script, pretrained = package
    run_dir, trained = run
    assert script.main([str(run_dir / "final"), "tiny-sac-2x", "--run-dir", str(run_dir)]) == 0
    exported = SACCompressor.from_pretrained("tiny-sac-2x", device="cpu", dtype="float32")  # by its short name
    for name, tensor in exported.trainable_tensors().items():
        assert torch.equal(tensor, trained.trainable_tensors()[name].to(torch.bfloat16).float()), name
    target = pretrained / "tiny-sac-2x"
    assert (target / "train_config.json").read_text() == '{"steps": 3}'
    assert (target / "loss_curve.png").read_bytes() == b"\x89PNG curve"
    saved = json.loads((target / "config.json").read_text())
    tag = trained.fingerprint.rsplit("/", 1)[1]  # the weights' part (the model part names its folder)
    assert saved["fingerprint"] == exported.fingerprint and not exported.fingerprint.endswith(tag)
    out = capsys.readouterr().out
    assert f"fingerprint {exported.fingerprint}" in out and f"/{tag};" in out


def test_exporting_again_replaces_the_weights_and_keeps_the_other_files(package, run):
    script, pretrained = package
    run_dir, trained = run
    script.main([str(run_dir / "final"), "tiny-sac-2x"])
    (pretrained / "tiny-sac-2x" / "MODEL_CARD.md").write_text("card")
    with torch.no_grad():
        trained.anchor_embedding.mul_(2)
    trained.save_pretrained(run_dir / "final")
    script.main([str(run_dir / "final"), "tiny-sac-2x"])
    exported = SACCompressor.from_pretrained(pretrained / "tiny-sac-2x", device="cpu", dtype="float32")
    assert torch.equal(exported.anchor_embedding, trained.anchor_embedding.to(torch.bfloat16).float())
    assert (pretrained / "tiny-sac-2x" / "MODEL_CARD.md").read_text() == "card"


def test_a_short_name_is_checked_against_the_folder_written_not_one_in_the_working_directory(
        package, run, tmp_path, monkeypatch):
    script, pretrained = package
    run_dir, trained = run
    elsewhere = tmp_path / "cwd"
    trained.save_pretrained(elsewhere / "tiny-sac-2x")  # the float32 weights, under the same name
    monkeypatch.chdir(elsewhere)
    assert script.main([str(run_dir / "final"), "tiny-sac-2x"]) == 0


@pytest.mark.parametrize("name", ["../escaped", "sub/dir", "<tmp>/absolute", "..", ""])
def test_a_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(package, run, name, tmp_path):
    script, pretrained = package
    run_dir, _ = run
    name = name.replace("<tmp>", str(tmp_path))
    with pytest.raises(SACError, match="is not a short name"):
        script.main([str(run_dir / "final"), name])
    assert list(pretrained.iterdir()) == [] and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "absolute").exists()


def test_a_run_dir_that_does_not_exist_is_refused_before_anything_is_written(package, run):
    script, pretrained = package
    run_dir, _ = run
    with pytest.raises(SACError, match="--run-dir .* is not a folder"):
        script.main([str(run_dir / "final"), "tiny-sac-2x", "--run-dir", str(run_dir.parent / "typo")])
    assert list(pretrained.iterdir()) == []


def test_exporting_over_a_package_of_another_compressor_is_refused_and_provenance_follows_the_weights(
        package, run, tmp_path):
    import shutil

    script, pretrained = package
    run_dir, trained = run
    script.main([str(run_dir / "final"), "tiny-sac-2x"])
    model, tokenizer = make_tiny_llama()
    other = SACCompressor(SACConfig(base_model=trained.config.base_model, ratio=4, chunk_len=64, lora_rank=4),
                          model=model, tokenizer=tokenizer)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SACError, match="holds another compressor .*ratio"):
        script.main([str(tmp_path / "other"), "tiny-sac-2x"])
    assert SACCompressor.from_pretrained("tiny-sac-2x", device="cpu").config.ratio == 2  # left as it was
    shutil.copytree(run_dir / "final", tmp_path / "average")  # an averaged checkpoint: its provenance goes along
    (tmp_path / "average" / "interpolation.json").write_text('{"sources": []}')
    script.main([str(tmp_path / "average"), "tiny-sac-2x"])
    assert (pretrained / "tiny-sac-2x" / "interpolation.json").read_text() == '{"sources": []}'
    script.main([str(run_dir / "final"), "tiny-sac-2x"])  # not an average: the old provenance goes
    assert not (pretrained / "tiny-sac-2x" / "interpolation.json").exists()


def test_a_checkpoint_of_another_base_model_is_refused(package, run, tmp_path):
    script, pretrained = package
    run_dir, _ = run
    other, tokenizer = make_tiny_llama(seed=1)  # the base model's folder now holds other weights
    other.save_pretrained(tmp_path / "tiny-model")
    with pytest.raises(SACError, match="was built for"):
        script.main([str(run_dir / "final"), "tiny-sac-2x"])
    assert not (pretrained / "tiny-sac-2x" / "config.json").exists()


def test_a_missing_checkpoint_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing"), "tiny-sac-2x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "neither a compressor directory" in done.stderr


def test_a_variant_in_settings_ships_its_config_only_and_loads_by_name_as_the_compressor_with_those_settings(
        package, run):
    script, pretrained = package
    run_dir, _ = run
    script.main([str(run_dir / "final"), "tiny-sac-2x"])
    assert script.main(["tiny-sac-2x", "tiny-sac-2x-refined", "--refine-steps", "3", "--refine-lr", "0.02",
                        "--share-weights-with", "tiny-sac-2x"]) == 0
    assert sorted(p.name for p in (pretrained / "tiny-sac-2x-refined").iterdir()) == ["config.json"]
    variant = SACCompressor.from_pretrained("tiny-sac-2x-refined", device="cpu")
    plain = SACCompressor.from_pretrained("tiny-sac-2x", device="cpu")
    assert (variant.config.refine_steps, variant.config.refine_lr, plain.config.refine_steps) == (3, 0.02, 0)
    plain.config.refine_steps, plain.config.refine_lr = 3, 0.02
    assert variant.fingerprint == plain.fingerprint  # the same compressor, named


@pytest.mark.parametrize("args, says", [
    (["--refine-steps", "-1"], "refine_steps must be >= 0"),
    (["--refine-lr", "0.1"], "give --refine-steps too"),
    (["--refine-steps", "2", "--share-weights-with", "../x"], "is not a short name"),
    (["--refine-steps", "2", "--share-weights-with", "missing"], "neither a compressor directory"),
])
def test_a_variant_with_bad_settings_or_no_sibling_is_refused_writing_nothing(package, run, args, says):
    script, pretrained = package
    run_dir, _ = run
    script.main([str(run_dir / "final"), "tiny-sac-2x"])
    with pytest.raises(SACError, match=says):
        script.main(["tiny-sac-2x", "tiny-sac-2x-refined", *args])
    assert not (pretrained / "tiny-sac-2x-refined").exists()


def test_other_weights_over_a_package_its_variants_read_are_refused_and_a_variant_takes_no_provenance(
        package, run, tmp_path):
    import shutil

    script, pretrained = package
    run_dir, trained = run
    shutil.copytree(run_dir / "final", tmp_path / "average")  # an averaged checkpoint, with its provenance
    (tmp_path / "average" / "interpolation.json").write_text('{"sources": []}')
    script.main([str(tmp_path / "average"), "tiny-sac-2x"])
    script.main(["tiny-sac-2x", "tiny-sac-2x-refined", "--refine-steps", "3", "--share-weights-with", "tiny-sac-2x"])
    assert sorted(p.name for p in (pretrained / "tiny-sac-2x-refined").iterdir()) == ["config.json"]
    script.main([str(run_dir / "final"), "tiny-sac-2x"])  # the same weights again: allowed
    with torch.no_grad():
        trained.anchor_embedding.mul_(2)
    trained.save_pretrained(run_dir / "final")
    with pytest.raises(SACError, match="holds the weights tiny-sac-2x-refined read"):
        script.main([str(run_dir / "final"), "tiny-sac-2x"])
    assert SACCompressor.from_pretrained("tiny-sac-2x-refined", device="cpu").config.refine_steps == 3  # still reads
