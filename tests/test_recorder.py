"""The executing tracer: models fx cannot trace, sizes computed vs written, same answers as fx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_norms, snapshot
from patterns import PATTERNS
from torch import nn

import surgery


class Branchy(nn.Module):
    """Python that looks at shapes and values: fx cannot trace it, a real run can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1),
                                                  nn.BatchNorm2d(16)) for _ in range(2))
        self.expand = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.shape[-1] % 2:  # shape-dependent padding, like timm's Conv2dSame
            x = F.pad(x, (0, 1, 0, 1))
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        b, c, h, w = x.size()
        g = 4  # channel shuffle with a literal group count: column-wise coupling
        x = x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)
        feats = [t.mean((1, 2)) for t in self.expand(x).unbind(0)]  # iterate over the batch
        y = torch.stack(feats)
        return y if return_features else self.fc(y)


class Literal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:  # keeps fx out
            x = F.adaptive_avg_pool2d(self.b(self.a(x)), 1)
        return self.fc(x.view(-1, 32))


def test_fx_fails_the_recorder_prunes_exactly() -> None:
    model = randomize_norms(Branchy()).eval()
    x = torch.randn(1, 3, 15, 15)
    before = snapshot(model)
    with pytest.raises(surgery.TraceError):
        surgery.trace(model, x, tracer="fx")
    graph = surgery.trace(model, x)
    assert graph.tracer == "run" and "fx" in graph.notes[0]
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x, rtol=1e-9)  # float64 decides
    assert report.passed and report.exact_checked and report.max_rel_error < 1e-9
    assert_unchanged(model, before)
    assert small.expand.out_channels == 16 and small.stem[0].out_channels < 16
    # the shuffle's literal 4 groups survive: channels go column-wise, 4 at a time
    assert small.stem[0].out_channels % 4 == 0
    # the other branch of the shape test still works on the pruned model
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert small(torch.randn(2, 3, 16, 16), return_features=True).shape == (2, 16)


def test_literal_size_is_detected_by_the_recorder_too() -> None:
    model = Literal()
    x = torch.randn(1, 3, 8, 8)
    graph = surgery.trace(model, x)
    assert graph.tracer == "run"
    why = graph.explain("b")
    assert "hard-coded size (32,)" in why and "x.view(-1, 32)" in why and "test_recorder.py" in why
    small = surgery.prune(model, x, ratio=0.5)
    assert small.b.out_channels == 32 and small.a.out_channels == 8


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_recorder_agrees_with_fx_on_every_pattern(name: str) -> None:
    cls, shape = PATTERNS[name]
    model = randomize_norms(cls())
    x = torch.randn(shape)
    a, b = surgery.trace(model, x, tracer="fx"), surgery.trace(model, x, tracer="run")
    assert (a.tracer, b.tracer) == ("fx", "run")
    assert sorted(a.slots) == sorted(b.slots)
    assert [(g.slots, len(g.units), len(g.pinned)) for g in a.groups] == \
        [(g.slots, len(g.units), len(g.pinned)) for g in b.groups]


def test_model_that_fails_on_its_input_is_named() -> None:
    model = Branchy()
    before = snapshot(model)
    with pytest.raises(surgery.ExampleInputError,
                       match="Branchy fails on the example inputs in module 'stem.0' \\(Conv2d\\)"):
        surgery.trace(model, torch.randn(1, 4, 8, 8))
    assert_unchanged(model, before)


class Defaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, scale: float = 1.0,
                return_features: bool = False) -> torch.Tensor:
        x = F.relu(self.a(x))
        if y is not None:
            x = x + y
        return x if return_features else self.b(x * scale)


def test_forward_arguments_with_defaults_are_bound_to_them() -> None:
    model = Defaults()
    x = torch.randn(1, 3, 8, 8)
    graph = surgery.trace(model, x)
    assert graph.tracer == "fx"  # no fallback needed: the defaults were bound
    small = surgery.prune(model, x, ratio=0.5)
    assert small.a.out_channels == 8
    assert small(x, return_features=True).shape == (1, 8, 8, 8)
