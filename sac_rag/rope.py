"""Exact re-positioning of cached keys for RoPE models.

A key cached at position p carries the rotation R(p). Rotations compose, R(p + d) = R(d) R(p),
so a chunk encoded once at positions 0..n-1 can be placed at any offset d by rotating its
stored keys by d (METHOD.md, "Positions"). Values carry no position and stay as they are.
"""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError

# RoPE variants whose frequencies do not depend on the sequence length: rotation is exact.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "proportional"}


class KeyRotator:
    """Rotates keys of shape ``[layers, kv_heads, tokens, head_dim]`` (or with a leading batch
    dimension on each layer) by a position delta. Built from a loaded model's rotary modules."""

    def __init__(self, inv_freq_per_layer: torch.Tensor):
        # [layers, rotary_dim // 2], float64 so that large offsets lose no precision.
        self.inv_freq = inv_freq_per_layer.detach().to(torch.float64).cpu()

    @classmethod
    def from_model(cls, model) -> KeyRotator:
        config = model.config.get_text_config(decoder=True)
        rotary = _find_rotary(model)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        rows = []
        for layer_type in layer_types:
            rope_type = _rope_type(config, layer_type)
            if rope_type not in _STATIC_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"RoPE type {rope_type!r} changes its frequencies with the sequence length, so "
                    f"cached keys cannot be moved exactly; use a model with one of {sorted(_STATIC_ROPE_TYPES)}"
                )
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
            rows.append(rotary.inv_freq if inv_freq is None else inv_freq)
        return cls(torch.stack([r.float() for r in rows]))

    @property
    def num_layers(self) -> int:
        return self.inv_freq.shape[0]

    def rotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated from their positions p to p + delta (``delta`` may be negative)."""
        if delta == 0:
            return keys
        if keys.shape[0] != self.num_layers:
            raise ValueError(f"keys have {keys.shape[0]} layers, this model has {self.num_layers}")
        angles = float(delta) * self.inv_freq  # [L, R/2]
        emb = torch.cat([angles, angles], dim=-1)  # HF's rotate_half layout
        rotary_dim = emb.shape[-1]
        shape = [keys.shape[0]] + [1] * (keys.dim() - 2) + [rotary_dim]
        cos = emb.cos().to(keys.device, torch.float32).view(shape)
        sin = emb.sin().to(keys.device, torch.float32).view(shape)
        k = keys.float()
        k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
        half = rotary_dim // 2
        rotated_half = torch.cat([-k_rot[..., half:], k_rot[..., :half]], dim=-1)
        out = torch.cat([k_rot * cos + rotated_half * sin, k_pass], dim=-1)
        return out.to(keys.dtype)


def _find_rotary(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding module (`rotary_emb`); SAC needs a RoPE model"
        )
    return rotary


def _rope_type(config, layer_type: str) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return params.get("rope_type", "default")
