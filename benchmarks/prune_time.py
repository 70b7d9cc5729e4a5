"""Time trace + plan + apply for every torchvision conv net, ours vs Torch-Pruning, same run.

Both tools prune at the same ratio with L2 magnitude, in turns (ours, theirs, ours, theirs …) on
fresh model instances; the table shows medians. Torch-Pruning prunes in place, so its time is
DependencyGraph + MetaPruner + step(); ours is surgery.plan + surgery.apply (a new model).

    ./run python benchmarks/prune_time.py [--size 224] [--repeats 3] [--models resnet18 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torchvision

import surgery
from surgery.bench import environment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from zoo import conv_nets  # noqa: E402


def build(name: str) -> torch.nn.Module:
    kw = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kw).eval()


def ours(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> float:
    t = time.perf_counter()
    surgery.apply(model, surgery.plan(model, x, ratio=ratio))
    return time.perf_counter() - t


def theirs(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> float:
    import torch_pruning as tp

    heads = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == 1000
             or isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=heads).step()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "prune_time.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or conv_nets()
    warm = torch.randn(1, 3, 64, 64)  # first-call costs (imports, lazy init) are not pruning
    ours(build("resnet18"), warm, args.ratio)
    theirs(build("resnet18"), warm, args.ratio)
    rows = []
    print("| model | surgery s | Torch-Pruning s | TP / surgery |\n|---|---|---|---|", flush=True)
    for name in names:
        size = 299 if name == "inception_v3" else args.size
        x = torch.randn(1, 3, size, size)
        a, b, err = [], [], ""
        for _ in range(args.repeats):
            torch.manual_seed(0)
            a.append(ours(build(name), x, args.ratio))
            try:
                b.append(theirs(build(name), x, args.ratio))
            except Exception as e:  # Torch-Pruning cannot prune this model
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                break
        row = {"model": name, "ours_s": statistics.median(a),
               "tp_s": statistics.median(b) if b and not err else None, "tp_error": err}
        rows.append(row)
        tp_s = f"{row['tp_s']:.2f}" if row["tp_s"] else f"failed ({err})"
        ratio = f"{row['tp_s'] / row['ours_s']:.2f}" if row["tp_s"] else ""
        print(f"| {name} | {row['ours_s']:.2f} | {tp_s} | {ratio} |", flush=True)
    both = [r for r in rows if r["tp_s"]]
    tot_a, tot_b = sum(r["ours_s"] for r in both), sum(r["tp_s"] for r in both)
    print(f"| **total ({len(both)} models both prune)** | {tot_a:.1f} | {tot_b:.1f} | "
          f"{tot_b / tot_a:.2f} |")
    env = {"cpu": environment(args.threads, ())["cpu"],
           "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "python": platform.python_version(), "size": args.size, "ratio": args.ratio,
           "repeats": args.repeats}
    print(f"\nMedians of {args.repeats} alternating runs; {env}")
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows, "total_ours_s": tot_a, "total_tp_s": tot_b}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
