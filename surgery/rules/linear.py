"""Linear layers.

Math. ``y = x W^T + b`` with ``W[out, in]`` over the last dim of ``x``. Removing output feature
``o`` drops ``W[o]`` and ``b[o]``; removing input feature ``i`` drops column ``W[:, i]``. After a
``flatten`` each channel owns ``H*W`` consecutive input features, which the tracer maps to the
channel's unit, so a channel removed upstream removes all of its columns here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..groups import TVal
from . import (
    ModuleRule,
    clone_module,
    register_module_rule,
    runs_own_forward,
    set_tensor,
    take_rows_cols,
)
from .context import RuleContext
from .cost import LinearCost, weight_macs


class LinearRule(ModuleRule[nn.Linear]):
    types = (nn.Linear,)
    cost = LinearCost()  # MACs and a one-layer runner (latency-aware allocation)
    axes = ("in", "out")
    own_tensors = ("weight", "bias")
    param_axes = {"weight": ("out", 0), "bias": ("out", 0)}

    def propagate(self, ctx: RuleContext, path: str, m: nn.Linear, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        last = x.ndim - 1
        ctx.slot(path, "in", ctx.channels_in(x, last, m.in_features))
        a_out = ctx.out_atoms(path, "out", m.out_features)
        return TVal(out.shape, (last,), a_out)

    def shrink(self, m: nn.Linear, keep: dict[str, torch.Tensor]) -> nn.Module:
        kin = keep.get("in", torch.arange(m.in_features))
        kout = keep.get("out", torch.arange(m.out_features))
        new = clone_module(m)
        set_tensor(new, "weight", take_rows_cols(m.weight.detach(), kout, kin))
        if m.bias is not None:
            set_tensor(new, "bias", m.bias.detach()[kout])
        new.in_features, new.out_features = len(kin), len(kout)
        return new

    def weight_rows(self, m: nn.Linear, axis: str, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
        w = m.weight.detach() if weight is None else weight
        return w if axis == "out" else w.t()

    def bias_of_removed_inputs(self, m: nn.Linear, x: torch.Tensor, gone: torch.Tensor
                               ) -> torch.Tensor:
        k = x.index_select(-1, gone).movedim(-1, 0).flatten(1).median(1).values  # [removed]
        return m.weight.detach().index_select(1, gone) @ k.to(m.weight.dtype)

    def input_dims(self, m: nn.Linear) -> dict[str, int] | None:
        return {"in": -1} if runs_own_forward(m, self.types) else None

    def shape_only_macs(self, m: nn.Linear, inputs: list[Any]) -> float | None:
        return weight_macs(inputs[0] if inputs else None, m.weight, m.in_features)

    def zero_removed(self, m: nn.Linear, axis: str, idx: torch.Tensor) -> None:
        if axis == "in" and len(idx):
            with torch.no_grad():
                m.weight[:, idx] = 0


register_module_rule(LinearRule())
