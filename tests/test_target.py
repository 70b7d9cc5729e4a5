"""Latency targets: the plan / build / measure / correct loop lands in [target, 1.15 x target].

The loop is tested on a deterministic runtime (time = overhead + MACs), registered from this
file, so the test checks the search, not this machine's noise; benchmarks/ measures it on ONNX
Runtime and PyTorch.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import surgery
from surgery.config import config_from_dict
from surgery.report import prune_report, to_markdown
from surgery.target import Timed


class MacClock(surgery.Runtime):
    """A model takes 0.5 ms + 1 ms per million MACs; a layer, 1 ms per million MACs."""

    name = "mac-clock"
    description = "deterministic: time from MACs"

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        macs = surgery.count_macs(model, x) / 1e6
        return lambda: 0.5 + macs

    def layer_runner(self, layer: surgery.LayerProgram, threads: int) -> Any:
        if layer.torch is None:
            return None
        with FlopCounterMode(display=False) as counter:
            layer.torch(*layer.inputs)
        macs = counter.get_total_flops() / 2e6
        return lambda: macs

    def time_ms(self, fn: Any) -> float:
        return float(fn())


@pytest.fixture(scope="module")
def clock() -> surgery.Runtime:
    return surgery.register_runtime(MacClock(), replace=True)


@pytest.mark.parametrize("allocate", [False, True])
def test_a_speedup_target_lands_in_range(clock: surgery.Runtime, allocate: bool) -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    rounds: list[tuple[float, float]] = []
    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name, allocate=allocate)
    with pytest.warns(UserWarning, match="round_to=8 steps the speedup too coarsely"):
        # resnet20's 16-channel groups at round_to=8: 1.48x, then 3.82x; round_to=1 lands
        plan = surgery.plan(model, x, config, on_round=lambda k, r, ms, s: rounds.append((r, s)))
    measured = plan.settings["measured"]
    assert measured["met"] and 2.0 <= measured["speedup"] <= 2.3
    # the landing was timed twice: the last round confirms the one before (same plan)
    confirm = plan.settings["trajectory"][-1]
    assert confirm.get("confirming") and confirm["ratio"] == plan.settings["trajectory"][-2][
        "ratio"] and confirm["speedup"] == pytest.approx(measured["speedup"])
    assert plan.settings["round_to"] == 1 and not plan.settings.get("then")
    assert len(plan.settings["trajectory"]) == len(rounds) <= 2 * config.rounds
    assert config_from_dict(plan.settings["config"]) == config
    small = surgery.apply(model, plan)  # the plan is what was measured: re-measure it
    base = 0.5 + surgery.count_macs(model, x) / 1e6
    assert base / (0.5 + surgery.count_macs(small, x) / 1e6) == pytest.approx(
        measured["speedup"], rel=1e-3)
    check = surgery.verify(model, small, plan, x)
    assert check.passed
    text = to_markdown(prune_report(model, small, plan, x, check, spec="resnet20"))
    assert f"measured on {clock.name}" in text and "| 1 | " in text and "(met)" in text


def test_a_target_over_several_batch_sizes_lands_on_their_weighted_mean(
        clock: surgery.Runtime) -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name, allocate=False, round_to=1,
                                   batch=(1, 4), batch_weights=(3.0, 1.0))
    plan = surgery.plan(model, x, config)
    measured = plan.settings["measured"]
    assert measured["batch"] == [1, 4] and set(measured["by_batch"]) == {"1", "4"}
    small = surgery.apply(model, plan)

    def speedup(b: int) -> float:  # the clock: 0.5 ms + 1 ms per million MACs of the batch
        xb = torch.randn(b, 3, 32, 32)
        return (0.5 + surgery.count_macs(model, xb) / 1e6) / (
            0.5 + surgery.count_macs(small, xb) / 1e6)

    by = {b: speedup(b) for b in (1, 4)}
    assert measured["by_batch"]["4"] == pytest.approx(by[4], rel=1e-3)
    assert measured["speedup"] == pytest.approx((by[1] ** 3 * by[4]) ** 0.25, rel=1e-3)
    assert measured["met"] and 2.0 <= measured["speedup"] <= 2.3
    assert config_from_dict(plan.settings["config"]) == config
    text = to_markdown(prune_report(model, small, plan, x, surgery.verify(model, small, plan, x),
                                    spec="resnet20"))
    assert "by batch: 1: " in text and "geometric mean" in text


def test_a_latency_target_and_one_out_of_reach(clock: surgery.Runtime) -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    base = 0.5 + surgery.count_macs(model, x) / 1e6
    plan = surgery.plan(model, x, surgery.LatencyTarget(latency_ms=base / 3, runtime=clock.name,
                                                        allocate=False, round_to=1))
    assert plan.settings["measured"]["met"]
    assert base / 3 / 1.15 <= plan.settings["measured"]["ms"] <= base / 3
    with pytest.warns(UserWarning, match="was not met"):  # the head and stem stay: capped
        far = surgery.plan(model, x, surgery.LatencyTarget(speedup=500, runtime=clock.name,
                                                           allocate=False, rounds=4))
    assert not far.settings["measured"]["met"] and len(far.settings["trajectory"]) <= 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give exactly one of speedup="),
    ({"speedup": 0.5}, "speedup must be a number above 1"),
    ({"speedup": 2, "batch": 0}, "batch must be a positive int"),
    ({"speedup": 2, "tolerance": 1.5}, "tolerance must be in (0, 1)"),
    ({"speedup": 2, "batch": (1, 1)}, "distinct positive ints"),
    ({"speedup": 2, "batch": (1, 8), "batch_weights": (1.0,)}, "batch_weights must be 2"),
    ({"latency_ms": 2, "batch": (1, 8)}, "a latency_ms target is for one batch size"),
    ({"speedup": 2, "floor_batch": (8, 0)}, "floor_batch must be a positive int"),
    ({"speedup": 2, "floor_batch": 8, "floor": 1.5}, "floor must be in (0, 1]"),
])
def test_bad_targets_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(surgery.ConfigError) as e:
        surgery.LatencyTarget(**kwargs)
    assert message in str(e.value)


def test_cli_target_speedup_prints_rounds_and_the_trajectory(tmp_path) -> None:
    """`surgery prune --target-speedup` on PyTorch eager (real timings: the assertions are on
    what is shown, not on this machine's speed)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
    res = subprocess.run([script, "prune", "resnet20", "--input-shape", "1,3,32,32",
                          "--target-speedup", "1.5", "--runtime", "torch", "--threads", "1",
                          "--dry-run", "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    trajectory = report["settings"]["trajectory"]
    assert trajectory and all(t["speedup"] > 0 for t in trajectory)
    assert report["settings"]["measured"]["runtime"] == "torch"
    assert "\n... round 1: ratio " in res.stderr  # progress lines on stderr (not a terminal)
    bad = subprocess.run([script, "prune", "resnet20", "--ratio", "0.5", "--target-speedup", "2",
                          "--dry-run"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "give exactly one of --ratio" in bad.stderr
    floor = subprocess.run([script, "prune", "resnet20", "--target-speedup", "2",
                            "--floor-batch", "8,0", "--dry-run"], capture_output=True, text=True,
                           timeout=600)
    assert floor.returncode == 1 and "--floor-batch '8,0' must be positive" in floor.stderr


def test_depth_rounds_score_blocks_on_the_users_examples(clock: surgery.Runtime) -> None:
    """Timing runs on random inputs at the configured batch; which blocks may go is decided by
    their output change on the examples given (real images), which here differ from noise."""
    from surgery.depth import find_bypasses, sensitivity

    model = surgery.spec.build_model("resnet20").eval()
    x = torch.rand(4, 3, 32, 32) * 0.1 + 0.5  # not what torch.randn at batch 1 looks like
    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name, depth=True, round_to=1)
    plan = surgery.plan(model, x, config)
    assert plan.bypasses, "the depth rounds bypassed nothing: nothing checked"
    found = {b.key: b for b in find_bypasses(model)}
    want = sensitivity(model, x, [found[k] for k in plan.settings["bypass_sensitivity"]])
    assert list(plan.settings["bypass_sensitivity"].values()) == pytest.approx(
        [round(s, 6) for s in want], abs=1e-6)
    assert surgery.verify(model, surgery.apply(model, plan), plan, x).passed


@pytest.mark.parametrize(("noise", "lands_at"), [(0.0, 2.02), (0.005, 2.145), (0.04, 2.145)])
def test_a_landing_clears_the_range_by_a_quarter_when_measured(clock: surgery.Runtime,
                                                               noise: float, lands_at: float
                                                               ) -> None:
    """speedup(ratio) = 1.01 / (1 - ratio)^2: the first ratio tried measures 2.02x, in range for
    a 2x target. Measured without noise that lands; measured with any noise (even +-0.5%, whose
    interval clears 2x: a separate run moves by more than that), a re-measurement could fall
    below 2x, so the search goes on towards the middle of the range."""
    from surgery.target import _search

    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name)
    calls: list[tuple[float, bool]] = []

    def attempt(ratio: float, cfg: surgery.LatencyTarget, again: bool = False) -> tuple:
        calls.append((ratio, again))
        speedup = 1.01 / (1 - ratio) ** 2
        fresh = again or all(abs(r - ratio) > 1e-12 for r, _ in calls[:-1])
        return Timed(f"plan at {ratio:.4f}", 10 / speedup, 10.0, speedup, fresh,
                     noise / 2 ** 0.5 if again else noise)

    plan, ms, base, speedup, target = _search(config, attempt)
    assert target == 2.0 and speedup == pytest.approx(lands_at, abs=0.005)
    assert calls[-1][1] and calls[-1][0] == calls[-2][0]  # the landing was confirmed
    assert len(calls) == (2 if noise == 0 else 3)
    if noise:  # clear of both ends by a quarter of the range
        assert 2.0 * 1.15 ** 0.25 <= speedup <= 2.3 / 1.15 ** 0.25


def test_without_a_landing_the_plan_nearest_the_middle_of_the_range_is_kept(
        clock: surgery.Runtime) -> None:
    """Measured +-20%, a speedup lands only 3.5% inside the range (a quarter of it): none of
    these does. Of those in range, the one nearest the middle (2.06x) is the answer, not the
    first (2.02x, where the search used to stop)."""
    from surgery.target import _search

    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name, rounds=4)
    speedups = iter([2.02, 2.25, 2.06, 1.9, 1.8])
    seen: list[float] = []

    def attempt(ratio: float, cfg: surgery.LatencyTarget, again: bool = False) -> tuple:
        s = next(speedups)
        seen.append(s)
        return Timed(f"plan {len(seen)}", 10 / s, 10.0, s, True, 0.2)

    found = _search(config, attempt)
    assert len(seen) == 4 and found[0] == "plan 3" and found[3] == 2.06


class BatchClock(MacClock):
    """As MacClock, plus 11.5 ms per image after the first that pruning does not save (memory
    traffic of the input, say): a batch of 8 gains less than batch 1."""

    name = "batch-clock"

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        ms = super().model_runner(model, x, onnx, threads)() + 11.5 * (x.shape[0] - 1)
        return lambda: ms


def test_a_floor_batch_lifts_the_landing_until_it_holds_there() -> None:
    """For 2x at batch 1, the first landing (2.20x) measures 1.79x at batch 8 on this clock:
    under the floor 0.9 x 2 = 1.8x. The search aims higher in the range by the shortfall and
    lands where batch 8 holds (2.23x: 1.81x); without floor_batch it keeps the first landing."""
    clock = surgery.register_runtime(BatchClock(), replace=True)
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    common = {"speedup": 2.0, "runtime": clock.name, "allocate": False, "round_to": 1}

    def speedup(small: torch.nn.Module, b: int) -> float:
        base = clock.model_runner(model, torch.randn(b, 3, 32, 32), None, 1)()
        return base / clock.model_runner(small, torch.randn(b, 3, 32, 32), None, 1)()

    first = surgery.plan(model, x, surgery.LatencyTarget(**common))
    assert speedup(surgery.apply(model, first), 8) < 1.8  # else the test checks nothing
    config = surgery.LatencyTarget(**common, floor_batch=8)
    plan = surgery.plan(model, x, config)
    measured = plan.settings["measured"]
    small = surgery.apply(model, plan)
    assert measured["met"] and 2.0 <= measured["speedup"] <= 2.3
    assert measured["by_batch"]["8"] == pytest.approx(speedup(small, 8), rel=1e-3)
    assert speedup(small, 8) >= 1.8 and speedup(small, 1) == pytest.approx(
        measured["speedup"], rel=1e-3)
    rejected = [t for t in plan.settings["trajectory"] if t.get("confirming")
                and t["by_batch"]["8"] < 1.8]
    assert rejected, "no landing was turned down at batch 8"
    assert config_from_dict(plan.settings["config"]) == config
    assert surgery.verify(model, small, plan, x).passed


def test_search_aims_higher_by_the_floor_batchs_shortfall(clock: surgery.Runtime) -> None:
    """speedup(ratio) = 1.01 / (1 - ratio)^2 at batch 1 and 0.85 x that at batch 8: 2.02x lands
    for 2x but holds 1.72x at batch 8 (floor 1.8x); the next aim is 2.2x, where batch 8 holds."""
    from surgery.target import _search

    config = surgery.LatencyTarget(speedup=2.0, runtime=clock.name, floor_batch=8)
    calls: list[tuple[float, bool]] = []

    def attempt(ratio: float, cfg: surgery.LatencyTarget, again: bool = False) -> Timed:
        calls.append((ratio, again))
        s = 1.01 / (1 - ratio) ** 2
        return Timed(f"plan at {ratio:.4f}", 10 / s, 10.0, s, True, 0.0,
                     {1: s, 8: 0.85 * s} if again else {1: s})

    plan, ms, base, speedup, target = _search(config, attempt)
    assert [again for _, again in calls] == [False, True, False, True]
    assert speedup == pytest.approx(2.2069, abs=1e-3) and 0.85 * speedup >= 1.8


def test_floor_batch_needs_a_latency_target() -> None:
    from surgery.api import as_config

    config = as_config(target_speedup=2.0, floor_batch=(8,))
    assert isinstance(config, surgery.LatencyTarget) and config.floor_batches == (8,)
    with pytest.raises(surgery.ConfigError, match="floor_batch= guards a latency target"):
        as_config(ratio=0.5, floor_batch=(8,))


class LuckyClock(MacClock):
    """As MacClock, but a pruned model's first timing is 6% fast (as the measurement a search
    stops at tends to be: picked because it landed)."""

    name = "lucky-clock"

    def __init__(self, original_macs: float) -> None:
        self.original_macs, self.timed = original_macs, set()

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        macs = surgery.count_macs(model, x) / 1e6
        lucky = macs != self.original_macs and macs not in self.timed
        self.timed.add(macs)
        return lambda: (0.5 + macs) / (1.06 if lucky else 1.0)


def test_a_landing_is_kept_on_its_retiming_alone() -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    clock = surgery.register_runtime(LuckyClock(surgery.count_macs(model, x) / 1e6),
                                     replace=True)
    plan = surgery.plan(model, x, surgery.LatencyTarget(speedup=2.0, runtime=clock.name,
                                                        allocate=False, round_to=1))
    measured, last = plan.settings["measured"], plan.settings["trajectory"][-1]
    assert last.get("confirming") and measured["met"]
    small = surgery.apply(model, plan)
    true = (0.5 + surgery.count_macs(model, x) / 1e6) / (0.5 + surgery.count_macs(small, x) / 1e6)
    assert measured["speedup"] == pytest.approx(true, rel=1e-4)  # not the lucky first timing
    assert plan.settings["trajectory"][-2]["speedup"] == pytest.approx(1.06 * true, rel=1e-4)
