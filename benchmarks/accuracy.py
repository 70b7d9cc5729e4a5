"""The sparsity-accuracy curve: ResNet-20 on scikit-learn's digits, every criterion and ratio.

For each seed: train ResNet-20 from scratch, then for every criterion and ratio prune it and
measure validation accuracy before fine-tuning, after BatchNorm recalibration, after fine-tuning,
and after fine-tuning with distillation from the unpruned model. Figures are means over seeds
(the validation set has 360 images: one image is 0.28 points).

    ./run python benchmarks/accuracy.py                        # the full sweep (long)
    ./run python benchmarks/accuracy.py --seeds 1 --ratios 0.5 --epochs 2 --ft-epochs 1  # smoke

Besides uniform ratios, ``--macs`` adds points pruned to a MAC budget (0.5 = 2x fewer MACs),
where the issue's targets are set. ``--resume`` keeps the rows already in ``--out``.
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
from surgery.atomic import write_text
from surgery.data import digits
from surgery.finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn
from surgery.spec import build_model

HERE = os.path.dirname(__file__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ratios", nargs="*", type=float,
                    default=[0.1, 0.3, 0.5, 0.8])
    ap.add_argument("--macs", nargs="*", type=float, default=[0.5, 0.25],
                    help="MAC budgets (fraction of the original) pruned to with target_macs")
    ap.add_argument("--criteria", nargs="*", default=["l1", "l2", "bn_scale", "random"])
    ap.add_argument("--epochs", type=int, default=30, help="training of the unpruned model")
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=16, help="digits are upsampled from 8x8")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    ap.add_argument("--plot", default=os.path.join(HERE, "results", "accuracy.png"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--only-seeds", nargs="*", type=int, default=None,
                    help="run just these seeds (e.g. one process per core, each with its --out)")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="no training: combine these result files into --out, table and plot")
    args = ap.parse_args()
    if args.merge:
        rows = []
        for path in args.merge:
            with open(path) as f:
                rows += json.load(f)["rows"]
        write_text(args.out, json.dumps({"args": vars(args), "rows": rows},
                                                     indent=1))
        table(rows)
        plot(rows, args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = digits("train", size=args.size), digits("val", size=args.size)
    x = train.tensors[0][:1]
    rows: list[dict] = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {(r["seed"], r["criterion"], r["ratio"], r.get("target_macs")) for r in rows}
    points = [(r, None) for r in args.ratios] + [(None, m) for m in args.macs]
    t0 = time.time()
    for seed in args.only_seeds if args.only_seeds is not None else range(args.seeds):
        if all((seed, c, r, m) in done for c in args.criteria for r, m in points):
            continue
        torch.manual_seed(seed)
        base = build_model("resnet20")
        finetune(base, train, val, config=FinetuneConfig(epochs=args.epochs, lr=0.1, seed=seed))
        base_acc, base_macs = evaluate(base, val), surgery.count_macs(base, x)
        print(f"seed {seed}: unpruned accuracy {base_acc:.4f} ({time.time() - t0:.0f}s)",
              flush=True)
        for criterion in args.criteria:
            for ratio, macs in points:
                if (seed, criterion, ratio, macs) in done:
                    continue
                small = surgery.prune(base, x, ratio=ratio, target_macs=macs,
                                      criterion=criterion, round_to=1, seed=seed)
                row = {"seed": seed, "criterion": criterion, "ratio": ratio,
                       "target_macs": macs, "unpruned": base_acc,
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
                write_text(args.out, json.dumps({"args": vars(args),
                                                              "rows": rows}, indent=1))
    table(rows)
    plot(rows, args.plot)
    return 0


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def _point(r: dict) -> str:
    return (f"ratio {r['ratio']}" if r.get("target_macs") is None
            else f"MACs x{1 / r['target_macs']:g}")


def _curves(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """criterion -> point label -> rows (all seeds), points sorted by MAC reduction."""
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["criterion"], {}).setdefault(_point(r), []).append(r)
    return {c: dict(sorted(pts.items(), key=lambda kv: _mean(kv[1], "mac_reduction")))
            for c, pts in out.items()}


def table(rows: list[dict]) -> None:
    print("\n| criterion | pruned to | MAC reduction | before | BN recalibrated | fine-tuned | "
          "fine-tuned + distilled | unpruned |")
    print("|---|---|---|---|---|---|---|---|")
    for c, pts in _curves(rows).items():
        for label, sel in pts.items():
            print(f"| {c} | {label} | {_mean(sel, 'mac_reduction'):.2f}x | "
                  + " | ".join(f"{100 * _mean(sel, k):.2f}" for k in
                               ("before", "recalibrated", "finetuned", "distilled", "unpruned"))
                  + " |")
    print(f"\nMeans over {len({r['seed'] for r in rows})} seeds, validation accuracy in %.")
    targets = {0.5: 0.3, 0.25: 1.0}  # MAC budget -> allowed loss in points (issue 5)
    for macs, allowed in targets.items():
        for c, pts in _curves(rows).items():
            sel = pts.get(f"MACs x{1 / macs:g}")
            if not sel:
                continue
            gap = 100 * (_mean(sel, "unpruned")
                         - max(_mean(sel, "finetuned"), _mean(sel, "distilled")))
            verdict = "met" if gap <= allowed else "MISSED"
            print(f"target {1 / macs:g}x fewer MACs, {c}: {-gap:+.2f} points vs unpruned "
                  f"after fine-tuning (target: no worse than -{allowed}): {verdict}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    stages = (("recalibrated", "pruned, BN recalibrated (no training)"),
              ("distilled", "pruned, fine-tuned + distilled"))
    for ax, (key, title) in zip(axes, stages, strict=True):
        for c, pts in _curves(rows).items():
            xs = [_mean(sel, "mac_reduction") for sel in pts.values()]
            ys = [100 * _mean(sel, key) for sel in pts.values()]
            ax.plot(xs, ys, marker="o", label=c)
        ax.axhline(100 * _mean(rows, "unpruned"), color="k", ls="--", lw=1, label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MAC reduction (x, log scale)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"ResNet-20 on digits, mean of {len({r['seed'] for r in rows})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
