"""torch.nn.utils.prune masks -> a physically smaller, equivalent model."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as tprune
from conftest import randomize_norms
from patterns import Chain, Residual, cbr
from torch import nn

import surgery


class PointwiseHead(nn.Module):
    """3x3 conv -> BN -> ReLU -> 1x1 conv: no padding after the masked channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def test_masked_channels_removed_and_bn_constant_folded() -> None:
    model = randomize_norms(PointwiseHead()).eval()
    tprune.ln_structured(model.a[0], "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(2, 3, 12, 12)
    small, report = surgery.from_masks(model, x)
    assert small.a[0].out_channels == 8 and small.b.in_channels == 8
    assert report.removed == {"a.0": 8} and report.folded == 1
    # BatchNorm turned the masked channels into nonzero constants; folding makes it exact
    assert report.exact and report.max_rel_error < 1e-5
    assert hasattr(model.a[0], "weight_mask")  # the masked model is untouched
    assert not hasattr(small.a[0], "weight_mask")


def test_padding_sees_zero_not_the_constant() -> None:
    model = randomize_norms(Chain()).eval()
    tprune.ln_structured(model.a[0], "weight", amount=0.5, n=1, dim=0)
    small, report = surgery.from_masks(model, torch.randn(2, 3, 16, 16))
    assert small.a[0].out_channels == 8
    assert report.folded == 1 and 0 < report.max_rel_error < 0.2 and not report.exact


def test_silent_masked_channels_are_exact() -> None:
    model = Chain().eval()  # fresh BatchNorm: beta = 0, mean = 0, so masked channels output 0
    tprune.ln_structured(model.b[0], "weight", amount=0.25, n=2, dim=0)
    small, report = surgery.from_masks(model, torch.randn(2, 3, 16, 16))
    assert small.b[0].out_channels == 24 and small.fc.in_features == 24
    assert report.exact and report.folded == 0


def test_disagreeing_group_members_are_kept_and_explained() -> None:
    model = Residual().eval()
    tprune.ln_structured(model.b1[0], "weight", amount=0.5, n=2, dim=0)  # stem is not masked
    small, report = surgery.from_masks(model, torch.randn(1, 3, 16, 16))
    assert small.b1[0].out_channels == 16
    assert any("stem.0" in why and "kept" in why for why in report.kept)
