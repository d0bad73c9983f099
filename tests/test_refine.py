"""Refining compressed chunks at compression time (SACConfig.refine_steps, sac_rag.refine)."""

import json

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag import Generator, InvalidInputError, SACCompressor, SACConfig
from sac_rag.refine import rereading_loss

TEXT = ("The lighthouse on Gull Point was built in 1874 and painted red in 1902 by its keeper, who lived "
        "there with his family for forty years and kept a log of every ship that passed the point.")


def _compressor(**settings) -> SACCompressor:
    model, tokenizer = make_tiny_llama()
    config = SACConfig(base_model="tiny", ratio=3, chunk_len=24, lora_rank=4, lora_alpha=8, decoder_lora_rank=4,
                       **settings)
    comp = SACCompressor(config, model=model, tokenizer=tokenizer)
    with torch.no_grad():  # a trained-looking compressor: peft starts B at 0 (no adapter at all)
        generator = torch.Generator().manual_seed(0)
        for name, param in comp.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return comp


def test_refinement_lowers_the_loss_of_re_reading_each_chunk_and_keeps_the_cache_shape():
    """Each chunk's anchor K/V after refine_steps Adam steps: the decoder re-reads the chunk from them
    better than from the encoder's K/V, and the cache keeps its anchors, positions and offsets."""
    plain, refined = _compressor(), _compressor(refine_steps=20, refine_lr=0.3)
    ids = plain.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    chunks = [ids[:24], ids[24:48]]
    before, after = plain.compress_batch([TEXT])[0][:2], refined.compress_batch([TEXT])[0][:2]
    for chunk, old, new in zip(chunks, before, after):
        assert (new.n_tokens, new.offset, new.positions.tolist(), new.keys.shape, new.keys.dtype) == (
            old.n_tokens, old.offset, old.positions.tolist(), old.keys.shape, old.keys.dtype)
        assert not torch.equal(new.keys, old.keys) and not torch.equal(new.values, old.values)
        assert rereading_loss(refined, new, chunk) < 0.93 * rereading_loss(plain, old, chunk)  # a random model
    assert after[1].offset == 24  # the second chunk where the first ends, as without refinement


def test_a_chunk_refines_alike_wherever_it_is_compressed():
    """A chunk compressed in place (a text's second chunk) and the same chunk compressed at offset 0 (as
    a store holds it) and moved there are the same refined K/V, to rounding: a store's answers are
    those of the chunks compressed in place."""
    comp = _compressor(refine_steps=3, refine_lr=0.05)
    ids = comp.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    in_place = comp.compress_batch([TEXT])[0][1]
    stored = comp.compress_chunks([ids[24:48]])[0].at_offset(24, comp.rotator)
    torch.testing.assert_close(in_place.keys, stored.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(in_place.values, stored.values, atol=1e-4, rtol=1e-4)


def test_refined_caches_have_their_own_fingerprint_and_answer_through_the_generator(tmp_path):
    """Refinement changes what is cached, so it changes the fingerprint (a store of unrefined caches
    refuses the refined compressor); it is saved and loaded with the compressor."""
    plain, refined = _compressor(), _compressor(refine_steps=2)
    assert refined.fingerprint != plain.fingerprint
    loaded = SACCompressor.from_pretrained(refined.save_pretrained(tmp_path / "ckpt"), model=make_tiny_llama()[0],
                                           tokenizer=refined.tokenizer)
    assert (loaded.config.refine_steps, loaded.config.refine_lr) == (2, 0.01)
    assert loaded.fingerprint == refined.fingerprint
    kvs = loaded.compress(TEXT)
    torch.testing.assert_close(kvs[0].keys, refined.compress(TEXT)[0].keys)
    assert Generator.from_compressor(loaded).generate([kvs, " question"]).token_ids


def test_without_refinement_the_saved_settings_and_fingerprint_are_those_from_before_it_existed(tmp_path):
    comp = _compressor()
    assert "refine_steps" not in comp.config.to_dict() and "refine_lr" not in comp.config.to_dict()
    saved = json.loads((comp.save_pretrained(tmp_path / "ckpt") / "config.json").read_text())["config"]
    assert "refine_steps" not in saved
    assert SACConfig(refine_lr=0.5).to_dict() == SACConfig().to_dict()  # a rate without steps refines nothing


def test_a_one_token_chunk_has_nothing_to_re_read_and_is_kept_as_encoded():
    plain, refined = _compressor(), _compressor(refine_steps=3)
    token = plain.tokenizer("The", add_special_tokens=False)["input_ids"][:1]
    torch.testing.assert_close(refined.compress_chunks([token])[0].keys, plain.compress_chunks([token])[0].keys)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("refine_steps", -1, "refine_steps must be >= 0"),
    ("refine_steps", 2.5, "refine_steps must be an integer"),
    ("refine_lr", 0.0, "refine_lr must be a positive number"),
    ("refine_lr", float("nan"), "refine_lr must be a positive number"),
    ("refine_lr", True, "refine_lr must be a positive number"),
])
def test_bad_refinement_settings_are_refused_naming_them(setting, value, message):
    with pytest.raises(InvalidInputError, match=message):
        SACConfig(**{setting: value})
    comp = _compressor()
    setattr(comp.config, setting, value)  # edited on a compressor: refused when it would be used
    with pytest.raises(InvalidInputError, match=message):
        comp.compress(TEXT)


def test_refinement_inside_inference_mode_is_refused_saying_what_to_use():
    comp = _compressor(refine_steps=2)
    with torch.inference_mode(), pytest.raises(InvalidInputError, match=r"inference_mode.*torch.no_grad"):
        comp.compress(TEXT)
    with torch.no_grad():
        assert comp.compress(TEXT)


def test_a_dynamic_rope_model_refuses_to_re_read_a_chunk_past_its_base_frequencies():
    """Refinement reads a chunk twice after the prompt's opening: on a dynamic-RoPE model whose base
    frequencies end at max_position_embeddings, a chunk whose re-reading reaches past it is refused
    (the frequencies there differ from the chunk's), naming what to do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sac_rag.config import PromptTemplate
    from sac_rag.objectives import _prompt_head

    _, tokenizer = make_tiny_llama()
    opening = len(_prompt_head(tokenizer, PromptTemplate().prefix + PromptTemplate().context_prefix))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=opening + 2 * 20 + 1,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = LlamaForCausalLM(config).eval()
    comp = SACCompressor(SACConfig(base_model="tiny-dynamic", ratio=3, chunk_len=24, lora_rank=4, refine_steps=1),
                         model=model, tokenizer=tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert comp.compress_chunks([ids[:20]])  # the opening and twice 20 tokens: within the base frequencies
    with pytest.raises(InvalidInputError, match="dynamic RoPE.*chunk_len"):
        comp.compress_chunks([ids[:24], ids[:24]])


def test_a_prompt_opening_longer_than_a_sliding_window_is_refused_naming_what_to_shorten():
    """Refinement reads the prompt's opening as one cache; a sliding-window model (Gemma 2 here, a
    window of 32) keeps only its window of it, so an opening longer than that is refused, naming the
    template's fields, rather than failing deep inside."""
    from test_architectures import SLIDING, _build

    from sac_rag.config import PromptTemplate

    window_of_32 = {"gemma2": (*SLIDING["gemma2"][:2], {**SLIDING["gemma2"][2], "sliding_window": 32})}
    long_prefix = PromptTemplate(prefix="System: " + "Answer briefly from the context. " * 8)
    for prompt, refused in ((PromptTemplate(), False), (long_prefix, True)):
        model, tokenizer = _build("gemma2", window_of_32)
        comp = SACCompressor(SACConfig(base_model="gemma2", ratio=2, chunk_len=24, lora_rank=4, prompt=prompt,
                                       refine_steps=1), model=model, tokenizer=tokenizer)
        if refused:
            with pytest.raises(InvalidInputError, match=r"sliding-window layers keep only the last 31 .*prefix"):
                comp.compress(TEXT)
        else:
            assert comp.compress(TEXT)


def test_turning_refinement_on_for_a_loaded_sac_refines_what_it_compresses_from_then_on():
    """As the README shows it: the setting edited on a SAC's compressor takes effect at its next
    compression, and its answers read the refined caches (their fingerprint is the compressor's new one)."""
    from sac_rag import SAC, GenerationConfig

    sac = SAC(_compressor(), GenerationConfig(max_new_tokens=3))
    before = sac.fingerprint
    plain = sac.compress(TEXT)
    sac.compressor.config.refine_steps = 2
    refined = sac.compress(TEXT)
    assert sac.fingerprint != before and refined[0].fingerprint == sac.fingerprint
    assert not torch.equal(plain[0].keys, refined[0].keys)
    assert sac.answer("When was it built?", [TEXT]).text == sac.answer("When was it built?", [refined]).text


def test_set_refinement_sets_what_is_given_and_checks_it():
    config = SACConfig(refine_steps=3, refine_lr=0.05)
    config.set_refinement(lr=0.2)
    assert (config.refine_steps, config.refine_lr) == (3, 0.2)
    config.set_refinement(0)
    assert (config.refine_steps, config.refine_lr) == (0, 0.2)
    with pytest.raises(InvalidInputError, match="refine_steps must be >= 0"):
        config.set_refinement(-1)
