"""sac_rag.devices: "auto" computes in bfloat16 only where the device does so natively; and a
model sharded over several devices (device_map="auto") compresses and reads chunks with each
layer's K/V on that layer's device.

Emulated bfloat16 is no small cost: on an AVX2-only CPU a prefill ran 6.5x and a training step
18x slower than in float32 (benchmarks/dtype_speed.py)."""

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import Generator, SACCompressor, SACConfig, devices
from sac_rag.devices import bf16_is_fast, layer_devices, resolve_dtype
from sac_rag.errors import InvalidInputError
from sac_rag.generation import _select_rows

CPU = torch.device("cpu")
META = torch.device("meta")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_the_cpu_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "bf16_is_fast", lambda device: native)
    assert resolve_dtype(None, CPU) == resolve_dtype("auto", CPU) == expected


def test_auto_on_a_gpu_is_bfloat16_only_where_that_gpu_computes_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes where bfloat16 is only emulated (a T4 or V100,
    compute capability < 8), and asks about the current GPU rather than the one named."""
    capabilities = {0: (7, 5), 1: (8, 0)}  # a T4 beside an A100
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts there
    assert resolve_dtype("auto", torch.device("cuda")) == resolve_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm GPUs compute it natively
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16


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


def test_auto_and_cuda_without_an_index_are_this_processs_own_gpu(monkeypatch):
    """Under torchrun (LOCAL_RANK) each process's own GPU, modulo the GPUs it sees (per-task binding
    shows each process only its own); else the current GPU, so that a worker thread's default of
    GPU 0 does not move a model another GPU was chosen for."""
    from sac_rag.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # every thread's is GPU 0, not read
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # e.g. after torch.cuda.set_device(1)
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    for local, gpu in (("0", 0), ("1", 1), ("3", 1)):
        monkeypatch.setenv("LOCAL_RANK", local)
        assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an index chosen is kept


def test_an_mps_device_this_machine_lacks_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    """Not torch's RuntimeError from moving the loaded weights there."""
    from sac_rag import load_base_model
    from sac_rag.devices import resolve_device

    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="sees no Apple-silicon GPU \\(MPS\\): use device='cpu'"):
        load_base_model(tmp_path / "tiny", device="mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == resolve_device(torch.device("mps")) == torch.device("mps")


# -- a model sharded over devices, as device_map="auto" shards it over GPUs ----------------------
#
# Simulated on the CPU: under FakeTensorMode tensors carry shapes and devices but no data, and an op
# mixing devices raises as it would on two GPUs. "meta" and "cpu" stand for the two GPUs, each way
# round, so a tensor made on the input device and one made on the CPU by default are both caught.

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. In 1889 the tower was finished."


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.to(device) for v in value)  # e.g. the (cos, sin) position embeddings
    return value  # the cache object itself is not moved: each layer's K/V must already be on its device


@contextlib.contextmanager
def _sharded(comp: SACCompressor, first: torch.device, second: torch.device, monkeypatch):
    """The compressor's model with its embeddings and first two layers on ``first`` and the rest on
    ``second``; each module moves its inputs to its own device (accelerate's hooks do so)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = comp.base_model
    fingerprint = comp.fingerprint  # hashed from the weights' data, which fake tensors do not have
    monkeypatch.setattr(SACCompressor, "fingerprint", property(lambda self: fingerprint))
    placement = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                 "model.layers.1": first, "model.layers.2": second, "model.layers.3": second,
                 "model.norm": second, "lm_head": second}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, device in placement.items():
            module = model.get_submodule(name).to(device)
            module.register_forward_pre_hook(
                lambda _, args, kwargs, d=device: (tuple(_moved(a, d) for a in args),
                                                   {k: _moved(v, d) for k, v in kwargs.items()}),
                with_kwargs=True)
        if comp.anchor_embedding.device != first:  # as if built on the sharded model
            comp.anchor_embedding = torch.nn.Parameter(comp.anchor_embedding.detach().to(first))
        yield [first, first, second, second]


def _tiny_compressor() -> SACCompressor:
    model, tokenizer = make_tiny_llama()
    return SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=16, lora_rank=4, lora_alpha=8),
                         model=model, tokenizer=tokenizer)


SHARDINGS = pytest.mark.parametrize(("first", "second"), [(META, CPU), (CPU, META)], ids=["meta-cpu", "cpu-meta"])


@SHARDINGS
def test_a_sharded_model_compresses_each_layer_where_it_sits_into_chunks_on_its_input_device(first, second,
                                                                                             monkeypatch):
    comp = _tiny_compressor()
    with _sharded(comp, first, second, monkeypatch) as placed:
        assert layer_devices(comp.base_model, 4) == placed
        chunks = comp.compress_batch([TEXT, TEXT[:30]])  # several chunks of different lengths in one batch
    kv = chunks[0][0]
    assert len(chunks[0]) > 1 and kv.keys.shape[:3] == (4, 2, kv.n_anchors)
    assert {c.keys.device for text in chunks for c in text} == {c.values.device for text in chunks for c in text} \
        == {first}
    assert kv.positions.device == CPU


@SHARDINGS
def test_a_sharded_model_reads_each_spliced_layer_on_its_own_device_and_keeps_it_there_through_beams(
        first, second, monkeypatch):
    from transformers.cache_utils import DynamicLayer

    select = DynamicLayer.batch_select_indices

    def on_its_device(layer, indices):  # CUDA refuses an index on another GPU; fake tensors let it pass
        assert indices.device == layer.keys.device
        select(layer, indices)

    monkeypatch.setattr(DynamicLayer, "batch_select_indices", on_its_device)
    comp = _tiny_compressor()
    gen = Generator.from_compressor(comp)
    a, b = comp.compress(TEXT)[:2]  # real CPU tensors, as a store returns them
    with _sharded(comp, first, second, monkeypatch) as placed:
        assert gen.device == first
        states = [gen._prefill([" The text:", a, " Who finished it?"]),  # text read before the chunk
                  gen._prefill([a, b, " Who?"])]  # a chunk first: the layers' devices decide
        for state in states:
            assert [layer.keys.device for layer in state.cache.layers] == placed
            assert [layer.values.device for layer in state.cache.layers] == placed
        reading = gen._reading(states)  # the prompts decoded together: one step, tokens from the last device
        with gen._reading_model(True) as model:
            gen._advance(model, reading, reading.logits.argmax(-1))
        assert reading.logits.shape[0] == 2 and reading.mask.device == reading.positions.device == first
        _select_rows(reading.cache, [1, 0, 0])  # beam search keeps its best rows (each layer indexed where it is)
        assert [layer.keys.shape[0] for layer in reading.cache.layers] == [3] * 4
        assert [layer.keys.device for layer in reading.cache.layers] == placed


def test_a_layer_offloaded_by_accelerate_is_placed_where_its_hook_computes_not_where_its_weights_wait():
    """device_map="auto" with too little GPU memory keeps some weights on the CPU or disk ('meta'
    in the module) and computes them on a GPU (its hook's execution_device)."""
    from types import SimpleNamespace

    model, _ = make_tiny_llama()
    for name in ("model.embed_tokens", "model.layers.3"):
        module = model.get_submodule(name).to(META)
        module._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device="cpu")])  # a SequentialHook
    model.model.layers[1]._hf_hook = SimpleNamespace(execution_device=torch.device("cpu"))
    assert devices.input_device(model) == CPU
    assert layer_devices(model, 4) == [CPU] * 4
    model.model.layers[2].to(META)  # weights on 'meta' without a hook: that is where it computes
    assert layer_devices(model, 4) == [CPU, CPU, META, CPU]


def _offloaded_to_disk(model, tmp_path):
    """``model`` as device_map="auto" leaves it with too little GPU memory: every other decoder
    layer's weights offloaded (here to disk; 'meta' in the module, read by its hook when it computes)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(model.config.num_hidden_layers)}
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=tmp_path)


def test_a_model_offloaded_by_accelerate_keeps_its_fingerprint_and_answers_as_when_loaded_whole(tmp_path):
    """Its fingerprint reads the offloaded weights where accelerate keeps them (hashing 'meta' raised
    NotImplementedError); a compressor with LoRA adapters, which peft would create on 'meta' without
    values, is refused saying why, and one without adapters (KV dropping) reads the model as loaded whole."""
    (whole, tokenizer), offloaded = make_tiny_llama(), _offloaded_to_disk(make_tiny_llama()[0], tmp_path)
    assert any(p.is_meta for p in offloaded.parameters())
    with pytest.raises(InvalidInputError, match=r"weights offloaded by accelerate.*load the model fully"):
        SACCompressor(SACConfig(ratio=2, lora_rank=4), model=offloaded, tokenizer=tokenizer)
    kv_dropping = SACConfig(ratio=2, lora_rank=0, bidirectional=False, anchor_embedding="none")
    compressors = [SACCompressor(kv_dropping, model=m, tokenizer=tokenizer) for m in (whole, offloaded)]
    assert compressors[0].fingerprint == compressors[1].fingerprint
    answers = [Generator.from_compressor(c).generate([*c.compress("Paris is the capital of France."), "\nQ: what?\nA:"])
               .text for c in compressors]
    assert answers[0] == answers[1] and answers[0]
