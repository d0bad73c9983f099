"""One place that turns the user's ``device=`` / ``dtype=`` arguments into torch objects."""

from __future__ import annotations

import itertools
import os

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
    """``None``/"auto" -> this process's GPU (``local_gpu``) when there is one, else the CPU; "cuda"
    without an index -> this process's GPU."""
    if device is None or device == "auto":
        return local_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device={device!r} is not a torch device ('cpu', 'cuda:0', ...)") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device={device!r}, but this torch sees no CUDA GPU: use device='cpu', or "
                                    "install a CUDA build of torch (make install TORCH_SPEC=torch)")
        if resolved.index is None:
            resolved = local_gpu()
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise InvalidInputError(f"device={device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                    f"numbered from 0")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        # Refused here, not by torch once the model's weights are loaded and moved there.
        raise InvalidInputError(f"device={device!r}, but this torch sees no Apple-silicon GPU (MPS): use "
                                "device='cpu' (or 'auto')")
    return resolved


def resolved_here(device: str | torch.device | None) -> str | torch.device | None:
    """``device`` fixed to the GPU it names in the calling thread, for a model that another thread may
    load later: ``None``, "auto" and "cuda" name the current GPU, which is per thread (a worker
    thread's is GPU 0 whatever the caller chose). Any other ``device`` is returned as given."""
    if device is None or str(device) in ("auto", "cuda"):
        return resolve_device(device)
    return device


def load_settings(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[str, str]:
    """``(device, dtype)`` named as a model loaded with them would have them, to tell settings that come
    to the same apart from those that do not (``None``, "auto" and "cpu" on a machine without a GPU;
    "fp32" and "float32"). The same on either side of CUDA's initialisation, which it does not cause:
    so on a GPU an unset dtype is named "auto" (resolving it reads the GPU's capability, which would
    initialise CUDA). A setting that loading would refuse is named as given."""
    try:
        resolved = resolve_device(device)
        if resolved.type == "cuda" and (dtype is None or dtype == "auto"):
            return str(resolved), "auto"
        return str(resolved), dtype_name(resolve_dtype(dtype, resolved))
    except InvalidInputError:
        return str(device), "auto" if dtype is None else str(dtype)


def local_gpu() -> torch.device:
    """This process's CUDA GPU, by index: under a launcher that starts one process per GPU (torchrun's
    ``LOCAL_RANK``) its own one, modulo the GPUs it sees (with per-task GPU binding each process sees
    only its own, as GPU 0); else the current one, read in the caller's thread. Never initialises
    CUDA (a process that forks workers afterwards must not have): until something does, every
    thread's current GPU is GPU 0 (``torch.cuda.set_device`` initialises it)."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return torch.device("cuda", int(local) % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively. CPUs without bf16 instructions (or
    oneDNN's bf16 kernels) emulate it, and there it is far slower than float32: 6.5x for a
    prefill, 1.3x for a decode step and 18x for a training step on an AVX2-only AMD EPYC
    (benchmarks/dtype_speed.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): by default it also says yes where bfloat16 is only
        # emulated (compute capability < 8: T4, V100), and it asks about the current GPU, not this one.
        if torch.version.hip:
            return True  # ROCm GPUs compute bfloat16 natively
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 8
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


def module_device(module: torch.nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device ``module`` computes on: the execution device of an accelerate hook (a module
    whose weights are offloaded to the CPU or disk keeps them on 'meta' and computes elsewhere),
    else the device of its first parameter or buffer; ``default`` for a module without either."""
    hook = getattr(module, "_hf_hook", None)
    for part in (hook, *getattr(hook, "hooks", ())):  # a SequentialHook holds several
        execution = getattr(part, "execution_device", None)
        if isinstance(execution, int):
            return torch.device("cuda", execution)
        if isinstance(execution, (str, torch.device)):
            return torch.device(execution)
    first = next(itertools.chain(module.parameters(), module.buffers()), None)  # not every tensor: one
    return default if first is None else first.device


def input_device(model) -> torch.device:
    """Where ``model`` reads its input ids: the device of its input embeddings (the first GPU of a
    model sharded with ``device_map``)."""
    embeddings = model.get_input_embeddings()
    return module_device(embeddings) or embeddings.weight.device


def layer_devices(model, num_layers: int) -> list[torch.device]:
    """The device each of ``model``'s ``num_layers`` decoder layers computes its keys and values on.
    A model sharded with ``device_map`` (accelerate) has its layers on several GPUs, and a cache
    handed to it must hold each layer's K/V on that layer's device. Layers that cannot be found
    (an unusual decoder layout) are taken to be on the input device."""
    fallback = input_device(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not (isinstance(layers, torch.nn.ModuleList) and len(layers) == num_layers):
        layers = next((child for child in decoder.children()
                       if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers), None)
    if layers is None:
        return [fallback] * num_layers
    return [module_device(layer, fallback) for layer in layers]
