"""Where a prune's time goes: trace, plan, apply and verify, each timed alone, per model.

Medians of ``--repeats`` runs, each on a fresh model instance (the first run of a process, which
reads the classes' source, is left out); also the plain forward of the original and of the
pruned model, the part of the verification that is the two models' own arithmetic. To compare
two versions of surgery, run it from each checkout in turns (``PYTHONPATH=. python
/path/to/prune_phases.py``): the VM's speed drifts within the hour.

    ./run python benchmarks/prune_phases.py mnasnet0_5 timm:mobilenetv2_050 [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
import torchvision

import surgery
from surgery.graph import trace


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False).eval()
        return model, torch.randn(1, *model.pretrained_cfg["input_size"])
    return torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)


def forward_ms(model: torch.nn.Module, x: torch.Tensor, n: int = 7) -> float:
    times = []
    with torch.no_grad():
        for _ in range(n):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"surgery from {surgery.__file__}")
    print("| model | trace ms | plan ms | apply ms | verify ms | total ms | "
          "original forward ms | pruned forward ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        phases: dict[str, list[float]] = {k: [] for k in ("trace", "plan", "apply", "verify")}
        for r in range(args.repeats + 1):
            model, x = build(name)
            gc.collect()
            t0 = time.perf_counter()
            graph = trace(model, (x,))
            t1 = time.perf_counter()
            plan = surgery.plan(model, (x,), ratio=0.5, graph=graph)
            t2 = time.perf_counter()
            small = surgery.apply(model, plan)
            t3 = time.perf_counter()
            surgery.verify(model, small, plan, (x,))
            t4 = time.perf_counter()
            if r:  # the first run reads sources and warms caches
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[k].append(v * 1e3)
        med = {k: statistics.median(v) for k, v in phases.items()}
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in med.values())
              + f" | {sum(med.values()):.0f} | {forward_ms(model, x):.1f} | "
              f"{forward_ms(small, x):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
