"""The bytes-per-token trade of issue 24 as one plot: 1.7B-shaped decode speed against 135M dev-set fidelity.

    .venv/bin/python benchmarks/ffn_frontier.py --decode A.json [B.json ...] --fidelity FRONTIER.json

Speed can only be measured at 1.7B shapes on random weights (`benchmarks/decode_ab.py`, every run with
llama.cpp Q4_0 as `q4_0`), and fidelity only on the real 135M model (`benchmarks/frontier.py --ours-only`, the
dev set); a recipe is the same flags at both sizes. x: decode speed as the median of per-round ratios to
llama.cpp Q4_0 in the same run (several runs: their mean); y: mean KL on the 135M dev set. Writes
docs/ffn-block-frontier.svg and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# decode_ab label -> the frontier row of the same flags
POINTS = {
    "rtn32": "smolexport int4 --preset rtn",
    "rtn-ffn128": "smolexport int4 --preset rtn --ffn-block-size 128",
    "rtn-all128": "smolexport int4 --preset rtn --block-size 128",
    "default": "smolexport int4 (default)",
    "default-ffn64": "smolexport int4 --ffn-block-size 64",
    "default-ffn128": "smolexport int4 --ffn-block-size 128",
    "default-all128": "smolexport int4 --block-size 128",
}


def ratios(files: list[Path]) -> dict[str, list[float]]:
    """label -> [median per-round ratio to q4_0, one per run]."""
    out: dict[str, list[float]] = {}
    for path in files:
        rows = {r["label"]: r for r in json.loads(path.read_text())["rows"]}
        base = rows["q4_0"]["rounds"]
        for label, row in rows.items():
            per_round = [a / b for a, b in zip(row["rounds"], base, strict=True)]
            out.setdefault(label, []).append(statistics.median(per_round))
    return out


def svg(points: list[dict], width: int = 760, height: int = 460) -> str:
    """A plain SVG scatter plot (no plotting library in the project's venv): x linear, y (KL) logarithmic."""
    import math

    left, right, top, bottom = 70, 20, 40, 60
    xs = [p["vs_q4_0"] for p in points] + [1.0, 1.25]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = math.log10(min(p["kl"] for p in points) / 1.3), math.log10(max(p["kl"] for p in points) * 1.3)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(kl: float) -> float:
        return top + (y1 - math.log10(kl)) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" font-size="13" text-anchor="middle">Fewer bytes per token: wider blocks '
           "for the feed-forward matrices</text>",
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']  # fmt: skip
    tick = math.floor(x0 * 10) / 10
    while tick <= x1:
        if tick >= x0:
            out.append(f'<text x="{px(tick):.1f}" y="{height - bottom + 16}" font-size="10" '
                       f'text-anchor="middle">{tick:.1f}</text>')  # fmt: skip
        tick = round(tick + 0.1, 2)
    for kl in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        if y0 <= math.log10(kl) <= y1:
            out.append(f'<text x="{left - 6}" y="{py(kl) + 3:.1f}" font-size="10" text-anchor="end">{kl}</text>')
            out.append(f'<line x1="{left}" y1="{py(kl):.1f}" x2="{width - right}" y2="{py(kl):.1f}" '
                       'stroke="#ddd"/>')  # fmt: skip
    for x, color, label in ((1.0, "green", "llama.cpp Q4_0"), (1.25, "red", "target 1.25x Q4_0")):
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{height - bottom}" stroke="{color}" '
                   f'stroke-dasharray="4 3"/><text x="{px(x) + 3:.1f}" y="{top + 12}" font-size="10" '
                   f'fill="{color}">{label}</text>')  # fmt: skip
    for p in points:
        color = "gray" if p["label"].startswith("rtn") else "#1f77b4"
        name = p["name"].replace("smolexport int4 ", "")
        x, y = px(p["vs_q4_0"]), py(p["kl"])
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'
                   f'<text x="{x + 6:.1f}" y="{y - 4:.1f}" font-size="10">{name}</text>')  # fmt: skip
    out.append(f'<text x="{width / 2}" y="{height - 20}" font-size="11" text-anchor="middle">SmolLM2-1.7B shapes: '
               "decode speed / llama.cpp Q4_0 (2 threads, alternated runs)</text>")  # fmt: skip
    out.append(f'<text x="16" y="{height / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 16 '
               f'{height / 2})">SmolLM2-135M: mean KL from the float model, dev set (log)</text>')  # fmt: skip
    out.append(f'<text x="{width - right}" y="{height - 4}" font-size="9" text-anchor="end">blue: recommended '
               "recipe (awq, 8-bit parts); gray: --preset rtn</text>")  # fmt: skip
    return "\n".join(out + ["</svg>"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", type=Path, nargs="+", required=True)
    parser.add_argument("--fidelity", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "ffn-block-frontier.svg")
    args = parser.parse_args()
    speed = ratios(args.decode)
    fidelity = {r["name"]: r for r in json.loads(args.fidelity.read_text())["rows"]}
    points = []
    for label, name in POINTS.items():
        if label in speed and name in fidelity:
            r = fidelity[name]
            points.append({"label": label, "name": name, "vs_q4_0": statistics.mean(speed[label]),
                           "runs": [round(x, 3) for x in speed[label]], "kl": r["kl"], "top1": r["top1"],
                           "ppl_ratio": r["ppl_ratio"], "answer": r.get("answer", "")})  # fmt: skip
    print("| recipe (same flags at both sizes) | 1.7B decode / llama.cpp Q4_0 | 135M dev KL | top-1 | ppl ratio |")
    print("|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: p["vs_q4_0"]):
        runs = " and ".join(f"{x:.2f}" for x in p["runs"])
        print(f"| `{p['name']}` | {runs} | {p['kl']:.4f} | {p['top1']:.3f} | {p['ppl_ratio']:.3f} |")

    args.plot.write_text(svg(points))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
