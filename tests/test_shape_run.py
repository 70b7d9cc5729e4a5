"""The trace's shape run: costly layers on the meta device, the same shapes as a real run, and a
real run wherever the graph reads values."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from patterns import PATTERNS
from torch import nn
from zoo import DEFAULT, TIMM_40, TIMM_ATTENTION, build, classifiers

import surgery
from surgery.graph import Recorder, fx_trace
from surgery.shape_run import NeedsValues

shape_run = importlib.import_module("surgery.shape_run")


def _meta(model: nn.Module, x: tuple, cheap: bool, graph: torch.fx.Graph | None = None
          ) -> tuple[str, Recorder]:
    rec = Recorder(model, graph or fx_trace(model, (), len(x)), cheap=cheap)
    with torch.no_grad():
        rec.run(*x)
    return repr(sorted((n.name, repr(v)) for n, v in rec.meta.items())), rec


def test_costly_layers_are_not_computed_and_every_shape_is_the_real_ones() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = (torch.randn(1, 3, 64, 64),)
    graph = fx_trace(model, (), 1)
    cheap, rec = _meta(model, x, True, graph)
    assert cheap == _meta(model, x, False, graph)[0]
    zeroed = {n.name for n in rec.zeroed}
    assert {"conv1", "layer4_1_conv2", "fc"} <= zeroed  # values not computed
    with torch.no_grad():
        out = Recorder(model, fx_trace(model, (), 1), cheap=True).run(*x)
    assert torch.equal(out, model.fc.bias.expand(1, 1000))  # the classifier read zeros


def test_layers_that_keep_their_input_shape_are_not_called_on_zeros(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every BatchNorm and ReLU of resnet18 reads zeros (the stem conv is costly): the zeros go
    on as their outputs, uncalled, and every shape is still the real run's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = (torch.randn(1, 3, 64, 64),)
    graph = fx_trace(model, (), 1)
    calls = {"batch_norm": 0, "relu": 0}
    for name in calls:
        real = getattr(F, name)

        def counted(*args: object, _name: str = name, _real: object = real, **kw: object) -> object:
            calls[_name] += 1
            return _real(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(F, name, counted)
    cheap, _ = _meta(model, x, True, graph)
    assert calls == {"batch_norm": 0, "relu": 0}
    assert cheap == _meta(model, x, False, graph)[0]
    assert calls == {"batch_norm": 20, "relu": 17}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_gives_the_real_shapes_or_runs_for_real(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shape_run, "COSTLY_MACS", 0)  # every conv and linear on meta
    torch.manual_seed(0)
    cls, shape = PATTERNS[name]
    model, x = cls().eval(), (torch.randn(shape),)
    try:
        graph = fx_trace(model, (), len(x))
    except Exception:
        pytest.skip("fx cannot trace this pattern (the executing tracer runs it for real)")
    try:
        cheap, _ = _meta(model, x, True, graph)
    except NeedsValues:
        return  # the trace runs it for real
    assert cheap == _meta(model, x, False, graph)[0]


class StdConv(nn.Conv2d):
    """A weight-standardised conv (timm's StdConv2d, NFNets): ``F.conv2d`` on a computed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_functional_conv_on_a_computed_weight_is_taken_to_meta_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 32, 3, padding=1), nn.ReLU(), StdConv(32, 32, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = (torch.randn(1, 3, 64, 64),)  # both convs above COSTLY_MACS
    graph = fx_trace(model, (), 1)
    cheap, rec = _meta(model, x, True, graph)
    assert cheap == _meta(model, x, False, graph)[0]
    convs = [n for n in graph.nodes if n.target is F.conv2d]
    assert len(convs) == 2 and set(convs) <= rec.zeroed


ZOO = [pytest.param(("torchvision", n), marks=() if n in DEFAULT else pytest.mark.slow)
       for n in classifiers()] + [pytest.param(("timm", n), marks=pytest.mark.slow)
                                  for n in TIMM_40 + TIMM_ATTENTION]


@pytest.mark.parametrize("source", ZOO, ids=lambda s: s[1])
def test_the_shape_run_gives_the_real_shapes_on_the_zoo(source: tuple[str, str]) -> None:
    """Models nobody here wrote: every node's shape as a real run has it, or a real run."""
    torch.manual_seed(0)
    if source[0] == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(source[1], pretrained=False)
        x = (torch.randn(1, *model.pretrained_cfg["input_size"]),)
    else:
        model, t = build(source[1])
        x = (t,)
    model.eval()
    try:
        graph = fx_trace(model, (), 1)
    except Exception:
        pytest.skip("fx cannot trace it: the executing tracer runs it for real")
    try:
        cheap, _ = _meta(model, x, True, graph)
    except NeedsValues:
        return
    assert cheap == _meta(model, x, False, graph)[0]


class Masked(nn.Module):
    """How many values a mask keeps depends on the values: zeros would keep none."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.score = nn.Conv2d(3, 1, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(x)
        positive = s[s > 0]
        return self.fc(self.conv(x).mean((2, 3))) + positive.sum()


def test_a_value_read_after_a_zeroed_layer_runs_for_real(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shape_run, "COSTLY_MACS", 0)
    torch.manual_seed(0)
    model, x = Masked().eval(), (torch.randn(1, 3, 8, 8),)
    with pytest.raises(NeedsValues, match="reads values"):
        _meta(model, x, cheap=True)
    graph = surgery.trace(model, x)
    assert graph.tracer == "fx"
    small = surgery.prune(model, x, ratio=0.5)  # verified against the zeroed original
    assert small.conv.out_channels == 8


def test_forward_hooks_see_the_real_values_during_a_trace() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    seen: list[torch.Tensor] = []
    model.layer1[0].conv1.register_forward_hook(  # fx's symbolic trace calls it with proxies
        lambda _m, _a, out: seen.append(out) if isinstance(out, torch.Tensor) else None)
    x = torch.randn(1, 3, 64, 64)
    surgery.trace(model, x)
    assert seen and all(t.device.type == "cpu" and t.any() for t in seen)


def test_an_op_is_shape_only_unless_torch_tags_it_as_reading_values() -> None:
    only = shape_run._shape_only
    assert only("add") and only("relu_") and only("conv2d") and only("view")
    assert not only("nonzero") and not only("item") and not only("masked_select")
    assert not only("not_an_aten_op")
