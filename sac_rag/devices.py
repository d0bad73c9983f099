"""One place that turns the user's ``device=`` / ``dtype=`` arguments into torch objects."""

from __future__ import annotations

import torch

from .errors import InvalidInputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> the first CUDA GPU when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device={device!r} is not a torch device ('cpu', 'cuda:0', ...)") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device={device!r}, but this torch sees no CUDA GPU: use device='cpu', or "
                                    "install a CUDA build of torch (make install TORCH_SPEC=torch)")
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise InvalidInputError(f"device={device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                    f"numbered from 0")
    return resolved


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively. CPUs without bf16 instructions (or
    oneDNN's bf16 kernels) emulate it, and there it is far slower than float32: 6.5x for a
    prefill, 1.3x for a decode step and 18x for a training step on an AVX2-only AMD EPYC
    (benchmarks/dtype_speed.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bfloat16 where the device computes it natively (``bf16_is_fast``),
    else float16 on CUDA and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if bf16_is_fast(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError as err:
        raise InvalidInputError(
            f"dtype={dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or a torch.dtype"
        ) from err


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
