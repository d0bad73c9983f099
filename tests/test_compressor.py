"""SACCompressor on a tiny random Llama: encoder semantics, batching, positions, checkpoints."""

import errno
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import (
    AnchorKV,
    CheckpointError,
    FingerprintMismatchError,
    GenerationConfig,
    Generator,
    InvalidInputError,
    PromptTemplate,
    SACCompressor,
    SACConfig,
)
from sac_rag import compressor as compressor_module
from sac_rag.anchors import ImportanceAnchors, RandomAnchors, RarestInBlockAnchors, UniformAnchors
from sac_rag.compressor import checkpoint_meta

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "In 1889 the tower was finished. Anchors carry the meaning of a chunk."
)


def _compressor(tiny, **overrides) -> SACCompressor:
    model, tokenizer = tiny
    settings = {"base_model": "tiny", "ratio": 4, "chunk_len": 64, "lora_rank": 8, "lora_alpha": 16}
    settings.update(overrides)
    comp = SACCompressor(SACConfig(**settings), model=model, tokenizer=tokenizer)
    _perturb(comp)
    return comp


def _perturb(comp: SACCompressor, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give every trainable tensor real values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in comp.named_parameters():
            if "lora_" in name or name == "anchor_embedding":
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _ids(tokenizer, text=TEXT * 4):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _last_layer_first_token_key(comp, ids):
    """Encoder state of token 0 as seen by the deepest layer (ratio 1: every token is an anchor)."""
    return comp.compress_chunks([ids])[0].keys[-1, :, 0]


def test_bidirectional_encoder_lets_the_first_token_see_later_tokens(tiny):
    comp = _compressor(tiny, ratio=1, bidirectional=True)
    ids = _ids(comp.tokenizer)[:20]
    changed = ids[:-1] + [(ids[-1] + 1) % len(comp.tokenizer)]
    diff = (_last_layer_first_token_key(comp, ids) - _last_layer_first_token_key(comp, changed)).abs().max()
    assert diff > 1e-3


def test_causal_encoder_keeps_the_first_token_blind_to_later_tokens(tiny):
    comp = _compressor(tiny, ratio=1, bidirectional=False)
    ids = _ids(comp.tokenizer)[:20]
    changed = ids[:-1] + [(ids[-1] + 1) % len(comp.tokenizer)]
    torch.testing.assert_close(
        _last_layer_first_token_key(comp, ids), _last_layer_first_token_key(comp, changed), rtol=0, atol=0
    )


@pytest.mark.parametrize("bidirectional", [True, False])
def test_batched_compression_of_different_lengths_equals_compressing_each_alone(tiny, bidirectional, monkeypatch):
    comp = _compressor(tiny, bidirectional=bidirectional, anchor_embedding="per_slot")
    ids = _ids(comp.tokenizer)
    chunks = [ids[:7], ids[3:40], ids[:1], ids[10:33]]
    monkeypatch.setattr(compressor_module, "MAX_PADDING", float("inf"))  # all four padded into one batch
    together = comp.compress_chunks(chunks, batch_size=4)
    for chunk, kv in zip(chunks, together):
        alone = comp.compress_chunks([chunk])[0]
        assert kv.n_tokens == len(chunk) and kv.n_anchors == alone.n_anchors
        torch.testing.assert_close(kv.keys, alone.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv.values, alone.values, atol=1e-5, rtol=1e-4)


def test_chunks_are_batched_by_length_without_padding_a_batch_by_more_than_a_quarter(tiny, monkeypatch):
    """compress_chunks compresses at most batch_size chunks at once, shortest first, and closes a batch
    before padding to its longest chunk would add more than MAX_PADDING (a quarter) to its tokens; the
    results come back in the input order, each as compressed alone."""
    comp = _compressor(tiny)
    ids = _ids(comp.tokenizer)
    chunks = [ids[:30], ids[:8], ids[1:10], ids[:31], ids[2:12], ids[3:32], ids[:9]]
    batches, encode = [], comp.encode
    monkeypatch.setattr(comp, "encode", lambda batch, offsets, **kw: batches.append([len(c) for c in batch])
                        or encode(batch, offsets, **kw))
    together = comp.compress_chunks(chunks, batch_size=3)
    assert batches == [[8, 9, 9], [10], [29, 30, 31]]
    for chunk, kv in zip(chunks, together):
        torch.testing.assert_close(kv.keys, comp.compress_chunks([chunk])[0].keys, atol=1e-5, rtol=1e-4)


def test_anchor_kv_has_one_entry_per_layer_kv_head_and_anchor(tiny):
    comp = _compressor(tiny, ratio=5)
    ids = _ids(comp.tokenizer)[:50]
    kv = comp.compress_chunks([ids])[0]
    assert kv.keys.shape == (4, 2, 10, 16)  # 4 layers, 2 KV heads, ceil((50-2)/5) anchors, head_dim 16
    assert kv.positions.tolist() == list(range(2, 50, 5))
    assert kv.fingerprint == comp.fingerprint and not kv.keys.requires_grad


@pytest.mark.parametrize("offset", [1, 37, 1000])
def test_chunk_encoded_at_offset_equals_chunk_encoded_at_zero_then_rotated(tiny, offset):
    comp = _compressor(tiny)
    ids = _ids(comp.tokenizer)[:40]
    at_zero = comp.compress_chunks([ids], offsets=[0])[0]
    at_offset = comp.compress_chunks([ids], offsets=[offset])[0]
    moved = at_zero.at_offset(offset, comp.rotator)
    assert moved.positions.tolist() == at_offset.positions.tolist()
    torch.testing.assert_close(moved.keys, at_offset.keys, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(moved.values, at_offset.values, atol=1e-5, rtol=1e-5)
    # and moving back is the inverse
    torch.testing.assert_close(moved.at_offset(0, comp.rotator).keys, at_zero.keys, atol=1e-5, rtol=1e-5)


def test_generation_from_offset_encoding_equals_generation_from_rotated_chunk(tiny):
    comp = _compressor(tiny)
    gen = Generator.from_compressor(comp)
    ids = _ids(comp.tokenizer)[:40]
    prefix = "Paris is the capital"
    offset = len(comp.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    encoded_there = comp.compress_chunks([ids], offsets=[offset])[0]
    encoded_at_zero = comp.compress_chunks([ids], offsets=[0])[0]
    cfg = GenerationConfig(max_new_tokens=12)
    a = gen.generate([prefix, encoded_there, " the tower"], cfg)
    b = gen.generate([prefix, encoded_at_zero, " the tower"], cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_long_text_is_split_into_chunks_never_truncated(tiny):
    comp = _compressor(tiny, chunk_len=16)
    ids = _ids(comp.tokenizer, TEXT * 3)
    chunks = comp.compress(TEXT * 3)
    assert sum(c.n_tokens for c in chunks) == len(ids)
    assert [c.offset for c in chunks] == list(range(0, len(ids), 16))
    assert all(c.n_tokens == 16 for c in chunks[:-1])


def test_compress_batch_groups_chunks_by_text(tiny):
    comp = _compressor(tiny, chunk_len=16)
    texts = [TEXT, "Paris is the capital of France.", TEXT * 2]
    grouped = comp.compress_batch(texts, batch_size=3)
    for text, chunks in zip(texts, grouped):
        assert sum(c.n_tokens for c in chunks) == len(_ids(comp.tokenizer, text))
    alone = comp.compress(texts[1])
    torch.testing.assert_close(grouped[1][0].keys, alone[0].keys, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_reproduces_kv_and_generations(tiny, tmp_path):
    comp = _compressor(tiny, anchor_embedding="per_slot")
    before = comp.compress(TEXT)
    gen_before = Generator.from_compressor(comp).generate([before, " the tower"], GenerationConfig(max_new_tokens=10))
    comp.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = make_tiny_llama()  # a fresh copy of the same base weights
    loaded = SACCompressor.from_pretrained(tmp_path / "ckpt", model=model, tokenizer=tokenizer)
    after = loaded.compress(TEXT)
    assert loaded.fingerprint == comp.fingerprint
    for a, b in zip(before, after):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    gen_after = Generator.from_compressor(loaded).generate([after, " the tower"], GenerationConfig(max_new_tokens=10))
    assert gen_after.token_ids == gen_before.token_ids
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["config"]["anchor_embedding"] == "per_slot" and saved["config"]["ratio"] == 4
    assert "prompt" in saved["config"] and saved["base_fingerprint"] == comp.base_fingerprint


def test_checkpoint_for_another_base_model_is_refused_naming_both(tiny, tmp_path):
    comp = _compressor(tiny)
    comp.save_pretrained(tmp_path / "ckpt")
    other_model, other_tokenizer = make_tiny_llama(seed=7)
    with pytest.raises(FingerprintMismatchError) as info:
        SACCompressor.from_pretrained(tmp_path / "ckpt", model=other_model, tokenizer=other_tokenizer)
    message = str(info.value)
    assert comp.base_fingerprint in message and "tiny-llama-7@" in message
    assert not any("lora_" in name for name, _ in other_model.named_parameters())  # refused before its adapters
    other = _compressor((other_model, other_tokenizer))
    with pytest.raises(FingerprintMismatchError, match="resume with the base model") as info:
        other.load_weights(tmp_path / "ckpt")  # what --resume does, with the base model swapped
    assert comp.base_fingerprint in str(info.value) and other.base_fingerprint in str(info.value)


def test_a_model_under_the_checkpoints_own_base_model_name_with_other_weights_is_refused_saying_so(tiny, tmp_path):
    """Advice to load the compressor with the base model it names helps no one who did: the refusal
    says that model's weights or tokenizer changed instead."""
    comp = _compressor(tiny)
    comp.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = make_tiny_llama(seed=7)
    model.sac_model_id = tiny[0].sac_model_id  # the name the checkpoint's base model has, other weights
    with pytest.raises(FingerprintMismatchError, match="the model loaded as 'tiny-llama-0' is not the one the "
                                                       "compressor was trained on: its weights or tokenizer changed"):
        SACCompressor.from_pretrained(tmp_path / "ckpt", model=model, tokenizer=tokenizer)


def test_a_float16_copy_of_the_base_model_is_known_as_that_model_and_other_models_are_still_refused(tmp_path):
    """float16 holds numbers below 2**-14 with fewer bits: the same weights in float16 get another
    fingerprint (fingerprint.py). A checkpoint records that one too, so it loads on a float16 copy of
    its base model, known by the base model's fingerprint; a checkpoint without it says why it is
    refused and what to load instead."""
    import json

    model, tokenizer = make_tiny_llama()
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] = 1.2345e-6  # float16 keeps it as 1.19e-6
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    saved = _compressor((model, tokenizer))
    path = saved.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    assert meta["base_fingerprint_float16"] != meta["base_fingerprint"] == saved.base_fingerprint

    def the_same_model():
        copy = make_tiny_llama()[0]
        copy.load_state_dict(weights)
        return copy

    half = SACCompressor.from_pretrained(path, model=the_same_model().half(), tokenizer=tokenizer)
    assert half.base_fingerprint == saved.base_fingerprint and half.fingerprint.startswith(saved.base_fingerprint)
    with pytest.raises(FingerprintMismatchError):  # another model in float16 is still another model
        SACCompressor.from_pretrained(path, model=make_tiny_llama(seed=7)[0].half(), tokenizer=tokenizer)
    del meta["base_fingerprint_float16"]  # as checkpoints saved before it was recorded
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FingerprintMismatchError, match=r"loaded in float16.*load it in bfloat16 or float32"):
        SACCompressor.from_pretrained(path, model=the_same_model().half(), tokenizer=tokenizer)
    assert SACCompressor.from_pretrained(path, model=the_same_model(), tokenizer=tokenizer).fingerprint == \
        meta["fingerprint"]


def test_a_model_carrying_another_compressors_adapters_is_refused_and_that_compressor_is_left_as_it_was(
        tiny, tmp_path):
    """A compressor adds its LoRA layers to the model passed, in place: a second one on that model
    replaced the first one's adapters, which then made other K/V under its unchanged fingerprint
    (and a load was refused as if the model were another one)."""
    comp = _compressor(tiny)
    before = comp.compress(TEXT)
    path = comp.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = tiny
    with pytest.raises(InvalidInputError, match=r"already carries LoRA layers.*pass a fresh copy of the base model"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
    with pytest.raises(InvalidInputError, match="already carries LoRA layers"):
        SACCompressor(SACConfig(base_model="tiny", ratio=2, lora_rank=0), model=model, tokenizer=tokenizer)
    for a, b in zip(before, comp.compress(TEXT)):
        torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=0)
    fresh = SACCompressor.from_pretrained(path, model=make_tiny_llama()[0], tokenizer=tokenizer)
    assert fresh.fingerprint == comp.fingerprint


def test_corrupt_or_half_copied_checkpoint_is_refused(tiny, tmp_path):
    comp = _compressor(tiny)
    path = comp.save_pretrained(tmp_path / "ckpt")
    data = bytearray((path / "compressor.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "compressor.safetensors").write_bytes(bytes(data))
    model, tokenizer = make_tiny_llama()
    with pytest.raises(CheckpointError, match="corrupt"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="corrupt"):
        _compressor((model, tokenizer)).load_weights(path)  # what --resume does
    with pytest.raises(CheckpointError, match="neither"):
        SACCompressor.from_pretrained(tmp_path / "missing", model=model, tokenizer=tokenizer)
    (path / "compressor.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a sac_rag compressor checkpoint"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)


def test_checkpoint_holds_no_pickle(tiny, tmp_path):
    comp = _compressor(tiny)
    path = comp.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["compressor.safetensors", "config.json"]


def test_fingerprint_changes_when_trained_weights_change(tiny):
    comp = _compressor(tiny)
    before = comp.fingerprint
    with torch.no_grad():
        comp.anchor_embedding.add_(1.0)
    assert comp.fingerprint != before
    assert comp.fingerprint.startswith(comp.base_fingerprint + "/sac-")


def test_the_base_model_fingerprint_names_its_rope_settings_and_its_vocabulary(tiny):
    """Caches made under other rotary settings or another vocabulary do not fit the model, even
    with the same weights: such a model must not pass as the one a store or checkpoint names."""
    from sac_rag.fingerprint import base_model_fingerprint, same_model

    same_weights, other_rope = make_tiny_llama(), make_tiny_llama(rope_theta=500.0)
    assert base_model_fingerprint(*same_weights) == base_model_fingerprint(*tiny)
    assert base_model_fingerprint(*other_rope) != base_model_fingerprint(*tiny)
    model, tokenizer = same_weights
    tokenizer.add_tokens(["<a-token-of-another-vocabulary>"])
    assert base_model_fingerprint(model, tokenizer) != base_model_fingerprint(*tiny)
    # what does not change what a model computes is left out at every depth (a part's config too)
    from sac_rag.fingerprint import _stable_config

    parts = {"text_config": {"dtype": "bfloat16", "hidden_size": 8}, "architectures": ["M"]}
    assert _stable_config(parts) == _stable_config({**parts, "text_config": {"dtype": "float32", "hidden_size": 8}})
    assert _stable_config(parts) != _stable_config({**parts, "text_config": {"dtype": "float32", "hidden_size": 9}})
    # the model id part names where it was loaded from, not what it is
    assert same_model("org/model@0123456789abcdef/sac-c", "/models/model@0123456789abcdef/sac-c")
    assert not same_model("org/model@0123456789abcdef/sac-c", "org/model@fedcba9876543210/sac-c")


def test_without_adapter_decoder_mode_is_the_plain_model(tiny):
    comp = _compressor(tiny, lora_rank=0, anchor_embedding="none", bidirectional=False)
    assert comp.trainable_tensors().keys() == {"anchor_embedding"}
    assert comp.anchor_embedding.shape[0] == 0


def test_encoder_is_differentiable_for_training(tiny):
    comp = _compressor(tiny)
    for name, param in comp.named_parameters():
        param.requires_grad_("lora_" in name or name == "anchor_embedding")
    kv = comp.encode([_ids(comp.tokenizer)[:30]], [0])[0]
    (kv.keys.sum() + kv.values.sum()).backward()
    assert comp.anchor_embedding.grad is not None and comp.anchor_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_is_refused_with_a_clear_message(tiny, text):
    with pytest.raises(InvalidInputError, match="empty"):
        _compressor(tiny).compress(text)


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["a list"]])
def test_non_string_text_is_refused(tiny, value):
    with pytest.raises(InvalidInputError, match="str"):
        _compressor(tiny).compress(value)


@pytest.mark.parametrize("ratio", [0, 65, -1])
def test_ratio_outside_one_to_chunk_len_is_refused(ratio):
    with pytest.raises(InvalidInputError, match="ratio"):
        SACConfig(ratio=ratio, chunk_len=64)


@pytest.mark.parametrize("setting, value, says", [
    ("lora_alpha", 0, "lora_alpha must be >= 1, got 0"),  # scales the adapter to nothing
    ("lora_alpha", -8, "lora_alpha must be >= 1"),
    ("decoder_lora_rank", -1, "decoder_lora_rank must be >= 0"),
    ("lora_dropout", float("nan"), r"lora_dropout must be a number in \[0, 1\), got nan"),
    ("lora_dropout", 1.5, r"lora_dropout must be a number in \[0, 1\)"),
    ("lora_dropout", 1.0, r"lora_dropout must be a number in \[0, 1\)"),  # drops every input: learns nothing
    ("lora_rank", -1, "lora_rank must be >= 0"),
    ("lora_target_modules", "q_proj", r"lora_target_modules must be a non-empty list of module names, e\.g\. "
                                      r"\['q_proj', 'v_proj'\], got 'q_proj'"),
    ("lora_target_modules", [], "lora_target_modules must be a non-empty list"),
    ("bidirectional", "false", "bidirectional must be True or False, got 'false'"),
    ("position_convention", "local", r"position_convention must be one of \('global',\)"),
])
def test_adapter_and_encoder_settings_are_checked_when_the_config_is_made(setting, value, says):
    with pytest.raises(InvalidInputError, match=says):
        SACConfig(**{setting: value})


def test_numpy_integers_are_integer_settings_saved_as_ints():
    config = SACConfig(ratio=np.int64(4), chunk_len=np.int32(64), lora_rank=np.int64(8))
    assert (config.ratio, config.chunk_len, config.lora_rank) == (4, 64, 8)
    assert all(type(config.to_dict()[name]) is int for name in ("ratio", "chunk_len", "lora_rank"))
    json.dumps(config.to_dict())  # what save_pretrained writes


def test_chunk_longer_than_chunk_len_is_refused_by_the_low_level_encoder(tiny):
    comp = _compressor(tiny, chunk_len=16)
    with pytest.raises(InvalidInputError, match="split"):
        comp.compress_chunks([list(range(17))])


def test_anchor_kv_round_trips_through_bytes_and_dtypes(tiny):
    kv = _compressor(tiny).compress(TEXT)[0]
    back = AnchorKV.from_bytes(kv.to_bytes())
    assert (back.n_tokens, back.offset, back.fingerprint) == (kv.n_tokens, kv.offset, kv.fingerprint)
    torch.testing.assert_close(back.keys, kv.keys, rtol=0, atol=0)
    half = kv.to(dtype=torch.bfloat16)
    assert half.keys.dtype == torch.bfloat16 and half.nbytes == kv.nbytes // 2
    with pytest.raises(InvalidInputError):
        AnchorKV.from_bytes(b"not safetensors at all")


def test_compression_tokens_baseline_keeps_appended_memory_at_anchor_positions(tiny, monkeypatch):
    comp = _compressor(tiny, memory="compression_tokens", anchor_embedding="per_slot", bidirectional=False)
    ids = _ids(comp.tokenizer)[:30]
    kv = comp.compress_chunks([ids])[0]
    assert kv.n_anchors == 8 and kv.positions.tolist() == list(range(1, 30, 4))  # ratio 4: s = 1
    # causal: the memory depends on the chunk, the chunk's own tokens are not what is kept
    plain = _compressor(make_tiny_llama(), bidirectional=False).compress_chunks([ids])[0]
    assert not torch.allclose(kv.keys, plain.keys)
    monkeypatch.setattr(compressor_module, "MAX_PADDING", float("inf"))  # the two padded into one batch
    together = comp.compress_chunks([ids, ids[:9]], batch_size=2)
    torch.testing.assert_close(together[1].keys, comp.compress_chunks([ids[:9]])[0].keys, atol=1e-5, rtol=1e-4)
    with pytest.raises(InvalidInputError, match="per_slot"):
        SACConfig(memory="compression_tokens", anchor_embedding="shared")


def test_per_slot_anchor_embedding_adds_its_kth_row_to_the_kth_anchor(tiny):
    """Against a hand-built pass of the base model (causal, no adapter), so both the table being
    added at all and the row each anchor gets are checked."""
    comp = _compressor(tiny, anchor_embedding="per_slot", lora_rank=0, bidirectional=False)
    ids, offset = _ids(comp.tokenizer)[:30], 5
    anchors = comp.anchor_indices(ids)
    with torch.no_grad():
        embeds = comp.base_model.get_input_embeddings()(torch.tensor([ids]))
        embeds[0, anchors] += comp.anchor_embedding[: len(anchors)]
        positions = torch.arange(offset, offset + len(ids))[None]
        out = comp.base_model.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        kv = comp.compress_chunks([ids], offsets=[offset])[0]
    expected = torch.stack([layer.keys[0][:, anchors] for layer in out.past_key_values.layers])
    torch.testing.assert_close(kv.keys, expected.to(kv.keys.dtype), atol=1e-5, rtol=1e-5)


def test_future_bias_anneals_between_causal_and_bidirectional(tiny):
    causal = _compressor(tiny, ratio=1, bidirectional=False)
    bidir = _compressor(make_tiny_llama(), ratio=1, bidirectional=True)
    ids = _ids(bidir.tokenizer)[:20]
    with torch.no_grad():
        ref_causal = causal.encode([ids], [0])[0].keys
        ref_bidir = bidir.encode([ids], [0])[0].keys
        nearly_causal = bidir.encode([ids], [0], future_bias=1e4)[0].keys
        zero_bias = bidir.encode([ids, ids[:5]], [0, 0], future_bias=1e-9)[0].keys
        shorter_in_a_batch = bidir.encode([ids, ids[:5]], [0, 0], future_bias=1.0)[1].keys
        shorter_alone = bidir.encode([ids[:5]], [0], future_bias=1.0)[0].keys
    torch.testing.assert_close(nearly_causal, ref_causal, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(zero_bias, ref_bidir, atol=1e-5, rtol=1e-4)
    # the shorter chunk's padding is masked as keys: its tokens never attend to it
    torch.testing.assert_close(shorter_in_a_batch, shorter_alone, atol=1e-5, rtol=1e-4)


def test_decoder_adapter_is_used_only_when_reading_compressed_contexts(tiny, tmp_path):
    comp = _compressor(tiny, decoder_lora_rank=4)
    _perturb(comp, seed=3)
    ids = _ids(comp.tokenizer)[:20]
    with torch.no_grad():
        encoder_view = comp.compress_chunks([ids])[0].keys
        with comp.decoder_mode():
            decoder_logits = comp.base_model(input_ids=torch.tensor([ids])).logits
        with comp.frozen_mode():
            frozen_logits = comp.base_model(input_ids=torch.tensor([ids])).logits
    assert not torch.allclose(decoder_logits, frozen_logits)
    # switching adapters leaves the encoder exactly as it was
    torch.testing.assert_close(comp.compress_chunks([ids])[0].keys, encoder_view, rtol=0, atol=0)
    assert any(k.startswith("decoder_lora.") for k in comp.trainable_tensors())
    before = comp.compress(TEXT)
    gen = Generator.from_compressor(comp).generate([before, " the tower"], GenerationConfig(max_new_tokens=8))
    comp.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = make_tiny_llama()
    loaded = SACCompressor.from_pretrained(tmp_path / "ckpt", model=model, tokenizer=tokenizer)
    assert loaded.fingerprint == comp.fingerprint
    again = Generator.from_compressor(loaded).generate([loaded.compress(TEXT), " the tower"],
                                                       GenerationConfig(max_new_tokens=8))
    assert again.token_ids == gen.token_ids


def test_text_only_prompts_are_read_by_the_frozen_lm_even_with_a_decoder_adapter(tiny):
    comp = _compressor(tiny, decoder_lora_rank=4)
    _perturb(comp, seed=3)
    config = GenerationConfig(max_new_tokens=6)
    sac_generator = Generator.from_compressor(comp)
    with comp.frozen_mode():
        plain = Generator(comp.base_model, comp.tokenizer).generate_batch([TEXT + " the tower"], config)[0]
    with comp.decoder_mode():
        adapted = Generator(comp.base_model, comp.tokenizer).generate_batch([TEXT + " the tower"], config)[0]
    assert adapted.token_ids != plain.token_ids  # the adapter would change the answer...
    text_only = sac_generator.generate(TEXT + " the tower", config)
    assert text_only.token_ids == plain.token_ids  # ...but full-text prompts see the plain LM
    # a batch mixing both kinds equals each prompt decoded alone, in the original order
    cached = [comp.compress(TEXT), " the tower"]
    mixed = sac_generator.generate_batch([cached, TEXT + " the tower", cached], config)
    assert [g.token_ids for g in mixed] == [sac_generator.generate(cached, config).token_ids,
                                            plain.token_ids, sac_generator.generate(cached, config).token_ids]


def test_decoder_adapter_refuses_caches_from_other_compressors_of_the_same_base(tiny):
    comp = _compressor(tiny, decoder_lora_rank=4)
    plain = _compressor(make_tiny_llama())  # same base weights, another encoder
    with pytest.raises(FingerprintMismatchError):
        Generator.from_compressor(comp).generate([plain.compress(TEXT), " the tower"])


def test_a_merged_decoder_answers_as_the_adapter_does_and_leaves_the_compressor_as_it_was(tiny):
    comp = _compressor(tiny, decoder_lora_rank=4)
    _perturb(comp, seed=3)
    fingerprint, weights = comp.fingerprint, {k: v.clone() for k, v in comp.trainable_tensors().items()}
    cached = [comp.compress(TEXT), " the tower"]
    adapter = Generator.from_compressor(comp)
    merged = Generator.from_compressor(comp, merge_decoder=True)
    # the same decoder up to rounding, and not the frozen one
    torch.testing.assert_close(merged.prompt_logits(cached), adapter.prompt_logits(cached), atol=1e-5, rtol=1e-5)
    with comp.frozen_mode():
        plain = Generator(comp.base_model, comp.tokenizer, base_fingerprint=comp.base_fingerprint)
        frozen = plain.prompt_logits(cached)
    assert not torch.allclose(merged.prompt_logits(cached), frozen, atol=1e-3)
    # the same answers: greedy batches mixing text-only prompts (read by the frozen LM), and beams
    prompts = [cached, TEXT + " the tower", [comp.compress(TEXT * 2), " Paris"]]
    for config in (GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=8, num_beams=3)):
        assert ([g.token_ids for g in merged.generate_batch(prompts, config)]
                == [g.token_ids for g in adapter.generate_batch(prompts, config)])
    # the copy holds no LoRA layers, shares what no adapter touches, and changed nothing in the compressor
    assert not any("lora_" in name for name, _ in merged.reader.named_parameters())
    embeddings = merged.reader.get_input_embeddings().weight
    assert embeddings.data_ptr() == comp.base_model.get_input_embeddings().weight.data_ptr()
    assert comp.fingerprint == fingerprint
    for name, tensor in comp.trainable_tensors().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    torch.testing.assert_close(comp.compress(TEXT)[0].keys, cached[0][0].keys, rtol=0, atol=0)


def test_a_merged_decoder_is_a_snapshot_that_refuses_caches_of_later_weights(tiny):
    comp = _compressor(tiny, decoder_lora_rank=4)
    merged = Generator.from_compressor(comp, merge_decoder=True)
    adapter = Generator.from_compressor(comp)
    _perturb(comp, seed=5)  # training on: the compressor's weights move, the merged copy does not
    later = [comp.compress(TEXT), " the tower"]
    adapter.generate(later, GenerationConfig(max_new_tokens=2))  # the live decoder follows its compressor
    with pytest.raises(FingerprintMismatchError) as err:
        merged.generate(later, GenerationConfig(max_new_tokens=2))
    assert comp.fingerprint in str(err.value)
    assert "make the merged decoder again" in str(err.value)  # compressing again would not help: same weights


def test_a_merged_frozen_decoder_is_the_base_lm_without_adapter_layers(tiny):
    comp = _compressor(tiny)  # encoder adapter only: the decoder is the frozen LM
    cached = [comp.compress(TEXT), " the tower"]
    merged = Generator.from_compressor(comp, merge_decoder=True)
    assert not any("lora_" in name for name, _ in merged.reader.named_parameters())
    torch.testing.assert_close(merged.prompt_logits(cached), Generator.from_compressor(comp).prompt_logits(cached),
                               rtol=0, atol=0)
    no_adapter = _compressor(make_tiny_llama(), lora_rank=0)
    assert Generator.from_compressor(no_adapter, merge_decoder=True).reader is no_adapter.base_model


def test_retargeting_the_ratio_keeps_the_weights_and_changes_anchors_and_fingerprint(tiny):
    comp = _compressor(tiny, ratio=5)
    ids = _ids(tiny[1])[:60]
    before, fingerprint = comp.compress_chunks([ids])[0], comp.fingerprint
    weights = {k: v.clone() for k, v in comp.trainable_tensors().items()}
    comp.retarget_ratio(15)
    after = comp.compress_chunks([ids])[0]
    assert after.positions.tolist() == [7, 22, 37, 52] and before.positions.tolist() == list(range(2, 60, 5))
    # Token 7 is an anchor at both ratios: its first-layer K/V (its own input) is the same.
    torch.testing.assert_close(after.keys[0, :, 0], before.keys[0, :, 1])
    for name, value in comp.trainable_tensors().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert comp.fingerprint != fingerprint and comp.config.ratio == 15


def test_a_per_slot_anchor_table_cannot_change_ratio(tiny):
    with pytest.raises(InvalidInputError, match="per-slot"):
        _compressor(tiny, anchor_embedding="per_slot").retarget_ratio(15)


def test_rounding_the_trained_weights_makes_another_compressor(tiny, tmp_path):
    """Exporting float32 training weights in bfloat16 changes the K/V they produce, so the rounded
    copy gets its own fingerprint (recorded in its config.json) and the original's caches are
    not accepted for it; a copy saved at full precision stays the same compressor."""
    comp = _compressor(tiny)
    with torch.no_grad():  # trained-looking weights that bfloat16 cannot hold exactly
        comp.anchor_embedding.add_(torch.randn_like(comp.anchor_embedding) * 1e-3)
    comp.save_pretrained(tmp_path / "same")
    comp.save_pretrained(tmp_path / "rounded", dtype=torch.bfloat16)
    model, tokenizer = make_tiny_llama()
    same = SACCompressor.from_pretrained(tmp_path / "same", model=model, tokenizer=tokenizer)
    model, tokenizer = make_tiny_llama()
    rounded = SACCompressor.from_pretrained(tmp_path / "rounded", model=model, tokenizer=tokenizer)
    assert same.fingerprint == comp.fingerprint
    assert rounded.fingerprint != comp.fingerprint
    assert rounded.fingerprint.startswith(comp.base_fingerprint + "/sac-")
    recorded = json.loads((tmp_path / "rounded" / "config.json").read_text())["fingerprint"]
    assert recorded == rounded.fingerprint


def test_a_dtype_to_save_in_is_named_as_anywhere_else_and_an_integer_or_machine_chosen_one_is_refused(tiny, tmp_path):
    comp = _compressor(tiny)
    comp.save_pretrained(tmp_path / "by-dtype", dtype=torch.bfloat16)
    comp.save_pretrained(tmp_path / "by-name", dtype="bfloat16")
    assert checkpoint_meta(tmp_path / "by-name") == checkpoint_meta(tmp_path / "by-dtype")
    with pytest.raises(InvalidInputError, match="integers: save in a floating-point dtype"):
        comp.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    with pytest.raises(InvalidInputError, match="dtype='auto' would save in what this machine computes in"):
        comp.save_pretrained(tmp_path / "auto", dtype="auto")
    assert not (tmp_path / "int8").exists() and not (tmp_path / "auto").exists()
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(InvalidInputError, match="is a file: save_pretrained writes a directory"):
        comp.save_pretrained(tmp_path / "a-file")


def test_a_tokenizer_without_its_model_is_refused_not_dropped(tiny):
    _, tokenizer = tiny
    with pytest.raises(InvalidInputError, match="pass the model together with the tokenizer"):
        SACCompressor(SACConfig(base_model="no-such-model"), tokenizer=tokenizer)
    with pytest.raises(InvalidInputError, match="pass the model together with the tokenizer"):
        SACCompressor.from_pretrained("smollm2-135m-sac-5x", tokenizer=tokenizer)


def test_adapter_weights_can_be_copied_in_and_a_misfit_is_refused(tiny):
    from peft import get_peft_model_state_dict

    comp = _compressor(tiny, decoder_lora_rank=8, decoder_lora_alpha=16)
    encoder_state = get_peft_model_state_dict(comp.model, adapter_name="default")
    before = comp.fingerprint
    comp.set_adapter_weights(encoder_state, "decoder")
    tensors = comp.trainable_tensors()
    for name, value in tensors.items():
        if name.startswith("lora."):
            torch.testing.assert_close(tensors["decoder_lora." + name.removeprefix("lora.")], value)
    assert comp.fingerprint != before
    with pytest.raises(InvalidInputError, match="missing"):
        comp.set_adapter_weights(dict(list(encoder_state.items())[1:]), "decoder")
    without_decoder = _compressor(make_tiny_llama())
    with pytest.raises(InvalidInputError, match="no 'decoder' adapter"):
        without_decoder.set_adapter_weights(encoder_state, "decoder")


def test_a_widened_compressor_computes_the_same_with_more_lora_capacity(tiny):
    comp = _compressor(tiny, decoder_lora_rank=4)
    wide = comp.widened(lora_rank=16, decoder_lora_rank=8, model=make_tiny_llama()[0], tokenizer=tiny[1])
    assert (wide.config.lora_rank, wide.config.lora_alpha, wide.config.decoder_lora_rank) == (16, 32, 8)
    ids = _ids(tiny[1])[:60]
    narrow_kv, wide_kv = comp.compress_chunks([ids])[0], wide.compress_chunks([ids])[0]
    torch.testing.assert_close(wide_kv.keys, narrow_kv.keys)
    torch.testing.assert_close(wide_kv.values, narrow_kv.values)
    question = torch.tensor([ids[:12]])
    with torch.no_grad(), comp.decoder_mode(), wide.decoder_mode():
        torch.testing.assert_close(wide.model(question).logits, comp.model(question).logits)
    assert sum(map(torch.numel, wide.trainable_tensors().values())) > \
        sum(map(torch.numel, comp.trainable_tensors().values()))
    assert wide.fingerprint != comp.fingerprint  # other weights, though the same function


def test_widening_to_a_smaller_rank_a_missing_adapter_or_another_base_model_is_refused(tiny):
    comp = _compressor(tiny)
    with pytest.raises(InvalidInputError, match="at least the current"):
        comp.widened(lora_rank=4, model=make_tiny_llama()[0], tokenizer=tiny[1])
    with pytest.raises(InvalidInputError, match="decoder"):
        comp.widened(decoder_lora_rank=8, model=make_tiny_llama()[0], tokenizer=tiny[1])
    with pytest.raises(FingerprintMismatchError):
        comp.widened(lora_rank=16, model=make_tiny_llama(seed=5)[0], tokenizer=tiny[1])


def test_a_checkpoints_metadata_and_short_tag_are_read_without_a_model(tiny, tmp_path):
    from sac_rag.compressor import checkpoint_meta
    from sac_rag.fingerprint import compressor_tag

    comp = _compressor(tiny)
    comp.save_pretrained(tmp_path / "a")
    _perturb(comp, seed=2)  # other trained weights
    comp.save_pretrained(tmp_path / "b")
    tags = [compressor_tag(checkpoint_meta(tmp_path / name)["fingerprint"]) for name in ("a", "b")]
    assert tags[1] == compressor_tag(comp.fingerprint) and tags[0] != tags[1]
    assert all(len(tag) == 8 and int(tag, 16) >= 0 for tag in tags)
    assert compressor_tag(comp.base_fingerprint) == ""


def test_a_selector_other_than_the_configured_one_gets_its_own_fingerprint(tiny):
    """Caches made with other anchors must never pass for this compressor's: a selector passed
    in code (or swapped in) enters the fingerprint; the one the config names leaves it as it was."""
    comp = _compressor(tiny)
    configured = comp.fingerprint

    def rarest(ids):
        return [float(t) for t in ids]

    def first(ids):
        return [-float(i) for i in range(len(ids))]

    fingerprints = {}
    for name, selector in [("uniform, explicit", UniformAnchors()), ("scored", ImportanceAnchors(rarest)),
                           ("renamed", ImportanceAnchors(rarest, scorer_name="rarest-v2")),
                           ("other scorer", ImportanceAnchors(first)), ("random", RandomAnchors(seed=1)),
                           ("random, other seed", RandomAnchors(seed=2))]:
        comp.selector = selector
        fingerprints[name] = comp.fingerprint
    assert fingerprints.pop("uniform, explicit") == configured
    assert len(set(fingerprints.values()) | {configured}) == len(fingerprints) + 1
    assert all(f.startswith(comp.base_fingerprint + "/sac-") for f in fingerprints.values())


def test_use_anchors_moves_the_anchors_keeps_the_weights_and_changes_the_fingerprint(tiny):
    comp = _compressor(tiny)
    ids = _ids(tiny[1])[:60]
    weights = {k: v.clone() for k, v in comp.trainable_tensors().items()}
    before = comp.fingerprint
    comp.use_anchors("rarest_in_block")
    kv = comp.compress_chunks([ids])[0]
    assert kv.positions.tolist() == RarestInBlockAnchors().select(ids, comp.config.ratio)
    assert kv.positions.tolist() != UniformAnchors().select(ids, comp.config.ratio)
    assert comp.config.anchor_strategy == "rarest_in_block" and comp.fingerprint != before
    for name, value in comp.trainable_tensors().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_importance_scores_given_as_a_tensor_are_read_at_once_not_element_by_element():
    """A scorer that is a model returns a tensor (on its GPU, maybe in bfloat16, maybe tracking
    gradients); reading it element by element would sync with the GPU once per token."""
    ids = list(range(20))
    scores = torch.linspace(0, 1, len(ids), dtype=torch.bfloat16).flip(0).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an element read with .item() warns about requires_grad
        from_tensor = ImportanceAnchors(lambda _: scores).select(ids, 4)
    assert from_tensor == ImportanceAnchors(lambda _: scores.tolist()).select(ids, 4) == [0, 1, 2, 3, 4]


# -- checkpoints: kills mid-save, damaged files, placement; inputs of the low-level API ----------


class _Killed(BaseException):
    """A kill: nothing after it runs (a BaseException, so no ``except Exception`` cleans up)."""


def _state(comp: SACCompressor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in comp.trainable_tensors().items()}


def test_a_save_killed_at_any_step_over_a_checkpoint_leaves_the_old_or_the_new_one(tiny, tmp_path, monkeypatch):
    """Every durable step of a save is a rename; killing the save before each one in turn must leave
    a checkpoint that loads, as the old compressor or the new one, with config.json naming the one
    that loads. (Replacing the weights before config.json left the old config beside the new
    weights, refused as corrupt.)"""
    import os

    comp = _compressor(tiny)
    old_state, old = _state(comp), comp.fingerprint
    _perturb(comp, seed=2)
    new_state, new = _state(comp), comp.fingerprint
    rename = os.replace
    outcomes = []
    for kill_at in range(10):
        path = tmp_path / f"ckpt-{kill_at}"
        comp._load_tensors(dict(old_state), path)
        comp.save_pretrained(path)
        comp._load_tensors(dict(new_state), path)
        done = []

        def dying(src, dst, done=done, kill_at=kill_at):
            if len(done) == kill_at:
                raise _Killed
            done.append(dst)
            rename(src, dst)

        monkeypatch.setattr(os, "replace", dying)
        try:
            comp.save_pretrained(path)
            finished = True
        except _Killed:
            finished = False
        monkeypatch.setattr(os, "replace", rename)
        model, tokenizer = make_tiny_llama()
        loaded = SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
        assert loaded.fingerprint in (old, new)
        assert checkpoint_meta(path)["fingerprint"] == loaded.fingerprint
        outcomes.append(loaded.fingerprint)
        if finished:
            assert loaded.fingerprint == new
            assert sorted(p.name for p in path.iterdir()) == ["compressor.safetensors", "config.json"]
            break
    assert outcomes[0] == old and outcomes[-1] == new  # the kills did land before and after the commit
    model, tokenizer = make_tiny_llama()  # a later save over a killed one's leftovers is whole again
    comp.save_pretrained(tmp_path / "ckpt-0")
    assert SACCompressor.from_pretrained(tmp_path / "ckpt-0", model=model, tokenizer=tokenizer).fingerprint == new


def test_a_save_over_one_killed_after_its_commit_keeps_the_committed_weights_until_its_own_commit(
        tiny, tmp_path, monkeypatch):
    """Two kills in a row: the first save dies after config.json names its weights (still in the
    pending file), the next one dies after writing its own pending weights. The checkpoint must
    still load, as the first save's compressor."""
    import os

    comp = _compressor(tiny)
    path = comp.save_pretrained(tmp_path / "ckpt")
    rename = os.replace

    def save_killed_at(name: str) -> None:
        """Save, killed at the rename onto ``name``."""
        def dying(src, dst):
            if os.path.basename(dst) == name:
                raise _Killed
            rename(src, dst)

        monkeypatch.setattr(os, "replace", dying)
        with pytest.raises(_Killed):
            comp.save_pretrained(path)
        monkeypatch.setattr(os, "replace", rename)

    _perturb(comp, seed=2)
    first = comp.fingerprint
    save_killed_at("compressor.safetensors")  # its config.json written, its weights not yet renamed into place
    _perturb(comp, seed=3)
    save_killed_at("config.json")  # its own pending weights written, its config.json not
    model, tokenizer = make_tiny_llama()
    assert SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer).fingerprint == first


def test_a_variant_in_settings_only_reads_its_siblings_weights_and_has_its_own_fingerprint(tiny, tmp_path,
                                                                                           monkeypatch):
    """save_pretrained(share_weights_with=...) writes config.json alone: loading it gives the saved
    settings over the sibling's weights, under the fingerprint those settings make."""
    comp = _compressor(tiny)
    base = comp.save_pretrained(tmp_path / "base")
    comp.config.refine_steps = 2
    variant = comp.save_pretrained(tmp_path / "refined", share_weights_with=base)
    assert sorted(p.name for p in variant.iterdir()) == ["config.json"]
    assert checkpoint_meta(variant)["weights_from"] == "base"
    model, tokenizer = make_tiny_llama()
    loaded = SACCompressor.from_pretrained(variant, model=model, tokenizer=tokenizer)
    assert loaded.config.refine_steps == 2 and loaded.fingerprint == comp.fingerprint
    assert loaded.fingerprint != checkpoint_meta(base)["fingerprint"]
    torch.testing.assert_close(loaded.anchor_embedding, comp.anchor_embedding, rtol=0, atol=0)

    monkeypatch.chdir(variant)  # named from inside it, as "."
    assert SACCompressor.from_pretrained(".", *make_tiny_llama()).fingerprint == comp.fingerprint
    comp.save_pretrained(variant)  # saved with its own weights again: it no longer reads the sibling's
    assert "weights_from" not in checkpoint_meta(variant) and (variant / "compressor.safetensors").exists()
    comp.save_pretrained(variant, share_weights_with=base)  # and back: the copy it no longer names goes
    assert not (variant / "compressor.safetensors").exists()


def test_a_sibling_named_as_dot_or_through_a_symlink_is_recorded_by_its_own_name(tiny, tmp_path, monkeypatch):
    comp = _compressor(tiny)
    base = comp.save_pretrained(tmp_path / "models" / "base")
    comp.config.refine_steps = 2
    monkeypatch.chdir(base)
    comp.save_pretrained("../dotted", share_weights_with=".")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "my-base").symlink_to(base)
    comp.save_pretrained(tmp_path / "models" / "linked", share_weights_with=tmp_path / "links" / "my-base")
    for name in ("dotted", "linked"):
        assert checkpoint_meta(tmp_path / "models" / name)["weights_from"] == "base"
        assert SACCompressor.from_pretrained(tmp_path / "models" / name, *make_tiny_llama()).fingerprint == \
            comp.fingerprint


def test_a_sibling_given_other_weights_is_saved_with_a_warning_and_its_variant_then_refused_saying_why(
        tiny, tmp_path, caplog):
    comp = _compressor(tiny)
    base = comp.save_pretrained(tmp_path / "base")
    comp.config.refine_steps = 2
    variant = comp.save_pretrained(tmp_path / "refined", share_weights_with=base)
    comp.config.refine_steps = 0
    comp.save_pretrained(base)  # the same weights again: nothing to say
    assert "refined" not in caplog.text
    _perturb(comp, seed=7)
    comp.save_pretrained(base)
    assert f"which {variant} read" in caplog.text
    with pytest.raises(CheckpointError, match="holds other weights since .* was saved.*save the variant again"):
        SACCompressor.from_pretrained(variant, *make_tiny_llama())


def test_a_variant_copied_without_its_sibling_or_edited_to_point_elsewhere_is_refused_saying_so(tiny, tmp_path):
    comp = _compressor(tiny)
    base = comp.save_pretrained(tmp_path / "base")
    comp.config.refine_steps = 2
    variant = comp.save_pretrained(tmp_path / "refined", share_weights_with=base)
    model, tokenizer = make_tiny_llama()
    alone = tmp_path / "elsewhere" / "refined"
    alone.parent.mkdir()
    variant.rename(alone)
    with pytest.raises(CheckpointError, match="reads its weights from .*base.*copy the two directories together"):
        SACCompressor.from_pretrained(alone, model=model, tokenizer=tokenizer)
    meta = checkpoint_meta(alone)
    for elsewhere in ("../base", "..", 3):
        (alone / "config.json").write_text(json.dumps({**meta, "weights_from": elsewhere}))
        with pytest.raises(CheckpointError, match="not a directory beside it"):
            SACCompressor.from_pretrained(alone, model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("case, says", [
    ("other weights", "holds other weights than this compressor"),
    ("not beside", "is not a checkpoint beside"),
    ("itself", "is not a checkpoint beside"),
    ("a variant", "holds no weights itself"),
])
def test_sharing_weights_the_named_checkpoint_does_not_hold_beside_it_is_refused_leaving_nothing(tiny, tmp_path,
                                                                                                  case, says):
    comp = _compressor(tiny)
    base = comp.save_pretrained(tmp_path / "base")
    target = tmp_path / "variant"
    if case == "other weights":
        _perturb(comp, seed=5)
    elif case == "not beside":
        target = tmp_path / "deeper" / "variant"
    elif case == "itself":
        target = base
    elif case == "a variant":
        base = comp.save_pretrained(tmp_path / "first", share_weights_with=base)
    before = sorted((p.name, p.read_bytes()) for p in base.iterdir())
    with pytest.raises(InvalidInputError, match=says):
        comp.save_pretrained(target, share_weights_with=base)
    assert target == base or not target.exists()
    assert sorted((p.name, p.read_bytes()) for p in base.iterdir()) == before


def _edit_config(meta: dict, edit: str) -> str:
    """config.json's text after one kind of damage or hand edit."""
    if edit == "truncated":
        return json.dumps(meta)[:40]
    meta = json.loads(json.dumps(meta))
    if edit.startswith("no "):
        del meta[edit[3:]]
    elif edit == "config is a list":
        meta["config"] = [1, 2]
    elif edit == "invalid ratio":
        meta["config"]["ratio"] = 0
    elif edit == "unknown setting":
        meta["config"]["sparsity"] = 0.5
    elif edit == "other rank":  # the weights still match their hash, their shapes no longer fit
        meta["config"].update(lora_rank=4, lora_alpha=8)
    elif edit == "newer format":
        meta["format"] = "sac-compressor/2"
    return json.dumps(meta)


@pytest.mark.parametrize("edit, says", [
    ("truncated", "copy it again"), ("no config", "'config'"), ("no base_fingerprint", "'base_fingerprint'"),
    ("no weights_sha256", "'weights_sha256'"), ("config is a list", "'config'"),
    ("invalid ratio", "ratio must be"), ("unknown setting", "upgrade"), ("other rank", "shapes do not fit"),
    ("newer format", "'sac-compressor/2'.*newer sac_rag.*upgrade"),
])
def test_a_damaged_or_edited_config_json_is_refused_naming_the_checkpoint(tiny, tmp_path, edit, says):
    """Not a KeyError, a settings error that names no file, or a size mismatch from deep inside peft."""
    path = _compressor(tiny).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(_edit_config(meta, edit))
    model, tokenizer = make_tiny_llama()
    with pytest.raises(CheckpointError, match=says) as info:
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
    assert str(path) in str(info.value)


def test_a_file_of_a_checkpoint_is_refused_naming_its_directory(tiny, tmp_path):
    path = _compressor(tiny).save_pretrained(tmp_path / "ckpt")
    for name in ("config.json", "compressor.safetensors"):
        with pytest.raises(CheckpointError, match=f"pass its directory, '{path}'"):
            SACCompressor.from_pretrained(path / name, model=tiny[0], tokenizer=tiny[1])


def test_a_device_or_dtype_the_passed_model_is_not_on_is_refused_not_ignored(tiny, tmp_path):
    path = _compressor(make_tiny_llama()).save_pretrained(tmp_path / "ckpt")
    model, tokenizer = tiny  # float32, on the CPU
    with pytest.raises(InvalidInputError, match="dtype='bfloat16', but the model passed is in torch.float32"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer, dtype="bfloat16")
    with pytest.raises(InvalidInputError, match="device='meta', but the model passed is on cpu"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer, device="meta")
    loaded = SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer, device="cpu", dtype=torch.float32)
    assert loaded.dtype == torch.float32 and loaded.fingerprint == checkpoint_meta(path)["fingerprint"]


def test_random_anchors_of_the_same_ids_are_the_same_in_a_list_a_tensor_or_an_array():
    """"The same chunk always gets the same anchors": ids in a tensor or numpy array print otherwise
    than in a list, and the seed was drawn from their printed form."""

    ids = list(range(100, 160))
    in_list = RandomAnchors(seed=0).select(ids, 5)
    assert RandomAnchors(seed=0).select(torch.tensor(ids), 5) == in_list
    assert RandomAnchors(seed=0).select(np.array(ids), 5) == in_list
    assert RandomAnchors(seed=0).select(tuple(ids), 5) == in_list


def test_compress_batch_reads_a_generator_of_texts_once(tiny):
    comp = _compressor(tiny, chunk_len=16)
    texts = [TEXT, "Paris is the capital of France."]
    from_generator = comp.compress_batch(text for text in texts)
    assert [len(chunks) for chunks in from_generator] == [len(chunks) for chunks in comp.compress_batch(texts)]
    for bad in (None, 3, {"a", "b"}):
        with pytest.raises(InvalidInputError, match="list of texts"):
            comp.compress_batch(bad)


@pytest.mark.parametrize("offsets, says", [([0], "1 offsets for 2 chunks"), ([0, 0, 0], "3 offsets for 2 chunks"),
                                           ([0, -3], "offset 1 is -3"), ([0, 1.5], "offset 1 is 1.5")])
def test_offsets_must_be_one_non_negative_integer_per_chunk(tiny, offsets, says):
    comp = _compressor(tiny)
    ids = _ids(comp.tokenizer)
    with pytest.raises(InvalidInputError, match=says):
        comp.compress_chunks([ids[:10], ids[:5]], offsets=offsets)
    with pytest.raises(InvalidInputError, match="batch_size"):
        comp.compress_chunks([ids[:10]], batch_size=0)


def test_token_ids_must_be_integers_the_models_embedding_has_a_row_for(tiny):
    """A float id (ids that went through a float column) is no token: it is refused, not truncated;
    an id past the embedding or below 0 is refused naming the range, not an IndexError deep inside."""
    comp = _compressor(tiny)
    ids = _ids(comp.tokenizer)[:6]
    rows = tiny[0].get_input_embeddings().weight.shape[0]
    for bad, says in [(np.asarray(ids, dtype=np.float64) + 0.7, r"holds np.float64\("), ([*ids, rows], f"holds {rows}"),
                      ([-1], "holds -1"), ([True], "holds True"), ("abc", "chunk 0 is a str")]:
        with pytest.raises(InvalidInputError, match=f"{says}.*(from 0 to {rows - 1}|compress.text)"):
            comp.compress_chunks([bad])
    as_numpy = comp.compress_chunks([np.asarray(ids, dtype=np.int64)])[0]  # numpy integers are ids
    assert torch.equal(as_numpy.keys, comp.compress_chunks([ids])[0].keys)


def test_a_config_shared_by_two_compressors_is_retargeted_in_one_only(tiny):
    """Retargeting one compressor must not retarget another built from the same SACConfig, whose
    fingerprint would not follow."""
    config = SACConfig(base_model="tiny", ratio=4, chunk_len=64, lora_rank=8, lora_alpha=16)
    a = SACCompressor(config, model=tiny[0], tokenizer=tiny[1])
    b = SACCompressor(config, *make_tiny_llama())
    before = b.fingerprint
    a.retarget_ratio(8)
    assert b.config.ratio == 4 and b.fingerprint == before and config.ratio == 4


def test_a_setting_edited_on_the_compressors_config_changes_its_fingerprint(tiny):
    comp = _compressor(tiny)
    before, ids = comp.fingerprint, _ids(comp.tokenizer)[:40]
    comp.config.bidirectional = False  # an ablation edited in place: other K/V, so another compressor
    assert comp.compress_chunks([ids])[0].fingerprint == comp.fingerprint != before


def test_saving_into_a_directory_holding_another_programs_config_json_is_refused(tiny, tmp_path):
    """A model directory's config.json (transformers') is not replaced by a compressor's."""
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "model")
    before = (tmp_path / "model" / "config.json").read_text()
    with pytest.raises(InvalidInputError, match="not a compressor checkpoint's .* save into another directory"):
        _compressor(tiny).save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").read_text() == before
    assert not (tmp_path / "model" / "compressor.safetensors").exists()


def test_a_recommended_decoding_is_saved_loaded_and_leaves_the_fingerprint_alone(tiny, tmp_path):
    comp = _compressor(tiny)
    assert comp.recommended_decoding == {}  # none: callers decode greedily
    fingerprint = comp.fingerprint
    comp.recommended_decoding = {"num_beams": 8, "mbr": True}
    assert comp.fingerprint == fingerprint  # it changes answers, not caches
    path = comp.save_pretrained(tmp_path / "ckpt")
    assert checkpoint_meta(path)["recommended_decoding"] == {"num_beams": 8, "mbr": True}
    model, tokenizer = make_tiny_llama()
    loaded = SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)
    assert loaded.recommended_decoding == {"num_beams": 8, "mbr": True} and loaded.fingerprint == fingerprint
    loaded.recommended_decoding["num_beams"] = 2  # a copy: the compressor's own is changed only by assigning
    assert loaded.recommended_decoding == {"num_beams": 8, "mbr": True}


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_beams": 4, "max_new_tokens": 9}, r"names \['max_new_tokens'\]: it may set only"),
    ({"mbr": True}, "not a valid decoding: mbr chooses among beam search's answers"),
    ({"num_beams": 4, "extractive": True}, "not a valid decoding: beam search"),
    ([("num_beams", 4)], "must be a mapping"),
])
def test_a_recommended_decoding_that_is_no_decoding_is_refused(tiny, settings, message):
    comp = _compressor(tiny)
    with pytest.raises(InvalidInputError, match=message):
        comp.recommended_decoding = settings
    assert comp.recommended_decoding == {}


def test_recommend_decoding_rewrites_only_the_config_and_a_bad_one_on_disk_is_refused_naming_the_file(tiny, tmp_path):
    from sac_rag.compressor import recommend_decoding

    path = _compressor(tiny).save_pretrained(tmp_path / "ckpt")
    weights, before = (path / "compressor.safetensors").read_bytes(), checkpoint_meta(path)
    assert recommend_decoding(path, {"num_beams": 4, "length_penalty": 0.0}) == {
        **before, "recommended_decoding": {"num_beams": 4, "length_penalty": 0.0}}
    assert (path / "compressor.safetensors").read_bytes() == weights
    model, tokenizer = make_tiny_llama()
    assert SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer).recommended_decoding == {
        "num_beams": 4, "length_penalty": 0.0}
    assert "recommended_decoding" not in recommend_decoding(path, {})  # removed
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "recommended_decoding": {"num_beams": 0}}))
    with pytest.raises(CheckpointError, match=r"config.json is not a valid decoding: num_beams must be >= 1.*"
                                              "recommend_decoding"):
        SACCompressor.from_pretrained(path, model=model, tokenizer=tokenizer)


def test_adapter_states_equal_peft_own_switches_nest_and_leave_training_flags_alone(tiny):
    """``decoder_mode``/``frozen_mode`` set the LoRA layers' state directly (cheap enough for every
    decoding step); they must read as peft's own switches do, the other peft path too."""
    comp = _compressor(tiny, decoder_lora_rank=4)
    ids = torch.tensor([_ids(comp.tokenizer, TEXT)])
    decoder_flags = [p for n, p in comp.model.named_parameters() if "lora_" in n and ".decoder." in n]
    for p in decoder_flags:
        p.requires_grad_(False)  # as training the encoder alone sets them
    flags = [p.requires_grad for p in comp.lora_parameters()]

    def logits():
        with torch.no_grad():
            return comp.model(input_ids=ids).logits

    default = logits()
    with comp.decoder_mode():
        decoded = logits()
        with comp.frozen_mode():
            frozen = logits()
        assert torch.equal(logits(), decoded)  # the outer state comes back
    assert torch.equal(logits(), default)
    with comp._peft_adapter_state("decoder"):
        assert torch.equal(logits(), decoded)
    with comp._peft_adapter_state(None):
        assert torch.equal(logits(), frozen)
    plain, _ = make_tiny_llama()  # the same base weights, no adapter
    with torch.no_grad():
        torch.testing.assert_close(frozen, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert not torch.equal(decoded, default) and not torch.equal(decoded, frozen)
    assert [p.requires_grad for p in comp.lora_parameters()] == flags
    comp._adapter_switches = lambda: None  # a peft whose layers keep their state elsewhere: its own switches
    with comp.decoder_mode():
        assert torch.equal(logits(), decoded)
    with comp.frozen_mode():
        assert torch.equal(logits(), frozen)
    assert torch.equal(logits(), default) and [p.requires_grad for p in comp.lora_parameters()] == flags


def test_a_stream_frees_the_model_between_pieces_in_the_compressors_own_state(tiny):
    """Each step of a stream enters the decoder's state and leaves it: compressing (the encoder's
    state) between its pieces gives what it gives alone, and the stream's answer is unchanged."""
    from sac_rag import SAC

    comp = _compressor(tiny, decoder_lora_rank=4)
    sac = SAC(comp, GenerationConfig(max_new_tokens=5))
    sac.generator.eos_token_ids = set()  # the answer runs to max_new_tokens
    question, other = "Where is the tower?", "The bridge opened in 1901."
    expected = sac.answer(question, [TEXT]).text
    alone = sac.compress(other)
    ids = torch.tensor([_ids(comp.tokenizer, other)])
    with torch.no_grad():
        default = comp.model(input_ids=ids).logits
    stream = sac.stream(question, [TEXT])
    pieces = [next(stream)]
    assert not sac._lock.locked()
    with torch.no_grad():
        assert torch.equal(comp.model(input_ids=ids).logits, default)  # the adapters as they were
    between = sac.compress(other)
    pieces += list(stream)
    assert "".join(pieces) == expected and len(pieces) > 1
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(alone, between))


def test_a_checkpoint_path_with_a_tilde_is_the_home_folders(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    comp = _compressor(tiny)
    comp.save_pretrained("~/my-compressor")
    assert (tmp_path / "home" / "my-compressor" / "config.json").exists() and not (tmp_path / "~").exists()
    loaded = SACCompressor.from_pretrained("~/my-compressor", *make_tiny_llama())
    assert loaded.fingerprint == comp.fingerprint


def test_a_save_that_fails_names_the_directory_and_leaves_no_new_directory_nor_a_changed_checkpoint(
        tiny, tmp_path, monkeypatch):
    """A full disk gave a bare OSError without the path and left an empty new directory behind."""
    from sac_rag.errors import CheckpointWriteError

    comp = _compressor(tiny)
    comp.save_pretrained(tmp_path / "kept")
    before = (tmp_path / "kept" / "config.json").read_text()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compressor_module, "atomic_write", full)
    for target in ("new", "kept"):
        with pytest.raises(CheckpointWriteError, match=rf"cannot save the compressor to .*{target}: No space left "
                                                       "on device; make room there") as info:
            comp.save_pretrained(tmp_path / target)
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "kept" / "config.json").read_text() == before
    monkeypatch.undo()
    SACCompressor.from_pretrained(tmp_path / "kept", *make_tiny_llama())


def test_a_prompt_layout_of_other_than_strings_is_refused_naming_the_field():
    with pytest.raises(InvalidInputError, match=r"PromptTemplate.prefix must be a string \(\"\" for none\), got None"):
        PromptTemplate(prefix=None)
