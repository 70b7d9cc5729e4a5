"""The sparsity-accuracy curve: ResNet-20 on scikit-learn's digits, every criterion and ratio.

For each seed: train ResNet-20 from scratch, then for every criterion and ratio prune it and
measure validation accuracy before fine-tuning, after BatchNorm recalibration, after fine-tuning,
and after fine-tuning with distillation from the unpruned model. Figures are means over seeds
(the validation set has 360 images: one image is 0.28 points).

    ./run python benchmarks/accuracy.py                        # the full sweep (long)
    ./run python benchmarks/accuracy.py --seeds 1 --ratios 0.5 --epochs 2 --ft-epochs 1  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import surgery
from surgery.data import digits
from surgery.finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn
from surgery.spec import build_model

HERE = os.path.dirname(__file__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ratios", nargs="*", type=float,
                    default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--criteria", nargs="*", default=["l1", "l2", "bn_scale", "random"])
    ap.add_argument("--epochs", type=int, default=30, help="training of the unpruned model")
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=16, help="digits are upsampled from 8x8")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    ap.add_argument("--plot", default=os.path.join(HERE, "results", "accuracy.png"))
    args = ap.parse_args()
    train, val = digits("train", size=args.size), digits("val", size=args.size)
    x = train.tensors[0][:1]
    rows = []
    t0 = time.time()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = build_model("resnet20")
        finetune(base, train, val, config=FinetuneConfig(epochs=args.epochs, lr=0.1, seed=seed))
        base_acc, base_macs = evaluate(base, val), surgery.count_macs(base, x)
        print(f"seed {seed}: unpruned accuracy {base_acc:.4f} ({time.time() - t0:.0f}s)",
              flush=True)
        for criterion in args.criteria:
            for ratio in args.ratios:
                small = surgery.prune(base, x, ratio=ratio, criterion=criterion, round_to=1,
                                      seed=seed)
                row = {"seed": seed, "criterion": criterion, "ratio": ratio,
                       "unpruned": base_acc,
                       "mac_reduction": base_macs / surgery.count_macs(small, x),
                       "before": evaluate(small, val)}
                recalibrate_bn(small, train)
                row["recalibrated"] = evaluate(small, val)
                cfg = FinetuneConfig(epochs=args.ft_epochs, lr=0.02, seed=seed)
                ft = copy.deepcopy(small)
                row["finetuned"] = finetune(ft, train, val, config=cfg)[-1].val_acc
                kd = copy.deepcopy(small)
                row["distilled"] = finetune(
                    kd, train, val, teacher=base,
                    config=FinetuneConfig(epochs=args.ft_epochs, lr=0.02, seed=seed,
                                          distill=0.7))[-1].val_acc
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    table(rows)
    plot(rows, args.plot)
    return 0


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def table(rows: list[dict]) -> None:
    print("\n| criterion | ratio | MAC reduction | before | BN recalibrated | fine-tuned | "
          "fine-tuned + distilled | unpruned |")
    print("|---|---|---|---|---|---|---|---|")
    for c in dict.fromkeys(r["criterion"] for r in rows):
        for ratio in sorted({r["ratio"] for r in rows}):
            sel = [r for r in rows if r["criterion"] == c and r["ratio"] == ratio]
            print(f"| {c} | {ratio} | {_mean(sel, 'mac_reduction'):.2f}x | "
                  + " | ".join(f"{100 * _mean(sel, k):.2f}" for k in
                               ("before", "recalibrated", "finetuned", "distilled", "unpruned"))
                  + " |")
    print(f"\nMeans over {len({r['seed'] for r in rows})} seeds, validation accuracy in %.")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in dict.fromkeys(r["criterion"] for r in rows):
        pts = []
        for ratio in sorted({r["ratio"] for r in rows}):
            sel = [r for r in rows if r["criterion"] == c and r["ratio"] == ratio]
            pts.append((_mean(sel, "mac_reduction"), 100 * _mean(sel, "distilled")))
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{c} (fine-tuned + distilled)")
    ax.axhline(100 * _mean(rows, "unpruned"), color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("MAC reduction (x)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("ResNet-20 on digits: accuracy vs MAC reduction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
