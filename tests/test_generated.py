"""Property: every generated network prunes exactly (or, with a cross-channel norm, with verified
shapes) and still trains, or is refused with a clear error and left unchanged. Never a wrong,
broken or untrainable model, never a modified original."""

from __future__ import annotations

from generated import check, specs
from hypothesis import HealthCheck, given, settings


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs())
def test_generated_networks_prune_or_are_refused(spec: dict) -> None:
    outcome = check(spec)
    assert not outcome.startswith("BUG"), f"{outcome}\nspec: {spec}"


BASE = {"dims": 2, "in_channels": 3, "size": 6, "two_inputs": False, "two_outputs": False,
        "flatten_head": False, "classes": 3, "ratio": 0.5, "criterion": "l2", "round_to": 1}


def test_regression_layer_scale_through_a_view() -> None:
    """``x + gamma.view(1, -1, 1, 1) * f(x)`` pinned the whole residual (found by the fuzzer)."""
    import torch
    from generated import build

    import surgery

    spec = {**BASE, "blocks": [("layer_scale", 16, 0)]}
    assert check(spec) == "exact"
    model, x = build(spec)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert plan.layers["blocks.0.scale"].axes["0"].size == 16
    assert len(plan.layers["blocks.0.scale"].axes["0"].keep) == 8
    assert torch.is_tensor(surgery.apply(model, plan).blocks[0].scale)


def test_regression_refused_layer_leaves_the_model_unchanged() -> None:
    spec = {**BASE, "blocks": [("conv", 8, 0), ("unknown", 8, 0)]}
    assert check(spec) == "refused: UnsupportedLayerError"


def test_regression_layer_scale_viewed_to_an_attribute_shape() -> None:
    """``x * self.scale.view(self.shape)`` with ``self.shape = (C, 1, 1)`` (timm's metaformer
    Scale): the parameter is sliced and the shape attribute rewritten with it; written as a
    literal (``view(16, 1, 1)``) the channels stay instead."""
    import torch
    from torch import nn

    import surgery

    class Scale(nn.Module):
        def __init__(self, c: int, literal: bool = False) -> None:
            super().__init__()
            self.shape = (c, 1, 1)
            self.literal = literal
            self.scale = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.literal:
                return x * self.scale.view(16, 1, 1)
            return x * self.scale.view(self.shape)

    for literal in (False, True):
        model = nn.Sequential(nn.Conv2d(3, 16, 3), Scale(16, literal), nn.ReLU(),
                              nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1))
        x = torch.randn(1, 3, 12, 12)
        small = surgery.prune(model, x, ratio=0.5, round_to=1)  # verified inside
        kept = 16 if literal else 8
        assert small[0].out_channels == kept and small[1].scale.shape == (kept,)
        assert small[1].shape == (kept, 1, 1) and model[1].shape == (16, 1, 1)
        assert small[3].out_channels == 16