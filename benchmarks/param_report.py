"""Parameter counts and forward FLOPs of every preset, from the configs alone (meta device).

    python benchmarks/param_report.py --out benchmarks/results/param_report.md
"""

from __future__ import annotations

import argparse

from engram.model import PRESETS, EngramLMConfig, param_report

PAPER = {"paper-27b-shape": (26.7e9, 3.8e9, 5.7e9), "paper-moe-27b-shape": (26.7e9, 3.8e9, 0.0)}


def fmt(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = ["| preset | total | activated | Engram tables | FLOPs/token (fwd, at max positions) | paper (total / activated / Engram) |",
             "|---|---|---|---|---|---|"]
    for name in PRESETS:
        report = param_report(EngramLMConfig.from_preset(name))
        paper = PAPER.get(name)
        paper_cell = " / ".join(fmt(v) if v else "0" for v in paper) if paper else ""
        if paper:
            deltas = [(report[k] - v) / v for k, v in zip(("total", "activated", "engram"), paper) if v]
            paper_cell += " (" + ", ".join(f"{d:+.1%}" for d in deltas) + ")"
        lines.append(f"| {name} | {fmt(report['total'])} | {fmt(report['activated'])} | {fmt(report['engram'])} | "
                     f"{report['flops_per_token'] / 1e9:.2f} GFLOP @ {report['seq_len']} | {paper_cell} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Preset sizes\n\nCommand: `python benchmarks/param_report.py` (counts from the real modules, "
                    "built on the meta device)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
