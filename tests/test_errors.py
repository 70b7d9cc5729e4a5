"""Bad input gets a clear error that names the problem, and the model is left untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, snapshot
from patterns import Chain, Residual
from torch import nn

import surgery


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", None, True])
def test_bad_ratio(ratio: object) -> None:
    model = Chain()
    before = snapshot(model)
    with pytest.raises(surgery.ConfigError, match="ratio must be a number in \\[0, 1\\)"):
        surgery.prune(model, torch.randn(1, 3, 16, 16), ratio=ratio)  # type: ignore[arg-type]
    assert_unchanged(model, before)


def test_unknown_criterion() -> None:
    with pytest.raises(surgery.ConfigError, match="unknown criterion 'l7'.*l1"):
        surgery.plan(Chain(), torch.randn(1, 3, 16, 16), ratio=0.5, criterion="l7")


def test_wrong_input_shape() -> None:
    model = Chain()
    model.train()
    before = snapshot(model)
    with pytest.raises(surgery.ExampleInputError, match="node 'a_0'.*example_inputs"):
        surgery.prune(model, torch.randn(1, 4, 16, 16), ratio=0.5)
    assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())


class Weird(nn.Module):
    """A layer with channels that no rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no rule for tensordot
        return torch.tensordot(x, self.weight, dims=([1], [1])).permute(0, 3, 1, 2)


class HasWeird(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 16, 1)
        self.a = nn.Conv2d(16, 8, 1)
        self.weird = Weird()
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.weird(self.a(self.pre(x))))


def test_unknown_layer_with_channels_is_named_with_the_fix() -> None:
    model = HasWeird()
    before = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(surgery.UnsupportedLayerError,
                       match="'weird' \\(Weird\\).*register_module_rule.*ignore=\\['weird'\\]"):
        surgery.prune(model, x, ratio=0.5)
    assert_unchanged(model, before)
    # the fix the message suggests works: the block is kept, channels around it stay
    small = surgery.prune(model, x, ratio=0.5, ignore=["weird"])
    assert small.pre.out_channels == 8 and small.a.out_channels == 8
    assert small.weird.weight.shape == (8, 8)


def test_torch_leaf_without_rule_is_named() -> None:
    class WithBilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.bil = nn.Bilinear(6, 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.bil(y, y)

    with pytest.raises(surgery.UnsupportedLayerError, match="'bil' \\(Bilinear\\)"):
        surgery.trace(WithBilinear(), torch.randn(2, 4))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = y * 2
        return self.b(y)


def test_untraceable_forward_names_the_line() -> None:
    model = DataDependent()
    before = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(surgery.TraceError, match="test_errors.py:\\d+.*if y.sum\\(\\) > 0"):
        surgery.trace(model, x, tracer="fx")
    assert_unchanged(model, before)
    # by default the forward is run instead, and the value-dependent branch is reported
    graph = surgery.trace(model, x)
    assert graph.tracer == "run"
    assert any("reads tensor values" in n and "if y.sum() > 0" in n for n in graph.notes)


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.b(self.a(x)), 1)
        return self.fc(x.view(-1, 32))


def test_hard_coded_view_is_reported_with_line_and_kept() -> None:
    model = HardCoded()
    x = torch.randn(1, 3, 8, 8)
    graph = surgery.trace(model, x)
    why = graph.explain("b")
    assert "hard-coded size (32,)" in why and "x.view(-1, 32)" in why
    with pytest.warns(UserWarning, match="hard-codes their count.*x.view\\(-1, 32\\)"):
        small = surgery.prune(model, x, ratio=0.5)
    assert small.b.out_channels == 32 and small.a.out_channels == 8


def test_a_slice_of_the_channels_is_followed_when_whole_and_kept_when_partial() -> None:
    class Sneaky(HardCoded):
        width = 32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.adaptive_avg_pool2d(self.b(self.a(x)), 1)
            return self.fc(x.flatten(1)[:, : self.width])

    model = Sneaky()
    x = torch.randn(1, 3, 8, 8)
    # a slice as wide as the channels still takes them all once some go: pruned, verified
    small = surgery.prune(model, x, ratio=0.5)
    assert small.b.out_channels == 16 == small.fc.in_features

    class Part(Sneaky):  # a part of them: slicing the channel dim pins them instead
        width = 24

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(24, 10)

    small = surgery.prune(Part(), x, ratio=0.5)
    assert small.b.out_channels == 32


def test_plan_for_another_architecture_is_refused() -> None:
    x = torch.randn(1, 3, 16, 16)
    plan = surgery.plan(Chain(), x, ratio=0.5)
    model = Residual()
    before = snapshot(model)
    with pytest.raises(surgery.PlanError, match="another architecture \\(Chain"):
        surgery.apply(model, plan)
    assert_unchanged(model, before)


def test_malformed_plan_json() -> None:
    with pytest.raises(surgery.PlanError, match="not valid JSON"):
        surgery.Plan.from_json("{nope")
    with pytest.raises(surgery.PlanError, match="not a surgery-plan"):
        surgery.Plan.from_json('{"format": "other"}')
    good = surgery.plan(Chain(), torch.randn(1, 3, 16, 16), ratio=0.5).to_dict()
    good["layers"]["a.0"]["axes"]["out"]["keep"] = [5, 3]
    with pytest.raises(surgery.PlanError, match="'a.0' axis 'out'.*sorted"):
        surgery.Plan.from_dict(good)


def test_plan_inconsistent_with_the_coupled_groups_is_refused(tmp_path) -> None:
    model, x = Chain().eval(), torch.randn(1, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5)
    assert surgery.apply(model, plan, x).a[0].out_channels == 8  # a plan from surgery passes
    doc = plan.to_dict()
    conv = doc["layers"]["a.0"]["axes"]["out"]["keep"]
    bn = doc["layers"]["a.1"]["axes"]["features"]["keep"]
    assert bn == conv and doc["layers"]["b.0"]["axes"]["in"]["keep"] == conv
    # the BatchNorm keeps other channels than its conv (same count: shapes alone would pass)
    doc["layers"]["a.1"]["axes"]["features"]["keep"] = sorted(
        [*conv[:-1], next(i for i in range(16) if i not in conv)])
    bad = surgery.Plan.from_dict(doc)
    before = snapshot(model)
    with pytest.raises(surgery.PlanError, match=r"inconsistent .* coupled channels: it removes "
                       r".* but keeps .*same channel.*surgery\.plan\(model") as e:
        surgery.apply(model, bad, x)
    assert "a.1:features[" in str(e.value) and "a.0:out[" in str(e.value)
    assert_unchanged(model, before)
    surgery.apply(model, bad)  # without example inputs only names and sizes are checked
    # the next conv's input keeps a different count: caught by the same check
    doc = plan.to_dict()
    doc["layers"]["b.0"]["axes"]["in"]["keep"] = conv[:-1]
    with pytest.raises(surgery.PlanError, match=r"removes b\.0:in\[\d+\] but keeps a\.0:out"):
        surgery.apply(model, surgery.Plan.from_dict(doc), x)
    # removing a channel that must stay (the network input)
    doc = plan.to_dict()
    doc["layers"]["a.0"]["axes"]["in"] = {"size": 3, "keep": [0, 1]}
    with pytest.raises(surgery.PlanError, match=r"must stay \(fixed input channels.* a\.0:in"):
        surgery.apply(model, surgery.Plan.from_dict(doc), x)
    # a saved directory whose plan.json was edited and its hash updated to match
    d = surgery.save(tmp_path / "chain", surgery.apply(model, plan), plan,
                     spec="tests/patterns.py:Chain", input_shape=tuple(x.shape))
    (d / "plan.json").write_text(bad.to_json())
    meta = json.loads((d / "artifact.json").read_text())
    meta["files"]["plan.json"] = hashlib.sha256((d / "plan.json").read_bytes()).hexdigest()
    (d / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(surgery.ArtifactError, match=r"plan\.json: the plan is inconsistent.*"
                       r"a\.1:features"):
        surgery.load(d, trust_code=True)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="expected an nn.Module but received str"):
        surgery.trace("resnet", torch.randn(1))  # type: ignore[arg-type]


def test_a_plan_that_removes_almost_nothing_says_why() -> None:
    class Erf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 32, 3)
            self.b = nn.Conv2d(32, 32, 3)
            self.c = nn.Conv2d(32, 8, 3)
            self.d = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.special.erf(self.a(x))  # no rule for erf: a's channels stay
            return self.d(self.c(torch.special.erf(self.b(x))))

    with pytest.warns(UserWarning, match="removes only 0 of .*`special_erf`.*32 channels"):
        plan = surgery.plan(Erf(), torch.randn(1, 3, 12, 12), ratio=0.5)
    assert "test_errors.py" in plan.settings["warnings"][0]


def test_a_model_with_nothing_to_prune_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(surgery.NothingToPruneError, match="no channels that can be removed.*"
                                                           "model output"):
        surgery.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
