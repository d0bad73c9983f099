"""Extractive decoding: every answer is a verbatim span of its sources, starting at a word; the
model still chooses the span and where it ends."""

import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import force_answer, make_tiny_llama

from sac_rag import SAC, GenerationConfig, Generator, InvalidInputError, SACCompressor, SACConfig
from sac_rag.extractive import Vocabulary, token_bytes

SOURCES = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "In 1889 the tower was finished (numbers 0123456789).",
]
QUESTIONS = ["Who jumps?", "What is the capital?", "When was it finished?", "Which numbers?"]


def _is_quote(answer: str, sources: list[str]) -> bool:
    """A non-empty substring of one source that starts where a word starts."""
    if not answer:
        return False
    for source in sources:
        for match in re.finditer(re.escape(answer), source):
            if match.start() == 0 or not source[match.start() - 1].isalnum() or not answer[0].isalnum():
                return True
    return False


@pytest.fixture
def generator(tiny):
    model, tokenizer = tiny
    return Generator(model, tokenizer)


def test_every_answer_quotes_a_source_while_free_decoding_does_not(generator):
    config = GenerationConfig(max_new_tokens=8)
    prompts = [f"{' '.join(SOURCES)}\nQ: {q}\nA:" for q in QUESTIONS]
    free = generator.generate_batch(prompts, config)
    quoted = generator.generate_batch(prompts, replace(config, extractive=True), sources=[SOURCES] * len(prompts))
    assert not all(_is_quote(g.text.strip(), SOURCES) for g in free)  # the random model rambles
    assert all(_is_quote(g.text, SOURCES) for g in quoted), [g.text for g in quoted]
    sampled = generator.generate_batch(prompts, GenerationConfig(max_new_tokens=8, temperature=1.5, seed=3,
                                                                 extractive=True),
                                       sources=[SOURCES] * len(prompts))
    assert all(_is_quote(g.text, SOURCES) for g in sampled), [g.text for g in sampled]


def test_a_batch_holds_each_answer_to_its_own_sources_and_equals_one_by_one(generator):
    config = GenerationConfig(max_new_tokens=6, extractive=True)
    sources = [[SOURCES[0]], [SOURCES[1]]]
    prompts = ["Q: Who jumps?\nA:", "Q: When was it finished?\nA:"]
    batch = generator.generate_batch(prompts, config, sources=sources)
    for prompt, own, generation in zip(prompts, sources, batch):
        assert _is_quote(generation.text, own)
        assert generation.token_ids == generator.generate(prompt, config, sources=own).token_ids
    assert "".join(generator.stream(prompts[0], config, sources=sources[0])) == batch[0].text


def _constraint(tokenizer, sources):
    return Vocabulary(tokenizer, [tokenizer.eos_token_id]).constraint(sources)


def _prefer(tokenizer, *texts_in_order):
    """Logits that rank the first token of each text in the given order, everything else last."""
    logits = torch.full((len(tokenizer),), -10.0)
    for rank, text in enumerate(texts_in_order):
        token = tokenizer(text, add_special_tokens=False)["input_ids"][0] if text != "<eos>" else tokenizer.eos_token_id
        logits[token] = 10.0 - rank
    return logits


def test_the_model_chooses_the_span_and_ends_it_only_between_words(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["Paris is the capital of France."])
    paris = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    masked, ends = span.mask(_prefer(tokenizer, "London", "<eos>", "Paris"))
    assert not ends and int(masked.argmax()) == paris[0]  # at least one token, and a quoted one
    span.advance(paris[0])
    for token in paris[1:]:  # inside the word the answer cannot end, however much the model wants to
        masked, ends = span.mask(_prefer(tokenizer, "<eos>"))
        assert not ends
        span.advance(token)
    masked, ends = span.mask(_prefer(tokenizer, "<eos>", " is"))
    assert ends  # "Paris" is a whole word and the model prefers to stop
    masked, ends = span.mask(_prefer(tokenizer, "London", " is", "<eos>"))
    assert not ends and int(masked.argmax()) == tokenizer(" is", add_special_tokens=False)["input_ids"][0]


def _quote(span, tokenizer, text):
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        span.mask(torch.zeros(len(tokenizer)))
        span.advance(token)


@pytest.mark.parametrize("sources, answer", [
    (["Parisian food", "Paris is big"], "Paris"),  # its first occurrence runs on into a longer word
    (["It was 1958年に完成した."], "1958"),  # a script written without spaces ends a word anywhere
], ids=["any-occurrence", "unspaced-script"])
def test_a_quote_may_end_wherever_one_of_its_occurrences_ends_a_word(tiny, sources, answer):
    _, tokenizer = tiny
    span = _constraint(tokenizer, sources)
    _quote(span, tokenizer, answer)
    assert span.mask(_prefer(tokenizer, "<eos>"))[1]


def test_a_nul_in_a_source_is_read_as_a_space_not_as_the_end_of_the_source(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["Paris\x00is the capital."])
    _quote(span, tokenizer, "Paris")
    masked, ends = span.mask(_prefer(tokenizer, " is", "<eos>"))
    assert not ends and int(masked.argmax()) == tokenizer(" is", add_special_tokens=False)["input_ids"][0]


def test_an_answer_never_starts_with_a_token_of_spaces_alone(tiny):
    _, tokenizer = tiny
    spaces = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) in (" ", "  ", "\t")]
    assert spaces, "the tokenizer has a token of spaces alone"
    masked, _ = _constraint(tokenizer, ["The capital is  Paris."]).mask(torch.zeros(len(tokenizer)))
    assert all(torch.isinf(masked[i]) for i in spaces)


def test_the_first_token_may_carry_the_space_before_the_word(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["The capital is Paris."])
    masked, _ = span.mask(torch.zeros(len(tokenizer)))
    assert torch.isfinite(masked[tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]])


def test_an_extractive_answer_ends_at_a_stop_token_its_sources_do_not_hold():
    model, tokenizer = make_tiny_llama()
    prompt = "In 1889 the tower"
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    stop = tokenizer("!", add_special_tokens=False)["input_ids"]
    assert len(stop) == 1 and len(paris) == 1
    force_answer(model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), paris + stop + paris)
    out = Generator(model, tokenizer).generate(
        prompt, GenerationConfig(max_new_tokens=6, extractive=True, stop_token_ids=stop),
        sources=["The capital is Paris, Paris is the capital of France."])
    assert (out.text, out.finish_reason, out.token_ids) == ("Paris", "stop", paris)


def test_a_span_never_crosses_from_one_source_into_the_next(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["the lazy dog", "Paris"])
    for word in ["the", " lazy", " dog"]:
        _quote(span, tokenizer, word)
    masked, ends = span.mask(_prefer(tokenizer, "Paris"))
    assert ends and torch.isinf(masked).all()


def test_a_token_outside_every_span_is_refused(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["Paris is the capital of France."])
    span.mask(torch.zeros(len(tokenizer)))
    with pytest.raises(InvalidInputError, match="does not continue a span"):
        span.advance(tokenizer("London", add_special_tokens=False)["input_ids"][0])


def test_missing_empty_or_too_few_sources_are_refused_and_sources_alone_do_not_switch_it_on(generator):
    extractive = GenerationConfig(extractive=True)
    with pytest.raises(InvalidInputError, match="needs the texts"):
        generator.generate("Q: Who?\nA:", extractive)
    with pytest.raises(InvalidInputError, match="non-empty source"):
        generator.generate("Q: Who?\nA:", extractive, sources=["  "])
    with pytest.raises(InvalidInputError, match="one per prompt"):
        generator.generate_batch(["Q: Who?\nA:", "Q: What?\nA:"], extractive, sources=[SOURCES])
    with pytest.raises(InvalidInputError, match="extractive=True"):
        generator.generate("Q: Who?\nA:", sources=SOURCES)


class _Vocab:
    """A stand-in tokenizer with a fixed vocabulary of token strings."""

    def __init__(self, tokens, probe_ids):
        self.tokens, self.probe_ids, self.all_special_ids = tokens, probe_ids, [0]

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.probe_ids}


def test_sentencepiece_tokens_with_byte_fallback_are_spelled_and_other_vocabularies_refused():
    probe = "Extractive probe: Bjørgvin, 1,230 km\n(1749) naïve"
    tokens = ["<s>"]
    for ch in probe:  # SentencePiece style: "▁" for a space, byte tokens for what is not in the vocabulary
        if ch == " ":
            tokens.append("\u2581")
        elif ord(ch) > 127 or ch == "\n":
            tokens += [f"<0x{b:02X}>" for b in ch.encode()]
        else:
            tokens.append(ch)
    spelled = token_bytes(_Vocab(tokens, list(range(1, len(tokens)))))
    assert spelled[0] is None and b"".join(spelled[1:]) == probe.encode()
    with pytest.raises(InvalidInputError, match="cannot map the tokens"):
        token_bytes(_Vocab(["[CLS]", "extract", "##ive"], [1, 2]))


def test_the_facade_quotes_text_contexts_and_refuses_precompressed_ones(tiny):
    model, tokenizer = tiny
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8),
                         model=model, tokenizer=tokenizer)
    sac = SAC(comp, GenerationConfig(max_new_tokens=6))
    answer = sac.answer("When was it finished?", SOURCES, extractive=True)
    assert _is_quote(answer.text, SOURCES) and answer.cached_tokens > 0
    batch = sac.answer_batch(["When?"], [SOURCES], extractive=True)
    assert batch[0].text == sac.answer("When?", SOURCES, extractive=True).text
    with pytest.raises(InvalidInputError, match="pass them as text"):
        sac.answer("When?", [sac.compress(SOURCES[0])], extractive=True)


def test_eval_extractive_rows_are_labelled_and_answers_quote_the_passage(tmp_path):
    import lzma

    from sac_rag.eval import main, read_predictions

    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    context = "Paris is the capital of France. In 1889 the tower was finished."
    data = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": "What is the capital?", "answers": [{"text": "Paris"}]} for i in range(3)]}]}]}
    (tmp_path / "data" / "squad-v1.1").mkdir(parents=True)
    with lzma.open(tmp_path / "data" / "squad-v1.1" / "dev-v1.1.json.xz", "wt") as f:
        json.dump(data, f)
    results = tmp_path / "results" / "q.jsonl"
    assert main(["--method", "full_context", "--extractive", "--base-model", str(tmp_path / "m"), "--data-root",
                 str(tmp_path / "data"), "--n", "3", "--max-new-tokens", "4", "--timing-samples", "0",
                 "--results", str(results), "--dtype", "float32"]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    assert row["method"] == "full_context-extractive" and row["decoding"] == "extractive"
    predictions = read_predictions(results.parent / "predictions"
                                   / "full_context-extractive-float32-squad-dev-n3-s0.jsonl")
    assert len(predictions) == 3 and all(_is_quote(p, [context]) for p in predictions.values())


def test_a_stop_token_of_the_call_ends_the_quote_like_an_end_token(tiny):
    _, tokenizer = tiny
    span = _constraint(tokenizer, ["Paris is the capital of France."])
    for token in tokenizer("Paris", add_special_tokens=False)["input_ids"]:
        span.mask(torch.zeros(len(tokenizer)))
        span.advance(token)
    london = tokenizer("London", add_special_tokens=False)["input_ids"][0]
    assert not span.mask(_prefer(tokenizer, "London", " is"))[1]  # London is no span's next token
    assert span.mask(_prefer(tokenizer, "London", " is"), stop_token_ids=[london])[1]  # ... but a stop token


def test_in_scripts_written_without_spaces_every_character_may_start_or_end_a_quote():
    from sac_rag.extractive import _word_starts

    assert _word_starts("中国的首都是北京".encode()) == list(range(0, 24, 3))
    assert _word_starts("東京タワー (1958)".encode()) == [0, 3, 6, 9, 12, 16, 17]
    assert _word_starts("café au lait (1749)".encode()) == [0, 6, 9, 14, 15]  # as before: words only


def test_context_aware_extractive_decoding_quotes_even_where_the_contrast_rules_out_every_span(generator):
    prompt = SOURCES[0] + "\nQuestion: Who jumps?\nAnswer:"
    plain = "\nQuestion: Who jumps?\nAnswer:"
    for sampled in ({}, {"temperature": 1.0, "seed": 0}):
        # plausibility 1 keeps only the likeliest token, which is rarely a quote's
        config = GenerationConfig(max_new_tokens=6, extractive=True, context_contrast=0.5,
                                  contrast_plausibility=1.0, **sampled)
        answer = generator.generate(prompt, config, sources=[SOURCES[0]], contrast_prompt=plain)
        assert _is_quote(answer.text, [SOURCES[0]]), answer.text


def test_a_quote_the_model_ends_after_a_space_ends_without_it_also_when_streamed(generator):
    tokenizer = generator.tokenizer
    prompt = "Q: What is the capital?\nA:"
    answer = tokenizer("Paris ", add_special_tokens=False)["input_ids"]  # its last token is the space
    script = force_answer(generator.model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), list(answer))
    for config, reason in [(GenerationConfig(max_new_tokens=8, extractive=True), "stop"),  # it ends after the space
                           (GenerationConfig(max_new_tokens=len(answer), extractive=True), "length")]:
        result = generator.generate(prompt, config, sources=SOURCES)
        assert (result.text, result.token_ids, result.finish_reason) == ("Paris", answer, reason), config
        assert "".join(generator.stream(prompt, config, sources=SOURCES)) == "Paris"
    script[:] = tokenizer("Paris is the", add_special_tokens=False)["input_ids"]
    cut = GenerationConfig(max_new_tokens=8, extractive=True, stop=("is the",))  # a stop string after the space
    result = generator.generate(prompt, cut, sources=SOURCES)
    assert (result.text, result.token_ids, result.finish_reason) == ("Paris", script, "stop")
    assert "".join(generator.stream(prompt, cut, sources=SOURCES)) == "Paris"


@pytest.mark.parametrize("source, wanted", [
    ("The war lasted 1939–1945 in Europe.", "1939"),  # an en dash between numbers
    ("She was called “Iron Lady” by all.", "Iron Lady"),  # curly quotes around the words
    ("It is 100\u00a0km long.", "100"),  # a no-break space
    ("It was 30°C and «très» warm.", "très"),  # guillemets
])
def test_punctuation_and_spaces_outside_ascii_separate_words_as_ascii_ones_do(generator, source, wanted):
    """The model's answer is a span between such characters: the quote starts and ends there, as it
    does at ASCII ones, instead of being pushed past them."""
    tokenizer = generator.tokenizer
    prompt = "Q: What?\nA:"
    force_answer(generator.model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                 tokenizer(wanted, add_special_tokens=False)["input_ids"])
    config = GenerationConfig(max_new_tokens=12, extractive=True)
    result = generator.generate(prompt, config, sources=[source])
    assert (result.text, result.finish_reason) == (wanted, "stop")
    assert "".join(generator.stream(prompt, config, sources=[source])) == wanted


def test_a_quote_ends_at_a_line_break_of_its_source_where_the_model_breaks_the_line(generator):
    """A token that starts a new line ends a quote: where the source breaks its line right after the
    answer, the model's newline must not carry the quote on into the next line."""
    tokenizer = generator.tokenizer
    prompt = "Q: What?\nA:"
    source = "Eiffel Tower\nThe tower was finished in 1889."
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    force_answer(generator.model, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                 tokenizer("Eiffel Tower", add_special_tokens=False)["input_ids"] + newline
                 + tokenizer("The tower", add_special_tokens=False)["input_ids"])
    for config in (GenerationConfig(max_new_tokens=12, extractive=True),
                   GenerationConfig(max_new_tokens=12, extractive=True, temperature=1.0, seed=0)):
        result = generator.generate(prompt, config, sources=[source])
        assert (result.text, result.finish_reason) == ("Eiffel Tower", "stop"), config
        assert newline[0] not in result.token_ids
        assert "".join(generator.stream(prompt, config, sources=[source])) == "Eiffel Tower"


def test_a_quote_neither_starts_nor_ends_inside_a_first_word_whose_first_letter_is_multibyte(tiny):
    """In "Élan vital" the letters after the two-byte "É" continue its word: no quote starts at "lan"
    (nor at the bytes before it), and a quote of "É" alone may not end there, however much the model
    wants to end; "Élan" and "vital" are quotes as usual."""
    from sac_rag.extractive import _word_starts

    _, tokenizer = tiny
    source = "Élan vital"
    assert _word_starts(source.encode()) == [0, 6]  # "Élan" and "vital"
    span = _constraint(tokenizer, [source])
    masked, _ = span.mask(torch.zeros(len(tokenizer)))
    allowed = [tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)])
               for i in torch.isfinite(masked).nonzero().flatten().tolist()]
    assert allowed and not [t for t in allowed if t.lstrip().startswith(("l", "la", "lan"))], allowed
    for token in tokenizer("É", add_special_tokens=False)["input_ids"]:  # the quote so far: "É"
        span.mask(torch.zeros(len(tokenizer)))
        span.advance(token)
    assert not span.mask(_prefer(tokenizer, "<eos>"))[1]  # inside "Élan": the answer cannot end
