"""python -m sac_rag.eval on a tiny model: every method runs, rows are written, runs resume."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny_llama, save_tiny_compressor, write_squad_dev

from sac_rag import FingerprintMismatchError, InvalidInputError
from sac_rag.eval import Question, answer_config, main, read_predictions, run


@pytest.fixture
def workspace(tmp_path):
    write_squad_dev(tmp_path, [
        {"context": f"Paris is the capital of France. Fact {i}.",
         "qas": [{"id": f"q{i}", "question": "What is the capital?", "answers": [{"text": "Paris"}]}]}
        for i in range(6)])
    save_tiny_compressor(tmp_path)
    return tmp_path


def _run(ws, *args):
    common = ["--base-model", str(ws / "tiny-model"), "--data-root", str(ws / "data"), "--n", "4",
              "--max-new-tokens", "4", "--timing-samples", "2", "--results", str(ws / "results" / "q.jsonl"),
              "--dtype", "float32"]
    assert main([*common, *args]) == 0  # a test's own options override the common ones
    rows = [json.loads(line) for line in (ws / "results" / "q.jsonl").read_text().splitlines()]
    return rows[-1]


@pytest.mark.parametrize("method", ["no_context", "full_context", "kv_dropping", "text_every_rth", "text_truncate"])
def test_each_method_writes_a_scored_row_with_costs(workspace, method):
    row = _run(workspace, "--method", method)
    assert row["method"] == method and row["n"] == 4 and row["dataset"] == "squad-dev"
    for key in ("f1", "em", "paper_f1", "paper_em", "f1_ci", "ttft_s", "kv_bytes_per_query", "command"):
        assert key in row
    assert row["costs_timed_with"] == "greedy decoding"  # whatever the row's decoding: said, not implied


def test_compressed_methods_hold_fewer_kv_bytes_than_full_context(workspace):
    full = _run(workspace, "--method", "full_context")
    dropped = _run(workspace, "--method", "kv_dropping", "--ratio", "2")
    sac = _run(workspace, "--method", "sac", "--checkpoint", str(workspace / "compressor"), "--label", "sac-2x")
    assert dropped["kv_bytes_per_query"] < full["kv_bytes_per_query"]
    assert sac["ratio"] == 2 and sac["compress_s_per_chunk"] is not None


def test_a_compressor_is_evaluated_at_its_own_ratio_unless_another_is_given(workspace):
    ckpt = str(workspace / "compressor")  # trained at ratio 2
    own = _run(workspace, "--method", "sac", "--checkpoint", ckpt)
    at_1 = _run(workspace, "--method", "sac", "--checkpoint", ckpt, "--ratio", "1")
    assert (own["ratio"], at_1["ratio"]) == (2, 1)
    assert at_1["kv_bytes_per_query"] > own["kv_bytes_per_query"]  # every token kept
    caches = sorted(p.name for p in (workspace / "results" / "predictions").glob("sac-*.jsonl"))
    assert len(caches) == 2  # another ratio is another compressor: its predictions are not reused


def test_a_compressor_can_be_read_with_anchors_placed_by_another_strategy(workspace):
    ckpt = str(workspace / "compressor")  # trained with uniform anchors
    own = _run(workspace, "--method", "sac", "--checkpoint", ckpt)
    moved = _run(workspace, "--method", "sac", "--checkpoint", ckpt, "--anchor-strategy", "rarest_in_block")
    assert (own["anchor_strategy"], moved["anchor_strategy"]) == ("uniform", "rarest_in_block")
    assert moved["compressor_fingerprint"] != own["compressor_fingerprint"]  # its predictions are cached apart
    with pytest.raises(SystemExit):
        _run(workspace, "--method", "full_context", "--anchor-strategy", "rarest_in_block")


def test_a_compressor_can_be_read_with_its_chunks_refined(workspace):
    """--refine-steps refines each compressed chunk (sac_rag.refine): the row says so in its label and
    fields, and its predictions are cached apart (another fingerprint)."""
    ckpt = str(workspace / "compressor")
    own = _run(workspace, "--method", "sac", "--checkpoint", ckpt, "--label", "sac")
    refined = _run(workspace, "--method", "sac", "--checkpoint", ckpt, "--label", "sac", "--refine-steps", "2",
                   "--refine-lr", "0.05")
    assert (refined["method"], refined["refine_steps"], refined["refine_lr"]) == ("sac-refine2", 2, 0.05)
    assert "refine_steps" not in own and refined["compressor_fingerprint"] != own["compressor_fingerprint"]
    (cache,) = (workspace / "results" / "predictions").glob("sac-refine2-*.jsonl")
    assert json.loads(cache.read_text().splitlines()[0])["settings"]["method"] == "sac"
    for bad in (["--method", "full_context", "--refine-steps", "2"],
                ["--method", "sac", "--checkpoint", ckpt, "--refine-steps", "2", "--refine-lr", "0"],
                ["--method", "sac", "--checkpoint", ckpt, "--refine-lr", "0.05"]):  # a rate without steps
        with pytest.raises(SystemExit):
            _run(workspace, *bad)


def test_a_rerun_reuses_cached_predictions(workspace):
    first = _run(workspace, "--method", "full_context")
    cache = next((workspace / "results" / "predictions").glob("full_context-*.jsonl"))
    lines = cache.read_text().splitlines()
    second = _run(workspace, "--method", "full_context")
    assert cache.read_text().splitlines() == lines and second["f1"] == first["f1"]
    assert second["newly_answered"] == 0


def test_a_prediction_file_records_its_settings_first_and_an_interrupted_run_resumes(workspace):
    _run(workspace, "--method", "text_every_rth", "--ratio", "2")
    cache = next((workspace / "results" / "predictions").glob("text_every_rth-*.jsonl"))
    header, *predictions = cache.read_text().splitlines()
    settings = json.loads(header)["settings"]
    assert (settings["method"], settings["ratio"], settings["max_new_tokens"]) == ("text_every_rth", 2, 4)
    assert len(predictions) == 4 and set(read_predictions(cache)) == {json.loads(p)["id"] for p in predictions}
    cache.write_text("\n".join([header, *predictions[:3]]) + "\n")  # interrupted before the last answer
    resumed = _run(workspace, "--method", "text_every_rth", "--ratio", "2")
    assert resumed["newly_answered"] == 1 and cache.read_text().splitlines()[:4] == [header, *predictions[:3]]


@pytest.mark.parametrize(("option", "first", "then"), [("--ratio", "2", "3"), ("--max-new-tokens", "4", "5")])
def test_predictions_made_with_another_setting_under_the_same_label_are_refused(workspace, option, first, then):
    _run(workspace, "--method", "text_every_rth", "--label", "shortened", option, first)
    cache = next((workspace / "results" / "predictions").glob("shortened-*.jsonl"))
    before = cache.read_text()
    setting = option[2:].replace("-", "_")
    with pytest.raises(InvalidInputError, match=f"made with {setting}={first}, but this run has {setting}={then}: "
                                                "give this run another --label, or delete that file"):
        _run(workspace, "--method", "text_every_rth", "--label", "shortened", option, then)
    assert cache.read_text() == before
    assert _run(workspace, "--method", "text_every_rth", "--label", "shortened-again", option, then)["n"] == 4


def test_an_adapter_retrained_in_place_does_not_reuse_its_predictions(workspace):
    from peft import LoraConfig, get_peft_model

    def train_adapter(seed):
        import torch

        model, _ = make_tiny_llama()
        torch.manual_seed(seed)  # another initialisation stands in for another training run
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(workspace / "adapter")

    train_adapter(0)
    _run(workspace, "--method", "full_ft", "--checkpoint", str(workspace / "adapter"))
    train_adapter(1)
    with pytest.raises(InvalidInputError, match="adapter="):
        _run(workspace, "--method", "full_ft", "--checkpoint", str(workspace / "adapter"))


def test_a_prediction_file_without_settings_is_still_read_and_resumed(workspace):
    # files written before settings were recorded: their predictions are reused as they are
    first = _run(workspace, "--method", "full_context")
    cache = next((workspace / "results" / "predictions").glob("full_context-*.jsonl"))
    legacy = cache.read_text().splitlines()[1:]
    cache.write_text("\n".join(legacy) + "\n")
    again = _run(workspace, "--method", "full_context", "--max-new-tokens", "5")
    assert (again["newly_answered"], again["f1"]) == (0, first["f1"])
    assert cache.read_text().splitlines() == legacy  # no header is added to it


def test_predictions_computed_in_another_dtype_are_cached_apart(workspace):
    # bfloat16 is the committed rows' dtype (untagged caches); float32 answers never join them
    wide = _run(workspace, "--method", "full_context")
    half = _run(workspace, "--method", "full_context", "--dtype", "bfloat16")
    caches = sorted(p.name.split("-squad")[0] for p in (workspace / "results" / "predictions").glob("*.jsonl"))
    assert caches == ["full_context", "full_context-float32"]
    assert (wide["dtype"], half["dtype"]) == ("float32", "bfloat16")
    auto = _run(workspace, "--method", "full_context", "--dtype", "auto")  # recorded as what it resolved to
    assert auto["dtype"] in ("float32", "bfloat16")


def test_question_subsets_are_seeded_and_nested(workspace):
    from sac_rag.eval import load_questions

    path = workspace / "data" / "squad-v1.1" / "dev-v1.1.json.xz"
    small, large = load_questions(path, 2, seed=3), load_questions(path, 5, seed=3)
    assert [q.id for q in small] == [q.id for q in large[:2]]
    assert [q.id for q in load_questions(path, 5, seed=4)] != [q.id for q in large]


def test_a_subset_can_skip_the_questions_a_headline_subset_reads(workspace):
    from sac_rag import InvalidInputError
    from sac_rag.eval import load_questions

    path = workspace / "data" / "squad-v1.1" / "dev-v1.1.json.xz"
    headline, after = load_questions(path, 4, seed=0), load_questions(path, 2, seed=0, skip=4)
    assert [q.id for q in after] == [q.id for q in load_questions(path, 6, seed=0)[4:]]
    assert not {q.id for q in after} & {q.id for q in headline}
    with pytest.raises(InvalidInputError, match="skip=6: .* has 6 questions"):
        load_questions(path, 2, seed=0, skip=6)

    row = _run(workspace, "--method", "no_context", "--skip", "4", "--n", "2")
    assert (row["skip"], row["n"]) == (4, 2)
    caches = sorted(p.name for p in (workspace / "results" / "predictions").iterdir())
    assert caches == ["no_context-float32-squad-dev-n2-s0-k4.jsonl"]  # never mixed with the first questions'


def test_a_length_penalty_is_a_beam_search_setting_of_its_own_row(workspace):
    row = _run(workspace, "--method", "full_context", "--num-beams", "2", "--length-penalty", "0")
    assert (row["method"], row["num_beams"], row["length_penalty"]) == ("full_context-beam2-lp0", 2, 0.0)
    with pytest.raises(SystemExit):  # greedy decoding has no length penalty
        _run(workspace, "--method", "full_context", "--length-penalty", "0")


def test_minimum_bayes_risk_is_a_beam_search_setting_of_its_own_row(workspace):
    row = _run(workspace, "--method", "full_context", "--num-beams", "2", "--mbr")
    assert (row["method"], row["num_beams"], row["mbr"]) == ("full_context-beam2-mbr", 2, True)
    with pytest.raises(SystemExit):  # greedy decoding has one answer to choose from
        _run(workspace, "--method", "full_context", "--mbr")


def test_sampled_evidence_for_minimum_bayes_risk_is_a_setting_of_its_own_row(workspace):
    row = _run(workspace, "--method", "full_context", "--num-beams", "2", "--mbr", "--mbr-samples", "3")
    assert (row["method"], row["mbr"], row["mbr_samples"]) == ("full_context-beam2-mbr-samples3", True, 3)
    with pytest.raises(SystemExit):  # samples are evidence for minimum Bayes risk only
        _run(workspace, "--method", "full_context", "--num-beams", "2", "--mbr-samples", "3")
    with pytest.raises(SystemExit):  # one sample is no expectation
        _run(workspace, "--method", "full_context", "--num-beams", "2", "--mbr", "--mbr-samples", "1")


def test_comparing_runs_needs_every_question_answered(workspace):
    from sac_rag import InvalidInputError
    from sac_rag.eval import load_questions, predictions_for

    _run(workspace, "--method", "no_context")  # answers the first 4 of the seeded order
    cache = next((workspace / "results" / "predictions").glob("no_context-*.jsonl"))
    path = workspace / "data" / "squad-v1.1" / "dev-v1.1.json.xz"
    assert len(predictions_for(cache, load_questions(path, 4, seed=0))) == 4
    with pytest.raises(InvalidInputError, match="lacks 2 of the 6 questions"):
        predictions_for(cache, load_questions(path, 6, seed=0))
    with pytest.raises(InvalidInputError, match="none for these 2 questions .* another dataset, seed or --skip"):
        predictions_for(cache, load_questions(path, 2, seed=0, skip=4))  # other questions: not an unfinished run


def test_text_compression_keeps_one_token_in_r():
    from sac_rag.eval import TextShortener

    _, tokenizer = make_tiny_llama()
    text = "one two three four five six seven eight nine ten eleven"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    every = tokenizer(TextShortener(tokenizer, 5, "text_every_rth")(text), add_special_tokens=False)["input_ids"]
    first = TextShortener(tokenizer, 5, "text_truncate")(text)
    assert every == ids[::5]
    assert first == tokenizer.decode(ids[: -(-len(ids) // 5)])


def test_8bit_storage_and_an_adapted_decoder_are_separate_rows(workspace):
    from peft import LoraConfig, get_peft_model

    model, _ = make_tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(workspace / "adapter")
    native = _run(workspace, "--method", "kv_dropping", "--ratio", "2")
    fp8 = _run(workspace, "--method", "kv_dropping", "--ratio", "2", "--storage", "fp8")
    adapter = str(workspace / "adapter")
    adapted = _run(workspace, "--method", "kv_dropping", "--ratio", "2", "--decoder-adapter", adapter)
    assert (native["method"], fp8["method"], adapted["method"]) == (
        "kv_dropping", "kv_dropping-fp8", "kv_dropping-adapted-decoder")
    assert fp8["storage"] == "fp8" and adapted["decoder_adapter"] == adapter
    # one prediction cache each, named by the row and by the compressor's fingerprint
    made_by = native["compressor_fingerprint"].rsplit("-", 1)[-1][:8]
    caches = {p.name.split("-squad")[0] for p in (workspace / "results" / "predictions").glob("*.jsonl")}
    assert caches == {f"kv_dropping-{made_by}-float32", f"kv_dropping-fp8-{made_by}-float32",
                      f"kv_dropping-adapted-decoder-{made_by}-float32"}
    with pytest.raises(SystemExit):
        _run(workspace, "--method", "full_context", "--storage", "int8")


def test_a_merged_decoder_is_a_row_of_its_own_with_the_same_answers(workspace):
    from peft import LoraConfig, get_peft_model

    model, _ = make_tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(workspace / "adapter")
    adapter = ["--method", "full_ft", "--checkpoint", str(workspace / "adapter")]
    live, merged = _run(workspace, *adapter), _run(workspace, *adapter, "--merge-decoder")
    assert (live["method"], merged["method"], merged["merge_decoder"]) == ("full_ft", "full_ft-merged", True)
    predictions = {p.name.split("-float32")[0]: read_predictions(p)
                   for p in (workspace / "results" / "predictions").glob("*.jsonl")}
    assert predictions["full_ft-merged"] == predictions["full_ft"]
    sac = _run(workspace, "--method", "sac", "--checkpoint", str(workspace / "compressor"), "--merge-decoder")
    assert sac["method"] == "sac-merged" and sac["n"] == 4


@pytest.mark.parametrize("name", ["full_context", "text_truncate", "kv_dropping"])
def test_questions_with_passages_read_each_passage_in_order(workspace, name):
    """The RAG setting: a question reads its retrieved passages (each compressed or shortened
    on its own) in place of the gold paragraph, in the prompt layout of several contexts."""
    from sac_rag.eval import Question, build_method

    method = build_method(name, str(workspace / "tiny-model"), 2, None, "cpu", "float32")
    passages = ("The Nile flows north through Egypt.", "Mont Blanc is in the Alps.", "Mars is red.")
    gold = Question("q", "Where does the Nile flow?", ["north"], "The unused gold paragraph.")
    (prompt,) = method.prompts([replace(gold, passages=passages)])
    if method.compressor is None:
        read = [method.shorten(p) if method.shorten else p for p in passages]
    else:
        read = [method.compressor.compress(p) for p in passages]
    expected = method.template.build(read, gold.question)

    def _describe(segments):
        return [s if isinstance(s, str) else (s.n_tokens, round(s.keys.sum().item(), 3)) for s in segments]

    assert _describe(prompt) == _describe(expected)
    assert "unused gold" not in "".join(s for s in prompt if isinstance(s, str))


def test_context_aware_decoding_is_a_setting_of_its_own_row_contrasted_with_the_question_alone(workspace):
    from sac_rag.eval import Question, build_method

    row = _run(workspace, "--method", "full_context", "--context-contrast", "0.5")
    assert (row["method"], row["context_contrast"], row["contrast_plausibility"]) == ("full_context-cad0.5", 0.5, 0.1)
    row = _run(workspace, "--method", "full_context", "--context-contrast", "0.5", "--contrast-plausibility", "0")
    assert row["method"] == "full_context-cad0.5-plausible0"
    model = str(workspace / "tiny-model")
    method = build_method("full_context", model, None, None, "cpu", "float32")
    question = Question(id="q", question="Who built it?", answers=["Eiffel"], context="It was built by Eiffel.")
    no_context = build_method("no_context", model, None, None, "cpu", "float32")
    assert method.contrast_prompts([question]) == no_context.prompts([question])  # the question alone


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "sac"], "--method sac needs --checkpoint: a compressor directory or a built-in"),
    (["--method", "full_ft"], "--method full_ft needs --checkpoint: the Full-FT decoder adapter"),
    (["--method", "full_context", "--checkpoint", "x"], "--checkpoint applies to --method sac and full_ft"),
    (["--method", "full_ft", "--checkpoint", "x", "--decoder-adapter", "y"], "--decoder-adapter does not apply"),
    (["--method", "text_every_rth", "--ratio", "0"], "argument --ratio: must be >= 1, got 0"),
    (["--method", "full_context", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--method", "full_context", "--skip", "-1"], "argument --skip: must be >= 0, got -1"),
    (["--method", "full_context", "--max-new-tokens", "many"], "argument --max-new-tokens: expected a whole number"),
    (["--method", "full_context", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--method", "full_context", "--n", "-3"], "argument --n: must be >= 0, got -3"),  # was: every question
    (["--method", "full_context", "--ratio", "3"], "--ratio does not apply to --method full_context"),
    # options that would change nothing but the row's name or its prediction file's settings
    (["--method", "full_context", "--merge-decoder"], "--merge-decoder applies to a decoder adapter"),
    (["--method", "kv_dropping", "--merge-decoder"], "--merge-decoder applies to a decoder adapter"),
    (["--method", "full_context", "--contrast-plausibility", "0"], "--contrast-plausibility applies to context-aware"),
    (["--method", "no_context", "--context-contrast", "0.5"], "--context-contrast does not apply to --method no_c"),
])
def test_command_line_mistakes_are_named_before_any_model_loads(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main([*args, "--base-model", "no-such-model"])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("option", "given", "message"), [
    ("--checkpoint", "compressor", "holds no adapter_config.json: it is a compressor, not a decoder"),
    ("--checkpoint", "smollm2-135m-sac-5x", "is a built-in compressor, not a decoder adapter"),
    ("--checkpoint", "nowhere/run/final", "does not exist"),
    ("--checkpoint", "runs", "is a training run's folder: pass its final/"),
    ("--decoder-adapter", "compressor", "holds no adapter_config.json: it is a compressor, not a decoder"),
    ("--checkpoint", "refined", "holds no adapter_config.json: it is a compressor, not a decoder"),
])
def test_a_decoder_adapter_that_is_none_is_named_before_any_model_loads(workspace, capsys, option, given, message):
    (workspace / "runs" / "final").mkdir(parents=True)  # a Full-FT training run: its adapter is in final/
    (workspace / "runs" / "final" / "adapter_config.json").write_text("{}")
    meta = json.loads((workspace / "compressor" / "config.json").read_text())
    (workspace / "refined").mkdir()  # a compressor's variant in settings: its config.json alone
    (workspace / "refined" / "config.json").write_text(json.dumps({**meta, "weights_from": "compressor"}))
    path = given if given.startswith("smollm2") else str(workspace / given)
    method = ["--method", "full_ft"] if option == "--checkpoint" else ["--method", "full_context"]
    with pytest.raises(SystemExit) as exit:
        main([*method, option, path, "--base-model", "no-such-model", "--data-root", str(workspace / "data")])
    assert exit.value.code == 2 and f"{option} {path} {message}" in capsys.readouterr().err


def test_a_decoder_adapter_that_cannot_be_found_is_an_error_naming_it(workspace):
    # a name that may be a hub id is looked up, and its absence named (offline here), not a traceback
    with pytest.raises(InvalidInputError, match="no-such-adapter: no peft LoRA adapter"):
        _run(workspace, "--method", "full_ft", "--checkpoint", "no-such-adapter")


def test_a_missing_data_root_is_one_line_naming_the_option(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sac_rag.eval", "--method", "full_context",
                           "--data-root", str(tmp_path / "nowhere"), "--base-model", "no-such-model"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "squad-v1.1/dev-v1.1.json.xz does not exist: set --data-root to the folder that holds" in done.stderr


def test_a_prediction_cut_short_by_a_kill_is_answered_again(workspace):
    _run(workspace, "--method", "full_context")
    cache = next((workspace / "results" / "predictions").glob("full_context-*.jsonl"))
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-1]) + lines[-1][:15])  # killed in the middle of the last line
    assert len(read_predictions(cache)) == 3
    resumed = _run(workspace, "--method", "full_context")
    assert resumed["newly_answered"] == 1
    kept = cache.read_text().splitlines(keepends=True)
    assert kept[:-1] == lines[:-1] and json.loads(kept[-1]) == json.loads(lines[-1])  # the cut line is replaced


def test_a_file_that_is_not_a_prediction_file_is_named_not_a_traceback(workspace):
    from sac_rag.eval import load_questions, predictions_for

    _run(workspace, "--method", "no_context")
    results = workspace / "results" / "q.jsonl"  # a results file given where predictions belong
    with pytest.raises(InvalidInputError, match=r"q.jsonl:1 is not a cached prediction"):
        read_predictions(results)
    questions = load_questions(workspace / "data" / "squad-v1.1" / "dev-v1.1.json.xz", 2, seed=0)
    with pytest.raises(InvalidInputError, match="nowhere.jsonl is not a file"):
        predictions_for(workspace / "nowhere.jsonl", questions)


def test_a_header_cut_short_is_rewritten_and_a_cache_created_meanwhile_is_never_overwritten(tmp_path, monkeypatch):
    from pathlib import Path

    from sac_rag.eval import claim_predictions

    cache = tmp_path / "p.jsonl"
    cache.write_text('{"settings": {"ratio"')  # killed while writing the header
    claim_predictions(cache, {"ratio": 2})
    assert cache.read_text() == '{"settings": {"ratio": 2}}\n'
    # another run creates the file between this run's check and its write: its header stays
    monkeypatch.setattr(Path, "exists", lambda self: False)
    with pytest.raises(InvalidInputError, match="made with ratio=2, but this run has ratio=3"):
        claim_predictions(cache, {"ratio": 3})
    assert cache.read_text() == '{"settings": {"ratio": 2}}\n'


@pytest.mark.parametrize("kind", ["folder", "not jsonl", "read-only", "predictions"])
def test_a_results_file_a_row_cannot_be_appended_to_is_refused_before_any_model_loads(tmp_path, monkeypatch,
                                                                                    kind):
    import os

    results = tmp_path / "q.jsonl"
    if kind == "folder":
        results.mkdir()
    else:
        results.write_text({"not jsonl": "# Benchmark results\n",
                            "predictions": '{"settings": {"ratio": 2}}\n{"id": "q1", "prediction": "Paris"}\n'}.get(
                                kind, '{"method": "x"}\n'))
    if kind == "read-only":
        results.chmod(0o444)  # root may still write it: the check asks the OS, as for any user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == results else real_access(p, mode))
    message = {"folder": "is a folder", "not jsonl": "is not a JSON-lines file", "read-only": "is not writable",
               "predictions": "is a file of cached predictions"}
    with pytest.raises(InvalidInputError, match=f"--results .*q.jsonl {message[kind]}"):
        main(["--method", "full_context", "--base-model", "no-such-model", "--results", str(results)])


def test_a_row_cut_short_by_a_kill_is_dropped_before_the_next_row_is_appended(workspace):
    results = workspace / "results" / "q.jsonl"
    results.parent.mkdir()
    results.write_text('{"method": "a", "n": 1}\n{"method": "b", "da')  # an append killed mid-row
    assert _run(workspace, "--method", "no_context")["method"] == "no_context"
    lines = results.read_text().splitlines()
    assert lines[0] == '{"method": "a", "n": 1}' and len(lines) == 2  # every line a row, as the next run checks


def test_a_decoder_adapter_of_another_base_model_is_refused_naming_it(workspace):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sac_rag import FingerprintMismatchError

    _, tokenizer = make_tiny_llama()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(other, lora).save_pretrained(workspace / "other-adapter")
    with pytest.raises(InvalidInputError, match="other-adapter does not fit the base model .*size mismatch"):
        _run(workspace, "--method", "full_ft", "--checkpoint", str(workspace / "other-adapter"))
    # one of another architecture names modules this model lacks (peft's ValueError): it does not fit either
    (workspace / "gpt2-adapter").mkdir()
    config = json.loads((workspace / "other-adapter" / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (workspace / "gpt2-adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="gpt2-adapter does not fit the base model .*c_attn"):
        _run(workspace, "--method", "full_ft", "--checkpoint", str(workspace / "gpt2-adapter"))
    # a Full-FT checkpoint records its base model: same shapes, other weights, refused all the same
    model, _ = make_tiny_llama(seed=1)
    get_peft_model(model, lora).save_pretrained(workspace / "full-ft")
    meta = {"base_model": "tiny-1", "base_fingerprint": "tiny-llama-1@0123456789abcdef"}
    (workspace / "full-ft" / "sac_full_ft.json").write_text(json.dumps(meta))
    with pytest.raises(FingerprintMismatchError, match="tiny-llama-1@0123456789abcdef"):
        _run(workspace, "--method", "full_ft", "--checkpoint", str(workspace / "full-ft"))


def test_sac_decodes_with_its_checkpoints_base_model_or_with_base_model_where_that_moved(workspace):
    """--base-model loads a compressor on a model elsewhere (as precompress and SAC.from_pretrained
    do): the same weights moved are read, the row naming where they are now; other weights are
    refused naming both fingerprints, never evaluated on the checkpoint's own model instead."""
    (workspace / "tiny-model").rename(workspace / "moved-model")
    row = _run(workspace, "--method", "sac", "--checkpoint", str(workspace / "compressor"),
               "--base-model", str(workspace / "moved-model"))
    assert row["base_model"] == str(workspace / "moved-model") and row["n"] == 4
    model, tokenizer = make_tiny_llama(seed=1)
    model.save_pretrained(workspace / "other-model")
    tokenizer.save_pretrained(workspace / "other-model")
    refusal = r"built for 'tiny-llama-0@[0-9a-f]+'.*in use is '.*other-model@[0-9a-f]+'"
    with pytest.raises(FingerprintMismatchError, match=refusal):
        _run(workspace, "--method", "sac", "--checkpoint", str(workspace / "compressor"),
             "--base-model", str(workspace / "other-model"))


def test_data_without_an_answered_question_is_refused(tmp_path):
    from sac_rag.eval import load_questions

    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]}))
    with pytest.raises(InvalidInputError, match="holds no question with an answer"):
        load_questions(path, 0, seed=0)


def test_a_results_file_cut_by_a_kill_takes_new_rows_and_stays_a_file_of_rows(tmp_path):
    from sac_rag.eval import check_results_file
    from sac_rag.files import append_jsonl

    path = tmp_path / "q.jsonl"
    path.write_text('{"method": "a", "f1": 1.0}\n{"method": "b", "f1"')  # the second row cut by a kill
    for method in ("c", "d"):  # each run checks the file first, then appends its row
        check_results_file(path)
        append_jsonl(path, [{"method": method, "f1": 2.0}])
    assert [json.loads(line)["method"] for line in path.read_text().splitlines()] == ["a", "c", "d"]


def test_the_training_held_out_dataset_reads_only_articles_training_never_sees(tmp_path):
    # squad-train-heldout: the articles `python -m sac_rag.train` holds out of SQuAD train by
    # default, so a compressor trained on that file is read on questions it never trained on
    import lzma

    from sac_rag.data import read_qa, split_by_title
    from sac_rag.eval import dataset_questions
    from sac_rag.train import TrainConfig

    articles = [{"title": f"article {a}", "paragraphs": [
        {"context": f"Article {a}, paragraph {p}: the answer is {a}{p}.",
         "qas": [{"id": f"a{a}p{p}q{q}", "question": f"Question {q}?", "answers": [{"text": f"{a}{p}"}]}
                 for q in range(2)]} for p in range(3)]} for a in range(40)]
    path = tmp_path / "squad-v1.1" / "train-v1.1.json.xz"
    path.parent.mkdir()
    with lzma.open(path, "wt") as f:
        json.dump({"data": articles}, f)

    held_out = dataset_questions(tmp_path, "squad-train-heldout", 0, seed=0)
    trained, held = split_by_title(read_qa(path), TrainConfig().held_out_fraction)
    assert {q.id for q in held_out} == {qa.id for p in held for qa in p.questions}
    assert len(held_out) == 2 * 3 * 2  # the last 2 of 40 articles (5%), all of their questions
    assert not {q.id for q in held_out} & {qa.id for p in trained for qa in p.questions}
    assert [q.id for q in dataset_questions(tmp_path, "squad-train-heldout", 4, seed=0, skip=2)] == \
        [q.id for q in held_out[2:6]]  # seeded and nested as every dataset


def test_decode_speed_is_timed_over_the_same_steps_whatever_the_answers_length(workspace):
    """An answer that ends at once would leave decode speed to the noise of two prefills: the
    timed answer runs on past its end token (and the generator ends answers as before after)."""
    from sac_rag import GenerationConfig
    from sac_rag.eval import Question, build_method, measure_costs

    method = build_method("full_context", str(workspace / "tiny-model"), None, None, "cpu", "float32")
    generator = method.generator
    generator.eos_token_ids = set(range(generator.model.config.vocab_size))  # every token ends an answer
    lengths = []
    generate = generator.generate

    def counted(prompt, config):
        result = generate(prompt, config)
        lengths.append(len(result.token_ids))
        return result

    generator.generate = counted
    question = Question(id="q", question="Who built it?", answers=["Eiffel"], context="It was built by Eiffel.")
    costs = measure_costs(method, [question], samples=1, new_tokens=6)
    assert lengths == [0, 6] and costs["decode_tokens_per_s"] > 0  # the first token ends the untimed answer
    assert generator.generate(method.prompts([question])[0], GenerationConfig(max_new_tokens=6)).token_ids == []


def test_each_answer_is_cached_and_scored_as_its_own_questions_and_extracted_from_its_passages(tmp_path):
    """Within a batch, answer i belongs to question i, and extractive decoding quotes the passages
    a question reads, not its gold paragraph."""
    questions = [Question(f"q{i}", f"Question {i}?", [f"answer {i}"], f"gold paragraph {i}",
                          passages=(f"passage {i}a", f"passage {i}b")) for i in range(5)]
    seen_sources = []

    def generate_batch(prompts, config, sources=None, contrast=None):
        seen_sources.extend(sources or [])
        return [SimpleNamespace(text=f" answer {p[1:]}\n") for p in prompts]

    method = SimpleNamespace(name="fake", generator=SimpleNamespace(generate_batch=generate_batch),
                             prompts=lambda batch: [q.id for q in batch],
                             contrast_prompts=lambda batch: [q.id for q in batch])
    cache = tmp_path / "predictions.jsonl"
    scores = run(method, questions, "test", 2, cache, answer_config(extractive=True))
    assert read_predictions(cache) == {f"q{i}": f"answer {i}" for i in range(5)}
    assert (scores["n"], scores["em"], scores["f1"]) == (5, 100.0, 100.0)
    assert seen_sources == [[f"passage {i}a", f"passage {i}b"] for i in range(5)]


def test_an_answer_matching_any_gold_answer_scores(tmp_path):
    """SQuAD questions have several gold answers; matching the second one is exact."""
    questions = [Question("q0", "Where?", ["in the north of Egypt", "Egypt"], "ctx")]
    method = SimpleNamespace(name="fake", contrast_prompts=lambda b: [],
                             generator=SimpleNamespace(generate_batch=lambda p, c, s=None, k=None: [
                                 SimpleNamespace(text="Egypt")]),
                             prompts=lambda batch: ["p"])
    assert run(method, questions, "test", 1, tmp_path / "p.jsonl")["em"] == 100.0


def test_8bit_storage_reads_the_caches_as_the_store_returns_them(workspace):
    """``--storage int8`` answers from round-tripped K/V, not the native ones."""
    import torch

    from sac_rag.eval import build_method
    from sac_rag.quantize import round_trip

    method = build_method("kv_dropping", str(workspace / "tiny-model"), 2, None, "cpu", "float32")
    question = Question("q", "Where does the Nile flow?", ["north"], "The Nile flows north through Egypt.")
    [native] = method.compressor.compress(question.context)
    method.storage = "int8"
    [kv] = [s for s in method.prompts([question])[0] if not isinstance(s, str)]
    expected = round_trip(native, "int8")
    assert torch.equal(kv.keys, expected.keys) and torch.equal(kv.values, expected.values)
    assert not torch.equal(kv.keys, native.keys)


def test_a_settings_line_anywhere_but_first_is_refused_naming_the_file_and_line(tmp_path):
    """Only a prediction file's first line may be its ``{"settings": ...}`` header. A settings line
    further down (e.g. two prediction files run together, made with different settings) is not a
    prediction: reading the file is refused naming it and the line, instead of mixing the predictions
    of two settings as one row's."""
    cache = tmp_path / "predictions.jsonl"
    first = '{"settings": {"ratio": 2}}\n{"id": "q1", "prediction": "Paris"}\n'
    cache.write_text(first)
    assert read_predictions(cache) == {"q1": "Paris"}
    cache.write_text(first + '{"settings": {"ratio": 4}}\n{"id": "q2", "prediction": "1889"}\n')
    with pytest.raises(InvalidInputError, match=r"predictions\.jsonl:3 is not a cached prediction"):
        read_predictions(cache)


def test_compression_time_per_chunk_shares_a_questions_compression_among_all_the_chunks_it_reads(monkeypatch):
    """A question that reads several passages (one of them two chunks long) compresses them all before
    it is answered: ``compress_s_per_chunk`` is that time divided by the number of chunks, not charged
    to one. The clock here advances one second per chunk compressed, so the figure is one second."""
    import sac_rag.eval as ev
    from sac_rag import Generator, SACCompressor, SACConfig

    model, tokenizer = make_tiny_llama()
    comp = SACCompressor(SACConfig(base_model="tiny", ratio=2, chunk_len=16, lora_rank=0, bidirectional=False,
                                   anchor_embedding="none"), model=model, tokenizer=tokenizer)
    method = ev.Method("kv_dropping", 2, Generator.from_compressor(comp), comp.config.prompt, comp)
    passages = ("The lighthouse on Gull Point was built in 1874.",
                "It was painted red in 1902 by the keeper, who lived there with his family for forty years.",
                "The ferry stops at midnight.")
    chunks = sum(len(c) for c in comp.compress_batch(list(passages)))
    assert chunks > len(passages)
    clock = [0.0]
    compress_batch = comp.compress_batch

    def one_second_per_chunk(texts, **kwargs):
        compressed = compress_batch(texts, **kwargs)
        clock[0] += sum(len(c) for c in compressed)
        return compressed

    monkeypatch.setattr(comp, "compress_batch", one_second_per_chunk)
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    question = ev.Question("q", "When was it built?", ["1874"], passages[0], passages=passages)
    costs = ev.measure_costs(method, [question], samples=1, new_tokens=2)
    assert clock[0] == chunks  # every chunk was compressed once, inside the timed span
    assert costs["compress_s_per_chunk"] == pytest.approx(1.0)
