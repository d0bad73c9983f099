"""SAC's exactness checks hold beyond Llama, on tiny random models of each family (no model hub):
scaled and dynamic RoPE, partial rotary, interleaved pairs, layers without RoPE, multi-head latent
attention; and families whose positions cannot be moved by rotating keys are refused, naming why."""

import pytest
import torch
from conftest import _tiny_tokenizer

from sac_rag import GenerationConfig, Generator, InvalidInputError, SACCompressor, SACConfig, UnsupportedModelError

TEXT = "Paris is the capital of France. In 1889 the tower was finished. The quick brown fox."
OFFSET = 45
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16}
_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 2, "moe_intermediate_size": 32}
_TWO_TYPES = {"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}


def _rope(rope_type: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **params}}


# name -> (config class, model class, config overrides, LoRA target modules of the offset test).
# What each adds over Llama is in its comment; the common tiny sizes are in _build.
SUPPORTED = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, None),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, **_TWO_TYPES}, None),  # per-type freqs
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM", _rope("llama3", factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=256), None),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", _rope("linear", factor=4.0), None),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", _rope("yarn", factor=4.0,
                   original_max_position_embeddings=512), None),
    # dynamic NTK: exact below max_position_embeddings (test_dynamic_rope_... checks the limit)
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", {"max_position_embeddings": 128,
                      **_rope("dynamic", factor=2.0)}, None),
    # LongRoPE held at its original length never switches to its long factors
    "phi3-longrope-short": ("Phi3Config", "Phi3ForCausalLM", {
        "max_position_embeddings": 1024, "original_max_position_embeddings": 1024,
        **_rope("longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)}, ["qkv_proj"]),
    # partial rotary: the first dimensions of each head are rotated, the rest pass
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.25}, ["query_key_value"]),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}, None),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"partial_rotary_factor": 0.25}, None),
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}, ["qkv_proj"]),
    # interleaved: neighbours (2i, 2i+1) pair up; GPT-J's frequencies come from a sin/cos table
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, None),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"rotary_dim": 8}, None),
    "glm": ("GlmConfig", "GlmForCausalLM", {"head_dim": 16}, None),  # and partial
    # layers without RoPE: SmolLM3's use_rope per layer, Cohere2's full-attention layers
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0], "use_sliding_window": False},
                None),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", _TWO_TYPES, None),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", _TWO_TYPES, None),
    # multi-head latent attention: the cache keeps the latent as keys, the rotated part as values
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**_MLA, **_MOE, "n_group": 1, "topk_group": 1},
                    ["q_proj", "kv_a_proj_with_mqa"]),
    "deepseek_v3-interleave": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MLA, **_MOE, "n_group": 1, "topk_group": 1, "rope_interleave": True}, ["q_proj", "kv_a_proj_with_mqa"]),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {**_MLA, **_MOE}, ["q_proj", "kv_a_proj_with_mqa"]),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", _MLA, ["q_proj", "kv_a_proj_with_mqa"]),
    # gpt-oss: no rotate_half in its modelling code (its own _apply_rotary_emb), attention sinks
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                **_TWO_TYPES}, None),
    # Llama-like, with their own norms, scalings and attention layouts
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, **_TWO_TYPES}, None),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, None),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "attention_multiplier": 0.2,
                "residual_multiplier": 0.5, "logits_scaling": 2.0}, None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ["qkv_proj"]),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2},
               ["query_key_value"]),
}

# name -> (config class, model class, config overrides, what the refusal must say)
REFUSED = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}, r"learned absolute position embeddings \(`wpe`\)"),
    "bloom": ("BloomConfig", "BloomForCausalLM", {}, "ALiBi"),
    "mpt": ("MptConfig", "MptForCausalLM", {"d_model": 64, "n_heads": 4, "n_layers": 2}, "ALiBi"),
    "falcon-alibi": ("FalconConfig", "FalconForCausalLM", {"alibi": True}, r"ALiBi \(alibi=True\)"),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", {
        "max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
        **_rope("longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, factor=4.0)},
        r"LongRoPE.*Load it with max_position_embeddings=1024"),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", {"head_dim": 16, "num_local_experts": 2,
               "intermediate_size_mlp": 128}, "chunked attention"),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}, "convolution"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        "layer_types": ["linear_attention", "full_attention"], "head_dim": 16, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32}, r"recurrent layers"),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", {}, r"recurrent \(state-space\) branch"),
    # RoPE or none, as the decoder passes each layer: SAC cannot tell which keys carry positions
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", {}, "`position_embeddings is not None`"),
}


def _build(name: str, specs: dict = SUPPORTED):
    import transformers

    config_name, model_name, overrides = specs[name][:3]
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    tokenizer = _tiny_tokenizer()
    config = getattr(transformers, config_name)(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
        **overrides,
    })
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.requires_grad_(False)
    model.sac_model_id = f"tiny-{name}"
    return model, tokenizer


@pytest.mark.parametrize("arch", list(SUPPORTED))
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


@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_chunk_encoded_at_offset_equals_rotated_chunk(arch):
    """The foundation of storing chunks at offset 0: encoding at d == encoding at 0, then rotating
    by d (bidirectional encoder with an adapter and anchor embeddings, as trained)."""
    model, tokenizer = _build(arch)
    targets = SUPPORTED[arch][3] or ["q_proj", "v_proj"]
    comp = SACCompressor(SACConfig(base_model=arch, ratio=3, chunk_len=64, lora_rank=4, lora_alpha=8,
                                   lora_target_modules=targets), model=model, tokenizer=tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    at_zero = comp.compress_chunks([ids], offsets=[0])[0]
    there = comp.compress_chunks([ids], offsets=[OFFSET])[0]
    moved = at_zero.at_offset(OFFSET, comp.rotator)
    assert not torch.allclose(at_zero.keys, there.keys) or not torch.allclose(at_zero.values, there.values)
    torch.testing.assert_close(moved.keys, there.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.values, there.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.at_offset(0, comp.rotator).keys, at_zero.keys, atol=1e-5, rtol=1e-5)
    gen = Generator.from_compressor(comp)
    cfg = GenerationConfig(max_new_tokens=8)
    assert gen.generate([at_zero, " and"], cfg).token_ids == gen.generate([there, " and"], cfg).token_ids


# Sliding-window attention narrower than a chunk: each family's own way of naming the window
WINDOW = 8
SLIDING = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, **_TWO_TYPES, "sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, **_TWO_TYPES, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                 "max_window_layers": 0}),
}


@pytest.mark.parametrize("arch", list(SLIDING))
def test_chunks_wider_than_a_sliding_window_keep_every_anchors_kv(arch):
    """The encoder keeps every token's K/V in a sliding-window layer too (a cache made from the
    config keeps only the last window, so the anchor indices would miss): all tokens as anchors
    still give the full context's logits, and a chunk's anchors are those of the same weights
    with a window wider than the chunk, which attends alike within the chunk."""
    model, tokenizer = _build(arch, SLIDING)
    comp = SACCompressor(SACConfig(base_model=arch, ratio=1, chunk_len=64, bidirectional=False,
                                   anchor_embedding="none", lora_rank=0), model=model, tokenizer=tokenizer)
    question = " Who finished it?"
    ids = (tokenizer(TEXT, add_special_tokens=False)["input_ids"]
           + tokenizer(question, add_special_tokens=False)["input_ids"])
    assert len(ids) > 2 * WINDOW
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    ours = Generator.from_compressor(comp).prompt_logits([comp.compress(TEXT), question])
    torch.testing.assert_close(ours, full[-ours.shape[0]:], atol=1e-4, rtol=0)

    wide, _ = _build(arch, {arch: (*SLIDING[arch][:2], {**SLIDING[arch][2], "sliding_window": 4096})})
    chunk = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:WINDOW]
    kept = [SACCompressor(SACConfig(base_model=arch, ratio=4, chunk_len=WINDOW, bidirectional=False,
                                    anchor_embedding="none", lora_rank=0), model=m, tokenizer=tokenizer
                          ).compress_chunks([chunk], offsets=[0])[0] for m in (model, wide)]
    torch.testing.assert_close(kept[0].keys, kept[1].keys, atol=0, rtol=0)
    torch.testing.assert_close(kept[0].values, kept[1].values, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_prompts_of_other_lengths_past_a_sliding_window_decode_together_as_alone(arch):
    """A sliding-window layer caches a prompt's last window only: the batch's left-padded cache
    is cropped to the window again, so each row answers as it does alone."""
    model, tokenizer = _build(arch, SLIDING)
    comp = SACCompressor(SACConfig(base_model=arch, ratio=2, chunk_len=12, bidirectional=False,
                                   anchor_embedding="none", lora_rank=0), model=model, tokenizer=tokenizer)
    gen = Generator.from_compressor(comp)
    first, second = comp.compress(TEXT), comp.compress("The quick brown fox. Anchors carry the meaning.")
    prompts = [[*first, *second, " Who finished it?"], [*second, " Who?"], [" Who finished the tower in Paris?"]]
    config = GenerationConfig(max_new_tokens=6)
    alone = [gen.generate(prompt, config).token_ids for prompt in prompts]
    assert [g.token_ids for g in gen.generate_batch(prompts, config)] == alone


@pytest.mark.parametrize(("arch", "nope_layers"), [("smollm3", [1]), ("cohere2", [1]), ("exaone4", [1])])
def test_layers_without_rope_keep_their_keys(arch, nope_layers):
    """A RoPE-less layer's keys are the same at every offset, so the rotator leaves them alone."""
    model, tokenizer = _build(arch)
    comp = SACCompressor(SACConfig(base_model=arch, ratio=1, chunk_len=64, bidirectional=False,
                                   anchor_embedding="none", lora_rank=0), model=model, tokenizer=tokenizer)
    assert [i for i, row in enumerate(comp.rotator.inv_freq) if not row.any()] == nope_layers
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    at_zero, there = comp.compress_chunks([ids, ids], offsets=[0, OFFSET])
    for layer in nope_layers:
        torch.testing.assert_close(there.keys[layer], at_zero.keys[layer], atol=1e-5, rtol=1e-5)


def test_dynamic_rope_is_exact_below_its_limit_and_refuses_encoding_past_it():
    model, tokenizer = _build("llama-dynamic")
    limit = model.config.max_position_embeddings
    with torch.no_grad():  # a long pass grows the model's frequencies; SAC keeps the unscaled ones
        model(input_ids=torch.zeros(1, limit + 20, dtype=torch.long))
    comp = SACCompressor(SACConfig(base_model="dyn", ratio=1, chunk_len=64, bidirectional=False,
                                   anchor_embedding="none", lora_rank=0), model=model, tokenizer=tokenizer)
    assert comp.rotator.position_limit == limit
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    last = limit - 1 - len(ids)  # the chunk's last token sits just before the limit
    at_zero, there = comp.compress_chunks([ids, ids], offsets=[0, last])
    torch.testing.assert_close(at_zero.at_offset(last, comp.rotator).keys, there.keys, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match=f"max_position_embeddings={limit}.*at most {limit - 1} tokens"):
        comp.compress_chunks([ids], offsets=[last + 1])
    with pytest.raises(InvalidInputError, match="dynamic RoPE"):
        comp.compress(" ".join([TEXT] * 12))  # its later chunks would be encoded past the limit


@pytest.mark.parametrize("arch", list(REFUSED))
def test_models_whose_positions_cannot_be_moved_are_refused_naming_why(arch):
    model, tokenizer = _build(arch, REFUSED)
    with pytest.raises(UnsupportedModelError, match=REFUSED[arch][3]):
        SACCompressor(SACConfig(base_model=arch, lora_rank=0), model=model, tokenizer=tokenizer)
    with pytest.raises(UnsupportedModelError, match=REFUSED[arch][3]):
        Generator(model, tokenizer)


def test_compress_leaves_every_module_in_its_own_mode():
    """A compressor starts in eval mode; train() puts its adapters in training mode and leaves the
    base model, the decoder too, in eval (no dropout of its own, ever). compress runs in eval mode
    and then restores each module's own flag."""
    model, tokenizer = _build("qwen2")
    comp = SACCompressor(SACConfig(base_model="qwen2", ratio=3, chunk_len=64, lora_rank=4, lora_alpha=8,
                                   decoder_lora_rank=4), model=model, tokenizer=tokenizer)
    assert not any(module.training for module in comp.modules())
    comp.train()
    before = {name: module.training for name, module in comp.named_modules()}
    lora = [name for name in before if ".lora_" in name]  # peft's lora_A / lora_B / lora_dropout
    assert before[""] and lora and all(before[name] for name in lora)
    assert not any(module.training for module in model.model.layers[0].self_attn.q_proj.base_layer.modules())
    assert not model.model.layers[0].self_attn.training and not model.model.embed_tokens.training
    comp.compress(TEXT)
    assert {name: module.training for name, module in comp.named_modules()} == before
    assert not any(module.training for module in comp.eval().modules())


def test_a_model_of_several_parts_keeps_one_fingerprint_in_float32_and_bfloat16(tmp_path):
    """Gemma 3 loads (AutoModelForCausalLM) as text and vision parts, and each part's config records
    the dtype it was loaded in: a compressor saved on the float32 model must load on the bfloat16 one."""
    import transformers

    from sac_rag import load_base_model

    tokenizer = _tiny_tokenizer()
    config = transformers.Gemma3Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "max_position_embeddings": 2048, **_TWO_TYPES},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "gemma3")
    tokenizer.save_pretrained(tmp_path / "gemma3")
    model, tokenizer = load_base_model(tmp_path / "gemma3", device="cpu", dtype="float32")
    comp = SACCompressor(SACConfig(base_model=str(tmp_path / "gemma3"), ratio=3, chunk_len=64, lora_rank=4,
                                   lora_alpha=8), model=model, tokenizer=tokenizer)
    comp.save_pretrained(tmp_path / "compressor")
    model, tokenizer = load_base_model(tmp_path / "gemma3", device="cpu", dtype="bfloat16")
    assert model.config.text_config.dtype == torch.bfloat16  # what the fingerprint must not read
    loaded = SACCompressor.from_pretrained(tmp_path / "compressor", model=model, tokenizer=tokenizer)
    assert loaded.base_fingerprint == comp.base_fingerprint


def test_a_latent_attention_model_rotating_with_deepseeks_interleave_function_moves_chunks_exactly():
    """LongCat-Flash's modelling code has no ``rotate_half``: it rotates keys with DeepSeek's
    ``apply_rotary_pos_emb_interleave``, which reads neighbour pairs and returns the rotated part as
    halves. The cache holds halves, so a chunk encoded at offset 0 and moved to d by rotating its cached
    rotary part equals the chunk encoded at d, and both answer alike."""
    specs = {"longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", {
        **_MLA, "q_lora_rank": 16, "head_dim": 8, "n_routed_experts": 4, "moe_topk": 2, "zero_expert_num": 2,
        "expert_ffn_hidden_size": 32, "ffn_hidden_size": 128})}
    model, tokenizer = _build("longcat_flash", specs)
    comp = SACCompressor(SACConfig(base_model="longcat_flash", ratio=3, chunk_len=64, lora_rank=4, lora_alpha=8,
                                   lora_target_modules=["q_b_proj", "kv_a_proj_with_mqa"]),
                         model=model, tokenizer=tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    at_zero = comp.compress_chunks([ids], offsets=[0])[0]
    there = comp.compress_chunks([ids], offsets=[OFFSET])[0]
    moved = at_zero.at_offset(OFFSET, comp.rotator)
    assert not torch.allclose(at_zero.values, there.values)  # the rotated part is cached as "values"
    torch.testing.assert_close(moved.keys, there.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.values, there.values, atol=1e-5, rtol=1e-5)
    gen = Generator.from_compressor(comp)
    cfg = GenerationConfig(max_new_tokens=8)
    assert gen.generate([at_zero, " and"], cfg).token_ids == gen.generate([there, " and"], cfg).token_ids
