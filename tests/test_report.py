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
