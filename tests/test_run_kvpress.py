"""benchmarks/kvpress/run_kvpress.py: a prediction file answers for the settings that made it."""

import json
import runpy
from pathlib import Path

import pytest

from sac_rag.errors import InvalidInputError
from sac_rag.eval import Question

RUN_KVPRESS = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "kvpress" / "run_kvpress.py"))
RUN_ONE = RUN_KVPRESS["run_one"]
SETTINGS = {"press": "snapkv", "ratio": 5, "decoder": "frozen", "dtype": "bfloat16", "base_model": "m@1",
            "kvpress": "0.5.5", "adapter": None}


class CountingRunner:
    """Answers every question with its id, counting the questions it was asked."""

    def __init__(self):
        self.asked = 0

    def answer(self, question, press, max_new_tokens):
        self.asked += 1
        return {"text": f"answer to {question.id}"}


def _questions(n: int) -> list[Question]:
    return [Question(id=f"q{i}", question="?", answers=["a"], context="c") for i in range(n)]


def test_a_rerun_with_the_same_settings_reuses_the_answers(tmp_path):
    cache, runner = tmp_path / "snapkv-5x.jsonl", CountingRunner()
    first, _ = RUN_ONE(runner, _questions(3), None, "snapkv-5x", cache, 32, SETTINGS)
    again, _ = RUN_ONE(runner, _questions(3), None, "snapkv-5x", cache, 32, dict(SETTINGS))
    assert first == again == ["answer to q0", "answer to q1", "answer to q2"] and runner.asked == 3
    assert json.loads(cache.read_text().splitlines()[0]) == {"settings": {**SETTINGS, "max_new_tokens": 32}}


@pytest.mark.parametrize("change", [{"ratio": 15}, {"dtype": "float32"}, {"base_model": "m@2"},
                                    {"adapter": "ft@3"}, {"max_new_tokens": 8}])
def test_a_file_made_with_other_settings_is_refused_naming_them(tmp_path, change):
    cache, runner = tmp_path / "snapkv-5x.jsonl", CountingRunner()
    RUN_ONE(runner, _questions(2), None, "snapkv-5x", cache, 32, SETTINGS)
    settings = {**SETTINGS, **change}
    name, value = next(iter(change.items()))
    with pytest.raises(InvalidInputError, match=rf"{name}=.*but this run has {name}={value!r}: pass --results in "
                                                rf"another folder"):
        RUN_ONE(runner, _questions(2), None, "snapkv-5x", cache, settings.pop("max_new_tokens", 32), settings)
    assert runner.asked == 2


def test_an_answer_cut_by_a_kill_is_asked_again_and_the_file_stays_readable(tmp_path):
    cache, runner = tmp_path / "snapkv-5x.jsonl", CountingRunner()
    RUN_ONE(runner, _questions(2), None, "snapkv-5x", cache, 32, SETTINGS)
    cache.write_text(cache.read_text()[:-12])  # the last answer's line cut short, as a kill leaves it
    for _ in range(2):  # a resume, then one more run
        answers, _ = RUN_ONE(runner, _questions(3), None, "snapkv-5x", cache, 32, SETTINGS)
        assert answers == ["answer to q0", "answer to q1", "answer to q2"]
    assert runner.asked == 4  # q0, q1; then q1 again and q2; nothing the last run


def test_questions_reading_other_retrieved_passages_get_a_predictions_file_of_their_own(tmp_path):
    """Another corpus, store or retriever (another --retrieval file) asks other questions: its
    answers are not the first run's to reuse."""
    path = RUN_KVPRESS["predictions_path"]
    retrieved = [Question(id=q.id, question=q.question, answers=q.answers, context=q.context,
                          passages=("Paris is the capital.", "A fox.")) for q in _questions(2)]
    other = [Question(id=q.id, question=q.question, answers=q.answers, context=q.context,
                      passages=("The sky is green.",) * 2) for q in retrieved]
    results = tmp_path / "kv.jsonl"
    assert path(results, "none", "squad-dev-rag-top2", retrieved, 0) != path(results, "none", "squad-dev-rag-top2",
                                                                            other, 0)
    assert path(results, "none", "squad-dev-rag-top2", retrieved, 0) == path(results, "none", "squad-dev-rag-top2",
                                                                            list(retrieved), 0)
    assert path(results, "snapkv-5x", "squad-dev", _questions(2), 0) == \
        tmp_path / "predictions" / "snapkv-5x-squad-dev-n2-s0.jsonl"  # the gold paragraph: named as before
