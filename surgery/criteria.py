"""Channel-importance criteria, a registry by name.

A criterion scores the free units of one group (higher = keep). ``l1``/``l2`` are structured
Ln-norms: for every member tensor ``t`` of the group (the producer's output rows, the consumers'
input columns, norm scales, layer-scale entries, ...) each unit gets ``‖t[u]‖_p`` over all of its
slices; member scores are divided by their mean over the group's units, so a large 3x3 conv and a
BatchNorm weigh the same, and averaged over members:

    score(u) = mean_t ( ‖t[u]‖_p / mean_v ‖t[v]‖_p )

``bn_scale`` uses only the norm layers' scales |γ| (network slimming; groups without a norm layer
fall back to ``l1``); ``random`` is the baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .graph import ChannelGraph
from .groups import Group, Slot, param_dim
from .paths import Submodules
from .rules import module_rule

Scorer = Callable[[Group], np.ndarray]
CriterionFactory = Callable[[nn.Module, ChannelGraph, int], Scorer]

_CRITERIA: dict[str, CriterionFactory] = {}


def register_criterion(name: str, factory: CriterionFactory, *, replace: bool = False) -> None:
    """Register ``factory(model, graph, seed) -> score(group) -> np.ndarray`` under ``name``."""
    if name in _CRITERIA and not replace:
        raise ValueError(f"criterion {name!r} is already registered; pass replace=True")
    _CRITERIA[name] = factory


def criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> CriterionFactory:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ConfigError(f"unknown criterion {name!r}; expected one of {criteria()}") from None


def slot_tensor(model: nn.Module, slot: Slot, submodule: Submodules | None = None
                ) -> torch.Tensor | None:
    """The weights of every position of a slot, one position per index of dim 0.
    ``submodule``: a lookup table of ``model``'s layers, for many calls."""
    submodule = submodule or Submodules(model)
    if slot.kind == "module":
        m = submodule(slot.path)
        rule = module_rule(m)
        return None if rule is None else rule.importance(m, slot.axis)
    owner, _, name = slot.path.rpartition(".")
    m = submodule(owner)
    t = m._parameters[name] if name in m._parameters else m._buffers[name]
    assert t is not None, f"{slot.path} is None"
    return t.detach().movedim(param_dim(slot.axis), 0).reshape(slot.size, -1)


def powered_row_sums(t: torch.Tensor, p: float) -> np.ndarray:
    """sum(|x|^p) over each index of dim 0 of ``t`` (a position's weights: a row, or a slice of
    a view), in float64. A view whose dims 0 and 1 are swapped from memory order (a layer's
    input columns) is summed as ``ones @ |W|^p`` in blocks of its memory rows: torch reduces
    across the leading dim of a contiguous matrix several times slower than along its rows, and
    copying the columns out costs more than the sum."""
    def powered(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.square() if p == 2 else x.abs() if p == 1 else x.abs().pow(p)

    n = t.shape[0]
    base = t.transpose(0, 1) if t.dim() >= 2 else t
    if t.dim() >= 2 and n > 1 and t.numel() > 1 << 16 and not t.is_contiguous() \
            and base.is_contiguous():
        base = base.reshape(base.shape[0], -1)  # [a, n * rest] in memory order
        total = torch.zeros(base.shape[1], dtype=torch.float64, device=t.device)
        step = max(1, (1 << 22) // max(base.shape[1], 1))  # ~16 MB of powers at a time
        for block in base.split(step):
            total += torch.ones(block.shape[0], device=t.device) @ powered(block)
        return total.reshape(n, -1).sum(1).cpu().numpy()
    return torch.linalg.vector_norm(t.reshape(n, -1).float(), p, dim=1).double().pow(p) \
        .cpu().numpy()


def magnitude(p: float, only_norms: bool = False) -> CriterionFactory:
    def factory(model: nn.Module, graph: ChannelGraph, seed: int = 0) -> Scorer:
        cache: dict[str, np.ndarray | None] = {}
        submodule = Submodules(model)

        def per_position(key: str) -> np.ndarray | None:
            if key not in cache:
                slot = graph.slots[key]
                if only_norms and not (slot.kind == "module" and getattr(
                        module_rule(submodule(slot.path)), "is_norm", False)):
                    cache[key] = None
                else:
                    t = slot_tensor(model, slot, submodule)
                    cache[key] = None if t is None else powered_row_sums(t, p)
            return cache[key]

        def score(group: Group) -> np.ndarray:
            # every member at once: row i of ``s`` is member i's norm per unit (positions of
            # other groups in a member's slot, e.g. a concat's other inputs, are left out)
            n = len(group.units)
            found = [(key, v) for key in group.slots for v in (per_position(key),)
                     if v is not None]
            if not found:
                return fallback(group) if fallback is not None else np.zeros(n)
            roots = [graph.slot_roots(key) for key, _ in found]
            member = np.repeat(np.arange(len(found)), [len(r) for r in roots])
            flat = np.concatenate(roots)
            idx = np.searchsorted(group.units, flat).clip(0, n - 1)
            mine = group.units[idx] == flat
            values = np.concatenate([v for _, v in found])
            s = np.bincount(member[mine] * n + idx[mine], weights=values[mine],
                            minlength=len(found) * n).reshape(len(found), n) ** (1 / p)
            means = s.mean(axis=1)
            live = means > 0
            if not live.any():
                return fallback(group) if fallback is not None else np.zeros(n)
            return (s[live] / means[live, None]).sum(axis=0) / live.sum()

        fallback = magnitude(p)(model, graph, seed) if only_norms else None
        return score

    return factory


def _random(model: nn.Module, graph: ChannelGraph, seed: int = 0) -> Scorer:
    rng = np.random.default_rng(seed)
    return lambda group: rng.random(len(group.units))


register_criterion("l1", magnitude(1.0))
register_criterion("l2", magnitude(2.0))
register_criterion("bn_scale", magnitude(1.0, only_norms=True))
register_criterion("random", _random)
