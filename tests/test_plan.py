"""The plan is data: JSON round trip, re-applied to a fresh instance gives the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomize_norms

import surgery


def test_json_round_trip_and_reapply_to_fresh_instance(tmp_path) -> None:
    torch.manual_seed(3)
    model = randomize_norms(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model, x, ratio=0.5)
    path = tmp_path / "plan.json"
    plan.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "surgery-plan" and doc["layers"]["conv1"]["axes"]["out"]["size"] == 64
    loaded = surgery.Plan.load(path)
    assert loaded == plan
    # a fresh instance with the same weights gives the same pruned model
    torch.manual_seed(3)
    fresh = randomize_norms(torchvision.models.resnet18(weights=None))
    a, b = surgery.apply(model, plan), surgery.apply(fresh, loaded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_plan_is_deterministic_and_inspectable() -> None:
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 32, 32)
    p1 = surgery.plan(model, x, ratio=0.5)
    p2 = surgery.plan(model, x, ratio=0.5)
    assert p1.to_json() == p2.to_json()
    conv1 = p1.layers["conv1"].axes["out"]
    assert len(conv1.keep) == 32 and conv1.size == 64
    # conv1, bn1 and layer1's residual convs share one group: same kept channels
    assert p1.layers["bn1"].axes["features"].keep == conv1.keep
    assert p1.layers["layer1.0.conv2"].axes["out"].keep == conv1.keep
    assert "fc" in p1.layers and "out" not in p1.layers["fc"].axes  # output pinned


def test_zero_ratio_removes_nothing() -> None:
    model = torchvision.models.resnet18(weights=None)
    plan = surgery.plan(model, torch.randn(1, 3, 32, 32), ratio=0.0)
    assert plan.layers == {} and plan.removed() == 0


def test_l2_keeps_the_largest_channels() -> None:
    from patterns import Chain

    model = Chain()
    with torch.no_grad():
        model.a[0].weight.mul_(0.01)
        model.a[0].weight[[1, 4, 9]] *= 1000  # make three channels dominate
        model.a[1].weight[[1, 4, 9]] = 5.0
    plan = surgery.plan(model, torch.randn(1, 3, 16, 16), ratio=0.5)
    assert {1, 4, 9} <= set(plan.layers["a.0"].axes["out"].keep)


def test_chained_plans_equal_one_plan_on_the_original() -> None:
    model = randomize_norms(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32)
    first = surgery.plan(model, x, ratio=0.25, round_to=1)
    mid = surgery.apply(model, first)
    second = surgery.plan(mid, x, ratio=0.5, round_to=1)
    twice = surgery.apply(mid, second)
    once = surgery.apply(model, first.then(second))
    a, b = twice.state_dict(), once.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert once.conv1.out_channels == 24  # 64 -> 48 -> 24
    with pytest.raises(surgery.PlanError, match="cannot chain plans"):
        second.then(first)


def test_mac_target() -> None:
    model = torchvision.models.mobilenet_v2(weights=None)
    x = torch.randn(1, 3, 64, 64)
    plan = surgery.plan_for_macs(model, x, target_macs=0.5, round_to=1)
    small = surgery.apply(model, plan)
    kept = surgery.count_macs(small, x) / surgery.count_macs(model, x)
    assert 0.45 < kept <= 0.5
    with pytest.raises(surgery.ConfigError, match="exactly one of ratio= or target_macs="):
        surgery.prune(model, x, ratio=0.5, target_macs=0.5)


def test_bn_scale_uses_gamma_and_falls_back_without_norms() -> None:
    from patterns import Chain

    model = Chain()
    with torch.no_grad():
        model.a[1].weight.fill_(0.1)
        model.a[1].weight[[2, 5]] = 3.0  # BatchNorm scale marks channels 2 and 5
    x = torch.randn(1, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5, criterion="bn_scale", round_to=1)
    assert {2, 5} <= set(plan.layers["a.0"].axes["out"].keep)
    # fc1 -> fc2 has no norm layer: L1 decides there instead of ties
    from patterns import FlattenLinear

    model = FlattenLinear()
    with torch.no_grad():
        model.fc1.weight[[0, 1]] *= 100  # ties would drop the first units
    plan = surgery.plan(model, x, ratio=0.5, criterion="bn_scale", round_to=1)
    assert {0, 1} <= set(plan.layers["fc1"].axes["out"].keep)


def test_mac_target_lands_close_even_where_rounding_is_coarse() -> None:
    """resnet20's 16-channel groups round to 8 or 16 at round_to=8: the MACs jump from ~55% to
    ~27%. The search then takes finer steps and says so, instead of landing far below."""
    from models.cifar import resnet20

    model = resnet20()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="used round_to=1"):
        plan = surgery.plan_for_macs(model, x, target_macs=0.5)
    kept = surgery.count_macs(surgery.apply(model, plan), x) / surgery.count_macs(model, x)
    assert 0.45 <= kept <= 0.5 and plan.settings["macs_kept"] == pytest.approx(kept, abs=1e-3)
    assert "round_to=1" in plan.settings["warnings"][0]


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_column_sums_read_in_place_equal_the_copied_rows(p: float) -> None:
    """A layer's input columns are scored from a view (no copy); the sums are those of the
    copied rows, in one block or several (a 4096 x 2048 matrix is split)."""
    from surgery.criteria import powered_row_sums
    from surgery.rules import module_rule

    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(96, 160, 3), torch.nn.Conv2d(64, 2048, 1),
              torch.nn.Linear(2048, 4096), torch.nn.Conv2d(8, 8, 3)]
    for m in layers:
        rule = module_rule(m)
        assert rule is not None
        view = rule.importance(m, "in")
        rows = rule.weight_rows(m, "in").contiguous()
        want = torch.linalg.vector_norm(rows.double(), p, dim=1).pow(p).numpy()
        assert view.shape[0] == rows.shape[0]
        np.testing.assert_allclose(powered_row_sums(view, p), want, rtol=1e-5)
