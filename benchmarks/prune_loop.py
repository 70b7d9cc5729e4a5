"""Prune time in a loop, as a user's script meets it: one process builds a fresh model, prunes it
(timed), and goes on, ``--n`` times, without the forced garbage collection that
``prune_time.py`` runs before each timed region. So the timings include what the cyclic garbage
collector costs: its young collections and, every so often, a full walk of the heap of a process
that imports torch (0.1-0.2 s on the 2-core VM here).

Each (tool, model) runs in a process of its own, with the same imports (torch, torchvision,
timm, surgery, torch_pruning), so no run inherits another's heap. Ours is ``surgery.prune``
with its default verification; Torch-Pruning is DependencyGraph + MetaPruner + ``step()`` at the
same ratio (L2 magnitude, the classifier kept). Reports mean, median and worst per prune, the
full (generation 2) collections that ran inside the timed prunes, and the mean of each whole
iteration (building the model, pruning, dropping both) with the full collections anywhere in the
loop: a collection a tool only puts off lands there.

    ./run python benchmarks/prune_loop.py [--models mnasnet0_5 timm:mobilenetv2_050 ...]
                                          [--n 20] [--tools surgery tp] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

DEFAULT = ["mnasnet0_5", "resnet18", "timm:mobilenetv2_050", "timm:efficientnet_lite0",
           "timm:convnext_atto", "timm:vit_tiny_patch16_224"]


def _build(name: str):  # type: ignore[no-untyped-def]
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False).eval()
        return model, torch.randn(1, *model.pretrained_cfg["input_size"]), model.get_classifier()
    model = torchvision.models.get_model(name, weights=None).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return model, torch.randn(1, 3, 224, 224), head


def _child(tool: str, name: str, n: int, ratio: float) -> dict:
    """Runs in its own process: ``n`` timed prunes of fresh models."""
    import torch
    import torch_pruning as tp

    import surgery

    warnings.simplefilter("ignore")
    full = [0, 0]  # full collections: inside the timed prunes, anywhere in the loop
    timing = [False, False]

    def seen(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2 and timing[1]:
            full[0] += timing[0]
            full[1] += 1

    gc.callbacks.append(seen)
    times, loops = [], []
    for i in range(n + 1):
        timing[1] = bool(i)
        start = time.perf_counter()
        model, x, head = _build(name)
        timing[0] = True
        t = time.perf_counter()
        if tool == "surgery":
            surgery.prune(model, x, ratio=ratio)
        else:
            tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                 pruning_ratio=ratio, ignored_layers=[head]).step()
        dt = time.perf_counter() - t
        timing[0] = False
        del model, x, head
        if i:  # the first reads sources and warms caches
            times.append(dt)
            loops.append(time.perf_counter() - start)
    return {"tool": tool, "model": name, "n": n, "torch": torch.__version__,
            "mean_ms": statistics.mean(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
            "max_ms": max(times) * 1e3, "full_collections": full[0],
            "loop_mean_ms": statistics.mean(loops) * 1e3, "loop_full_collections": full[1],
            "surgery": os.path.dirname(surgery.__file__)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT)
    ap.add_argument("--tools", nargs="*", default=["surgery", "tp"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.n, args.ratio)))
        return 0
    rows = []
    print("| model | tool | prune: mean ms | median ms | worst ms | full collections in the "
          "prunes | loop (build + prune): mean ms | full collections in the loop |")
    print("|---|---|---|---|---|---|---|---|")
    for k, name in enumerate(args.models):
        # the tools' order alternates from model to model, so the VM's drift falls on both
        for tool in args.tools if k % 2 == 0 else args.tools[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", tool, name, "--n",
                                  str(args.n), "--ratio", str(args.ratio)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{tool} on {name} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {name} | {tool} | {row['mean_ms']:.0f} | {row['median_ms']:.0f} | "
                  f"{row['max_ms']:.0f} | {row['full_collections']} | "
                  f"{row['loop_mean_ms']:.0f} | {row['loop_full_collections']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "ratio": args.ratio, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
