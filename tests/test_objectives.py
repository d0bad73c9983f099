"""How training examples are built: questions per paragraph and distractor passages."""

import pytest
from conftest import make_tiny_llama

from sac_rag.config import PromptTemplate
from sac_rag.data import Paragraph, QAItem
from sac_rag.objectives import ExampleBuilder


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


def test_a_pool_without_other_passages_gives_the_gold_passage_alone(tokenizer):
    builder = ExampleBuilder(tokenizer, PromptTemplate(), distractors=2)
    assert _texts(tokenizer, builder.qa(POOL[0], 0, [POOL[0], POOL[0]])) == [POOL[0].context]
