"""Unstructured vs structured pruning: accuracy, real file size and measured latency.

ResNet-20 is trained on scikit-learn's digits; then, from the same weights,
- unstructured: global magnitude pruning (torch.nn.utils.prune) at each amount, fine-tuned with
  the masks applied, made permanent, saved with ``surgery.sparse.save_sparse``;
- structured: ``surgery.prune`` at a channel ratio, fine-tuned, saved as dense safetensors.
Each is timed against the unpruned model on PyTorch eager and ONNX Runtime (medians of
alternating runs, batch 1). A second table times torchvision's resnet18 at 224x224 (random
weights: sizes and latency only).

    ./run python benchmarks/sparse.py                 # writes benchmarks/results/sparse.json
    ./run python benchmarks/sparse.py --epochs 2 --ft-epochs 1 --rounds 5    # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch
import torchvision

import surgery
from surgery import sparse
from surgery.bench import environment
from surgery.data import digits
from surgery.finetune import FinetuneConfig, evaluate, finetune
from surgery.spec import build_model

HERE = os.path.dirname(__file__)


def sparse_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return sparse.save_sparse(model, f"{tmp}/w")


def latency(base: torch.nn.Module, variants: dict[str, torch.nn.Module], shape: tuple[int, ...],
            rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per runtime for the base model and each variant, timed in turns."""
    rep = surgery.bench({"unpruned": base, **variants}, shape, runtimes=["torch", "ort"],
                        batches=[1], threads=torch.get_num_threads(), rounds=rounds)
    out: dict[str, dict[str, float]] = {}
    for r in rep.rows:
        out.setdefault(r.model, {})[r.runtime] = r.median_ms
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amounts", nargs="*", type=float, default=[0.5, 0.8, 0.9])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = digits("train", size=args.size), digits("val", size=args.size)
    x = train.tensors[0][:1]
    base = build_model("resnet20")
    finetune(base, train, val, config=FinetuneConfig(epochs=args.epochs, lr=0.1))
    ft = FinetuneConfig(epochs=args.ft_epochs, lr=0.02)
    rows = [{"model": "unpruned", "accuracy": evaluate(base, val),
             "bytes": sparse.dense_bytes(base), "macs": surgery.count_macs(base, x)}]
    variants: dict[str, torch.nn.Module] = {}
    for amount in args.amounts:
        net = sparse.magnitude_prune_(copy.deepcopy(base), amount)
        before = evaluate(net, val)
        finetune(net, train, val, config=ft)
        sparse.make_permanent_(net)
        name = f"unstructured {amount:.0%}"
        variants[name] = net
        rows.append({"model": name, "accuracy_before_ft": before, "accuracy": evaluate(net, val),
                     "sparsity": sparse.sparsity(net).overall, "bytes": sparse_bytes(net),
                     "macs": surgery.count_macs(net, x)})
    for ratio in args.ratios:
        net = surgery.prune(base, x, ratio=ratio, round_to=1)
        before = evaluate(net, val)
        finetune(net, train, val, config=ft)
        name = f"structured ratio {ratio}"
        variants[name] = net
        rows.append({"model": name, "accuracy_before_ft": before, "accuracy": evaluate(net, val),
                     "bytes": sparse.dense_bytes(net), "macs": surgery.count_macs(net, x)})
    times = latency(base, variants, (3, args.size, args.size), args.rounds)
    for r in rows:
        r.update({f"{rt}_ms": ms for rt, ms in times[r["model"]].items()})

    r18 = torchvision.models.resnet18(weights=None).eval()
    x224 = torch.randn(1, 3, 224, 224)
    big = {"unstructured 80%": sparse.make_permanent_(
               sparse.magnitude_prune_(copy.deepcopy(r18), 0.8)),
           "structured ratio 0.5": surgery.prune(r18, x224, ratio=0.5)}
    times224 = latency(r18, big, (3, 224, 224), max(5, args.rounds // 3))
    rows224 = [{"model": name, "bytes": (sparse.dense_bytes(m) if "unstructured" not in name
                                         else sparse_bytes(m)),
                **{f"{rt}_ms": ms for rt, ms in times224[name].items()}}
               for name, m in {"unpruned": r18, **big}.items()]

    env = environment(torch.get_num_threads(), ["torch", "ort"])
    with open(args.out, "w") as f:
        json.dump({"env": env, "args": vars(args), "resnet20_digits": rows,
                   "resnet18_224": rows224}, f, indent=1)
    print("ResNet-20 on digits (validation accuracy after fine-tuning, file, latency at "
          f"batch 1, {args.size}x{args.size}):\n")
    print("| model | accuracy % | file KB | MACs | torch ms | ORT ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {100 * r['accuracy']:.2f} | {r['bytes'] / 1e3:.0f} | "
              f"{r['macs'] / 1e6:.1f}M | {r['torch_ms']:.2f} | {r['ort_ms']:.2f} |")
    print("\nresnet18, 224x224, batch 1:\n")
    print("| model | file MB | torch ms | ORT ms |")
    print("|---|---|---|---|")
    for r in rows224:
        print(f"| {r['model']} | {r['bytes'] / 1e6:.1f} | {r['torch_ms']:.2f} | "
              f"{r['ort_ms']:.2f} |")
    print(f"\nMedians of alternating runs. Environment: {env}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
