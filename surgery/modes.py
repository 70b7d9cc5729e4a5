"""Train/eval flags and buffers of a user's modules: set for one job, put back afterwards."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def switched_mode(*models: nn.Module | None, train: bool | None = False) -> Iterator[None]:
    """Run the block with ``models`` in eval mode (``train=True``: train mode; None: as they
    are), then put back every submodule's own flag, so a user's frozen BatchNorm inside a
    training model stays frozen. None entries are skipped."""
    present = [m for m in models if m is not None]
    saved = [(m, m.training) for model in present for m in model.modules()]
    try:
        if train is not None and any(mode is not train for _, mode in saved):
            for model in present:
                model.train(train)
        yield
    finally:
        for m, mode in saved:
            if m.training is not mode:
                m.training = mode


@contextlib.contextmanager
def buffers_kept(model: nn.Module | None) -> Iterator[None]:
    """Run the block, then put back the values of ``model``'s buffers (None: nothing): a
    forward may update them in place (running statistics in train mode, a counter). One copy
    per dtype and device before and one comparison after, whatever the number of buffers."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for b in model.buffers() if model is not None else ():
        if b.device.type != "meta" and b.numel():
            groups.setdefault((b.dtype, b.device), []).append(b)
    with torch.no_grad():
        saved = [(bs, _flat(bs)) for bs in groups.values()]
    try:
        yield
    finally:
        with torch.no_grad():
            for bs, flat in saved:
                if torch.equal(_flat(bs), flat):
                    continue
                for b, old in zip(bs, flat.split([b.numel() for b in bs]), strict=True):
                    old = old.view(b.shape)
                    if not torch.equal(b, old):
                        b.copy_(old)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The values of ``tensors`` in one new 1-d tensor."""
    return torch.cat([t.reshape(-1) for t in tensors])


@contextlib.contextmanager
def attributes_kept(model: nn.Module | None) -> Iterator[None]:
    """Run the block, then put back every attribute, parameter, buffer and child of ``model``'s
    modules as the objects they were (None: nothing), and the entries of attributes that are
    lists, dicts or sets. A forward that assigns to its module (``self.count += 1``) or fills
    a cache in it (``self.cache[key] = bias``) would otherwise leave a tracer's stand-in, or a
    new object, in the user's model; the values inside tensors are :func:`buffers_kept`'s."""
    saved: list[tuple[Any, Any]] = []
    for m in model.modules() if model is not None else ():
        d = m.__dict__
        saved.append((d, d.copy()))
        saved.extend((v, v.copy()) for key, v in d.items() if (
            key[:1] != "_" or key in _TABLES) and isinstance(v, list | dict | set))
    try:
        yield
    finally:
        for table, old in saved:
            if _changed(table, old):
                table.clear()
                if isinstance(table, list):
                    table.extend(old)
                else:
                    table.update(old)


#: the tables of a module's parameters, buffers and children
_TABLES = frozenset({"_parameters", "_buffers", "_modules"})


def _changed(now: Any, old: Any) -> bool:
    """Whether a list, dict or set no longer holds the same objects (by identity)."""
    if len(now) != len(old):
        return True
    if isinstance(now, dict):  # same length: the same keys in the same order, each the same
        return not (all(map(operator.is_, now, old))
                    and all(map(operator.is_, now.values(), old.values())))
    if isinstance(now, list):
        return not all(map(operator.is_, now, old))
    return {id(x) for x in now} != {id(x) for x in old}
