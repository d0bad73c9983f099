"""benchmarks/average_compressors.py: interpolating two compressors' trained tensors."""

import runpy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import SACCompressor, SACConfig

AVERAGE = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "average_compressors.py"))
interpolate, product_error, align_settings = AVERAGE["interpolate"], AVERAGE["product_error"], AVERAGE["align_settings"]


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
    assert product_error(first, second, interpolate(first, second, 0.5), 0.5)["lora"] > 0.05
    second["lora.layer.q.lora_A.weight"] = first["lora.layer.q.lora_A.weight"].clone()
    assert product_error(first, second, interpolate(first, second, 0.5), 0.5)["lora"] == pytest.approx(0, abs=1e-6)


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
        align_settings(first, second)
    align_settings(first, second, "rarest_in_block")
    assert first.config.anchor_strategy == second.config.anchor_strategy == "rarest_in_block"
