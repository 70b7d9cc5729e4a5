"""Models nobody here wrote: one timm model per architecture module, none that a test names
(or the ``--models`` given; ``tv:NAME`` for a torchvision one), pruned at ratio 0.5 and
verified, each in its own process (a crash or a hang costs one row).

Outcomes: ``exact`` / ``shapes`` (verified: values, or only shapes where a cross-channel op on
a pruned axis cannot run on the kept channels alone in the reference; ``kept_sites`` counts the
ops that did, ``plan_exact`` says whether the zeroed original alone was the reference),
``refused`` (a :class:`surgery.SurgeryError` that should name the layer and
line: its first line is kept), ``crash`` (any other exception: a bug), ``modified`` (the
original's class, state or outputs changed: a bug), ``timeout``. Per module the model picked is
the one with the fewest parameters among the dozen whose names say they are small.

    ./run python benchmarks/timm_sweep.py [--modules resnet vgg] [--timeout 240]
        [--out benchmarks/results/timm_sweep.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SMALL = ("pico", "femto", "atto", "nano", "tiny", "xxs", "xs", "small", "_s", "050", "b0", "lite0",
         "_t", "18", "26")


def named_in_tests() -> set[str]:
    import zoo

    names: set[str] = set()
    for v in vars(zoo).values():
        if isinstance(v, list | tuple) and v and all(isinstance(s, str) for s in v):
            names |= {s.split(":", 1)[-1] for s in v}
    for f in Path(__file__).resolve().parent.parent.joinpath("tests").glob("test_*.py"):
        names |= set(re.findall(r"['\"]([a-z0-9_.]+)['\"]", f.read_text()))
    return names


def pick(module: str, skip: set[str]) -> str | None:
    import timm

    names = [n for n in timm.list_models(module=module) if n not in skip]
    if not names:
        return None

    def key(n: str) -> tuple[int, int, str]:
        rank = next((i for i, s in enumerate(SMALL) if s in n), len(SMALL))
        return rank, len(n), n

    return min(sorted(names, key=key)[:12], key=lambda n: (_params(n), n))


def _params(name: str) -> int:
    """Parameters of a timm model, built on the meta device (no memory, no init time)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    except Exception:
        return 1 << 60


def one(name: str, q: mp.Queue) -> None:
    warnings.simplefilter("ignore")
    import timm
    import torch

    import surgery

    torch.set_num_threads(1)
    row: dict = {"model": name}
    try:
        torch.manual_seed(0)
        if name.startswith("tv:"):  # a torchvision model (segmentation, video ...)
            import torchvision

            builder = torchvision.models.get_model_builder(name[3:])
            kw = {"weights_backbone": None} if "weights_backbone" in inspect.signature(
                builder).parameters else {}
            model = torchvision.models.get_model(name[3:], weights=None, **kw).eval()
            video = name[3:] in torchvision.models.list_models(torchvision.models.video)
            size = (3, 8, 112, 112) if video else (3, 224, 224)
        else:
            model = timm.create_model(name, pretrained=False).eval()
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(1, *size)
        row["input"] = list(size)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            y0 = model(x)
        t = time.perf_counter()
        try:
            graph = surgery.trace(model, x)
            plan = surgery.plan(model, x, ratio=0.5, graph=graph)
            small = surgery.apply(model, plan)
            report = surgery.verify(model, small, plan, x)
            row["outcome"] = "exact" if report.exact_checked else "shapes"
            row["plan_exact"] = plan.exact
            row["kept_sites"] = report.kept_sites
            row["tracer"] = graph.tracer
            row["params_kept"] = round(surgery.count_params(small) / surgery.count_params(model), 3)
            row["max_rel_error"] = report.max_rel_error
        except surgery.SurgeryError as e:
            row["outcome"] = "refused"
            row["message"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
        row["seconds"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            y1 = model(x)
        if any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()) or not all(
                torch.equal(a, b) for a, b in zip(surgery.tensors.output_tensors(y0),
                                                  surgery.tensors.output_tensors(y1), strict=True)):
            row["outcome"] = "modified"
    except Exception as e:  # a bug in surgery, or a model timm cannot build or run
        row["outcome"] = "crash"
        row["message"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}" if str(e) \
            else type(e).__name__
        row["where"] = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                        for f in traceback.extract_tb(e.__traceback__)][-4:]
    q.put(row)


def main() -> int:
    import timm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", nargs="*", default=None)
    ap.add_argument("--models", nargs="*", default=None, help="these models, not one per module")
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "timm_sweep.json"))
    args = ap.parse_args()
    skip = named_in_tests()
    todo = args.models or [n for m in (args.modules or timm.list_modules())
                           if (n := pick(m, skip)) is not None]
    rows = []
    ctx = mp.get_context("spawn")
    for name in todo:
        q: mp.Queue = ctx.Queue()
        p = ctx.Process(target=one, args=(name, q))
        t = time.perf_counter()
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            row = {"model": name, "outcome": "timeout"}
        else:
            row = q.get() if not q.empty() else {"model": name, "outcome": "crash",
                                                 "message": f"exit code {p.exitcode}"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"| {name} | {row['outcome']} | {row.get('message', '')[:160]} |", flush=True)
        with open(args.out, "w") as f:
            json.dump({"timm": timm.__version__, "rows": rows}, f, indent=1)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
