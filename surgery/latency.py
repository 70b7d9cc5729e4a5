"""Latency-aware allocation: spend a MAC budget where the target runtime saves the most time.

A uniform ratio removes the same share of every group, but on a real runtime a MAC is not a MAC:
a depthwise or a narrow high-resolution conv costs far more time per MAC than a wide 3x3 conv. Here
every conv/linear call of the model is timed alone on the target runtime (an entry of
:mod:`surgery.runtimes`: ONNX Runtime or PyTorch, CPU or CUDA) at a few widths of its input and
output channels; the allocator then removes channels step by step (``round_to`` units at a time)
from the group whose next step saves the most estimated time per MAC removed, until the model's
MACs reach the budget. The budget is the MACs of the uniform plan at ``ratio``, so the result has
the same arithmetic as the uniform plan, laid out where the runtime profits (``budget="latency"``:
the uniform plan's estimated time instead, reached with fewer MACs removed). Within a group, the
least important channels by the criterion go first, as in :func:`surgery.plan`.

Per-layer cost knowledge lives with each layer's module rule (``ModuleRule.cost``, models in
``surgery/rules/cost.py``): Conv2d and Linear (timed, with MACs), BatchNorm2d (timed in eager, free
in ONNX Runtime, which folds it). :func:`register_cost` adds or overrides one. Other layers are not
modelled; their time counts as fixed.
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RuntimeAware
from .criteria import get_criterion
from .depth import Bypass, block_change, find_bypasses, first_calls, sensitivity, transitions
from .errors import ConfigError
from .graph import ChannelGraph, Inputs, as_tuple, trace
from .modes import switched_mode
from .plan import Plan, keep_count, make_plan, per_unit, plan_removing
from .rules import module_rule
from .rules.cost import Call, CostRule
from .runtimes import Runtime, get_runtime, runtime_names
from .verify import zeroed_reference

GRID = (1.0, 0.75, 0.5, 0.25)  # widths (fractions of the original) timed per axis


_COSTS: list[CostRule] = []


def register_cost(rule: CostRule, *, replace: bool = False) -> CostRule:
    """Give module classes a cost model (one without a module rule, or to override the rule's).

    Raises on a class that already has one unless ``replace``; the usual place for a cost model
    is the module rule itself (``ModuleRule.cost``).
    """
    for t in rule.types:
        existing = cost_rule(t)
        if existing is not None and not replace:
            raise ValueError(f"{t.__qualname__} already has a cost model "
                             f"({type(existing).__name__}); pass replace=True to override")
    _COSTS.insert(0, rule)
    return rule


def cost_rule(m: nn.Module | type) -> CostRule | None:
    """The cost model of a module (or class): a registered one, else its module rule's."""
    cls = m if isinstance(m, type) else type(m)
    found = next((r for r in _COSTS if issubclass(cls, r.types)), None)
    if found is not None:
        return found
    cost = getattr(module_rule(cls), "cost", None)
    return cost if cost is not None and issubclass(cls, cost.types) else None


def _costed(m: nn.Module) -> CostRule:
    """The cost model of a module known to have one (a call :func:`find_calls` recorded)."""
    rule = cost_rule(m)
    assert rule is not None
    return rule


def _time_ms(fn: Callable[[], Any], runtime: Runtime, budget_s: float = 0.06,
             reps: int = 50) -> float:
    """Lower quartile of repeated runs (at least 5, up to ``reps`` within ``budget_s``): a
    one-layer run is short, so the quartile is the stable figure under machine noise."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 5 or time.perf_counter() - start < budget_s):
        times.append(runtime.time_ms(fn))
    return float(np.percentile(times, 25))


def find_calls(model: nn.Module, example_inputs: Inputs, graph: ChannelGraph) -> list[Call]:
    """Every call of a costed leaf module in one eval forward, with its shapes and slots."""
    names = {m: n for n, m in model.named_modules()}
    by_path: dict[str, dict[str, str]] = {}
    for key, slot in graph.slots.items():
        if slot.kind == "module":
            by_path.setdefault(slot.path, {})[slot.axis] = key
    calls: list[Call] = []

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            p = names[m]
            axes = _costed(m).slot_axes  # hooked only where there is a cost model
            slots = {axes[a]: key for a, key in by_path.get(p, {}).items() if a in axes}
            calls.append(Call(p, m, tuple(args[0].shape), tuple(out.shape), slots))

    handles = [m.register_forward_hook(hook) for m in model.modules() if cost_rule(m)]
    try:
        with switched_mode(model), torch.no_grad():
            model(*as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass
class _Table:
    """Measured ms of one call on a grid of widths; bilinear in between (clamped at the edges).

    The allocator asks millions of times on models with many calls (DenseNet), so lookups are
    plain Python on a few grid points, remembered per width pair."""

    ins: np.ndarray
    outs: np.ndarray
    ms: np.ndarray  # [len(ins), len(outs)]
    _memo: dict[tuple[float, float], float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ins = [float(v) for v in self.ins]
        self._outs = [float(v) for v in self.outs]
        self._rows = [[float(v) for v in r] for r in self.ms]

    def __call__(self, cin: float, cout: float) -> float:
        hit = self._memo.get((cin, cout))
        if hit is None:
            rows = [_interp(cout, self._outs, r) for r in self._rows]
            hit = self._memo[(cin, cout)] = _interp(cin, self._ins, rows)
        return hit


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """``np.interp`` for one point: linear between the grid points, the end values outside."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    j = bisect.bisect_right(xs, x)
    t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return ys[j - 1] + t * (ys[j] - ys[j - 1])


def _grid(full: int, lowest: float) -> list[int]:
    """Widths to time: the GRID fractions (multiples of 8) and the lowest width allowed."""
    step = 8 if full >= 16 else 1
    vals = {min(full, max(step, round(full * f / step) * step)) for f in GRID if f >= lowest}
    return sorted(vals | {full, max(1, math.floor(full * lowest))})


@dataclass
class LatencyModel:
    """Estimated time and MACs of every costed call as a function of its kept widths."""

    runtime: str
    threads: int
    calls: list[Call]
    tables: list[_Table]
    lowest: float = 0.25  # narrowest width timed, as a fraction of the original
    timed: int = 0  # distinct layer shapes timed
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.rules = [_costed(c.module) for c in self.calls]
        self.full = [r.widths(c) for r, c in zip(self.rules, self.calls, strict=True)]

    def ms(self, i: int, w: dict[str, int]) -> float:
        return self.tables[i](w["in"], w["out"])

    def macs(self, i: int, w: dict[str, int]) -> float:
        return self.rules[i].macs(self.calls[i], w)


Timer = Callable[[Call, dict[str, int]], float]


def latency_model(model: nn.Module, example_inputs: Inputs, *, runtime: str = "ort",
                  threads: int = 1, lowest: float = 0.25, ignore: Sequence[str] = (),
                  graph: ChannelGraph | None = None, timer: Timer | None = None) -> LatencyModel:
    """Time every conv/linear call of ``model`` alone on ``runtime`` at a grid of channel widths
    (1, 0.75, 0.5, 0.25 of the original, down to ``lowest``); repeated shapes are timed once.

    ``timer(call, widths) -> ms`` replaces the built-in timing (e.g. to time on another device).
    """
    if runtime not in runtime_names():
        raise ConfigError(f"latency runtime must be one of {', '.join(runtime_names())}, "
                          f"not {runtime!r}")
    rt = get_runtime(runtime)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive int but received {threads!r}")
    if timer is None:
        rt.check()
    if graph is None:
        graph = trace(model, example_inputs, ignore=ignore)
    calls = find_calls(model, example_inputs, graph)

    def builtin(call: Call, w: dict[str, int]) -> float:
        rule = cost_rule(call.module)
        assert rule is not None
        run = rt.layer_runner(rule.program(call, w), threads)
        return 0.0 if run is None else _time_ms(run, rt)

    time_it = timer or builtin
    start = time.perf_counter()
    cache: dict[tuple, float] = {}
    tables = []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for call in calls:
            rule = cost_rule(call.module)
            assert rule is not None
            full = rule.widths(call)
            outs = _grid(full["out"], lowest) if "out" in call.slots else [full["out"]]
            coupled = rule.coupled(call) or "in" not in call.slots
            ins = [full["in"]] if coupled else _grid(full["in"], lowest)
            ms = np.empty((len(ins), len(outs)))
            for a, cin in enumerate(ins):
                for b, cout in enumerate(outs):
                    key = (type(rule).__name__, call.in_shape, call.out_shape,
                           repr(call.module), cin, cout)
                    if key not in cache:
                        cache[key] = time_it(call, {"in": cin, "out": cout})
                    ms[a, b] = cache[key]
            tables.append(_Table(np.array(ins, float), np.array(outs, float), ms))
    finally:
        torch.set_num_threads(old_threads)
    return LatencyModel(runtime, threads, calls, tables, lowest, len(cache),
                        time.perf_counter() - start)


@dataclass
class _GroupState:
    order: np.ndarray  # free units, least important first
    keeps: list[int]  # candidate kept counts, descending; keeps[0] = all
    ppu: dict[str, float]  # slot key -> positions per unit
    calls: list[int]
    at: int = 0  # index into keeps

    @property
    def removed(self) -> int:
        return len(self.order) - self.keeps[self.at]


def latency_plan(model: nn.Module, example_inputs: Inputs, *, ratio: float,
                 runtime: str = "ort", threads: int = 1, criterion: str = "l2",
                 round_to: int = 8, max_ratio: float | None = None, budget: str = "macs",
                 ignore: Sequence[str] = (), seed: int = 0,
                 graph: ChannelGraph | None = None,
                 latency: LatencyModel | None = None, exact: bool = False,
                 depth: bool = False, compare: bool = False,
                 batch: int | None = None) -> Plan:
    """A plan with the budget of the uniform ``ratio`` plan, laid out where ``runtime``
    (``"ort"``: ONNX Runtime CPU, ``"torch"``: PyTorch eager, ``threads`` threads, at the batch of
    ``example_inputs``) saves the most time per MAC removed.

    Args:
        budget: ``"macs"`` (default): remove as many MACs as the uniform plan, chosen to be faster;
            ``"latency"``: stop at the uniform plan's estimated time, removing fewer MACs.
        max_ratio: no group loses more than this share of its channels (default halfway between
            ``ratio`` and 1, at most 0.9), so no layer is starved.
        round_to: widths stay multiples of it and, when it is above 1, of the runtime's
            :meth:`~surgery.Runtime.channel_multiple` (``settings["channel_multiple"]``).
        latency: a :class:`LatencyModel` of the same model (from :func:`latency_model`), to reuse
            its timings.
        depth: also consider bypassing whole residual bodies and gates (:mod:`surgery.depth`):
            a bypass competes with the width steps by estimated time saved per MAC, its MACs
            weighted by its sensitivity relative to the median bypass's (a block that changes
            its output little is cheap to lose).
        compare: time the whole pruned model of this plan and of the uniform plan on the
            runtime (alternating rounds, at the batch of ``example_inputs``) and return the
            faster, ``settings["compared"]`` saying both times. The per-layer timings miss what
            happens between layers (fusions, memory traffic), so the laid-out plan can lose;
            :class:`surgery.RuntimeAware` does this by default. Where the whole model cannot be
            timed there (several inputs, no ONNX export), a warning says why and the laid-out
            plan is returned (``settings["compared"]["skipped"]``).
        batch: time at this batch size on random inputs shaped like ``example_inputs`` (one
            tensor), which then only score channels and blocks: give a batch of real images
            there and the deployment batch here. None: time ``example_inputs`` themselves.

    Example:
        >>> p = surgery.latency_plan(model, torch.randn(1, 3, 224, 224), ratio=0.5,
        ...                          runtime="ort", threads=2)
    """
    if runtime not in runtime_names():
        raise ConfigError(f"latency runtime must be one of {', '.join(runtime_names())}, "
                          f"not {runtime!r}")
    if budget not in ("latency", "macs"):
        raise ConfigError(f"budget must be 'latency' or 'macs', not {budget!r}")
    timed = _timed_inputs(example_inputs, batch)
    uniform = make_plan(model, example_inputs, ratio=ratio, criterion=criterion,
                        round_to=round_to, ignore=ignore, seed=seed, graph=graph, exact=exact)
    if graph is None:
        graph = trace(model, example_inputs, ignore=ignore)
    if max_ratio is None:
        max_ratio = min(0.9, ratio + (1 - ratio) / 2)
    if not ratio <= max_ratio < 1:
        raise ConfigError(f"max_ratio must be in [ratio={ratio}, 1) but received {max_ratio!r}")
    if ratio == 0:
        return uniform
    if latency is None:
        latency = latency_model(model, timed, runtime=runtime, threads=threads,
                                lowest=1 - max_ratio, graph=graph)
    elif latency.lowest > 1 - max_ratio + 1e-9:
        raise ConfigError(f"the latency model was timed down to {latency.lowest:g} of every "
                          f"width but max_ratio={max_ratio:g} needs {1 - max_ratio:g}; time it "
                          f"again with latency_model(..., lowest={1 - max_ratio:g})")
    calls = latency.calls
    foreign = sorted({k for c in calls for k in c.slots.values() if k not in graph.slots})
    if foreign:
        raise ConfigError(f"the latency model was made for another model (layer axes "
                          f"{', '.join(foreign[:3])} are not in this one); time this model with "
                          "latency_model(model, example_inputs)")
    score = get_criterion(criterion)(model, graph, seed)
    by_slot: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        for key in c.slots.values():
            by_slot.setdefault(key, []).append(i)
    # widths the runtime's fast kernels take (round_to=1 asks for any count: no alignment)
    align = math.lcm(round_to, get_runtime(latency.runtime).channel_multiple()) \
        if round_to > 1 else 1
    states: list[_GroupState] = []
    uniform_removed: list[int] = []
    for g in graph.groups:
        if not g.prunable or exact and graph.cross & set(g.units.tolist()):
            continue
        unit = per_unit(graph, g)
        n, fixed = len(g.units), len(g.pinned)
        lo = keep_count(n, fixed, unit, max_ratio, align)
        step = align // math.gcd(align, unit) if align > 1 else 1
        keeps = [n] + [k for k in range(n - 1, lo - 1, -1) if (k + fixed) % step == 0]
        if keeps[-1] != lo and lo < n:
            keeps.append(lo)
        ppu = {key: float(np.isin(graph.slot_roots(key), g.units).sum()) / n
               for key in g.slots}
        touched = sorted({i for key in g.slots for i in by_slot.get(key, [])})
        states.append(_GroupState(g.units[np.argsort(score(g), kind="stable")], keeps, ppu,
                                  touched))
        uniform_removed.append(n - keep_count(n, fixed, unit, ratio, round_to))
    kept: dict[str, float] = {key: s.size for key, s in graph.slots.items()}
    stopped: set[int] = set()  # calls inside a bypassed body: they no longer run
    depths: list[_DepthStep] = []

    def widths(i: int) -> dict[str, int]:
        slots = calls[i].slots
        return {a: int(round(kept[slots[a]])) if a in slots else n
                for a, n in latency.full[i].items()}

    def set_removed(st: _GroupState, removed: int, sign: float = 1.0) -> None:
        for key, p in st.ppu.items():
            kept[key] -= sign * p * removed

    def measure_all() -> float:
        cost = latency.macs if budget == "macs" else latency.ms
        return sum(cost(i, widths(i)) for i in range(len(calls)) if i not in stopped)

    for st, r in zip(states, uniform_removed, strict=True):
        set_removed(st, r)
    limit = measure_all()
    uniform_macs = [latency.macs(i, widths(i)) for i in range(len(calls))]
    for st, r in zip(states, uniform_removed, strict=True):
        set_removed(st, r, -1.0)
    total = measure_all()
    if depth:
        depths = _depth_steps(model, example_inputs, latency, uniform, uniform_macs, ignore)
    cap = math.floor(ratio * len(depths) + 1e-9)  # at most `ratio` of the blocks go

    def gain(st: _GroupState) -> tuple[float, float, float]:
        """(ms saved per MAC, ms saved, MACs saved) of this group's next step."""
        if st.at + 1 >= len(st.keeps):
            return (-math.inf, 0.0, 0.0)
        running = [i for i in st.calls if i not in stopped]
        before = [(latency.ms(i, w), latency.macs(i, w)) for i in running for w in [widths(i)]]
        delta = st.keeps[st.at] - st.keeps[st.at + 1]
        set_removed(st, delta)
        after = [(latency.ms(i, w), latency.macs(i, w)) for i in running for w in [widths(i)]]
        set_removed(st, delta, -1.0)
        dms = sum(b[0] for b in before) - sum(a[0] for a in after)
        dmac = sum(b[1] for b in before) - sum(a[1] for a in after)
        return (dms / dmac if dmac > 0 else -math.inf, dms, dmac)

    def depth_gain(d: _DepthStep) -> tuple[float, float, float]:
        """(ms saved per weighted MAC, ms saved, MACs saved) of bypassing ``d`` now."""
        running = [i for i in d.calls if i not in stopped]
        if d.taken or not running or sum(e.taken for e in depths) >= cap:
            return (-math.inf, 0.0, 0.0)
        dms = sum(latency.ms(i, widths(i)) for i in running)
        dmac = sum(latency.macs(i, widths(i)) for i in running)
        price = dmac * d.weight
        return (dms / price if price > 0 else -math.inf, dms,
                dmac if budget == "macs" else dms)

    steps: list[_GroupState | _DepthStep] = [*states, *depths]
    cached = {id(st): gain(st) for st in states}
    cached.update({id(d): depth_gain(d) for d in depths})
    share: dict[int, list[_GroupState]] = {}
    for st in states:
        for i in st.calls:
            share.setdefault(i, []).append(st)
    while total > limit:
        open_ = [s for s in steps if cached[id(s)][0] > -math.inf]
        if not open_:
            break
        best = max(open_, key=lambda s: cached[id(s)][0])
        if budget == "macs" and cached[id(best)][2] > total - limit:
            # near the budget: the best step that does not remove more MACs than the uniform
            # plan; else the smallest step, as the last one
            fits = [s for s in open_ if cached[id(s)][2] <= total - limit]
            best = max(fits, key=lambda s: cached[id(s)][0]) if fits else \
                min(open_, key=lambda s: cached[id(s)][2])
        per, dms, dmac = cached[id(best)]
        if isinstance(best, _DepthStep):
            best.taken = True
            touched = [i for i in best.calls if i not in stopped]
            stopped.update(best.calls)
            total -= dmac if budget == "macs" else dms
        else:
            set_removed(best, best.keeps[best.at] - best.keeps[best.at + 1])
            best.at += 1
            total -= dmac if budget == "macs" else dms
            touched = best.calls
        for i in touched:
            for other in share.get(i, []):
                cached[id(other)] = gain(other)
        for d in depths:
            cached[id(d)] = depth_gain(d)
        if not isinstance(best, _DepthStep):
            cached[id(best)] = gain(best)
    gone = [st.order[:st.removed] for st in states if st.removed]
    config = RuntimeAware(ratio=ratio, runtime=latency.runtime, threads=latency.threads,
                          budget=budget, max_ratio=max_ratio, criterion=criterion,
                          round_to=round_to, ignore=tuple(ignore), seed=seed, exact=exact,
                          depth=depth, compare=compare, batch=batch)
    settings = {**uniform.settings, "allocation": "latency", "runtime": latency.runtime,
                "threads": latency.threads, "max_ratio": max_ratio, "config": config.to_dict(),
                **({"channel_multiple": align} if align != round_to else {})}
    plan = plan_removing(model, graph,
                         np.unique(np.concatenate(gone)) if gone else np.zeros(0, np.int64),
                         dict(settings))
    taken = [d.bypass for d in depths if d.taken]
    if taken:
        plan = plan.bypassing(taken)
        plan.settings["bypass_sensitivity"] = {d.bypass.key: round(d.score, 6) for d in depths
                                               if d.taken}
    if compare and (plan.layers != uniform.layers or plan.bypasses):
        return _faster(model, timed, plan, uniform.with_settings(
            {**settings, "allocation": "uniform"}), latency.runtime, latency.threads)
    return plan


def _timed_inputs(example_inputs: Inputs, batch: int | None) -> Inputs:
    """What the runtime times: ``example_inputs``, or random ones like them at ``batch``."""
    if batch is None:
        return example_inputs
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive int or None but received {batch!r}")
    x = as_tuple(example_inputs)
    if len(x) != 1 or not isinstance(x[0], torch.Tensor) or x[0].dim() == 0:
        raise ConfigError(f"batch={batch} times random inputs shaped like the example, which "
                          f"must be one batched tensor (this model takes {len(x)} inputs); "
                          "leave batch unset to time the example inputs themselves")
    return torch.randn(batch, *x[0].shape[1:], dtype=x[0].dtype, device=x[0].device)


def _faster(model: nn.Module, example_inputs: Inputs, laid_out: Plan, uniform: Plan,
            runtime: str, threads: int) -> Plan:
    """Whichever of the two plans' pruned models ``runtime`` runs faster (medians of
    alternating rounds), with both times in ``settings["compared"]``."""
    from .bench import bench
    from .surgeon import apply

    x = as_tuple(example_inputs)
    why = "" if len(x) == 1 and isinstance(x[0], torch.Tensor) else \
        f"whole-model timing takes one input tensor; this model takes {len(x)} inputs"
    if not why:
        try:
            models = {"laid out": apply(model, laid_out), "uniform": apply(model, uniform)}
            report = bench(models, tuple(x[0].shape[1:]), runtimes=[runtime],
                           batches=[x[0].shape[0]], threads=threads, rounds=10)
        except Exception as e:  # a check on top of a valid plan: say why it was not made
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if why:
        warnings.warn(f"the laid-out plan was not timed against the uniform plan on {runtime} "
                      f"({why}); it is returned as laid out", stacklevel=3)
        return laid_out.with_settings({**laid_out.settings, "compared": {"skipped": why}})
    ms = {r.model: r.median_ms for r in report.rows}
    kept = "uniform" if ms["uniform"] < ms["laid out"] else "laid out"
    compared = {"runtime": runtime, "threads": threads, "batch": int(x[0].shape[0]),
                "laid_out_ms": round(ms["laid out"], 4), "uniform_ms": round(ms["uniform"], 4),
                "kept": kept}
    chosen = uniform if kept == "uniform" else laid_out
    return chosen.with_settings({**chosen.settings, "compared": compared})


@dataclass
class _DepthStep:
    bypass: Bypass
    calls: list[int]  # costed calls that stop running
    weight: float  # sensitivity relative to the median bypass's: MACs lost count this much
    score: float
    taken: bool = False


def _depth_steps(model: nn.Module, example_inputs: Inputs, latency: LatencyModel,
                 uniform: Plan, uniform_macs: list[float],
                 ignore: Sequence[str]) -> list[_DepthStep]:
    """The bypasses of ``model`` as allocator steps (those that stop at least one timed call).

    A bypass's MACs are weighted by its damage per MAC against the uniform plan's in the same
    block: (output change when bypassed) / (output change with the uniform plan's channels
    zeroed, per share of the block's MACs that plan removes). Below 1, losing the block costs
    less per MAC than narrowing it. A stage's first block (its output shape differs from its
    input's) is not offered: what would remain of it is the shortcut's projection alone."""
    found = find_bypasses(model, ignore=ignore)
    # one forward records every candidate block's first call, for all three measures
    candidates = {b.block for b in found}
    calls = first_calls(model, example_inputs, candidates)
    moved = transitions(model, example_inputs, candidates, calls=calls)
    found = [b for b in found if b.block not in moved]
    scores = sensitivity(model, example_inputs, found, calls=calls)
    steps = []
    for b, s in zip(found, scores, strict=True):
        inside = [i for i, c in enumerate(latency.calls)
                  if any(c.path == r or c.path.startswith(r + ".") for r in b.removes)]
        if inside and math.isfinite(s):
            steps.append(_DepthStep(b, inside, 1.0, s))
    if not steps:
        return steps
    blocks = sorted({d.bypass.block for d in steps})
    narrowed = dict(zip(blocks, block_change(model, zeroed_reference(model, uniform),
                                             example_inputs, blocks, calls=calls), strict=True))
    for d in steps:
        full = sum(latency.macs(i, latency.full[i]) for i in d.calls)
        share = 1 - sum(uniform_macs[i] for i in d.calls) / full if full > 0 else 0.0
        per_mac = narrowed[d.bypass.block] / max(share, 0.05)
        d.weight = (d.score + 1e-3) / (per_mac + 1e-3) if math.isfinite(per_mac) else 1.0
    return steps
