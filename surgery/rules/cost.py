"""Cost models of layers: MACs at given channel widths, and a one-layer runner per runtime.

A module rule carries its layer's cost model as ``ModuleRule.cost`` (so a new layer is one entry in
one place); :mod:`surgery.latency` times the runners at a few widths and allocates the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Call:
    """One call of a costed leaf module: its input shape and the slots of its channel axes."""

    path: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    slots: dict[str, str]  # axis ("in"/"out") -> slot key


class CostRule:
    """How one module family costs: MACs at given widths and a timed runner at given widths."""

    types: tuple[type[nn.Module], ...] = ()
    #: the module rule's axis name -> "in" / "out" here
    slot_axes: dict[str, str] = {"in": "in", "out": "out"}

    def widths(self, call: Call) -> dict[str, int]:
        raise NotImplementedError

    def macs(self, call: Call, w: dict[str, int]) -> float:
        raise NotImplementedError

    def runner(self, call: Call, w: dict[str, int], runtime: str,
               threads: int) -> Callable[[], Any] | None:
        """A callable that runs the layer once at widths ``w``; None: free on this runtime."""
        raise NotImplementedError

    def coupled(self, call: Call) -> bool:
        """True when in and out shrink together (grouped convs lose whole groups)."""
        return False


def _ort_runner(nodes: list[Any], inits: list[Any], x: np.ndarray, out_rank: int,
                threads: int) -> Callable[[], Any]:
    """A one-layer ONNX graph in an ONNX Runtime session (same options as the benchmark)."""
    from onnx import TensorProto, helper

    from ..export import ort_session

    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort_session(model.SerializeToString(), threads=threads)
    feed = {"x": x}
    return lambda: sess.run(None, feed)


def _init(name: str, a: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(a.astype(np.float32), name)


class ConvCost(CostRule):
    types = (nn.Conv2d,)

    def widths(self, call: Call) -> dict[str, int]:
        m = call.module
        return {"in": m.in_channels, "out": m.out_channels}

    def coupled(self, call: Call) -> bool:
        return call.module.groups > 1

    def _shape(self, call: Call, w: dict[str, int]) -> tuple[int, int, int]:
        m = call.module
        if m.groups > 1:  # whole groups go: per-group widths stay
            opg = m.out_channels // m.groups
            g = max(1, w["out"] // opg)
            return g * (m.in_channels // m.groups), g * opg, g
        return w["in"], w["out"], 1

    def macs(self, call: Call, w: dict[str, int]) -> float:
        m = call.module
        cin, cout, g = self._shape(call, w)
        hw = math.prod(call.out_shape[2:])
        return call.out_shape[0] * hw * math.prod(m.kernel_size) * cout * (cin // g)

    def runner(self, call: Call, w: dict[str, int], runtime: str,
               threads: int) -> Callable[[], Any]:
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
        if runtime == "torch":
            def run() -> None:
                with torch.inference_mode():
                    F.conv2d(x, weight, bias, m.stride, pad, m.dilation, g)
            return run
        from onnx import helper
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(m.stride),
                                pads=pad + pad, dilations=list(m.dilation), group=g,
                                kernel_shape=list(m.kernel_size))
        return _ort_runner([node], [_init("w", weight.numpy()), _init("b", bias.numpy())],
                           x.numpy(), 4, threads)


class LinearCost(CostRule):
    types = (nn.Linear,)

    def widths(self, call: Call) -> dict[str, int]:
        m = call.module
        return {"in": m.in_features, "out": m.out_features}

    def macs(self, call: Call, w: dict[str, int]) -> float:
        return math.prod(call.in_shape[:-1]) * w["in"] * w["out"]

    def runner(self, call: Call, w: dict[str, int], runtime: str,
               threads: int) -> Callable[[], Any]:
        x = torch.randn(*call.in_shape[:-1], w["in"])
        weight = torch.randn(w["out"], w["in"])
        bias = torch.randn(w["out"])
        if runtime == "torch":
            def run() -> None:
                with torch.inference_mode():
                    F.linear(x, weight, bias)
            return run
        from onnx import helper
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["xw"]),
                 helper.make_node("Add", ["xw", "b"], ["y"])]
        return _ort_runner(nodes, [_init("wt", weight.T.contiguous().numpy()),
                                   _init("b", bias.numpy())], x.numpy(), x.ndim, threads)


class NormCost(CostRule):
    """BatchNorm: no MACs; folded into the conv by ONNX Runtime, a memory pass in eager."""

    types = (nn.BatchNorm2d,)
    slot_axes = {"features": "out"}

    def widths(self, call: Call) -> dict[str, int]:
        return {"in": call.module.num_features, "out": call.module.num_features}

    def coupled(self, call: Call) -> bool:
        return True

    def macs(self, call: Call, w: dict[str, int]) -> float:
        return 0.0

    def runner(self, call: Call, w: dict[str, int], runtime: str,
               threads: int) -> Callable[[], Any] | None:
        if runtime != "torch":
            return None
        c = w["out"]
        x = torch.randn(call.in_shape[0], c, *call.in_shape[2:])
        mean, var, weight, bias = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)

        def run() -> None:
            with torch.inference_mode():
                F.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5)
        return run
