"""Code that the cache and limiter process tests run in spawned children."""

from __future__ import annotations

from typing import Any

from flask_sharedstate.caching import SharedStateCache

from workers import make_shared


def cache_inc_many(socket_path: str, count: int, barrier: Any) -> None:
    shared = make_shared(socket_path)
    cache = SharedStateCache()
    with _context(shared):
        barrier.wait(30)
        for _ in range(count):
            cache.inc("hits")


def cache_add_once(socket_path: str, worker: int, barrier: Any, results: Any) -> None:
    shared = make_shared(socket_path)
    cache = SharedStateCache()
    with _context(shared):
        barrier.wait(30)
        results.put((worker, cache.add("winner", worker, timeout=60)))


def _context(shared: Any) -> Any:
    return shared._app.app_context()
