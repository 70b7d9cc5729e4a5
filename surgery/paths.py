"""Submodules by qualified name, from a table built once per pass over a model.

``nn.Module.get_submodule`` walks the path with ``hasattr``/``getattr`` at every step (~15 us);
a trace, a plan or a surgery looks up every layer several times, which on a mobile net adds up
to a tenth of a prune. A table is only valid while the module tree is not changed.
"""

from __future__ import annotations

from torch import nn


class Submodules:
    """``lookup(path)`` is ``model.get_submodule(path)`` (same errors for a missing path)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.table = dict(model.named_modules(remove_duplicate=False))

    def __call__(self, path: str) -> nn.Module:
        m = self.table.get(path)
        return m if m is not None else self.model.get_submodule(path)
