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
    # the counter's module tracker hooks the backward of inputs that require grad, and fails on
    # a parameter passed into a submodule as is (timm's PiT hands its class token on): count
    # with no parameter requiring grad
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)
    return counter.get_total_flops() // 2
