"""Latency targets: prune until the model, measured on the deployment runtime, is fast enough.

A MAC budget is a proxy; the user's goal is a latency. :func:`plan_for_latency` closes the loop
on real measurements: plan at a ratio, build the pruned model, time it against the original on
the target runtime (alternating runs, :func:`surgery.bench`), correct the ratio and repeat until
the measured speedup lands in ``[target, (1 + tolerance) * target]``. The ratio is corrected by
interpolating the measured speedups (log scale) between the last ratio too slow and the last one
fast enough; before both are known, by the arithmetic (MACs fall with the square of the kept
width). A measured (noisy) speedup lands when it is in range by a quarter of the range on both
sides (between runs a plan's speedup moves by more than its bootstrap interval within one
says): a search that stops at the first measurement inside the range keeps the plans that
measured lucky, and a separate measurement of such a plan falls back out of range. A landing
is timed once more and kept only if that re-timing lands too, alone: the first measurement was
picked for landing, so it leans lucky (averaging the two, two runs of the 18 targets of
``benchmarks/latency_target.py`` re-measured the final plans 1-2% lower on average). With
``floor_batch``, a landing must also be fast enough there (timed with the re-timing); where it
is not, the range's low end rises by the shortfall. Where no plan lands so, the one in range
nearest the middle of the range is the answer. The plan records every round
(``settings["trajectory"]``) and the result.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .bench import Measurement, bench
from .config import LatencyTarget, Uniform
from .errors import ConfigError
from .graph import ChannelGraph, Inputs, as_tuple, trace
from .latency import LatencyModel, latency_model, latency_plan
from .plan import Plan, make_plan
from .runtimes import get_runtime
from .surgeon import apply

#: one round: (round index, ratio, measured pruned ms, measured speedup)
RoundHook = Callable[[int, float, float, float], None]


class Timed(NamedTuple):
    """One plan as measured: pruned and original ms and the (weighted) speedup at the
    objective's batch sizes, whether this call timed it (else it was measured before), the
    log half-width of the speedup's 95% interval and the speedup at every batch timed."""

    plan: Plan
    ms: float
    base: float
    speedup: float
    fresh: bool
    noise: float
    each: dict[int, float] = {}  # noqa: RUF012 - read only

_MAX_RATIO = 0.95


def plan_for_latency(model: nn.Module, example_inputs: Inputs, config: LatencyTarget, *,
                     graph: ChannelGraph | None = None,
                     on_round: RoundHook | None = None) -> Plan:
    """The plan whose pruned model meets ``config``'s speedup (or latency) on its runtime,
    as measured here; see the module docstring. ``on_round(k, ratio, ms, speedup)`` is called
    after every measurement (a progress display)."""
    rt = get_runtime(config.runtime)
    rt.check()
    inputs = as_tuple(example_inputs)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise ConfigError("a latency target times models with one input tensor; this model "
                          f"takes {len(inputs)} inputs")
    shape = tuple(inputs[0].shape[1:])
    batches = config.batches
    weights = config.batch_weights or (1.0,) * len(batches)
    x = torch.randn(batches[0], *shape)
    graph = graph if graph is not None else trace(model, example_inputs, ignore=config.ignore)
    lat: LatencyModel | None = None
    if config.allocate:
        lat = latency_model(model, x, runtime=config.runtime, threads=config.threads,
                            lowest=1 - _MAX_RATIO, graph=graph)
    trajectory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        original_onnx = None
        if rt.form == "onnx":
            from .export import export_onnx

            original_onnx = str(Path(tmp) / "original.onnx")
            export_onnx(model, inputs[0][:1], original_onnx)

        def measure(small: nn.Module, extra: tuple[int, ...] = ()
                    ) -> tuple[float, float, float, dict[int, float], float]:
            """Pruned and original ms at the first batch, the weighted speedup, the speedup at
            every batch (``extra`` ones too) and the weighted half-width of their 95% intervals
            (log scale)."""
            timed = [*batches, *(b for b in extra if b not in batches)]
            rep = bench({"original": model, "pruned": small}, shape, runtimes=[config.runtime],
                        batches=timed, threads=config.threads, rounds=10,
                        onnx_files={"original": original_onnx} if original_onnx else None)
            rows = {(r.model, r.batch): r for r in rep.rows}
            each = {b: float(rows["pruned", b].speedup or 1.0) for b in timed}
            mean = math.exp(sum(w * math.log(each[b]) for b, w in zip(batches, weights,
                                                                      strict=True)) / sum(weights))
            noise = sum(w * _half_width(rows["pruned", b]) for b, w in zip(
                batches, weights, strict=True)) / sum(weights)
            first = batches[0]
            return rows["pruned", first].median_ms, rows["original", first].median_ms, mean, \
                each, noise

        seen: dict[str, tuple[float, float, float, dict[int, float], float]] = {}

        def attempt(ratio: float, cfg: LatencyTarget, again: bool = False) -> Timed:
            """The plan at ``ratio`` and its measurement (a plan measured before is not timed
            again: fresh is False). ``again``: time it once more, at the floor batches too, and
            keep that measurement alone: the first was chosen for landing, so it is biased
            towards luck (the re-timing is not)."""
            p = _plan_at(model, example_inputs, cfg, ratio, graph, lat)
            key = repr((p.layers, p.attributes, p.bypasses))
            fresh = key not in seen or again
            if fresh:
                seen[key] = measure(apply(model, p), cfg.floor_batches if again else ())
            ms, base, speedup, each, noise = seen[key]
            if fresh:
                trajectory.append({"ratio": round(ratio, 4), "round_to": cfg.round_to,
                                   "ms": round(ms, 4), "original_ms": round(base, 4),
                                   "speedup": round(speedup, 4),
                                   **({"interval": [round(speedup * math.exp(-noise), 4),
                                                    round(speedup * math.exp(noise), 4)]}
                                      if noise else {}),
                                   **({"confirming": True} if again else {}),
                                   **({"by_batch": {str(b): round(v, 4) for b, v in each.items()}}
                                      if len(each) > 1 else {})})
                if on_round is not None:
                    on_round(len(trajectory) - 1, ratio, ms, speedup)
            return Timed(p, ms, base, speedup, fresh, noise, each)

        notes: list[str] = []
        best = _search(config, attempt)
        if not _met(config, best) and config.round_to > 1:  # the channel steps are too coarse
            finer = _search(config.replace(round_to=1), attempt)  # type: ignore[arg-type]
            if _met(config, finer) or abs(math.log(finer[3] / finer[4])) < abs(
                    math.log(best[3] / best[4])):
                notes.append(f"round_to={config.round_to} steps the speedup too coarsely to land "
                             "in the target range; used round_to=1")
                best = finer
        each = seen[repr((best[0].layers, best[0].attributes, best[0].bypasses))][3]
        missing = tuple(b for b in config.floor_batches if b not in each)
        if missing:  # no landing confirmed this plan: its floors are timed for the record
            each = {**each, **{b: v for b, v in measure(apply(model, best[0]), missing)[3]
                               .items() if b in missing}}
    p, ms, base, speedup, target = best
    met = _met(config, best)
    settings = {**p.settings, "config": config.to_dict(), "trajectory": trajectory,
                "measured": {"runtime": config.runtime, "threads": config.threads,
                             "batch": list(batches) if len(batches) > 1 else batches[0],
                             **({"by_batch": {str(b): round(v, 4) for b, v in each.items()}}
                                if len(each) > 1 else {}),
                             "ms": round(ms, 4),
                             "original_ms": round(base, 4), "speedup": round(speedup, 4),
                             "target_speedup": round(target, 4), "met": met}}
    if not met:
        rounds = ", ".join(f"ratio {t['ratio']:.2f}: {t['speedup']:.2f}x" for t in trajectory)
        notes.append(f"the latency target (speedup {target:.2f}x on {config.runtime}) was not "
                     f"met in {len(trajectory)} rounds: the closest plan measured "
                     f"{speedup:.2f}x ({rounds})")
    for b in config.floor_batches:
        if each[b] < config.floor * target:
            notes.append(f"at batch {b} the plan measured {each[b]:.2f}x, under the floor "
                         f"{config.floor:g} x {target:.2f}x: the search found none that held it")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if notes:
        settings["warnings"] = [*settings.get("warnings", []), *notes]
    return p.with_settings(settings)


def _plan_at(model: nn.Module, example_inputs: Inputs, config: LatencyTarget, ratio: float,
             graph: ChannelGraph, lat: LatencyModel | None) -> Plan:
    common: dict[str, Any] = {"criterion": config.criterion, "round_to": config.round_to,
                              "ignore": config.ignore, "seed": config.seed,
                              "exact": config.exact}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rounds' notes are not the answer's
        if lat is None:
            return make_plan(model, example_inputs, Uniform(ratio=ratio, **common), graph=graph)
        # the user's examples score the channels and blocks (a bypass's output change on real
        # data); ``x`` (random, at the timed batch) was only for the latency model, passed in
        return latency_plan(model, example_inputs, ratio=ratio, runtime=config.runtime,
                            threads=config.threads, max_ratio=min(_MAX_RATIO, max(
                                ratio, ratio + (1 - ratio) / 2)), graph=graph, latency=lat,
                            depth=config.depth, **common)


def _met(config: LatencyTarget, found: tuple[Plan, float, float, float, float]) -> bool:
    speedup, target = found[3], found[4]
    return target <= speedup <= (1 + config.tolerance) * target


def _lands(config: LatencyTarget, speedup: float, target: float, noise: float,
           lift: float = 1.0) -> bool:
    """In ``[lift x target, (1 + tolerance) x target]`` by a quarter of the range's width on
    both sides where the measurement is noisy at all (``noise``: log half-width of its
    interval, > 0): a re-measurement would most likely stay in. Not by the half-width alone:
    two runs of one plan differ by more than the rounds within a run (ONNX Runtime, 2-core VM:
    2.2-3.6% standard deviation between runs, 2.4-2.8% median half-width within one)."""
    low, high = math.log(lift * target), math.log((1 + config.tolerance) * target)
    margin = (high - low) / 4 if noise > 0 else 0.0
    return low + margin <= math.log(speedup) <= high - margin


def _half_width(row: Measurement) -> float:
    """Half the width of a speedup's bootstrap 95% interval, in log scale (0 if unknown)."""
    lo, hi = row.speedup_ci_low, row.speedup_ci_high
    if not lo or not hi or lo <= 0 or hi <= 0:
        return 0.0
    return max(0.0, math.log(hi / lo) / 2)


def _search(config: LatencyTarget, attempt: Callable[..., Timed]
            ) -> tuple[Plan, float, float, float, float]:
    """Correct the ratio round by round (``config.rounds`` measurements at most); the best plan
    and its (ms, original ms, speedup, target speedup): the first that lands (see
    :func:`_lands`) and holds its floor at ``config.floor_batches``, else the one in range
    nearest the aim, else the least overshoot, else the fastest."""
    tol = config.tolerance
    target = config.speedup
    ratio = 1 - 1 / math.sqrt(target) if target else 0.5
    lift = 1.0  # the range's low end over the target: raised where a floor batch fell short
    points: list[tuple[float, float]] = [(0.0, 1.0)]  # (ratio, speedup) measured
    tried: list[tuple[Plan, float, float, float, float]] = []
    measured = 0
    landed = False
    for _ in range(4 * config.rounds):  # plans measured before cost nothing: more steps
        got = attempt(ratio, config)
        measured += got.fresh
        target = config.speedup or got.base / float(config.latency_ms)  # type: ignore[arg-type]
        if _lands(config, got.speedup, target, got.noise, lift) and got.fresh and \
                measured < config.rounds:
            # one measurement can land by luck: confirm it with a second (and the floors)
            got = attempt(ratio, config, again=True)
            measured += 1
            target = config.speedup or got.base / float(config.latency_ms)  # type: ignore
        fresh = got.fresh
        tried.append((got.plan, got.ms, got.base, got.speedup, target))
        points.append((ratio, got.speedup))
        landed = _lands(config, got.speedup, target, got.noise, lift)
        if landed:
            short = [b for b in config.floor_batches
                     if got.each.get(b, math.inf) < config.floor * target]
            if short:  # fast enough where it was aimed, not at batch b: aim higher by the gap
                need = max(config.floor * got.speedup / got.each[b] for b in short)
                lift = min(max(lift, need), (1 + tol) ** 0.75)  # a quarter of the range left
                landed = False
        if landed or measured >= config.rounds:
            break
        aim = target * math.sqrt(lift * (1 + tol))  # the middle of the range (log scale)
        below = [pt for pt in points if pt[1] < aim]
        above = [pt for pt in points if pt[1] >= aim]
        slow = max(below) if below else (0.0, 1.0)
        fast = min(above) if above else None
        if fast is not None and slow[0] < fast[0]:  # interpolate log-speedup in the bracket
            (r0, s0), (r1, s1) = slow, fast
            t = (math.log(aim) - math.log(s0)) / max(math.log(s1) - math.log(s0), 1e-9)
            # the same plan again: the steps are coarse here, so halve the bracket instead
            nxt = r0 + (0.5 if not fresh else min(max(t, 0.1), 0.9)) * (r1 - r0)
        else:  # extrapolate: time ~ MACs ~ kept width squared
            nxt = 1 - (1 - ratio) * math.sqrt(got.speedup / aim)
            if not fresh:
                nxt = ratio + 2 * (nxt - ratio)
        nxt = min(max(nxt, 0.0), _MAX_RATIO)
        if abs(nxt - ratio) < 1e-3 or (fast is not None and fast[0] - slow[0] < 2e-3):
            break
        if got.speedup < target and ratio >= _MAX_RATIO:
            break  # as far as it goes
        ratio = nxt
    if landed:
        return tried[-1]
    in_range = [t for t in tried if _met(config, t)]
    if in_range:  # nearest the aim: the least likely to measure out of range again
        middle = math.log(lift * (1 + tol)) / 2
        return min(in_range, key=lambda t: abs(math.log(t[3] / t[4]) - middle))
    feasible = [t for t in tried if t[3] >= t[4]]
    if feasible:
        return min(feasible, key=lambda t: t[3])
    return max(tried, key=lambda t: t[3])
