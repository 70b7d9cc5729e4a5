"""The runtime registry: built-in entries, availability checks that name what is missing, and a
new runtime and a new layer added each as one entry, from this file alone."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import surgery
from surgery.groups import TVal
from surgery.rules import ModuleRule, clone_module, register_module_rule, set_tensor
from surgery.rules.cost import Call, CostRule


def test_built_in_runtimes_and_unknown_names() -> None:
    assert surgery.runtime_names()[:4] == ["torch", "cuda", "ort", "ort-cuda"]
    assert surgery.get_runtime("ort").form == "onnx" and surgery.get_runtime("torch").form \
        == "module"
    with pytest.raises(surgery.ConfigError, match="unknown runtime 'tensorrt'; known: torch, "
                                                  "cuda, ort, ort-cuda"):
        surgery.get_runtime("tensorrt")
    with pytest.raises(ValueError, match="already registered"):
        surgery.register_runtime(surgery.get_runtime("torch"))


def test_cuda_runtimes_say_what_is_missing_on_a_cpu_machine() -> None:
    import onnxruntime

    model, x = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider" in (surgery.get_runtime("ort-cuda").missing() or "")
        with pytest.raises(surgery.RuntimeMissingError, match="'ort-cuda' needs ONNX Runtime's "
                                                              "CUDAExecutionProvider"):
            surgery.bench({"m": model}, (3, 8, 8), runtimes=("ort-cuda",))
        with pytest.raises(surgery.RuntimeMissingError, match="ort-cuda"):
            surgery.latency_model(model, x, runtime="ort-cuda")
    else:
        assert surgery.get_runtime("ort-cuda").missing() is None
    if not torch.cuda.is_available():
        with pytest.raises(surgery.RuntimeMissingError, match="no CUDA GPU"):
            surgery.latency_model(model, x, runtime="cuda")


class CountingRuntime(surgery.Runtime):
    """A toy runtime: PyTorch eager in channels-last memory format, counting its timed calls."""

    name = "torch-channels-last"
    description = "PyTorch eager, channels-last tensors"

    def __init__(self) -> None:
        self.timed = 0

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Any:
        assert model is not None
        cl = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        return lambda: cl(xc)

    def layer_runner(self, layer: surgery.LayerProgram, threads: int) -> Any:
        fn = layer.torch
        if fn is None:
            return None
        args = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                for t in layer.inputs]
        return lambda: fn(*args)

    def time_ms(self, fn: Any) -> float:
        self.timed += 1
        return super().time_ms(fn)


class Mix(nn.Module):
    """A toy layer: a hand-written 1x1 convolution no built-in rule knows."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,bihw->bohw", self.weight, x)


class MixCost(CostRule):
    types = (Mix,)

    def widths(self, call: Call) -> dict[str, int]:
        return {"out": call.module.weight.shape[0], "in": call.module.weight.shape[1]}

    def macs(self, call: Call, w: dict[str, int]) -> float:
        return call.out_shape[0] * math.prod(call.out_shape[2:]) * w["in"] * w["out"]

    def program(self, call: Call, w: dict[str, int]) -> surgery.LayerProgram:
        from onnx import helper

        x = torch.randn(call.in_shape[0], w["in"], *call.in_shape[2:])
        weight = torch.randn(w["out"], w["in"])
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])
        return surgery.LayerProgram([x, weight], lambda x, w: F.conv2d(x, w[:, :, None, None]),
                                    [node], {"w": weight[:, :, None, None].numpy()})


class MixRule(ModuleRule):
    types = (Mix,)
    axes = ("in", "out")
    cost = MixCost()

    def propagate(self, ctx: Any, path: str, m: nn.Module, inputs: list[Any], out: Any) -> Any:
        cout, cin = m.weight.shape
        ctx.slot(path, "in", ctx.channels_in(inputs[0], 1, cin))
        return TVal(out.shape, (1,), ctx.out_atoms(path, "out", cout))

    def shrink(self, m: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        w = m.weight.detach()
        new = clone_module(m)
        set_tensor(new, "weight", w[keep.get("out", torch.arange(w.shape[0]))]
                   [:, keep.get("in", torch.arange(w.shape[1]))])
        return new

    def weight_rows(self, m: nn.Module, axis: str, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
        w = m.weight.detach() if weight is None else weight
        return w if axis == "out" else w.t()

    def zero_removed(self, m: nn.Module, axis: str, idx: torch.Tensor) -> None:
        if axis == "in" and len(idx):
            with torch.no_grad():
                m.weight[:, idx] = 0


def test_a_new_runtime_and_a_new_layer_are_one_entry_each() -> None:
    rt = surgery.register_runtime(CountingRuntime(), replace=True)
    register_module_rule(MixRule(), replace=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          Mix(32, 64), nn.ReLU(), Mix(64, 32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    x = torch.randn(1, 3, 16, 16)
    # the layer: traced, pruned, verified exactly
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small[3].weight.shape == (32, 16) and small[5].weight.shape == (16, 32)
    # the layer's cost model and the runtime serve latency-aware allocation
    lat = surgery.latency_model(model, x, runtime=rt.name)
    assert {c.path for c in lat.calls} >= {"3", "5"} and rt.timed > 0
    assert lat.macs([c.path for c in lat.calls].index("3"), {"in": 32, "out": 64}) == \
        16 * 16 * 32 * 64
    fast = surgery.prune(model, x, ratio=0.5, allocate=rt.name)
    assert surgery.count_macs(fast, x) < surgery.count_macs(model, x)
    # ... and the benchmark, next to a built-in runtime
    report = surgery.bench({"model": model, "pruned": small}, (3, 16, 16),
                           runtimes=("torch", rt.name), rounds=2, min_round_ms=1)
    assert {r.runtime for r in report.rows} == {"torch", rt.name}
    assert all(r.median_ms > 0 for r in report.rows)
    # what the rule says about its weight serves the mask and sparse tools too
    assert Mix in surgery.sparse.prunable_types()
    masked = copy.deepcopy(model)
    torch.nn.utils.prune.ln_structured(masked[3], "weight", 0.5, n=2, dim=0)
    from_masks, report = surgery.from_masks(masked, x)
    assert from_masks[3].weight.shape[0] == 32 and report.max_rel_error < 1e-5
    # the same layer program also runs on ONNX Runtime
    ort = surgery.get_runtime("ort")
    program = MixCost().program(lat.calls[[c.path for c in lat.calls].index("3")],
                                {"in": 32, "out": 64})
    run = ort.layer_runner(program, threads=1)
    assert run is not None and run()[0].shape == (1, 64, 16, 16)


def test_fused_eager_folds_batchnorm_and_matches() -> None:
    """torch-fused: eager in deploy form (BatchNorm folded into the conv), so eager timings of
    the original and the pruned model compare like with like; a folded layer costs nothing."""
    from surgery.runtimes import fused

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    folded = fused(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # the model itself is untouched
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    rt = surgery.get_runtime("torch-fused")
    lat = surgery.latency_model(model, x, runtime="torch-fused")
    bn = [i for i, c in enumerate(lat.calls) if isinstance(c.module, nn.BatchNorm2d)]
    assert bn and all(lat.ms(i, lat.full[i]) == 0.0 for i in bn)
    report = surgery.bench({"m": model}, (3, 16, 16), runtimes=("torch", rt.name), rounds=2,
                           min_round_ms=1)
    assert {r.runtime for r in report.rows} == {"torch", "torch-fused"}


class Drifting(surgery.Runtime):
    """A toy clock: model time = its parameter count in ms times a slow drift (a machine that
    heats up), plus seeded noise; alternation must cancel the drift."""

    name = "drifting-clock"

    def __init__(self) -> None:
        self.calls = 0
        self.rng = torch.Generator().manual_seed(0)

    def model_runner(self, model: Any, x: torch.Tensor, onnx: str | None, threads: int) -> Any:
        n = sum(p.numel() for p in model.parameters())
        return lambda: n

    def time_ms(self, fn: Any) -> float:
        self.calls += 1
        noise = 1 + 0.05 * float(torch.rand(1, generator=self.rng))
        return fn() / 100 * (1 + self.calls / 500) * noise


def test_speedups_come_with_a_bootstrap_interval() -> None:
    rt = surgery.register_runtime(Drifting(), replace=True)
    big, small = nn.Linear(100, 100), nn.Linear(100, 50)  # 10100 vs 5050 parameters: 2x
    report = surgery.bench({"big": big, "small": small}, (100,), runtimes=(rt.name,), rounds=12,
                           min_round_ms=1)
    row = next(r for r in report.rows if r.model == "small")
    assert row.speedup_ci_low is not None and row.speedup_ci_high is not None
    assert row.speedup_ci_low <= row.speedup <= row.speedup_ci_high
    assert row.speedup_ci_low > 1.9 and row.speedup_ci_high < 2.1  # the drift cancels out
    assert f"({row.speedup_ci_low:.2f}–{row.speedup_ci_high:.2f})" in report.to_markdown()
