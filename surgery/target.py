"""Latency targets: prune until the model, measured on the deployment runtime, is fast enough.

A MAC budget is a proxy; the user's goal is a latency. :func:`plan_for_latency` closes the loop
on real measurements: plan at a ratio, build the pruned model, time it against the original on
the target runtime (alternating runs, :func:`surgery.bench`), correct the ratio and repeat until
the measured speedup lands in ``[target, (1 + tolerance) * target]``. The ratio is corrected by
interpolating the measured speedups (log scale) between the last ratio too slow and the last one
fast enough; before both are known, by the arithmetic (MACs fall with the square of the kept
width). A measurement lands when it is in range by more than its own noise (the half-width of
its bootstrap interval, at most a quarter of the range) on both sides: a search that stops at
the first measurement inside the range keeps the plans that measured lucky, and a separate
measurement of such a plan falls back out of range. A landing is timed once more and kept only
if the geometric mean of both measurements still lands. Where no plan lands so, the one in range
nearest the middle of the range is the answer. The plan records every round
(``settings["trajectory"]``) and the result.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

        def measure(small: nn.Module) -> tuple[float, float, float, dict[int, float], float]:
            """Pruned and original ms at the first batch, the weighted speedup, the speedup at
            every batch and the weighted half-width of their 95% intervals (log scale)."""
            rep = bench({"original": model, "pruned": small}, shape, runtimes=[config.runtime],
                        batches=list(batches), threads=config.threads, rounds=10,
                        onnx_files={"original": original_onnx} if original_onnx else None)
            rows = {(r.model, r.batch): r for r in rep.rows}
            each = {b: float(rows["pruned", b].speedup or 1.0) for b in batches}
            mean = math.exp(sum(w * math.log(each[b]) for b, w in zip(batches, weights,
                                                                      strict=True)) / sum(weights))
            noise = sum(w * _half_width(rows["pruned", b]) for b, w in zip(
                batches, weights, strict=True)) / sum(weights)
            first = batches[0]
            return rows["pruned", first].median_ms, rows["original", first].median_ms, mean, \
                each, noise

        seen: dict[str, tuple[float, float, float, dict[int, float], float]] = {}


        def attempt(ratio: float, cfg: LatencyTarget, again: bool = False
                    ) -> tuple[Plan, float, float, float, bool, float]:
            """The plan at ``ratio``, its measurement and that measurement's noise (a plan
            measured before is not timed again: fresh is False). ``again``: time it once more
            and keep the geometric mean of both measurements (a landing is confirmed, not taken
            from one noisy run)."""
            p = _plan_at(model, example_inputs, cfg, ratio, graph, lat)
            key = repr((p.layers, p.attributes, p.bypasses))
            fresh = key not in seen or again
            if fresh:
                new = measure(apply(model, p))
                if again and key in seen:
                    old = seen[key]
                    new = (math.sqrt(old[0] * new[0]), math.sqrt(old[1] * new[1]),
                           math.sqrt(old[2] * new[2]),
                           {b: math.sqrt(old[3][b] * new[3][b]) for b in new[3]},
                           math.hypot(old[4], new[4]) / 2)  # the mean of two: less noise
                seen[key] = new
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
                                      if len(batches) > 1 else {})})
                if on_round is not None:
                    on_round(len(trajectory) - 1, ratio, ms, speedup)
            return p, ms, base, speedup, fresh, noise

        notes: list[str] = []
        best = _search(config, attempt)
        if not _met(config, best) and config.round_to > 1:  # the channel steps are too coarse
            finer = _search(config.replace(round_to=1), attempt)  # type: ignore[arg-type]
            if _met(config, finer) or abs(math.log(finer[3] / finer[4])) < abs(
                    math.log(best[3] / best[4])):
                notes.append(f"round_to={config.round_to} steps the speedup too coarsely to land "
                             "in the target range; used round_to=1")
                best = finer
    p, ms, base, speedup, target = best
    met = _met(config, best)
    settings = {**p.settings, "config": config.to_dict(), "trajectory": trajectory,
                "measured": {"runtime": config.runtime, "threads": config.threads,
                             "batch": list(batches) if len(batches) > 1 else batches[0],
                             **({"by_batch": {str(b): round(v, 4) for b, v in seen[repr(
                                 (p.layers, p.attributes, p.bypasses))][3].items()}}
                                if len(batches) > 1 else {}),
                             "ms": round(ms, 4),
                             "original_ms": round(base, 4), "speedup": round(speedup, 4),
                             "target_speedup": round(target, 4), "met": met}}
    if not met:
        rounds = ", ".join(f"ratio {t['ratio']:.2f}: {t['speedup']:.2f}x" for t in trajectory)
        notes.append(f"the latency target (speedup {target:.2f}x on {config.runtime}) was not "
                     f"met in {len(trajectory)} rounds: the closest plan measured "
                     f"{speedup:.2f}x ({rounds})")
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


def _lands(config: LatencyTarget, speedup: float, target: float, noise: float) -> bool:
    """In range by more than the measurement's noise (log half-width of its interval, at most a
    quarter of the range's width) on both sides: a re-measurement would most likely stay in."""
    margin = min(noise, math.log1p(config.tolerance) / 4)
    return math.log(target) + margin <= math.log(speedup) <= \
        math.log((1 + config.tolerance) * target) - margin


def _half_width(row: Measurement) -> float:
    """Half the width of a speedup's bootstrap 95% interval, in log scale (0 if unknown)."""
    lo, hi = row.speedup_ci_low, row.speedup_ci_high
    if not lo or not hi or lo <= 0 or hi <= 0:
        return 0.0
    return max(0.0, math.log(hi / lo) / 2)


def _search(config: LatencyTarget,
            attempt: Callable[..., tuple[Plan, float, float, float, bool, float]]
            ) -> tuple[Plan, float, float, float, float]:
    """Correct the ratio round by round (``config.rounds`` measurements at most); the best plan
    and its (ms, original ms, speedup, target speedup): the first that lands (see
    :func:`_lands`), else the one in range nearest the middle of the range, else the least
    overshoot, else the fastest."""
    tol = config.tolerance
    target = config.speedup
    ratio = 1 - 1 / math.sqrt(target) if target else 0.5
    slow: tuple[float, float] = (0.0, 1.0)  # (ratio, speedup) below the aim
    fast: tuple[float, float] | None = None  # at or above the aim
    tried: list[tuple[Plan, float, float, float, float]] = []
    measured = 0
    landed = False
    for _ in range(4 * config.rounds):  # plans measured before cost nothing: more steps
        p, ms, base, speedup, fresh, noise = attempt(ratio, config)
        measured += fresh
        target = config.speedup or base / float(config.latency_ms)  # type: ignore[arg-type]
        tried.append((p, ms, base, speedup, target))
        if _lands(config, speedup, target, noise) and fresh and measured < config.rounds:
            # one measurement can land by luck: confirm it with a second
            p, ms, base, speedup, _, noise = attempt(ratio, config, again=True)
            measured += 1
            target = config.speedup or base / float(config.latency_ms)  # type: ignore[arg-type]
            tried[-1] = (p, ms, base, speedup, target)
        landed = _lands(config, speedup, target, noise)
        if landed or measured >= config.rounds:
            break
        aim = target * math.sqrt(1 + tol)  # the middle of the range (log scale)
        if speedup < aim:
            slow = max(slow, (ratio, speedup))
        elif fast is None or ratio < fast[0]:
            fast = (ratio, speedup)
        if fast is not None and slow[0] < fast[0]:  # interpolate log-speedup in the bracket
            (r0, s0), (r1, s1) = slow, fast
            t = (math.log(aim) - math.log(s0)) / max(math.log(s1) - math.log(s0), 1e-9)
            # the same plan again: the steps are coarse here, so halve the bracket instead
            nxt = r0 + (0.5 if not fresh else min(max(t, 0.1), 0.9)) * (r1 - r0)
        else:  # extrapolate: time ~ MACs ~ kept width squared
            nxt = 1 - (1 - ratio) * math.sqrt(speedup / aim)
            if not fresh:
                nxt = ratio + 2 * (nxt - ratio)
        nxt = min(max(nxt, 0.0), _MAX_RATIO)
        if abs(nxt - ratio) < 1e-3 or (fast is not None and fast[0] - slow[0] < 2e-3):
            break
        if speedup < target and ratio >= _MAX_RATIO:
            break  # as far as it goes
        ratio = nxt
    if landed:
        return tried[-1]
    in_range = [t for t in tried if _met(config, t)]
    if in_range:  # nearest the middle: the least likely to measure out of range again
        return min(in_range, key=lambda t: abs(math.log(t[3] / t[4]) - math.log1p(tol) / 2))
    feasible = [t for t in tried if t[3] >= t[4]]
    if feasible:
        return min(feasible, key=lambda t: t[3])
    return max(tried, key=lambda t: t[3])
