"""Latency targets on the deployment runtime: where the measured speedup lands, and in how
many rounds.

For every model and target: ``surgery.plan(model, x, LatencyTarget(speedup=T, runtime=...,
threads=..., batch=1))`` plans, builds and times round by round on that runtime; this script
records the rounds, the landed speedup at batch 1 (what the loop aimed for) and, measured again
afterwards in a separate alternating run, the speedup at batch 1 and batch 8. A landing must
also hold 0.9 x the target at batch 8 (``floor_batch``, timed only to confirm a landing).

    ./run python benchmarks/latency_target.py                          # 9 models x 2 targets
    ./run python benchmarks/latency_target.py --models resnet18 --targets 2

Run it on a quiet machine: every number is a measurement (medians of alternating runs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

import surgery
from surgery.atomic import write_text

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "vgg16_bn", "densenet121", "regnet_y_800mf", "convnext_tiny"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--targets", nargs="*", type=float, default=[2.0, 3.0])
    ap.add_argument("--runtime", default="ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--floor-batch", type=int, nargs="*", default=[8],
                    help="batch sizes a landing must hold 0.9 x target at (none: no floor)")
    ap.add_argument("--uniform", action="store_true", help="lay plans out uniformly")
    ap.add_argument("--depth", action="store_true", help="also bypass blocks (depth pruning)")
    ap.add_argument("--append", action="store_true", help="keep the other models' rows in --out")
    ap.add_argument("--out", default="benchmarks/results/latency_target.json")
    ap.add_argument("--summary", metavar="FILE", help="only summarise a stored result file")
    args = ap.parse_args(argv)
    if args.summary:
        summarise(json.loads(Path(args.summary).read_text())["rows"])
        return 0
    warnings.simplefilter("ignore")
    rows = []
    if args.append and Path(args.out).exists():
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"]
                if r["model"] not in args.models]
    print("| model | target | rounds | landed (batch 1, in the loop) | re-measured batch 1 | "
          "batch 8 | MACs kept | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for target in args.targets:
            torch.manual_seed(0)
            model = surgery.spec.build_model(f"torchvision:{name}").eval()
            x = torch.randn(1, 3, args.size, args.size)
            start = time.perf_counter()
            plan = surgery.plan(model, x, surgery.LatencyTarget(
                speedup=target, runtime=args.runtime, threads=args.threads,
                allocate=not args.uniform, depth=args.depth,
                floor_batch=tuple(args.floor_batch)))
            seconds = time.perf_counter() - start
            small = surgery.apply(model, plan)
            check = surgery.bench({"original": model, "pruned": small}, (3, args.size, args.size),
                                  runtimes=[args.runtime], batches=[1, 8],
                                  threads=args.threads, rounds=15)
            again = {r.batch: r.speedup for r in check.rows if r.model == "pruned"}
            measured = plan.settings["measured"]
            kept = surgery.count_macs(small, x) / surgery.count_macs(model, x)
            row = {"model": name, "target": target, "rounds": len(plan.settings["trajectory"]),
                   "landed": measured["speedup"], "met": measured["met"],
                   "batch1": again[1], "batch8": again[8], "macs_kept": kept,
                   "seconds": seconds, "trajectory": plan.settings["trajectory"],
                   "bypassed": [b.block for b in plan.bypasses],
                   "env": check.env}
            rows.append(row)
            print(f"| {name} | {target:g}x | {row['rounds']} | {measured['speedup']:.2f}x"
                  f"{'' if measured['met'] else ' (not met)'} | {again[1]:.2f}x | "
                  f"{again[8]:.2f}x | {kept:.0%} | {seconds:.0f} |", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_text(args.out, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    summarise(rows)
    return 0


def summarise(rows: list[dict]) -> None:
    """Per target: landings, re-measured in range, rounds, batch-8 floors; over all rows: how
    a separate re-measurement differs from the loop's figure (log ratio) and the loop's
    measurement noise (median half-width of the rounds' 95% intervals, log)."""
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target]
        inside = sum(target <= r["batch1"] <= 1.15 * target for r in mine)
        print(f"\ntarget {target:g}x: landed in range in the loop for "
              f"{sum(r['met'] for r in mine)} of {len(mine)}; re-measured in [target, 1.15 x "
              f"target] at batch 1 for {inside} of {len(mine)}; median rounds "
              f"{statistics.median(r['rounds'] for r in mine):g}; batch 8 >= 0.9 x target for "
              f"{sum(r['batch8'] >= 0.9 * target for r in mine)} of {len(mine)}")
    drift = [math.log(r["batch1"] / r["landed"]) for r in rows]
    widths = [math.log(t["interval"][1] / t["interval"][0]) / 2
              for r in rows for t in r["trajectory"] if "interval" in t]
    print(f"\nre-measured / loop (log) over {len(rows)}: mean {statistics.mean(drift):+.1%}, "
          f"standard deviation {statistics.pstdev(drift):.1%}; rounds' 95% half-width (log): "
          f"median {statistics.median(widths) if widths else 0:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
