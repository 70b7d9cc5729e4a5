"""plan(): a config to a plan, whichever strategy; prune(): plan + apply + verify in one call."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from .collector import collector_paused
from .config import LatencyTarget, MacBudget, PruneConfig, RuntimeAware, Uniform
from .errors import ConfigError
from .graph import ChannelGraph, Inputs, trace
from .latency import latency_plan
from .plan import Plan, make_plan
from .runtimes import runtime_names
from .stats import count_macs
from .surgeon import apply
from .verify import VerifyReport
from .verify import verify as check


def as_config(config: PruneConfig | None = None, *, ratio: float | None = None,
              target_macs: float | None = None, allocate: str = "uniform", threads: int = 1,
              criterion: str = "l2", round_to: int = 8, ignore: Sequence[str] = (),
              seed: int = 0, exact: bool = False, target_speedup: float | None = None,
              target_latency: float | None = None, runtime: str = "ort",
              batch: int | tuple[int, ...] | None = None,
              floor_batch: int | tuple[int, ...] = (),
              depth: bool = False) -> PruneConfig:
    """``config``, or the config the keyword settings describe (the older calling style):
    ``ratio`` (Uniform, or RuntimeAware with ``allocate=RUNTIME``), ``target_macs``
    (MacBudget), ``target_speedup`` / ``target_latency`` in ms (LatencyTarget, measured on
    ``runtime`` with ``threads`` and ``batch``, default 1; ``allocate=RUNTIME`` lays it out
    for that runtime); ``depth`` (with ``allocate=RUNTIME``) also bypasses whole blocks;
    ``batch`` with ``allocate=RUNTIME`` alone: the one batch size timed (default: the
    example's); ``floor_batch``: batch sizes a latency target's landing must also hold 0.9 x the
    target at."""
    if config is not None:
        if not isinstance(config, PruneConfig):
            raise ConfigError(f"expected a prune config (surgery.Uniform(0.5), MacBudget, "
                              f"RuntimeAware) but received {config!r}")
        return config
    if ratio is not None and target_macs is not None:
        raise ConfigError("give exactly one of ratio= or target_macs=")
    if allocate not in ("uniform", *runtime_names()):
        raise ConfigError(f"allocate must be 'uniform' or a runtime to allocate for "
                          f"({', '.join(runtime_names())}), not {allocate!r}")
    if depth and allocate == "uniform":
        raise ConfigError("depth pruning is weighed against narrower layers by the runtime-aware "
                          f"allocator: give allocate=RUNTIME ({', '.join(runtime_names())})")
    common: dict[str, Any] = {"criterion": criterion, "round_to": round_to,
                              "ignore": tuple(ignore), "seed": seed, "exact": exact}
    if floor_batch and target_speedup is None and target_latency is None:
        raise ConfigError("floor_batch= guards a latency target's landing: give target_speedup= "
                          "or target_latency=")
    if target_speedup is not None or target_latency is not None:
        if ratio is not None or target_macs is not None:
            raise ConfigError("give one of ratio=, target_macs=, target_speedup= or "
                              "target_latency=")
        if allocate not in ("uniform", runtime):
            raise ConfigError(f"allocate={allocate!r} with a latency target on {runtime!r}: "
                              f"lay it out for the runtime it is measured on "
                              f"(allocate={runtime!r}) or uniformly")
        return LatencyTarget(speedup=target_speedup, latency_ms=target_latency,
                             runtime=runtime, threads=threads,
                             batch=1 if batch is None else batch, floor_batch=floor_batch,
                             allocate=allocate != "uniform", depth=depth, **common)
    if allocate != "uniform":
        if target_macs is not None:
            raise ConfigError("target_macs= works with allocate='uniform' only; give ratio= "
                              "(the latency-aware plan removes as many MACs as that ratio)")
        if ratio is None:
            raise ConfigError(f"allocate={allocate!r} needs ratio= (it removes as many MACs "
                              "as that ratio would)")
        if isinstance(batch, tuple):
            if len(batch) != 1:
                raise ConfigError(f"allocate={allocate!r} times one batch size, not {batch}; "
                                  "several batch sizes work with a latency target")
            batch = batch[0]
        return RuntimeAware(ratio=ratio, runtime=allocate, threads=threads, depth=depth,
                            batch=batch, **common)
    if target_macs is not None:
        if not isinstance(target_macs, int | float) or not 0 < target_macs < 1:
            raise ConfigError(f"target_macs must be a fraction in (0, 1) but received "
                              f"{target_macs!r}")
        return MacBudget(keep=target_macs, **common)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ConfigError(f"ratio must be a number in [0, 1) but received {ratio!r}")
    return Uniform(ratio=ratio, **common)


def plan(model: nn.Module, example_inputs: Inputs, config: PruneConfig | None = None, *,
         graph: ChannelGraph | None = None,
         on_round: Callable[[int, float, float, float], None] | None = None,
         **settings: Any) -> Plan:
    """Decide which channels every layer keeps, as ``config`` says.

    ``config`` is a :class:`surgery.Uniform` (remove a ratio of every group), a
    :class:`surgery.MacBudget` (keep a fraction of the MACs) or a :class:`surgery.RuntimeAware`
    (as many MACs as a ratio, laid out where a runtime saves most time); or give its settings as
    keywords (``ratio=0.5``, ``target_macs=0.25``, ``allocate="ort"``, ``criterion`` …).
    A :class:`surgery.LatencyTarget` (a measured speedup or latency on a runtime) plans, builds
    and times the pruned model round by round; ``on_round(k, ratio, ms, speedup)`` sees each
    round. ``graph``: a graph from :func:`surgery.trace` of the same model, to skip tracing
    again. The plan records the config (``plan.settings["config"]``).

    Example:
        >>> p = surgery.plan(model, torch.randn(1, 3, 224, 224), surgery.Uniform(0.5))
        >>> p.save("plan.json")
    """
    cfg = as_config(config, **settings)
    if isinstance(cfg, LatencyTarget):
        from .target import plan_for_latency

        return plan_for_latency(model, example_inputs, cfg, graph=graph, on_round=on_round)
    if isinstance(cfg, RuntimeAware):
        return latency_plan(model, example_inputs, ratio=cfg.ratio, runtime=cfg.runtime,
                            threads=cfg.threads, criterion=cfg.criterion, round_to=cfg.round_to,
                            ignore=cfg.ignore, seed=cfg.seed, budget=cfg.budget,
                            max_ratio=cfg.max_ratio, graph=graph, exact=cfg.exact,
                            depth=cfg.depth, compare=cfg.compare, batch=cfg.batch)
    if isinstance(cfg, MacBudget):
        return plan_for_macs(model, example_inputs, cfg, graph=graph)
    assert isinstance(cfg, Uniform)
    return make_plan(model, example_inputs, cfg, graph=graph)


def prune(model: nn.Module, example_inputs: Inputs, config: PruneConfig | None = None, *,
          verify: bool = True,
          on_round: Callable[[int, float, float, float], None] | None = None,
          **settings: Any) -> nn.Module:
    """A new, physically smaller model, pruned as ``config`` says (see :func:`surgery.plan`;
    ``ratio=0.5`` and the other keyword settings work too).

    The input model is never modified. With ``verify`` (default) the result is checked against
    the original with the removed channels zeroed and a :class:`VerificationError` is raised on
    any difference.

    Example:
        >>> small = surgery.prune(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224),
        ...                       surgery.Uniform(0.5))
    """
    graph = settings.pop("graph", None)
    cfg = as_config(config, **settings)
    # one pause for the three phases of a uniform prune (see surgery.collector); a search
    # (MAC budget, latency) builds or exports a model per round, and pauses phase by phase
    with collector_paused() if isinstance(cfg, Uniform) else contextlib.nullcontext():
        p = plan(model, example_inputs, cfg, graph=graph, on_round=on_round)
        small = apply(model, p)
        if verify:
            check(model, small, p, example_inputs)
    return small


def prune_in_steps(model: nn.Module, example_inputs: Inputs, config: Uniform, steps: int, *,
                   between: Callable[[nn.Module, int], None] | None = None,
                   on_step: Callable[[int, Plan], None] | None = None
                   ) -> tuple[Plan, nn.Module, VerifyReport]:
    """Reach ``config.ratio`` in ``steps`` prunes of ``1 - (1 - ratio) ** (1 / steps)`` each,
    calling ``between(model, k)`` after every step but the last (to fine-tune). Returns the plan
    of the whole (from the original), the pruned model and the last step's verification.
    """
    if not isinstance(config, Uniform):
        raise ConfigError(f"pruning in steps takes a Uniform config, not {type(config).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be at least 1 but received {steps!r}")
    step = config.replace(ratio=1 - (1 - config.ratio) ** (1 / steps))
    current, total, report = model, None, None
    for k in range(steps):
        counts: dict[str, int] | None = None if total is None or k < steps - 1 else \
            _final_counts(model, current, example_inputs, config, total)
        p = make_plan(current, example_inputs, step, kept_units=counts)  # type: ignore[arg-type]
        small = apply(current, p)
        report = check(current, small, p, example_inputs)
        total = p if total is None else total.then(p)
        if on_step is not None:
            on_step(k, p)
        if between is not None and k < steps - 1:
            between(small, k)
        current = small
    assert total is not None and report is not None
    return total, current, report


def _final_counts(original: nn.Module, current: nn.Module, example_inputs: Inputs,
                  config: Uniform, so_far: Plan) -> dict[str, int]:
    """Per group of ``current`` (pruned by ``so_far``), the free units the one-step plan at
    ``config.ratio`` keeps of the original's: rounding up at every step would keep more."""
    from .plan import keep_count, per_unit

    graph = trace(current, example_inputs, ignore=config.ignore)
    out = {}
    for g in graph.groups:
        # a slot this group fills alone (a conv's output): its original size is the group's
        mine = np.concatenate([g.units, g.pinned])
        key = next((k for k in g.slots if np.isin(graph.slot_roots(k), mine).all()), None)
        if not g.prunable or key is None:
            continue
        slot = graph.slots[key]
        lp = so_far.layers.get(slot.path)
        ap = lp.axes.get(slot.axis) if lp is not None else None
        unit = per_unit(graph, g)
        free = (ap.size if ap is not None else slot.size) // unit - len(g.pinned)
        out[g.slots[0]] = keep_count(free, len(g.pinned), unit, config.ratio, config.round_to)
    return out


#: a MAC target is met when the plan keeps at most the target and at most this much below it
LANDING = 0.05


def plan_for_macs(model: nn.Module, example_inputs: Inputs, config: MacBudget | None = None, *,
                  target_macs: float | None = None, criterion: str = "l2", round_to: int = 8,
                  ignore: Sequence[str] = (), seed: int = 0, tolerance: float = 0.01,
                  graph: ChannelGraph | None = None) -> Plan:
    """The plan with the smallest uniform ratio whose model keeps at most ``target_macs`` of the
    original MACs (e.g. 0.5 = half), found by bisection on the ratio. Where ``round_to`` makes
    the steps too coarse to land within 5 points below the target (16 channels round to 8 or 16),
    it is retried with ``round_to=1``; where it still lands further below, the plan's
    ``settings["warnings"]`` says how far and why (``settings["macs_kept"]``: what it keeps).

    Example:
        >>> plan = surgery.plan_for_macs(model, x, target_macs=0.5)
    """
    if config is None:
        config = as_config(target_macs=target_macs, criterion=criterion,  # type: ignore[assignment]
                           round_to=round_to, ignore=ignore, seed=seed)
    assert isinstance(config, MacBudget)
    target_macs, round_to = config.keep, config.round_to
    if graph is None:
        graph = trace(model, example_inputs, ignore=config.ignore)
    full = count_macs(model, example_inputs)
    common = {k: v for k, v in config.to_dict().items() if k not in ("kind", "keep")}

    def attempt(ratio: float, step: int) -> tuple[Plan, float]:
        p = make_plan(model, example_inputs, Uniform(**{**common, "ratio": ratio,
                                                        "round_to": step}), graph=graph)
        return p, count_macs(apply(model, p), example_inputs) / full

    def search(step: int) -> tuple[Plan, float]:
        lo, hi = 0.0, 0.99
        best, best_kept = attempt(hi, step)
        if best_kept > target_macs:
            raise ConfigError(f"even ratio {hi} keeps {best_kept:.2f} of the MACs, more than the "
                              f"target {target_macs}; the rest is in layers that cannot be "
                              "pruned (see surgery.trace(...).explain)")
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            p, kept = attempt(mid, step)
            if kept <= target_macs:
                best, best_kept, hi = p, kept, mid
            else:
                lo = mid
        return best, best_kept

    asked = round_to
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the intermediate plans' warnings are not the answer's
        best, kept = search(asked)
        notes = []
        if target_macs - kept > LANDING and asked > 1:  # the rounding steps are too coarse here
            finer, finer_kept = search(1)
            if finer_kept > kept:
                notes.append(f"round_to={asked} could only reach {kept:.1%} of the MACs for "
                             f"target_macs={target_macs}; used round_to=1 (finer steps), "
                             f"reaching {finer_kept:.1%}")
                best, kept = finer, finer_kept
    if target_macs - kept > LANDING:
        notes.append(f"target_macs={target_macs} landed at {kept:.1%} of the MACs (more than "
                     f"{LANDING:.0%} below): the channel steps of this model's groups are that "
                     "coarse")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    settings = {**best.settings, "target_macs": target_macs, "macs_kept": round(kept, 4),
                "config": config.to_dict()}
    if notes:
        settings["warnings"] = [*settings.get("warnings", []), *notes]
    return best.with_settings(settings)
