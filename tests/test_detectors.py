"""torchvision detectors pruned as whole models: backbone, FPN/neck and heads, through the
executing tracer (their forward iterates over images). Channels that reach the outputs (class,
box, mask, keypoint logits) are pinned by the ops that decode them; the head outputs before
decoding and NMS are compared exactly by verify, since random-weight detectors may detect nothing.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_unchanged, snapshot
from zoo import DETECTORS

import surgery

DEFAULT = DETECTORS[:2]
#: SSD's L2Norm normalises conv4_3 across its channels (F.normalize): pruning them is allowed
#: by default but not exact
NOT_EXACT = {"ssd300_vgg16"}
PARAMS = [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in DETECTORS]


def _targets(name: str) -> list[dict[str, torch.Tensor]]:
    t = {"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 40.0, 200.0, 220.0]]),
         "labels": torch.tensor([1, 2])}
    if name.startswith("maskrcnn"):
        masks = torch.zeros(2, 256, 256, dtype=torch.uint8)
        masks[0, 20:150, 10:120] = 1
        masks[1, 40:220, 60:200] = 1
        t["masks"] = masks
    if name.startswith("keypointrcnn"):
        t["labels"] = torch.tensor([1, 1])
        t["keypoints"] = torch.cat([torch.rand(2, 17, 2) * 100 + 20, torch.ones(2, 17, 1)], 2)
    return [t]


@pytest.mark.parametrize("name", PARAMS)
def test_detector_prunes_as_a_whole_model(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    x = ([torch.rand(3, 256, 256)],)
    before = snapshot(model)
    graph = surgery.trace(model, x)
    assert graph.tracer == "run"
    plan = surgery.plan(model, x, ratio=0.5)
    assert plan.exact == (name not in NOT_EXACT)
    if not plan.exact:  # exact=True keeps the channels a cross-channel norm reads
        plan = surgery.plan(model, x, ratio=0.5, exact=True)
        assert plan.exact
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x, rtol=1e-9)  # float64 decides
    assert report.passed and report.exact_checked and report.max_rel_error < 1e-9
    assert report.layers_compared > 10  # the heads' raw outputs were compared, not only NMS's
    # by default float32 decides: layer by layer where rounding flips a top-k or NMS choice
    quick = surgery.verify(model, small, plan, x)
    assert quick.passed and quick.dtype == "torch.float32" and quick.layers_compared > 10
    assert_unchanged(model, before)
    assert type(small) is type(model)
    assert surgery.count_params(small) < 0.7 * surgery.count_params(model)
    # every part was pruned: backbone, neck (FPN) and head layers all appear in the plan
    parts = {path.split(".")[0] for path in plan.layers}
    assert "backbone" in parts and parts & {"rpn", "roi_heads", "head"}, parts
    with torch.no_grad():
        out = small(*x)
    assert isinstance(out, list) and set(out[0]) == set(model(*x)[0])
    # training with targets still runs and back-propagates
    small.train()
    losses = small([torch.rand(3, 256, 256), torch.rand(3, 256, 256)], _targets(name) * 2)
    sum(losses.values()).backward()
