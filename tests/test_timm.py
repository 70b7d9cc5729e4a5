"""timm models, built with pretrained=False at their default input size, prune as whole models.

The list is a sample of the architectures timm users bring (BatchNormAct2d, Conv2dSame, GroupNorm1,
layer scale, SE/ECA/GC gates, CSP splits, RepVGG-style blocks, MobileViT, halo attention ...): the
point is the mechanism (rules on the tensors functional ops read, and the executing tracer where
fx cannot trace), not the list.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, rounding, snapshot
from zoo import TIMM_40, TIMM_ATTENTION, TIMM_ATTENTION_HELD, TIMM_HEADS_KEPT

import surgery

timm = pytest.importorskip("timm")

#: the default suite: small ones covering each mechanism (tf_efficientnetv2_b0 and
#: mobilevitv2_050 need the executing tracer)
DEFAULT = ["mobilenetv2_050", "efficientnet_lite0", "tf_efficientnetv2_b0", "mobilevitv2_050",
           "hgnetv2_b0", "cs3darknet_s", "repvit_m0_9", "starnet_s1", "convnextv2_atto",
           "legacy_seresnet18"]

PARAMS = [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in TIMM_40]


def test_default_subset_is_in_the_list() -> None:
    assert set(DEFAULT) <= set(TIMM_40) and len(DEFAULT) == 10 and len(TIMM_40) == 40


@pytest.mark.parametrize("name", PARAMS)
def test_timm_model_prunes(name: str) -> None:
    torch.set_num_threads(1)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    before = snapshot(model)
    graph = surgery.trace(model, x)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed
    # values compared wherever no cross-channel op (LayerNorm, GroupNorm over one group) is on a
    # pruned axis, or each such op runs on the kept channels alone in the reference
    assert report.exact_checked == plan.checks_values
    if report.exact_checked:
        assert report.max_rel_error <= rounding(model)
    assert_unchanged(model, before)
    assert type(small) is type(model)
    assert surgery.count_params(small) < 0.9 * surgery.count_params(model), graph.tracer
    small.train()
    out = small(torch.randn(2, *x.shape[1:]))
    out.float().pow(2).mean().backward()


def test_executing_tracer_is_used_only_where_fx_fails() -> None:
    fx_ok = timm.create_model("mobilenetv2_050", pretrained=False)
    needs_run = timm.create_model("tf_efficientnetv2_b0", pretrained=False)  # Conv2dSame pads
    x = torch.randn(1, 3, 64, 64)
    assert surgery.trace(fx_ok, x).tracer == "fx"
    graph = surgery.trace(needs_run, x)
    assert graph.tracer == "run" and "torch.fx" in graph.notes[0]
    # both tracers agree where both work
    a, b = surgery.trace(fx_ok, x, tracer="fx"), surgery.trace(fx_ok, x, tracer="run")
    assert [(g.slots, len(g.units)) for g in a.groups] == [(g.slots, len(g.units))
                                                          for g in b.groups]


def test_timm_spec_builds_without_downloading() -> None:
    model = surgery.spec.build_model("timm:resnet18", {"num_classes": 7})
    assert model.fc.out_features == 7
    with pytest.raises(surgery.spec.SpecError, match="no model 'nonet'"):
        surgery.spec.build_model("timm:nonet")
    with pytest.raises(surgery.spec.SpecError, match="pretrained must stay False"):
        surgery.spec.build_model("timm:resnet18", {"pretrained": True})


ATTENTION_DEFAULT = ["deit_tiny_patch16_224", "levit_128s", "coatnet_nano_rw_224", "botnet26t_256"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ATTENTION_DEFAULT else
                                               pytest.mark.slow) for n in TIMM_ATTENTION])
def test_timm_transformer_prunes_heads_and_mlps(name: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    before = snapshot(model)
    graph = surgery.trace(model, x)
    plan = surgery.plan(model, x, ratio=0.5, graph=graph)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked == plan.checks_values
    assert_unchanged(model, before)
    assert surgery.count_params(small) < 0.8 * surgery.count_params(model)
    heads = [(k, a, b) for k, a, b in plan.attribute_changes() if k.endswith("num_heads")]
    widths = [(k, a, b) for k, a, b in plan.attribute_changes() if (k, a, b) not in heads]
    if name in TIMM_ATTENTION_HELD:  # attention stays whole; the reason names the line
        assert not heads and not widths
        assert any(".py:" in why for why, _ in graph.pin_summary(3))
    elif name in TIMM_HEADS_KEPT:  # every head stays, each loses width (why: tests/zoo.py)
        narrowed = [n for n, m in model.named_modules() if hasattr(m, "num_heads") and
                    surgery.count_params(small.get_submodule(n)) < surgery.count_params(m)]
        assert not heads and (widths or narrowed) and all(1 <= b < a for _, a, b in widths)
    else:
        assert heads and all(1 <= b < a for _, a, b in heads)
        for k, _, b in heads:  # the rewritten attribute is what the module now holds
            owner, _, attr = k.rpartition(".")
            assert getattr(small.get_submodule(owner), attr) == b
    small.train()
    small(torch.randn(2, *x.shape[1:])).float().pow(2).mean().backward()


def test_split_attention_with_grouped_convs_traces() -> None:
    """ResNeSt's split attention: grouped convs whose groups meet again; comparing the two
    analyses (whole groups, by width) must handle pinned channel grids."""
    model = timm.create_model("resnest26d", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).exact_checked
