"""KeyRotator on its own: rotations compose and invert in both pairings, pass-through dimensions of
partial rotary stay as they are, latent attention moves the values, dynamic RoPE's position limit."""

import pytest
import torch

from sac_rag import InvalidInputError
from sac_rag.rope import KeyRotator

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2) / 8))  # 4 frequencies: 8 rotary dimensions


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotations_compose_invert_and_leave_pass_through_dimensions(interleaved):
    rotator = KeyRotator(torch.stack([INV_FREQ, INV_FREQ * 0.5]), interleaved=interleaved)
    keys = torch.randn(2, 3, 5, 12, generator=torch.Generator().manual_seed(0))  # 8 rotated + 4 passed
    moved = rotator.rotate(keys, 7)
    assert not torch.allclose(moved[..., :8], keys[..., :8])
    assert torch.equal(moved[..., 8:], keys[..., 8:])
    torch.testing.assert_close(moved.norm(dim=-1), keys.norm(dim=-1))
    torch.testing.assert_close(rotator.rotate(moved, 3000), rotator.rotate(keys, 3007), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotator.rotate(moved, -7), keys, atol=1e-6, rtol=1e-6)


def test_pairings_differ_as_the_models_pair_dimensions():
    """Halves pair dimension i with i + 4 (Llama's rotate_half), neighbours pair 2i with 2i + 1 (GPT-J)."""
    keys = torch.zeros(1, 1, 1, 8)
    keys[..., 0] = 1.0
    halves = KeyRotator(INV_FREQ[None]).rotate(keys, 1).flatten()
    pairs = KeyRotator(INV_FREQ[None], interleaved=True).rotate(keys, 1).flatten()
    one = torch.tensor(1.0)
    torch.testing.assert_close(halves[[0, 4]], torch.stack([one.cos(), one.sin()]))
    torch.testing.assert_close(pairs[[0, 1]], torch.stack([one.cos(), one.sin()]))
    assert halves[1:4].abs().sum() == 0 and pairs[2:].abs().sum() == 0


def test_latent_attention_moves_the_rotated_part_cached_as_values():
    rotator = KeyRotator(INV_FREQ[None], rotates_values=True)
    latent, rotated = torch.randn(1, 1, 3, 32), torch.randn(1, 1, 3, 8)
    keys, values = rotator.move(latent, rotated, 5)
    assert keys is latent
    torch.testing.assert_close(values, KeyRotator(INV_FREQ[None]).rotate(rotated, 5))
    with pytest.raises(ValueError, match="rotated key part"):
        rotator.move(latent, torch.randn(1, 1, 3, 16), 5)
    with pytest.raises(ValueError, match="narrower"):
        KeyRotator(INV_FREQ[None]).rotate(torch.randn(1, 1, 3, 4), 5)


def test_latent_attention_whose_rotated_width_is_not_the_rotary_modules_is_refused():
    """Which cached dimensions carry positions cannot be told then: refused, not rotated wrongly."""
    from types import SimpleNamespace

    from sac_rag import UnsupportedModelError
    from sac_rag.rope import _latent_attention

    config = SimpleNamespace(kv_lora_rank=32, qk_rope_head_dim=8)
    assert _latent_attention(config, 4, "deepseek_v3")
    assert not _latent_attention(SimpleNamespace(kv_lora_rank=None, qk_rope_head_dim=8), 4, "llama")
    with pytest.raises(UnsupportedModelError, match="qk_rope_head_dim=8 but its rotary module has 8 frequencies"):
        _latent_attention(config, 8, "deepseek_v3")


def test_position_limit_refuses_chunks_reaching_it():
    KeyRotator(INV_FREQ[None]).check_positions(10**6)  # no limit: static RoPE
    rotator = KeyRotator(INV_FREQ[None], position_limit=128)
    rotator.check_positions(127)
    with pytest.raises(InvalidInputError, match="at most 127 tokens"):
        rotator.check_positions(128)
