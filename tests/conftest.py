from __future__ import annotations

import pytest
import torch

from surgery.console import PREFIX


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give norm layers non-trivial statistics so that dropping a channel is visible."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if getattr(m, "weight", None) is not None and isinstance(
                m, torch.nn.modules.batchnorm._NormBase | torch.nn.GroupNorm | torch.nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} was modified"


def messages(stderr: str) -> list[str]:
    """A command's stderr less the plain progress lines (``... tracing``) it shows where stderr
    is not a terminal: what is left is its errors and warnings."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(PREFIX)]


def rounding(model: torch.nn.Module) -> float:
    """The largest error a passing float32 verification of ``model`` reports: its estimated
    float32 rounding, at least 1e-6 (see surgery.verify)."""
    import importlib

    return max(1e-6, importlib.import_module("surgery.verify").float32_rounding(model))
