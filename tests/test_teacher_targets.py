"""benchmarks/teacher_targets.py: the paragraphs a config's first steps read, and their answers
replaced by the teacher's where it agrees with the gold answer."""

import collections
import json
import runpy
from pathlib import Path

from conftest import make_tiny_llama

from sac_rag.config import PromptTemplate
from sac_rag.data import LoadStats
from sac_rag.train import ExampleStream, parse_config

script = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "teacher_targets.py"))
replace_answers, paragraphs_read = script["replace_answers"], script["paragraphs_read"]


def _squad(golds: dict[str, str]) -> dict:
    return {"data": [{"title": "A", "paragraphs": [{
        "context": f"Passage about {qid}.",
        "qas": [{"id": qid, "question": f"What about {qid}?", "answers": [{"text": gold, "answer_start": 0}]}],
    } for qid, gold in golds.items()]}]}


def _answers(squad: dict) -> dict[str, list[str]]:
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for article in squad["data"] for para in article["paragraphs"] for qa in para["qas"]}


def test_the_teacher_answer_replaces_the_gold_one_only_where_it_overlaps_enough():
    squad = _squad({"same": "1749", "longer": "1749", "wrong": "1749", "empty": "1749", "unasked": "1749"})
    predictions = {"same": "1749", "longer": "in 1749", "wrong": "Paris", "empty": " "}
    kept = replace_answers(squad, predictions, min_f1=0.5)
    assert _answers(squad) == {"same": ["1749"], "longer": ["in 1749"], "wrong": ["1749"], "empty": ["1749"],
                               "unasked": ["1749"]}  # "in 1749" has F1 2/3 against "1749"
    assert kept == collections.Counter({"teacher": 2, "teacher, not a gold answer": 1, "gold": 2})
    stricter = _squad({"longer": "1749"})
    replace_answers(stricter, {"longer": "in 1749"}, min_f1=0.7)
    assert _answers(stricter) == {"longer": ["1749"]}


def _config(tmp_path: Path, n_paragraphs: int):
    golds = {f"q{i}": str(1900 + i) for i in range(n_paragraphs)}
    (tmp_path / "qa.json").write_text(json.dumps(_squad(golds)))
    return parse_config(["--data", str(tmp_path / "qa.json"), "--stage", "finetune", "--seed", "5",
                         "--batch-size", "3", "--micro-batch-size", "1", "--held-out-fraction", "0"])


def test_upcoming_names_the_paragraphs_the_next_batches_read(tmp_path):
    cfg = _config(tmp_path, 5)
    _, tokenizer = make_tiny_llama()
    ahead = ExampleStream(cfg, tokenizer, PromptTemplate(), LoadStats())
    reader = ExampleStream(cfg, tokenizer, PromptTemplate(), LoadStats())
    reader.next_batch(2, rank=0, world=1)
    expected = ahead.upcoming(9)[2:]  # across the epoch boundary at 5
    assert ahead.position == 0
    ahead.next_batch(2, rank=0, world=1)
    assert ahead.upcoming(7) == expected
    read = [example.passages[0] for _ in range(7) for example in reader.next_batch(1, rank=0, world=1)]
    assert read == [tokenizer(p.context, add_special_tokens=False)["input_ids"] for p in expected]


def test_paragraphs_read_lists_each_paragraph_once_even_past_an_epoch(tmp_path):
    cfg = _config(tmp_path, 5)
    _, tokenizer = make_tiny_llama()
    assert len(paragraphs_read(cfg, steps=1, tokenizer=tokenizer, template=PromptTemplate())) == 3
    assert sorted(p.questions[0].id for p in paragraphs_read(cfg, 3, tokenizer, PromptTemplate())) == \
        [f"q{i}" for i in range(5)]


def test_min_f1_is_inclusive_and_an_empty_teacher_answer_never_replaces_gold():
    squad = _squad({"exact": "1749", "blank": "1749"})
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"].append({"text": "in 1749", "answer_start": 0})
    kept = replace_answers(squad, {"exact": "1749", "blank": "  "}, min_f1=1.0)  # only exact matches
    assert _answers(squad)["exact"] == ["1749"] and kept["teacher"] == 1  # F1 1.0 is at least 1.0
    anything = _squad({"blank": "1749"})
    replace_answers(anything, {"blank": "  "}, min_f1=0.0)  # "take every teacher answer": not a blank one
    assert _answers(anything) == {"blank": ["1749"]}
