"""Parameter-free modules that keep channels where they are (activations, pools, dropout, ...),
plus the few that move them (Flatten, Softmax, ChannelShuffle, PixelShuffle) and PReLU, whose
weight is per channel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..groups import TVal
from . import ModuleRule, clone_module, passthrough, register_module_rule, set_tensor
from .context import RuleContext
from .functions import pixel_shuffled, reshape

#: parameter-free layers whose output is shaped as their input (not pools, pads, resizes)
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)


class PassthroughRule(ModuleRule):
    types = (
        *_ELEMENTWISE, nn.MaxPool1d,
        nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d,
        nn.LPPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
        nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
        nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
        nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.ReplicationPad3d,
    )

    def propagate(self, ctx: RuleContext, path: str, m: nn.Module, inputs: list[Any],
                  out: Any) -> Any:
        return passthrough(ctx, inputs[0], out)

    def keeps_shape(self, m: nn.Module, x: torch.Tensor) -> bool:
        return isinstance(m, _ELEMENTWISE) and x.is_floating_point()


class FlattenRule(ModuleRule):
    types = (nn.Flatten,)

    def propagate(self, ctx: RuleContext, path: str, m: nn.Module, inputs: list[Any],
                  out: Any) -> Any:
        return reshape(ctx, inputs[0], out, None, "nn.Flatten")


_Softmax = nn.Softmax | nn.LogSoftmax | nn.Softmin


class SoftmaxRule(ModuleRule[_Softmax]):
    types = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

    def propagate(self, ctx: RuleContext, path: str, m: _Softmax, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        if isinstance(x, TVal) and x.tracked and (m.dim is None or m.dim % x.ndim in x.tdims):
            return ctx.opaque([x], out, "softmax over channels")
        return passthrough(ctx, x, out)


class ChannelShuffleRule(ModuleRule[nn.ChannelShuffle]):
    """(N, C, ...) viewed as (N, g, C/g, ...), transposed, flattened back; g is fixed."""

    types = (nn.ChannelShuffle,)

    def propagate(self, ctx: RuleContext, path: str, m: nn.ChannelShuffle, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        if not isinstance(x, TVal) or x.tdims != (1,):
            return passthrough(ctx, x, out)
        g = m.groups
        grid = x.atoms.reshape(g, -1)
        for j in range(1, g):  # g is a constant: prune the same column of every row
            ctx.uf.union_arrays(grid[0], grid[j])
        return TVal(out.shape, (1,), grid.T.reshape(-1).copy())


class PixelShuffleRule(ModuleRule):
    """Sub-pixel upsampling (r*r channels make one at r x r positions) and its reverse."""

    types = (nn.PixelShuffle, nn.PixelUnshuffle)

    def propagate(self, ctx: RuleContext, path: str, m: nn.Module, inputs: list[Any],
                  out: Any) -> Any:
        if isinstance(m, nn.PixelShuffle):
            return pixel_shuffled(ctx, inputs[0], m.upscale_factor, out, True)
        assert isinstance(m, nn.PixelUnshuffle)  # the rule's types
        return pixel_shuffled(ctx, inputs[0], m.downscale_factor, out, False)


class PReLURule(ModuleRule[nn.PReLU]):
    types = (nn.PReLU,)
    axes = ("features",)
    param_axes = {"weight": ("features", 0)}

    def propagate(self, ctx: RuleContext, path: str, m: nn.PReLU, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        if m.num_parameters == 1:
            return passthrough(ctx, x, out)
        cdim = 1 if x.ndim > 1 else 0
        atoms = ctx.slot(path, "features", ctx.channels_in(x, cdim, m.num_parameters))
        return TVal(out.shape, (cdim,), atoms)

    def shrink(self, m: nn.PReLU, keep: dict[str, torch.Tensor]) -> nn.PReLU:
        new = clone_module(m)
        set_tensor(new, "weight", m.weight.detach()[keep["features"]])
        new.num_parameters = len(keep["features"])
        return new

    def importance(self, m: nn.PReLU, axis: str) -> torch.Tensor:
        return m.weight.detach().reshape(-1, 1)


for _rule in (PassthroughRule(), FlattenRule(), SoftmaxRule(), ChannelShuffleRule(),
              PixelShuffleRule(), PReLURule()):
    register_module_rule(_rule)
