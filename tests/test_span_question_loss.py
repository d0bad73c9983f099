"""benchmarks/span_question_loss.py: answer-token cross-entropy on real and span questions."""

import runpy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from sac_rag.data import Paragraph, QAItem

answer_loss = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "span_question_loss.py"))["answer_loss"]

PARAGRAPHS = [
    Paragraph(f"Paragraph {i}: the bridge over the river was built in {1900 + i}, and it carried trains, "
              f"carts and people between the two towns for many decades after that.",
              [QAItem(f"When was bridge {i} built?", [str(1900 + i)], f"p{i}-{j}") for j in range(2)], f"T{i}")
    for i in range(5)
]


@pytest.fixture(scope="module")
def comp():
    from sac_rag import SACCompressor, SACConfig

    model, tokenizer = make_tiny_llama()
    config = SACConfig(base_model="tiny", ratio=3, chunk_len=64, lora_rank=4, lora_alpha=8)
    return SACCompressor(config, model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("questions, span_questions", [(2, 0), (0, 2)])
def test_the_loss_is_a_mean_over_answer_tokens_whatever_the_micro_batch(comp, questions, span_questions):
    whole, tokens = answer_loss(comp, PARAGRAPHS, questions, span_questions, micro_batch=len(PARAGRAPHS))
    batched, same_tokens = answer_loss(comp, PARAGRAPHS, questions, span_questions, micro_batch=2)
    assert tokens == same_tokens and tokens >= 2 * len(PARAGRAPHS)  # each answer: >= 1 token + EOS
    assert batched == pytest.approx(whole, rel=1e-4)
    assert 0 < whole < 2 * torch.log(torch.tensor(float(len(comp.tokenizer)))).item()


def test_real_and_span_questions_score_different_answers(comp):
    assert answer_loss(comp, PARAGRAPHS, 2, 0) != pytest.approx(answer_loss(comp, PARAGRAPHS, 0, 2), rel=1e-3)
