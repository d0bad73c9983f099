"""Markdown table and plots from the benchmark rows.

    python benchmarks/report.py      # -> benchmarks/RESULTS.md, benchmarks/plots/*.png

Reads every ``benchmarks/results/*.jsonl`` row that has ``method``, ``dataset``, ``n`` and
``f1`` (the last row wins for the same method, ratio, dataset and n), and writes one table per dataset
with quality (F1 with its 95% CI, EM, the paper's ROUGE-1 F1), cost (time to first token, KV
bytes per query, both also as ratios to full context of the same run set) and the command of
each row; plus two plots: F1 vs compression ratio (every method) and time to first token.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_rows(results: Path) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for path in sorted(results.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if {"method", "dataset", "n", "f1"} <= row.keys():
                latest[(row["method"], row.get("ratio"), row["dataset"], row["n"])] = row
    return list(latest.values())


def family(method: str) -> str:
    """The line a method belongs to in the F1-vs-ratio plot."""
    for prefix in ("kvpress-snapkv", "kvpress-streamingllm", "kvpress-knorm", "kvpress-expected-attention",
                   "kv-dropping", "text-every_rth", "text-truncate", "sac"):
        if method.startswith(prefix):
            adapted = "fullft-decoder" in method or "full-ft" in method.removeprefix(prefix)
            return prefix + (" (+Full-FT decoder)" if adapted else "")
    return method


def is_full_context(method: str) -> bool:
    """The reference row: full context read by the frozen decoder."""
    return method in ("full-context", "full_context", "full-context-frozen")


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict], dataset: str) -> str:
    rows = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: (-r["n"], -r["f1"]))
    full = {r["n"]: r for r in rows if is_full_context(r["method"])}
    lines = [f"### {dataset}", "",
             "| method | ratio | n | F1 (95% CI) | EM | ROUGE-1 F1 | TTFT ms | TTFT vs full "
             "| KV per query | KV vs full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = full.get(r["n"], {})
        ttft, kv = r.get("ttft_s"), r.get("kv_bytes_per_query")
        ttft_ratio = f"{ttft / ref['ttft_s']:.2f}x" if ttft and ref.get("ttft_s") else "-"
        kv_ratio = f"{kv / ref['kv_bytes_per_query']:.2f}x" if kv and ref.get("kv_bytes_per_query") else "-"
        ci = r.get("f1_ci") or [None, None]
        lines.append(
            f"| {r['method']} | {r.get('ratio', '-')} | {r['n']} | {_fmt(r['f1'])} ({_fmt(ci[0])}-{_fmt(ci[1])}) "
            f"| {_fmt(r.get('em'))} | {_fmt(r.get('paper_f1'))} | {_fmt(ttft and ttft * 1000, 0)} | {ttft_ratio} "
            f"| {_fmt(kv and kv / 1e6, 2)}{' MB' if kv else ''} | {kv_ratio} |")
    return "\n".join(lines + [""] + verdicts(rows))


def verdicts(rows: list[dict]) -> list[str]:
    """Where SAC does not beat a peer at its ratio: said in words under the table."""
    out = []
    sac_rows = [r for r in rows
                if r["method"].startswith(("sac-", "rag-sac-")) and r.get("storage", "native") == "native"]
    for sac in sac_rows:
        lo = sac["f1_ci"][0]
        peers = [r for r in rows if r["n"] == sac["n"] and r.get("ratio") == sac.get("ratio")
                 and not r["method"].startswith(("sac", "rag-sac"))]
        behind = sorted((r for r in peers if r["f1"] >= sac["f1"]), key=lambda r: -r["f1"])
        close = sorted((r for r in peers if r["f1"] < sac["f1"] and r["f1_ci"][1] >= lo), key=lambda r: -r["f1"])
        name = f"{sac['method']} (F1 {sac['f1']:.1f}, n={sac['n']})"
        if behind:
            out.append(f"* **{name} is behind** " + ", ".join(f"{r['method']} ({r['f1']:.1f})" for r in behind) + ".")
        if close:
            out.append(f"* {name} is ahead of, but **not significantly** (95% CIs overlap): "
                       + ", ".join(f"{r['method']} ({r['f1']:.1f})" for r in close) + ".")
        ahead = len(peers) - len(behind) - len(close)
        if ahead:
            out.append(f"* {name} beats the other {ahead} method(s) at ratio {sac.get('ratio')} with separated CIs.")
    return out


def costs_table(path: Path) -> list[str]:
    """The latest run of benchmarks/costs.py: every method timed back to back in one process."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["run"] == rows[-1]["run"]]
    lines = [f"### Costs, every method in one process (`{rows[0]['command']}`, {rows[0]['run']})", "",
             f"{rows[0]['timing_samples']} SQuAD-dev questions at batch size 1, median; ratios to full context "
             "(frozen decoder) of the same run. TTFT excludes compression, which is offline for a store.", "",
             "| method | ratio | compress s/chunk | TTFT ms | TTFT vs full | decode tok/s | KV per query "
             "| KV vs full |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']} | {_fmt(r['compress_s_per_chunk'], 3)} | "
                     f"{_fmt(r['ttft_s'] * 1000, 0)} | {_fmt(r['ttft_s_vs_full_context'], 2)}x | "
                     f"{_fmt(r['decode_tokens_per_s'])} | {r['kv_bytes_per_query'] / 1e6:.2f} MB | "
                     f"{_fmt(r['kv_bytes_per_query_vs_full_context'], 2)}x |")
    return lines + [""]


def plots(rows: list[dict], out: Path, dataset: str = "squad-dev", n: int | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dataset"] == dataset]
    n = n or max((r["n"] for r in rows), key=lambda k: sum(r["n"] == k for r in rows))
    rows = [r for r in rows if r["n"] == n]
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines = defaultdict(list)
    for r in rows:
        lines[family(r["method"])].append((r.get("ratio") or 1, r["f1"]))
    for name, points in sorted(lines.items()):
        points.sort()
        xs, ys = zip(*points)
        if xs == (1,) or name.startswith("no"):  # uncompressed references: horizontal lines
            ax.axhline(ys[0], ls=":" if name.startswith("no") else "--", lw=1,
                       color="k" if name == "full-ft" else "gray")
            ax.annotate(name, (1.02, ys[0]), xycoords=("axes fraction", "data"), fontsize=7, va="center")
            continue
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (context tokens / KV entries or kept tokens)")
    ax.set_ylabel("SQuAD F1")
    ax.set_title(f"{dataset}, n={n}, SmolLM2-135M")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    quality = out / f"f1_vs_ratio_{dataset}.png"
    fig.savefig(quality, dpi=120)
    plt.close(fig)

    timed = sorted((r for r in rows if r.get("ttft_s")), key=lambda r: r["ttft_s"])
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(timed) + 1.2))
    ax.barh([r["method"] for r in timed], [r["ttft_s"] * 1000 for r in timed], color="tab:blue")
    ax.set_xlabel("time to first token, ms (median, batch 1, CPU; compression excluded)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    speed = out / f"ttft_{dataset}.png"
    fig.savefig(speed, dpi=120)
    plt.close(fig)
    return [quality, speed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d != "squad-dev", d))
    plotted = [d for d in datasets if d in ("squad-dev", "squadshifts-new-wiki")]
    pictures = [p for d in plotted for p in plots(rows, HERE / "plots", d)]
    commands = sorted({r["command"] for r in rows if r.get("command")})
    text = ["# Benchmark results", "",
            "Generated by `python benchmarks/report.py` from `benchmarks/results/*.jsonl`; each row was produced",
            "by the command listed below it (SmolLM2-135M, bf16, CPU, greedy, stop at newline, standard SQuAD",
            "metrics, fixed seeded nested subsets: the first n questions of seed 0). TTFT and KV bytes are also",
            "given as ratios to full context with the frozen decoder on the same n.", ""]
    text += [*(f"![{p.stem}](plots/{p.name})" for p in pictures), ""]
    for d in datasets:
        text += [table(rows, d), ""]
    text += costs_table(args.results / "costs.jsonl")
    text += ["### Commands", "", *(f"    {c}" for c in commands), ""]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out} and {len(pictures)} plots ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
