"""Cross-checks against Torch-Pruning (our peer, used here as an oracle) and against verify()."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import randomize_norms

import surgery
from surgery.plan import AxisPlan, LayerPlan, Plan


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_same_structure_as_torch_pruning(name: str) -> None:
    """Where both tools prune every group uniformly, the pruned sizes must agree exactly."""
    tp = pytest.importorskip("torch_pruning")
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.get_model(name, weights=None)
    ours = surgery.prune(model, x, ratio=0.5, round_to=1)
    theirs = torchvision.models.get_model(name, weights=None)
    fc = [m for m in theirs.modules() if isinstance(m, torch.nn.Linear)][-1]
    tp.pruner.MetaPruner(theirs, x, importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.5, ignored_layers=[fc]).step()
    widths = [(type(m).__name__, getattr(m, "out_channels", None))
              for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [(type(m).__name__, m.out_channels)
                      for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert surgery.count_params(ours) == surgery.count_params(theirs)


def _tamper(plan: Plan, layer: str, axis: str) -> Plan:
    """Keep different channels in one layer than in the rest of its group."""
    layers = dict(plan.layers)
    ap = layers[layer].axes[axis]
    others = [i for i in range(ap.size) if i not in ap.keep]
    keep = tuple(sorted(others[: len(ap.keep)]))
    layers[layer] = LayerPlan(layers[layer].kind, layers[layer].cls,
                              {**layers[layer].axes, axis: AxisPlan(ap.size, keep)})
    return Plan(plan.model_class, plan.fingerprint, layers, plan.exact, plan.settings)


def test_verify_catches_an_inconsistent_plan() -> None:
    model = randomize_norms(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model, x, ratio=0.5)
    bad = _tamper(plan, "layer1.0.bn1", "features")
    small = surgery.apply(model, bad)  # shapes still fit: only verification can tell
    report = surgery.verify(model, small, bad, x, raise_on_failure=False)
    assert not report.passed and report.max_rel_error > 1e-3
    with pytest.raises(surgery.VerificationError, match="differ from the zeroed original"):
        surgery.verify(model, small, bad, x)
