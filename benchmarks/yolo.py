"""ultralytics YOLO models built from their yaml (random weights), pruned at ratio 0.5.

For each yaml: parameters and MACs before/after, how verification went, ONNX Runtime parity of
the exported pruned model, and which module attributes the plan rewrote. Prints a Markdown table
(the README's) and writes it to benchmarks/results/yolo.md. Needs the optional ultralytics package.

    ./run python benchmarks/yolo.py [--yamls yolov8n.yaml ...] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

import surgery
from surgery.spec import build_model

YAMLS = ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-cls.yaml", "yolo11n.yaml"]


def row(name: str, ratio: float, tmp: Path) -> str:
    torch.manual_seed(0)
    model = build_model(f"ultralytics:{name}").eval()
    x = torch.randn(1, 3, 224, 224) if "cls" in name else torch.randn(1, 3, 640, 640)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = surgery.plan(model, x, ratio=ratio)
    small = surgery.apply(model, plan)
    check = surgery.verify(model, small, plan, x)
    onnx = surgery.export_onnx(small, x, tmp / f"{name}.onnx")
    attrs = ", ".join(f"`{k}: {a}→{b}`" for k, a, b in plan.attribute_changes()) or "–"
    p0, p1 = surgery.count_params(model), surgery.count_params(small)
    m0, m1 = surgery.count_macs(model, x), surgery.count_macs(small, x)
    verified = ("exact" if check.exact_checked else "shapes") + f", {check.checked}"
    return (f"| {name} | {p0 / 1e6:.2f}M → {p1 / 1e6:.2f}M | {m0 / 1e9:.2f}G → {m1 / 1e9:.2f}G | "
            f"{verified} | {onnx.max_rel_error:.0e} | {attrs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yamls", nargs="+", default=YAMLS)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/yolo.md")
    args = ap.parse_args()
    lines = ["| yaml | params | MACs | verified | ORT rel. error | attributes rewritten |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.yamls:
            lines.append(row(name, args.ratio, Path(tmp)))
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
