"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d.

Math. A conv with ``g`` groups has weight ``W[out, in/g, *k]`` (transposed: ``W[in, out/g, *k]``).
Removing output channel ``o`` drops row ``W[o]`` and ``bias[o]``; removing input channel ``i`` drops
column ``W[:, i]`` (groups = 1). For ``g > 1`` (depthwise included) the group structure is kept by
coupling every input and output channel of a group into one unit: whole groups are removed, so
``groups`` shrinks and the per-group width (``in/g``, ``out/g``) is unchanged. Where something
downstream ties the same position of every group together (a channel shuffle), a grouped conv is
traced again pruning by width instead: position j of every group goes together, ``groups`` stays
and every group keeps the same positions (equal counts per group).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import PlanError
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
from .cost import ConvCost, weight_macs


def couple_widths(ctx: RuleContext, a_in: np.ndarray, a_out: np.ndarray, groups: int) -> None:
    """Position j of every group is one unit (inputs and outputs alike)."""
    for atoms in (a_in, a_out):
        rows = atoms.reshape(groups, -1)
        for g in range(1, groups):
            ctx.uf.union_arrays(rows[0], rows[g])


def couple_groups(ctx: RuleContext, a_in: np.ndarray, a_out: np.ndarray, groups: int) -> None:
    """Union all input and output channels of each group into one unit."""
    if groups == 1:
        return
    columns = np.concatenate([a_in.reshape(groups, -1), a_out.reshape(groups, -1)], axis=1)
    for j in range(1, columns.shape[1]):  # column j of every group joins column 0
        ctx.uf.union_arrays(columns[:, 0], columns[:, j])


def _same_in_every_group(keep: torch.Tensor, per: int, groups: int) -> torch.Tensor | None:
    """The positions kept within a group, if every group keeps the same ones."""
    rel = keep[keep // per == 0] % per
    if len(keep) != len(rel) * groups or not len(rel):
        return None
    expected = (torch.arange(groups)[:, None] * per + rel[None, :]).flatten()
    return rel if torch.equal(torch.sort(keep).values, expected) else None


def _kept_groups(m: _ConvNd, kin: torch.Tensor, kout: torch.Tensor) -> int:
    ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
    g_in, g_out = torch.unique(kin // ipg), torch.unique(kout // opg)
    if (not torch.equal(g_in, g_out) or len(kin) != len(g_in) * ipg
            or len(kout) != len(g_out) * opg):
        raise PlanError(f"{type(m).__name__} with groups={m.groups}: the plan keeps partial "
                        f"groups (in {len(kin)}/{m.in_channels}, "
                        f"out {len(kout)}/{m.out_channels}); "
                        "grouped convs lose whole groups only. Re-make the plan with surgery.plan.")
    return len(g_in)


class _ConvBase(ModuleRule[_ConvNd]):
    axes = ("in", "out")
    transposed = False
    own_tensors = ("weight", "bias")

    def propagate(self, ctx: RuleContext, path: str, m: _ConvNd, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        cdim = x.ndim - len(m.kernel_size) - 1
        a_in = ctx.slot(path, "in", ctx.channels_in(x, cdim, m.in_channels))
        a_out = ctx.out_atoms(path, "out", m.out_channels)
        ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
        if m.groups > 1 and ipg > 1 and opg > 1:  # a true grouped conv: either mode is valid
            ctx.record_grouped(path, a_in, a_out, m.groups)
            if ctx.by_width(path):
                couple_widths(ctx, a_in, a_out, m.groups)
                return TVal(out.shape, (cdim,), a_out)
        couple_groups(ctx, a_in, a_out, m.groups)
        return TVal(out.shape, (cdim,), a_out)

    def shrink(self, m: _ConvNd, keep: dict[str, torch.Tensor]) -> nn.Module:
        kin = keep.get("in", torch.arange(m.in_channels))
        kout = keep.get("out", torch.arange(m.out_channels))
        w = m.weight.detach()
        groups = m.groups
        ipg, opg = m.in_channels // groups, m.out_channels // groups
        rel_in = _same_in_every_group(kin, ipg, groups) if groups > 1 else None
        rel_out = _same_in_every_group(kout, opg, groups) if groups > 1 else None
        if groups > 1 and rel_in is not None and rel_out is not None and \
                (len(rel_in) < ipg or len(rel_out) < opg):  # by width: every group, fewer each
            w = take_rows_cols(w, kin, rel_out) if self.transposed else \
                take_rows_cols(w, kout, rel_in)
        elif groups > 1:
            groups = _kept_groups(m, kin, kout)
            w = w[kin] if self.transposed else w[kout]
        elif self.transposed:
            w = take_rows_cols(w, kin, kout)
        else:
            w = take_rows_cols(w, kout, kin)
        new = clone_module(m)
        set_tensor(new, "weight", w)
        if m.bias is not None:
            set_tensor(new, "bias", m.bias.detach()[kout])
        new.in_channels, new.out_channels, new.groups = len(kin), len(kout), groups
        return new

    def _grouped(self, m: _ConvNd, w: torch.Tensor | None = None) -> torch.Tensor:
        """Weight (or a tensor shaped like it) as [g, out/g, in/g, K] whatever the layout."""
        w = m.weight.detach() if w is None else w
        g = m.groups
        if self.transposed:  # [in, out/g, *k] -> [g, in/g, out/g, K] -> [g, out/g, in/g, K]
            return w.reshape(g, m.in_channels // g, m.out_channels // g, -1).transpose(1, 2)
        return w.reshape(g, m.out_channels // g, m.in_channels // g, -1)

    def importance(self, m: _ConvNd, axis: str) -> torch.Tensor:
        if axis == "in" and m.groups == 1:  # [in, out, K], a view: the criteria read it in place
            return self._grouped(m)[0].transpose(0, 1)
        return self.weight_rows(m, axis)

    def weight_rows(self, m: _ConvNd, axis: str, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
        w = self._grouped(m, weight)  # [g, opg, ipg, K]
        if axis == "out":
            return w.reshape(m.out_channels, -1)
        return w.transpose(1, 2).reshape(m.in_channels, -1)

    def bias_of_removed_inputs(self, m: _ConvNd, x: torch.Tensor, gone: torch.Tensor
                               ) -> torch.Tensor | None:
        if m.groups != 1 or self.transposed:
            return None
        k = x.index_select(1, gone).movedim(1, 0).flatten(1).median(1).values  # [removed]
        w = m.weight.detach().index_select(1, gone)  # [out, removed, *kernel]
        return w.flatten(2).sum(2) @ k.to(w.dtype)

    def input_dims(self, m: _ConvNd) -> dict[str, int] | None:
        # channels sit before the spatial dims, batched or not
        return {"in": -(m.weight.dim() - 1)} if runs_own_forward(m, self.types) else None

    def shape_only_macs(self, m: _ConvNd, inputs: list[Any]) -> float | None:
        return weight_macs(inputs[0] if inputs else None, m.weight, m.in_channels)

    def zero_removed(self, m: _ConvNd, axis: str, idx: torch.Tensor) -> None:
        if axis != "in" or len(idx) == 0:
            return
        with torch.no_grad():
            if self.transposed:
                m.weight[idx] = 0
            else:
                ipg = m.in_channels // m.groups
                opg = m.out_channels // m.groups
                w = m.weight.view(m.groups, opg, ipg, -1)
                w[idx // ipg, :, idx % ipg] = 0


class ConvRule(_ConvBase):
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    cost = ConvCost()  # MACs and a one-layer runner (latency-aware allocation)
    #: a filter is a row of the weight: read elsewhere (weight standardisation), it is the output
    param_axes = {"weight": ("out", 0), "bias": ("out", 0)}


class ConvTransposeRule(_ConvBase):
    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    transposed = True


class DeformConvRule(_ConvBase):
    """torchvision's ``DeformConv2d``: a conv whose sampling positions come from an offset
    (and mask) input sized by its kernel, which keeps its channels. Its own channels are a
    conv's; with several offset groups each covers a fixed share of the inputs, which stay."""

    types = (torchvision.ops.DeformConv2d,)

    def propagate(self, ctx: RuleContext, path: str, m: _ConvNd, inputs: list[Any],
                  out: Any) -> Any:
        x, extra = inputs[0], [v for v in inputs[1:] if isinstance(v, TVal) and v.tracked]
        if extra:
            ctx.opaque(extra, None, f"offsets and masks of '{path}' are sized by its kernel")
        offset = inputs[1] if len(inputs) > 1 else None
        k = math.prod(m.kernel_size)
        if isinstance(offset, TVal) and offset.ndim == 4 and offset.shape[1] != 2 * k:
            ctx.pin(ctx.channels_in(x, 1, m.in_channels), f"'{path}' has several offset groups")
        return super().propagate(ctx, path, m, [x], out)


register_module_rule(ConvRule())
register_module_rule(ConvTransposeRule())
register_module_rule(DeformConvRule())
