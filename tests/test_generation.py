"""Generator on a tiny random Llama: batching, streaming, stopping, sampling, prompt errors."""

import codecs
import copy
import dataclasses

import pytest
import torch
from conftest import force_answer, make_tiny_llama

from sac_rag import (
    FingerprintMismatchError,
    GenerationConfig,
    Generator,
    InvalidInputError,
    PromptError,
    PromptTemplate,
    PromptTooLongError,
    SACCompressor,
    SACConfig,
)
from sac_rag.extractive import token_bytes
from sac_rag.generation import bos_ids

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "In 1889 the tower was finished. Anchors carry the meaning of a chunk. "
)


@pytest.fixture
def setup(tiny):
    model, tokenizer = tiny
    comp = SACCompressor(
        SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8),
        model=model, tokenizer=tokenizer,
    )
    return comp, Generator.from_compressor(comp)


def test_full_text_prompt_matches_transformers_greedy_generate(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    prompt = "Paris is the capital of"
    ours = gen.generate([prompt], GenerationConfig(max_new_tokens=15))
    ids = tokenizer(prompt, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = ref[0, ids["input_ids"].shape[1]:].tolist()
    assert ours.token_ids == [t for t in expected][: len(ours.token_ids)]
    assert len(ours.token_ids) == 15 or ours.finish_reason == "stop"


def test_batched_decoding_of_prompts_with_different_cache_lengths_equals_one_by_one(setup):
    comp, gen = setup
    prompts = [
        [comp.compress(TEXT * 3), " Who built it?"],
        ["Paris is", comp.compress("the capital of France."), " and"],
        ["The quick brown fox"],
        [comp.compress(TEXT), comp.compress("Anchors carry"), " meaning"],
    ]
    cfg = GenerationConfig(max_new_tokens=12)
    together = gen.generate_batch(prompts, cfg)
    for prompt, result in zip(prompts, together):
        alone = gen.generate(prompt, cfg)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_usage_counts_text_tokens_cached_entries_and_represented_context(setup):
    comp, gen = setup
    chunks = comp.compress(TEXT * 3)
    question = " Who built it?"
    result = gen.generate([chunks, question], GenerationConfig(max_new_tokens=3))
    assert result.cached_tokens == sum(c.n_anchors for c in chunks)
    assert result.context_tokens == sum(c.n_tokens for c in chunks)
    assert result.text_tokens == len(comp.tokenizer(question, add_special_tokens=False)["input_ids"])
    assert result.cached_tokens < result.context_tokens


def test_streaming_yields_incrementally_and_adds_up_to_the_full_answer(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " the"]
    cfg = GenerationConfig(max_new_tokens=20)
    pieces = list(gen.stream(prompt, cfg))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(prompt, cfg).text


def test_stop_string_ends_the_answer_and_is_never_streamed(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " the"]
    full = gen.generate(prompt, GenerationConfig(max_new_tokens=20)).text
    assert len(full) > 6
    stop = full[3:6]
    cfg = GenerationConfig(max_new_tokens=20, stop=(stop,))
    cut = gen.generate(prompt, cfg)
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    assert "".join(gen.stream(prompt, cfg)) == cut.text


def test_sampling_is_reproducible_with_a_seed(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " the"]
    cfg = GenerationConfig(max_new_tokens=15, temperature=1.5, top_k=50, top_p=0.95, seed=11)
    assert gen.generate(prompt, cfg).token_ids == gen.generate(prompt, cfg).token_ids
    others = {tuple(gen.generate(prompt, GenerationConfig(max_new_tokens=15, temperature=1.5, seed=s)).token_ids)
              for s in range(4)}
    assert len(others) > 1


def test_a_seeded_prompt_draws_the_same_answer_alone_and_in_any_batch(setup):
    comp, gen = setup
    context = comp.compress(TEXT)
    first, second = [context, " the"], [context, " It was built by"]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, seed=5)
    alone = [gen.generate(p, cfg).token_ids for p in (first, second)]
    batched = [g.token_ids for g in gen.generate_batch([first, second, first], cfg)]
    assert batched == [alone[0], alone[1], alone[0]]
    assert alone[0] != gen.generate(first, GenerationConfig(max_new_tokens=12, temperature=1.5, seed=6)).token_ids


def test_eos_token_stops_generation(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    prompt = ["Paris"]
    first = gen.generate(prompt, GenerationConfig(max_new_tokens=1)).token_ids[0]
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=5, stop_token_ids=(first,)))
    assert result.token_ids == [] and result.finish_reason == "stop"


def test_prompt_ending_with_a_compressed_context_is_refused(setup):
    comp, gen = setup
    with pytest.raises(PromptError, match="end with text"):
        gen.generate(["Question first", comp.compress(TEXT)])


def test_segment_of_unknown_type_is_refused(setup):
    _, gen = setup
    with pytest.raises(PromptError, match="segment"):
        gen.generate(["text", 42, "more"])


@pytest.mark.parametrize("call", ["generate", "generate_batch", "stream"])
def test_a_prompt_or_config_of_the_wrong_type_is_refused_saying_what_to_pass(setup, call):
    """Not a TypeError from iterating a prompt that is no list, nor an AttributeError from reading a
    dict's settings."""
    _, gen = setup
    decode = {"generate": gen.generate, "generate_batch": lambda p, c=None: gen.generate_batch([p], c),
              "stream": lambda p, c=None: list(gen.stream(p, c))}[call]
    for prompt in (None, 42):
        with pytest.raises(PromptError, match=f"a prompt is a str or a list of segments.*got {type(prompt).__name__}"):
            decode(prompt)
    with pytest.raises(InvalidInputError, match=r"config must be a GenerationConfig.*got dict \(GenerationConfig\("):
        decode(["Paris is"], {"max_new_tokens": 2})
    with pytest.raises(InvalidInputError, match="generate_batch takes a non-empty list of prompts, got None"):
        gen.generate_batch(None)


def test_compressed_context_from_another_model_is_refused_naming_both(setup):
    _comp, gen = setup
    other_model, other_tok = make_tiny_llama(seed=5)
    other = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4), model=other_model,
                          tokenizer=other_tok)
    foreign = other.compress(TEXT)
    with pytest.raises(FingerprintMismatchError) as info:
        gen.generate([foreign, " question"])
    assert other.base_fingerprint in str(info.value) and gen.base_fingerprint in str(info.value)


def test_a_decoder_adapter_refuses_caches_of_another_compressor_on_its_base_model_naming_both_compressors():
    def compressor(ratio):
        model, tokenizer = make_tiny_llama()
        return SACCompressor(SACConfig(base_model="tiny", ratio=ratio, chunk_len=32, lora_rank=4,
                                       decoder_lora_rank=4), model=model, tokenizer=tokenizer)

    ours, other = compressor(3), compressor(4)
    assert ours.base_fingerprint == other.base_fingerprint and ours.fingerprint != other.fingerprint
    with pytest.raises(FingerprintMismatchError) as info:
        Generator.from_compressor(ours).generate([other.compress(TEXT), " question"])
    assert f"model in use is {ours.fingerprint!r}" in str(info.value) and other.fingerprint in str(info.value)


def test_prompt_longer_than_the_model_context_is_refused_naming_all_its_positions_before_reading_any(setup):
    comp, gen = setup
    gen.max_positions = 40
    kv = comp.compress(TEXT * 3)  # several chunks
    question = " question. " * 9
    needed = len(bos_ids(gen.tokenizer)) + sum(c.n_tokens for c in kv) + len(gen.tokenizer(question)["input_ids"])
    calls = []
    hook = gen.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(PromptTooLongError, match=f"the prompt needs {needed} positions but the model has 40"):
            gen.generate([kv, question])
    finally:
        hook.remove()
    assert calls == []  # refused before the model read anything


def test_contexts_longer_than_the_model_are_refused_before_anything_is_compressed(setup, monkeypatch):
    from sac_rag import SAC

    comp, _ = setup
    sac = SAC(comp, GenerationConfig(max_new_tokens=2))
    tokens = len(comp.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    sac.generator.max_positions = 2 * tokens + 50  # room for two contexts and the question
    precompressed = sac.compress(TEXT)
    assert sac.answer("Who?", [TEXT, precompressed]).cached_tokens > 0
    monkeypatch.setattr(comp, "compress_batch", lambda texts: pytest.fail("compressed a prompt that cannot fit"))
    with pytest.raises(PromptError, match=f"hold {4 * tokens} tokens and the model has {2 * tokens + 50} positions"):
        sac.answer("Who?", [TEXT, TEXT, TEXT, precompressed])
    # counted as the decoder reads the prompt: the template's text and BOS too, and a position for the answer
    [read] = sac.generator._start([sac.prompt("Who?", [precompressed, precompressed])])[0]
    sac.generator.max_positions = read.position
    with pytest.raises(PromptError, match="the question, the prompt around it and the answer take"):
        sac.answer("Who?", [TEXT, TEXT])
    monkeypatch.undo()  # it fits: compressing is fine
    sac.generator.max_positions = read.position + 1
    assert len(sac.answer("Who?", [TEXT, TEXT]).token_ids) == 1  # the one position left


def test_template_builds_prefix_contexts_and_question_in_order(setup):
    comp, _ = setup
    chunks = comp.compress(TEXT)
    template = PromptTemplate(prefix="<s>", context_separator="\n")
    segments = template.build([chunks, "plain text context"], "Who?")
    assert segments[0] == "<s>### Context:\n"
    assert segments[1 : 1 + len(chunks)] == chunks
    assert segments[-1] == "\nplain text context\n### Question:\nWho?\n### Answer:\n"
    with pytest.raises(InvalidInputError, match="question is empty"):
        template.build([chunks], "  ")


def test_a_conversation_is_laid_out_as_contexts_then_each_question_with_its_answer():
    """Chat engines send turns; the decoder was trained on contexts then a question. System (and tool)
    turns are the context, each user turn a question, each assistant turn its answer, so a single
    question reads exactly as ``build`` lays it out."""
    template = PromptTemplate(prefix="<s>")
    marker = "<sac:" + "a" * 64 + ">"
    assert template.conversation([("system", marker), ("user", "Who?")]) == \
        "".join(template.build([marker], "Who?")) == f"<s>### Context:\n{marker}\n### Question:\nWho?\n### Answer:\n"
    turns = [("system", "Use the context."), ("user", "Who built it?"), ("assistant", "Eiffel"),
             ("tool", marker), ("user", "When?")]
    assert template.conversation(turns) == (f"<s>### Context:\nUse the context.\n{marker}\n### Question:\nWho built "
                                            "it?\n### Answer:\nEiffel\n### Question:\nWhen?\n### Answer:\n")
    assert template.conversation([("user", "Who?")]) == "".join(template.build([], "Who?"))  # no context
    for turns in ([("system", marker)], [("user", "Who?"), ("assistant", "Bob"), ("user", " ")]):
        with pytest.raises(InvalidInputError, match="no question"):
            template.conversation(turns)
    # laid out to be counted (part of a conversation at a time), turns need no question
    assert template.conversation([("system", marker)], asking=False) == f"<s>### Context:\n{marker}"


def test_batch_api_refuses_a_bare_prompt(setup):
    _, gen = setup
    with pytest.raises(InvalidInputError, match="list of prompts"):
        gen.generate_batch("just a string")
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    assert torch.is_tensor(gen.prompt_logits(["Paris is"]))


def test_sac_facade_answers_from_compressed_and_from_full_text(setup):
    from sac_rag import SAC

    comp, _ = setup
    sac = SAC(comp, GenerationConfig(max_new_tokens=6))
    compressed = sac.answer("Who finished the tower?", [TEXT, "Paris is the capital of France."])
    full = sac.answer("Who finished the tower?", [TEXT, "Paris is the capital of France."], full_text=True)
    assert compressed.cached_tokens > 0 and compressed.context_tokens > compressed.cached_tokens
    assert full.cached_tokens == 0 and full.text_tokens > compressed.text_tokens
    precompressed = sac.answer("Who finished the tower?", [sac.compress(TEXT), "Paris is the capital of France."])
    assert precompressed.token_ids == compressed.token_ids
    batch = sac.answer_batch(["Who?", "What?"], [[TEXT], [TEXT * 2]])
    assert len(batch) == 2 and batch[0].token_ids == sac.answer("Who?", [TEXT]).token_ids
    assert "".join(sac.stream("Who?", [TEXT])) == sac.answer("Who?", [TEXT]).text
    merged = SAC(comp, GenerationConfig(max_new_tokens=6), merge_decoder=True)
    assert merged.generator.reader is not None and sac.generator.reader is None
    assert merged.answer("Who finished the tower?", [TEXT]).token_ids == sac.answer("Who finished the tower?",
                                                                                    [TEXT]).token_ids

def test_sac_facade_reads_contexts_given_as_any_iterable_and_refuses_other_shapes_naming_them(setup):
    from sac_rag import SAC

    comp, _ = setup
    sac = SAC(comp, GenerationConfig(max_new_tokens=4))
    listed = sac.answer("Who finished the tower?", [TEXT])
    from_generator = sac.answer("Who finished the tower?", (t for t in [TEXT]))
    assert from_generator.cached_tokens == listed.cached_tokens > 0
    assert from_generator.token_ids == listed.token_ids
    assert sac.answer("Who?", TEXT).token_ids == sac.answer("Who?", [TEXT]).token_ids
    assert sac.answer("Who?", [tuple(sac.compress(TEXT))]).token_ids == sac.answer("Who?", [TEXT]).token_ids
    for contexts, named in [([{"text": TEXT}], "a dict"), ([[TEXT]], "a list of str"), ([TEXT.encode()], "a bytes"),
                            ([5], "an int"), ([None], "a NoneType"), ({"text": TEXT}, "a dict"), (b"x", "a bytes"),
                            ([[]], "an empty list")]:
        with pytest.raises(InvalidInputError, match=named):
            sac.answer("Who?", contexts)
    with pytest.raises(InvalidInputError, match="flatten"):
        sac.stream("Who?", [[TEXT, TEXT]])
    with pytest.raises(InvalidInputError, match="context 1 is a dict"):
        sac.answer_batch(["Who?"], [[TEXT, {"text": TEXT}]])
    with pytest.raises(InvalidInputError, match="list of questions"):
        sac.answer_batch("Who?", [[TEXT]])
    with pytest.raises(InvalidInputError, match="question must be a string, got int: 5"):
        sac.answer(5, [TEXT])



def test_generation_stops_at_the_model_context_limit(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    n_prompt = len(tokenizer("Paris is", add_special_tokens=False)["input_ids"])
    gen.max_positions = n_prompt + 3
    result = gen.generate(["Paris is"], GenerationConfig(max_new_tokens=20, stop_token_ids=()))
    assert len(result.token_ids) <= 3 and result.finish_reason in ("length", "stop")


def test_a_wrappers_call_settings_override_its_defaults_and_add_stop_strings():
    from types import SimpleNamespace
    wrapper = SimpleNamespace(max_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None, extractive=False,
                              num_beams=1, length_penalty=1.0, mbr=False, stop=["\n###", ""])
    config = GenerationConfig.from_call(wrapper, {"max_tokens": 5, "temperature": 0.7, "seed": 3}, ["\n", "\n###"])
    assert (config.max_new_tokens, config.temperature, config.seed, config.top_p) == (5, 0.7, 3, 1.0)
    beams = GenerationConfig.from_call(wrapper, {"num_beams": 4, "length_penalty": 0.0, "mbr": True})
    assert (beams.num_beams, beams.length_penalty, beams.mbr) == (4, 0.0, True)
    assert config.stop == ("\n###", "\n")  # the wrapper's first, each once, no empty string
    assert GenerationConfig.from_call(wrapper, {}).stop == ("\n###",)
    with pytest.raises(InvalidInputError):
        GenerationConfig.from_call(wrapper, {"max_tokens": 0})


def test_a_setting_chosen_alone_takes_the_rest_of_the_recommendation_it_needs():
    """``mbr=True`` alone needs beams: the recommended ones fill them, rather than it being refused for
    having none; a choice that does not combine with the recommendation drops all of it."""
    from types import SimpleNamespace
    wrapper = SimpleNamespace(max_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None, extractive=False,
                              num_beams=1, length_penalty=1.0, mbr=False, stop=[])
    recommended = {"num_beams": 8, "mbr": True}
    config = GenerationConfig.from_call(wrapper, {"mbr": True}, recommended=recommended)
    assert (config.num_beams, config.mbr) == (8, True)
    greedy = GenerationConfig.from_call(wrapper, {"num_beams": 1}, recommended=recommended)
    assert (greedy.num_beams, greedy.mbr) == (1, False)
    with pytest.raises(InvalidInputError, match="mbr chooses among beam search's answers"):
        GenerationConfig.from_call(wrapper, {"mbr": True, "num_beams": 1}, recommended=recommended)


def _transformers_beam_search(model, tokenizer, prompt, num_beams, length_penalty, eos):
    """transformers' own beam search (default ``early_stopping=False``): the answer's tokens."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, num_beams=num_beams, do_sample=False, early_stopping=False,
                         length_penalty=length_penalty, eos_token_id=sorted(eos), pad_token_id=0)
    answer = out[0, ids["input_ids"].shape[1]:].tolist()
    while answer and answer[-1] == 0:  # padding after the end (token 0 is never generated here)
        answer.pop()
    return answer[:-1] if answer and answer[-1] in eos else answer


def _shown(tokenizer, ids: list[int]) -> str:
    """The text of answer tokens ``ids`` as a Generation shows it: without a character the answer
    began and did not finish (the one U+FFFD this byte-level tokenizer decodes its bytes to)."""
    spelled = token_bytes(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(b"".join(spelled[i] for i in ids))
    text = tokenizer.decode(ids)
    return text[:-1] if decoder.getstate()[0] else text


@pytest.mark.parametrize("prompt", ["Paris is the capital of", "The quick brown fox", "In 1889"])
@pytest.mark.parametrize("num_beams, length_penalty, ends_at", [(3, 1.0, None), (4, 1.0, 2), (2, 0.0, 1), (5, 2.0, 3)])
def test_beam_search_finds_the_answer_transformers_beam_search_finds(tiny, prompt, num_beams, length_penalty, ends_at):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    greedy = gen.generate([prompt], GenerationConfig(max_new_tokens=10)).token_ids
    assert 0 not in greedy
    stop = (greedy[ends_at],) if ends_at is not None else ()  # a token the search meets: answers end early
    ours = gen.generate([prompt], GenerationConfig(max_new_tokens=10, num_beams=num_beams,
                                                   length_penalty=length_penalty, stop_token_ids=stop))
    expected = _transformers_beam_search(model, tokenizer, prompt, num_beams, length_penalty,
                                         gen.eos_token_ids | set(stop))
    assert ours.token_ids == expected and ours.text == _shown(tokenizer, expected)
    assert ours.finish_reason == ("length" if len(expected) == 10 else "stop")


@pytest.mark.parametrize("prompt, num_beams, every, length_penalty", [
    ("In 1889", 2, 3, 1.0), ("In 1889", 2, 3, 2.0), ("Anchors carry", 2, 2, 2.0)])
def test_beam_search_with_many_end_tokens_weighs_as_many_continuations_as_transformers(
        tiny, prompt, num_beams, every, length_penalty):
    """With many end tokens (every ``every``-th token id stops), more than ``num_beams`` of the
    2 x ``num_beams`` best continuations often end: transformers then weighs (1 + end tokens) x
    ``num_beams`` of them, so that ``num_beams`` answers still run on."""
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    stop = tuple(range(every, len(tokenizer), every))
    ours = gen.generate([prompt], GenerationConfig(max_new_tokens=10, num_beams=num_beams,
                                                   length_penalty=length_penalty, stop_token_ids=stop))
    assert ours.token_ids == _transformers_beam_search(model, tokenizer, prompt, num_beams, length_penalty,
                                                       gen.eos_token_ids | set(stop))


def test_minimum_bayes_risk_answers_with_the_answer_most_of_the_probability_agrees_with():
    from sac_rag.generation import _consensus, _Track

    def answers(*scored):
        return [(log_prob, _Track(text=text)) for text, log_prob in scored]

    # "Lyon" scores best alone, but "Paris" and "in Paris" overlap and together outweigh it
    assert _consensus(answers(("Lyon", -1.0), ("Paris", -1.1), ("in Paris", -1.2))).text == "Paris"
    assert _consensus(answers(("Lyon", 0.0), ("Paris", -5.0), ("in Paris", -5.0))).text == "Lyon"  # confident
    assert _consensus(answers(("the Seine", -1.0), ("Seine", -1.0))).text == "the Seine"  # same answer: the first
    with pytest.raises(InvalidInputError, match="num_beams >= 2"):
        GenerationConfig(mbr=True)


def test_minimum_bayes_risk_with_samples_scores_beams_and_samples_by_their_mean_f1_against_the_samples():
    from sac_rag.generation import _consensus, _Track

    beams = [(0.0, _Track(text="Lyon")), (-5.0, _Track(text="Nice"))]  # without samples: "Lyon", confidently
    samples = [_Track(text=text) for text in ("Paris", "in Paris", "Paris", "Lyon")]
    assert _consensus(beams, samples) is samples[0]  # mean F1 2/3, against 7/12 for "in Paris": a sample wins
    assert _consensus(beams, [_Track(text="Nice"), _Track(text="Nice"), _Track(text="Lyon")]).text == "Nice"
    agreed = [_Track(text="Seine"), _Track(text="Seine")]
    assert _consensus([(0.0, _Track(text="the Seine"))], agreed).text == "the Seine"  # the same answer: the beam
    with pytest.raises(InvalidInputError, match="mbr=True"):
        GenerationConfig(num_beams=4, mbr_samples=8)
    with pytest.raises(InvalidInputError, match="at least 2"):
        GenerationConfig(num_beams=4, mbr=True, mbr_samples=1)


def _transformers_beam_answers(model, tokenizer, prompt, num_beams, eos) -> tuple[list[str], list[float]]:
    """transformers' beam search with length penalty 0: every finished answer's text and summed
    log-probability, best first."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, num_beams=num_beams, num_return_sequences=num_beams,
                         do_sample=False, early_stopping=False, length_penalty=0.0, eos_token_id=sorted(eos),
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    texts = []
    for row in out.sequences[:, ids["input_ids"].shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos), len(row))  # then padding
        texts.append(tokenizer.decode(row[:end]))
    return texts, out.sequences_scores.tolist()


def _samples_from_one_stream(model, tokenizer, prompt, n, eos, seed, max_new_tokens=10) -> list[list[int]]:
    """The token ids of ``n`` answers sampled at temperature 1 from copies of ``prompt``, all rows drawing from one
    torch generator seeded with ``seed``, the model run on the whole text at every step."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].repeat(n, 1)
    generator = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = [[] for _ in range(n)]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens = torch.multinomial(model(ids).logits[:, -1].float().softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, tokens], dim=1)
            for row, token in zip(rows, tokens[:, 0].tolist()):
                row.append(token)
            if all(any(token in eos for token in row) for row in rows):
                break
    return [row[:next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@pytest.mark.parametrize("prompt", ["Paris is the capital of", "The quick brown fox"])
def test_minimum_bayes_risk_chooses_among_the_answers_transformers_beam_search_finds(tiny, prompt):
    from sac_rag.metrics import squad_f1

    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    stop = (gen.generate([prompt], GenerationConfig(max_new_tokens=10)).token_ids[2],)  # answers end early
    texts, scores = _transformers_beam_answers(model, tokenizer, prompt, 4, gen.eos_token_ids | set(stop))
    weights = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()
    agreement = [sum(w * squad_f1(text, [other]) for w, other in zip(weights, texts)) for text in texts]
    expected = texts[agreement.index(max(agreement))]
    ours = gen.generate([prompt], GenerationConfig(max_new_tokens=10, num_beams=4, length_penalty=0.0,
                                                   stop_token_ids=stop, mbr=True))
    assert ours.text == expected


@pytest.mark.parametrize("prompt", ["Paris is the capital of", "The quick brown fox"])
def test_minimum_bayes_risk_with_samples_weighs_transformers_beams_against_the_generators_own_samples(
        tiny, prompt, monkeypatch):
    import sac_rag.generation as generation

    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    stop = (gen.generate([prompt], GenerationConfig(max_new_tokens=10)).token_ids[2],)
    beam_texts, _ = _transformers_beam_answers(model, tokenizer, prompt, 4, gen.eos_token_ids | set(stop))
    sampled = _samples_from_one_stream(model, tokenizer, prompt, 5, gen.eos_token_ids | set(stop), seed=3)
    assert len({tuple(ids) for ids in sampled}) > 1  # temperature 1: the samples differ
    seen, consensus = [], generation._consensus

    def recorded_consensus(answers, samples=None):
        seen.append(([track.text for _, track in answers], [track.ids for track in samples],
                     [track.text for track in samples]))
        return consensus(answers, samples)

    monkeypatch.setattr(generation, "_consensus", recorded_consensus)
    ours = gen.generate([prompt], GenerationConfig(max_new_tokens=10, num_beams=4, length_penalty=0.0,
                                                   stop_token_ids=stop, mbr=True, mbr_samples=5, seed=3))
    # the beam search after sampling finds what it finds alone, and the samples are one seeded stream's draws
    assert [(texts, ids) for texts, ids, _ in seen] == [(beam_texts, sampled)]
    assert ours.text == consensus([(0.0, generation._Track(text=t)) for t in beam_texts],
                                  [generation._Track(text=s) for s in seen[0][2]]).text


def test_beam_search_over_compressed_contexts_keeping_every_token_equals_it_over_the_text(tiny):
    model, tokenizer = tiny
    identity = SACCompressor(SACConfig(base_model="tiny", ratio=1, chunk_len=256, lora_rank=0, bidirectional=False,
                                       anchor_embedding="none"), model=model, tokenizer=tokenizer)
    gen = Generator.from_compressor(identity)
    config = GenerationConfig(max_new_tokens=8, num_beams=3)
    compressed = [identity.compress(TEXT), "Who built it?"]  # one chunk, every token kept, no adapter
    from_cache = gen.generate(compressed, config)
    from_text = gen.generate([TEXT + "Who built it?"], config)
    assert from_cache.token_ids == from_text.token_ids and from_cache.cached_tokens > 0
    greedy = gen.generate(compressed, GenerationConfig(max_new_tokens=8))
    assert from_cache.token_ids != greedy.token_ids  # the search found another answer than greedy decoding


def test_beam_search_ends_beams_at_a_stop_string_and_batches_prompts_one_by_one(setup):
    comp, gen = setup
    prompts = [[comp.compress(TEXT), " the"], ["The quick brown fox"]]
    beams = GenerationConfig(max_new_tokens=12, num_beams=3)
    together = gen.generate_batch(prompts, beams)
    assert [r.token_ids for r in together] == [gen.generate(p, beams).token_ids for p in prompts]
    full = together[0]
    stop = full.text[2:4]
    cut = gen.generate(prompts[0], GenerationConfig(max_new_tokens=12, num_beams=3, stop=(stop,)))
    assert stop in full.text and stop not in cut.text  # the beams that met it ended there
    assert cut.token_ids != full.token_ids


def test_settings_of_the_wrong_type_are_refused_naming_the_setting_and_a_single_stop_is_one_string():
    for setting, value in [("num_beams", 2.5), ("max_new_tokens", 2.5), ("max_new_tokens", None),
                           ("max_new_tokens", "5"), ("top_k", 1.5), ("seed", 0.5), ("num_beams", True),
                           ("temperature", float("nan")), ("length_penalty", float("nan")), ("top_p", "1")]:
        with pytest.raises(InvalidInputError, match=f"{setting} must be a"):
            GenerationConfig(**{setting: value})
    assert GenerationConfig(stop="Paris.").stop == ("Paris.",)
    assert GenerationConfig(stop_token_ids=5).stop_token_ids == (5,)
    assert GenerationConfig(stop=["a", "b"], seed=None).stop == ("a", "b")
    for stop in [("",), ("a", 3)]:
        with pytest.raises(InvalidInputError, match="stop strings must be non-empty"):
            GenerationConfig(stop=stop)
    with pytest.raises(InvalidInputError, match="stop_token_ids"):
        GenerationConfig(stop_token_ids=("\n",))


def test_out_of_range_settings_are_refused_each_naming_itself_its_value_and_what_to_pass():
    for setting, value, says in [("temperature", -0.5, r"temperature must be >= 0 \(0 decodes greedily.*got -0.5"),
                                 ("top_p", 0.0, r"top_p must be in \(0, 1\] \(1 samples from every token\), got 0"),
                                 ("top_p", 1.5, r"top_p must be in \(0, 1\].*got 1.5"),
                                 ("top_k", -1, r"top_k must be >= 0 \(0 samples from every token\), got -1"),
                                 ("seed", 2 ** 64, rf"seed must be a whole number from -\d+ to \d+.*got {2 ** 64}"),
                                 ("seed", -(2 ** 63) - 1, rf"seed must be a whole number from .*got {-(2 ** 63) - 1}"),
                                 ("stop_token_ids", 5.0, r"stop_token_ids must be token ids.*got 5.0")]:
        with pytest.raises(InvalidInputError, match=says):
            GenerationConfig(**{setting: value})
    for seed in (-(2 ** 63), 2 ** 64 - 1):  # the extremes torch takes are taken
        assert GenerationConfig(seed=seed, temperature=1.0).seed == seed


def test_a_config_is_fixed_once_made_and_a_changed_copy_is_checked_again():
    """A setting assigned afterwards would skip the checks: a stop string split into characters,
    max_new_tokens 0, a negative temperature. Changes are copies (dataclasses.replace), checked."""
    config = GenerationConfig(max_new_tokens=20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stop = "Tower"
    assert dataclasses.replace(config, stop="Tower").stop == ("Tower",)
    for change, says in [({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
                         ({"temperature": -1.0}, "temperature must be >= 0")]:
        with pytest.raises(InvalidInputError, match=says):
            dataclasses.replace(config, **change)


@pytest.mark.parametrize("setting, value, says", [
    ("extractive", "no", "extractive must be True or False, got 'no'"),
    ("mbr", "False", "mbr must be True or False, got 'False'"),
    ("stop_token_ids", (-5,), r"stop_token_ids must be token ids \(whole numbers >= 0\), got \(-5,\)")])
def test_yes_or_no_settings_take_booleans_and_token_ids_are_not_negative(setting, value, says):
    with pytest.raises(InvalidInputError, match=says):
        GenerationConfig(**{setting: value, **({"num_beams": 2} if setting == "mbr" else {})})


def test_no_stop_strings_or_stop_tokens_may_be_given_as_none():
    config = GenerationConfig(stop=None, stop_token_ids=None)  # as frameworks pass stop=None
    assert (config.stop, config.stop_token_ids) == ((), ())


def test_a_temperature_too_small_to_divide_by_samples_the_likeliest_token_instead_of_failing(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    greedy = gen.generate(["Paris is"], GenerationConfig(max_new_tokens=6)).token_ids
    for temperature in (1e-30, 1e-40, 1e-300):  # logits / t overflow float32; t itself rounds to 0 from 1e-46
        sampled = gen.generate(["Paris is"], GenerationConfig(max_new_tokens=6, temperature=temperature, seed=0))
        assert sampled.token_ids == greedy, temperature


def test_beam_search_settings_that_cannot_work_are_refused():
    with pytest.raises(InvalidInputError, match="num_beams"):
        GenerationConfig(num_beams=0)
    with pytest.raises(InvalidInputError, match="temperature=0"):
        GenerationConfig(num_beams=2, temperature=0.7)
    with pytest.raises(InvalidInputError, match="extractive=False"):
        GenerationConfig(num_beams=2, extractive=True)


def test_streaming_a_beam_search_yields_its_whole_answer_at_the_end(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " the"]
    config = GenerationConfig(max_new_tokens=12, num_beams=3)
    assert list(gen.stream(prompt, config)) == [gen.generate(prompt, config).text]


def _contrast_reference(model, tokenizer, prompt, plain, contrast, plausibility, steps):
    """Context-aware decoding by hand: full forward passes over each prompt and the answer so far;
    each token maximises (1 + a) log p(. | prompt) - a log p(. | plain) among the plausible ones."""
    with_context, without = tokenizer(prompt)["input_ids"], tokenizer(plain)["input_ids"]
    answer = []
    with torch.no_grad():
        for _ in range(steps):
            log_p = model(torch.tensor([with_context + answer])).logits[0, -1].float().log_softmax(-1)
            log_q = model(torch.tensor([without + answer])).logits[0, -1].float().log_softmax(-1)
            scores = (1 + contrast) * log_p - contrast * log_q
            scores[log_p < log_p.max() + torch.log(torch.tensor(plausibility))] = float("-inf")
            answer.append(int(scores.argmax()))
    return answer


def test_context_aware_decoding_picks_each_token_by_the_contrast_with_the_prompt_without_contexts(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    prompt, plain = TEXT + "Who built it?", "Who built it?"
    contrast = GenerationConfig(max_new_tokens=8, context_contrast=1.0, contrast_plausibility=0.01)
    ours = gen.generate([prompt], contrast, contrast_prompt=[plain])
    assert ours.token_ids == _contrast_reference(model, tokenizer, prompt, plain, 1.0, 0.01, 8)
    assert ours.token_ids != gen.generate([prompt], GenerationConfig(max_new_tokens=8)).token_ids
    # only the likeliest token is plausible at plausibility 1: the contrast changes nothing
    strict = GenerationConfig(max_new_tokens=8, context_contrast=1.0, contrast_plausibility=1.0)
    assert gen.generate([prompt], strict, contrast_prompt=[plain]).token_ids == \
        gen.generate([prompt], GenerationConfig(max_new_tokens=8)).token_ids


def test_context_aware_decoding_over_compressed_contexts_batches_streams_and_searches_beams(setup):
    comp, gen = setup
    prompts = [[comp.compress(TEXT * 2), " Who built it?"],
               ["Paris is", comp.compress("the capital of France."), " and"]]
    plains = [[" Who built it?"], ["Paris is and"]]
    config = GenerationConfig(max_new_tokens=10, context_contrast=0.5, contrast_plausibility=0.01)
    together = gen.generate_batch(prompts, config, contrast_prompts=plains)
    alone = [gen.generate(p, config, contrast_prompt=q) for p, q in zip(prompts, plains)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert "".join(gen.stream(prompts[0], config, contrast_prompt=plains[0])) == together[0].text
    assert together[0].token_ids != gen.generate(prompts[0], GenerationConfig(max_new_tokens=10)).token_ids
    beams = GenerationConfig(max_new_tokens=10, num_beams=3, context_contrast=0.5, contrast_plausibility=0.01)
    searched = gen.generate_batch(prompts, beams, contrast_prompts=plains)
    assert [r.token_ids for r in searched] == [gen.generate(p, beams, contrast_prompt=q).token_ids
                                               for p, q in zip(prompts, plains)]
    # plausibility 1 leaves each beam one continuation: the search is greedy decoding
    strict = GenerationConfig(max_new_tokens=10, num_beams=3, mbr=True, context_contrast=0.5, contrast_plausibility=1.0)
    assert gen.generate(prompts[0], strict, contrast_prompt=plains[0]).token_ids == \
        gen.generate(prompts[0], GenerationConfig(max_new_tokens=10)).token_ids


def test_sac_facade_decodes_context_aware_with_each_question_alone_as_the_contrast(setup):
    from sac_rag import SAC

    comp, gen = setup
    config = GenerationConfig(max_new_tokens=8, context_contrast=0.5, contrast_plausibility=0.01)
    sac = SAC(comp, config)
    prompt = sac.prompt("Who built it?", [TEXT])
    expected = gen.generate(prompt, config, contrast_prompt=comp.template.build([], "Who built it?"))
    assert sac.answer("Who built it?", [TEXT]).token_ids == expected.token_ids
    assert "".join(sac.stream("Who built it?", [TEXT])) == expected.text
    batch = sac.answer_batch(["Who built it?", "What is Paris?"], [[TEXT], [TEXT]])
    assert batch[0].token_ids == expected.token_ids
    assert batch[1].token_ids == gen.generate(sac.prompt("What is Paris?", [TEXT]), config,
                                              contrast_prompt=comp.template.build([], "What is Paris?")).token_ids


def test_context_aware_decoding_settings_and_prompts_that_cannot_work_are_refused(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " Who built it?"]
    with pytest.raises(InvalidInputError, match="context_contrast must be >= 0"):
        GenerationConfig(context_contrast=-0.5)
    with pytest.raises(InvalidInputError, match=r"contrast_plausibility must be in \[0, 1\]"):
        GenerationConfig(context_contrast=0.5, contrast_plausibility=2.0)
    with pytest.raises(InvalidInputError, match="pass contrast_prompt= to generate"):
        gen.generate(prompt, GenerationConfig(context_contrast=0.5))
    with pytest.raises(InvalidInputError, match="set GenerationConfig\\(context_contrast=a\\)"):
        gen.generate(prompt, GenerationConfig(), contrast_prompt=[" Who built it?"])
    with pytest.raises(InvalidInputError, match="it must be text only"):
        gen.generate(prompt, GenerationConfig(context_contrast=0.5), contrast_prompt=prompt)
    with pytest.raises(InvalidInputError, match="got 1 contrast prompts for 2 prompts"):
        gen.generate_batch([prompt, prompt], GenerationConfig(context_contrast=0.5), contrast_prompts=[[" Who?"]])


def test_unseeded_sampling_leaves_torchs_global_random_state_alone(setup):
    _, gen = setup
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    gen.generate(["Paris is"], GenerationConfig(max_new_tokens=3, temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


def test_a_chunk_stored_in_bfloat16_is_placed_as_its_float32_copy_would_be(setup):
    comp, gen = setup
    stored = comp.compress(TEXT)[0].to(dtype=torch.bfloat16)  # as a bf16 store returns it, at offset 0
    question = " Who finished the tower?"
    assert torch.equal(gen.prompt_logits([" The text:", stored, question]),
                       gen.prompt_logits([" The text:", stored.to(dtype=torch.float32), question]))


def test_an_answer_ended_inside_a_character_drops_its_partial_bytes_from_the_text_not_from_its_tokens(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    prompt = "Paris is"
    euro = tokenizer("Paris €", add_special_tokens=False)["input_ids"]  # the euro sign is 3 byte tokens
    half = euro[:-1]  # "Paris " and 2 of those 3 bytes
    assert tokenizer.decode(half) == "Paris \ufffd"
    answer = force_answer(model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), list(half))
    for config, reason in [(GenerationConfig(max_new_tokens=len(half)), "length"),  # cut by the length limit
                           (GenerationConfig(max_new_tokens=10), "stop"),  # EOS after half a character
                           (GenerationConfig(max_new_tokens=10, temperature=1.0, seed=0), "stop"),
                           (GenerationConfig(max_new_tokens=len(half), num_beams=2), "length")]:
        result = gen.generate([prompt], config)
        assert (result.text, result.token_ids, result.finish_reason) == ("Paris ", half, reason), config
        assert "".join(gen.stream([prompt], config)) == result.text
    answer[:] = tokenizer("Paris \ufffd", add_special_tokens=False)["input_ids"]  # U+FFFD's own 3 bytes: kept
    for config in (GenerationConfig(max_new_tokens=len(answer)), GenerationConfig(max_new_tokens=10)):
        result = gen.generate([prompt], config)
        assert result.text == "Paris \ufffd" and result.token_ids == answer
        assert "".join(gen.stream([prompt], config)) == result.text


def test_the_bytes_that_complete_a_partial_character_spell_one_character_of_its_length():
    from sac_rag.generation import _completing_bytes

    for char in "é€\u0800\ud7ff\ue000中\U00010000😀\U0010ffff":  # the leads E0, ED, F0 and F4 among them
        data = char.encode()
        for begun in range(1, len(data)):
            completed = (data[:begun] + _completing_bytes(data[:begun])).decode()  # strict: a valid character
            assert len(completed) == 1 and len(completed.encode()) == len(data), (char, begun)


def test_each_prompt_of_a_batch_may_generate_up_to_its_own_room_before_the_models_position_limit(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    short, long = "The quick brown fox", TEXT
    gen.max_positions = len(tokenizer(long, add_special_tokens=False)["input_ids"]) + 3  # room for 3 tokens
    for config in (GenerationConfig(max_new_tokens=8, stop_token_ids=()),
                   GenerationConfig(max_new_tokens=8, num_beams=2)):
        together = gen.generate_batch([short, long], config)
        alone = [gen.generate([p], config) for p in (short, long)]
        assert [(g.token_ids, g.text, g.finish_reason) for g in together] == \
            [(g.token_ids, g.text, g.finish_reason) for g in alone], config
        assert len(together[0].token_ids) == 8 and together[0].finish_reason == "length"  # past the long one's 3
        assert len(together[1].token_ids) <= 3


def _float32_chunk_and_model():
    model, tokenizer = make_tiny_llama()
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=0), model=model,
                         tokenizer=tokenizer)
    return comp.compress(TEXT)[0], model, tokenizer


def test_a_float32_chunk_read_by_a_bfloat16_decoder_is_moved_exactly_and_rounded_once():
    """Rounded to bfloat16 before the rotation and again after it, a key would carry two rounding
    errors; rotated in float32 and rounded once, it is the float32 placement's nearest bfloat16."""
    kv, model, tokenizer = _float32_chunk_and_model()
    gen = Generator(copy.deepcopy(model).to(torch.bfloat16), tokenizer)
    before = len(tokenizer(" The text:", add_special_tokens=False)["input_ids"])
    state = gen._prefill([" The text:", kv, " Who finished the tower?"])
    exact = kv.at_offset(before, gen.rotator)
    for layer, cached in enumerate(state.cache.layers):
        assert cached.keys.dtype == cached.values.dtype == torch.bfloat16
        assert torch.equal(cached.keys[0, :, before:before + kv.n_anchors], exact.keys[layer].to(torch.bfloat16))
        assert torch.equal(cached.values[0, :, before:before + kv.n_anchors], exact.values[layer].to(torch.bfloat16))


def test_a_chunk_beyond_float16s_range_is_refused_by_a_float16_decoder_instead_of_read_as_inf():
    kv, model, tokenizer = _float32_chunk_and_model()
    # (the same weights: some of this random model's are too small for float16 to hold, which would change
    # the fingerprint the generator computes)
    half = Generator(copy.deepcopy(model).to(torch.float16), tokenizer, base_fingerprint=Generator(
        model, tokenizer).base_fingerprint)
    config = GenerationConfig(max_new_tokens=2)
    assert half.generate([kv.to(dtype=torch.bfloat16), " Who?"], config).token_ids  # within range: read
    values = kv.values.to(torch.bfloat16).clone()
    values[1, 0, 0, 0] = 1e5  # fits bfloat16 (a bf16 compressor or store can hold it), not float16
    big = dataclasses.replace(kv, keys=kv.keys.to(torch.bfloat16), values=values)
    with pytest.raises(InvalidInputError, match="beyond float16's range"):
        half.generate([big, " Who?"], config)
    wide = Generator(copy.deepcopy(model).to(torch.bfloat16), tokenizer)
    assert torch.isfinite(wide.prompt_logits([big, " Who?"])).all()


def test_a_prompt_that_fills_every_position_is_refused_saying_no_room_is_left_for_the_answer(tiny):
    model, tokenizer = tiny
    gen = Generator(model, tokenizer)
    gen.max_positions = len(tokenizer("Paris is the capital of", add_special_tokens=False)["input_ids"])
    for config in (GenerationConfig(max_new_tokens=4), GenerationConfig(max_new_tokens=4, num_beams=2)):
        with pytest.raises(PromptTooLongError, match=f"fills all {gen.max_positions} positions of the model and leaves "
                                              "none for the answer"):
            gen.generate(["Paris is the capital of"], config)
    gen.max_positions += 1  # one position: one token
    assert len(gen.generate(["Paris is the capital of"], GenerationConfig(max_new_tokens=4)).token_ids) == 1


def test_an_answer_after_a_prompt_that_opens_it_is_shown_without_leading_whitespace_its_tokens_kept(tiny):
    model, tokenizer = tiny
    template = PromptTemplate()
    prompt = template.build(["Paris is the capital of France."], "Where is Paris?")
    assert len(prompt) == 1 and prompt[0].endswith(template.answer_opening) and template.answer_opening
    prompt_tokens = len(tokenizer(prompt[0], add_special_tokens=False)["input_ids"])
    answer = force_answer(model, prompt_tokens, tokenizer(" \nFrance", add_special_tokens=False)["input_ids"])
    gen = Generator(model, tokenizer)
    gen.answer_opening = template.answer_opening
    for config in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, temperature=1.0, seed=0),
                   GenerationConfig(max_new_tokens=10, num_beams=2)):
        result = gen.generate(prompt, config)
        assert (result.text, result.token_ids) == ("France", answer), config
        pieces = list(gen.stream(prompt, config))
        assert "".join(pieces) == "France" and all(pieces), config
    # whitespace and then a stop string: the stop string is still found
    answer[:] = tokenizer(" \n### Question", add_special_tokens=False)["input_ids"]
    stopped = gen.generate(prompt, GenerationConfig(max_new_tokens=10, stop=("\n###",)))
    assert (stopped.text, stopped.finish_reason) == ("", "stop")
    assert list(gen.stream(prompt, GenerationConfig(max_new_tokens=10, stop=("\n###",)))) == []
    # a prompt that does not open an answer (a completion) keeps its continuation's whitespace
    model, tokenizer = make_tiny_llama()
    completion = prompt[0][:-len(template.answer_opening)]
    force_answer(model, len(tokenizer(completion, add_special_tokens=False)["input_ids"]),
                 tokenizer(" France", add_special_tokens=False)["input_ids"])
    gen = Generator(model, tokenizer)
    gen.answer_opening = template.answer_opening
    assert gen.generate([completion], GenerationConfig(max_new_tokens=10)).text == " France"

def test_a_compressors_generator_answers_where_its_template_opens_the_answer(setup):
    comp, gen = setup
    assert gen.answer_opening == comp.config.prompt.answer_opening == "\n### Answer:\n"
    assert Generator(comp.base_model, comp.tokenizer).answer_opening is None  # a plain model's: completions
    braces = PromptTemplate(question="\nQ: {question}\n{{A}}:")  # the opening is the text as built, braces unescaped
    assert braces.answer_opening == "\n{A}:" and braces.build([], "Who?")[-1].endswith(braces.answer_opening)


def test_the_text_before_the_first_compressed_context_is_read_once_and_reused_exactly_while_the_weights_stay(tiny):
    model, tokenizer = tiny
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8,
                                   decoder_lora_rank=4), model=model, tokenizer=tokenizer)
    with torch.no_grad():  # a decoder adapter that changes the decoder's K/V (LoRA B starts at zero)
        for p in comp.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    gen = Generator.from_compressor(comp)
    reads = []
    read = gen._read_text
    gen._read_text = lambda model, state, ids, all_logits: (reads.append(list(ids)),
                                                            read(model, state, ids, all_logits))[1]
    kv = comp.compress(TEXT)
    prompts = [["Context:\n", kv, f"\nQ: {q}\nA:"] for q in ("Who?", "When was the tower finished?", "Where?")]
    config = GenerationConfig(max_new_tokens=6)

    def as_read_alone(prompt):  # by a generator that has kept nothing
        fresh = Generator.from_compressor(comp)
        return fresh._prefill(prompt), fresh.generate(prompt, config)

    answers = [gen.generate(p, config) for p in prompts]
    assert len(reads) == 1 + len(prompts)  # the opening once, each question
    for prompt, answer in zip(prompts, answers):
        state, alone = as_read_alone(prompt)
        assert torch.equal(gen._prefill(prompt).logits, state.logits) and answer.token_ids == alone.token_ids
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(gen._prefill(prompts[0]).cache.layers, as_read_alone(prompts[0])[0].cache.layers))
    decoder_b = next(p for n, p in comp.model.named_parameters() if ".decoder." in n and "lora_B" in n)
    with torch.no_grad():
        decoder_b.add_(0.5)  # as an optimizer step would: the kept opening is stale
    before, prompt = len(reads), ["Context:\n", comp.compress(TEXT), "\nQ: Who?\nA:"]  # its caches are new too
    state = gen._prefill(prompt)
    assert len(reads) == before + 2 and torch.equal(state.logits, as_read_alone(prompt)[0].logits)
    for i in range(6):  # a few kept, the least recently used dropped
        gen._prefill([f"Context {i}:\n", prompt[1], " Who?"])
    assert len(gen._openings) == 4


def test_an_answer_is_the_same_whole_generation_when_the_prompt_opening_is_reused(setup):
    """Not only the tokens: the counts of what was read (``text_tokens``) too."""
    comp, gen = setup
    prompt = ["### Context:\n", comp.compress(TEXT), "\n### Question:\nWho?\n### Answer:\n"]
    config = GenerationConfig(max_new_tokens=3)
    first, second = gen.generate(prompt, config), gen.generate(prompt, config)
    assert first == second == Generator.from_compressor(comp).generate(prompt, config)


def test_top_p_below_the_likeliest_tokens_probability_keeps_that_token_alone(setup):
    comp, gen = setup
    prompt = [comp.compress(TEXT), " the"]
    greedy = gen.generate(prompt, GenerationConfig(max_new_tokens=8)).token_ids
    nucleus = gen.generate(prompt, GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert nucleus.token_ids == greedy


def test_of_several_stop_strings_the_one_earliest_in_the_text_cuts_it():
    model, tokenizer = make_tiny_llama()
    prompt = "In 1889 the tower"
    answer = tokenizer(" Paris is the capital", add_special_tokens=False)["input_ids"]
    force_answer(model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), answer)
    out = Generator(model, tokenizer).generate(prompt, GenerationConfig(max_new_tokens=10, stop=("s the", "is the")))
    assert out.text == " Paris " and out.finish_reason == "stop"


def test_a_compressor_with_lora_dropout_answers_without_it_until_trained(tmp_path):
    """LoRA dropout is for training: a compressor built or loaded with lora_dropout > 0 reads a prompt
    to the same logits every time, from compressed contexts (through its decoder adapter) and from
    text; only after train() do its adapters drop inputs."""
    model, tokenizer = make_tiny_llama()
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_dropout=0.5,
                                   decoder_lora_rank=4), model=model, tokenizer=tokenizer)
    with torch.no_grad():
        for name, param in comp.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, where dropout would change nothing
                param.normal_(std=0.5)
    loaded = SACCompressor.from_pretrained(comp.save_pretrained(tmp_path / "ckpt"), model=make_tiny_llama()[0],
                                           tokenizer=tokenizer)
    for compressor in (comp, loaded):
        gen = Generator.from_compressor(compressor)
        for prompt in ([compressor.compress(TEXT), " question"], [TEXT + " question"]):
            torch.testing.assert_close(gen.prompt_logits(prompt), gen.prompt_logits(prompt), rtol=0, atol=0)
    comp.train()
    prompt = [comp.compress(TEXT), " question"]
    assert not torch.equal(Generator.from_compressor(comp).prompt_logits(prompt),
                           Generator.from_compressor(comp).prompt_logits(prompt))
