"""How training examples are built (questions per paragraph, distractor passages, span questions)
and what the objective distils."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from sac_rag.config import PromptTemplate
from sac_rag.data import Paragraph, QAItem
from sac_rag.objectives import SPAN_QUESTION, ExampleBuilder, span_questions_about


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_llama()[1]


def _paragraph(title: str, i: int) -> Paragraph:
    questions = [QAItem(f"Question {j}?", ["yes"], f"{title}-{i}-{j}") for j in range(5)]
    return Paragraph(f"{title} paragraph {i} says something.", questions, title)


POOL = [_paragraph(title, i) for title in ("Alps", "Nile", "Mars") for i in range(4)]


def _texts(tokenizer, example) -> list[str]:
    return [tokenizer.decode(p) for p in example.passages]


def test_the_gold_passage_is_shuffled_among_k_distinct_distractors(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), questions_per_context=3, distractors=2)
    gold = POOL[0]
    positions = set()
    for index in range(20):
        texts = _texts(tokenizer, builder.qa(gold, index, POOL))
        assert len(set(texts)) == 3 and texts.count(gold.context) == 1
        positions.add(texts.index(gold.context))
    assert positions == {0, 1, 2}  # the gold passage is not always first
    assert len(builder.qa(gold, 0, POOL).rows) == 3


def test_same_article_distractors_come_from_the_gold_paragraphs_article(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), distractors=3, distractor_source="same_article")
    for index in range(10):
        texts = _texts(tokenizer, builder.qa(POOL[5], index, POOL))
        assert sorted(texts) == sorted(p.context for p in POOL if p.title == "Nile")


def test_same_article_falls_back_to_the_whole_pool_for_short_articles(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), distractors=4, distractor_source="same_article")
    texts = _texts(tokenizer, builder.qa(POOL[0], 0, POOL))
    assert len(texts) == 5 and texts.count(POOL[0].context) == 1


def test_examples_are_deterministic_per_index_and_seed(tokenizer):
    first = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2, seed=3)
    again = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2, seed=3)
    assert first.qa(POOL[1], 7, POOL) == again.qa(POOL[1], 7, POOL)


def test_a_distractor_share_mixes_single_passage_and_distractor_examples_in_one_run(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2, distractor_share=0.25, seed=1)
    counts = [len(builder.qa(POOL[0], index, POOL).passages) for index in range(200)]
    assert set(counts) == {1, 3}  # the gold passage alone, or beside both distractors
    assert 30 <= counts.count(3) <= 70  # about a quarter of 200, seeded per example
    assert counts == [len(builder.qa(POOL[0], index, POOL).passages) for index in range(200)]
    alone = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2, distractor_share=0.0)
    assert all(len(alone.qa(POOL[0], index, POOL).passages) == 1 for index in range(20))


def test_a_pool_without_other_passages_gives_the_gold_passage_alone(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2)
    assert _texts(tokenizer, builder.qa(POOL[0], 0, [POOL[0], POOL[0]])) == [POOL[0].context]


# -- span questions: "which words follow <cue>?" -----------------------------------------------

LONG = Paragraph(
    "The river rises in the southern highlands, and it flows north for six thousand kilometres. "
    "Its delta, once a marsh, now feeds forty million people; the dam upstream was finished in 1970. "
    "Boats still carry grain, cotton and stone between the old market towns every summer.",
    [QAItem(f"Question {j}?", ["yes"], f"long-{j}") for j in range(3)], "River")


def _cue_and_span(question: str, answer: str) -> tuple[str, str]:
    head, tail = SPAN_QUESTION.split("{cue}")
    assert question.startswith(head) and question.endswith(tail)
    return question[len(head) : -len(tail)], answer


def test_a_span_question_quotes_a_unique_cue_and_asks_for_the_words_right_after_it():
    import random

    questions = span_questions_about(LONG.context, 40, random.Random(0))
    assert len(questions) > 20
    for question, answer in questions:
        cue, span = _cue_and_span(question, answer)
        assert len(cue.split()) == 4 and LONG.context.count(cue) == 1
        assert LONG.context.startswith(span, LONG.context.index(cue) + len(cue) + 1)
        assert 1 <= len(span.split()) <= 5
        assert not any(mark in span for mark in ".,;")  # a span stops at the end of its clause
    assert questions == span_questions_about(LONG.context, 40, random.Random(0))


def test_a_passage_too_short_for_a_cue_gives_no_span_questions():
    import random

    assert span_questions_about("Only four words here.", 3, random.Random(0)) == []


def test_span_questions_follow_the_real_questions_and_are_counted(tokenizer):
    plain = ExampleBuilder(tokenizer, PromptTemplate(), questions_per_context=2, distractors=1, seed=4)
    spans = ExampleBuilder(tokenizer, PromptTemplate(), questions_per_context=2, distractors=1, seed=4,
                           span_questions=3)
    with_spans, without = spans.qa(LONG, 9, POOL), plain.qa(LONG, 9, POOL)
    assert with_spans.span_rows == 3 and without.span_rows == 0
    assert with_spans.rows[:2] == without.rows and with_spans.passages == without.passages
    for prompt, _ in with_spans.rows[2:]:
        assert 'Which words follow "' in tokenizer.decode(prompt)


def test_a_negative_number_of_span_questions_is_refused(tokenizer):
    with pytest.raises(ValueError, match="span_questions"):
        ExampleBuilder(tokenizer, PromptTemplate(), span_questions=-1)


# -- distillation from a teacher reading the full text ------------------------------------------


def _kv_dropping(ratio: int, seed: int = 0):
    """An untrained causal compressor without anchor embedding: at ratio 1 its caches are exactly
    the full text's K/V, so the decoder reading them is the frozen model reading the text."""
    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = make_tiny_llama(seed)
    config = SACConfig(base_model="tiny", ratio=ratio, chunk_len=64, lora_rank=4, lora_alpha=8,
                       bidirectional=False, anchor_embedding="none")
    return SACCompressor(config, model=model, tokenizer=tokenizer)


def _objective(comp, teacher=None, distill_tokens="all", hidden_weight=0.0, divergence="forward", on_policy_tokens=0):
    from sac_rag.objectives import SACObjective

    builder = ExampleBuilder(comp.tokenizer, PromptTemplate(), questions_per_context=2)
    examples = [builder.qa(POOL[i], i, POOL) for i in (0, 5)]
    # No prefix text: chunks are encoded on their own, so only then is ratio 1 the full text's K/V.
    objective = SACObjective(comp, distill_weight=1.0, teacher=teacher, distill_tokens=distill_tokens,
                             hidden_weight=hidden_weight, divergence=divergence, on_policy_tokens=on_policy_tokens)
    return objective, examples


def _loss_stats(comp, teacher=None, distill_tokens="all", hidden_weight=0.0, divergence="forward",
                on_policy_tokens=0):
    objective, examples = _objective(comp, teacher, distill_tokens, hidden_weight, divergence, on_policy_tokens)
    with torch.no_grad():
        return objective.loss(examples)[1], examples


def test_distillation_is_zero_when_the_caches_hold_the_full_text():
    stats, _ = _loss_stats(_kv_dropping(ratio=1))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)


def test_distillation_measures_what_compression_lost():
    assert _loss_stats(_kv_dropping(ratio=3))[0]["kl"] > 1e-3


def test_distilling_every_token_covers_each_question_and_answer_token_but_trains_ce_on_answers_only():
    comp = _kv_dropping(ratio=3)
    every, examples = _loss_stats(comp, distill_tokens="all")
    answers_only, _ = _loss_stats(comp, distill_tokens="answer")
    rows = [row for ex in examples for row in ex.rows]
    assert every["distilled_tokens"] == sum(len(prompt) + len(target) - 1 for prompt, target in rows)
    assert answers_only["distilled_tokens"] == every["target_tokens"] == sum(len(target) for _, target in rows)
    assert every["ce"] == pytest.approx(answers_only["ce"], rel=1e-5)


def test_a_given_teacher_replaces_the_frozen_base_model():
    other, _ = make_tiny_llama(seed=7)
    assert _loss_stats(_kv_dropping(ratio=1), teacher=other)[0]["kl"] > 1e-3


def test_the_reverse_divergence_is_kl_of_the_student_from_the_teacher_with_its_gradient():
    from sac_rag.objectives import _kl

    teacher = torch.randn(6, 11)
    t = teacher.log_softmax(-1)
    for divergence, by_hand in [("forward", lambda s: (t.exp() * (t - s)).sum(-1)),
                                ("reverse", lambda s: (s.exp() * (s - t)).sum(-1))]:
        student = torch.randn(6, 11, requires_grad=True)
        value = _kl(student, teacher, divergence)  # one per token
        (grad,) = torch.autograd.grad(value.sum(), student)
        expected = by_hand(student.log_softmax(-1))
        (expected_grad,) = torch.autograd.grad(expected.sum(), student)
        assert value.shape == (6,) and torch.allclose(value, expected, rtol=1e-5)
        assert torch.allclose(grad, expected_grad, atol=1e-6) and grad.abs().sum() > 0


def test_a_distillation_temperature_softens_both_distributions_and_scales_the_kl_by_its_square():
    from sac_rag.objectives import SACObjective, _kl

    teacher, student = torch.randn(6, 11) * 4, torch.randn(6, 11) * 4
    for temperature in (1.0, 2.0, 0.5):
        t, s = (teacher / temperature).log_softmax(-1), (student / temperature).log_softmax(-1)
        by_hand = temperature ** 2 * (t.exp() * (t - s)).sum(-1)
        assert torch.allclose(_kl(student, teacher, "forward", temperature), by_hand, rtol=1e-5)
    assert torch.equal(_kl(student, teacher, "forward", 1.0), _kl(student, teacher, "forward"))
    assert not torch.allclose(_kl(student, teacher, "forward", 2.0), _kl(student, teacher, "forward"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SACObjective(_kv_dropping(ratio=3), distill_weight=1.0, temperature=0.0)


def test_the_reverse_divergence_is_zero_on_the_full_text_and_differs_from_the_forward_one_after_compression():
    assert _loss_stats(_kv_dropping(ratio=1), divergence="reverse")[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    comp = _kv_dropping(ratio=3)
    forward, reverse = _loss_stats(comp)[0]["kl"], _loss_stats(comp, divergence="reverse")[0]["kl"]
    assert reverse > 1e-3 and reverse != pytest.approx(forward, rel=1e-3)


def test_an_unknown_divergence_is_refused():
    with pytest.raises(ValueError, match="divergence must be one of"):
        _objective(_kv_dropping(ratio=3), divergence="jensen")


def test_hidden_state_matching_is_zero_on_the_full_text_and_positive_after_compression():
    assert _loss_stats(_kv_dropping(ratio=1), hidden_weight=1.0)[0]["hidden"] == pytest.approx(0.0, abs=1e-5)
    compressed, _ = _loss_stats(_kv_dropping(ratio=3), hidden_weight=1.0)
    assert compressed["hidden"] > 1e-3
    assert compressed["loss"] == pytest.approx(compressed["ce"] + compressed["kl"] + compressed["hidden"], rel=1e-5)


def test_hidden_state_matching_trains_the_encoder():
    comp = _kv_dropping(ratio=3)
    objective, examples = _objective(comp, hidden_weight=1.0)
    objective.distill_weight = 0.0  # the hidden-state term alone
    loss, stats = objective.loss(examples)
    assert "kl" not in stats and stats["loss"] == pytest.approx(stats["ce"] + stats["hidden"], rel=1e-5)
    loss.backward()
    lora = [p for name, p in comp.named_parameters() if "lora" in name and p.requires_grad]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_span_questions_are_trained_by_cross_entropy_but_never_distilled():
    from sac_rag.objectives import SACObjective

    comp = _kv_dropping(ratio=3)
    plain = ExampleBuilder(comp.tokenizer, PromptTemplate(), questions_per_context=2)
    spans = ExampleBuilder(comp.tokenizer, PromptTemplate(), questions_per_context=2, span_questions=2)
    objective = SACObjective(comp, distill_weight=1.0, distill_tokens="all")
    with torch.no_grad():
        _, without = objective.loss([plain.qa(LONG, 0, POOL)])
        _, with_spans = objective.loss([spans.qa(LONG, 0, POOL)])
        _, spans_only = objective.loss([ExampleBuilder(comp.tokenizer, PromptTemplate(), questions_per_context=0,
                                                       span_questions=2).qa(LONG, 0, POOL)])
    assert with_spans["target_tokens"] > without["target_tokens"]
    assert with_spans["ce"] != pytest.approx(without["ce"], rel=1e-3)
    assert with_spans["distilled_tokens"] == without["distilled_tokens"]
    assert with_spans["kl"] == pytest.approx(without["kl"], rel=1e-4)  # wider padding: float noise only
    assert "kl" not in spans_only and spans_only["loss"] == spans_only["ce"]  # nothing left to distil


# -- on-policy distillation: the student's own greedy answers --------------------------------------


def test_greedy_answers_decoded_from_a_cache_are_what_transformers_generates_after_the_same_text():
    from sac_rag.objectives import _context_kv, decode_answers

    model, tokenizer = make_tiny_llama(seed=3)
    contexts = [tokenizer("The bridge over the river was built in 1903.")["input_ids"],
                tokenizer("Mars is red.")["input_ids"]]  # different lengths: the shorter cache is padded
    prompts = [tokenizer(" When was it built?")["input_ids"], tokenizer(" What colour?")["input_ids"]]
    with torch.no_grad():
        caches = [_context_kv(model, ids, "cpu") for ids in contexts]
        # Each prompt reads its own cache; the second prompt is also asked about the first context.
        answers = decode_answers(model, caches, [len(c) for c in contexts], prompts + prompts[1:], [0, 1, 0],
                                 eos=tokenizer.eos_token_id, max_tokens=6)
        assert answers[1] != answers[2]  # the answer depends on which cache is read
        for (context, prompt), answer in zip([(0, 0), (1, 1), (0, 1)], answers):
            ids = torch.tensor([contexts[context] + prompts[prompt]])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            assert answer == generated[0, ids.shape[1]:].tolist()[: len(answer)]
            assert len(answer) == 6 or answer[-1] == tokenizer.eos_token_id


def test_on_policy_rows_are_the_students_own_answers_distilled_but_never_trained_by_cross_entropy():
    comp = _kv_dropping(ratio=3)
    gold, _ = _loss_stats(comp)
    on_policy, _ = _loss_stats(comp, on_policy_tokens=5)
    assert on_policy["on_policy_tokens"] > 0  # an untrained model does not answer with the gold tokens
    assert on_policy["distilled_tokens"] == gold["distilled_tokens"] + on_policy["on_policy_tokens"]
    assert on_policy["target_tokens"] == gold["target_tokens"]
    assert on_policy["ce"] == pytest.approx(gold["ce"], rel=1e-4)
    assert on_policy["kl"] != pytest.approx(gold["kl"], rel=1e-3)
    # With the full text in the caches, the student is the teacher on its own answers too.
    assert _loss_stats(_kv_dropping(ratio=1), on_policy_tokens=5)[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_on_policy_distillation_trains_the_encoder_and_a_negative_budget_is_refused():
    comp = _kv_dropping(ratio=3)
    objective, examples = _objective(comp, on_policy_tokens=5)
    loss, _ = objective.loss(examples)
    loss.backward()
    lora = [p for name, p in comp.named_parameters() if "lora" in name and p.requires_grad]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    with pytest.raises(ValueError, match="on_policy_tokens must be >= 0"):
        _objective(comp, on_policy_tokens=-1)


def test_sampled_answers_follow_the_same_distribution_as_greedy_ones_and_replay_with_the_same_seed():
    from sac_rag.objectives import _context_kv, decode_answers

    model, tokenizer = make_tiny_llama(seed=3)
    context = tokenizer("The bridge over the river was built in 1903.")["input_ids"]
    prompts = [tokenizer(" When was it built?")["input_ids"], tokenizer(" What?")["input_ids"]] * 4
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        caches = [_context_kv(model, context, "cpu")]

        def answers(sample, seed=0):
            return decode_answers(model, caches, [len(context)], prompts, [0] * len(prompts), eos, 6, sample=sample,
                                  generator=torch.Generator().manual_seed(seed))

        drawn = answers(sample=True)
        assert drawn == answers(sample=True) and drawn != answers(sample=True, seed=1)
        assert len(set(map(tuple, drawn))) > 2  # an untrained model's answers vary from draw to draw
        head = model.get_output_embeddings()
        head.weight.mul_(1000.0)  # a one-hot next-token distribution: every draw is the likeliest token
        caches = [_context_kv(model, context, "cpu")]
        assert answers(sample=True) == answers(sample=False)


# -- minimum risk training: the compressor's own sampled answers, scored by F1 ----------------------------


def test_expected_risk_weights_each_answers_cost_by_its_probability_among_its_questions_candidates():
    from sac_rag.objectives import expected_risk

    log_probs = torch.log(torch.tensor([0.2, 0.6, 0.5, 0.5]))  # question 0: 3 candidates (1/4, 3/4 after
    costs = torch.tensor([0.0, 1.0, 0.4, 0.0])                  # renormalising 0.2 and 0.6); question 1: two
    risk = expected_risk(log_probs, costs, [0, 0, 1, 1])
    assert risk.tolist() == pytest.approx([0.25 * 0.0 + 0.75 * 1.0, 0.5 * 0.4 + 0.5 * 0.0])
    log_probs.requires_grad_(True)
    expected_risk(log_probs, costs, [0, 0, 1, 1]).sum().backward()
    assert log_probs.grad[0] < 0 < log_probs.grad[1]  # the right answer is raised, the wrong one lowered


def _risk_objective(comp, risk_weight, risk_samples=3):
    from sac_rag.objectives import SACObjective

    builder = ExampleBuilder(comp.tokenizer, PromptTemplate(), questions_per_context=2, span_questions=1)
    examples = [builder.qa(POOL[i], i, POOL) for i in (0, 5)]
    return SACObjective(comp, risk_weight=risk_weight, risk_samples=risk_samples, risk_max_tokens=4), examples


def test_minimum_risk_training_scores_the_real_questions_candidates_and_trains_the_encoder():
    comp = _kv_dropping(ratio=3)
    plain, examples = _risk_objective(comp, risk_weight=0.0)
    with torch.no_grad():
        base = plain.loss(examples)[1]
    objective, _ = _risk_objective(comp, risk_weight=0.5)
    torch.manual_seed(0)
    loss, stats = objective.loss(examples)
    real_questions = 4  # 2 examples x 2 questions; the span questions are not scored
    assert real_questions < stats["risk_candidates"] <= real_questions * (1 + 3)  # the gold one + distinct samples
    assert 0.0 < stats["risk"] < 1.0 and 0.0 <= stats["sample_f1"] <= 1.0
    assert stats["ce"] == pytest.approx(base["ce"], rel=1e-5)
    assert loss.item() == pytest.approx(stats["ce"] + 0.5 * stats["risk"], rel=1e-5)
    loss.backward()
    lora = [p for name, p in comp.named_parameters() if "lora" in name and p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    with pytest.raises(ValueError, match="risk_samples"):
        _risk_objective(comp, risk_weight=1.0, risk_samples=0)


def test_recomputing_the_risk_candidates_in_the_backward_pass_gives_the_gradients_of_keeping_them(monkeypatch):
    comp = _kv_dropping(ratio=3)
    objective, examples = _risk_objective(comp, risk_weight=1.0)
    lora = [p for name, p in comp.named_parameters() if "lora" in name and p.requires_grad]

    def gradients():
        for p in lora:
            p.grad = None
        torch.manual_seed(0)  # the same sampled answers in both passes
        objective.loss(examples)[0].backward()
        return [p.grad.clone() for p in lora if p.grad is not None]

    recomputed = gradients()
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda function, use_reentrant: function())
    kept = gradients()
    assert len(recomputed) == len(kept) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(recomputed, kept))


# -- the objective against a computation by hand --------------------------------------------------------
#
# The reference reads each row as the generator answers: the prompt head as text at positions 0.., then each
# passage's chunks, compressed at offset 0 within their passage (as ``compress`` does) and moved to the running
# position by rotating their keys, then the question and answer as text. The frozen decoder is a fresh copy of
# the tiny model (no peft layers at all), so an adapter left on while decoding would show.

TEMPLATE = PromptTemplate(prefix="Read.\n")
FACTS = [
    Paragraph("Paris is the capital of France. The tower was finished in 1889 by Gustave Eiffel.",
              [QAItem("What is the capital?", ["Paris"]), QAItem("When was the tower finished?", ["1889"]),
               QAItem("Who finished it?", ["Gustave Eiffel"])], "A"),
    Paragraph("The quick brown fox jumps over the lazy dog.",
              [QAItem("Who jumps?", ["The quick brown fox"]), QAItem("Over what?", ["the lazy dog"])], "B"),
    Paragraph("Anchors carry the meaning of a chunk; the decoder reads their keys and values.",
              [QAItem("What carries meaning?", ["Anchors"])], "C"),
]


def _sharp_tiny_llama(bos: bool = False):
    """The tiny Llama with sharper attention and next-token distributions than its random initialisation
    gives, so that a token read at a wrong position or from a wrong cache changes the losses clearly."""
    model, tokenizer = make_tiny_llama(bos=bos)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(4.0)
    return model, tokenizer


def _trained_sac(decoder_lora: bool = False, chunk_len: int = 8):
    """A bidirectional ratio-3 compressor with chunks short enough that every passage has several, whose
    adapters and anchor embedding hold random weights (so its encoder is not its decoder), trainable as
    train.py makes them."""
    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = _sharp_tiny_llama()
    config = SACConfig(base_model="tiny", ratio=3, chunk_len=chunk_len, lora_rank=4, lora_alpha=8, prompt=TEMPLATE,
                       decoder_lora_rank=4 if decoder_lora else 0)
    return _random_adapters(SACCompressor(config, model=model, tokenizer=tokenizer))


def _random_adapters(comp):
    """``comp`` with random adapters and anchor embedding (so its encoder is not its decoder), trainable
    as train.py makes them."""
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in comp.named_parameters():
            trained = "lora_" in name or name == "anchor_embedding"
            if trained:
                param.copy_(torch.randn(param.shape, generator=draw) * 0.3)
            param.requires_grad_(trained)
    return comp


def _head(comp) -> list[int]:
    from sac_rag.generation import bos_ids

    prompt = comp.config.prompt
    return bos_ids(comp.tokenizer) + comp.tokenizer(prompt.prefix + prompt.context_prefix,
                                                     add_special_tokens=False)["input_ids"]


def _by_hand(model, head: list[int], kvs: list, text: list[int], hidden: bool = False):
    """Logits ``[len(text), vocab]`` (and, with ``hidden``, every layer's output ``[layers, len(text), dim]``) of
    ``model`` reading ``head`` at positions 0.., then ``kvs`` (``AnchorKV``s, each moved to the running position),
    then ``text``."""
    from transformers import DynamicCache

    from sac_rag.rope import KeyRotator

    rotator, cache, position = KeyRotator.from_model(model), DynamicCache(config=model.config), 0

    def read(ids):
        return model(input_ids=torch.tensor([ids]), position_ids=torch.arange(position, position + len(ids))[None],
                     attention_mask=torch.ones(1, cache.get_seq_length() + len(ids), dtype=torch.long),
                     cache=cache, use_cache=True, output_hidden_states=hidden)

    if head:
        read(head)
        position += len(head)
    for kv in kvs:
        placed = kv.at_offset(position, rotator)
        for layer, (k, v) in enumerate(zip(placed.keys, placed.values)):
            cache.layers[layer].update(k[None], v[None])
        position += kv.n_tokens
    out = read(text)
    if hidden:
        return out.logits[0], torch.stack([h[0] for h in out.hidden_states[1:]])
    return out.logits[0]


def _compressed(comp, passage: list[int], grad: bool = False) -> list:
    """A passage's chunks as ``compress`` makes them: split every ``chunk_len`` tokens, at offsets within it."""
    step = comp.config.chunk_len
    chunks = [passage[i : i + step] for i in range(0, len(passage), step)]
    offsets = [i for i in range(0, len(passage), step)]
    return comp.encode(chunks, offsets) if grad else comp.compress_chunks(chunks, offsets)


def _qa_examples(comp, distractors: int = 1):
    builder = ExampleBuilder(comp.tokenizer, comp.config.prompt, questions_per_context=2, distractors=distractors)
    return [builder.qa(paragraph, i, FACTS) for i, paragraph in enumerate(FACTS)]


def _nll_by_hand(comp, examples, decoder=None, grad: bool = False) -> tuple[torch.Tensor, int]:
    """The mean over examples of each one's mean negative log-likelihood of its rows' target tokens, each
    row read alone by ``decoder`` (by default the compressor's model in its decoder mode), and the number
    of target tokens."""
    per_example, count = [], 0
    for ex in examples:
        kvs = [kv for passage in ex.passages for kv in _compressed(comp, passage, grad)]
        total, tokens = torch.zeros(()), 0
        for prompt, target in ex.rows:
            with contextlib.nullcontext() if decoder else comp.decoder_mode():
                logits = _by_hand(decoder or comp.base_model, _head(comp), kvs, prompt + target[:-1])
            logits = logits[len(prompt) - 1 :]
            total = total + F.cross_entropy(logits.float(), torch.tensor(target), reduction="sum")
            tokens += len(target)
        per_example.append(total / tokens)
        count += tokens
    return torch.stack(per_example).mean(), count


@pytest.mark.parametrize("decoder_lora", [False, True])
def test_the_answer_cross_entropy_is_the_mean_nll_of_the_answer_and_end_tokens_as_the_generator_reads_them(
        decoder_lora):
    from sac_rag.generation import Generator
    from sac_rag.objectives import SACObjective

    comp = _trained_sac(decoder_lora)
    tokenizer, template = comp.tokenizer, comp.config.prompt
    examples = _qa_examples(comp)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    asked = {tuple(ids(template.question.format(question=qa.question))): qa for p in FACTS for qa in p.questions}
    generator = Generator.from_compressor(comp)
    for ex in examples:
        assert len(ex.passages) == 2 and any(len(p) > comp.config.chunk_len for p in ex.passages)
        kvs = [_compressed(comp, passage) for passage in ex.passages]
        for prompt, target in ex.rows:  # the question as the generator's template writes it, then answer + end
            qa = asked[tuple(prompt)]
            assert target == ids(qa.answers[0]) + [tokenizer.eos_token_id]
            # the layout by hand is the generator's: the same logits over the question
            by_generator = generator.prompt_logits(template.build(kvs, qa.question))
            with comp.decoder_mode():
                by_hand = _by_hand(comp.base_model, _head(comp), [kv for kv in sum(kvs, [])], prompt)
            assert torch.allclose(by_generator, by_hand, atol=1e-4)
    objective = SACObjective(comp, prefix_text=template.prefix + template.context_prefix)
    with torch.no_grad():
        loss, stats = objective.loss(examples)
        if decoder_lora:
            nll, count = _nll_by_hand(comp, examples)
        else:  # the frozen decoder is the base model itself, no adapter of the compressor on
            nll, count = _nll_by_hand(comp, examples, _sharp_tiny_llama()[0])
    assert stats["target_tokens"] == count == sum(len(target) for ex in examples for _, target in ex.rows)
    assert loss.item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("weighting", ["example", "micro_batch_tokens"])
def test_each_example_and_question_loss_is_its_own_whatever_it_is_batched_with(weighting):
    """By default the micro-batch's loss is the mean over its examples of each example's mean over its own
    answer tokens; with "micro_batch_tokens" (the shipped stages' weighting), the mean over all its tokens."""
    from sac_rag.objectives import Example, SACObjective

    comp = _trained_sac()
    objective = SACObjective(comp, prefix_text=TEMPLATE.prefix + TEMPLATE.context_prefix, weighting=weighting)
    examples = _qa_examples(comp)
    assert len({sum(map(len, ex.passages)) for ex in examples}) == 3  # padded to each other's lengths
    with torch.no_grad():
        together = objective.loss(examples)[1]
        alone = [objective.loss([ex])[1] for ex in examples]
        # one question at a time, each with its own encoder pass
        questions = [[objective.loss([Example(ex.passages, [row])])[1] for row in ex.rows] for ex in examples]
    token_mean = lambda parts: sum(s["ce"] * s["target_tokens"] for s in parts) / sum(s["target_tokens"] for s in parts)  # noqa: E731
    for example, its_questions in zip(alone, questions):
        assert example["target_tokens"] == sum(s["target_tokens"] for s in its_questions)
        assert example["ce"] == pytest.approx(token_mean(its_questions), rel=1e-5)
    assert together["target_tokens"] == sum(s["target_tokens"] for s in alone)
    if weighting == "example":
        assert together["ce"] == pytest.approx(sum(s["ce"] for s in alone) / len(alone), rel=1e-5)
    else:
        assert together["ce"] == pytest.approx(token_mean(alone), rel=1e-5)
    assert token_mean(alone) != pytest.approx(sum(s["ce"] for s in alone) / len(alone), rel=1e-3)  # they differ here
    flat = [s for its_questions in questions for s in its_questions]
    assert len({round(s["ce"], 4) for s in flat}) == len(flat)  # the questions' losses differ


@pytest.mark.parametrize("decoder_lora", [False, True])
def test_the_gradients_are_those_of_the_nll_by_hand_and_reach_only_the_adapters_and_anchor_embedding(decoder_lora):
    from sac_rag.objectives import SACObjective

    comp = _trained_sac(decoder_lora)
    trained = {name: p for name, p in comp.named_parameters() if p.requires_grad}
    assert "anchor_embedding" in trained and any(".decoder." in name for name in trained) == decoder_lora
    objective = SACObjective(comp, prefix_text=TEMPLATE.prefix + TEMPLATE.context_prefix)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in trained.values()}
    examples = _qa_examples(comp)
    objective.loss(examples)[0].backward()
    grads = {name: p.grad for name, p in trained.items()}
    assert all(p.grad is None for name, p in comp.named_parameters() if name not in trained)
    for p in trained.values():
        p.grad = None
    nll, count = _nll_by_hand(comp, examples, grad=True)
    nll.backward()
    last = comp.base_model.config.num_hidden_layers - 1
    for name, p in trained.items():
        # the encoder's queries in the last layer shape no kept K/V: the only weights without a gradient
        unused = f"layers.{last}.self_attn.q_proj.lora_" in name and ".default." in name
        assert (grads[name] is None) == (p.grad is None) == unused, name
        if not unused:
            assert grads[name].abs().sum() > 0, name  # encoder adapter, anchor embedding, decoder adapter
            assert torch.allclose(grads[name], p.grad, rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("divergence, temperature, tokens", [("forward", 1.0, "answer"), ("reverse", 2.0, "all"),
                                                             ("forward", 0.5, "all")])
def test_distillation_compares_student_and_teacher_at_the_same_tokens(divergence, temperature, tokens):
    """The teacher reads the passages as text, so the row's tokens sit at the same positions in both; the KL
    covers the answer tokens (and with "all" every next-token prediction of the row), teacher first."""
    from sac_rag.objectives import SACObjective

    comp = _trained_sac()
    objective = SACObjective(comp, prefix_text=TEMPLATE.prefix + TEMPLATE.context_prefix, distill_weight=1.0,
                             hidden_weight=1.0, divergence=divergence, temperature=temperature, distill_tokens=tokens)
    examples = _qa_examples(comp)
    base = _sharp_tiny_llama()[0]
    students, teachers, student_layers, teacher_layers, owners = [], [], [], [], []
    with torch.no_grad():
        stats = objective.loss(examples)[1]
        for i, ex in enumerate(examples):
            kvs = [kv for passage in ex.passages for kv in _compressed(comp, passage)]
            text = _head(comp) + [t for passage in ex.passages for t in passage]
            for prompt, target in ex.rows:
                row = prompt + target[:-1]
                start = 0 if tokens == "all" else len(prompt) - 1
                logits, layers = _by_hand(base, _head(comp), kvs, row, hidden=True)
                students.append(logits[start:])
                owners += [i] * len(students[-1])
                student_layers.append(layers[:, start:])
                out = base(input_ids=torch.tensor([text + row]), output_hidden_states=True)
                teachers.append(out.logits[0, len(text) + start :])
                teacher_layers.append(torch.stack([h[0, len(text) + start :] for h in out.hidden_states[1:]]))
    student = (torch.cat(students) / temperature).log_softmax(-1)
    teacher = (torch.cat(teachers) / temperature).log_softmax(-1)
    p, q = (teacher, student) if divergence == "forward" else (student, teacher)
    kl = temperature ** 2 * (p.exp() * (p - q)).sum(-1)
    assert stats["distilled_tokens"] == len(student)
    assert stats["kl"] == pytest.approx(_mean_of_example_means(kl, owners), rel=1e-4)
    rms = lambda h: h / h.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    hidden = (rms(torch.cat(student_layers, 1)) - rms(torch.cat(teacher_layers, 1))).pow(2).mean(dim=(0, 2))
    assert stats["hidden"] == pytest.approx(_mean_of_example_means(hidden, owners), rel=1e-3)


def test_weighted_mean_averages_each_examples_own_mean_or_every_value():
    from sac_rag.objectives import SACObjective, weighted_mean

    values, examples = torch.tensor([1.0, 3.0, 10.0, 4.0, 6.0, 8.0]), torch.tensor([0, 0, 1, 3, 3, 3])
    assert weighted_mean(values, examples).item() == pytest.approx((2.0 + 10.0 + 6.0) / 3)  # example 2 has none
    assert weighted_mean(values, examples, "micro_batch_tokens").item() == pytest.approx(32.0 / 6)
    with pytest.raises(ValueError, match="weighting must be one of"):
        SACObjective(_kv_dropping(ratio=2), weighting="tokens")


def _mean_of_example_means(values: torch.Tensor, owners: list[int]) -> float:
    """The mean over examples of the mean of each one's ``values`` (``owners``: the example of each value)."""
    means = [values[[i for i, o in enumerate(owners) if o == example]].mean().item() for example in sorted(set(owners))]
    return sum(means) / len(means)


def test_lm_pretraining_compresses_the_first_half_and_predicts_the_rest_of_the_window():
    from sac_rag.objectives import SACObjective

    comp = _trained_sac()
    tokenizer, eos = comp.tokenizer, comp.tokenizer.eos_token_id
    text = " ".join(p.context for p in FACTS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    builder = ExampleBuilder(tokenizer, TEMPLATE, lm_min_tokens=20, lm_max_tokens=len(ids) - 5)
    examples, ends = [], set()
    for index in range(200):
        ex = builder.lm(text, index)
        (first_half,), ((read, target),) = ex.passages, ex.rows
        at_end = target[-1:] == [eos]
        window = first_half + read + target[: len(target) - at_end]
        start = next(s for s in range(len(ids)) if ids[s : s + len(window)] == window)
        assert 20 <= len(window) <= len(ids) - 5 and len(first_half) == len(window) // 2
        assert at_end == (start + len(window) == len(ids))  # the end token only where the document ends
        ends.add(at_end)
        examples.append(ex)
    assert ends == {True, False}
    assert builder.lm(" ".join(text.split()[:3]), 0) is None  # too short
    # pretraining has no prompt text: the chunks right after the BOS token (none here), then the continuation
    objective = SACObjective(comp)
    batch = examples[:4]
    with torch.no_grad():
        stats = objective.loss(batch)[1]
        base = _sharp_tiny_llama()[0]
        nll, count = [], 0
        for ex in batch:
            (read, target), = ex.rows
            logits = _by_hand(base, [], _compressed(comp, ex.passages[0]), read + target[:-1])
            nll.append(F.cross_entropy(logits.float(), torch.tensor(target)).item())  # the example's mean
            count += len(target)
    assert stats["target_tokens"] == count
    assert stats["ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_full_ft_trains_the_answer_tokens_of_the_full_text_each_row_read_alone():
    from peft import LoraConfig, get_peft_model

    from sac_rag.objectives import FullTextObjective

    model, tokenizer = _sharp_tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    draw = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=draw) * 0.3)
    objective = FullTextObjective(peft_model, tokenizer, TEMPLATE.prefix + TEMPLATE.context_prefix)
    builder = ExampleBuilder(tokenizer, TEMPLATE, questions_per_context=2, distractors=1)
    examples = [builder.qa(paragraph, i, FACTS) for i, paragraph in enumerate(FACTS)]
    head = tokenizer(TEMPLATE.prefix + TEMPLATE.context_prefix, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss, stats = objective.loss(examples)
        per_token, owners = [], []
        for i, ex in enumerate(examples):
            for prompt, target in ex.rows:
                text = head + [t for passage in ex.passages for t in passage] + prompt
                logits = peft_model(input_ids=torch.tensor([text + target[:-1]])).logits[0, len(text) - 1 :]
                per_token.append(F.cross_entropy(logits.float(), torch.tensor(target), reduction="none"))
                owners += [i] * len(target)
    assert stats["target_tokens"] == len(owners)
    assert loss.item() == pytest.approx(_mean_of_example_means(torch.cat(per_token), owners), rel=1e-5)


def test_an_answer_cut_at_max_answer_tokens_is_not_trained_to_end_there(tokenizer):
    long_answer = "the tower was finished in 1889 by Gustave Eiffel"
    paragraph = Paragraph(f"In Paris {long_answer}.", [QAItem("What happened?", [long_answer])], "A")
    ids = tokenizer(long_answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    for limit, target in [(len(ids), ids + [eos]), (len(ids) + 5, ids + [eos]), (len(ids) - 1, ids[:-1]), (3, ids[:3])]:
        builder = ExampleBuilder(tokenizer, PromptTemplate(), max_answer_tokens=limit)
        assert builder.qa(paragraph, 0, [paragraph]).rows[0][1] == target


def test_distractors_are_refused_with_a_template_that_separates_contexts(tokenizer):
    """The generator reads a template's context_separator between passages as text; the objectives read an
    example's passages back to back, so training would not read what answering reads."""
    separated = PromptTemplate(context_separator="\n")
    with pytest.raises(ValueError, match="context_separator"):
        ExampleBuilder(tokenizer, separated, distractors=1)
    ExampleBuilder(tokenizer, separated)  # one passage: no separator is read
    assert separated.build(["a", "b"], "q?") != separated.build(["ab"], "q?")


def test_training_reads_the_prompt_the_generator_reads_only_without_a_context_separator():
    """What the refusal above guards: with a separator, the generator's layout of two compressed passages is not
    the objective's."""
    from sac_rag.generation import Generator

    comp = _trained_sac()
    ex = _qa_examples(comp)[0]
    kvs = [_compressed(comp, passage) for passage in ex.passages]
    question = "What is the capital?"
    prompt = comp.tokenizer(TEMPLATE.question.format(question=question), add_special_tokens=False)["input_ids"]
    with torch.no_grad(), comp.decoder_mode():
        trained = _by_hand(comp.base_model, _head(comp), sum(kvs, []), prompt)
    generator = Generator.from_compressor(comp)
    assert torch.allclose(generator.prompt_logits(TEMPLATE.build(kvs, question)), trained, atol=1e-4)
    separated = PromptTemplate(prefix=TEMPLATE.prefix, context_separator="\n")
    assert not torch.allclose(generator.prompt_logits(separated.build(kvs, question)), trained, atol=1e-2)


# -- the objective against the public inference path, on a model that starts texts with a BOS token -------------
#
# The tests above use a tokenizer without BOS, the encoder adapter on q/v only and one anchor embedding. The
# shipped compressors adapt every projection, and Llama-style tokenizers start a prompt with BOS (the objective's
# prompt head and the generator each add it), so these check those layouts too, each number against what
# ``compress`` and the ``Generator`` give.

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("memory", ["anchors", "compression_tokens"])
def test_the_answer_loss_is_the_generators_nll_of_the_answer_with_a_bos_tokenizer_and_every_projection_adapted(
        memory):
    from sac_rag import SACCompressor, SACConfig
    from sac_rag.generation import Generator, bos_ids
    from sac_rag.objectives import SACObjective

    model, tokenizer = _sharp_tiny_llama(bos=True)
    assert bos_ids(tokenizer) == [tokenizer.bos_token_id]
    config = SACConfig(base_model="tiny", ratio=3, chunk_len=8, lora_rank=4, lora_alpha=8, prompt=TEMPLATE,
                       decoder_lora_rank=4, anchor_embedding="per_slot", memory=memory,
                       lora_target_modules=ALL_PROJECTIONS)
    comp = _random_adapters(SACCompressor(config, model=model, tokenizer=tokenizer))
    builder = ExampleBuilder(tokenizer, TEMPLATE, questions_per_context=2, distractors=1)
    examples = [builder.qa(paragraph, i, FACTS) for i, paragraph in enumerate(FACTS)]
    objective = SACObjective(comp, prefix_text=TEMPLATE.prefix + TEMPLATE.context_prefix,
                             weighting="micro_batch_tokens")
    with torch.no_grad():
        stats = objective.loss(examples)[1]
    generator = Generator.from_compressor(comp)
    text = {tuple(tokenizer(p.context, add_special_tokens=False)["input_ids"]): p.context for p in FACTS}
    asked = {tuple(tokenizer(TEMPLATE.question.format(question=qa.question), add_special_tokens=False)["input_ids"]):
             qa for p in FACTS for qa in p.questions}
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            contexts = [comp.compress(text[tuple(passage)]) for passage in ex.passages]
            assert any(len(kvs) > 1 for kvs in contexts)  # a passage of several chunks
            for prompt, target in ex.rows:
                qa = asked[tuple(prompt)]
                segments = TEMPLATE.build(contexts, qa.question)
                segments[-1] += qa.answers[0]  # the question, then the answer as the generator would read it
                assert tokenizer(segments[-1], add_special_tokens=False)["input_ids"] == prompt + target[:-1]
                logits = generator.prompt_logits(segments)[len(prompt) - 1 :]
                total += F.cross_entropy(logits.float(), torch.tensor(target), reduction="sum").item()
                count += len(target)
    assert stats["target_tokens"] == count
    assert stats["ce"] == pytest.approx(total / count, rel=1e-5)


def test_the_training_encoder_is_the_encoder_adapter_alone_reading_its_chunk_bidirectionally_at_its_offset():
    """``encode`` (what training calls, with gradients) against a reference built without the compressor's
    adapter switches: a copy with only the encoder adapter merged, the anchor embedding added by hand at the
    anchors, every token seeing every token, positions from the offset; after the decoder adapter was used."""
    import copy

    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = _sharp_tiny_llama()
    config = SACConfig(base_model="tiny", ratio=3, chunk_len=8, lora_rank=4, lora_alpha=8, prompt=TEMPLATE,
                       decoder_lora_rank=4, lora_target_modules=ALL_PROJECTIONS)
    comp = _random_adapters(SACCompressor(config, model=model, tokenizer=tokenizer))
    chunks = [tokenizer(p.context, add_special_tokens=False)["input_ids"][:n] for p, n in zip(FACTS, (8, 5))]
    offsets = [7, 30]
    with torch.no_grad(), comp.decoder_mode():
        comp.base_model(input_ids=torch.tensor([chunks[0]]))
    encoded = comp.encode(chunks, offsets)  # one batch: the shorter chunk is padded
    encoder = copy.deepcopy(comp.model).merge_and_unload(adapter_names=["default"])
    with torch.no_grad():
        for chunk, offset, kv in zip(chunks, offsets, encoded):
            assert kv.keys.requires_grad  # the graph into the encoder is kept
            anchors = comp.anchor_indices(chunk)
            embeds = encoder.get_input_embeddings()(torch.tensor([chunk]))
            embeds[0, anchors] += comp.anchor_embedding[0]
            positions = torch.arange(offset, offset + len(chunk))[None]
            out = encoder.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=True, is_causal=False)
            keys = torch.stack([layer.keys[0][:, anchors] for layer in out.cache.layers])
            values = torch.stack([layer.values[0][:, anchors] for layer in out.cache.layers])
            assert torch.allclose(kv.keys, keys, atol=1e-4) and torch.allclose(kv.values, values, atol=1e-4)


def test_on_policy_rows_add_only_their_answer_tokens_to_the_distilled_ones_when_distilling_every_token():
    comp = _kv_dropping(ratio=3)
    every, _ = _loss_stats(comp, distill_tokens="all", on_policy_tokens=5)
    every_gold, _ = _loss_stats(comp, distill_tokens="all")
    answers, _ = _loss_stats(comp, distill_tokens="answer", on_policy_tokens=5)
    assert every["on_policy_tokens"] == answers["on_policy_tokens"] > 0
    assert every["distilled_tokens"] == every_gold["distilled_tokens"] + answers["on_policy_tokens"]


def test_the_autoencoding_term_weighs_each_example_the_same_whatever_it_is_batched_with():
    from sac_rag.objectives import SACObjective

    comp = _kv_dropping(ratio=3)
    builder = ExampleBuilder(comp.tokenizer, PromptTemplate())
    long_one = builder.qa(Paragraph(" ".join([POOL[0].context] * 3), POOL[0].questions, "A"), 0, POOL)
    short_one = builder.qa(POOL[5], 5, POOL)
    assert len(long_one.passages[0]) > 2 * len(short_one.passages[0])
    objective = SACObjective(comp, ae_weight=1.0)
    with torch.no_grad():
        ae = [objective.loss(batch)[1]["ae"] for batch in ([long_one], [short_one], [long_one, short_one])]
    assert ae[2] == pytest.approx((ae[0] + ae[1]) / 2, rel=1e-4)


def test_the_autoencoding_term_is_the_mean_nll_of_the_first_chunk_len_tokens_after_the_first_read_from_the_caches():
    """+AE: the decoder reads an example's compressed passages, is given the passages' first token and
    predicts the chunk_len tokens after it, each from those before it; the term is each example's mean
    NLL of those chunk_len tokens (the last one included), averaged over the examples."""
    from sac_rag.objectives import SACObjective

    comp = _trained_sac()
    chunk_len, template = comp.config.chunk_len, comp.config.prompt
    examples = _qa_examples(comp)
    objective = SACObjective(comp, prefix_text=template.prefix + template.context_prefix, ae_weight=1.0)
    decoder = _sharp_tiny_llama()[0]  # the frozen decoder: the base model, no adapter of the compressor on
    per_example = []
    with torch.no_grad():
        ae = objective.loss(examples)[1]["ae"]
        for ex in examples:
            text = [t for passage in ex.passages for t in passage]
            assert len(text) > chunk_len + 1
            text = text[: chunk_len + 1]
            kvs = [kv for passage in ex.passages for kv in _compressed(comp, passage)]
            logits = _by_hand(decoder, _head(comp), kvs, text[:-1])
            per_example.append(F.cross_entropy(logits.float(), torch.tensor(text[1:])))
    assert ae == pytest.approx(torch.stack(per_example).mean().item(), rel=1e-5)
