"""benchmarks/report.py: which table a results row lands in."""

import json
import runpy
from pathlib import Path

REPORT = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "report.py"))
load_rows = REPORT["load_rows"]


def test_rows_read_another_way_or_on_other_questions_get_tables_of_their_own(tmp_path):
    base = {"method": "sac-5x", "ratio": 5, "dataset": "squad-dev", "n": 300, "f1": 40.0}
    rows = [base, {**base, "decoding": "extractive"}, {**base, "num_beams": 4},
            {**base, "num_beams": 4, "length_penalty": 0.0}, {**base, "num_beams": 4, "skip": 1000},
            {**base, "context_contrast": 0.25}, {**base, "context_contrast": 0.25, "contrast_plausibility": 0.0},
            {**base, "f1": 41.0}]  # a rerun of the first row replaces it
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tables = {row["dataset"]: row["f1"] for row in load_rows(tmp_path)}
    assert tables == {"squad-dev": 41.0, "squad-dev-extractive": 40.0, "squad-dev-beam4": 40.0,
                      "squad-dev-beam4-lp0": 40.0, "squad-dev-beam4-skip1000": 40.0, "squad-dev-cad0.25": 40.0,
                      "squad-dev-cad0.25-plausible0": 40.0}


def test_a_row_read_on_another_seeds_questions_neither_replaces_nor_joins_the_seed_0_rows(tmp_path):
    """The report says every table reads the first n questions of seed 0: a row of another seed's
    order is read on other questions, so it is no rerun of the seed-0 row nor a peer of its rows."""
    sac = {"method": "sac-5x", "ratio": 5, "dataset": "squad-dev", "n": 200, "f1": 42.5, "f1_ci": [36.7, 47.9],
           "seed": 0}
    peer = {**sac, "method": "text-truncate-5x", "f1": 30.0, "f1_ci": [25.0, 35.0]}
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(row) + "\n" for row in
                                              [sac, peer, {**sac, "f1": 20.0, "f1_ci": [15.0, 25.0], "seed": 1}]))
    tables = {(row["method"], row["dataset"]): row["f1"] for row in load_rows(tmp_path)}
    assert tables == {("sac-5x", "squad-dev"): 42.5, ("text-truncate-5x", "squad-dev"): 30.0,
                      ("sac-5x", "squad-dev-seed1"): 20.0}  # was the seed-1 row as the headline's, behind its peer


def test_rows_that_compare_ways_of_asking_one_compressor_are_not_set_against_its_peers(tmp_path):
    """The chat layouts' rows are SAC's own answers through the frameworks: in the methods' table they
    would read as peers that SAC is "behind" whenever a layout matches it."""
    base = {"method": "sac-5x", "ratio": 5, "dataset": "squad-dev", "n": 200, "f1": 42.5, "f1_ci": [36.7, 47.9]}
    (tmp_path / "quality.jsonl").write_text(json.dumps(base) + "\n")
    (tmp_path / "chat_layouts.jsonl").write_text(json.dumps({**base, "method": "llamaindex-query-engine"}) + "\n")
    rows = load_rows(tmp_path)
    assert {row["method"]: row["dataset"] for row in rows} == {"sac-5x": "squad-dev",
                                                               "llamaindex-query-engine": "squad-dev-chat-layouts"}
    assert not any("behind" in line for line in REPORT["verdicts"]([r for r in rows if r["dataset"] == "squad-dev"]))


def test_a_row_cut_short_or_without_a_ci_does_not_stop_the_report_whose_plots_go_beside_it(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out" / "RESULTS.md"
    results.mkdir()
    out.parent.mkdir()
    sac = {"method": "sac-5x", "ratio": 5, "dataset": "squad-dev", "n": 4, "f1": 40.0}  # no f1_ci: allowed
    peer = {**sac, "method": "text-truncate", "f1": 30.0, "f1_ci": [20.0, 40.0]}
    (results / "q.jsonl").write_text(json.dumps(sac) + "\n" + json.dumps(peer) + "\n" + '{"method": "sac-15x", "ra')
    (results / "costs.jsonl").write_text('{"run": "x", "meth')  # a costs run killed mid-row
    (results / "empty.jsonl").write_text("")
    assert REPORT["main"](["--results", str(results), "--out", str(out)]) == 0
    assert "is cut short (no newline), skipped" in capsys.readouterr().err
    text = out.read_text()
    assert "| sac-5x | 5 | 4 |" in text and "| text-truncate | 5 | 4 |" in text and "sac-15x" not in text
    assert (out.parent / "plots" / "f1_vs_ratio_squad-dev.png").is_file()  # not the repository's plots/


def test_the_committed_report_is_what_the_committed_rows_make(tmp_path):
    """RESULTS.md is generated, and the README sends readers to it: a results row committed without
    rerunning ``python benchmarks/report.py`` would leave its tables behind the rows."""
    out = tmp_path / "RESULTS.md"
    REPORT["main"](["--out", str(out)])
    assert out.read_text() == (Path(__file__).parents[1] / "benchmarks" / "RESULTS.md").read_text(), (
        "benchmarks/RESULTS.md is out of date: run python benchmarks/report.py")


def test_the_plot_shows_the_questions_its_drawn_rows_share_not_those_of_undrawn_stage_rows():
    """Each training stage's read adds a row that is not drawn; enough of them on other questions
    must not switch the plot to questions few of its peers were read on."""
    peer = {"ratio": 5, "dataset": "squad-dev", "n": 200, "f1": 30.0}
    drawn = [{**peer, "method": m} for m in ("sac-5x", "text-truncate", "kv-dropping", "full-ft")]
    stages = [{**peer, "method": f"sac-15x-stage{i}", "n": 1000} for i in range(6)]
    assert REPORT["plotted_n"](drawn + stages) == 200
    assert REPORT["plotted_n"](stages) == 1000  # nothing drawable: the rows' own count


def test_a_costs_run_with_full_context_timed_around_each_method_says_how_far_the_machine_drifted():
    common = {"ratio": 1, "dataset": "squad-dev", "context_tokens": 150, "compress_s_per_chunk": None,
              "decode_tokens_per_s": 10.0, "kv_bytes_per_query": 1000, "timing_samples": 12, "threads": 2,
              "run": "r", "command": "python benchmarks/costs.py", "ttft_s_vs_full_context": 1.0,
              "kv_bytes_per_query_vs_full_context": 1.0, "decode_tokens_per_s_vs_full_context": 1.0}
    rows = [{**common, "method": "full-context", "paragraphs": 1, "ttft_s": 0.3, "reference_spread": 1.5,
             "reference_timings": 9},
            {**common, "method": "sac-5x", "paragraphs": 1, "ttft_s": 0.4, "reference_ttft_s": 0.5,
             "ttft_s_vs_full_context": 0.8}]
    header = REPORT["costs_table"](rows)[2]
    assert "timed just before and just after each method" in header and "1.50x at 1 para." in header
    assert "mean of its 9 timings" in header
    assert "timed just before" not in REPORT["costs_table"]([{k: v for k, v in r.items() if "reference" not in k}
                                                             for r in rows])[2]


def test_the_sac_line_is_drawn_from_the_shipped_compressors_rows_whatever_their_labels():
    """A label names no weights: a row of the shipped 15x labelled as a training stage is drawn,
    and a row labelled "sac-5x" that an earlier default (or an experiment) answered is not."""
    shipped = sorted(REPORT["shipped_fingerprints"]())
    assert shipped, "the package ships no compressor"
    row = {"ratio": 15, "dataset": "squad-dev", "n": 200, "f1": 25.0}
    is_line_point = REPORT["is_line_point"]
    assert is_line_point({**row, "method": "sac-15x-stage3", "compressor_fingerprint": shipped[0]})
    assert not is_line_point({**row, "method": "sac-5x", "compressor_fingerprint": "smollm2-135m@0/sac-01234567"})
    assert not is_line_point({**row, "method": "sac-15x-stage3", "compressor_fingerprint": shipped[0],
                              "storage": "fp8"})
    assert is_line_point({**row, "method": "text-truncate-15x"})  # a peer, by its name


def test_the_reference_rows_of_a_decoding_s_table_are_named_without_its_suffix():
    """Each decoding has a table (and plot) of its own; its Full-FT and full-context rows carry the
    decoding in their names and are still that table's reference lines."""
    base_name = REPORT["base_name"]
    assert base_name("rag-full-ft-extractive") == "full-ft"
    assert base_name("rag-full-text-beam8-mbr") == "full-context"
    assert base_name("full-ft-beam4-lp0") == "full-ft"
    assert base_name("sac-5x-cad0.25-plausible0") == "sac-5x"
    assert base_name("rag-sac-5x-soup68-69-fp32") == "sac-5x-soup68-69-fp32"  # a label, not a decoding
    assert REPORT["is_full_context"]("rag-full-text-extractive")


def test_a_peer_whose_interval_is_nan_is_no_peer_beaten_with_separated_cis():
    """A row of no questions carries f1_ci [NaN, NaN] (bootstrap_ci of nothing; json reads NaN back):
    every comparison with NaN is false, so such a peer would read as beaten with separated CIs."""
    sac = {"method": "sac-5x", "ratio": 5, "dataset": "squad-dev", "n": 200, "f1": 40.0, "f1_ci": [35.0, 45.0]}
    peer = {**sac, "method": "text-truncate-5x", "f1": 30.0, "f1_ci": [float("nan"), float("nan")]}
    lines = REPORT["verdicts"]([sac, peer])
    assert not any("separated CIs" in line for line in lines)
    assert any("significance unknown" in line and "text-truncate-5x (30.0)" in line for line in lines)


def _drawn_lines(monkeypatch):
    """Record every line a plot draws: (label, xs, ys)."""
    import matplotlib.axes

    drawn, original = [], matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), tuple(xs), tuple(ys)))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    return drawn


def test_the_f1_plot_draws_each_line_s_f1_on_the_plotted_questions_only(tmp_path, monkeypatch):
    drawn = _drawn_lines(monkeypatch)
    common = {"dataset": "squad-dev", "n": 200}
    rows = [{**common, "method": "text-truncate-5x", "ratio": 5, "f1": 30.0, "em": 10.0},
            {**common, "method": "text-truncate-10x", "ratio": 10, "f1": 20.0, "em": 5.0},
            {**common, "method": "text-truncate-5x", "ratio": 5, "f1": 90.0, "em": 80.0, "n": 100}]  # other questions
    REPORT["plots"](rows, tmp_path, "squad-dev", n=200)
    assert drawn == [("text-truncate", (5, 10), (30.0, 20.0))]  # F1 (not EM) of the n=200 rows (not n=100's)


def test_the_ttft_plot_of_a_drift_corrected_run_draws_each_ratio_times_full_context_s_time(tmp_path, monkeypatch):
    import pytest

    drawn = _drawn_lines(monkeypatch)
    common = {"ratio": 1, "dataset": "squad-dev", "context_tokens": 150, "timing_samples": 12, "threads": 2,
              "run": "r", "paragraphs": 1}
    rows = [{**common, "method": "full-context", "ttft_s": 0.3, "ttft_s_vs_full_context": 1.0},
            {**common, "method": "sac-5x", "ttft_s": 0.4, "reference_ttft_s": 0.5, "ttft_s_vs_full_context": 0.8}]
    REPORT["ttft_plot"](rows, tmp_path)
    ys = {label: y for label, _, (y,) in drawn}
    assert ys["full-context"] == pytest.approx(300.0) and ys["sac-5x"] == pytest.approx(240.0)  # 0.8 x 300 ms, not 400
