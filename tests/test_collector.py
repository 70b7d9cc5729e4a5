"""Memory and the cyclic garbage collector: surgery's copies are freed by reference counting,
and the collector is paused while a phase works (and only then)."""

from __future__ import annotations

import gc
import os
import sys
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import surgery


class _Centred(nn.Module):
    """Statistics over the features in the forward: a kept-channel call site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32),
                         _Centred(), nn.Linear(32, 3)).eval()


@pytest.fixture
def collecting() -> Iterator[None]:
    """The collector enabled (as in a user's process) and as it was afterwards."""
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


_PACKAGE = os.path.dirname(surgery.__file__)
#: the pause itself, the lazy attribute lookup, and reading the settings before a phase starts
_OUTSIDE = ("collector.py", "__init__.py", "api.py", "config.py", "runtimes.py")


def _in_surgery() -> str:
    """Where surgery's engine is running below this frame."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE) and os.path.basename(path) not in _OUTSIDE:
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return ""


def test_no_collection_runs_while_a_phase_works(collecting: None) -> None:
    during: list[str] = []
    outside: list[str | int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            where = _in_surgery()
            (during if where else outside).append(where or info["generation"])

    model, x = _model(), torch.randn(1, 5, 6)
    surgery.prune(model, x, ratio=0.5)  # imports surgery's modules (module code is not a phase)
    threshold = gc.get_threshold()
    gc.set_threshold(1, 10**6, 10**6)  # a young collection at (nearly) every allocation
    gc.callbacks.append(seen)
    try:
        graph = surgery.trace(model, x)
        plan = surgery.plan(model, x, ratio=0.5, graph=graph)
        small = surgery.apply(model, plan)
        report = surgery.verify(model, small, plan, x)
        small(x)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
    assert report.passed and report.kept_sites  # the reference ran the kept-channel sites
    assert not during, during[:5]
    assert outside  # the collector ran between the phases and in the user's own forward
    assert gc.isenabled()


def test_enabled_again_after_a_failure_and_left_off_if_the_caller_turned_it_off(
        collecting: None) -> None:
    model = _model()
    with pytest.raises(surgery.ExampleInputError):
        surgery.prune(model, torch.randn(1, 5, 7), ratio=0.5)  # wrong channel count
    assert gc.isenabled()
    gc.disable()
    surgery.prune(model, torch.randn(1, 5, 6), ratio=0.5)
    assert not gc.isenabled()


def test_prune_reuses_a_traced_graph(collecting: None) -> None:
    model, x = _model(), torch.randn(1, 5, 6)
    graph = surgery.trace(model, x)
    small = surgery.prune(model, x, ratio=0.5, graph=graph)
    assert small[0].out_features == 16


def _cyclic_garbage() -> list[object]:
    """The objects only the cyclic collector would free (found, then freed here)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


def test_models_and_tensors_are_freed_without_the_cyclic_collector(collecting: None) -> None:
    model, x = _model(), torch.randn(1, 5, 6)
    plan = surgery.plan(model, x, ratio=0.5)
    gc.collect()
    gc.disable()  # only reference counting from here
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)  # builds and drops a reference copy
    assert report.passed and report.kept_sites
    gone = weakref.ref(small)
    del small
    assert gone() is None  # the pruned model is freed as soon as it is dropped
    left = [o for o in _cyclic_garbage() if isinstance(o, nn.Module | torch.Tensor)
            or type(o).__module__.startswith("surgery.")]
    assert not left, f"modules, tensors or surgery's objects in reference cycles: {left[:3]}"
