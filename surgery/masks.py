"""From ``torch.nn.utils.prune`` masks to a physically smaller model.

A model masked channel-wise (``prune.ln_structured(m, "weight", amount, n, dim=0)`` or any mask
that zeroes whole output rows) still computes with full-size tensors. ``from_masks`` removes the
masked channels for real, consistently with their coupled groups.

Math. A masked channel c is not silent: its conv may keep a bias and a BatchNorm after it outputs
``beta - gamma * mu / sqrt(var + eps)``; after the activation this is a constant k_c. Each consumer
``y = W x + b`` then receives ``W[:, c] * k_c`` from it, which is folded into the bias:
``b' = b + sum_{spatial} W[:, c] * k_c``. The constant is measured on the example inputs (median
over positions), so any chain of per-channel ops is covered. Zero padding at the borders sees 0,
not k_c, so folding is exact only away from borders; the remaining difference is reported, and
when masked channels carry no signal (k_c = 0) the result is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from .graph import Inputs, as_tuple, trace
from .modes import switched_mode
from .plan import Plan, plan_removing
from .rules import module_rule
from .surgeon import apply
from .tensors import output_tensors, rel_error


@dataclass(frozen=True)
class MaskReport:
    """What ``from_masks`` removed, what it had to keep and why, and how close the result is."""

    plan: Plan
    removed: dict[str, int]  # producer layer -> output channels removed
    kept: list[str] = field(default_factory=list)  # masked channels kept, with the reason
    folded: int = 0  # consumer layers whose bias absorbed the constant of removed channels
    max_rel_error: float = 0.0  # pruned vs masked model
    exact: bool = True


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy that also works on masked modules (their ``weight`` is a computed tensor)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, tprune.BasePruningMethod):
                t = getattr(m, hook._tensor_name)
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _unmasked_copy(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy with every pruning mask made permanent, and the dead output rows per layer."""
    clean = _copy(model)
    dead: dict[str, torch.Tensor] = {}
    for name, m in clean.named_modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tensor = hook._tensor_name
                rule = module_rule(m)
                rows = rule.weight_rows(m, "out", getattr(m, tensor + "_mask")) \
                    if rule is not None and tensor == "weight" and "out" in rule.axes else None
                if rows is not None:
                    dead[name] = (rows == 0).all(1)
                tprune.remove(m, tensor)
    return clean, dead


def from_masks(model: nn.Module, example_inputs: Inputs) -> tuple[nn.Module, MaskReport]:
    """A physically smaller model without the channels that pruning masks zeroed.

    The input model (masks, hooks and all) is not modified.

    Example:
        >>> torch.nn.utils.prune.ln_structured(model.conv1, "weight", 0.5, n=2, dim=0)
        >>> small, report = surgery.from_masks(model, x)
    """
    inputs = as_tuple(example_inputs)
    clean, dead = _unmasked_copy(model)
    graph = trace(clean, inputs)
    gone: list[int] = []
    kept: list[str] = []
    removed: dict[str, int] = {}
    for g in graph.groups:
        producers = [k for k in g.slots if k.endswith(":out")]
        if not producers or not len(g.units):
            continue
        n = len(g.units)
        units_dead = np.ones(n, bool)  # masked in every producer of the group
        masked_any = np.zeros(n, bool)  # masked in at least one
        for key in producers:
            path = graph.slots[key].path
            roots = graph.slot_roots(key)
            mine = np.isin(roots, g.units)
            idx = np.searchsorted(g.units, roots[mine])
            d = dead[path].numpy()[mine] if path in dead else np.zeros(int(mine.sum()), bool)
            all_dead, any_dead = np.ones(n, bool), np.zeros(n, bool)
            np.logical_and.at(all_dead, idx, d)
            np.logical_or.at(any_dead, idx, d)
            units_dead &= all_dead
            masked_any |= any_dead
        disagree = masked_any & ~units_dead
        if disagree.any():
            alive = [graph.slots[k].path for k in producers if graph.slots[k].path not in dead]
            kept.append(f"{int(disagree.sum())} masked channels of {', '.join(producers[:3])} "
                        f"kept: coupled layers still produce them "
                        f"({', '.join(alive[:3]) or 'their masks differ'})")
        if units_dead.all():  # keep one unit: a layer cannot have zero channels
            units_dead[0] = False
            kept.append(f"one channel of {producers[0]} kept: every channel was masked")
        gone += g.units[units_dead].tolist()
        for key in producers:
            removed[graph.slots[key].path] = int(units_dead.sum())
    plan = plan_removing(clean, graph, np.unique(np.array(gone, np.int64)),
                         {"from_masks": True})
    small = apply(clean, plan)
    folded = _fold_constants(clean, small, plan, inputs)
    err = _compare(model, small, inputs)
    return small, MaskReport(plan, {k: v for k, v in removed.items() if v}, kept, folded, err,
                             err <= 1e-5)


def _fold_constants(clean: nn.Module, small: nn.Module, plan: Plan, inputs: tuple) -> int:
    """Add what the removed channels contributed (as constants) to the consumers' biases."""
    consumers = {path: lp.axes["in"] for path, lp in plan.layers.items()
                 if lp.kind == "module" and "in" in lp.axes}
    seen: dict[str, torch.Tensor] = {}
    hooks = [clean.get_submodule(p).register_forward_pre_hook(
        lambda m, args, p=p: seen.__setitem__(p, args[0].detach())) for p in consumers]
    try:
        with switched_mode(clean), torch.no_grad():
            clean(*inputs)
    finally:
        for h in hooks:
            h.remove()
    folded = 0
    for path, ap in consumers.items():
        old, new = clean.get_submodule(path), small.get_submodule(path)
        rule = module_rule(old)
        gone = ap.removed()
        extra = rule.bias_of_removed_inputs(old, seen[path], gone) if rule is not None else None
        if extra is None or not extra.abs().max() > 0:
            continue
        assert isinstance(new, type(old))  # surgery keeps a layer's class
        bias = getattr(new, "bias", None)
        with torch.no_grad():
            if isinstance(bias, torch.Tensor):
                bias += extra
            else:
                new.bias = nn.Parameter(extra)
        folded += 1
    return folded


def _compare(masked: nn.Module, small: nn.Module, inputs: tuple) -> float:
    a, b = _copy(masked).eval(), copy.deepcopy(small).eval()
    with torch.no_grad():
        want, got = output_tensors(a(*inputs)), output_tensors(b(*inputs))
    return max((rel_error(x, y) for x, y in zip(got, want, strict=True)), default=0.0)
