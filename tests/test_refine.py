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
