"""The timm sample (tests/zoo.py TIMM_40) pruned at ratio 0.5: which tracer, exact or not, the
share of parameters and MACs removed, how many attention layers lost heads, and what kept the
most channels where little was removed.

    ./run python benchmarks/timm_zoo.py [--models ...] [--json benchmarks/results/timm_zoo.json]
    ./run python benchmarks/timm_zoo.py --attention   # the transformers (tests/zoo.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

import surgery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import TIMM_40, TIMM_ATTENTION  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import timm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--attention", action="store_true", help="the transformer sample")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.models = args.models or (TIMM_ATTENTION if args.attention else TIMM_40)
    warnings.simplefilter("ignore")
    rows = {}
    print("| model | tracer | verified | params | MACs | params removed | MACs removed | "
          "layers losing heads | other attributes rewritten (head widths, split sections) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        try:
            graph = surgery.trace(model, x)
            plan = surgery.plan(model, x, ratio=0.5, graph=graph)
            small = surgery.apply(model, plan)
            report = surgery.verify(model, small, plan, x)
        except surgery.SurgeryError as e:
            rows[name] = {"refused": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"| {name} | | refused: {rows[name]['refused'][:80]} | | | | | | |", flush=True)
            continue
        p0, p1 = surgery.count_params(model), surgery.count_params(small)
        m0, m1 = surgery.count_macs(model, x), surgery.count_macs(small, x)
        rows[name] = {"tracer": graph.tracer, "exact": report.exact_checked,
                      "max_rel_error": report.max_rel_error, "params": [p0, p1],
                      "macs": [m0, m1], "top_pins": graph.pin_summary(2),
                      "heads": [c for c in plan.attribute_changes()
                                if c[0].endswith(("num_heads", "n_heads"))],
                      "attributes": plan.attribute_changes()}
        heads = rows[name]["heads"]
        other = [c for c in plan.attribute_changes() if c not in heads]
        names = sorted({c[0].rpartition(".")[2] for c in other})
        widths = f"{len(other)} ({', '.join(names[:3])})" if other else "0"
        lost = f"{len(heads)} (e.g. {heads[0][1]} → {heads[0][2]})" if heads else "0"
        check = f"exact ({report.max_rel_error:.0e})" if report.exact_checked else "shapes"
        print(f"| {name} | {graph.tracer} | {check} | {p0 / 1e6:.1f}M | {m0 / 1e9:.2f}G | "
              f"{1 - p1 / p0:.0%} | {1 - m1 / m0:.0%} | {lost} | {widths} |", flush=True)
    done = [r for r in rows.values() if "params" in r]
    shares = [1 - r["params"][1] / r["params"][0] for r in done]
    print(f"\n{len(done)} of {len(rows)} pruned ({sum(r['exact'] for r in done)} verified exact, "
          f"{sum(not r['exact'] for r in done)} not exact (a cross-channel norm, or a q/k width "
          "summed in a product): shapes verified; "
          f"{sum(r['tracer'] == 'run' for r in done)} by the executing tracer); median share of "
          f"parameters removed {statistics.median(shares):.0%} (range {min(shares):.0%}–"
          f"{max(shares):.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
