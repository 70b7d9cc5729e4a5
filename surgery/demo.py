"""The main job in one command: prune a default model, export ONNX, print a latency table.

    python -m surgery.demo [--model resnet18] [--ratio 0.5] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision

import surgery


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="surgery-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a torchvision model name")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--out", default="out/demo", help="folder for the ONNX files")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    t = time.perf_counter()
    plan = surgery.plan(model, x, ratio=args.ratio)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    check = (f"verified exact (max relative error {report.max_rel_error:.1e})"
             if report.exact_checked else "verified output shapes")
    print(f"pruned {args.model} at ratio {args.ratio} in {time.perf_counter() - t:.2f}s: "
          f"params {surgery.count_params(model) / 1e6:.2f}M -> "
          f"{surgery.count_params(small) / 1e6:.2f}M, "
          f"MACs {surgery.count_macs(model, x) / 1e9:.2f}G -> "
          f"{surgery.count_macs(small, x) / 1e9:.2f}G; {check}")
    os.makedirs(args.out, exist_ok=True)
    models = {args.model: model, f"{args.model}-pruned": small}
    files = {}
    for name, m in models.items():
        e = surgery.export_onnx(m, x, os.path.join(args.out, f"{name}.onnx"))
        files[name] = e.path
        print(f"exported {os.path.abspath(e.path)}: {e.file_bytes / 1e6:.1f} MB, ONNX Runtime "
              f"parity {e.max_rel_error:.1e}")
    plan.save(os.path.join(args.out, "plan.json"))
    print(f"saved the plan: {os.path.abspath(os.path.join(args.out, 'plan.json'))}")
    bench = surgery.bench(models, (3, args.size, args.size), runtimes=("torch", "ort"),
                          batches=(1,), threads=args.threads, onnx_files=files,
                          progress=lambda s: print(f"... {s}", flush=True))
    print()
    print(bench.to_markdown())
    print(f"plan and ONNX files: {os.path.abspath(args.out)} "
          f"({sum(os.path.getsize(f) for f in files.values()) / 1e6:.0f} MB; --out to move)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
