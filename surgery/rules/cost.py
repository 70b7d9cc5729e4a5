"""Cost models of layers: MACs at given channel widths, and the layer as a program any runtime
can run.

A module rule carries its layer's cost model as ``ModuleRule.cost`` (so a new layer is one entry in
one place). The cost model describes the layer at given widths once (:class:`LayerProgram`: eager
call and ONNX nodes); each runtime in :mod:`surgery.runtimes` runs it its own way, and
:mod:`surgery.latency` times it at a few widths and allocates the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..runtimes import LayerProgram

#: the module class a cost model handles (``CostRule[nn.Conv2d]``); bare ``CostRule``: any
M = TypeVar("M", bound=nn.Module)


def weight_macs(x: object, weight: torch.Tensor, in_channels: int) -> float | None:
    """Roughly the multiply-adds of a conv or linear call on ``x``: every input position meets
    the whole weight (at most: a stride skips some). None where ``x`` is not a tensor."""
    if not isinstance(x, torch.Tensor) or in_channels <= 0:
        return None
    return weight.numel() * (x.numel() // in_channels)


@dataclass
class Call(Generic[M]):
    """One call of a costed leaf module: its input shape and the slots of its channel axes."""

    path: str
    module: M
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    slots: dict[str, str]  # axis ("in"/"out") -> slot key


class CostRule(Generic[M]):
    """How one module family costs: MACs at given widths and a timed runner at given widths."""

    types: tuple[type[nn.Module], ...] = ()
    #: the module rule's axis name -> "in" / "out" here
    slot_axes: dict[str, str] = {"in": "in", "out": "out"}

    def widths(self, call: Call[M]) -> dict[str, int]:
        raise NotImplementedError

    def macs(self, call: Call[M], w: dict[str, int]) -> float:
        raise NotImplementedError

    def program(self, call: Call[M], w: dict[str, int]) -> LayerProgram:
        """The layer at widths ``w``, for a runtime to run (see :class:`LayerProgram`)."""
        raise NotImplementedError

    def coupled(self, call: Call[M]) -> bool:
        """True when in and out shrink together (grouped convs lose whole groups)."""
        return False


class ConvCost(CostRule[nn.Conv2d]):
    types = (nn.Conv2d,)

    def widths(self, call: Call[nn.Conv2d]) -> dict[str, int]:
        m = call.module
        return {"in": m.in_channels, "out": m.out_channels}

    def coupled(self, call: Call[nn.Conv2d]) -> bool:
        return call.module.groups > 1

    def _shape(self, call: Call[nn.Conv2d], w: dict[str, int]) -> tuple[int, int, int]:
        m = call.module
        if m.groups > 1:  # whole groups go: per-group widths stay
            opg = m.out_channels // m.groups
            g = max(1, w["out"] // opg)
            return g * (m.in_channels // m.groups), g * opg, g
        return w["in"], w["out"], 1

    def macs(self, call: Call[nn.Conv2d], w: dict[str, int]) -> float:
        m = call.module
        cin, cout, g = self._shape(call, w)
        hw = math.prod(call.out_shape[2:])
        return call.out_shape[0] * hw * math.prod(m.kernel_size) * cout * (cin // g)

    def program(self, call: Call[nn.Conv2d], w: dict[str, int]) -> LayerProgram:
        m = call.module
        cin, cout, g = self._shape(call, w)
        x = torch.randn(call.in_shape[0], cin, *call.in_shape[2:])
        weight = torch.randn(cout, cin // g, *m.kernel_size)
        bias = torch.randn(cout)
        if isinstance(m.padding, str):
            pad = [0, 0] if m.padding == "valid" else \
                [d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        else:
            pad = list(m.padding)
        from onnx import helper
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(m.stride),
                                pads=pad + pad, dilations=list(m.dilation), group=g,
                                kernel_shape=list(m.kernel_size))
        return LayerProgram(
            [x, weight, bias], lambda x, w, b: F.conv2d(x, w, b, m.stride, pad, m.dilation, g),
            [node], {"w": weight.numpy(), "b": bias.numpy()}, 4)


class LinearCost(CostRule[nn.Linear]):
    types = (nn.Linear,)

    def widths(self, call: Call[nn.Linear]) -> dict[str, int]:
        m = call.module
        return {"in": m.in_features, "out": m.out_features}

    def macs(self, call: Call[nn.Linear], w: dict[str, int]) -> float:
        return math.prod(call.in_shape[:-1]) * w["in"] * w["out"]

    def program(self, call: Call[nn.Linear], w: dict[str, int]) -> LayerProgram:
        x = torch.randn(*call.in_shape[:-1], w["in"])
        weight = torch.randn(w["out"], w["in"])
        bias = torch.randn(w["out"])
        from onnx import helper
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["xw"]),
                 helper.make_node("Add", ["xw", "b"], ["y"])]
        return LayerProgram([x, weight, bias], F.linear, nodes,
                            {"wt": weight.T.contiguous().numpy(), "b": bias.numpy()}, x.ndim)


class NormCost(CostRule[nn.BatchNorm2d]):
    """BatchNorm: no MACs; folded into the conv by ONNX Runtime, a memory pass in eager."""

    types = (nn.BatchNorm2d,)
    slot_axes = {"features": "out"}

    def widths(self, call: Call[nn.BatchNorm2d]) -> dict[str, int]:
        return {"in": call.module.num_features, "out": call.module.num_features}

    def coupled(self, call: Call[nn.BatchNorm2d]) -> bool:
        return True

    def macs(self, call: Call[nn.BatchNorm2d], w: dict[str, int]) -> float:
        return 0.0

    def program(self, call: Call[nn.BatchNorm2d], w: dict[str, int]) -> LayerProgram:
        c = w["out"]
        x = torch.randn(call.in_shape[0], c, *call.in_shape[2:])
        stats = [torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)]
        return LayerProgram(  # ONNX Runtime folds it into the conv before: no nodes
            [x, *stats], lambda x, m, v, g, b: F.batch_norm(x, m, v, g, b, False, 0.0, 1e-5),
            None, folds=True)
