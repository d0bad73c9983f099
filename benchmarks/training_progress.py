"""How far training has carried the 5x compressor toward the issue's target, as a picture.

    python benchmarks/training_progress.py    # -> benchmarks/plots/sac5x_training_progress.png

Plots SQuAD-dev F1 (the headline's 1,000 seeded questions, with 95% CIs) of each stage of the
shipped 5x compressor's lineage against the training steps it had seen in all (8 paragraphs x 4
questions per step; MODEL_CARD.md of ``smollm2-135m-sac-5x`` gives each stage's config and wall
time), beside Full-FT, 75% of Full-FT (the target) and untrained KV dropping; a second series
holds the stages read in float32 (stage 5 again, and the later stages, trained on a CPU without
native bfloat16), since a read's dtype moves F1 by about as much as a stage; and, beside them, stages
18 and 70 with free decoding (8 beams + MBR) against the target as the issue measures it (75% of
Full-FT with its own chosen decoding, 4 beams and length penalty 0). It prints the
same numbers as a table and two least-squares lines of F1 against log2(steps), one through every
stage and one through the distillation stages (the last three), each with the steps it would need
to reach the target. Those are extrapolations of few points whose neighbours differ by less than
their CIs, and the first line owes most of its slope to recipe changes, not steps: not forecasts,
only the order of compute the target asks of this recipe.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from report import DEFAULT_DTYPE, HERE, load_rows

from sac_rag.eval import decoding_suffix


@dataclass(frozen=True)
class Stage:
    label: str  # the method name of its n=1,000 squad-dev row
    steps: int  # training steps seen in all, this stage's included
    name: str
    recipe: str


LINEAGE = (
    Stage("sac-5x-decoder-adapter", 600, "stages 1-2", "answer cross-entropy, then + decoder adapter"),
    Stage("sac-5x-rag-distractors", 800, "stage 3", "+ 2 distractor passages"),
    Stage("sac-5x-distilled", 1000, "stage 4", "+ KL to Full-FT on question and answer tokens"),
    Stage("sac-5x-distill-decay", 1200, "stage 5 (old default)", "the same, rate decayed to 0"),
    Stage("sac-5x-stage6-from-bf16", 1350, "stage 6 (not shipped)", "+ hidden states, lr 1e-3 (RAG -3.3)"),
)
# Later stages were trained and read in float32 on a CPU without native bfloat16 (sac_rag.devices);
# stage 5 read the same way is their reference (+0.7 F1 over its bfloat16 read, paired, not significant).
LINEAGE_FLOAT32 = (
    Stage("sac-5x-stage5-fp32", 1200, "stage 5 (old default)", "read in float32"),
    Stage("sac-5x-stage7-fp32", 1320, "stage 7 (not shipped)", "stage 5's recipe, 120 more steps"),
    Stage("sac-5x-stage8-fp32", 1520, "stage 8 (not shipped)", "stage 7's recipe, 200 more steps"),
    Stage("sac-5x-stage9-fp32", 1580, "stage 9 (not shipped)", "60 steps of it beside 2 distractors (RAG +0.7)"),
    Stage("sac-5x-stage10-fp32", 1700, "stage 10 (not shipped)", "120 more, a quarter beside 2 distractors (RAG -1.4)"),
    Stage("sac-5x-stage11-fp32", 1790, "stage 11 (old default)", "90 more, half beside 2 distractors (RAG +0.5)"),
    Stage("sac-5x-stage12-fp32", 1910, "stage 12 (not shipped)", "120 more of stage 11's recipe (RAG +1.0)"),
    Stage("sac-5x-stage13-fp32", 2010, "stage 13 (not shipped)", "100 more of that recipe (out of domain -4.1 vs 11)"),
    Stage("sac-5x-stage15-fp32", 2130, "stage 15 (not shipped)", "120 more of it, from stage 14"),
    Stage("sac-5x-stage17-fp32", 2210, "stage 17 (not shipped)", "80 more of it, from stage 16"),
    Stage("sac-5x-stage27-fp32", 2430, "stage 27 (not shipped)", "100 more at half the rate, from stage 20"),
)
# No steps of their own: the weights of two stages averaged (benchmarks/average_compressors.py),
# drawn apart from the line of trained stages at the steps of the later one.
AVERAGED = (
    Stage("sac-5x-soup11-13-fp32", 2010, "stage 14 (old default)", "11 and 13 averaged (out of domain -0.5 vs 11)"),
    Stage("sac-5x-soup14-15-fp32", 2130, "stage 16 (old default)", "14 and 15 averaged (out of domain -0.4, n=600)"),
    Stage("sac-5x-soup16-17-fp32", 2210, "stage 18 (old default)",
          "16 and 17 averaged (+0.2 vs 16; OOD +1.7; RAG +0.3)"),
    Stage("sac-5x-soup18-19-fp32", 2330, "stage 20 (not shipped)", "18 and 19 (120 steps on) averaged (+0.3 vs 18)"),
    Stage("sac-5x-soup20-27-fp32", 2430, "stage 28 (not shipped)", "20 and 27 (100 steps on) averaged (+0.6 vs 18)"),
    Stage("sac-5x-soup28-30-fp32", 2490, "stage 31 (not shipped)",
          "28 and 30 (60 steps on, half rate) averaged (+0.2 vs 18)"),
    Stage("sac-5x-soup31-32-fp32", 2550, "stage 33 (not shipped)",
          "31 and 32 (60 steps on, half rate) averaged (-0.5 vs 18)"),
    Stage("sac-5x-soup68-69-fp32", 2330, "stage 70 (shipped)",
          "68 (18 and 60 single-paragraph steps on, averaged) and 69 (60 more) averaged"),
)
# The target is stated for free decoding: each model at the decoding chosen for it on other
# questions (the compressor: 8 beams + minimum Bayes risk; Full-FT: FREE_DECODING_FULL_FT).
FREE_DECODING = (
    Stage("sac-5x-fp32-beam8-mbr", 2210, "stage 18", "8 beams + MBR"),
    Stage("sac-5x-soup68-69-fp32-beam8-mbr", 2330, "stage 70", "8 beams + MBR"),
)
FREE_DECODING_DATASET = "squad-dev" + decoding_suffix(num_beams=8, mbr=True)
FREE_DECODING_FULL_FT = "full-ft-fp32-beam4-lp0"  # 4 beams, length_penalty=0.0, float32
FREE_DECODING_FULL_FT_DATASET = "squad-dev" + decoding_suffix(num_beams=4, length_penalty=0.0)
TARGET_SHARE = 0.75


def fit_log2(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``f1 = a + b * log2(steps)``; returns (a, b)."""
    xs = [math.log2(s) for s, _ in points]
    ys = [f for _, f in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def f1_with_ci(row: dict) -> str:
    low, high = row["f1_ci"]
    return f"{row['f1']:.1f} ({low:.1f}-{high:.1f})"


def error_bar(row: dict) -> list[list[float]]:
    """``yerr`` for one point: the distances from F1 down and up to its 95% CI."""
    return [[row["f1"] - row["f1_ci"][0]], [row["f1_ci"][1] - row["f1"]]]


def steps_for(f1: float, a: float, b: float) -> float:
    """Where the line ``a + b * log2(steps)`` reaches ``f1`` (infinite if it never rises)."""
    return 2 ** ((f1 - a) / b) if b > 0 else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "plots" / "sac5x_training_progress.png")
    args = parser.parse_args(argv)

    headline = ("squad-dev", FREE_DECODING_DATASET, FREE_DECODING_FULL_FT_DATASET)
    rows = {r["method"]: r for r in load_rows(args.results) if r["dataset"] in headline and r["n"] == 1000}
    missing = [s.label for s in LINEAGE + LINEAGE_FLOAT32 + AVERAGED + FREE_DECODING if s.label not in rows] + [
        m for m in ("full-ft", "kv-dropping-5x", FREE_DECODING_FULL_FT) if m not in rows]
    if missing:
        parser.error(f"no squad-dev n=1000 row for {missing} in {args.results}")
    full_ft, dropping = rows["full-ft"]["f1"], rows["kv-dropping-5x"]["f1"]
    # a stage's share is of Full-FT read in the same dtype, where that row exists
    full_ft_fp32 = rows.get("full-ft-fp32")
    full_ft_in = {DEFAULT_DTYPE: full_ft, "float32": (full_ft_fp32 or rows["full-ft"])["f1"]}
    target = TARGET_SHARE * full_ft
    points = [(s.steps, rows[s.label]["f1"]) for s in LINEAGE]
    fits = {name: (subset[0][0], *fit_log2(subset))  # (first step, a, b)
            for name, subset in (("every stage", points), ("the last three", points[-3:]))}

    print("| stage | recipe | read in | steps | F1 (95% CI) | share of Full-FT |\n|---|---|---|---|---|---|")
    for stage in LINEAGE + LINEAGE_FLOAT32 + AVERAGED:
        row = rows[stage.label]
        dtype = row.get("dtype", DEFAULT_DTYPE)
        print(f"| {stage.name} | {stage.recipe} | {dtype} | {stage.steps} "
              f"| {f1_with_ci(row)} | {row['f1'] / full_ft_in[dtype]:.0%} |")
    free_full_ft = rows[FREE_DECODING_FULL_FT]["f1"]
    free_target = TARGET_SHARE * free_full_ft
    for stage in FREE_DECODING:
        row = rows[stage.label]
        print(f"| {stage.name}, {stage.recipe} | free decoding | {row.get('dtype', DEFAULT_DTYPE)} | {stage.steps} "
              f"| {f1_with_ci(row)} | {row['f1'] / free_full_ft:.1%} of {free_full_ft:.1f} |")
    in_fp32 = f", {full_ft_fp32['f1']:.1f} read in float32" if full_ft_fp32 else ""
    print(f"\nFull-FT {full_ft:.1f}{in_fp32}; target {TARGET_SHARE:.0%} of {full_ft:.1f} = {target:.1f}; "
          f"KV dropping {dropping:.1f}; with free decoding Full-FT {free_full_ft:.1f}, "
          f"target {free_target:.1f}")
    trained = max(s.steps for s in LINEAGE + LINEAGE_FLOAT32 + AVERAGED)  # an average's steps were trained too
    for name, (_, a, b) in fits.items():
        needed = steps_for(target, a, b)
        print(f"line through {name}: {b:.1f} F1 per doubling of steps; the target at about "
              f"{needed:,.0f} steps ({needed / trained:.1f}x the {trained:,} trained so far)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7.5))
    for lineage, style, label, named, nudge in (
            (LINEAGE, dict(marker="*", markersize=10, color="black"), "SAC 5x, read in bfloat16 (95% CI)", LINEAGE, 0),
            (LINEAGE_FLOAT32, dict(marker="o", markersize=5, color="tab:green"),
             "SAC 5x, read in float32; the later stages also trained in it (95% CI)", LINEAGE_FLOAT32[1:], -8)):
        f1 = [rows[s.label]["f1"] for s in lineage]
        errors = [[f - rows[s.label]["f1_ci"][0] for s, f in zip(lineage, f1)],
                  [rows[s.label]["f1_ci"][1] - f for s, f in zip(lineage, f1)]]
        ax.errorbar([s.steps for s in lineage], f1, yerr=errors, capsize=3, label=label, **style)
        # a stage within 10% of the steps of the one before it is named below its error bar, so both stay legible
        for at, stage in enumerate(lineage):
            if stage not in named:
                continue
            below = at > 0 and stage.steps < 1.1 * lineage[at - 1].steps
            y = f1[at] - errors[0][at] if below else f1[at] + errors[1][at]
            offset = (0, -4) if below else (nudge, 4)
            ax.annotate(stage.name, (stage.steps, y), textcoords="offset points", xytext=offset,
                        fontsize=7, ha="center", va="top" if below else "bottom", rotation=90)
    for at, stage in enumerate(AVERAGED):  # colours C3, C4, ... of the default cycle: red, purple, brown, ...
        color = f"C{3 + at}"
        averaged = rows[stage.label]
        same_steps = sum(other.steps == stage.steps for other in AVERAGED[:at])  # side by side, not on top
        ax.errorbar([stage.steps * (1.04 + 0.03 * same_steps)], [averaged["f1"]], capsize=3, marker="D",
                    markersize=6, color=color,
                    yerr=error_bar(averaged),
                    label=f"{stage.name}: {stage.recipe}, float32 (95% CI)")
    for stage in FREE_DECODING:
        free = rows[stage.label]
        ax.errorbar([stage.steps * 1.1], [free["f1"]], capsize=3, marker="^", markersize=7, color="tab:orange",
                    mfc="white", yerr=error_bar(free))
        ax.annotate(stage.name.removeprefix("stage "), (stage.steps * 1.1, free["f1_ci"][1]),
                    textcoords="offset points", xytext=(0, 3), fontsize=7, ha="center", va="bottom")
    ax.plot([], [], marker="^", mfc="white", color="tab:orange", ls="none",
            label="stages 18 and 70 with free decoding (8 beams + MBR), float32 (95% CI)")
    ax.axhline(free_target, color="tab:orange", ls=":", lw=1,
               label=f"target with free decoding: {TARGET_SHARE:.0%} of Full-FT's {free_full_ft:.1f} "
                     f"(4 beams, length penalty 0) = {free_target:.1f}")
    for (name, (first, a, b)), style in zip(fits.items(), (":", "-.")):
        span = [first, min(steps_for(target, a, b), points[-1][0] * 8)]
        ax.plot(span, [a + b * math.log2(s) for s in span], color="gray", ls=style, lw=1,
                label=f"line in log2(steps) through {name}: {b:.1f} F1 per doubling")
    ax.axhline(full_ft, color="k", ls="--", lw=1, label=f"Full-FT (reads the text) {full_ft:.1f}")
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target: {TARGET_SHARE:.0%} of Full-FT = {target:.1f}")
    ax.axhline(dropping, color="tab:blue", ls="-", lw=1, label=f"untrained KV dropping 5x {dropping:.1f}")
    ax.set_xscale("log")
    ticks = [500, 1000, 2000, 4000, 8000]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training steps seen in all (8 paragraphs x 4 questions each)")
    ax.set_ylabel("SQuAD-dev F1, n=1,000")
    ax.set_ylim(0, full_ft + 10)
    ax.set_title("smollm2-135m-sac-5x: F1 after each training stage (2 CPU cores)", fontsize=10)
    # below the axes: the stage names need the plot area
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
