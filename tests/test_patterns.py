"""Every coupling pattern prunes exactly, on small hand-written models."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, randomize_norms, rounding, snapshot
from patterns import PATTERNS, Concat, Grouped, JoinedBias, LayerScale, Shuffle, TrainOnlyAux
from torch import nn
from torch.nn import functional as F

import surgery


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_pattern_prunes_exactly(name: str, criterion: str) -> None:
    cls, shape = PATTERNS[name]
    model = randomize_norms(cls())
    x = torch.randn(shape)
    before = snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    plan = surgery.plan(model, x, ratio=0.5, criterion=criterion, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed
    assert_unchanged(model, before)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert type(small) is type(model)
    assert surgery.count_params(small) < surgery.count_params(model)
    assert surgery.count_macs(small, x) < surgery.count_macs(model, x)
    with torch.no_grad():
        assert small.eval()(x).shape == model.eval()(x).shape
    # the pruned model still trains: one SGD step in train mode
    small.train()
    out = small(x)
    loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


def test_exact_means_zeroed_reference_equals_pruned() -> None:
    """Independent of verify(): build the reference by hand for a chain."""
    model = randomize_norms(PATTERNS["chain"][0]()).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan).eval()
    ref = copy.deepcopy(model)
    keep_a = torch.tensor(plan.layers["a.0"].axes["out"].keep)
    removed = torch.ones(16, dtype=torch.bool)
    removed[keep_a] = False
    with torch.no_grad():
        ref.b[0].weight[:, removed] = 0
        keep_b = torch.tensor(plan.layers["b.0"].axes["out"].keep)
        dropped_b = torch.ones(32, dtype=torch.bool)
        dropped_b[keep_b] = False
        ref.fc.weight[:, dropped_b] = 0
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    assert small.a[0].out_channels == 8 and small.b[0].in_channels == 8
    assert small.fc.in_features == 16


def test_residual_operands_are_coupled() -> None:
    from patterns import Residual

    model = Residual()
    graph = surgery.trace(model, torch.randn(1, 3, 16, 16))
    group = next(g for g in graph.groups if "stem.0:out" in g.slots)
    assert {"b1.0:out", "b2.0:out", "gate:in", "gate:out", "head:in"} <= set(group.slots)
    assert len(group.units) == 16


def test_concat_offsets_and_chunk() -> None:
    model = Concat()
    x = torch.randn(1, 3, 16, 16)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small.mix[0].in_channels == small.a[0].out_channels + small.b[0].out_channels
    assert small.a[0].out_channels == 6 and small.b[0].out_channels == 10
    # chunk(2) stays even: both halves keep as many channels
    assert small.left.in_channels * 2 == small.mix[0].out_channels


def test_a_bias_joined_from_parameters_is_sliced_with_the_layer_it_is_given_to() -> None:
    model = JoinedBias()
    x = torch.randn(2, 5, 8)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    kept = small.qkv.out_features // 3
    assert kept < 16 and small.q_bias.shape == small.k_bias.shape == small.v_bias.shape == (kept,)
    assert small.proj.in_features == kept


def test_a_bias_computed_in_forward_keeps_the_channels_it_is_added_to() -> None:
    class Computed(JoinedBias):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = torch.ones(self.qkv.out_features)  # sized from an attribute, not sliced
            q, k, v = F.linear(self.inp(x), self.qkv.weight, bias).chunk(3, -1)
            return self.proj(q * k + v)

    model, x = Computed(), torch.randn(2, 5, 8)
    graph = surgery.trace(model, x)
    assert "with a bias computed in forward" in graph.explain("qkv")
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small.qkv.out_features == 48 and small.inp.out_features < 16


def test_groups_are_kept_whole() -> None:
    model = Grouped()
    small = surgery.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, round_to=1)
    assert small.dw.groups == small.dw.in_channels == small.dw.out_channels == 12
    assert small.dwm.groups == 12 and small.dwm.out_channels == 24
    assert small.gn.num_groups == 3 and small.gn.num_channels == 24
    assert small.gc.in_channels // small.gc.groups == 48 // 4 * 1  # group width kept
    assert small.gc.out_channels // small.gc.groups == 8
    assert small.prelu.num_parameters == small.gc.out_channels


def test_channel_shuffle_pairs_and_exact() -> None:
    model = randomize_norms(Shuffle())
    x = torch.randn(2, 3, 16, 16)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small.a[0].out_channels == 8
    assert small.b.out_channels % 4 == 0  # nn.ChannelShuffle(4) still divides


class GroupedShuffle(torch.nn.Module):
    """ShuffleNet-v1 style: grouped 1x1 conv, channel shuffle by ``self.groups``, depthwise conv,
    grouped 1x1 conv, residual."""

    def __init__(self, c: int = 48, g: int = 3) -> None:
        super().__init__()
        nn = torch.nn
        self.groups = g
        self.g1, self.b1 = nn.Conv2d(c, c, 1, groups=g), nn.BatchNorm2d(c)
        self.dw, self.b2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.g2, self.b3 = nn.Conv2d(c, c, 1, groups=g), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.g1(x)))
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.relu(self.b3(self.g2(self.b2(self.dw(y)))) + x)


def test_grouped_conv_before_a_shuffle_prunes_by_width() -> None:
    """Whole-group pruning would tie every channel to the shuffle's other groups (nothing could
    go); pruned by width instead, each group keeps the same positions, exactly."""
    torch.manual_seed(0)
    nn = torch.nn
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), GroupedShuffle(),
                                          GroupedShuffle(), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten(), nn.Linear(48, 10)))
    x = torch.randn(1, 3, 8, 8)
    graph = surgery.trace(model, x)
    assert any("by width" in n for n in graph.notes)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1, graph=graph)
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).exact_checked
    g1 = small[1].g1
    assert g1.groups == 3 and g1.in_channels < 48 and g1.in_channels % 3 == 0
    assert surgery.count_params(small) < 0.7 * surgery.count_params(model)


def test_layer_scale_and_layernorm_are_shrunk_but_not_exact() -> None:
    model = LayerScale()
    x = torch.randn(1, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert not plan.exact  # a removed channel passed a LayerNorm over channels
    small = surgery.apply(model, plan)
    assert small.scale.shape == (8, 1, 1) and small.scale.requires_grad
    assert small.norm.normalized_shape == (8,) and small.norm.weight.shape == (8,)
    assert small.up.in_features == 8 and small.down.out_features == 8
    assert surgery.verify(model, small, plan, x).output_shapes == ((1, 3, 16, 16),)


def test_train_only_branch_is_coupled() -> None:
    model = TrainOnlyAux()
    x = torch.randn(2, 3, 16, 16)
    graph = surgery.trace(model, x)
    assert graph.train_graph
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small.aux[0].in_channels == small.a[0].out_channels == 8
    small.train()
    out, aux = small(x)
    assert out.shape == (2, 3) and aux.shape == (2, 3)


class _InheritedAux(TrainOnlyAux):
    """the train-only branch lives in the base class's forward; this class's code never
    names the mode."""

    def extra_repr(self) -> str:
        return "inherited"


def test_train_only_branch_in_a_base_class_forward_is_found() -> None:
    graph = surgery.trace(_InheritedAux(), torch.randn(2, 3, 16, 16))
    assert graph.train_graph


def test_the_word_training_in_a_string_does_not_trace_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only code that reads ``training`` can branch on the mode; a message mentioning it cannot,
    so the train-mode forward is not traced again."""
    from surgery import graph as graph_module

    class Said(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.note = "fine-tune after training"  # training

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    traced: list[int] = []
    real = graph_module.fx_trace
    monkeypatch.setattr(graph_module, "fx_trace",
                        lambda *a, **k: traced.append(1) or real(*a, **k))
    surgery.trace(Said(), torch.randn(1, 3, 8, 8))
    assert len(traced) == 1


def _with_aux(x: torch.Tensor, aux: nn.Module, training: bool) -> Any:
    """A plain helper fx traces into: it branches on the mode it is handed."""
    return (x, aux(x)) if training else x


class _ModeToHelper(TrainOnlyAux):
    def forward(self, x: torch.Tensor) -> Any:
        x, aux = _with_aux(self.a(x), self.aux, self.training), None
        if isinstance(x, tuple):
            x, aux = x
        out = self.fc(self.b(x).mean((2, 3)))
        return (out, aux) if aux is not None else out


class _ModeToOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(self.conv(x), 0.1, self.training)
        return F.dropout(y, p=0.1, training=self.training)


def test_the_mode_handed_to_one_op_does_not_trace_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``F.dropout(x, training=self.training)`` changes an argument of one recorded op, not the
    graph: no second trace. Handed to a helper fx traces into, the mode can branch: traced
    again, and the train-only layers are found."""
    from surgery import graph as graph_module

    traced: list[int] = []
    real = graph_module.fx_trace
    monkeypatch.setattr(graph_module, "fx_trace",
                        lambda *a, **k: traced.append(1) or real(*a, **k))
    assert not surgery.trace(_ModeToOp(), torch.randn(1, 3, 8, 8)).train_graph
    assert len(traced) == 1
    graph = surgery.trace(_ModeToHelper(), torch.randn(2, 3, 16, 16))
    assert len(traced) == 3 and graph.train_graph
    small = surgery.prune(_ModeToHelper(), torch.randn(2, 3, 16, 16), ratio=0.5, round_to=1)
    assert small.aux[0].in_channels == small.a[0].out_channels == 8


def test_pinned_io_and_explain() -> None:
    model = PATTERNS["chain"][0]()
    graph = surgery.trace(model, torch.randn(1, 3, 16, 16))
    text = graph.explain("fc")
    assert "fc:out" in text and "model output" in text
    assert "fixed input channels" in graph.explain("a.0")  # the network input's 3 channels
    assert "prunable" in str(graph)


def test_ignore_keeps_layer_outputs() -> None:
    model = PATTERNS["chain"][0]()
    x = torch.randn(1, 3, 16, 16)
    small = surgery.prune(model, x, ratio=0.5, ignore=["a"], round_to=1)
    assert small.a[0].out_channels == 16 and small.b[0].out_channels == 16
    small = surgery.prune(model, x, ratio=0.5, ignore=["re:b\\..*"])
    assert small.a[0].out_channels == 8 and small.b[0].out_channels == 32


def test_round_to() -> None:
    model = PATTERNS["chain"][0]()
    x = torch.randn(1, 3, 16, 16)
    small = surgery.prune(model, x, ratio=0.7, round_to=8)
    assert small.a[0].out_channels == 8 and small.b[0].out_channels == 16


class SharedConv(nn.Module):
    """One conv called twice, the second time under another attribute name: its input and
    output channels are then the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.again = self.mid
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mid(torch.relu(self.a(x))))
        return self.head(torch.relu(self.again(x)))


def test_in_place_variant_and_shared_module() -> None:
    model = PATTERNS["chain"][0]()
    x = torch.randn(1, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    out = surgery.apply_(model, plan)
    assert out is model and model.a[0].out_channels == 8

    model = SharedConv().eval()
    graph = surgery.trace(model, x)
    coupled = next(g for g in graph.groups if "mid:out" in g.slots)
    assert {"a:out", "mid:in", "mid:out", "head:in"} <= set(coupled.slots)  # one group
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    keep = plan.layers["mid"].axes
    assert keep["in"] == keep["out"] == plan.layers["a"].axes["out"]
    for small in (surgery.apply(model, plan), surgery.apply_(copy.deepcopy(model), plan)):
        assert small.again is small.mid and small.mid.weight.shape == (8, 8, 3, 3)
        check = surgery.verify(model, small, plan, x)  # equals the zeroed original
        assert check.passed and check.exact_checked and check.max_rel_error <= rounding(model)


class _Reads(nn.Module):
    """Reads its tensors the ways fx resolves by name: a parameter tied under two names, a
    buffer and a parameter handed to functions, a plain tensor attribute (a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.b.weight = self.a.weight  # tied: fx names it by its first name
        self.scale = nn.Parameter(torch.rand(8))
        self.register_buffer("shift", torch.rand(8))
        self.plain = torch.ones(8)  # neither: fx keeps it as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.b.weight * 2
        h = F.conv2d(x, w) + self.a(x)
        h = h * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return F.batch_norm(h, self.shift, self.plain, training=False)


def test_tracer_names_tensors_as_fx_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer finds a read tensor's name in a table (fx searches the whole model for each
    read); its graph is fx's own, node for node."""
    import importlib

    graph_module = importlib.import_module("surgery.graph")

    def nodes(model: nn.Module) -> list[tuple[str, str, str]]:
        graph = graph_module.fx_trace(model, (), 1)
        return [(n.op, str(n.target), str(n.args)) for n in graph.nodes]

    ours = nodes(_Reads())
    assert ("get_attr", "a.weight", "()") in ours and ("get_attr", "shift", "()") in ours
    assert not any(target == "b.weight" for _, target, _ in ours)
    monkeypatch.delattr(graph_module.LocatingTracer, "getattr")
    monkeypatch.delattr(graph_module.LocatingTracer, "create_arg")
    assert nodes(_Reads()) == ours

