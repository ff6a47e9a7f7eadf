"""Split a CPU fuzz test into seeded shards that pytest-xdist can spread over its workers."""
from __future__ import annotations

from typing import Callable

from hypothesis import given, seed, settings
from hypothesis.strategies import SearchStrategy


def cpu_shards(name: str, body: Callable, strategy: SearchStrategy, examples: int, shards: int,
               **settings_kw) -> dict:
    """``{name_0: test, ...}``: ``shards`` tests of ``examples // shards`` examples of
    ``strategy`` each, every one calling ``body(case)`` under its own fixed seed (CI sees the
    same examples every run).  Put them in the module with ``globals().update(...)``."""
    def shard(i: int):
        @seed(i)
        @settings(max_examples=examples // shards, **settings_kw)
        @given(case=strategy)
        def test(case):
            body(case)
        test.__name__ = test.__qualname__ = f"{name}_{i}"
        return test
    return {f"{name}_{i}": shard(i) for i in range(shards)}
