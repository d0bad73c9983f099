"""Lossy 8-bit storage of anchor K/V: one absmax scale per (layer, head).

Stored anchor K/V dominate the size of a precompressed corpus. Storing them in 8 bits halves
a bf16/fp16 store. Keys and values have very different ranges per layer and per head (some
heads carry a few large outlier channels), so one scale per tensor would waste the 8 bits on
the largest head; a scale per ``[layer, head]``, taken as the absolute maximum over
``anchors x head_dim``, keeps every head at full 8-bit resolution for the price of
``layers x heads`` float32 numbers.

Two codecs:

- ``"fp8"``: ``torch.float8_e4m3fn`` (3 mantissa bits, so about 6 % worst-case relative error
  per element, but a relative error: small values stay accurate).
- ``"int8"``: symmetric, rounded to the nearest of 255 levels (absolute error at most half a
  step, ``absmax / 254``: small values lose relative accuracy, typical ones are closer than
  with fp8).
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError

CODECS = ("fp8", "int8")

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448
_INT8_MAX = 127.0
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_NORMAL = float(torch.finfo(torch.float32).smallest_normal)  # 2**-126


def quantize(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` of shape ``[layers, heads, anchors, head_dim]`` -> (8-bit tensor of the same shape,
    float32 scales of shape ``[layers, heads]``, each positive and finite), with ``x ~= q * scale``.
    NaN and infinite values (and values beyond float32's range) are refused: they have no
    8-bit code, and one of them would spoil the scale of its whole head."""
    if not isinstance(codec, str) or codec not in CODECS:
        raise InvalidInputError(f"unknown 8-bit codec {codec!r}; use one of {CODECS}")
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"expected a tensor of K/V to quantize, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise InvalidInputError(f"cannot quantize a {x.dtype} tensor; K/V are real numbers")
    if x.dim() != 4:
        raise InvalidInputError(f"expected [layers, heads, anchors, head_dim], got {tuple(x.shape)}")
    x = x.detach().to(torch.float32)
    if x.shape[2] * x.shape[3] == 0:
        absmax = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    else:
        absmax = x.abs().amax(dim=(2, 3))  # NaN where a head holds a NaN
    if not torch.isfinite(absmax).all():
        layer, head = (~torch.isfinite(absmax)).nonzero()[0].tolist()
        raise InvalidInputError(
            f"cannot quantize NaN or infinite K/V (or values beyond float32's range), first in "
            f"layer {layer}, head {head}")
    top = _FP8_MAX if codec == "fp8" else _INT8_MAX
    scale = absmax / top
    # A scale below float32's normal range has few bits (and one below its smallest subnormal
    # is 0, which no store can decode): there, round it up to the next float32 so that the
    # head's largest value still fits in the codes (``absmax / scale <= top``). Normal scales
    # are used as they are.
    coarse = (absmax > 0) & (scale < _F32_NORMAL) & (scale * top < absmax)
    scale = torch.where(coarse, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    # An all-zero head gets scale 1: its codes are all zero and decode to exact zeros.
    scale = torch.where(absmax > 0, scale, torch.ones_like(absmax))
    scaled = x / scale[:, :, None, None]
    if codec == "fp8":
        q = scaled.clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
    else:
        q = scaled.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize``: ``q * scale`` in ``dtype`` (a floating-point dtype)."""
    if not isinstance(q, torch.Tensor) or q.dtype not in (_FP8, torch.int8):
        raise InvalidInputError(f"not an 8-bit code tensor: {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 4 or not isinstance(scale, torch.Tensor) or tuple(scale.shape) != tuple(q.shape[:2]):
        raise InvalidInputError(
            f"codes of shape {tuple(q.shape)} need codes [layers, heads, anchors, head_dim] and one "
            f"scale per (layer, head), got scales of shape {tuple(getattr(scale, 'shape', ()))}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or torch.finfo(dtype).bits < 16:
        raise InvalidInputError(f"dequantize to a floating-point dtype of 16 bits or more, not {dtype}")
    decoded = q.to(torch.float32) * scale.to(torch.float32)[:, :, None, None]
    # The top code times a head's scale may round past float32's largest value when that value
    # was the head's absmax: it decodes to it, not to an infinity (finite values are unchanged).
    return decoded.clamp_(-_F32_MAX, _F32_MAX).to(dtype)


def round_trip(kv, codec: str):
    """``kv`` (an ``AnchorKV``) as an 8-bit store would return it: keys and values quantized
    with ``codec`` and dequantized to their dtype (for measuring what 8-bit storage costs)."""
    from dataclasses import replace

    keys, values = (dequantize(*quantize(x, codec), x.dtype) for x in (kv.keys, kv.values))
    return replace(kv, keys=keys, values=values)
