"""benchmarks/average_compressors.py: averaging compressors' trained tensors (two by --t, or several)."""

import runpy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import SACCompressor, SACConfig

AVERAGE = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "average_compressors.py"))
interpolate, average, product_error = AVERAGE["interpolate"], AVERAGE["average"], AVERAGE["product_error"]
align_settings, source_weights = AVERAGE["align_settings"], AVERAGE["source_weights"]
check_output = AVERAGE["check_output"]


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "anchor_embedding": torch.randn(8, generator=generator),
        "lora.layer.q.lora_A.weight": torch.randn(2, 8, generator=generator),
        "lora.layer.q.lora_B.weight": torch.randn(8, 2, generator=generator),
    }


def test_the_ends_of_the_interpolation_are_the_two_compressors():
    first, second = _adapter(0), _adapter(1)
    for t, expected in ((0.0, first), (1.0, second)):
        mixed = interpolate(first, second, t)
        assert all(torch.equal(mixed[k], expected[k]) for k in first)


def test_the_midpoint_averages_every_tensor():
    first, second = _adapter(0), _adapter(1)
    mixed = interpolate(first, second, 0.5)
    assert torch.allclose(mixed["anchor_embedding"], (first["anchor_embedding"] + second["anchor_embedding"]) / 2)


def test_factor_averaging_is_exact_only_when_one_factor_is_shared():
    first, second = _adapter(0), _adapter(1)
    halves = [0.5, 0.5]
    assert product_error([first, second], halves, interpolate(first, second, 0.5))["lora"] > 0.05
    second["lora.layer.q.lora_A.weight"] = first["lora.layer.q.lora_A.weight"].clone()
    assert product_error([first, second], halves, interpolate(first, second, 0.5))["lora"] == pytest.approx(0, abs=1e-6)


def test_several_compressors_average_with_their_weights():
    sources = [_adapter(seed) for seed in range(3)]
    mixed = average(sources, [0.5, 0.25, 0.25])
    expected = sum(w * s["anchor_embedding"] for s, w in zip(sources, [0.5, 0.25, 0.25]))
    assert torch.allclose(mixed["anchor_embedding"], expected)
    only_first = [1.0, 0.0, 0.0]
    assert product_error(sources, only_first, average(sources, only_first))["lora"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("n, t, weights, expected", [
    (2, None, None, [0.5, 0.5]), (4, None, None, [0.25] * 4), (2, 0.3, None, [0.7, 0.3]),
    (3, None, [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
])
def test_each_source_gets_the_weight_asked_for(n, t, weights, expected):
    assert source_weights(n, t, weights) == pytest.approx(expected)


@pytest.mark.parametrize("n, t, weights, message", [
    (1, None, None, "at least two"), (3, 0.5, None, "--t interpolates two"), (2, 1.5, None, r"\[0, 1\]"),
    (2, 0.5, [0.5, 0.5], "not both"), (3, None, [0.5, 0.5], "2 weights for 3"), (2, None, [0.7, 0.7], "sum to 1"),
])
def test_weights_that_do_not_make_an_average_are_refused(n, t, weights, message):
    with pytest.raises(SystemExit, match=message):
        source_weights(n, t, weights)


def test_a_step_past_the_sources_needs_extrapolate_and_still_weighs_one_in_all():
    with pytest.raises(SystemExit, match="--extrapolate allows negative"):
        source_weights(2, None, [1.5, -0.5])
    assert source_weights(2, 1.5, None, extrapolate=True) == pytest.approx([-0.5, 1.5])
    assert source_weights(2, None, [2.0, -1.0], extrapolate=True) == pytest.approx([2.0, -1.0])
    with pytest.raises(SystemExit, match="sum to 1"):
        source_weights(2, None, [2.0, -0.5], extrapolate=True)


def test_compressors_with_different_tensors_are_refused():
    first, second = _adapter(0), _adapter(1)
    second.pop("anchor_embedding")
    with pytest.raises(SystemExit, match="different tensors"):
        interpolate(first, second, 0.5)


def _tiny_compressor() -> SACCompressor:
    model, tokenizer = make_tiny_llama()
    return SACCompressor(SACConfig(ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8), model=model, tokenizer=tokenizer)


def test_compressors_placing_anchors_differently_are_refused_unless_both_are_placed_alike():
    first, second = _tiny_compressor(), _tiny_compressor()
    second.use_anchors("rarest_in_block")
    with pytest.raises(SystemExit, match="anchor_strategy"):
        align_settings([first, second])
    align_settings([first, second], "rarest_in_block")
    assert first.config.anchor_strategy == second.config.anchor_strategy == "rarest_in_block"


def test_compressors_trained_at_different_ratios_are_refused_unless_both_are_set_to_one():
    first, second = _tiny_compressor(), _tiny_compressor()
    second.retarget_ratio(4)
    with pytest.raises(SystemExit, match="ratio"):
        align_settings([first, second])
    align_settings([first, second], ratio=2)
    assert first.config.ratio == second.config.ratio == 2


def test_the_average_is_written_only_to_a_new_or_empty_directory(tmp_path):
    """Into a source, the average would replace its weights; into another compressor's directory, it
    would leave that one's files beside weights they do not describe."""
    check_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "config.json").write_text("{}")
    for taken in (tmp_path / "source", tmp_path / "source" / "config.json"):
        with pytest.raises(SystemExit, match="not an empty directory"):
            check_output(taken)
