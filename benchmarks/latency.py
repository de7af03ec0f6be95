"""Per-operation latency of the ``manager`` backend against its baselines.

Measured in one run, on this machine, with interleaved rounds:

* **floor**: one :mod:`multiprocessing.connection` round trip of a small
  tuple over a unix socket, to a server that answers at once;
* **seed**: the recipe users copy (``BaseManager`` + ``DictProxy`` +
  ``AcquirerProxy``, here over a unix socket too), whose increment is
  lock, get, set, unlock;
* **redis-py**: ``GET``, ``SET``, ``INCR`` to a private ``redis-server`` on
  loopback TCP (the benchmark starts it);
* **diskcache**: ``Cache.get``, ``set``, ``incr`` (SQLite in this process; no
  server);
* **manager**: Flask-SharedState's embedded state server; its ``get`` also with
  the client-side read cache off (``SHAREDSTATE_CLIENT_CACHE = 0``).

Gets read a short string, sets write one, increments add 1 to a number.
Each figure is the median over rounds of the mean latency of ``--ops``
operations, in microseconds. Run::

    python benchmarks/latency.py [--ops 20000] [--rounds 5] [--placement split|same]
        [--json PATH]

``split`` pins the client and the servers to different CPUs, ``same`` to one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import Process
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import AcquirerProxy, BaseManager, DictProxy
from typing import Any

import diskcache
import redis
import timing
from flask import Flask
from redisserver import redis_server

import flask_sharedstate
from flask_sharedstate import SharedState

KEY = b"benchmark-key"


def _floor_server(address: str, ready: threading.Event | None = None) -> None:
    with Listener(address, family="AF_UNIX", authkey=KEY) as listener:
        conn = listener.accept()
        try:
            while True:
                conn.send(conn.recv())
        except EOFError:
            pass


_seed_dict: dict[str, int] = {}
_seed_lock = threading.Lock()


class SeedManager(BaseManager):
    pass


SeedManager.register("get_dict", callable=lambda: _seed_dict, proxytype=DictProxy)
SeedManager.register("get_lock", callable=lambda: _seed_lock, proxytype=AcquirerProxy)


def _seed_server(address: str) -> None:
    manager = SeedManager(address=address, authkey=KEY)
    manager.get_server().serve_forever()


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (affinity is per thread on Linux) to ``cpu``."""
    cpus = {cpu % (os.cpu_count() or 1)}
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def main() -> int:
    parser = timing.parser(__doc__ or "")
    parser.add_argument("--placement", choices=("split", "same"), default="split")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    server_cpu = 1 if args.placement == "split" else 0
    _pin(os.getpid(), 0)

    folder = tempfile.mkdtemp(prefix="fss-bench-")
    processes: list[Process] = []
    with redis_server() as redis_url:
        return _measure(args, folder, processes, server_cpu, redis_url)


def _measure(
    args: argparse.Namespace,
    folder: str,
    processes: list[Process],
    server_cpu: int,
    redis_url: str,
) -> int:
    try:
        floor_address = os.path.join(folder, "floor.sock")
        floor = Process(target=_floor_server, args=(floor_address,), daemon=True)
        floor.start()
        processes.append(floor)
        seed_address = os.path.join(folder, "seed.sock")
        seed = Process(target=_seed_server, args=(seed_address,), daemon=True)
        seed.start()
        processes.append(seed)

        deadline = time.monotonic() + 10
        while not (os.path.exists(floor_address) and os.path.exists(seed_address)):
            if time.monotonic() > deadline:
                raise SystemExit("the baseline servers did not start")
            time.sleep(0.01)
        floor_conn = Client(floor_address, family="AF_UNIX", authkey=KEY)
        seed_manager = SeedManager(address=seed_address, authkey=KEY)
        seed_manager.connect()
        seed_dict = seed_manager.get_dict()  # type: ignore[attr-defined]
        seed_lock = seed_manager.get_lock()  # type: ignore[attr-defined]
        seed_dict["n"] = 0
        seed_dict["g"] = "on"

        def seed_incr() -> None:
            with seed_lock:
                seed_dict["n"] = seed_dict["n"] + 1

        app = Flask("benchmark")
        app.config["SHAREDSTATE_SOCKET"] = os.path.join(folder, "manager.sock")
        shared = SharedState(app)
        backend = app.extensions["sharedstate"].backend
        shared.set("n", 0)
        shared.set("g", "on")
        uncached_app = Flask("benchmark")  # the same namespace, on the same server
        uncached_app.config["SHAREDSTATE_SOCKET"] = app.config["SHAREDSTATE_SOCKET"]
        uncached_app.config["SHAREDSTATE_CLIENT_CACHE"] = 0
        uncached = SharedState(uncached_app)
        uncached.get("g")
        manager_pid = backend.server_pid()
        client = redis.Redis.from_url(redis_url)
        client.set("n", 0)
        client.set("g", "on")
        redis_pid = int(client.info("server")["process_id"])
        disk = diskcache.Cache(os.path.join(folder, "diskcache"))
        disk.set("n", 0)
        disk.set("g", "on")
        # Pin only now that every server thread that will serve us exists.
        for pid in (floor.pid, seed.pid, manager_pid, redis_pid):
            _pin(pid, server_cpu)  # type: ignore[arg-type]

        def atomic_incr() -> None:
            with shared.atomic():
                shared.dict["n"] += 1

        cases: dict[str, Callable[[], object]] = {
            "floor round trip": lambda: (
                floor_conn.send(("get", "n")),
                floor_conn.recv(),
            ),
            "seed get": lambda: seed_dict.get("g"),
            "seed set": lambda: seed_dict.__setitem__("s", "on"),
            "seed incr (locked)": seed_incr,
            "redis-py GET": lambda: client.get("g"),
            "redis-py SET": lambda: client.set("s", "on"),
            "redis-py INCR": lambda: client.incr("n"),
            "diskcache get": lambda: disk.get("g"),
            "diskcache set": lambda: disk.set("s", "on"),
            "diskcache incr": lambda: disk.incr("n"),
            "manager get": lambda: shared.get("g"),
            "manager get (cache off)": lambda: uncached.get("g"),
            "manager set": lambda: shared.set("s", "on"),
            "manager incr": lambda: shared.incr("n"),
            "manager atomic block (one key)": atomic_incr,
        }
        results: dict[str, list[float]] = {name: [] for name in cases}

        def context(name: str) -> Any:
            """Views use SharedState inside their app's context: so do these cases."""
            if name == "manager get (cache off)":
                return uncached_app.app_context()
            return app.app_context() if name.startswith("manager") else contextlib.nullcontext()

        for name, op in cases.items():  # warm up
            with context(name):
                timing.microseconds_per_op(op, min(args.ops, 1000))
        for _ in range(args.rounds):
            for name, op in cases.items():
                with context(name):
                    results[name].append(timing.microseconds_per_op(op, args.ops))

        median = {name: statistics.median(v) for name, v in results.items()}
        floor_us = median["floor round trip"]
        print(f"flask_sharedstate from {os.path.dirname(flask_sharedstate.__file__)}")
        print(f"placement: {args.placement}; {args.rounds} rounds of {args.ops} operations")
        print(f"{'case':34} {'µs/op':>8} {'x floor':>8}")
        for name, us in median.items():
            print(f"{name:34} {us:8.1f} {us / floor_us:8.2f}")
        print()
        speedup = median["seed incr (locked)"] / median["manager incr"]
        print(f"manager incr vs seed locked incr: {speedup:.2f}x faster")
        if args.json:
            _write_json(args, median)
        floor_conn.close()
        client.close()
        disk.close()
        uncached.state().backend.close()
        os.kill(manager_pid, 15)
        return 0
    finally:
        for p in processes:
            p.terminate()
            p.join(5)
        shutil.rmtree(folder, ignore_errors=True)


def _write_json(args: argparse.Namespace, median: dict[str, float]) -> None:
    """The medians, and the same figures as store -> operation -> µs (plots.py reads it)."""
    floor = median["floor round trip"]
    table = {
        "floor": {"get": floor, "set": floor, "incr": floor},
        "seed": {op: median[f"seed {op}"] for op in ("get", "set")},
        "redis-py": {op.lower(): median[f"redis-py {op}"] for op in ("GET", "SET", "INCR")},
        "diskcache": {op: median[f"diskcache {op}"] for op in ("get", "set", "incr")},
        "Flask-SharedState": {op: median[f"manager {op}"] for op in ("get", "set", "incr")},
        "Flask-SharedState, cache off": {"get": median["manager get (cache off)"]},
    }
    table["seed"]["incr"] = median["seed incr (locked)"]

    with open(args.json, "w") as f:
        json.dump(
            {
                "benchmark": "latency",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "load average at the end": os.getloadavg(),
                "python": platform.python_version(),
                "package": os.path.dirname(flask_sharedstate.__file__),
                "placement": args.placement,
                "ops": args.ops,
                "rounds": args.rounds,
                "cases_us": median,
                "us": table,
            },
            f,
            indent=2,
        )
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
