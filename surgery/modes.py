"""Train/eval flags of a user's modules: set for one job, put back exactly afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def switched_mode(*models: nn.Module | None, train: bool | None = False) -> Iterator[None]:
    """Run the block with ``models`` in eval mode (``train=True``: train mode; None: as they
    are), then put back every submodule's own flag, so a user's frozen BatchNorm inside a
    training model stays frozen. None entries are skipped."""
    present = [m for m in models if m is not None]
    saved = [(m, m.training) for model in present for m in model.modules()]
    try:
        if train is not None:
            for model in present:
                model.train(train)
        yield
    finally:
        for m, mode in saved:
            m.training = mode
