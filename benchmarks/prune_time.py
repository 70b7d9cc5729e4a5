"""Time trace + plan + apply, ours vs Torch-Pruning, same run: the torchvision conv nets, the timm
sample of tests/test_timm.py and the torchvision detectors as whole models.

Both tools prune at the same ratio with L2 magnitude, in turns (ours, theirs, ours, theirs …) on
fresh model instances; the table shows medians. Torch-Pruning prunes in place, so its time is
DependencyGraph + MetaPruner + step(); ours is surgery.plan + surgery.apply (a new model) and,
as users meet it (``--verify``, on by default), ``surgery.prune`` with its default verification,
timed in the same alternating turns (plan+apply, prune+verify, Torch-Pruning). Each
tool keeps the classifier (and, for detectors, the layers whose outputs reach the detections, as
surgery finds them; found outside the timed region). Per-model ratios are summarised (median, how
many faster/slower) beside the totals, which a few large models dominate.

    ./run python benchmarks/prune_time.py [--zoo torchvision timm detectors] [--repeats 3]
                                          [--models resnet18 ...] [--no-verify] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import warnings

import torch
import torchvision

import surgery
from surgery.bench import environment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from detectors import kept_outputs  # noqa: E402
from zoo import DETECTORS, TIMM_40, conv_nets  # noqa: E402


def build(zoo: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    if zoo == "detectors":
        return torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    kw = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kw).eval()


def example(zoo: str, name: str, model: torch.nn.Module, size: int) -> tuple:
    if zoo == "detectors":
        return ([torch.rand(3, 256, 256)],)
    if zoo == "timm":
        return (torch.randn(1, *model.pretrained_cfg["input_size"]),)
    s = 299 if name == "inception_v3" else size
    return (torch.randn(1, 3, s, s),)


def ours(model: torch.nn.Module, x: tuple, ratio: float) -> float:
    gc.collect()  # a full collection (0.2 s here) lands in nobody's timed region
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        surgery.apply(model, surgery.plan(model, x, ratio=ratio))
    return time.perf_counter() - t


def ours_verified(model: torch.nn.Module, x: tuple, ratio: float) -> float:
    """surgery.prune as users call it: plan, apply and the default verification."""
    gc.collect()  # a full collection (0.2 s here) lands in nobody's timed region
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        surgery.prune(model, x, ratio=ratio)
    return time.perf_counter() - t


def summarise(rows: list[dict], zoo: str, key: str) -> dict | None:
    """Totals and per-model ratios (Torch-Pruning time / ours) for the column ``key``."""
    both = [r for r in rows if r["tp_s"] and r.get(key) and zoo in (r["zoo"], "all")]
    if not both:
        return None
    ratios = [r["tp_s"] / r[key] for r in both]
    return {"models": len(both),
            "tp_failed": sum(1 for r in rows if not r["tp_s"] and zoo in (r["zoo"], "all")),
            "total_ours_s": sum(r[key] for r in both), "total_tp_s": sum(r["tp_s"] for r in both),
            "median_tp_over_ours": statistics.median(ratios),
            "min_tp_over_ours": min(ratios),
            "ours_faster": sum(q > 1 for q in ratios), "ours_slower": sum(q < 1 for q in ratios)}


def heads(zoo: str, model: torch.nn.Module, x: tuple) -> list[torch.nn.Module]:
    """What Torch-Pruning must keep: the classifier, or a detector's output layers."""
    if zoo == "detectors":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kept_outputs(model, surgery.trace(model, x))
    if zoo == "timm":
        return [model.get_classifier()] if isinstance(model.get_classifier(), torch.nn.Module) \
            else []
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.out_features == 1000
            or isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000]


class TooSlow(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise TooSlow


def theirs(zoo: str, model: torch.nn.Module, x: tuple, ratio: float, limit: int) -> float:
    import torch_pruning as tp

    keep = heads(zoo, model, x)
    gc.collect()
    t = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                 pruning_ratio=ratio, ignored_layers=keep).step()
    except TooSlow:
        raise TooSlow(f"stopped after {limit} s") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--zoo", nargs="*", default=["torchvision", "timm", "detectors"],
                    choices=["torchvision", "timm", "detectors"])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--tp-limit", type=int, default=60,
                    help="seconds after which a Torch-Pruning run is stopped (counted as failed)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="also time surgery.prune with its default verification (default on)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "prune_time.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoos = {"torchvision": conv_nets(), "timm": TIMM_40, "detectors": DETECTORS}
    todo = [(z, n) for z in args.zoo for n in zoos[z] if not args.models or n in args.models]
    warm = (torch.randn(1, 3, 64, 64),)  # first-call costs (imports, lazy init) are not pruning
    ours(build("torchvision", "resnet18"), warm, args.ratio)
    if args.verify:
        ours_verified(build("torchvision", "resnet18"), warm, args.ratio)
    theirs("torchvision", build("torchvision", "resnet18"), warm, args.ratio, args.tp_limit)
    rows = []
    verified = " surgery.prune+verify s | TP / (prune+verify) |" if args.verify else ""
    print(f"| zoo | model | surgery plan+apply s | Torch-Pruning s | TP / surgery |{verified}\n"
          f"|---|---|---|---|---|{'---|---|' if args.verify else ''}", flush=True)
    for zoo, name in todo:
        a, v, b, err = [], [], [], ""
        for _ in range(args.repeats):
            model = build(zoo, name)
            x = example(zoo, name, model, args.size)
            a.append(ours(model, x, args.ratio))
            if args.verify:
                v.append(ours_verified(build(zoo, name), x, args.ratio))
            try:
                b.append(theirs(zoo, build(zoo, name), x, args.ratio, args.tp_limit))
            except Exception as e:  # Torch-Pruning cannot prune this model
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                break
        row = {"zoo": zoo, "model": name, "ours_s": statistics.median(a),
               "tp_s": statistics.median(b) if b and not err else None, "tp_error": err}
        if args.verify:
            row["ours_verified_s"] = statistics.median(v)
        rows.append(row)
        with open(args.out, "w") as f:  # after every model: a stopped run keeps what it measured
            json.dump({"rows": rows, "partial": True}, f, indent=1)
        tp_s = f"{row['tp_s']:.2f}" if row["tp_s"] else f"failed ({err})"
        ratio = f"{row['tp_s'] / row['ours_s']:.2f}" if row["tp_s"] else ""
        line = f"| {zoo} | {name} | {row['ours_s']:.2f} | {tp_s} | {ratio} |"
        if args.verify:
            vr = f"{row['tp_s'] / row['ours_verified_s']:.2f}" if row["tp_s"] else ""
            line += f" {row['ours_verified_s']:.2f} | {vr} |"
        print(line, flush=True)
    summary: dict = {}
    columns = [("ours_s", "plan+apply")] + ([("ours_verified_s", "prune+verify")]
                                            if args.verify else [])
    for zoo in [*args.zoo, "all"]:
        for key, label in columns:
            s = summarise(rows, zoo, key)
            if s is None:
                continue
            summary.setdefault(zoo, {})[label] = s
            print(f"| **{zoo}, {label}: total of {s['models']} both prune** | "
                  f"{s['total_ours_s']:.1f} | {s['total_tp_s']:.1f} | "
                  f"{s['total_tp_s'] / s['total_ours_s']:.2f} (per model: median "
                  f"{s['median_tp_over_ours']:.2f}, worst {s['min_tp_over_ours']:.2f}; we are "
                  f"faster on {s['ours_faster']}, slower on {s['ours_slower']}; TP failed on "
                  f"{s['tp_failed']}) |")
    env = {"cpu": environment(args.threads, ())["cpu"],
           "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "python": platform.python_version(), "size": args.size, "ratio": args.ratio,
           "repeats": args.repeats, "verify": args.verify}
    print(f"\nMedians of {args.repeats} alternating runs; {env}")
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
