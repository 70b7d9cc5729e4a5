"""Train-mode analysis: a second whole-model trace only where the modes can trace differently.

Modules whose code branches on ``training`` are traced alone, one of each kind, in both modes;
the whole model is traced again only if those differ (a train-only layer), and the plan then
covers the layers only the train forward uses.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import DEFAULT, TIMM_40, TIMM_ATTENTION, build

import surgery
import surgery.graph as graph_module
from surgery.errors import TraceError
from surgery.train_mode import _kind, mentions_training, same_in_train_mode, signature


class CountingNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (timm's BatchNormAct2d style): in train mode it
    counts batches, a side effect that feeds no output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else self.running_mean is None
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, bn_training, 0.1, self.eps))


class TrainOnlyBranch(nn.Module):
    """Adds a layer's output only in train mode, and only where the caller asks for it: the
    train forward reads a layer that the eval one never calls."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.extra = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        y = self.conv(x)
        if self.training and extra:
            y = y + self.extra(x)
        return y


class Net(nn.Module):
    def __init__(self, block: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = CountingNorm(16)
        self.mid = nn.Conv2d(16, 32, 3, padding=1)
        self.n2 = CountingNorm(32)
        self.n3 = CountingNorm(32)
        self.block = block(32) if block is not None else None
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n2(self.mid(self.n1(self.stem(x))))
        x = self.n3(x)
        if self.block is not None:
            x = self.block(x, extra=True)  # called alone with its defaults, it never branches
        return self.head(x.mean((2, 3)))

    def reset_head(self, n: int) -> None:  # reads the mode outside forward: does not count
        self.head = nn.Linear(32, n).train(self.training)


def _fx_traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The roots of every whole-model fx trace from now on."""
    seen: list[str] = []
    real = graph_module.fx_trace

    def counting(model: nn.Module, *args: Any, **kwargs: Any) -> torch.fx.Graph:
        seen.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(graph_module, "fx_trace", counting)
    return seen


def test_a_mode_read_for_side_effects_costs_no_second_whole_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    eval_graph = graph_module.fx_trace(model, (), 1)
    tracer = lambda names: graph_module._Tracer((), names)  # noqa: E731
    assert same_in_train_mode(model, eval_graph, graph_module._CALLS[eval_graph], tracer)
    model.eval()  # the check leaves the norms in train mode: trace() puts every flag back
    traces = _fx_traces(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = surgery.prune(model, x, ratio=0.5)
    assert traces == ["Net"]  # the eval trace only
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert small.mid.out_channels < 32 and not model.training
    small.train()(torch.randn(2, 3, 16, 16))  # the pruned model trains


def test_a_train_only_layer_is_found_and_pruned_with_its_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Net(TrainOnlyBranch).eval()
    x = torch.randn(1, 3, 16, 16)
    eval_graph = graph_module.fx_trace(model, (), 1)
    tracer = lambda names: graph_module._Tracer((), names)  # noqa: E731
    calls = graph_module._CALLS[eval_graph]
    assert not same_in_train_mode(model.train(), eval_graph, calls, tracer)
    model.eval()
    traces = _fx_traces(monkeypatch)
    plan = surgery.plan(model, x, ratio=0.5)
    assert traces == ["Net", "Net"]  # eval, then the whole model in train mode
    small = surgery.apply(model, plan)
    # the train-only 1x1 conv reads and writes the group of block.conv's output (the add)
    assert small.block.extra.in_channels == small.block.conv.in_channels < 32
    assert small.block.extra.out_channels == small.block.conv.out_channels < 32
    small.train()(torch.randn(2, 3, 16, 16))


def test_only_code_the_models_forward_reaches_counts_for_the_model_itself() -> None:
    assert mentions_training(Net)  # reset_head reads self.training
    assert not mentions_training(Net, "forward")
    assert mentions_training(TrainOnlyBranch, "forward")
    assert mentions_training(CountingNorm)  # branches on the mode (for a side effect)


def test_a_kind_is_class_settings_and_children_not_weights() -> None:
    a, b, c = CountingNorm(16), CountingNorm(16), CountingNorm(16, eps=1e-3)
    with torch.no_grad():
        b.weight.mul_(3)
    assert _kind(a) == _kind(b)  # weights differ: the same symbolic trace
    assert _kind(a) != _kind(c)  # a setting differs
    assert _kind(a) != _kind(CountingNorm(16, affine=False))  # no weight: `if weight is None`
    hooked = CountingNorm(16)
    hooked.register_forward_hook(lambda m, i, o: None)
    assert _kind(a) != _kind(hooked)


class OptionalAux(nn.Module):
    """Adds a train-only layer where ``aux`` is set, read in a helper its forward calls."""

    def __init__(self, c: int, aux: int) -> None:
        super().__init__()
        self.aux, self.conv, self.extra = aux, nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def uses_extra(self) -> bool:
        return self.training and self.aux > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.extra(x) if self.uses_extra() else y


def test_settings_the_forward_never_reads_make_no_kinds() -> None:
    """CountingNorm's forward reads eps, not num_features: one kind for every width (a symbolic
    trace cannot tell them apart), but not for another eps."""
    assert _kind(CountingNorm(16)) == _kind(CountingNorm(32))
    assert _kind(CountingNorm(16)) != _kind(CountingNorm(16, eps=1e-3))
    # read in a method the forward reaches: a kind of its own
    assert _kind(OptionalAux(8, 0)) != _kind(OptionalAux(8, 1))
    assert _kind(OptionalAux(8, 0)) == _kind(OptionalAux(16, 0))  # c sizes layers only

    class HandsItOn(CountingNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _norm(self, x)  # what it reads is not in its own code: every setting counts

    assert _kind(HandsItOn(16)) != _kind(HandsItOn(32))
    patched = CountingNorm(16)
    patched.forward = lambda x: x  # type: ignore[method-assign]  # its own forward runs
    assert _kind(patched) != _kind(CountingNorm(16))

    class ReadsIntoChild(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.norm = CountingNorm(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x) * self.norm.num_features  # reads the child's unread setting

    assert _kind(ReadsIntoChild(16)) != _kind(ReadsIntoChild(32))


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * m.num_features


def test_a_train_only_layer_behind_a_setting_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two blocks alike but for ``aux``: the one with the train-only layer is traced alone as a
    kind of its own, so the whole model is traced again and its layer is pruned."""

    class TwoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a, self.b = OptionalAux(16, 0), OptionalAux(16, 1)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(self.a(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = TwoBlocks().eval()
    traces = _fx_traces(monkeypatch)
    small = surgery.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5)
    assert traces == ["TwoBlocks", "TwoBlocks"]
    assert small.b.extra.in_channels == small.b.conv.in_channels < 16
    small.train()(torch.randn(2, 3, 16, 16))


def _zoo_model(name: str) -> nn.Module:
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[5:], pretrained=False)
    return build(name)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*DEFAULT, *(f"timm:{n}" for n in (*TIMM_40, *TIMM_ATTENTION))])
def test_same_in_train_mode_is_never_wrong_on_the_zoo(name: str) -> None:
    """Where the check says the train forward traces to the eval one's ops, a whole train-mode
    trace must agree (one of each kind stands for the others)."""
    torch.manual_seed(0)
    model = _zoo_model(name).eval()
    try:
        eval_graph = graph_module.fx_trace(model, (), 1)
    except TraceError:
        pytest.skip("fx cannot trace it (the executing tracer retraces in train mode)")
    tracer = lambda names: graph_module._Tracer((), names)  # noqa: E731
    if not same_in_train_mode(model.train(), eval_graph, graph_module._CALLS[eval_graph], tracer):
        return  # undecided or different: the whole model is traced again anyway
    assert signature(graph_module.fx_trace(model.train(), (), 1)) == signature(eval_graph)


def test_a_class_without_source_is_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model class typed into a REPL (``__main__`` without a file) has no source: which of
    its code reads ``self.training`` is unknown, so both modes are traced."""
    import sys
    import types

    generated = types.ModuleType("__main__")  # a REPL's: no file
    monkeypatch.setitem(sys.modules, "__main__", generated)
    scope = vars(generated)
    scope.update(nn=nn, torch=torch)
    exec(compile("class Net(nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)\n"
                 "    def forward(self, x):\n"
                 "        return self.b(torch.relu(self.a(x)))\n", "<generated>", "exec"), scope)
    model = scope["Net"]().eval()
    x = torch.randn(1, 3, 4, 4)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert surgery.verify(model, surgery.apply(model, plan), plan, x).exact_checked
