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


def test_a_setting_only_one_compressor_saves_is_named_whichever_comes_first():
    plain, refined = _tiny_compressor(), _tiny_compressor()
    refined.config.refine_steps = 2  # saved only when on
    for order in ([plain, refined], [refined, plain]):
        with pytest.raises(SystemExit, match=r"\(refine_lr, refine_steps\)"):
            align_settings(order)


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


def test_product_error_by_hand():
    """1x1 adapters: B A = 1 and 9, averaged at t=0.5: factors (2, 2) give 4, the products' average is 5:
    |4 - 5| / 5 = 0.2 (a relative norm, not its square 0.04)."""
    one = {"lora.m.lora_A.weight": torch.ones(1, 1), "lora.m.lora_B.weight": torch.ones(1, 1)}
    three = {k: 3 * v for k, v in one.items()}
    assert product_error([one, three], [0.5, 0.5], interpolate(one, three, 0.5)) == {"lora": pytest.approx(0.2)}


def _two_sources(root):
    """The tiny compressor and a copy of it whose trained tensors differ (same settings, same base model)."""
    from conftest import save_tiny_compressor

    first = save_tiny_compressor(root)
    other = SACCompressor.from_pretrained(first, device="cpu", dtype="float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in other.trainable_tensors().values():
            tensor.copy_(torch.randn_like(tensor))
    other.save_pretrained(root / "second", dtype=torch.float32)
    return first, root / "second"


def test_the_script_writes_the_weighted_average_and_records_each_source_s_weight(tmp_path, monkeypatch, capsys):
    import json
    import sys

    first, second = _two_sources(tmp_path)
    out = tmp_path / "average"
    monkeypatch.setattr(sys, "argv", ["average_compressors.py", str(first), str(second), str(out), "--t", "0.25"])
    AVERAGE["main"]()  # saved in bfloat16, the default
    def load(path):
        return SACCompressor.from_pretrained(path, device="cpu", dtype="float32").trainable_tensors()

    a, b, mixed = load(first), load(second), load(out)
    assert all(torch.equal(mixed[k], (0.75 * a[k] + 0.25 * b[k]).bfloat16().float()) for k in a)  # not the first's
    sources = json.loads((out / "interpolation.json").read_text())["sources"]
    assert [(s["path"], s["weight"]) for s in sources] == [(str(first), 0.75), (str(second), 0.25)]


def test_the_script_refuses_a_step_past_the_sources_without_extrapolate(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["average_compressors.py", "a", "b", str(tmp_path / "out"), "--t", "1.5"])
    with pytest.raises(SystemExit, match="--extrapolate allows any"):
        AVERAGE["main"]()


def test_an_average_saved_in_float32_passes_the_script_s_own_reload_check(tmp_path, monkeypatch):
    """The script checks the average it wrote by reloading it, in the dtype it was saved in (a float32
    average reloaded in bfloat16 is other weights, and failed the check after writing the folder)."""
    import sys

    first, second = _two_sources(tmp_path)
    monkeypatch.setattr(sys, "argv", ["average_compressors.py", str(first), str(second), str(tmp_path / "average"),
                                      "--dtype", "float32"])
    AVERAGE["main"]()
