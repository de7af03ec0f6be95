"""Per-operation latency of the ``redis`` backend against plain redis-py, same server.

Starts its own ``redis-server`` on a free loopback port (``apt-get install
redis-server``), then measures in interleaved rounds: redis-py ``GET``, ``SET``
and ``INCR``, and Flask-SharedState's ``get``, ``set`` and ``incr`` on the
``redis`` backend. Each figure is the median over rounds of the mean latency
of ``--ops`` operations, in microseconds; "x per round" is the median of the
ratios within each round, which a shared machine's changing load disturbs
less (many short rounds, e.g. ``--ops 2000 --rounds 50``, steady it more). Run::

    python benchmarks/redis_latency.py [--ops 20000] [--rounds 5]
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import redis
import timing
from flask import Flask
from redisserver import redis_server

from flask_sharedstate import SharedState


def main() -> int:
    parser = timing.parser(__doc__ or "")
    args = parser.parse_args()
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        app = Flask("benchmark")
        app.config.update(
            SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL=url, SECRET_KEY="benchmark"
        )
        shared = SharedState(app)
        client.set("plain", 0)
        shared.set("n", 0)
        cases: dict[str, Callable[[], object]] = {
            "redis-py GET": lambda: client.get("plain"),
            "redis-py SET": lambda: client.set("plain", 1),
            "redis-py INCR": lambda: client.incr("plain"),
            "redis backend get": lambda: shared.get("n"),
            "redis backend set": lambda: shared.set("n", 1),
            "redis backend incr": lambda: shared.incr("n"),
        }
        results = timing.interleaved(cases, args.ops, args.rounds)
        median = {name: statistics.median(v) for name, v in results.items()}
        print(f"{args.rounds} rounds of {args.ops} operations, one client, {url}")
        print(f"{'case':24} {'µs/op':>8} {'x redis-py':>11} {'x per round':>12}")
        for ours, plain in (("get", "GET"), ("set", "SET"), ("incr", "INCR")):
            base = median[f"redis-py {plain}"]
            print(f"{'redis-py ' + plain:24} {base:8.1f} {1:11.2f} {1:12.2f}")
            mine = median[f"redis backend {ours}"]
            rounds = zip(
                results[f"redis backend {ours}"], results[f"redis-py {plain}"], strict=True
            )
            paired = statistics.median(a / b for a, b in rounds)
            print(f"{'redis backend ' + ours:24} {mine:8.1f} {mine / base:11.2f} {paired:12.2f}")
        shared.state().backend.close()
        client.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
