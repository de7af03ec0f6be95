"""Code that the cache and limiter process tests run in spawned children."""

from __future__ import annotations

import time
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


def get_or_set_and_hang(socket_path: str) -> None:
    """Start computing a cold value, say so, and never finish (the test kills us)."""
    shared = make_shared(socket_path)

    def compute() -> str:
        shared.set("runner_started", True)
        time.sleep(600)
        return "never"

    with _context(shared):
        shared.get_or_set("cold", compute, ttl=60)
