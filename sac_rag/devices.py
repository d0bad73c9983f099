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
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device={device!r} is not a torch device ('cpu', 'cuda:0', ...)") from err


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bfloat16 (fastest for inference on GPUs and on these CPUs alike),
    float16 on CUDA devices without bf16 support."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError as err:
        raise InvalidInputError(
            f"dtype={dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or a torch.dtype"
        ) from err


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
