"""Prune time as a user meets it from the shell: ``surgery prune`` (load, trace, plan, rebuild,
verify, write plan + weights + report) against a Torch-Pruning script doing the same job
(import, build, DependencyGraph + MetaPruner + step(), save the weights), each a fresh process
timed from spawn to exit, over the torchvision conv nets.

Both processes import torch and torchvision (about 4 s of the total here), so this is the time
to a written plan a user waits for; ``benchmarks/prune_time.py`` times the pruning itself in one
process. Runs alternate (ours, theirs, ours, theirs …); the table shows medians per model, the
totals and per-model ratios (Torch-Pruning / ours, median and how many faster/slower).

    ./run python benchmarks/cli_prune_time.py [--repeats 1] [--models resnet18 ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")
#: as in tests/zoo.py: auxiliary heads built (and initialised without scipy) where they exist
AUX = ("googlenet", "inception_v3")


def size_of(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def surgery_command(name: str, ratio: float, out: str) -> list[str]:
    cmd = [os.path.join(os.path.dirname(sys.executable), "surgery"), "prune",
           f"torchvision:{name}", "--ratio", str(ratio), "--out", out, "--no-onnx", "--json",
           "--input-shape", f"1,3,{size_of(name)},{size_of(name)}"]
    if name in AUX:
        cmd += ["--model-arg", "aux_logits=True", "--model-arg", "init_weights=True"]
    return cmd


def tp_command(name: str, ratio: float, out: str) -> list[str]:
    return [sys.executable, __file__, "--tp-job", name, "--ratio", str(ratio), "--job-out", out]


def tp_job(name: str, ratio: float, out: str) -> None:
    """What a Torch-Pruning user's script does: prune the model, keep the classifier, save."""
    import warnings

    import torch
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    kw = {"aux_logits": True, "init_weights": True} if name in AUX else {}
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    x = torch.randn(1, 3, size_of(name), size_of(name))
    # the classifier, as benchmarks/prune_time.py's heads(); not imported from there, which
    # imports surgery: this process must import what a Torch-Pruning user's script does
    keep = [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.out_features == 1000
            or isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=keep).step()
    os.makedirs(out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out, "pruned.pt"))


def timed(cmd: list[str], limit: int) -> tuple[float | None, str]:
    """Wall seconds from spawn to exit, or None and the last line of stderr on failure."""
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, f"stopped after {limit} s"
    took = time.perf_counter() - t
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return None, (lines[-1] if lines else f"exit {done.returncode}")[:120]
    return took, ""


def summary(rows: list[dict]) -> dict | None:
    both = [r for r in rows if r["ours_s"] and r["tp_s"]]
    if not both:
        return None
    ratios = [r["tp_s"] / r["ours_s"] for r in both]
    return {"models": len(both), "total_ours_s": sum(r["ours_s"] for r in both),
            "total_tp_s": sum(r["tp_s"] for r in both),
            "median_tp_over_ours": statistics.median(ratios), "min_tp_over_ours": min(ratios),
            "worst": min(both, key=lambda r: r["tp_s"] / r["ours_s"])["model"],
            "ours_faster": sum(q > 1 for q in ratios), "ours_slower": sum(q < 1 for q in ratios),
            "within_1_2x": sum(q >= 1 / 1.2 for q in ratios),
            "tp_failed": sum(1 for r in rows if not r["tp_s"]),
            "ours_failed": sum(1 for r in rows if not r["ours_s"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--limit", type=int, default=300, help="seconds before a run is stopped")
    ap.add_argument("--out", default=os.path.join(RESULTS, "cli_prune_time.json"))
    ap.add_argument("--tp-job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tp_job:
        tp_job(args.tp_job, args.ratio, args.job_out)
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from zoo import conv_nets

    names = [n for n in conv_nets() if not args.models or n in args.models]
    rows = []
    print("| model | surgery prune (CLI) s | Torch-Pruning script s | TP / ours |\n"
          "|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ours, theirs, err = [], [], ""
            for k in range(args.repeats):
                out = os.path.join(tmp, f"{name}-{k}")
                s, e = timed(surgery_command(name, args.ratio, out), args.limit)
                if s is None:
                    err = f"surgery: {e}"
                    break
                ours.append(s)
                shutil.rmtree(out, ignore_errors=True)
                s, e = timed(tp_command(name, args.ratio, out + "-tp"), args.limit)
                if s is None:
                    err = f"Torch-Pruning: {e}"
                    break
                theirs.append(s)
                shutil.rmtree(out + "-tp", ignore_errors=True)
            row = {"model": name, "ours_s": statistics.median(ours) if ours and not
                   err.startswith("surgery") else None,
                   "tp_s": statistics.median(theirs) if theirs and not err else None,
                   "error": err}
            rows.append(row)
            with open(args.out, "w") as f:  # after every model: a stopped run keeps its rows
                json.dump({"rows": rows, "partial": True}, f, indent=1)
            q = f"{row['tp_s'] / row['ours_s']:.2f}" if row["ours_s"] and row["tp_s"] else err
            print(f"| {name} | {row['ours_s'] or 0:.2f} | {row['tp_s'] or 0:.2f} | {q} |",
                  flush=True)
    s = summary(rows)
    if s:
        print(f"| **total of {s['models']} both prune** | {s['total_ours_s']:.1f} | "
              f"{s['total_tp_s']:.1f} | {s['total_tp_s'] / s['total_ours_s']:.2f} (per model: "
              f"median {s['median_tp_over_ours']:.2f}, worst {s['min_tp_over_ours']:.2f} "
              f"({s['worst']}); faster on {s['ours_faster']}, slower on {s['ours_slower']}, "
              f"within 1.2x on {s['within_1_2x']}) |")
    from surgery.bench import environment  # the parent's imports are not timed

    env = {"cpu": environment(os.cpu_count() or 1, ())["cpu"], "cores": os.cpu_count(),
           "python": platform.python_version(), "ratio": args.ratio, "repeats": args.repeats}
    print(f"\nMedians of {args.repeats} alternating runs, each a fresh process; {env}")
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows, "summary": s}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
