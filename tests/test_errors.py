"""sac_rag.errors: what a command-line user sees when the input is at fault."""

import pytest

from sac_rag.errors import InvalidInputError, exit_with_message


def test_a_command_exits_with_its_own_status():
    with pytest.raises(SystemExit) as exited:
        exit_with_message(lambda: 3)
    assert exited.value.code == 3


def test_bad_input_exits_with_a_one_line_message_instead_of_a_traceback():
    def main() -> int:
        raise InvalidInputError("predictions.jsonl lacks 10 of the 10 questions; run its eval command first")

    with pytest.raises(SystemExit) as exited:
        exit_with_message(main)
    assert exited.value.code == "error: predictions.jsonl lacks 10 of the 10 questions; run its eval command first"


def test_other_errors_are_not_hidden():
    def main() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        exit_with_message(main)


# -- SAC (sac_rag.pipeline): what a newcomer's wrong call is told, on a tiny random Llama ---------

TEXT = "The quick brown fox jumps over the lazy dog. In 1889 the tower was finished in Paris."


@pytest.fixture
def sac(tiny_sac):
    return tiny_sac


def test_a_batch_with_more_questions_than_context_lists_names_both_counts(sac):
    with pytest.raises(InvalidInputError, match="2 questions and 1 lists of contexts"):
        sac.answer_batch(["Who?", "When?"], [[TEXT]])
    with pytest.raises(InvalidInputError, match="one list of contexts per question"):
        sac.answer_batch(["Who?"], TEXT)


def test_an_empty_batch_answers_nothing(sac):
    assert sac.answer_batch([], []) == []
    assert sac.answer_batch((q for q in []), [], extractive=True) == []


def test_settings_that_are_not_a_generation_config_are_refused_naming_the_fix(sac):
    from sac_rag import SAC

    with pytest.raises(InvalidInputError, match=r"config must be a GenerationConfig.*GenerationConfig\(\*\*config\)"):
        sac.answer("Who?", [TEXT], config={"max_new_tokens": 4})
    with pytest.raises(InvalidInputError, match="config must be a GenerationConfig"):
        sac.stream("Who?", [TEXT], config=4)
    with pytest.raises(InvalidInputError, match="config must be a GenerationConfig"):
        sac.answer_batch(["Who?"], [[TEXT]], config="greedy")
    with pytest.raises(InvalidInputError, match="generation must be a GenerationConfig"):
        SAC(sac.compressor, {"max_new_tokens": 4})


def test_an_empty_context_is_named_by_its_place_and_nothing_is_compressed(sac, monkeypatch):
    monkeypatch.setattr(sac.compressor, "compress_batch", lambda *a, **k: pytest.fail("compressed"))
    with pytest.raises(InvalidInputError, match="context 1 is empty"):
        sac.answer("Who?", [TEXT, ""])
    with pytest.raises(InvalidInputError, match="context 0 is whitespace only"):
        sac.answer("Who?", [" \n"], full_text=True)


def test_an_empty_question_is_refused_before_the_contexts_are_compressed(sac, monkeypatch):
    monkeypatch.setattr(sac.compressor, "compress_batch", lambda *a, **k: pytest.fail("compressed"))
    for question in ("", "  \n"):
        with pytest.raises(InvalidInputError, match="the question is empty"):
            sac.answer(question, [TEXT])
    with pytest.raises(InvalidInputError, match="question 1: the question must be a string"):
        sac.answer_batch(["Who?", None], [[TEXT], [TEXT]])


def test_the_full_text_baseline_refuses_precompressed_contexts_instead_of_reading_their_caches(sac):
    """full_text=True is the comparison run: a cache read as a cache would compare SAC with itself."""
    with pytest.raises(InvalidInputError, match=r"reads the contexts as text.*context 1 is precompressed"):
        sac.answer("Who?", [TEXT, sac.compress(TEXT)], full_text=True)
    assert sac.answer("Who?", [TEXT], full_text=True).cached_tokens == 0


def test_extractive_answers_without_contexts_say_what_to_pass(sac):
    with pytest.raises(InvalidInputError, match="pass at least one context as text, or extractive=False"):
        sac.answer("Who?", [], extractive=True)
    with pytest.raises(InvalidInputError, match="context 0 is precompressed"):
        sac.answer("Who?", sac.compress(TEXT)[0], extractive=True)


def test_a_question_longer_than_the_model_is_refused_as_the_question_not_the_contexts(sac, monkeypatch):
    from sac_rag import PromptTooLongError as TooLong

    monkeypatch.setattr(sac.generator, "max_positions", 64)
    with pytest.raises(TooLong, match=r"the question and the prompt around it take \d+ positions and the model has "
                                      r"64 \(the contexts take 0 more\): shorten the question"):
        sac.answer("Who built the tower? " * 20, [])
    with pytest.raises(TooLong, match=r"the contexts hold \d+ tokens .* \(the question, the prompt around it and the "
                                      r"answer take \d+ more\); compressed .* not make room: retrieve fewer"):
        sac.answer("Who?", [TEXT * 4])
    with pytest.raises(TooLong, match=r"answer take \d+ more\): retrieve fewer"):  # full text: no word on compressing
        sac.answer("Who?", [TEXT * 4], full_text=True)


def test_calls_made_while_a_stream_is_half_read_see_the_model_in_their_own_state(tiny):
    """A stream holding the decoder's adapter state between its pieces made a compress() in between
    encode with the decoder's adapter (other K/V, silently) and the stream read on with the encoder's."""
    import torch

    from sac_rag import SAC, GenerationConfig, SACCompressor, SACConfig

    model, tokenizer = tiny
    compressor = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8,
                                         decoder_lora_rank=4), model=model, tokenizer=tokenizer)
    with torch.no_grad():  # trained-like adapters: encoder, decoder and frozen model all differ
        for name, param in compressor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    sac = SAC(compressor, GenerationConfig(max_new_tokens=8))
    other = "Paris is the capital of France."
    alone_kv, alone_answer = sac.compress(other)[0], sac.answer("What?", [other])
    for full_text in (False, True):
        alone = list(sac.stream("Who?", [TEXT], full_text=full_text))
        assert len(alone) > 1
        stream = sac.stream("Who?", [TEXT], full_text=full_text)
        first = next(stream)
        assert torch.equal(sac.compress(other)[0].keys, alone_kv.keys)
        assert sac.answer("What?", [other]).token_ids == alone_answer.token_ids
        assert [first, *stream] == alone
    closed = sac.stream("Who?", [TEXT])
    next(closed)
    closed.close()  # stops the worker; the model is free again
    assert torch.equal(sac.compress(other)[0].keys, alone_kv.keys)
