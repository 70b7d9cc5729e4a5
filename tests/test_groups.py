"""The union-find under the channel graph: every class's root is its smallest atom, however the
unions were made (one by one or array by array) and however the roots are read."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.groups import UnionFind, unique_ints


def _components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """The smallest atom connected to each atom, by a plain graph search (the oracle)."""
    adjacent: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    least = list(range(n))
    for start in range(n):
        seen, todo = {start}, [start]
        while todo:
            for nxt in adjacent[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        least[start] = min(seen)
    return least


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1),
                                   st.booleans()), max_size=80))))
def test_roots_are_the_least_atom_of_each_class(case: tuple[int, list]) -> None:
    n, unions = case
    uf = UnionFind()
    assert uf.new(n).tolist() == list(range(n))
    for a, b, as_array in unions:
        if as_array:
            uf.union_arrays(np.array([[a]]), np.array([[b]]))
        else:
            uf.union(a, b)
    want = _components(n, [(a, b) for a, b, _ in unions])
    assert uf.roots().tolist() == want
    assert [uf.find(a) for a in range(n)] == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=60), st.sampled_from([(-1,), (2, -1)]))
def test_unique_ints_is_numpys_unique(values: list[int], shape: tuple[int, ...]) -> None:
    """The sort-based dedup the trace uses gives np.unique's answer on any int array (empty,
    one value, repeats, two dims), dtype included."""
    a = np.array(values[:len(values) // 2 * 2] if len(shape) == 2 else values, np.int64)
    a = a.reshape(shape) if a.size or len(shape) == 1 else a.reshape(2, 0)
    got, want = unique_ints(a), np.unique(a)
    assert got.dtype == want.dtype and got.tolist() == want.tolist()
