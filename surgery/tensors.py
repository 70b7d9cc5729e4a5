"""Comparing model outputs: the tensors of an output, and one relative error for every check."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (nested tuples, lists and dicts), in the order an exported
    ONNX graph lists them (dicts by insertion order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in output_tensors(o)]
    return []


def replace_tensors(out: Any, new: Iterator[torch.Tensor]) -> Any:
    """``out`` with its tensors replaced, in :func:`output_tensors` order, by those of ``new``
    (same containers: tuples, named tuples, lists, dicts)."""
    if isinstance(out, torch.Tensor):
        return next(new)
    if isinstance(out, dict):
        d = copy.copy(out)
        for k, v in out.items():
            d[k] = replace_tensors(v, new)
        return d
    if isinstance(out, tuple | list):
        items = [replace_tensors(o, new) for o in out]
        if hasattr(out, "_fields"):  # a named tuple
            return type(out)(*items)
        return type(out)(items)
    return out


def rel_error(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    """max|got - want| / max|want|: the largest difference relative to the reference's scale.

    An all-zero reference gives the absolute difference (so a non-zero result is not hidden);
    integer outputs give 0 when equal and infinity otherwise; empty ones 0; a NaN on either
    side infinity (NaN compares false with any tolerance, so it must not be what is returned).
    """
    a, b = torch.as_tensor(got), torch.as_tensor(want)
    if not b.numel():
        return 0.0
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    diff = (a.to(b.dtype) - b).abs().max().item()
    scale = b.abs().max().item()
    if math.isnan(diff) or math.isnan(scale):
        return math.inf
    return diff / scale if scale > 0 else diff
