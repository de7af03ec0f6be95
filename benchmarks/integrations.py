"""Per-operation cost of the integrations against the same library's Redis storage.

In one run, one client, interleaved rounds, a private ``redis-server`` on loopback:

* limits: ``sharedstate://`` on the embedded server against limits' own ``redis://``,
  for the fixed window (``incr``), the moving window and the sliding-window counter
  (``acquire_...`` of a hit that is let through);
* cachelib: ``SharedStateCache`` on the embedded server against cachelib's
  ``RedisCache``, for ``get``, ``set`` and ``inc``.

Each figure is the median over rounds of the mean latency of ``--ops`` operations,
in microseconds; the last column is Redis's time over ours (above 1: we are faster).
Run::

    python benchmarks/integrations.py [--ops 5000] [--rounds 5]
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
from collections.abc import Callable

import timing
from cachelib import RedisCache
from flask import Flask
from limits.storage import RedisStorage
from redisserver import redis_server

from flask_sharedstate import SharedState
from flask_sharedstate.caching import SharedStateCache
from flask_sharedstate.limiter import SharedStateStorage


def cases(url: str, folder: str) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (ours, redis's)"""
    fresh = itertools.count()
    ours_limits = SharedStateStorage("sharedstate://")
    redis_limits = RedisStorage(url)
    import redis

    ours_cache = SharedStateCache(default_timeout=300)
    redis_cache = RedisCache(redis.Redis.from_url(url), default_timeout=300)
    ours_cache.set("k", "value")
    redis_cache.set("k", "value")
    return {
        "limits incr (fixed window)": (
            lambda: ours_limits.incr("fixed", 60),
            lambda: redis_limits.incr("fixed", 60),
        ),
        "limits moving window hit": (
            lambda: ours_limits.acquire_entry(f"mw{next(fresh)}", 100, 60),
            lambda: redis_limits.acquire_entry(f"mw{next(fresh)}", 100, 60),
        ),
        "limits sliding window hit": (
            lambda: ours_limits.acquire_sliding_window_entry(f"sw{next(fresh)}", 100, 60),
            lambda: redis_limits.acquire_sliding_window_entry(f"sw{next(fresh)}", 100, 60),
        ),
        "cachelib get": (lambda: ours_cache.get("k"), lambda: redis_cache.get("k")),
        "cachelib set": (
            lambda: ours_cache.set("k", "value"),
            lambda: redis_cache.set("k", "value"),
        ),
        "cachelib inc": (lambda: ours_cache.inc("n"), lambda: redis_cache.inc("n")),
    }


def main() -> int:
    parser = timing.parser(__doc__ or "")
    parser.set_defaults(ops=5000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fss-bench-")
    app = Flask("integrations_benchmark")
    app.config["SHAREDSTATE_SOCKET"] = f"{folder}/state.sock"
    shared = SharedState(app)
    with redis_server() as url, app.app_context():
        table = cases(url, folder)
        results: dict[str, list[float]] = {}
        for name, pair in table.items():
            for side, op in zip(("ours", "redis"), pair, strict=True):
                timing.microseconds_per_op(op, min(args.ops, 500))  # warm up, connect
                results[f"{name}/{side}"] = []
        for _ in range(args.rounds):
            for name, pair in table.items():
                for side, op in zip(("ours", "redis"), pair, strict=True):
                    results[f"{name}/{side}"].append(timing.microseconds_per_op(op, args.ops))
        median = {k: statistics.median(v) for k, v in results.items()}
        print(f"{args.rounds} rounds of {args.ops} operations, one client")
        print(f"{'operation':28} {'embedded µs':>12} {'Redis µs':>10} {'Redis/ours':>11}")
        for name in table:
            ours, theirs = median[f"{name}/ours"], median[f"{name}/redis"]
            print(f"{name:28} {ours:12.1f} {theirs:10.1f} {theirs / ours:11.2f}")
        shared.state().backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
