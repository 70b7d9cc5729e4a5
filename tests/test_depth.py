"""Depth pruning: residual bodies and gates found by what the op does, bypassed, verified against
the original with the same bypasses, re-applied from JSON, refused when they do not fit."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torchvision
from conftest import rounding
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import surgery
from surgery.latency import latency_model, latency_plan
from surgery.plan import Plan


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resnet_blocks_are_found_with_their_shortcuts() -> None:
    model = torchvision.models.resnet18()
    found = surgery.find_bypasses(model)
    assert [b.key for b in found] == [f"layer{i}.{j}:add" for i in range(1, 5) for j in (0, 1)]
    assert all(b.kind == "residual" and "out += identity" in b.line for b in found)
    down = next(b for b in found if b.block == "layer2.0")
    # the body goes, the downsample shortcut stays
    assert down.removes == ("layer2.0.bn1", "layer2.0.bn2", "layer2.0.conv1", "layer2.0.conv2")


def test_gates_are_found_by_their_bounds() -> None:
    class Gated(nn.Module):
        def __init__(self, act: Any) -> None:
            super().__init__()
            self.fc = nn.Conv2d(8, 8, 1)
            self.act = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.act(self.fc(x.mean((2, 3), keepdim=True)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.sig = Gated(torch.sigmoid)  # a function
            self.kw = Gated(F.hardsigmoid)  # a function fx records with a setting (inplace=)
            self.hard = Gated(nn.Hardsigmoid())  # a module
            self.tanh = Gated(torch.tanh)  # [-1, 1]: not a gate
            self.free = Gated(nn.Identity())  # unbounded: not a gate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.free(self.tanh(self.hard(self.kw(self.sig(self.stem(x))))))

    found = surgery.find_bypasses(Net())
    assert [(b.block, b.kind, b.keep) for b in found] == [
        ("sig", "gate", 0), ("kw", "gate", 0), ("hard", "gate", 0)]
    assert found[2].removes == ("hard.act", "hard.fc")


def test_mode_dependent_and_untraceable_blocks_are_left_alone() -> None:
    class TrainOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.training else x + 2 * self.body(x)

    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if x.sum() > 0 else x

    model = nn.Sequential(TrainOnly(), ValueBranch(), nn.Conv2d(4, 4, 1))
    assert surgery.find_bypasses(model) == []


def _depth_plan(model: nn.Module, x: torch.Tensor, every: int = 2) -> Plan:
    """A uniform plan with every ``every``-th bypass of the model made."""
    found = surgery.find_bypasses(model, x)
    return surgery.plan(model, x, ratio=0.5).bypassing(found[::every])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_bypassed_and_narrowed_model_equals_the_bypassed_original(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    before = _state(model)
    plan = _depth_plan(model, x)
    assert plan.bypasses and all(not any(p.startswith(r) for r in plan.removed_layers())
                                 for p in plan.layers)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked and report.max_rel_error <= rounding(model)
    assert report.layers_compared > 0
    for b in plan.bypasses:  # the body is gone, the block still answers to its name
        block = small.get_submodule(b.block)
        assert type(block).__name__.endswith("Bypassed")
        assert not any(n == r.removeprefix(b.block + ".") for r in b.removes
                       for n, _ in block.named_modules())
    assert surgery.count_params(small) < surgery.count_params(surgery.apply(
        model, surgery.plan(model, x, ratio=0.5)))
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__.endswith("Bypassed") for m in model.modules())
    # the plan is data: JSON, then a fresh instance of the model
    torch.manual_seed(1)
    fresh = torchvision.models.get_model(name).eval()
    again = surgery.apply(fresh, Plan.from_json(plan.to_json()))
    again.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    # and it trains
    small.train()
    small(torch.randn(2, 3, 64, 64)).sum().backward()


def test_in_place_apply_and_onnx_export(tmp_path: Any) -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    plan = _depth_plan(model, x, every=3)
    small = surgery.apply(model, plan)
    target = copy.deepcopy(model)
    assert surgery.apply_(target, plan) is target
    with torch.no_grad():
        assert torch.equal(target(x), small(x))
    report = surgery.export_onnx(small, x, str(tmp_path / "m.onnx"))
    assert report.max_rel_error < 1e-4


def test_plans_that_do_not_fit_are_refused_before_any_change() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    plan = _depth_plan(model, x)
    data = plan.to_dict()
    data["bypass"][0]["keep"] = 1 - data["bypass"][0]["keep"]  # keep the body, drop the input
    bad = Plan.from_dict(data)
    target = copy.deepcopy(model)
    before = _state(target)
    with pytest.raises(surgery.PlanError, match=r"op 'add' .* of 'layer1.0' \(BasicBlock\)"):
        surgery.apply_(target, bad)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert not any(type(m).__name__.endswith("Bypassed") for m in target.modules())
    data = plan.to_dict()
    data["bypass"][0]["block"] = "layer9.0"
    with pytest.raises(surgery.PlanError, match="'layer9.0', which this model does not have"):
        surgery.apply(model, Plan.from_dict(data))
    inner = plan.bypasses[0].removes[0]
    data = plan.to_dict()
    data["layers"][inner] = {"kind": "module", "class": "Conv2d",
                             "axes": {"out": {"size": 64, "keep": [0]}}}
    with pytest.raises(surgery.PlanError, match=f"shrinks '{inner}'.*no longer runs"):
        surgery.apply(model, Plan.from_dict(data))


class OverheadClock(surgery.Runtime):
    """Every layer costs 0.2 ms plus 1 ms per million MACs: per-layer overhead that narrowing
    does not remove and bypassing does."""

    name = "overhead-clock"
    description = "deterministic: a fixed cost per layer"

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        return lambda: surgery.count_macs(model, x) / 1e6

    def layer_runner(self, layer: surgery.LayerProgram, threads: int) -> Any:
        if layer.torch is None:
            return None
        with FlopCounterMode(display=False) as counter:
            layer.torch(*layer.inputs)
        ms = 0.2 + counter.get_total_flops() / 2e6
        return lambda: ms

    def time_ms(self, fn: Any) -> float:
        return float(fn())


def test_the_allocator_trades_blocks_for_width_where_layers_cost_overhead() -> None:
    clock = surgery.register_runtime(OverheadClock(), replace=True)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    lat = latency_model(model, x, runtime=clock.name, lowest=0.25)
    wide = latency_plan(model, x, ratio=0.5, runtime=clock.name, latency=lat)
    deep = latency_plan(model, x, ratio=0.5, runtime=clock.name, latency=lat, depth=True)
    assert not wide.bypasses and deep.bypasses
    candidates = surgery.find_bypasses(model, x)
    assert len(deep.bypasses) <= 0.5 * len(candidates)  # at most `ratio` of the blocks
    assert set(deep.settings["bypass_sensitivity"]) == {b.key for b in deep.bypasses}
    uniform = surgery.apply(model, surgery.plan(model, x, ratio=0.5))
    small = surgery.apply(model, deep)
    assert surgery.verify(model, small, deep, x).passed
    # the same MACs budget as the uniform plan (within one step), fewer layers running
    assert surgery.count_macs(small, x) == pytest.approx(surgery.count_macs(uniform, x), rel=0.1)
    estimate = sum(lat.ms(i, lat.full[i]) for i in range(len(lat.calls)))
    assert deep.settings["config"]["depth"] is True and estimate > 0
    layers = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) < len([m for m in uniform.modules() if isinstance(m, nn.Conv2d)])


def test_the_allocator_keeps_every_stage_transition() -> None:
    """A stage's first block (strided, widening shortcut) is never bypassed by the allocator,
    however cheap it looks: what would remain is the projection alone (a stride-2 1x1 conv
    reading a quarter of the positions). Other blocks still go."""
    from surgery.depth import transitions

    clock = surgery.register_runtime(OverheadClock(), replace=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    blocks = [b.block for b in surgery.find_bypasses(model, x)]
    assert transitions(model, x, blocks) == {"layer2.0", "layer3.0", "layer4.0"}
    lat = latency_model(model, x, runtime=clock.name, lowest=0.25)
    deep = latency_plan(model, x, ratio=0.5, runtime=clock.name, latency=lat, depth=True)
    gone = {b.block for b in deep.bypasses}
    assert gone and not gone & {"layer2.0", "layer3.0", "layer4.0"}
    assert surgery.verify(model, surgery.apply(model, deep), deep, x).passed


def test_depth_needs_the_runtime_aware_allocator() -> None:
    with pytest.raises(surgery.ConfigError, match="allocate=True"):
        surgery.LatencyTarget(speedup=2, allocate=False, depth=True)
    from surgery.api import as_config

    with pytest.raises(surgery.ConfigError, match="give allocate=RUNTIME"):
        as_config(ratio=0.5, depth=True)
    config = as_config(ratio=0.5, allocate="ort", depth=True)
    assert surgery.config_from_dict(config.to_dict()) == config


def test_a_saved_depth_pruned_model_loads(tmp_path: Any) -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    plan = _depth_plan(model, x)
    small = surgery.apply(model, plan)
    surgery.save(tmp_path / "d", small, plan, spec="resnet20", input_shape=(1, 3, 32, 32))
    back = surgery.load(tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small(x))
    assert {type(back.get_submodule(b.block)).__name__ for b in plan.bypasses} == {
        "BasicBlockBypassed"}


def test_cli_depth_prunes_and_reports_the_blocks() -> None:
    """`surgery prune --allocate torch --depth` on PyTorch eager (real timings: the assertions
    are on what is shown and on the result being verified, not on what was chosen)."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
    res = subprocess.run([script, "prune", "resnet20", "--input-shape", "1,3,32,32",
                          "--ratio", "0.5", "--allocate", "torch", "--depth", "--dry-run",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["settings"]["config"]["depth"] is True
    assert report["verification"]["passed"] and report["verification"]["exact"]
    for b in report["bypassed"]:
        assert b["kind"] == "residual" and b["removes"] and b["sensitivity"] >= 0
        assert all(report["layers"][r]["after"] is None for r in b["removes"]
                   if r in report["layers"])
    bad = subprocess.run([script, "prune", "resnet20", "--ratio", "0.5", "--depth",
                          "--dry-run"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "--depth needs --allocate RUNTIME" in bad.stderr


def test_a_depth_plan_passes_the_coupling_check_and_a_tampered_one_does_not() -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    plan = _depth_plan(model, x)
    small = surgery.apply(model, plan, x)  # checked against the bypassed model's groups
    assert surgery.verify(model, small, plan, x).passed
    data = plan.to_dict()
    kept = next(p for p, lp in data["layers"].items() if "out" in lp["axes"]
                and p.endswith("conv1") and p != "conv1")
    axis = data["layers"][kept]["axes"]["out"]
    axis["keep"] = [i for i in range(axis["size"]) if i not in axis["keep"]][:len(axis["keep"])]
    with pytest.raises(surgery.PlanError):
        surgery.apply(model, Plan.from_dict(data), x)


def test_a_layer_scale_read_only_by_the_body_goes_with_it() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.gamma = nn.Parameter(torch.rand(16, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.gamma * self.bn(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 16, 3), Scaled(), Scaled(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    found = surgery.find_bypasses(model, x)
    assert [b.removes for b in found] == [("1.bn", "1.conv", "1.gamma"),
                                          ("2.bn", "2.conv", "2.gamma")]
    plan = surgery.plan(model, x, ratio=0.5).bypassing(found[:1])
    assert "1.gamma" not in plan.layers and "2.gamma" in plan.layers
    small = surgery.apply(model, plan, x)
    assert surgery.verify(model, small, plan, x).passed
    assert not hasattr(small.get_submodule("1"), "gamma")


def test_an_in_place_statement_on_a_kept_tensor_survives_the_bypass() -> None:
    class Mutating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 1.0
            y.clamp_(min=0)  # a statement: its result feeds nothing, y is changed in place
            body = self.conv(x)
            body.mul_(0.5)  # the same, on the body: goes with it
            return y + body

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Mutating(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    found = surgery.find_bypasses(model, x)
    assert [(b.block, b.keep) for b in found] == [("1", 0)]
    small = surgery.apply(model, surgery.Plan.from_dict({
        **surgery.plan(model, x, ratio=0.0).to_dict(), "bypass": [found[0].to_dict()]}))
    block = small.get_submodule("1")
    assert "clamp_" in block.code and "mul_" not in block.code
    with torch.no_grad():
        h = model[0](x)
        assert torch.equal(small(x), model[2](h.clamp(min=0)))


def test_depth_scoring_records_the_blocks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator's three measures of a block (stage transition, bypass sensitivity, change
    when narrowed) read one recorded forward, and give what separate records give."""
    from surgery import latency as latency_module
    from surgery.depth import first_calls, sensitivity, transitions

    clock = surgery.register_runtime(OverheadClock(), replace=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    found = surgery.find_bypasses(model, x)
    blocks = {b.block for b in found}
    record = first_calls(model, x, blocks)
    assert transitions(model, x, blocks, calls=record) == transitions(model, x, blocks)
    assert sensitivity(model, x, found, calls=record) == sensitivity(model, x, found)
    made: list[int] = []
    monkeypatch.setattr(latency_module, "first_calls",
                        lambda *a, **k: made.append(1) or first_calls(*a, **k))
    lat = latency_model(model, x, runtime=clock.name, lowest=0.25)
    deep = latency_plan(model, x, ratio=0.5, runtime=clock.name, latency=lat, depth=True)
    assert deep.bypasses and made == [1]


class _WritesItsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


def test_a_shared_record_survives_a_block_that_writes_its_input() -> None:
    from surgery.depth import block_change, first_calls

    model = nn.Sequential(nn.Conv2d(3, 4, 1), _WritesItsInput()).eval()
    other = copy.deepcopy(model)
    x = torch.randn(1, 3, 4, 4)
    record = first_calls(model, x, ["1"])
    first = block_change(model, other, x, ["1"], calls=record)
    assert block_change(model, other, x, ["1"], calls=record) == first
