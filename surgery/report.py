"""Reports for people: per-group tables, prune reports (JSON + Markdown), benchmark plots."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .bench import BenchReport
from .criteria import slot_tensor
from .graph import ChannelGraph
from .paths import Submodules
from .plan import Plan
from .stats import count_macs, count_params, module_macs
from .verify import VerifyReport


def group_table(model: nn.Module, graph: ChannelGraph, x: torch.Tensor) -> list[dict[str, Any]]:
    """One row per coupled group: size, prunability (and why not), params and MACs it touches."""
    macs = module_macs(model, x)
    rows = []
    submodule = Submodules(model)
    for g in graph.groups:
        units = np.concatenate([g.units, g.pinned])
        params = 0
        mac = 0.0
        seen: dict[str, float] = {}
        for key in g.slots:
            slot = graph.slots[key]
            mine = np.isin(graph.slot_roots(key), units)
            t = slot_tensor(model, slot, submodule)
            if t is not None:
                params += int(mine.sum()) * (t.numel() // max(t.shape[0], 1))
            share = float(mine.mean())
            seen[slot.path] = max(seen.get(slot.path, 0.0), share)
        for path, share in seen.items():
            mac += share * macs.get(path, 0)
        first = graph.slot_roots(g.slots[0])
        rows.append({
            "group": g.index, "channels": int(np.isin(first, units).sum()),
            "free": len(g.units), "pinned": len(g.pinned), "prunable": g.prunable,
            "why": "; ".join(g.reasons[:2]) if g.reasons else
                   ("only one unit" if not g.prunable else ""),
            "params": params, "macs": int(mac), "members": list(g.slots)})
    return rows


def print_group_table(model_class: str, rows: list[dict[str, Any]]) -> None:
    """The group table (:func:`group_table`) as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model_class}: {len(rows)} coupled groups")
    for col in ("#", "channels", "units", "prunable", "params", "MACs", "members"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["group"]), str(r["channels"]), f"{r['free']}+{r['pinned']} pinned",
                      "yes" if r["prunable"] else f"no: {r['why']}", f"{r['params']:,}",
                      f"{r['macs']:,}", ", ".join(r["members"][:4]) +
                      (f" (+{len(r['members']) - 4})" if len(r["members"]) > 4 else ""))
    Console().print(table)  # the terminal's width (COLUMNS, else 80 when not a terminal)


def _widths(model: nn.Module) -> dict[str, list[int]]:
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and not list(m.children()):
            out[name] = list(w.shape)
    return out


def prune_report(original: nn.Module, pruned: nn.Module, plan: Plan, x: torch.Tensor,
                 check: VerifyReport, *, spec: str) -> dict[str, Any]:
    before, after = _widths(original), _widths(pruned)
    return {
        "model": spec, "settings": plan.settings,
        "params": {"before": count_params(original), "after": count_params(pruned)},
        "macs": {"before": count_macs(original, x), "after": count_macs(pruned, x)},
        "layers": {name: {"before": before[name], "after": after.get(name)}
                   for name in before if before[name] != after.get(name)},
        "attributes": {name: {"before": a, "after": b} for name, a, b in plan.attribute_changes()},
        "bypassed": [{**b.to_dict(), "sensitivity": plan.settings.get(
            "bypass_sensitivity", {}).get(b.key)} for b in plan.bypasses],
        "verification": {"passed": check.passed, "exact": check.exact_checked,
                         "max_rel_error": check.max_rel_error, "checked": check.checked,
                         "output_shapes": [list(s) for s in check.output_shapes]},
    }


def to_markdown(report: dict[str, Any]) -> str:
    p, m, v = report["params"], report["macs"], report["verification"]
    settings = {k: val for k, val in report["settings"].items()
                if k not in ("trace_notes", "warnings", "config", "trajectory", "measured")}
    warned = [f"**warning**: {w}" for w in report["settings"].get("warnings", [])]
    lines = [f"# surgery prune report: {report['model']}", "", *warned, *([""] if warned else [])]
    settings.pop("shapes_only", None)  # said by the verification line
    lines += [f"settings: {settings}", ""]
    notes = report["settings"].get("trace_notes", [])
    if settings.get("tracer") == "run":
        lines += ["traced by running the forward on the example input (torch.fx could not "
                  "trace it): Python branches follow that input", ""]
    lines += [f"- note: {n}" for n in notes] + ([""] if notes else [])
    lines += [
             "| | before | after | ratio |", "|---|---|---|---|",
             f"| params | {p['before']:,} | {p['after']:,} | {p['before'] / p['after']:.2f}x |",
             f"| MACs | {m['before']:,} | {m['after']:,} | {m['before'] / m['after']:.2f}x |", "",
             "verification: " + (f"exact, max relative error {v['max_rel_error']:.1e} "
                                 f"({v.get('checked', 'outputs')})" if v["exact"] else
                                 v.get("checked", "output shapes only")) +
             ("" if v["passed"] else " FAILED"), ""]
    if "onnx" in report:
        o = report["onnx"]
        lines += [f"ONNX: {o['path']} ({o['file_bytes'] / 1e6:.2f} MB), ONNX Runtime max "
                  f"relative error {o['max_rel_error']:.1e}", ""]
    measured = report["settings"].get("measured")
    if measured:  # a latency target: what was measured, round by round
        lines += [f"measured on {measured['runtime']} ({measured['threads']} threads, batch "
                  f"{measured['batch']}): {measured['ms']:.2f} ms vs {measured['original_ms']:.2f}"
                  f" ms, {measured['speedup']:.2f}x for a target of "
                  f"{measured['target_speedup']:.2f}x "
                  f"({'met' if measured['met'] else 'NOT met'})"
                  + ("; by batch: " + ", ".join(f"{b}: {v:.2f}x" for b, v in measured[
                      "by_batch"].items()) + " (the target is their geometric mean)"
                     if measured.get("by_batch") else ""), "",
                  "| round | ratio | ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {k + 1} | {t['ratio']:.3f} | {t['ms']:.2f} | {t['speedup']:.2f}x |"
                  for k, t in enumerate(report["settings"].get("trajectory", []))] + [""]
    changed = report.get("attributes", {})
    if changed:  # sizes the forward reads from attributes (heads, split sections)
        lines += ["attributes rewritten: " + ", ".join(
            f"`{name}: {c['before']} → {c['after']}`" for name, c in changed.items()), ""]
    bypassed = report.get("bypassed", [])
    if bypassed:  # depth pruning
        lines += [f"blocks bypassed ({len(bypassed)}; their layers no longer run):", ""]
        lines += [f"- `{b['block']}` {b['kind']} ({len(b['removes'])} layers"
                  + (f", output change {b['sensitivity']:.3f}" if b.get("sensitivity") is not None
                     else "") + f"): {b['line'] or b['node']}" for b in bypassed] + [""]
    lines += ["| layer | weight before | weight after |", "|---|---|---|"]
    lines += [f"| {name} | {w['before']} | {w['after'] or 'bypassed'} |"
              for name, w in report["layers"].items()]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: str) -> None:
    """Bar charts of median latency per model and runtime, and of MACs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r.runtime, r.batch) for r in report.rows})
    models = list(dict.fromkeys(r.model for r in report.rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(models), 1)
    for i, name in enumerate(models):
        vals = [next((r.median_ms for r in report.rows
                      if r.model == name and (r.runtime, r.batch) == k), 0.0) for k in keys]
        ax1.bar(np.arange(len(keys)) + i * width, vals, width, label=name)
    ax1.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2,
                   [f"{rt}\nbatch {b}" for rt, b in keys])
    ax1.set_ylabel("median latency (ms)")
    ax1.legend(fontsize=8)
    macs = {r.model: r.macs for r in report.rows}
    ax2.bar(range(len(models)), [macs[m] / 1e6 for m in models],
            color=[f"C{i}" for i in range(len(models))])
    ax2.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
    ax2.set_ylabel("MACs per sample (M)")
    fig.suptitle(f"medians of alternating runs, {report.env.get('cpu')}, "
                 f"{report.env.get('threads')} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
