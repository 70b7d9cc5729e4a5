"""Speed bought without accuracy: at the same measured speedup, do latency-targeted plans (width
laid out for the runtime, and with depth pruning) keep the uniform plan's accuracy?

For each seed: train ResNet-20 on scikit-learn's digits (upsampled), then for every speedup
target prune it three ways with a measured latency target on ONNX Runtime CPU
(``LatencyTarget``: plan, build, time, correct until the measured speedup lands in
[target, 1.15 x target]): uniformly, laid out for the runtime (``allocate``), and laid out with
depth pruning (``allocate`` + ``depth``). Each pruned model is fine-tuned the same way; the table
shows means over seeds of the measured speedup and the validation accuracy (360 images: one
image is 0.28 points).

    ./run python benchmarks/latency_accuracy.py                # 3 seeds, targets 2x and 3x
    ./run python benchmarks/latency_accuracy.py --seeds 1 --epochs 2 --ft-epochs 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch

import surgery
from surgery.atomic import write_text
from surgery.bench import environment
from surgery.data import digits
from surgery.finetune import FinetuneConfig, evaluate, finetune
from surgery.spec import build_model

HERE = os.path.dirname(__file__)
VARIANTS = {"uniform": {"allocate": False}, "latency": {"allocate": True},
            "latency+depth": {"allocate": True, "depth": True}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", nargs="*", type=float, default=[2.0, 3.0])
    ap.add_argument("--runtime", default="ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="digits are upsampled from 8x8")
    ap.add_argument("--epochs", type=int, default=30, help="training of the unpruned model")
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--calibration", type=int, default=64,
                    help="training images given as the example inputs: they score channels and "
                         "blocks (timing is at batch 1 on random inputs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latency_accuracy.json"))
    args = ap.parse_args()
    train, val = digits("train", size=args.size), digits("val", size=args.size)
    x = train.tensors[0][:args.calibration]
    rows: list[dict] = []
    t0 = time.time()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = build_model("resnet20")
        finetune(base, train, val, config=FinetuneConfig(epochs=args.epochs, lr=0.1, seed=seed))
        base.eval()
        base_acc, base_macs = evaluate(base, val), surgery.count_macs(base, x[:1])
        print(f"seed {seed}: unpruned accuracy {base_acc:.4f} ({time.time() - t0:.0f}s)",
              flush=True)
        for target in args.targets:
            for name in args.variants:
                config = surgery.LatencyTarget(speedup=target, runtime=args.runtime,
                                               threads=args.threads, round_to=1,
                                               **VARIANTS[name])  # type: ignore[arg-type]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = surgery.plan(base, x, config)
                small = surgery.apply(base, plan)
                surgery.verify(base, small, plan, x)
                measured = plan.settings["measured"]
                row = {"seed": seed, "target": target, "variant": name, "unpruned": base_acc,
                       "speedup": measured["speedup"], "met": measured["met"],
                       "rounds": len(plan.settings["trajectory"]),
                       "mac_reduction": base_macs / surgery.count_macs(small, x[:1]),
                       "bypassed": [b.block for b in plan.bypasses],
                       "before": evaluate(small, val)}
                row["finetuned"] = finetune(small, train, val, config=FinetuneConfig(
                    epochs=args.ft_epochs, lr=0.02, seed=seed))[-1].val_acc
                rows.append(row)
                print(json.dumps(row), flush=True)
                machine = {**environment(args.threads, [args.runtime]),
                           "platform": platform.platform()}
                write_text(args.out, json.dumps({"args": vars(args), "machine": machine,
                                                 "rows": rows}, indent=1))
    table(rows)
    return 0


def table(rows: list[dict]) -> None:
    print("\n| target | plan | measured speedup (mean) | met | MAC reduction | blocks bypassed "
          "| fine-tuned accuracy | vs uniform (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for target in sorted({r["target"] for r in rows}):
        sel = [r for r in rows if r["target"] == target]
        uni = [r["finetuned"] for r in sel if r["variant"] == "uniform"]
        for name in dict.fromkeys(r["variant"] for r in sel):
            v = [r for r in sel if r["variant"] == name]
            acc = statistics.mean(r["finetuned"] for r in v)
            gap = f"{100 * (acc - statistics.mean(uni)):+.2f}" if uni else "-"
            uni_by = {r["seed"]: r["finetuned"] for r in sel if r["variant"] == "uniform"}
            paired = [100 * (r["finetuned"] - uni_by[r["seed"]]) for r in v
                      if r["seed"] in uni_by]
            if paired and name != "uniform":  # same seed, same trained net: the spread of gaps
                gap += f" ({min(paired):+.2f} to {max(paired):+.2f})"
            print(f"| {target:g}x | {name} | {statistics.mean(r['speedup'] for r in v):.2f}x | "
                  f"{sum(r['met'] for r in v)}/{len(v)} | "
                  f"{statistics.mean(r['mac_reduction'] for r in v):.2f}x | "
                  f"{statistics.mean(len(r['bypassed']) for r in v):.1f} | "
                  f"{100 * acc:.2f} | {gap} |")
    print(f"\nMeans over {len({r['seed'] for r in rows})} seeds; accuracy in % on 360 "
          "validation images (one image = 0.28 points).")


if __name__ == "__main__":
    raise SystemExit(main())
