"""benchmarks/store_benchmark.py on the tiny Llama: the bytes it reports are the ones known by hand,
every row names its measure and command, and bad input is refused before any model loads."""

import json
import lzma
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BENCHMARKS, load_benchmark, make_tiny_llama

from sac_rag import SACCompressor, SACConfig
from sac_rag.chunking import iter_chunks
from sac_rag.errors import SACError

SCRIPT = BENCHMARKS / "store_benchmark.py"
BYTES_PER_TOKEN = 4 * 2 * 2 * 16 * 2  # the tiny Llama's K/V of one token: layers x K,V x heads x dims x bf16
MEASURES = ["throughput", "bytes", "load_k5_vs_ttft", "storage_fp8", "storage_int8",
            "answers_native", "answers_fp8", "answers_int8"]



STORE = load_benchmark("store_benchmark")


def _tiny_bf16(seed: int = 0):
    model, tokenizer = make_tiny_llama(seed)
    return model.to(torch.bfloat16), tokenizer


def test_prefill_counts_the_kv_bytes_of_real_tokens_not_padding():
    model, tokenizer = _tiny_bf16()
    texts = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog. " * 3, "Anchors."]
    chunks = [c for i, t in enumerate(texts) for c in iter_chunks(t, tokenizer, 64, 0, f"d{i}")]
    _, full_kv = STORE.prefill(model, tokenizer, chunks, batch_size=2)  # lengths differ: padded batches
    assert full_kv == BYTES_PER_TOKEN * sum(c.n_tokens for c in chunks)


def _kv(keys: float, values: float) -> SimpleNamespace:
    return SimpleNamespace(keys=torch.full((2, 3), keys), values=torch.full((2, 3), values))


def test_kv_errors_are_the_max_and_mean_absolute_differences():
    native = {"a": _kv(1.0, -2.0), "b": _kv(3.0, 0.0)}
    decoded = {"a": _kv(1.5, -2.0), "b": _kv(2.0, 0.25)}
    errors = STORE.kv_errors(native, decoded)
    assert errors == {"keys_max_abs_error": 1.0, "keys_mean_abs_error": 0.75, "keys_mean_abs_value": 2.0,
                      "values_max_abs_error": 0.25, "values_mean_abs_error": 0.125, "values_mean_abs_value": 1.0}


def test_the_answers_row_scores_squad_f1_and_em_and_agreement_with_native():
    questions = [(SimpleNamespace(answers=["Paris"]), None), (SimpleNamespace(answers=["the lazy dog"]), None)]
    row = STORE.quality_row("int8", ["Paris", "lazy"], ["Paris", "the dog"], questions)
    # "lazy" vs "the lazy dog": "the" is dropped by SQuAD normalisation, so precision 1, recall 1/2
    assert row == {"measure": "answers_int8", "storage": "int8", "n": 2, "answers_identical_to_native": 0.5,
                   "squad_f1": pytest.approx(100 * (1 + 2 / 3) / 2), "squad_em": 50.0}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Six SQuAD paragraphs of a question each; the script's SmolLM2 replaced by the tiny Llama in
    bfloat16 (``loads`` counts how often it was loaded)."""
    data = {"data": [{"title": "t", "paragraphs": [
        {"context": f"Paris is the capital of France. Fact {i}: {'the fox jumps. ' * i}",
         "qas": [{"id": f"q{i}", "question": "What is the capital?", "answers": [{"text": "Paris"}]}]}
        for i in range(6)]}]}
    with lzma.open(tmp_path / "dev.json.xz", "wt") as f:
        json.dump(data, f)
    loads = []

    def load_base_model(name, device=None, dtype=None):
        assert (name, dtype) == ("smollm2-135m", "bfloat16")
        loads.append(name)
        return _tiny_bf16()

    monkeypatch.setattr(STORE, "load_base_model", load_base_model)
    return tmp_path, loads


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tmp_path / "dev.json.xz"), "--paragraphs", "6", "--batch-size", "4", "--repeats", "1",
            "--queries", "2", "--quality-questions", "3", "--out", str(tmp_path / "store.jsonl"), *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_writes_one_row_per_measure_with_the_bytes_known_by_hand(workspace):
    tmp_path, _ = workspace
    assert STORE.main(_args(tmp_path)) == 0
    rows = _rows(tmp_path / "store.jsonl")
    assert [r["measure"] for r in rows] == MEASURES
    command = "python benchmarks/store_benchmark.py " + " ".join(_args(tmp_path))
    for row in rows:
        assert (row["method"], row["ratio"], row["command"]) == ("kv-dropping-untrained", 5, command)
        assert row["dataset"] == str(tmp_path / "dev.json.xz") and row["n"] >= 1
    by = {r["measure"]: r for r in rows}
    sizes = by["bytes"]
    assert sizes["n"] == 6 and sizes["full_kv_bytes_per_chunk"] == BYTES_PER_TOKEN * sizes["tokens"] / 6
    # the same dtype: the store is exactly tokens / anchors times smaller than the full K/V
    assert sizes["kv_bytes_per_chunk"] == pytest.approx(BYTES_PER_TOKEN * sizes["anchors"] / 6, abs=1e-6)
    assert sizes["kv_reduction"] == pytest.approx(sizes["tokens"] / sizes["anchors"], abs=1e-6)
    assert sizes["kv_reduction"] == sizes["expected_reduction_tokens_per_anchor"]
    assert sizes["full_kv_bytes_per_chunk_store_estimate"] == sizes["full_kv_bytes_per_chunk"]
    assert by["throughput"]["tokens"] == sizes["tokens"] and by["load_k5_vs_ttft"]["n"] == 2
    for codec in ("fp8", "int8"):  # one byte per number instead of two, plus per-head scales
        assert sizes["kv_bytes_per_chunk"] / 2 <= by[f"storage_{codec}"]["kv_bytes_per_chunk"] \
            < sizes["kv_bytes_per_chunk"]
    assert by["answers_native"]["answers_identical_to_native"] == 1.0 and by["answers_native"]["n"] == 3


def test_a_compressor_of_another_base_model_is_refused(workspace):
    tmp_path, _ = workspace
    model, tokenizer = make_tiny_llama(seed=1)
    SACCompressor(SACConfig(base_model="tiny", ratio=2, chunk_len=64, lora_rank=4), model=model,
                  tokenizer=tokenizer).save_pretrained(tmp_path / "other")
    with pytest.raises(SACError, match="was built for"):
        STORE.main(_args(tmp_path, "--compressor", str(tmp_path / "other")))
    assert not (tmp_path / "store.jsonl").exists()


@pytest.mark.parametrize("option", ["--paragraphs", "--batch-size", "--repeats", "--queries", "--quality-questions"])
def test_counts_below_one_are_refused_by_the_parser(workspace, option):
    tmp_path, loads = workspace
    with pytest.raises(SystemExit) as exit_:
        STORE.main(_args(tmp_path, option, "0"))
    assert exit_.value.code == 2 and loads == []


@pytest.mark.parametrize(("problem", "message"), [("missing data", "dev-missing"), ("no questions", "no paragraph"),
                                                  ("out is a folder", "is a folder")])
def test_bad_paths_are_refused_before_the_model_loads(workspace, problem, message):
    tmp_path, loads = workspace
    extra = []
    if problem == "missing data":
        extra = ["--data", str(tmp_path / "dev-missing.json")]
    elif problem == "no questions":
        (tmp_path / "empty.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": []}]}))
        extra = ["--data", str(tmp_path / "empty.json")]
    else:
        (tmp_path / "store.jsonl").mkdir()
    with pytest.raises(SACError, match=message):
        STORE.main(_args(tmp_path, *extra))
    assert loads == []


def test_a_missing_data_file_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "missing.json"),
                           "--out", str(tmp_path / "store.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    assert len(done.stderr.strip().splitlines()) == 1 and "missing.json" in done.stderr
