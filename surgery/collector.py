"""Python's cyclic garbage collector paused while surgery works on a model.

A trace builds torch.fx graphs, whose nodes refer to one another: each trace leaves thousands of
objects that only the cyclic collector frees. Left running during a prune, the collector moves
them (still in use) into its oldest generation, and every few prunes it then walks the whole
heap of a process that imports torch: 0.1-0.2 s on a 2-core VM, more than a small net's whole
prune. Paused, it collects nothing during the call; a young collection at the end frees the
graphs. Surgery's own copies of a model are freed by reference counting (no reference cycles),
except the graph modules that stand in for bypassed blocks (depth plans), which wait for that
collection. Searches that build a model per round (a MAC budget, a latency target) pause phase
by phase, so their rounds' garbage does not pile up.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector disabled, then enable it again (even on an
    error) and collect the young generation. Nested blocks, or a collector the caller
    disabled, are left as they are."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        # the young generation now holds everything the block made: collect it alone (the
        # collector's own next pass could be a full one, triggered by our garbage)
        gc.collect(0)


def pauses_collector(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run in :func:`collector_paused`."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with collector_paused():
            return fn(*args, **kwargs)
    return wrapper
