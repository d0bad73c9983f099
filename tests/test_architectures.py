"""SAC's exactness checks hold beyond Llama: tiny random Qwen2, Qwen3, Mistral and Gemma3."""

import pytest
import torch
from conftest import _tiny_tokenizer

from sac_rag import GenerationConfig, Generator, SACCompressor, SACConfig

TEXT = "Paris is the capital of France. In 1889 the tower was finished. The quick brown fox."


def _build(arch: str):
    import transformers

    tokenizer = _tiny_tokenizer()
    common = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
    }
    if arch == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=64,
                                               layer_types=["sliding_attention", "full_attention"])
        model_cls = transformers.Gemma3ForCausalLM
    else:
        config_cls, model_cls = {
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[arch]
        config = config_cls(**common)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.requires_grad_(False)
    model.sac_model_id = f"tiny-{arch}"
    return model, tokenizer


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_all_tokens_as_anchors_reproduces_full_context_logits(arch):
    model, tokenizer = _build(arch)
    comp = SACCompressor(SACConfig(base_model=arch, ratio=1, chunk_len=64, bidirectional=False,
                                   anchor_embedding="none", lora_rank=0), model=model, tokenizer=tokenizer)
    gen = Generator.from_compressor(comp)
    question = " Who finished it?"
    ids = (tokenizer(TEXT, add_special_tokens=False)["input_ids"]
           + tokenizer(question, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    ours = gen.prompt_logits([comp.compress(TEXT), question])
    torch.testing.assert_close(ours, full[-ours.shape[0]:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_chunk_encoded_at_offset_equals_rotated_chunk(arch):
    model, tokenizer = _build(arch)
    comp = SACCompressor(SACConfig(base_model=arch, ratio=3, chunk_len=64, lora_rank=4, lora_alpha=8),
                         model=model, tokenizer=tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    at_zero = comp.compress_chunks([ids], offsets=[0])[0]
    there = comp.compress_chunks([ids], offsets=[45])[0]
    torch.testing.assert_close(at_zero.at_offset(45, comp.rotator).keys, there.keys, atol=1e-4, rtol=1e-4)
    gen = Generator.from_compressor(comp)
    cfg = GenerationConfig(max_new_tokens=8)
    assert gen.generate([at_zero, " and"], cfg).token_ids == gen.generate([there, " and"], cfg).token_ids
