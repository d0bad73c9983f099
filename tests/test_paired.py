"""benchmarks/paired.py: which prediction files a command-line spec names."""

import runpy
from pathlib import Path

PAIRED = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "paired.py"))
run_paths = PAIRED["run_paths"]


def test_a_file_whose_name_holds_a_plus_is_read_as_that_file(tmp_path):
    named = tmp_path / "rag-text-truncate-5x+fullft-decoder.jsonl"
    named.write_text("")
    assert run_paths(str(named)) == [named]


def test_plus_joined_files_are_averaged_runs(tmp_path):
    first, second = tmp_path / "seed0.jsonl", tmp_path / "seed1.jsonl"
    for path in (first, second):
        path.write_text("")
    assert run_paths(f"{first}+{second}") == [first, second]


def _predictions(tmp_path, name, answers):
    path = tmp_path / name
    path.write_text("".join(f'{{"id": "q{i}", "prediction": "{a}"}}\n' for i, a in enumerate(answers)))
    return str(path)


def _data(tmp_path):
    import json
    import lzma

    (tmp_path / "data" / "squad-v1.1").mkdir(parents=True)
    data = {"data": [{"title": "t", "paragraphs": [
        {"context": f"Paris {i}.", "qas": [{"id": f"q{i}", "question": "Where?", "answers": [{"text": "Paris"}]}]}
        for i in range(4)]}]}
    with lzma.open(tmp_path / "data" / "squad-v1.1" / "dev-v1.1.json.xz", "wt") as f:
        json.dump(data, f)
    return ["--data-root", str(tmp_path / "data"), "--n", "4"]


def test_no_share_of_a_reference_that_scored_nothing(tmp_path, capsys):
    subset = _data(tmp_path)
    zero = _predictions(tmp_path, "zero.jsonl", ["Rome"] * 4)
    some = _predictions(tmp_path, "some.jsonl", ["Paris", "Rome", "Rome", "Rome"])
    assert PAIRED["main"]([*subset, zero, some]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| some.jsonl | 25.0") and row.endswith("| - (reference F1 is 0) |")  # was 25e12%


def test_a_file_named_twice_is_compared_with_the_reference_too(tmp_path, capsys):
    subset = _data(tmp_path)
    some = _predictions(tmp_path, "some.jsonl", ["Paris", "Rome", "Rome", "Rome"])
    assert PAIRED["main"]([*subset, some, some]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.endswith("| +0.0 (+0.0 to +0.0) | 100.0% (100.0% to 100.0%) |")  # was "| - | - |"


def test_the_table_by_hand_for_an_averaged_pair_of_runs(tmp_path, capsys):
    """Per-question F1 (SQuAD, gold "Paris"): reference 100 on all four questions; runs a and b
    100, 0, 0, 0 and 100, 100, 0, 0, so a+b is their per-question mean 100, 50, 0, 0: F1 37.5,
    37.5 - 100 = -62.5, and a share of 37.5 / 100 = 37.5%."""
    subset = _data(tmp_path)
    reference = _predictions(tmp_path, "all.jsonl", ["Paris"] * 4)
    first = _predictions(tmp_path, "a.jsonl", ["Paris", "Rome", "Rome", "Rome"])
    second = _predictions(tmp_path, "b.jsonl", ["the Paris!", "paris", "Rome", "Rome"])  # normalised: all Paris
    questions = PAIRED["subset_questions"](PAIRED["argparse"].Namespace(
        dataset="squad-dev", data_root=str(tmp_path / "data"), n=4, seed=0, skip=0))
    assert sorted(PAIRED["averaged_f1"](f"{first}+{second}", questions)) == [0.0, 0.0, 50.0, 100.0]
    assert PAIRED["main"]([*subset, reference, f"{first}+{second}"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| a.jsonl + b.jsonl | 37.5 (") and "| -62.5 (" in row and "| 37.5% (" in row


def test_every_interval_of_a_row_is_its_own_and_brackets_its_estimate(tmp_path, capsys):
    """Row a+b (per-question F1 100, 50, 0, 0) against the reference (100 on all four): its F1 interval
    is its own (not the reference's 100-100), the difference's runs low to high around -62.5, and
    the share's is that of 37.5% (not of the inverse ratio, 267%)."""
    import re

    from sac_rag.metrics import bootstrap_ci, bootstrap_share_ci, paired_difference

    subset = _data(tmp_path)
    reference = _predictions(tmp_path, "all.jsonl", ["Paris"] * 4)
    first = _predictions(tmp_path, "a.jsonl", ["Paris", "Rome", "Rome", "Rome"])
    second = _predictions(tmp_path, "b.jsonl", ["Paris", "Paris", "Rome", "Rome"])
    assert PAIRED["main"]([*subset, reference, f"{first}+{second}"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    columns = re.search(r"\| ([\d.]+) \(([\d.]+)-([\d.]+)\) \| ([-+][\d.]+) \(([-+][\d.]+) to ([-+][\d.]+)\) "
                        r"\| ([\d.]+)% \(([\d.]+)% to ([\d.]+)%\) \|$", row)
    f1, lo, hi, delta, dlo, dhi, share, slo, shi = map(float, columns.groups())
    assert lo <= f1 <= hi and hi < 100.0  # its own interval, not the reference's (100.0-100.0)
    assert dlo <= delta <= dhi and dlo < dhi  # low to high
    assert slo <= share <= shi <= 100.0  # the share's, in percent
    values, base = [100.0, 50.0, 0.0, 0.0], [100.0] * 4
    expected_ci, (_, elo, ehi), (sl, sh) = bootstrap_ci(values), paired_difference(values, base), \
        bootstrap_share_ci(values, base)
    assert row == (f"| a.jsonl + b.jsonl | 37.5 ({expected_ci[0]:.1f}-{expected_ci[1]:.1f}) "
                   f"| -62.5 ({elo:+.1f} to {ehi:+.1f}) | 37.5% ({sl:.1%} to {sh:.1%}) |")


def test_also_pools_another_block_each_method_naming_one_file_per_block(tmp_path, capsys):
    """Questions 0-1 (--n 2) and 2-3 (--also 2:2) of the seeded order pooled: the reference answers all
    four right; the method's first file gets its block's two right, its second file neither, so the
    pool reads 50.0, -50.0 against the reference, a share of 50%."""
    subset = [arg if arg != "4" else "2" for arg in _data(tmp_path)]  # --n 2
    order = PAIRED["subset_questions"](PAIRED["argparse"].Namespace(
        dataset="squad-dev", data_root=str(tmp_path / "data"), n=4, seed=0, skip=0))
    first, second = [q.id for q in order[:2]], [q.id for q in order[2:]]

    def answers(name, ids, answer):
        path = tmp_path / name
        path.write_text("".join(f'{{"id": "{i}", "prediction": "{answer}"}}\n' for i in ids))
        return str(path)

    reference = f"{answers('ref-a.jsonl', first, 'Paris')},{answers('ref-b.jsonl', second, 'Paris')}"
    method = f"{answers('m-a.jsonl', first, 'Paris')},{answers('m-b.jsonl', second, 'Rome')}"
    assert PAIRED["main"]([*subset, "--also", "2:2", reference, method]) == 0
    out = capsys.readouterr().out
    assert out.startswith("squad-dev, n=4, seed 0; reference: ref-a.jsonl, ref-b.jsonl")
    row = out.strip().splitlines()[-1]
    assert row.startswith("| m-a.jsonl, m-b.jsonl | 50.0 (") and "| -50.0 (" in row and "| 50.0% (" in row


def test_also_refuses_a_method_without_one_file_per_block_overlapping_blocks_and_a_block_not_skip_n(tmp_path, capsys):
    import pytest

    from sac_rag.errors import InvalidInputError

    subset = [arg if arg != "4" else "2" for arg in _data(tmp_path)]  # --n 2
    some = _predictions(tmp_path, "some.jsonl", ["Paris"] * 4)
    with pytest.raises(InvalidInputError, match="names 1 prediction file.* for 2 blocks"):
        PAIRED["main"]([*subset, "--also", "2:2", some])
    with pytest.raises(InvalidInputError, match="share questions, which the pool would count twice"):
        PAIRED["main"]([*subset, "--also", "1:2", f"{some},{some}"])
    for bad in ("5800", "a:5", "10:0"):
        with pytest.raises(SystemExit):
            PAIRED["main"]([*subset, "--also", bad, some])
        assert "is not SKIP:N" in capsys.readouterr().err
