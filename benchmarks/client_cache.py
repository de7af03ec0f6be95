"""Reads of unchanged keys with the client-side read cache on and off (issue 11).

In one run, on this machine:

* **latency** of ``shared.get`` through the public API (a Flask app, the
  ``manager`` backend, a real state server) of four values: a short string, a
  dict of ten ints, 1 KB and 100 KB of bytes; each with the cache on (the
  default) and off (``SHAREDSTATE_CLIENT_CACHE = 0``, a second app on the same
  server), against redis-py ``GET`` of the same pickled bytes on a private
  ``redis-server``, the raw floor (one :mod:`multiprocessing.connection` round
  trip over a unix socket that returns those bytes) and ``pickle.loads`` of the
  bytes in this process (the least a read that returns a fresh copy costs).
  Each figure is the median over ``--rounds`` interleaved rounds of the mean
  latency of ``--ops`` reads (each round also stops after ``--max-seconds``);
* **the write-heavy mix**: ``--procs`` processes each doing 50% ``set`` and 50%
  ``get`` of random keys among 100, cache on against cache off, in interleaved
  rounds; the figure is operations per second of all processes together.

Targets (issue 11): a cached short string at most 1 µs, a dict of ten ints at
most 3 µs, both at least 15x faster than the uncached ``get`` and than redis-py
``GET``; the mix with the cache at most 1.1x slower than without. Absolute
figures move with the machine's load: compare the ratios, all from one run. Run::

    python benchmarks/client_cache.py [--ops 20000] [--rounds 5] [--json PATH]

To measure a branch other than the installed package, put it first on the
path: ``PYTHONPATH=/path/to/worktree python benchmarks/client_cache.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import platform
import queue
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from typing import Any

import redis
import timing
from flask import Flask
from redisserver import redis_server

import flask_sharedstate
from flask_sharedstate import SharedState

KEY = b"benchmark-key"
NAMESPACE = "client-cache-bench"
VALUES: dict[str, Any] = {
    "short string": "on",
    "dict of ten ints": {f"k{i}": i for i in range(10)},
    "1 KB": bytes(range(256)) * 4,
    "100 KB": bytes(range(256)) * 400,
}
TARGETS_US = {"short string": 1.0, "dict of ten ints": 3.0}
TARGET_SPEEDUP = 15.0
TARGET_MIX = 1.1
MIX_KEYS = 100


def _packed(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _floor_server(address: str, blobs: dict[str, bytes]) -> None:
    """Answer ("get", name) with the pickled bytes of that value, as fast as a server can."""
    with Listener(address, family="AF_UNIX", authkey=KEY) as listener:
        conn = listener.accept()
        try:
            while True:
                conn.send(blobs[conn.recv()[1]])
        except EOFError:
            pass


def _app(socket_path: str, cache: int | None) -> SharedState:
    """A SharedState on its own Flask app; ``cache=None`` leaves the cache at its default."""
    app = Flask("client_cache_benchmark")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    app.config["SHAREDSTATE_NAMESPACE"] = NAMESPACE
    if cache is not None:
        app.config["SHAREDSTATE_CLIENT_CACHE"] = cache
    return SharedState(app)


def timed(op: Callable[[], object], ops: int, max_seconds: float) -> float:
    """Mean µs per call of ``op`` over at most ``ops`` calls and about ``max_seconds``."""
    batch = 100
    done = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    while done < ops:
        for _ in range(batch):
            op()
        done += batch
        if time.perf_counter() > deadline:
            break
    return (time.perf_counter() - start) / done * 1e6


def latency(args: Any, folder: str, url: str) -> dict[str, dict[str, float]]:
    """name of value -> case -> median µs per read."""
    blobs = {name: _packed(value) for name, value in VALUES.items()}
    floor_address = os.path.join(folder, "floor.sock")
    ctx = multiprocessing.get_context("spawn")
    floor = ctx.Process(target=_floor_server, args=(floor_address, blobs), daemon=True)
    floor.start()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(floor_address):
            if time.monotonic() > deadline:
                raise SystemExit("the floor server did not start")
            time.sleep(0.01)
        floor_conn = Client(floor_address, family="AF_UNIX", authkey=KEY)
        socket_path = os.path.join(folder, "state.sock")
        cached = _app(socket_path, None)
        uncached = _app(socket_path, 0)
        client = redis.Redis.from_url(url)
        cases: dict[tuple[str, str], Callable[[], object]] = {}
        for i, (name, value) in enumerate(VALUES.items()):
            key = f"value:{i}"
            cached.set(key, value)
            client.set(key, blobs[name])
            blob = blobs[name]
            cases[(name, "cache on")] = lambda key=key: cached.get(key)
            cases[(name, "cache off")] = lambda key=key: uncached.get(key)
            cases[(name, "redis-py GET")] = lambda key=key: client.get(key)
            cases[(name, "floor round trip")] = lambda name=name: (
                floor_conn.send(("get", name)),
                floor_conn.recv(),
            )
            cases[(name, "pickle.loads")] = lambda blob=blob: pickle.loads(blob)
        for (name, case), op in cases.items():  # warm up; and check what each case reads
            op()
            got = op()
            want: Any = blobs[name] if case in ("redis-py GET",) else VALUES[name]
            if case == "floor round trip":
                got, want = got[1], blobs[name]  # type: ignore[index]
            if got != want:
                raise SystemExit(f"{case} of {name} read {got!r:.60}, not the value")
            timed(op, min(args.ops, 1000), args.max_seconds)
        results: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        for round_ in range(args.rounds):
            for case, op in cases.items():
                results[case].append(timed(op, args.ops, args.max_seconds))
            print(f"  latency round {round_ + 1}/{args.rounds} done", flush=True)
        table: dict[str, dict[str, float]] = {name: {} for name in VALUES}
        for (name, case), values in results.items():
            table[name][case] = statistics.median(values)
        floor_conn.close()
        client.close()
        server_pid = cached.state().backend.server_pid()  # type: ignore[attr-defined]
        for shared in (cached, uncached):
            shared.state().backend.close()
        os.kill(server_pid, signal.SIGTERM)
        return table
    finally:
        floor.terminate()
        floor.join(10)


def _mix_worker(
    socket_path: str,
    cache: int | None,
    ops: int,
    max_seconds: float,
    seed: int,
    start: Any,
    results: Any,
) -> None:
    """One process of the mix: connect, wait for the start, then 50% set / 50% get."""
    shared = _app(socket_path, cache)
    rng = random.Random(seed)
    keys = [f"mix:{i}" for i in range(MIX_KEYS)]
    plan = [(rng.random() < 0.5, rng.choice(keys)) for _ in range(ops)]
    for key in keys:  # connected, and every key read once (cached, when the cache is on)
        shared.get(key)
    if not start.wait(60):
        return
    done = 0
    began = time.perf_counter()
    deadline = began + max_seconds
    for write, key in plan:
        if write:
            shared.set(key, f"value {done}")
        else:
            shared.get(key)
        done += 1
        if done % 256 == 0 and time.perf_counter() > deadline:
            break
    results.put((done, time.perf_counter() - began))
    shared.state().backend.close()


def mix(args: Any, folder: str) -> dict[str, Any]:
    """Operations per second of ``--procs`` processes, 50% writes on 100 keys, cache on/off."""
    ctx = multiprocessing.get_context("spawn")
    socket_path = os.path.join(folder, "mix.sock")
    owner = _app(socket_path, 0)
    owner.set_many({f"mix:{i}": f"value {i}" for i in range(MIX_KEYS)})
    rates: dict[str, list[float]] = {"cache on": [], "cache off": []}
    try:
        for round_ in range(args.rounds):
            for case, cache in (("cache on", None), ("cache off", 0)):
                start = ctx.Event()
                results = ctx.Queue()
                procs = [
                    ctx.Process(
                        target=_mix_worker,
                        args=(
                            socket_path,
                            cache,
                            args.mix_ops,
                            args.max_seconds,
                            1000 * round_ + i,
                            start,
                            results,
                        ),
                        daemon=True,
                    )
                    for i in range(args.procs)
                ]
                for p in procs:
                    p.start()
                time.sleep(0.5)  # let every process connect and read its keys first
                start.set()
                try:
                    answers = [results.get(timeout=args.max_seconds + 60) for _ in procs]
                except queue.Empty:
                    raise SystemExit(f"a mix process ({case}) did not finish") from None
                finally:
                    for p in procs:
                        p.join(30)
                        if p.is_alive() and p.pid is not None:
                            os.kill(p.pid, signal.SIGKILL)
                            p.join(5)
                total = sum(done for done, _ in answers)
                rates[case].append(total / max(elapsed for _, elapsed in answers))
            print(f"  mix round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        server_pid = owner.state().backend.server_pid()  # type: ignore[attr-defined]
        owner.state().backend.close()
        os.kill(server_pid, signal.SIGTERM)
    on = statistics.median(rates["cache on"])
    off = statistics.median(rates["cache off"])
    return {
        "procs": args.procs,
        "keys": MIX_KEYS,
        "writes": 0.5,
        "ops per second": {"cache on": on, "cache off": off},
        "slowdown with cache": off / on,
    }


def report(table: dict[str, dict[str, float]], mixed: dict[str, Any] | None) -> bool:
    """Print the tables; return whether every target was met."""
    met = True
    cases = ("cache on", "cache off", "redis-py GET", "floor round trip", "pickle.loads")
    print(f"\n{'value':18}" + "".join(f"{c:>18}" for c in cases) + f"{'off/on':>9}{'redis/on':>10}")
    for name, row in table.items():
        off_ratio = row["cache off"] / row["cache on"]
        redis_ratio = row["redis-py GET"] / row["cache on"]
        cells = "".join(f"{row[c]:16.2f}µs" for c in cases)
        print(f"{name:18}{cells}{off_ratio:8.1f}x{redis_ratio:9.1f}x")
    print("\ntargets (issue 11):")
    for name, bound in TARGETS_US.items():
        row = table[name]
        speedups = (row["cache off"] / row["cache on"], row["redis-py GET"] / row["cache on"])
        ok = row["cache on"] <= bound and min(speedups) >= TARGET_SPEEDUP
        met = met and ok
        print(
            f"  {name}: {row['cache on']:.2f} µs (<= {bound:g}), {speedups[0]:.1f}x uncached"
            f" and {speedups[1]:.1f}x redis-py GET (>= {TARGET_SPEEDUP:g}x): "
            + ("met" if ok else "NOT MET")
        )
    if mixed is not None:
        rates = mixed["ops per second"]
        slowdown = mixed["slowdown with cache"]
        ok = slowdown <= TARGET_MIX
        met = met and ok
        print(
            f"  write-heavy mix, {mixed['procs']} processes, 50% writes on {mixed['keys']} keys:"
            f" {rates['cache on']:,.0f} ops/s with the cache, {rates['cache off']:,.0f} without;"
            f" {slowdown:.2f}x slower with it (<= {TARGET_MIX:g}x): " + ("met" if ok else "NOT MET")
        )
    return met


def main() -> int:
    parser = timing.parser(__doc__ or "")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="bound of one timing")
    parser.add_argument("--procs", type=int, default=4, help="processes of the mix")
    parser.add_argument("--mix-ops", type=int, default=20000, help="operations per process")
    parser.add_argument("--rounds-mix", type=int, default=None, help="(default: --rounds)")
    parser.add_argument("--no-mix", action="store_true", help="only the latency table")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fss-cache-bench-")
    try:
        with redis_server() as url:
            table = latency(args, folder, url)
        mixed = None
        if not args.no_mix:
            args.rounds = args.rounds_mix or args.rounds
            mixed = mix(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nflask_sharedstate from {os.path.dirname(flask_sharedstate.__file__)}")
    met = report(table, mixed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "client_cache",
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "python": platform.python_version(),
                    "package": os.path.dirname(flask_sharedstate.__file__),
                    "ops": args.ops,
                    "latency_us": table,
                    "mix": mixed,
                    "targets_met": met,
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
