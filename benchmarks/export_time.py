"""Export wall time and peak RSS at 1.7B shapes: smolexport's default int4 (and `--preset rtn`) against
onnxruntime-genai's model builder int4, one after the other on the same random-weight checkpoint.

    .venv/bin/python benchmarks/export_time.py [--output benchmarks/results]

Needs benchmarks/work/smollm2-1.7b-random (benchmarks/make_random_checkpoint.py) and the peers' venv
(benchmarks/setup_peers.sh). Each command runs under `/usr/bin/time -v`; writes results/export-time-1.7b.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import BENCH, PEERS, VENV, WORK, cpu_model  # noqa: E402

CHECKPOINT = WORK / "smollm2-1.7b-random"
OUT = WORK / "export-time"


def timed(cmd: list) -> dict:
    result = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024)}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ours = [VENV / "smolexport", "onnx", "--model", CHECKPOINT, "--quant", "int4", "-q", "--output"]
    runs = {  # name -> (command, the folder it writes)
        "smolexport --quant int4 (default)": ([*ours, OUT / "ours"], OUT / "ours"),
        "smolexport --quant int4 --preset rtn": ([*ours, OUT / "rtn", "--preset", "rtn"], OUT / "rtn"),
        "onnxruntime-genai builder -p int4": ([PEERS, "-m", "onnxruntime_genai.models.builder", "-i", CHECKPOINT,
                                               "-o", OUT / "genai", "-p", "int4", "-e", "cpu", "-c", OUT / "cache"],
                                              OUT / "genai"),
    }  # fmt: skip
    cpu = cpu_model()
    rows = []
    for name, (cmd, folder) in runs.items():
        row = {"name": name, **timed(cmd), "folder_mb": round(folder_mb(folder), 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    builder = rows[-1]["seconds"]
    stamp = datetime.date.today().isoformat()
    lines = [f"<!-- {stamp}, {cpu}, `benchmarks/export_time.py` -->",
             f"**SmolLM2-1.7B shapes, random weights, 2 cores** ({cpu})", "",
             "| export | wall s | / genai builder | peak RSS MB | folder MB |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['name']} | {r['seconds']:.0f} | {r['seconds'] / builder:.2f} | {r['peak_rss_mb']} | "
                     f"{r['folder_mb']:.0f} |")  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "export-time-1.7b.json").write_text(json.dumps({"cpu": cpu, "date": stamp, "rows": rows}, indent=1))
    (args.output / "export-time-1.7b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
