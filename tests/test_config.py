"""Typed prune configs: one object per strategy, JSON round trip, recorded in the plan, per-layer
overrides; plans written before configs existed still load and re-apply."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import surgery
from surgery.config import config_from_dict

FIXTURES = Path(__file__).parent / "fixtures"


def _resnet18() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("config", [
    surgery.Uniform(0.5),
    surgery.Uniform(0.3, criterion="l1", round_to=1, ignore=("fc",), overrides={"re:^layer4": 0.1}),
    surgery.MacBudget(0.25, exact=True),
    surgery.RuntimeAware(0.5, runtime="torch", threads=2, budget="latency"),
    surgery.RuntimeAware(0.5, depth=True, compare=False),
])
def test_configs_round_trip_through_json(config: surgery.PruneConfig) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert config_from_dict(data) == config and data["kind"] == type(config).__name__


@pytest.mark.parametrize(("make", "message"), [
    (lambda: surgery.Uniform(1.0), "ratio must be a number in [0, 1) but received 1.0"),
    (lambda: surgery.MacBudget(0.0), "keep (the fraction of MACs kept) must be in (0, 1)"),
    (lambda: surgery.Uniform(0.5, round_to=0), "round_to must be a positive int"),
    (lambda: surgery.Uniform(0.5, overrides={"layer1": 1.5}), "overrides['layer1'] must be"),
    (lambda: surgery.Uniform(0.5, overrides={"re:(": 0.5}), "is not a valid regex"),
    (lambda: surgery.RuntimeAware(0.5, overrides={"fc": 0.0}), "overrides work with Uniform"),
    (lambda: surgery.RuntimeAware(0.5, compare="yes"), "compare must be True or False"),
    (lambda: config_from_dict({"kind": "Magic"}), "expected a dict with kind one of"),
    (lambda: config_from_dict({"kind": "Uniform", "ratio": 0.5, "speed": 3}),
     "Uniform has no setting speed"),
])
def test_bad_configs_name_the_setting(make, message: str) -> None:
    with pytest.raises(surgery.ConfigError) as e:
        make()
    assert message in str(e.value)


def test_a_config_plans_like_the_keywords_and_the_plan_records_it() -> None:
    model, x = _resnet18()
    by_config = surgery.plan(model, x, surgery.Uniform(0.5))
    by_keywords = surgery.plan(model, x, ratio=0.5)
    assert by_config.to_json() == by_keywords.to_json()
    recorded = config_from_dict(by_config.settings["config"])
    assert recorded == surgery.Uniform(0.5)
    # re-made from what it recorded: the same plan
    assert surgery.plan(model, x, recorded).layers == by_config.layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget = surgery.plan(model, x, surgery.MacBudget(0.3))
    assert budget.settings["config"]["kind"] == "MacBudget" and budget.settings["macs_kept"] <= 0.3
    with pytest.raises(surgery.ConfigError, match="expected a prune config"):
        surgery.plan(model, x, 0.5)  # type: ignore[arg-type]


def test_overrides_set_the_ratio_of_the_groups_a_layer_is_in() -> None:
    model, x = _resnet18()
    plan = surgery.plan(model, x, surgery.Uniform(0.5, overrides={"layer1.0.conv1": 0.0,
                                                                  "re:layer4\\..*conv1": 0.25}))
    assert "layer1.0.conv1" not in plan.layers  # its group stays whole
    assert len(plan.layers["layer1.1.conv1"].axes["out"].keep) == 32  # the others: half
    assert len(plan.layers["layer4.0.conv1"].axes["out"].keep) == 384  # a quarter removed
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).passed


def test_prune_takes_a_config() -> None:
    model, x = _resnet18()
    small = surgery.prune(model, x, surgery.Uniform(0.5, round_to=1))
    assert small.layer1[0].conv1.out_channels == 32


@pytest.mark.parametrize(("fixture", "make"), [
    ("plan_resnet18_r0.5.json", lambda: torchvision.models.resnet18(weights=None)),
    ("plan_vit_tiny_depth2_exact.json",
     lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)),
])
def test_plans_written_before_configs_load_and_reapply(fixture: str, make) -> None:
    """Golden plans written by the code before this change (no ``config`` in their settings)."""
    plan = surgery.Plan.load(FIXTURES / fixture)
    assert "config" not in plan.settings
    model, x = make().eval(), torch.randn(1, 3, 64, 64)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked
    assert surgery.count_params(small) < surgery.count_params(model)
    for path, layer in plan.layers.items():
        for axis, ap in layer.axes.items():
            assert len(ap.keep) < ap.size, (path, axis)
    for path, before, after in plan.attribute_changes():  # num_heads 3 -> 2 ...
        owner, _, name = path.rpartition(".")
        assert getattr(small.get_submodule(owner), name) == after < before
