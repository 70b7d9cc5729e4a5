"""Size and cost of a model: parameters and multiply-accumulates (torch's own flop counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .graph import Inputs, as_tuple


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one eval-mode forward (FLOPs / 2, as counted by torch)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return counter.get_total_flops() // 2
