"""Which heads to remove: the L2 criterion against random heads, on a tiny ViT trained on digits.

For each seed: train a small timm VisionTransformer (16×16 digits, 4×4 patches, 4 blocks of 8
heads of width 8) from scratch, then remove half of every block's heads, and only heads (the
embedding and the MLPs are kept with ``ignore=``), once chosen by the L2 norm of each head's
weights and once at random; measure validation accuracy right after pruning and after a short
fine-tune. Prints a Markdown table of means over seeds with the per-seed values and writes it to
benchmarks/results/heads_accuracy.md. The validation set has 360 images (one image = 0.28 points).

    ./run python benchmarks/heads_accuracy.py [--seeds 3] [--epochs 30] [--ft-epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import timm
import torch

import surgery
from surgery.data import digits
from surgery.finetune import FinetuneConfig, evaluate, finetune

KEEP = ["patch_embed", "re:.*mlp\\.fc1", "head"]  # only heads are removed


def tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
        num_heads=8, mlp_ratio=2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/heads_accuracy.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train, val = digits("train", size=16, channels=1), digits("val", size=16, channels=1)
    x = train.tensors[0][:1]
    rows: dict[str, dict[str, list[float]]] = {}
    base: list[float] = []
    for seed in range(args.seeds):
        model = tiny_vit(seed)
        finetune(model, train, config=FinetuneConfig(epochs=args.epochs, lr=1e-3,
                                                     optimizer="adamw", weight_decay=0.05,
                                                     seed=seed, recalibrate_bn=False))
        base.append(evaluate(model, val))
        for criterion in ("l2", "random"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = surgery.plan(model, x, ratio=args.ratio, criterion=criterion,
                                    ignore=KEEP, seed=seed, round_to=1)
            heads = [(k, a, b) for k, a, b in plan.attribute_changes() if k.endswith("num_heads")]
            assert heads and all(b == 4 for _, _, b in heads), heads
            small = surgery.apply(model, plan)
            assert surgery.verify(model, small, plan, x).passed
            r = rows.setdefault(criterion, {"pruned": [], "tuned": []})
            r["pruned"].append(evaluate(small, val))
            finetune(small, train, config=FinetuneConfig(epochs=args.ft_epochs, lr=5e-4,
                                                         optimizer="adamw", weight_decay=0.05,
                                                         seed=seed, recalibrate_bn=False))
            r["tuned"].append(evaluate(small, val))
        print(f"seed {seed}: unpruned {base[-1]:.3f}, " + ", ".join(
            f"{c} {r['pruned'][-1]:.3f} -> {r['tuned'][-1]:.3f}" for c, r in rows.items()),
              flush=True)

    def cell(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.1f}% ({', '.join(f'{100 * a:.1f}' for a in v)})"

    lines = [f"tiny ViT on digits, {args.seeds} seeds, half of every block's heads removed "
             f"(8 → 4), fine-tune {args.ft_epochs} epochs; unpruned {cell(base)}", "",
             "| heads chosen by | after pruning | after fine-tune |", "|---|---|---|"]
    lines += [f"| {c} | {cell(r['pruned'])} | {cell(r['tuned'])} |" for c, r in rows.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
