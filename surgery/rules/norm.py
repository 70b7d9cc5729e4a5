"""Normalisation layers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm and RMSNorm.

Math. Per-channel norms (BatchNorm*, InstanceNorm*) keep ``weight/bias/running_mean/running_var``
at the surviving channels; nothing else changes, so removal is exact. GroupNorm normalises within
groups of ``C/G`` channels: the channels of a group form one unit and whole groups are removed
(``num_groups`` shrinks, group width kept), which is also exact; with one group it normalises over
all channels and, like LayerNorm, loses single channels, not exactly. LayerNorm (and RMSNorm, the
same without the mean and bias) over the channel dim mixes channels (statistics over all of them):
removal is allowed but not exact; the verification reference then normalises over the kept
channels alone (``on_kept``), as the pruned layer does, and still compares values.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import PlanError
from ..groups import TVal
from . import (
    ModuleRule,
    clone_module,
    on_kept_affine,
    passthrough,
    register_module_rule,
    set_tensor,
)
from .context import RuleContext
from .cost import NormCost

_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")

_N = TypeVar("_N", bound=nn.Module)


class _FeatureRule(ModuleRule[_N]):
    """Norms with one channel axis ``features`` and per-channel tensors."""

    axes = ("features",)
    size_attr = "num_features"
    is_norm = True
    own_tensors = (*_PER_CHANNEL, "num_batches_tracked")
    param_axes = {name: ("features", 0) for name in _PER_CHANNEL}

    def channel_dim(self, m: _N, x: TVal) -> int:
        return 1

    def couple(self, ctx: RuleContext, m: _N, atoms: np.ndarray) -> None:
        pass

    def propagate(self, ctx: RuleContext, path: str, m: _N, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        cdim = self.channel_dim(m, x)
        atoms = ctx.channels_in(x, cdim, getattr(m, self.size_attr))
        atoms = ctx.slot(path, "features", atoms, cross_channel=self.cross_channel)
        self.couple(ctx, m, atoms)
        return TVal(out.shape, (cdim,), atoms)

    def shrink(self, m: _N, keep: dict[str, torch.Tensor]) -> _N:
        k = keep["features"]
        new = clone_module(m)
        for name in _PER_CHANNEL:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                set_tensor(new, name, t.detach()[k])
        setattr(new, self.size_attr, len(k))
        return new

    def importance(self, m: _N, axis: str) -> torch.Tensor | None:
        w = getattr(m, "weight", None)
        return None if w is None else w.detach().reshape(-1, 1)


def _tensors_like(m: nn.Module, x: torch.Tensor) -> bool:
    """Every floating tensor of ``m`` has ``x``'s dtype and device (a norm's output then has
    ``x``'s dtype and device; an integer step counter does not enter it)."""
    return all(t is None or (t.dtype == x.dtype and t.device == x.device)
               for table in (m._parameters, m._buffers) for t in table.values()
               if t is None or t.is_floating_point())


#: the input ranks each BatchNorm takes: (N, C) or (N, C, L); (N, C, H, W); (N, C, D, H, W)
_BN_NDIMS: dict[type, tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


class BatchNormRule(_FeatureRule[_BatchNorm]):
    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    cost = NormCost()  # MACs and a one-layer runner (latency-aware allocation)

    def keeps_shape(self, m: _BatchNorm, x: torch.Tensor) -> bool:
        # eval mode only: in train mode a batch of one value per channel fails
        return not m.training and m.running_mean is not None and m.running_var is not None \
            and x.ndim in _BN_NDIMS.get(type(m), ()) and \
            x.shape[1] == m.num_features and x.is_floating_point() and _tensors_like(m, x)


class InstanceNormRule(_FeatureRule[_InstanceNorm]):
    types = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    _spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}

    def channel_dim(self, m: _InstanceNorm, x: TVal) -> int:
        spatial = next(v for k, v in self._spatial.items() if isinstance(m, k))
        return x.ndim - spatial - 1


class GroupNormRule(_FeatureRule[nn.GroupNorm]):
    types = (nn.GroupNorm,)
    size_attr = "num_channels"

    def couple(self, ctx: RuleContext, m: nn.GroupNorm, atoms: np.ndarray) -> None:
        if m.num_groups == 1:  # one group normalises over all channels: like LayerNorm
            ctx.record_cross_channel(atoms, 1)
            return
        width = m.num_channels // m.num_groups
        for g in range(m.num_groups):
            ctx.uf.union_all(atoms[g * width:(g + 1) * width])

    def on_kept(self, m: nn.GroupNorm, x: torch.Tensor, dim: int, keep: torch.Tensor
                ) -> torch.Tensor | None:
        if m.num_groups != 1 or dim != 1:
            return None
        return on_kept_affine(F.group_norm, x, dim, keep, num_groups=1, weight=m.weight,
                              bias=m.bias, eps=m.eps)

    def shrink(self, m: nn.GroupNorm, keep: dict[str, torch.Tensor]) -> nn.GroupNorm:
        k = keep["features"]
        if m.num_groups == 1:
            return super().shrink(m, keep)
        width = m.num_channels // m.num_groups
        kept_groups = torch.unique(k // width)
        if len(k) != len(kept_groups) * width:
            raise PlanError(f"GroupNorm({m.num_groups}, {m.num_channels}): the plan keeps partial "
                            "groups; GroupNorm loses whole groups only. Re-make the plan.")
        new = super().shrink(m, keep)
        new.num_groups = len(kept_groups)
        return new


class LayerNormRule(_FeatureRule[nn.LayerNorm]):
    types = (nn.LayerNorm, nn.RMSNorm)
    cross_channel = True
    param_axes = {"weight": ("features", 0), "bias": ("features", 0)}

    def propagate(self, ctx: RuleContext, path: str, m: nn.LayerNorm, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        n = len(m.normalized_shape)
        if x.tracked and max(x.tdims) < x.ndim - n:
            return passthrough(ctx, x, out)  # channels are not among the normalised dims
        if n != 1:
            return ctx.opaque([x], out, f"LayerNorm over {tuple(m.normalized_shape)} "
                                        "mixes channels with other dims")
        atoms = ctx.channels_in(x, x.ndim - 1, m.normalized_shape[0])
        atoms = ctx.slot(path, "features", atoms)
        ctx.record_cross_channel(atoms, x.ndim - 1)
        return TVal(out.shape, (x.ndim - 1,), atoms)

    def on_kept(self, m: nn.LayerNorm, x: torch.Tensor, dim: int, keep: torch.Tensor
                ) -> torch.Tensor | None:
        if dim != x.ndim - 1 or len(m.normalized_shape) != 1:
            return None
        shape = (len(keep),)
        if isinstance(m, nn.RMSNorm):
            return on_kept_affine(F.rms_norm, x, dim, keep, normalized_shape=shape,
                                  weight=m.weight, eps=m.eps)
        return on_kept_affine(F.layer_norm, x, dim, keep, normalized_shape=shape,
                              weight=m.weight, bias=m.bias, eps=m.eps)

    def shrink(self, m: nn.LayerNorm, keep: dict[str, torch.Tensor]) -> nn.LayerNorm:
        k = keep["features"]
        new = clone_module(m)
        for name in ("weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                set_tensor(new, name, t.detach()[k])
        new.normalized_shape = (len(k),)
        return new


for _rule in (BatchNormRule(), InstanceNormRule(), GroupNormRule(), LayerNormRule()):
    register_module_rule(_rule)
