"""Coupled channel groups.

Every channel that a layer produces is an *atom*. Ops that tie channels together (a residual add,
a depthwise conv, a GroupNorm group, a channel-shuffle view) union atoms; the union-find classes
are the *units* that are removed or kept as a whole. Units that touch exactly the same layer axes
(slots) form a *group*: the set of channels a ratio is applied to, like Torch-Pruning's groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def unique_ints(a: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, sorted: ``np.unique`` by one sort (numpy 2's
    hashing ``np.unique`` is several times slower on the thousands of atoms of a trace)."""
    s = np.sort(a, axis=None)
    if s.size < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


class UnionFind:
    """Union-find over integer atoms, grown on demand."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union two atom arrays of the same shape position by position."""
        if a.shape != b.shape:
            raise ValueError(f"cannot couple channel arrays of shapes {a.shape} and {b.shape}")
        find, parent = self.find, self.parent
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
            if x != y:  # union(x, y), inlined: this loop runs once per coupled channel
                rx, ry = find(x), find(y)
                if rx < ry:
                    parent[ry] = rx
                elif ry < rx:
                    parent[rx] = ry

    def union_all(self, a: np.ndarray) -> None:
        """Union every atom of ``a`` into one class."""
        flat = a.ravel().tolist()
        for x in flat[1:]:
            self.union(flat[0], x)

    def roots(self) -> np.ndarray:
        """The class root of every atom, as an array indexed by atom."""
        parent = np.array(self.parent, dtype=np.int64)
        while True:  # pointer jumping: every atom's parent's parent, until all reach a root
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent
            parent = up


@dataclass
class TVal:
    """What the tracer knows of one tensor: its shape and which dims carry channel atoms.

    ``atoms`` has shape ``tuple(shape[d] for d in tdims)``; an empty ``tdims`` means the tensor
    carries no prunable channels (a constant, the network input, or the output of an op we pinned).
    ``param`` is the qualified name of a parameter/buffer when the tensor is one (fx ``get_attr``).
    """

    shape: tuple[int, ...]
    tdims: tuple[int, ...] = ()
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    param: str | None = None
    #: for a tensor computed position by position from parameter ``param`` (``gamma.view(1, -1,
    #: 1, 1)``, ``sigmoid(gate)``): (dim here, dim of the parameter) of its non-singleton dims
    param_dims: tuple[tuple[int, int], ...] | None = None
    #: (dim here, the module attribute that sizes it) for a parameter viewed to an attribute's
    #: shape (``self.scale.view(self.shape)``): slicing that dim rewrites the attribute
    param_sizes: tuple[tuple[int, Any], ...] = ()

    @property
    def tracked(self) -> bool:
        return bool(self.tdims)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def param_dim(axis: str) -> int:
    """The tensor dim of a raw-parameter axis: ``"0"`` is dim 0; ``"r1"`` is dim 1, read."""
    return int(axis[1:] if axis.startswith("r") else axis)


def param_reads(axis: str) -> bool:
    """A raw-parameter axis that *reads* channels (a weight's input dim, ``"r1"``): besides
    being sliced, its removed entries are zeroed in the equivalence reference."""
    return axis.startswith("r")


@dataclass
class Slot:
    """One prunable axis of one layer (``path`` a module, or a raw parameter, ``axis`` its name)."""

    path: str
    axis: str
    atoms: np.ndarray  # 1-D: the atom of every position along the axis
    kind: str  # "module" (shrunk by a rule) or "param" (a tensor sliced along param_dim(axis))

    @property
    def key(self) -> str:
        return f"{self.path}:{self.axis}"

    @property
    def size(self) -> int:
        return int(self.atoms.shape[0])


@dataclass
class Group:
    """Units (channel classes) that touch the same slots and are pruned at one ratio."""

    index: int
    slots: tuple[str, ...]  # slot keys
    units: np.ndarray  # roots of the free units
    pinned: np.ndarray  # roots of units that must stay
    reasons: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return len(self.units) > 1

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else "fixed"
        members = ", ".join(self.slots[:6]) + (" …" if len(self.slots) > 6 else "")
        return (f"Group({self.index}: {len(self.units)} free + {len(self.pinned)} pinned units, "
                f"{state}, [{members}])")


def build_groups(slots: list[Slot], roots: np.ndarray, pinned: dict[int, list[str]]) -> list[Group]:
    """Group unit roots by the exact set of slots they appear in.

    Each slot gets a random 64-bit tag; a root's footprint hash is the sum of the tags of its
    slots (collisions are checked), so grouping is a few vectorised numpy passes.
    """
    if not slots:
        return []
    tags = np.random.default_rng(0).integers(1, 2**63, len(slots), dtype=np.uint64)
    # every (root, slot) pair once, sorted by root then slot: one sort over all the atoms
    atoms = [slot.atoms.ravel() for slot in slots]
    r_all = roots[np.concatenate(atoms)].astype(np.int64)
    s_all = np.repeat(np.arange(len(slots), dtype=np.int64), [len(a) for a in atoms])
    pairs = unique_ints(r_all * len(slots) + s_all)
    r_all, s_all = pairs // len(slots), pairs % len(slots)
    starts = np.r_[0, np.flatnonzero(np.diff(r_all)) + 1]
    uroots = r_all[starts]
    with np.errstate(over="ignore"):
        h = np.add.reduceat(tags[s_all], starts)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    ends = np.r_[starts[1:], len(r_all)]
    pinned_mask = np.isin(uroots, np.fromiter(pinned, np.int64, len(pinned)))
    groups: list[Group] = []
    for g_idx, rep in enumerate(first.tolist()):
        members = np.flatnonzero(inverse == g_idx)
        key = s_all[starts[rep]:ends[rep]]
        sizes = ends[members] - starts[members]
        if not (sizes == len(key)).all():
            raise RuntimeError("slot footprint hash collision; please report this model")
        free = uroots[members[~pinned_mask[members]]]
        fixed = uroots[members[pinned_mask[members]]]
        reasons: list[str] = []
        for r in fixed.tolist():
            for why in pinned[r]:
                if why not in reasons:
                    reasons.append(why)
        groups.append(Group(g_idx, tuple(slots[i].key for i in key.tolist()), free, fixed,
                            tuple(reasons)))
    groups.sort(key=lambda g: min(np.r_[g.units, g.pinned]))
    for i, g in enumerate(groups):
        g.index = i
    return groups
