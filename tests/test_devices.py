"""sac_rag.devices: "auto" computes in bfloat16 only where the device does so natively.

Emulated bfloat16 is no small cost: on an AVX2-only CPU a prefill ran 6.5x and a training step
18x slower than in float32 (benchmarks/dtype_speed.py)."""

from pathlib import Path

import pytest
import torch

from sac_rag import devices
from sac_rag.devices import bf16_is_fast, resolve_dtype
from sac_rag.errors import InvalidInputError

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_the_cpu_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "bf16_is_fast", lambda device: native)
    assert resolve_dtype(None, CPU) == resolve_dtype("auto", CPU) == expected


def test_auto_on_a_gpu_is_bfloat16_where_supported_else_float16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16


def test_an_explicit_dtype_is_kept_whatever_the_hardware(monkeypatch):
    monkeypatch.setattr(devices, "bf16_is_fast", lambda device: False)
    assert resolve_dtype("bf16", CPU) == resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("fp32", CPU) == resolve_dtype(torch.float32, CPU) == torch.float32
    with pytest.raises(InvalidInputError, match="float8"):
        resolve_dtype("float8", CPU)


def test_bf16_detection_agrees_with_the_cpus_own_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo")
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
    if not lines:
        pytest.skip("not an x86 CPU (no 'flags' line)")
    flags = set(lines[0].split(":", 1)[1].split())
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert bf16_is_fast(CPU)
    if not flags & {"avx512f", "avx_ne_convert", "amx_bf16"}:  # no bf16 arithmetic short of emulation
        assert not bf16_is_fast(CPU)


def test_a_device_is_named_as_a_string_or_a_torch_device_and_one_this_machine_lacks_is_refused(monkeypatch):
    from sac_rag.devices import resolve_device

    assert bf16_is_fast("cpu") == bf16_is_fast(CPU)
    assert resolve_device("cpu") == resolve_device(CPU) == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == CPU
    with pytest.raises(InvalidInputError, match="sees no CUDA GPU: use device='cpu'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidInputError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2")
    with pytest.raises(InvalidInputError, match="not a torch device"):
        resolve_device("gpu")
