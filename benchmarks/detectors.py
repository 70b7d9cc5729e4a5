"""torchvision detectors pruned as whole models: surgery vs Torch-Pruning, and ONNX export.

For each detector (weights=None, one 256x256 image): surgery traces the whole model (its forward
iterates over images, so the executing tracer is used), prunes at ratio 0.5 and verifies exactly
(the head outputs before decoding/NMS are compared, since random-weight detectors often detect
nothing). Torch-Pruning prunes the same model at the same ratio with the same L2 criterion, told to
keep the layers whose outputs reach the detections (the ones surgery found pinned, so both keep the
same outputs). Both report the share of parameters removed; Torch-Pruning's pruned model is run
once to see that it still works. Then surgery's pruned model is exported to ONNX with an ONNX
Runtime parity check where torch.onnx can export it.

    ./run python benchmarks/detectors.py [--models ...] [--json benchmarks/results/detectors.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

import surgery
from surgery.bench import environment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import DETECTORS  # noqa: E402


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()


def kept_outputs(model: torch.nn.Module, graph: surgery.ChannelGraph) -> list[torch.nn.Module]:
    """Conv/Linear layers whose output channels surgery keeps because they reach the outputs."""
    keep = []
    for key, slot in graph.slots.items():
        if slot.axis == "out" and slot.kind == "module":
            roots = graph.slot_roots(key)
            if all(int(r) in graph.pinned for r in roots):
                keep.append(model.get_submodule(slot.path))
    return keep


def ours(name: str, x: tuple, round_to: int = 8, onnx: bool = True) -> dict:
    model = build(name)
    t = time.perf_counter()
    graph = surgery.trace(model, x)
    plan = surgery.plan(model, x, ratio=0.5, graph=graph, round_to=round_to)
    small = surgery.apply(model, plan)
    seconds = time.perf_counter() - t
    report = surgery.verify(model, small, plan, x)
    row = {"tracer": graph.tracer, "seconds": round(seconds, 2),
           "params_before": surgery.count_params(model),
           "params_after": surgery.count_params(small), "checked": report.checked,
           "max_rel_error": report.max_rel_error}
    with tempfile.TemporaryDirectory() as d:
        if not onnx:
            row["onnx"] = "not tried"
            return row, kept_outputs(build(name), graph), graph
        try:
            e = surgery.export_onnx(small, x, Path(d) / "m.onnx", dynamic_batch=False)
            row["onnx"] = f"ok, ORT max relative error {e.max_rel_error:.1e}"
        except Exception as err:  # noqa: BLE001  (reported, not fatal)
            row["onnx"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:240]}"
    return row, kept_outputs(build(name), graph), graph


def theirs(name: str, x: tuple, graph: surgery.ChannelGraph) -> dict:
    import torch_pruning as tp

    model = build(name)
    before = surgery.count_params(model)
    keep = kept_outputs(model, graph)
    t = time.perf_counter()
    try:
        tp.pruner.MetaPruner(model, list(x), importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=0.5, ignored_layers=keep).step()
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"}
    row = {"seconds": round(time.perf_counter() - t, 2), "params_before": before,
           "params_after": surgery.count_params(model)}
    try:
        with torch.no_grad():
            model(*x)
        row["runs"] = True
    except Exception as err:  # noqa: BLE001
        row["runs"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DETECTORS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--round-to", type=int, default=8, help="surgery's rounding (Torch-Pruning: 1)")
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    x = ([torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))],)
    rows = {}
    print("| model | tracer | ours: params removed | Torch-Pruning: params removed | TP model "
          "runs | verified | ONNX |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        mine, _, graph = ours(name, x, args.round_to, not args.no_onnx)
        tp_row = theirs(name, x, graph)
        rows[name] = {"surgery": mine, "torch_pruning": tp_row}
        share = 1 - mine["params_after"] / mine["params_before"]
        tp_share = (f"{1 - tp_row['params_after'] / tp_row['params_before']:.1%}"
                    if "params_after" in tp_row else f"error: {tp_row['error'][:80]}")
        print(f"| {name} | {mine['tracer']} | {share:.1%} | {tp_share} | "
              f"{tp_row.get('runs', '-')} | {mine['max_rel_error']:.0e} ({mine['checked']}) | "
              f"{mine['onnx'][:90]} |", flush=True)
    if args.json:
        env = environment(torch.get_num_threads(), ("torch", "ort"))
        Path(args.json).write_text(json.dumps({"environment": env,
                                               "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
