"""Latency-aware allocation: same MAC budget as the uniform plan, spent where time per MAC is
highest; real timings on both runtimes; errors before anything is touched."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import surgery
from surgery.latency import Call, latency_model, latency_plan
from tests.conftest import assert_unchanged, randomize_norms, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.cifar import resnet20  # noqa: E402


@pytest.fixture(autouse=True)
def _any_channel_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests lay plans out on made-up timings labelled ``ort``: ONNX Runtime's channel
    block (this CPU's vector width) is set to 1 so the widths do not depend on the machine;
    the tests of the block set it themselves."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")


def chain() -> nn.Module:
    """stem (3->32 at full resolution), two 32-channel convs, a linear head."""
    return randomize_norms(nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval())


def conv_macs(call: Call, w: dict[str, int]) -> float:
    m = call.module
    cin = w["in"] if isinstance(m, nn.Linear) else w["in"] // m.groups
    spatial = math.prod(call.out_shape[2:]) * math.prod(getattr(m, "kernel_size", (1,)))
    return call.out_shape[0] * spatial * cin * w["out"]


def slow_stem(call: Call, w: dict[str, int]) -> float:
    """A made-up runtime on which the stem costs 10x more time per MAC than the rest."""
    if isinstance(call.module, nn.BatchNorm2d):
        return 0.0
    return conv_macs(call, w) * (10.0 if call.path == "0" else 1.0) * 1e-6


def estimate(lat: surgery.LatencyModel, small: nn.Module) -> float:
    """The made-up runtime's time of a pruned model (its layers' widths, timed by slow_stem)."""
    mods = dict(small.named_modules())
    total = 0.0
    for call in lat.calls:
        m = mods[call.path]
        if isinstance(m, nn.BatchNorm2d):
            continue
        w = {"in": getattr(m, "in_channels", getattr(m, "in_features", 0)),
             "out": getattr(m, "out_channels", getattr(m, "out_features", 0))}
        total += slow_stem(call, w)
    return total


def test_budget_goes_where_time_per_mac_is_highest() -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    before = snapshot(model)
    lat = latency_model(model, x, timer=slow_stem)
    assert [c.path for c in lat.calls] == ["0", "1", "3", "4", "6", "7", "11"]
    plan = latency_plan(model, x, ratio=0.5, latency=lat)
    uniform = surgery.plan(model, x, ratio=0.5)
    small, flat = surgery.apply(model, plan), surgery.apply(model, uniform)
    assert_unchanged(model, before)
    surgery.verify(model, small, plan, x)  # still exact
    # the stem's group (max_ratio 0.75 at ratio 0.5) goes first and furthest
    assert small[0].out_channels == 8 and flat[0].out_channels == 16
    # same arithmetic budget: at most the uniform plan's MACs, and not far below it
    macs, budget = surgery.count_macs(small, x), surgery.count_macs(flat, x)
    assert 0.95 * budget <= macs <= budget
    assert estimate(lat, small) < 0.8 * estimate(lat, flat)
    assert plan.settings["allocation"] == "latency" and plan.settings["max_ratio"] == 0.75
    # a plan is data: re-applied from JSON to a fresh instance it gives the same model
    again = surgery.apply(chain(), surgery.Plan.from_json(plan.to_json()))
    assert [p.shape for p in again.parameters()] == [p.shape for p in small.parameters()]


def test_max_ratio_caps_every_layer() -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, timer=slow_stem, lowest=0.4)
    plan = latency_plan(model, x, ratio=0.5, max_ratio=0.6, round_to=1, latency=lat)
    kept = [m.out_channels for m in surgery.apply(model, plan).modules()
            if isinstance(m, nn.Conv2d)]
    assert kept[0] == 13 and min(kept) >= 13  # 32 - floor(0.6 * 32)


def test_latency_budget_keeps_more_macs_for_the_same_time() -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, timer=slow_stem)
    fast = surgery.apply(model, latency_plan(model, x, ratio=0.5, latency=lat, budget="latency"))
    flat = surgery.apply(model, surgery.plan(model, x, ratio=0.5))
    assert surgery.count_macs(fast, x) > surgery.count_macs(flat, x)
    assert estimate(lat, fast) <= estimate(lat, flat) * 1.0001


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_real_timings_give_an_exact_plan_within_budget(runtime: str) -> None:
    model, x = randomize_norms(resnet20().eval()), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, runtime=runtime, threads=1)
    costed = nn.Conv2d | nn.Linear | nn.BatchNorm2d
    assert len(lat.calls) == sum(isinstance(m, costed) for m in model.modules())
    for call, table in zip(lat.calls, lat.tables, strict=True):
        # BatchNorm is folded into the conv by ONNX Runtime: free there, a memory pass in eager
        free = runtime == "ort" and isinstance(call.module, nn.BatchNorm2d)
        assert (table.ms == 0).all() if free else (table.ms > 0).all(), call.path
    plan = latency_plan(model, x, ratio=0.5, latency=lat)
    small = surgery.apply(model, plan)
    surgery.verify(model, small, plan, x)
    flat = surgery.prune(model, x, ratio=0.5)
    assert surgery.count_macs(small, x) <= surgery.count_macs(flat, x)
    assert plan.settings["runtime"] == runtime and plan.settings["threads"] == 1


def test_prune_allocate() -> None:
    model, x = resnet20().eval(), torch.randn(1, 3, 32, 32)
    small = surgery.prune(model, x, surgery.RuntimeAware(0.5, runtime="torch", compare=False))
    flat = surgery.prune(model, x, ratio=0.5)
    assert surgery.count_macs(small, x) <= surgery.count_macs(flat, x)
    # allocate= is not ignored: the layers keep other widths than the uniform plan's
    width = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert width != [m.out_channels for m in flat.modules() if isinstance(m, nn.Conv2d)]
    # by default the laid-out plan is timed against the uniform one: the faster is kept
    plan = surgery.plan(model, x, ratio=0.5, allocate="torch")
    compared = plan.settings["compared"]
    faster = "uniform" if compared["uniform_ms"] < compared["laid_out_ms"] else "laid out"
    assert compared["kept"] == faster and compared["runtime"] == "torch"
    assert plan.settings["allocation"] == {"uniform": "uniform", "laid out": "latency"}[faster]
    assert plan.settings["runtime"] == "torch" and plan.settings["config"]["compare"] is True


class ModelClock(surgery.Runtime):
    """Deterministic: a whole model takes ``cost(model)`` ms, whatever its layers' timings
    said (what happens between layers: fusions, memory traffic)."""

    name = "model-clock"
    description = "deterministic: whole-model time from a function"

    def __init__(self) -> None:
        self.cost: Any = lambda m: 1.0

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        ms = float(self.cost(model))
        return lambda: ms

    def layer_runner(self, layer: surgery.LayerProgram, threads: int) -> Any:
        return None  # the layers are timed by the test's timer

    def time_ms(self, fn: Any) -> float:
        return float(fn())


def test_compare_keeps_whichever_plan_the_runtime_runs_faster() -> None:
    rt = surgery.register_runtime(ModelClock(), replace=True)
    model, x = chain(), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, runtime=rt.name, timer=slow_stem)
    laid = latency_plan(model, x, ratio=0.5, latency=lat)  # compare=False: the allocator alone
    uniform = surgery.plan(model, x, ratio=0.5)
    stem = {p.layers["0"].axes["out"].size - len(p.layers["0"].axes["out"].keep)
            for p in (laid, uniform)}
    assert len(stem) == 2  # the allocator took more from the stem than the uniform plan

    def stem_width(m: nn.Module) -> int:
        return m[0].out_channels

    kept = set()
    for sign in (1.0, -1.0):  # a runtime on which a wide stem is slow, then one where it is fast
        rt.cost = lambda m, s=sign: 100.0 + s * stem_width(m)
        p = latency_plan(model, x, ratio=0.5, latency=lat, compare=True)
        ms = {name: 100.0 + sign * stem_width(surgery.apply(model, q))
              for name, q in (("laid out", laid), ("uniform", uniform))}
        faster = min(ms, key=ms.__getitem__)
        c = p.settings["compared"]
        assert (c["laid_out_ms"], c["uniform_ms"]) == (ms["laid out"], ms["uniform"])
        assert c["kept"] == faster and c["runtime"] == rt.name
        assert p.layers == (laid if faster == "laid out" else uniform).layers
        assert p.settings["allocation"] == ("latency" if faster == "laid out" else "uniform")
        kept.add(faster)
    assert kept == {"laid out", "uniform"}


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = chain()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x) * scale


def test_compare_is_skipped_with_the_reason_where_the_model_cannot_be_timed_whole() -> None:
    rt = surgery.register_runtime(ModelClock(), replace=True)
    model, x = TwoInputs().eval(), (torch.randn(1, 3, 32, 32), torch.ones(1))
    lat = latency_model(model, x, runtime=rt.name, timer=slow_stem)
    with pytest.warns(UserWarning, match="not timed against the uniform plan on model-clock"):
        p = latency_plan(model, x, ratio=0.5, latency=lat, compare=True)
    assert "takes 2 inputs" in p.settings["compared"]["skipped"]
    assert p.layers == latency_plan(model, x, ratio=0.5, latency=lat).layers  # as laid out


class BatchSpy(ModelClock):
    """A deterministic runtime that notes the batch of everything it is asked to time."""

    name = "batch-spy"

    def __init__(self) -> None:
        super().__init__()
        self.batches: set[int] = set()

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        self.batches.add(int(x.shape[0]))
        return super().model_runner(model, x, onnx, threads)

    def layer_runner(self, layer: surgery.LayerProgram, threads: int) -> Any:
        x = layer.inputs[0]
        self.batches.add(int(x.shape[0]))
        ms = x.numel() * 1e-4 * (10.0 if x.shape[1] == 3 else 1.0)  # a slow stem
        return lambda: ms


def test_runtime_aware_times_its_batch_and_scores_on_the_examples() -> None:
    """``batch=1`` with a batch of real images: the runtime times batch 1 only (layers and the
    whole-model comparison); which blocks may go is decided on the images given."""
    from surgery.depth import find_bypasses, sensitivity

    spy = surgery.register_runtime(BatchSpy(), replace=True)
    model = resnet20().eval()
    x = torch.rand(6, 3, 32, 32) * 0.1 + 0.5  # not what random inputs at batch 1 look like
    config = surgery.RuntimeAware(ratio=0.5, runtime=spy.name, depth=True, batch=1)
    plan = surgery.plan(model, x, config)
    assert spy.batches == {1}
    assert plan.settings["compared"]["batch"] == 1
    recorded = surgery.config_from_dict(plan.settings["config"])
    assert recorded.batch == 1 and recorded.depth  # type: ignore[attr-defined]
    scores = plan.settings.get("bypass_sensitivity", {})
    assert scores, "the plan bypassed nothing: the scoring was not checked"
    found = {b.key: b for b in find_bypasses(model)}
    assert list(scores.values()) == pytest.approx(
        [round(s, 6) for s in sensitivity(model, x, [found[k] for k in scores])], abs=1e-6)
    spy.batches.clear()
    surgery.plan(model, x, config.replace(batch=None, depth=False))  # default: the example's
    assert spy.batches == {6}
    with pytest.raises(surgery.ConfigError, match="batch must be a positive int"):
        surgery.RuntimeAware(ratio=0.5, batch=0)
    with pytest.raises(surgery.ConfigError, match="must be one batched tensor .* takes 2 inputs"):
        latency_plan(TwoInputs().eval(), (x, torch.ones(1)), ratio=0.5, runtime=spy.name,
                     batch=1)


class Blocked16(ModelClock):
    """A runtime whose fast kernels take channel counts in multiples of 16."""

    name = "blocked-16"

    def channel_multiple(self) -> int:
        return 16


def test_laid_out_widths_are_multiples_of_the_runtimes_channel_block() -> None:
    rt = surgery.register_runtime(Blocked16(), replace=True)
    model, x = resnet20().eval(), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, runtime=rt.name, timer=slow_stem, lowest=0.1)
    aligned = latency_plan(model, x, ratio=0.6, latency=lat, max_ratio=0.9)
    sizes = [(ap.size, len(ap.keep)) for lp in aligned.layers.values()
             for ap in lp.axes.values()]
    assert sizes and all(k % 16 == 0 or k == n for n, k in sizes)
    assert aligned.settings["channel_multiple"] == 16
    free = latency_plan(model, x, ratio=0.6, latency=lat, max_ratio=0.9, round_to=1)
    assert any(len(ap.keep) % 16 for lp in free.layers.values() for ap in lp.axes.values())
    assert "channel_multiple" not in free.settings  # round_to=1: any count


@pytest.mark.parametrize(("capability", "block"), [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 1)])
def test_onnx_runtime_cpu_block_follows_the_vector_width(monkeypatch: pytest.MonkeyPatch,
                                                         capability: str, block: int) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert surgery.get_runtime("ort").channel_multiple() == block
    assert surgery.get_runtime("torch").channel_multiple() == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "tensorrt"}, "latency runtime must be one of torch, cuda, ort, ort-cuda"),
    ({"budget": "watts"}, "budget must be 'latency' or 'macs', not 'watts'"),
    ({"max_ratio": 0.3}, "max_ratio must be in [ratio=0.5, 1)"),
    ({"threads": 0}, "threads must be a positive int"),
    ({"ratio": 1.0}, "ratio must be a number in [0, 1)"),
])
def test_bad_settings_are_refused_and_the_model_untouched(kwargs: dict, message: str) -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError) as e:
        latency_plan(model, x, **{"ratio": 0.5, **kwargs})
    assert message in str(e.value)
    assert_unchanged(model, before)


def test_a_latency_model_must_fit_the_model_and_the_ratio() -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    lat = latency_model(model, x, timer=slow_stem, lowest=0.5)
    with pytest.raises(surgery.ConfigError, match="timed down to 0.5 .* needs 0.25"):
        latency_plan(model, x, ratio=0.5, latency=lat)
    other = resnet20().eval()
    with pytest.raises(surgery.ConfigError, match="made for another model"):
        latency_plan(other, x, ratio=0.5, latency=latency_model(model, x, timer=slow_stem))


def test_prune_allocate_errors() -> None:
    model, x = chain(), torch.randn(1, 3, 32, 32)
    with pytest.raises(surgery.ConfigError, match="allocate must be 'uniform' or a runtime"):
        surgery.prune(model, x, ratio=0.5, allocate="tensorrt")
    with pytest.raises(surgery.ConfigError, match="target_macs= works with allocate='uniform'"):
        surgery.prune(model, x, target_macs=0.5, allocate="ort")


def test_costs_live_with_the_rules_and_duplicates_are_refused() -> None:
    from surgery.latency import cost_rule
    from surgery.rules import module_rule
    from surgery.rules.cost import ConvCost

    assert cost_rule(torch.nn.Conv2d(1, 1, 1)) is module_rule(torch.nn.Conv2d).cost
    assert isinstance(cost_rule(torch.nn.Conv2d), ConvCost)
    assert cost_rule(torch.nn.Conv1d) is None  # the 2-d cost model does not claim Conv1d
    with pytest.raises(ValueError, match="Conv2d already has a cost model"):
        surgery.register_cost(ConvCost())


def test_table_lookup_is_bilinear_and_clamped_like_numpy() -> None:
    """The allocator's fast lookup (plain Python, remembered) gives numpy's bilinear values,
    the edge values outside the timed grid."""
    import numpy as np

    from surgery.latency import _Table

    rng = np.random.default_rng(0)
    ins, outs = np.array([8.0, 16.0, 24.0, 32.0]), np.array([16.0, 48.0, 64.0])
    table = _Table(ins, outs, rng.random((4, 3)))
    for cin, cout in [(8, 16), (12, 40), (31.5, 63), (2, 100), (40, 10), (24, 48), (12, 40)]:
        rows = [np.interp(cout, outs, r) for r in table.ms]
        assert table(cin, cout) == pytest.approx(float(np.interp(cin, ins, rows)), rel=1e-12)
