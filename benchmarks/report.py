"""Markdown table and plots from the benchmark rows.

    python benchmarks/report.py      # -> benchmarks/RESULTS.md, benchmarks/plots/*.png

Reads every ``benchmarks/results/*.jsonl`` row that has ``method``, ``dataset``, ``n`` and
``f1`` (the last row wins for the same method, ratio, dataset and n) and writes one table per
dataset, question subset (a seed other than 0, a skip) and decoding (F1 with its 95% CI, EM, the
paper's ROUGE-1 F1, K/V bytes per query and their ratio to full context), sentences saying where
SAC is behind or not significantly ahead of a peer, the costs table of the latest
``benchmarks/costs.py`` run, and the command of every row; plus plots of F1 vs compression ratio
(every method, per dataset) and of time to first token, in ``plots/`` beside the report
(``--out``). A row cut short or a line that is not JSON is skipped with a warning.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from sac_rag.eval import DECODING_SETTINGS, decoding_suffix, json_lines

HERE = Path(__file__).resolve().parent



def read_jsonl(path: Path) -> list[dict]:
    """The JSON object rows of a JSONL file. A last line without its newline (a row cut short by a
    kill, or one still being appended) is skipped, as is any other line that is not a JSON object,
    with a warning naming the file and line: one bad line never hides the other rows."""
    lines, unfinished = json_lines(path.read_text(errors="replace"))
    rows = []
    for number, line, row in lines:
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"warning: {path}:{number} is not a JSON row, skipped ({line[:60]!r})", file=sys.stderr)
    if unfinished.strip():
        print(f"warning: {path}: its last line is cut short (no newline), skipped", file=sys.stderr)
    return rows


# Results files whose rows compare ways of asking the same compressor, not methods: their rows get a
# table of their own (the dataset's name + this suffix), never set against SAC's peers.
OWN_TABLES = {"chat_layouts.jsonl": "-chat-layouts"}


def load_rows(results: Path) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for path in sorted(results.glob("*.jsonl")):
        for row in read_jsonl(path):
            if {"method", "dataset", "n", "f1"} <= row.keys():
                row["dataset"] += OWN_TABLES.get(path.name, "")
                # each decoding has tables of its own: never compared with another
                settings = {key: row[key] for key in DECODING_SETTINGS if key in row}  # absent: the default
                row["dataset"] += decoding_suffix(extractive=row.get("decoding") == "extractive", **settings)
                if row.get("seed"):  # another seeded order: other questions than seed 0's, never the headline's
                    row["dataset"] += f"-seed{row['seed']}"
                if row.get("skip"):  # a subset after the first `skip` questions: never the headline's
                    row["dataset"] += f"-skip{row['skip']}"
                latest[(row["method"], row.get("ratio"), row["dataset"], row["n"])] = row
    return list(latest.values())


FAMILIES = {  # plotted compressors: name prefix -> colour (the first matching prefix wins)
    "sac-5x-frozen-decoder": "tab:gray", "sac-5x-weights-at": "tab:olive", "sac-5x-from-fullft": "tab:cyan",
    "sac": "black", "kv-dropping": "tab:blue",
    "text-truncate": "tab:orange", "text-every_rth": "tab:brown", "kvpress-expected-attention": "tab:red",
    "kvpress-streamingllm": "tab:green", "kvpress-knorm": "tab:purple", "kvpress-snapkv": "tab:pink",
}
LABELS = {"sac-5x-frozen-decoder": "sac (frozen decoder)",
          "sac-5x-weights-at": "sac-5x weights at other ratios (trained at 5x)",
          "sac-5x-from-fullft": "sac 5x from Full-FT, 240 steps"}
REFERENCES = {"full-ft": ("k", "--"), "full-context": ("gray", "--"), "no-context": ("gray", ":")}


# The row-name suffixes ``decoding_suffix`` adds for a decoding other than greedy free decoding.
DECODING_TAGS = re.compile(r"(-(extractive|beam\d+|lp-?[\d.e+-]+|mbr|samples\d+|cad-?[\d.e+-]+|plausible[\d.e+-]+))+$")


def base_name(method: str) -> str:
    """The method's name without the RAG setting's prefix ("rag-full-text" is full context) or its
    decoding's suffix (a row's decoding names its table: "rag-full-ft-extractive" is the Full-FT
    reference of the extractive table)."""
    method = DECODING_TAGS.sub("", method.removeprefix("rag-"))
    return "full-context" if method == "full-text" else method


def family(method: str) -> tuple[str, bool] | None:
    """(compressor family, read by the Full-FT decoder?) of a plottable method, else None. Of the
    "sac" family only the shipped compressors are drawn (``is_line_point``): the lines set them
    against their peers; training stages are compared in the model card and the training-progress
    plot."""
    method = base_name(method)
    for prefix in FAMILIES:
        if method.startswith(prefix):
            return prefix, "fullft-decoder" in method
    return None


def is_full_context(method: str) -> bool:
    """The reference row: full context read by the frozen decoder."""
    return base_name(method) in ("full-context", "full_context", "full-context-frozen")


DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}  # what the models computed in
# Rows without the field predate it: rag_squad.py computed in bfloat16 only until it had --dtype.
DEFAULT_DTYPE = "bfloat16"
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_elements(row: dict) -> float:
    """K/V values held per query: bytes over the element size, so rows computed in different dtypes compare."""
    return row["kv_bytes_per_query"] / ELEMENT_BYTES[row.get("dtype", DEFAULT_DTYPE)]


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict], dataset: str) -> str:
    rows = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: (-r["n"], -r["f1"]))
    full = {r["n"]: r for r in rows if is_full_context(r["method"])}
    lines = [f"### {dataset}", "",
             "| method | ratio | n | dtype | F1 (95% CI) | EM | ROUGE-1 F1 | KV per query | KV vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = full.get(r["n"], {})
        kv = r.get("kv_bytes_per_query")
        kv_ratio = f"{kv_elements(r) / kv_elements(ref):.2f}x" if kv and ref.get("kv_bytes_per_query") else "-"
        ci = r.get("f1_ci") or [None, None]
        lines.append(
            f"| {r['method']} | {r.get('ratio', '-')} | {r['n']} | {DTYPES.get(r.get('dtype', DEFAULT_DTYPE), '-')} "
            f"| {_fmt(r['f1'])} ({_fmt(ci[0])}-{_fmt(ci[1])}) "
            f"| {_fmt(r.get('em'))} | {_fmt(r.get('paper_f1'))} "
            f"| {_fmt(kv and kv / 1e6, 2)}{' MB' if kv else ''} | {kv_ratio} |")
    return "\n".join(lines + [""] + verdicts(rows))


def verdicts(rows: list[dict]) -> list[str]:
    """Where SAC does not beat a peer at its ratio: said in words under the table."""
    out = []
    sac_rows = [r for r in rows if r["method"].startswith(("sac-", "rag-sac-"))
                and r.get("storage", "native") == "native" and f1_ci(r)]  # no CI: no claim of significance
    for sac in sac_rows:
        lo = sac["f1_ci"][0]
        peers = [r for r in rows if r["n"] == sac["n"] and r.get("ratio") == sac.get("ratio")
                 and not r["method"].startswith(("sac", "rag-sac"))]
        unknown = [r for r in peers if not f1_ci(r)]  # a peer without a CI: neither separated nor overlapping
        peers = [r for r in peers if f1_ci(r)]
        behind = sorted((r for r in peers if r["f1"] >= sac["f1"]), key=lambda r: -r["f1"])
        close = sorted((r for r in peers if r["f1"] < sac["f1"] and r["f1_ci"][1] >= lo), key=lambda r: -r["f1"])
        name = f"{sac['method']} (F1 {sac['f1']:.1f}, n={sac['n']})"
        if behind:
            hi = sac["f1_ci"][1]
            out.append(f"* **{name} is behind** " + ", ".join(
                f"{r['method']} ({r['f1']:.1f}, {'significantly' if r['f1_ci'][0] > hi else 'CIs overlap'})"
                for r in behind) + ".")
        if close:
            out.append(f"* {name} is ahead of, but **not significantly** (95% CIs overlap): "
                       + ", ".join(f"{r['method']} ({r['f1']:.1f})" for r in close) + ".")
        ahead = len(peers) - len(behind) - len(close)
        if ahead:
            out.append(f"* {name} beats the other {ahead} method(s) at ratio {sac.get('ratio')} with separated CIs.")
        if unknown:
            out.append(f"* {name} against rows without a CI (significance unknown): "
                       + ", ".join(f"{r['method']} ({r['f1']:.1f})" for r in unknown) + ".")
    return out


def f1_ci(row: dict) -> list[float] | None:
    """A row's F1 95% CI, or None when it has none (rows need only method, dataset, n and f1)."""
    ci = row.get("f1_ci")
    ok = isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, int | float) and math.isfinite(x) for x in ci)
    return ci if ok else None


def latest_costs(path: Path) -> list[dict]:
    """The rows of the latest run of benchmarks/costs.py."""
    if not path.exists():
        return []
    rows = [r for r in read_jsonl(path) if "run" in r]
    return [r for r in rows if r["run"] == rows[-1]["run"]] if rows else []


def paragraph_counts(rows: list[dict]) -> str:
    """The context lengths of a costs run, in paragraphs: "1, 3 and 10"."""
    counts = [str(k) for k in sorted({r["paragraphs"] for r in rows})]
    return " and ".join([", ".join(counts[:-1]), counts[-1]] if len(counts) > 1 else counts)


def costs_table(rows: list[dict]) -> list[str]:
    """Every method timed back to back in one process, at each context length."""
    if not rows:
        return []
    reference = sorted((r for r in rows if "reference_spread" in r), key=lambda r: r["paragraphs"])
    if reference:  # full context timed around every method (costs.py since 2026-12-06)
        how = (f"ratios to full context (frozen decoder) at the same length, timed just before and just after each "
               f"method (full context's row: the mean of its {reference[0]['reference_timings']} timings; its "
               "slowest time to first token over its fastest, how far the machine drifted in the run: "
               + ", ".join(f"{r['reference_spread']:.2f}x at {r['paragraphs']} para." for r in reference) + ")")
    else:
        how = "ratios to full context (frozen decoder) at the same length in the same run"
    lines = [f"### Costs, every method in one process (`{rows[0]['command']}`, {rows[0]['run']})", "",
             f"{rows[0]['timing_samples']} {rows[0].get('dataset', 'squad-dev')} questions at batch size 1, median; "
             f"contexts of {paragraph_counts(rows)} paragraphs; {how}. TTFT excludes compression (offline for a "
             "store; `compress s/chunk` is its cost).", "",
             "| context | method | ratio | compress s/chunk | TTFT ms | TTFT vs full | decode tok/s | KV per query "
             "| KV vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["paragraphs"], r["ttft_s"])):
        lines.append(f"| {r['paragraphs']} para. ({r['context_tokens']} tok) | {r['method']} | {r['ratio']} | "
                     f"{_fmt(r['compress_s_per_chunk'], 3)} | {_fmt(r['ttft_s'] * 1000, 0)} | "
                     f"{_fmt(r['ttft_s_vs_full_context'], 2)}x | {_fmt(r['decode_tokens_per_s'])} | "
                     f"{r['kv_bytes_per_query'] / 1e6:.2f} MB | {_fmt(r['kv_bytes_per_query_vs_full_context'], 2)}x |")
    return lines + [""]


@functools.cache
def shipped_fingerprints() -> frozenset[str]:
    """The fingerprints of the compressors the package ships (``SACCompressor.from_pretrained(name)``)."""
    from sac_rag.compressor import checkpoint_meta, list_pretrained

    return frozenset(checkpoint_meta(name)["fingerprint"] for name in list_pretrained())


def is_line_point(row: dict) -> bool:
    """A row drawn as a point of a method's line, stored natively: a peer, or on the "sac" line a
    compressor the package ships (by its fingerprint, whatever the row's label: a label names no
    weights, and experiments and earlier defaults are compared in the model cards)."""
    named = family(row["method"])
    if named is None or row.get("storage", "native") != "native":
        return False
    return named[0] != "sac" or row.get("compressor_fingerprint") in shipped_fingerprints()


def plotted_n(rows: list[dict]) -> int:
    """The question count most of the drawable rows (line points and text references) share:
    training-stage rows, which are not drawn, do not decide which questions the plot shows."""
    drawn = [r for r in rows if is_line_point(r) or base_name(r["method"]) in REFERENCES] or rows
    return max((r["n"] for r in drawn), key=lambda k: sum(r["n"] == k for r in drawn))


def plots(rows: list[dict], out: Path, dataset: str = "squad-dev", n: int | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dataset"] == dataset]
    n = n or plotted_n(rows)
    rows = [r for r in rows if r["n"] == n]
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(9, 5))
    lines = defaultdict(dict)
    for r in rows:  # one point per line and ratio (rows of one shipped compressor read the same weights)
        if is_line_point(r):
            lines[family(r["method"])][r["ratio"]] = r["f1"]
    for (name, adapted), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points.items()))
        sac = name.startswith("sac")
        ax.plot(xs, ys, marker="*" if sac else "o", markersize=12 if sac else 5, lw=2.5 if sac else 1.2,
                color=FAMILIES[name], ls="--" if adapted else "-",
                label=LABELS.get(name, name) + (" + Full-FT decoder" if adapted else ""))
    for r in rows:
        if base_name(r["method"]) in REFERENCES:
            color, style = REFERENCES[base_name(r["method"])]
            ax.axhline(r["f1"], color=color, ls=style, lw=1)
            ax.annotate(f"{base_name(r['method'])} (text)", (1.01, r["f1"]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="center")
    ratios = sorted({x for points in lines.values() for x in points})
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{x}x" for x in ratios])
    ax.minorticks_off()
    ax.set_xlabel("compression ratio (context tokens per kept K/V entry or kept token)")
    ax.set_ylabel("SQuAD F1")
    ax.set_title(f"{dataset}, n={n}, SmolLM2-135M\ndashed: read by the Full-FT decoder", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.16, 1.0))
    fig.subplots_adjust(left=0.07, right=0.6)
    quality = out / f"f1_vs_ratio_{dataset}.png"
    fig.savefig(quality, dpi=120)
    plt.close(fig)

    return [quality]


def ttft_plot(costs: list[dict], out: Path) -> list[Path]:
    """Time to first token vs context length, every method of one costs.py run."""
    if not costs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by_method = defaultdict(list)
    full = {r["paragraphs"]: r["ttft_s"] for r in costs if r["method"] == "full-context"}
    drift_corrected = any("reference_ttft_s" in r for r in costs)
    for r in costs:  # with full context timed around each method: its ratio to it, at full context's mean speed
        ttft = r["ttft_s_vs_full_context"] * full[r["paragraphs"]] if drift_corrected else r["ttft_s"]
        by_method[r["method"]].append((r["context_tokens"], ttft * 1000))
    for method, points in by_method.items():
        xs, ys = zip(*sorted(points))
        sac = method.startswith("sac")
        ax.plot(xs, ys, marker="*" if sac else "o", lw=2.5 if sac else 1.2, color="black" if sac else None,
                ls="--" if method in ("full-context", "full-ft") else "-", label=method)
    ax.set_xlabel(f"context length, tokens ({paragraph_counts(costs)} {costs[0].get('dataset', 'squad-dev')} "
                  "paragraphs)")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"median of {costs[0]['timing_samples']} questions, batch 1, CPU ({costs[0]['threads']} threads), "
                 "one process" + ("\neach method's ratio to full context timed around it, times full context's "
                                  "mean" if drift_corrected else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ttft_vs_context.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d != "squad-dev", d))
    plotted = [d for d in datasets if d in ("squad-dev", "squadshifts-new-wiki") or d.startswith("squad-dev-rag")]
    costs = latest_costs(args.results / "costs.jsonl")
    pictures_dir = args.out.parent / "plots"  # beside the report, whose links are relative: plots/<name>
    pictures = [p for d in plotted for p in plots(rows, pictures_dir, d)] + ttft_plot(costs, pictures_dir)
    commands = sorted({r["command"] for r in rows if r.get("command")})
    text = ["# Benchmark results", "",
            "Generated by `python benchmarks/report.py` from `benchmarks/results/*.jsonl`; each row was produced",
            "by the command listed below it (SmolLM2-135M, bf16, CPU, greedy, stop at newline, standard SQuAD",
            "metrics, fixed seeded nested subsets: the first n questions of seed 0). KV bytes are also given as",
            "ratios to full context with the frozen decoder on the same n; timings are in the costs table at the",
            "end (every method in one process: per-row timings of separate processes on a shared machine are not",
            "comparable, they are kept in the JSON rows only).", ""]
    text += [*(f"![{p.stem}](plots/{p.name})" for p in pictures), ""]
    for d in datasets:
        text += [table(rows, d), ""]
    text += costs_table(costs)
    text += ["### Commands", "", *(f"    {c}" for c in commands), ""]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out} and {len(pictures)} plots ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
