"""Every torchvision classifier (conv nets and transformers) prunes at ratio 0.5 with L2: same
outputs (exact where defined), fewer params and MACs, still trainable.

The default suite runs a subset that spans every coupling pattern; ``./run slow`` runs the zoo.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, randomize_norms, snapshot
from zoo import DEFAULT, TRANSFORMERS, build, classifiers

import surgery

ALL = classifiers()
PARAMS = [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in ALL]


def _structure(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return ("tensor", out.shape[1:])
    if isinstance(out, tuple | list):
        return (type(out).__name__, [_structure(o) for o in out])
    return type(out).__name__


def test_default_subset_is_in_the_zoo() -> None:
    assert set(DEFAULT) <= set(ALL) and len(DEFAULT) >= 15 and len(ALL) >= 80


@pytest.mark.parametrize("name", PARAMS)
def test_zoo_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    model, x = build(name)
    randomize_norms(model)
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, criterion="l2")
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed, report.message
    # exact unless a LayerNorm over channels is on a pruned axis: convnext, transformer
    # embeddings; then the reference runs it on the kept channels, and values are still compared,
    # except where a scale is computed from the head width (swin v1: (C // heads) ** -0.5)
    assert plan.exact or name.startswith(("convnext", *TRANSFORMERS))
    assert report.exact_checked == plan.checks_values
    assert report.exact_checked or name in ("swin_t", "swin_s", "swin_b"), report.checked
    assert_unchanged(model, before)
    # swin and maxvit keep their attention (see zoo.TRANSFORMERS): MLPs only
    most = 0.75 if name.startswith(TRANSFORMERS) else 0.6
    assert surgery.count_params(small) < most * surgery.count_params(model)
    assert surgery.count_macs(small, x) < most * surgery.count_macs(model, x)
    # training still works, with the same output structure as the original (aux heads included)
    xb = torch.cat([x, x])
    model.train()
    small.train()
    with torch.no_grad():
        assert _structure(small(xb)) == _structure(model(xb))
