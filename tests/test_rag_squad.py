"""benchmarks/rag_squad.py: RAG over a SQuAD file through the LangChain chains, on the tiny Llama:
every method writes a scored row with its command and costs, runs resume, what LLMs read is
counted right, and bad input is refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BENCHMARKS, load_benchmark, make_tiny_llama, save_tiny_compressor, write_squad_dev

from sac_rag import SACCompressor, SACConfig
from sac_rag.config import PromptTemplate
from sac_rag.errors import SACError
from sac_rag.eval import Question

SCRIPT = BENCHMARKS / "rag_squad.py"



RAG = load_benchmark("rag_squad")
Document = RAG.Document

PARAGRAPHS = [
    ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
    ("The tower was finished in 1889 by its builders.", "When was the tower finished?", "1889"),
    ("The quick brown fox jumps over the lazy dog.", "What does the fox jump over?", "the lazy dog"),
    ("Anchors carry the meaning of a chunk of text.", "What do anchors carry?", "the meaning"),
]


def _question(i: int, context: str) -> Question:
    return Question(id=f"q{i}", question="?", answers=["a"], context=context)


def test_recall_counts_questions_whose_paragraph_or_a_chunk_of_it_was_retrieved():
    questions = [_question(0, "Paris is the capital of France."), _question(1, "The tower was finished in 1889."),
                 _question(2, "A fox.")]
    retrieved = [[Document(page_content="A fox."), Document(page_content=" Paris is the capital of France.\n")],
                 [Document(page_content="The tower was finished")],  # a chunk of the gold paragraph
                 [Document(page_content="Paris is the capital of France.")]]
    assert RAG.recall_at_k(questions, retrieved) == pytest.approx(2 / 3)


def test_a_blank_document_is_no_hit():
    assert RAG.recall_at_k([_question(0, "Paris.")], [[Document(page_content=" ")]]) == 0.0


class CountingGenerator:
    """Answers each prompt with its length in words; reads as many text tokens as the prompt has characters."""

    def generate_batch(self, prompts, config, sources=None):
        return [SimpleNamespace(text=f"{len(p.split())} words", text_tokens=len(p)) for p in prompts]


def test_usage_totals_count_every_prompt_of_a_batch_once():
    llm = RAG.FullFTLLM(generator=CountingGenerator(), template=PromptTemplate())
    usage = RAG.UsageTotals()
    answers = llm.batch(["one", "two words", "three more words"], config={"callbacks": [usage]})
    assert answers == ["1 words", "2 words", "3 words"]
    assert (usage.calls, usage.input_tokens, usage.cache_read) == (3, 3 + 9 + 16, 0)


class QuotingGenerator:
    """Records what each prompt's extractive answer may quote."""

    def __init__(self):
        self.sources = []

    def generate_batch(self, prompts, config, sources=None):
        self.sources += sources
        return [SimpleNamespace(text="", text_tokens=0) for _ in prompts]


def test_extractive_full_ft_answers_quote_the_documents_not_the_question():
    """As SACLLM and sac_rag.eval do: quoting the question ("Who is Zorblax?" answered "Zorblax")
    is no answer from the documents."""
    template, generator = PromptTemplate(), QuotingGenerator()
    prompt = "".join(template.build(["Paris is the capital of France."], "Who is Zorblax?"))
    RAG.FullFTLLM(generator=generator, template=template, extractive=True).invoke(prompt)
    assert [[s.strip() for s in quotable] for quotable in generator.sources] == [["Paris is the capital of France."]]


class EchoChain:
    """Answers each input with its question, recording the questions it was asked."""

    def __init__(self):
        self.asked = []

    def batch(self, inputs):
        self.asked += [item["question"] for item in inputs]
        return [f" {item['question']} \n" for item in inputs]


def test_answer_all_asks_only_what_the_cache_lacks_and_scores_every_question(tmp_path):
    questions = [Question(id=f"q{i}", question=f"answer {i}", answers=[f"answer {i}"], context="c") for i in range(4)]
    cache = tmp_path / "predictions" / "rag-x.jsonl"
    cache.parent.mkdir()
    cache.write_text('{"settings": {}}\n{"id": "q0", "prediction": "wrong"}\n{"id": "q1", "predic')  # killed
    chain = EchoChain()
    scores = RAG.answer_all("rag-x", chain, [{"question": q.question} for q in questions], questions, cache, 2)
    assert chain.asked == ["answer 1", "answer 2", "answer 3"]  # q1's cut line was no answer
    assert (scores["n"], scores["em"], scores["f1"]) == (4, 75.0, 75.0)  # q0 keeps its cached wrong answer
    assert RAG.read_predictions(cache) == {"q0": "wrong", "q1": "answer 1", "q2": "answer 2", "q3": "answer 3"}


def test_the_retrieval_file_is_written_whole_and_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "retrieval.jsonl"
    questions = [_question(0, "x"), _question(1, "y")]
    found = [[Document(page_content="a"), Document(page_content="b")], [Document(page_content="c")]]
    RAG.export_retrieval(str(path), questions, found)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": "q0", "passages": ["a", "b"]}, {"id": "q1", "passages": ["c"]}]

    def killed(handle, data):
        raise KeyboardInterrupt  # a kill in the middle of writing the new file

    monkeypatch.setattr("os.fsync", lambda fd: killed(fd, None))
    with pytest.raises(KeyboardInterrupt):
        RAG.export_retrieval(str(path), questions[:1], found[:1])
    assert len(path.read_text().splitlines()) == 2 and sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny Llama saved as a folder, a ratio-2 compressor and a Full-FT LoRA of it, and a SQuAD
    file of four paragraphs with a question each."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("rag")
    save_tiny_compressor(root)
    torch.manual_seed(0)
    get_peft_model(make_tiny_llama()[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False)).save_pretrained(root / "adapter")
    write_squad_dev(root, [
        {"context": context, "qas": [{"id": f"q{i}", "question": question, "answers": [{"text": answer}]}]}
        for i, (context, question, answer) in enumerate(PARAGRAPHS)])
    return root


def _args(ws: Path, results: Path, *extra: str) -> list[str]:
    return ["--n", "3", "--k", "2", "--batch-size", "2", "--max-new-tokens", "3", "--timing-samples", "1",
            "--dtype", "float32", "--data-root", str(ws / "data"), "--compressor", str(ws / "compressor"),
            "--store", str(ws / "store"), "--full-ft-adapter", str(ws / "adapter"), "--results", str(results),
            *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(workspace, tmp_path_factory):
    results = tmp_path_factory.mktemp("results") / "rag.jsonl"
    retrieval = results.parent / "retrieval.jsonl"
    assert RAG.main(_args(workspace, results, "--export-retrieval", str(retrieval))) == 0
    return results, retrieval


def test_every_method_writes_a_scored_row_with_its_command(first_run, workspace):
    results, _ = first_run
    rows = _rows(results)
    assert [r["method"] for r in rows] == ["rag-sac-2x", "rag-full-text", "rag-full-ft",
                                           "rag-text-truncate-2x+fullft-decoder", "rag-kv-dropping-2x",
                                           "rag-kv-dropping-2x+fullft-decoder"]
    for row in rows:
        assert row["dataset"] == "squad-dev-rag-top2" and row["n"] == 3 and row["k"] == 2
        assert 0 <= row["em"] <= row["f1"] <= 100 and row["f1_ci"][0] <= row["f1"] <= row["f1_ci"][1]
        assert row["command"] == "python benchmarks/rag_squad.py " + " ".join(
            _args(workspace, results, "--export-retrieval", str(results.parent / "retrieval.jsonl")))
        assert row["corpus_chunks"] == 4 and row["timing_samples"] == 1 and row["dtype"] == "float32"
        assert row["reads_counted"] == 3  # what the LLM read is counted over every question, not the timed one
    assert [r["ratio"] for r in rows] == [2, 1, 1, 2, 2, 2]


def test_compressed_rows_read_cached_entries_instead_of_text(first_run):
    rows = {r["method"]: r for r in _rows(first_run[0])}
    sac, text = rows["rag-sac-2x"], rows["rag-full-text"]
    assert text["cached_entries_per_query"] == 0 and sac["cached_entries_per_query"] > 0
    assert sac["text_tokens_per_query"] + 2 * sac["cached_entries_per_query"] >= text["text_tokens_per_query"] - 2
    assert sac["kv_bytes_per_query"] < text["kv_bytes_per_query"]
    assert rows["rag-kv-dropping-2x"]["cached_entries_per_query"] == pytest.approx(sac["cached_entries_per_query"])
    # K/V bytes = entries read x bytes of one position's K/V (4 layers x 2 heads x 16 dims x K and V, float32)
    assert text["kv_bytes_per_query"] == text["text_tokens_per_query"] * 4 * 2 * 16 * 2 * 4


def test_the_exported_retrieval_names_each_question_and_its_k_paragraphs(first_run):
    lines = [json.loads(line) for line in first_run[1].read_text().splitlines()]
    contexts = {p[0] for p in PARAGRAPHS}
    assert len(lines) == 3 and len({line["id"] for line in lines}) == 3
    assert all(len(line["passages"]) == 2 and set(line["passages"]) <= contexts for line in lines)


def test_a_rerun_answers_nothing_again_and_scores_the_same(first_run, workspace):
    results, _ = first_run
    predictions = results.parent / "predictions"
    before = {p.name: p.read_text() for p in predictions.iterdir()}
    assert len(before) == 6
    results.write_text(results.read_text() + '{"method": "rag-cut sh')  # a row cut short by a kill
    assert RAG.main(_args(workspace, results)) == 0
    assert {p.name: p.read_text() for p in predictions.iterdir()} == before
    rows = _rows(results)  # the cut line is gone, and each row is on a line of its own
    assert [(r["method"], r["f1"]) for r in rows[6:]] == [(r["method"], r["f1"]) for r in rows[:6]]


def test_a_store_filled_by_another_compressor_is_refused(first_run, workspace, tmp_path):
    model, tokenizer = make_tiny_llama()
    torch.manual_seed(3)  # another LoRA initialisation: another compressor of the same base model
    SACCompressor(SACConfig(base_model=str(workspace / "tiny-model"), ratio=2, chunk_len=64, lora_rank=4),
                  model=model, tokenizer=tokenizer).save_pretrained(tmp_path / "other")
    with pytest.raises(SACError, match="the anchor store at .* was built for"):
        RAG.main(_args(workspace, tmp_path / "rag.jsonl", "--compressor", str(tmp_path / "other")))
    assert not (tmp_path / "rag.jsonl").exists()


def test_beam_search_rows_are_named_apart_and_answer_with_the_beams(workspace, tmp_path, monkeypatch):
    searched = []
    search = RAG.Generator._search
    monkeypatch.setattr(RAG.Generator, "_search", lambda self, state, config, plain: (
        searched.append((config.num_beams, config.mbr)), search(self, state, config, plain))[1])
    results = tmp_path / "rag.jsonl"
    assert RAG.main(_args(workspace, results, "--methods", "sac,full_ft,kv_dropping", "--num-beams", "2",
                          "--mbr")) == 0
    rows = _rows(results)
    assert [r["method"] for r in rows] == ["rag-sac-2x-beam2-mbr", "rag-full-ft-beam2-mbr",
                                           "rag-kv-dropping-2x-beam2-mbr"]
    assert all(r["num_beams"] == 2 and r["mbr"] for r in rows)
    assert set(searched) == {(2, True)} and len(searched) >= 3 * 3  # every method's every question
    assert all(r["answer_s"] > 0 for r in rows[:2])  # whole answers, one question at a time, were timed


@pytest.mark.parametrize("option", [["--timing-samples", "0"], ["--k", "0"], ["--batch-size", "0"], ["--n", "-1"],
                                    ["--methods", "sac,magic"], ["--mbr"], ["--num-beams", "0"],
                                    ["--extractive", "--num-beams", "4"]])
def test_options_out_of_range_are_refused_by_the_parser(workspace, tmp_path, option):
    with pytest.raises(SystemExit) as exit_:
        RAG.main(_args(workspace, tmp_path / "rag.jsonl", *option))
    assert exit_.value.code == 2 and not (tmp_path / "rag.jsonl").exists()


@pytest.mark.parametrize(("change", "message"), [
    (["--data-root", "nowhere"], "does not exist: set --data-root"),
    (["--full-ft-adapter", "nowhere"], "--full-ft-adapter nowhere is not a folder"),
    (["--results", "<tmp>"], "is a folder"),
    (["--full-ft-adapter", "<ws>/compressor"], "compressor holds no adapter_config.json: it is a compressor"),
    (["--export-retrieval", "<tmp>"], "--export-retrieval .* is a folder: name a .jsonl file"),
])
def test_bad_paths_are_refused_before_any_model_loads(workspace, tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(RAG.SACCompressor, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    change = [c.replace("<tmp>", str(tmp_path)).replace("<ws>", str(workspace)) for c in change]
    with pytest.raises(SACError, match=message):
        RAG.main(_args(workspace, tmp_path / "rag.jsonl", *change))


def test_a_full_ft_adapter_of_another_base_model_is_refused(workspace, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(SACError, match="does not fit the base model"):
        RAG.main(_args(workspace, tmp_path / "rag.jsonl", "--methods", "full_ft",
                       "--full-ft-adapter", str(tmp_path / "other")))
    assert not (tmp_path / "rag.jsonl").exists()


def test_a_missing_data_file_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--results",
                           str(tmp_path / "rag.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist: set --data-root" in done.stderr and "Traceback" not in done.stderr


def test_every_row_s_kv_bytes_are_all_it_read_text_and_cached_alike(first_run):
    """K/V per query = (text tokens + cached entries) x one position's K/V bytes (4 layers x 2 heads x 16
    dims x K and V x 4 bytes), for the chain rows and the sac_rag.eval rows alike: a row that left out
    its cached entries (or its text) would look cheaper than its peers."""
    for row in _rows(first_run[0]):
        entries = row["text_tokens_per_query"] + row["cached_entries_per_query"]
        assert row["kv_bytes_per_query"] == pytest.approx(entries * 4 * 2 * 16 * 2 * 4), row["method"]
    rows = {r["method"]: r for r in _rows(first_run[0])}
    assert rows["rag-sac-2x"]["text_tokens_per_query"] < rows["rag-full-text"]["text_tokens_per_query"]


def test_the_truncation_row_reads_documents_cut_to_its_ratio(first_run):
    rows = {r["method"]: r for r in _rows(first_run[0])}
    truncated, full = rows["rag-text-truncate-2x+fullft-decoder"], rows["rag-full-ft"]
    assert truncated["text_tokens_per_query"] < full["text_tokens_per_query"]  # not the whole documents


def test_another_compressor_s_run_answers_again_instead_of_reusing_the_predictions(first_run, workspace, tmp_path):
    """The sac row's predictions are cached per compressor: another one (same base model, same ratio)
    answering into the same results folder must not be scored on the first one's answers."""
    import shutil

    shutil.copytree(first_run[0].parent, tmp_path / "results")
    results = tmp_path / "results" / first_run[0].name
    model, tokenizer = make_tiny_llama()
    torch.manual_seed(3)
    SACCompressor(SACConfig(base_model=str(workspace / "tiny-model"), ratio=2, chunk_len=64, lora_rank=4),
                  model=model, tokenizer=tokenizer).save_pretrained(tmp_path / "other")
    args = _args(workspace, results, "--methods", "sac", "--compressor", str(tmp_path / "other"))
    args[args.index("--store") + 1] = str(tmp_path / "store")
    assert RAG.main(args) == 0
    sac_files = sorted(p.name for p in (tmp_path / "results" / "predictions").iterdir() if p.name.startswith("rag-sac"))
    assert len(sac_files) == 2, sac_files


def test_the_kv_dropping_rows_time_from_the_question_retrieval_included(workspace, tmp_path):
    from dataclasses import replace

    questions = [replace(_question(i, c), passages=(c,)) for i, (c, _, _) in enumerate(PARAGRAPHS[:2])]
    args = SimpleNamespace(full_ft_adapter=str(workspace / "adapter"), dtype="float32", extractive=False, num_beams=1,
                           mbr=False, results=str(tmp_path / "rag.jsonl"), k=1, seed=0, batch_size=2,
                           max_new_tokens=2, timing_samples=1)
    row = RAG.eval_method_row("kv_dropping", questions, str(workspace / "tiny-model"), 2, args,
                              {"retrieval_s": 100.0})
    assert row["ttft_s"] >= 100.0  # the chain rows time retrieval too
