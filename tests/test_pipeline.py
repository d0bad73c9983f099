"""SAC (sac_rag.pipeline) on a tiny random Llama: what each entry point accepts and refuses, and
calls made from several threads on one object."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from sac_rag import InvalidInputError

TEXT = "The quick brown fox jumps over the lazy dog. In 1889 the tower was finished in Paris."
OTHER = "Paris is the capital of France. Anchors carry the meaning of a chunk."


@pytest.fixture
def sac(tiny_sac):
    return tiny_sac


@pytest.mark.parametrize("questions, contexts, says", [
    (None, [[TEXT]], "questions must be a list of questions, e.g. .*got a NoneType"),
    (["Who?"], None, "contexts must be one list of contexts per question.*got a NoneType"),
    (["Who?"], 3, "contexts must be one list of contexts per question.*got an int"),
    ({"Who?": TEXT}, [[TEXT]], "questions must be a list of questions.*got a dict"),  # not its keys
    ({"Who?", "When?"}, [[TEXT], [OTHER]], "questions must be .*got a set; a set has no order"),  # pairs: in no order
])
def test_answer_batch_refuses_what_is_no_list_naming_what_to_pass(sac, questions, contexts, says):
    """A wrong input is an InvalidInputError saying what to pass, not a TypeError from list(), nor
    a dict's keys or a set's run-to-run order read as the questions."""
    with pytest.raises(InvalidInputError, match=f"answer_batch's {says}"):
        sac.answer_batch(questions, contexts)


def test_contexts_in_a_set_are_refused_as_their_order_changes_from_run_to_run(sac):
    for call in (sac.answer, sac.stream):
        with pytest.raises(InvalidInputError, match="contexts must be .*got a set; a set has no order"):
            call("Who?", {TEXT, OTHER})
    assert sac.answer("Who?", (c for c in [TEXT, OTHER])).token_ids == sac.answer("Who?", [TEXT, OTHER]).token_ids


def test_answer_batch_names_the_question_whose_contexts_are_wrong_before_compressing(sac, monkeypatch):
    chunks = sac.compress(OTHER)
    monkeypatch.setattr(sac.compressor, "compress_batch", lambda *a, **k: pytest.fail("compressed"))
    with pytest.raises(InvalidInputError, match="question 1: context 0 is empty"):
        sac.answer_batch(["Who?", "When?"], [[TEXT], [""]])
    with pytest.raises(InvalidInputError, match="question 0: contexts must be a list .*got a NoneType"):
        sac.answer_batch(["Who?"], [None])
    with pytest.raises(InvalidInputError, match="question 1: an extractive answer quotes its contexts: pass at"):
        sac.answer_batch(["Who?", "When?"], [[TEXT], []], extractive=True)
    with pytest.raises(InvalidInputError, match=r"question 1: an extractive answer .* context 0 is precompressed"):
        sac.answer_batch(["Who?", "When?"], [[TEXT], [chunks]], extractive=True)


def test_a_precompressed_context_is_named_with_its_article(sac):
    with pytest.raises(InvalidInputError, match=r"context 0 is precompressed \(an AnchorKV\)"):
        sac.answer("Who?", sac.compress(TEXT)[0], full_text=True)


def test_calls_from_several_threads_on_one_sac_answer_as_they_do_one_at_a_time(sac):
    """Compressing (adapter on) and decoding (adapter off) share one model: each call holds its lock,
    so answers, streams, batches and compressions interleaved from threads equal sequential ones."""
    jobs = [("Who?", [TEXT]), ("Where?", [OTHER, TEXT]), ("When?", [TEXT, OTHER])] * 2
    alone = [sac.answer(q, c).text for q, c in jobs]
    keys = sac.compress(TEXT)[0].keys

    def call(i: int):
        question, contexts = jobs[i]
        if i % 3 == 0:
            return "".join(sac.stream(question, contexts))
        if i % 3 == 1:
            return sac.answer_batch([question], [contexts])[0].text
        assert (sac.compress(TEXT)[0].keys == keys).all()
        return sac.answer(question, contexts).text

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(call, range(len(jobs)))) == alone


def test_answer_batch_compresses_each_distinct_context_once_for_all_questions(sac, monkeypatch):
    """A batch's string contexts share one compress_batch call (their chunks share forward passes),
    a text retrieved for several questions is compressed once, and the answers are each question's own."""
    calls = []
    original = sac.compressor.compress_batch
    monkeypatch.setattr(sac.compressor, "compress_batch", lambda texts, **kw: (calls.append(list(texts)),
                                                                               original(texts, **kw))[1])
    questions, contexts = ["Who?", "When?", "Where?"], [[TEXT, OTHER], [OTHER], [TEXT]]
    batch = sac.answer_batch(questions, contexts)
    assert calls == [[TEXT, OTHER]]
    single = [sac.answer(q, c) for q, c in zip(questions, contexts)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in single]
    assert [g.context_tokens for g in batch] == [g.context_tokens for g in single]


def test_answer_batch_works_through_many_questions_a_bounded_batch_at_a_time(sac, monkeypatch):
    """Memory stays bounded however many questions are asked: at most ``batch_size`` are
    compressed and decoded together, and each keeps its own answer, in order."""
    sizes = []
    original = sac.generator.generate_batch
    monkeypatch.setattr(sac.generator, "generate_batch", lambda prompts, *a: (sizes.append(len(prompts)),
                                                                                original(prompts, *a))[1])
    questions = ["Who?", "When?", "Where?", "What?", "Why?"]
    contexts = [[TEXT], [], [OTHER], [TEXT, OTHER], []]  # with and without contexts: two decodings
    answers = sac.answer_batch(questions, [list(c) for c in contexts], batch_size=2)
    assert max(sizes) <= 2 and sum(sizes) == len(questions)
    single = [sac.answer(q, c) for q, c in zip(questions, contexts)]
    assert [g.token_ids for g in answers] == [g.token_ids for g in single]
    assert [g.context_tokens for g in answers] == [g.context_tokens for g in single]
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(InvalidInputError, match="batch_size must be a whole number of questions"):
            sac.answer_batch(questions, contexts, batch_size=bad)


def test_a_question_of_a_batch_too_long_for_the_model_is_named_before_anything_is_compressed(sac, monkeypatch):
    from sac_rag import PromptTooLongError

    monkeypatch.setattr(sac.generator, "max_positions", 64)
    monkeypatch.setattr(sac.compressor, "compress_batch", lambda *a, **kw: pytest.fail("compressed"))
    with pytest.raises(PromptTooLongError, match="question 1: the contexts hold"):
        sac.answer_batch(["Who?", "When?"], [[TEXT], [TEXT * 8]])


def test_calls_without_a_config_decode_as_the_compressor_recommends_and_a_choice_of_the_callers_wins(tiny, monkeypatch):
    from sac_rag import SAC, GenerationConfig, Generator, SACCompressor, SACConfig

    model, tokenizer = tiny
    compressor = SACCompressor(SACConfig(base_model="tiny", ratio=3, chunk_len=32, lora_rank=4, lora_alpha=8),
                               model=model, tokenizer=tokenizer)
    compressor.recommended_decoding = {"num_beams": 3, "mbr": True}
    used = []
    decode = Generator.generate_batch
    monkeypatch.setattr(Generator, "generate_batch", lambda self, prompts, config=None, *rest: (
        used.append(config), decode(self, prompts, config, *rest))[1])
    sac = SAC(compressor)
    recommended = sac.answer("Who?", [TEXT])
    assert (used[-1].num_beams, used[-1].mbr, used[-1].stop) == (3, True, ("\n###",))
    assert recommended.token_ids == sac.answer("Who?", [TEXT], config=GenerationConfig(
        num_beams=3, mbr=True, stop=("\n###",))).token_ids  # the same answer as asking for it
    sac.answer("Who?", [TEXT], config=GenerationConfig(max_new_tokens=5))
    assert (used[-1].num_beams, used[-1].mbr) == (1, False)  # the call's config, whole
    sac.answer("Who?", [TEXT], extractive=True)  # quotes do not combine with beams: greedy quotes
    assert (used[-1].num_beams, used[-1].extractive, used[-1].stop) == (1, True, ("\n###",))
    sac.answer("Who?", [TEXT], full_text=True)  # read as text, and
    sac.answer("Who?")  # no context: greedy (the recommendation was measured answering from caches)
    assert [(c.num_beams, c.mbr, c.stop) for c in used[-2:]] == [(1, False, ("\n###",))] * 2
    mixed = sac.answer_batch(["Who?", "When?", "Why?"], [[TEXT], [], [OTHER]])  # each question decodes its own way:
    assert [(c.num_beams, c.mbr) for c in used[-2:]] == [(3, True), (1, False)]  # from caches as recommended, and
    assert [g.token_ids for g in mixed] == [sac.answer(q, c).token_ids  # without, greedily; answers in order
                                            for q, c in [("Who?", [TEXT]), ("When?", []), ("Why?", [OTHER])]]
    sac.answer_batch(["Who?", "When?"], [[TEXT], [OTHER]])
    assert used[-1].num_beams == 3
    sac.answer("Who?", [TEXT], extractive=True)
    assert (used[-1].num_beams, used[-1].extractive, used[-1].stop) == (1, True, ("\n###",))
    chosen = SAC(compressor, GenerationConfig(max_new_tokens=4))
    chosen.answer_batch(["Who?"], [[TEXT]])
    assert (used[-1].num_beams, used[-1].max_new_tokens) == (1, 4)  # the SAC's own generation, whole
    with pytest.raises(InvalidInputError, match="beam search"):  # chosen beams and asked-for quotes: refused
        SAC(compressor, GenerationConfig(num_beams=2)).answer("Who?", [TEXT], extractive=True)
    # a decoding assigned to the SAC later is chosen as one passed to it is: every call without a config
    # decodes with it, also those without caches; assigning None goes back to the recommendation
    sac.generation = replace(sac.generation, max_new_tokens=2)
    for call in ({"contexts": [TEXT]}, {"contexts": [TEXT], "full_text": True}, {}):
        sac.answer("Who?", **call)
        assert (used[-1].num_beams, used[-1].max_new_tokens) == (3, 2), call
    sac.generation = None
    sac.answer("Who?")
    assert (used[-1].num_beams, used[-1].max_new_tokens) == (1, 64)
    with pytest.raises(InvalidInputError, match="generation must be a GenerationConfig"):
        sac.generation = {"max_new_tokens": 2}
    for flags in ({"extractive": "no"}, {"full_text": "false"}):  # a string would read as true
        with pytest.raises(InvalidInputError, match=f"{next(iter(flags))} must be True or False"):
            sac.answer("Who?", [TEXT], **flags)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_stream_is_decoded_in_the_callers_thread_and_leaves_the_model_free_between_pieces(sac, num_beams):
    import threading

    from sac_rag import GenerationConfig

    config = GenerationConfig(max_new_tokens=4, num_beams=num_beams)
    sac.generator.eos_token_ids = set()  # the answer runs to max_new_tokens
    threads = []
    start = sac.generator._start
    sac.generator._start = lambda *a: (threads.append(threading.current_thread()), start(*a))[1]
    expected = sac.answer("Who?", [TEXT], config=config).text
    other = sac.answer("When?", [OTHER], config=config).text
    stream = sac.stream("Who?", [TEXT], config=config)
    first = next(stream)
    assert not sac._lock.locked()  # the same thread may use the model between pieces
    assert sac.answer("When?", [OTHER], config=config).text == other
    rest = list(stream)
    assert first + "".join(rest) == expected
    assert rest == [] if num_beams > 1 else len(rest) > 0  # beams: the whole answer at once; greedy: token by token
    assert set(threads) == {threading.current_thread()}
