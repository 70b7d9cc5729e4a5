"""Wall time of `surgery --help`, a subcommand's --help and an argument error (median of N runs).

Torch is imported only by commands that need it, so these should take well under 2 s warm.

    ./run python benchmarks/cli_startup.py [--runs 10] [--json benchmarks/results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {"surgery --help": ["--help"], "surgery prune --help": ["prune", "--help"],
         "surgery prune (missing --ratio value)": ["prune", "resnet20", "--ratio"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    script = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
    subprocess.run([script, "--help"], capture_output=True, check=True)  # warm the file cache
    rows = {}
    print("| command | median s | max s |\n|---|---|---|")
    for name, cmd in CASES.items():
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([script, *cmd], capture_output=True)
            times.append(time.perf_counter() - t)
        rows[name] = {"median_s": statistics.median(times), "max_s": max(times)}
        print(f"| `{name}` | {statistics.median(times):.3f} | {max(times):.3f} |")
    print(f"\nmedian of {args.runs} runs each, warm; {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
