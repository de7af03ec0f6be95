"""Per-operation latency of the ``manager`` backend against its baselines.

Measured in one run, on this machine, with interleaved rounds:

* **floor**: one :mod:`multiprocessing.connection` round trip of a small
  tuple over a unix socket, to a server that answers at once;
* **seed**: the recipe users copy (``BaseManager`` + ``DictProxy`` +
  ``AcquirerProxy``, here over a unix socket too), whose increment is
  lock, get, set, unlock;
* **manager**: Flask-SharedState's embedded state server.

Each figure is the median over rounds of the mean latency of ``--ops``
operations, in microseconds. Run::

    python benchmarks/latency.py [--ops 20000] [--rounds 5] [--placement split|same]

``split`` pins the client and the servers to different CPUs, ``same`` to one.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import Process
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import AcquirerProxy, BaseManager, DictProxy

import timing
from flask import Flask

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
    args = parser.parse_args()
    server_cpu = 1 if args.placement == "split" else 0
    _pin(os.getpid(), 0)

    folder = tempfile.mkdtemp(prefix="fss-bench-")
    processes: list[Process] = []
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

        def seed_incr() -> None:
            with seed_lock:
                seed_dict["n"] = seed_dict["n"] + 1

        app = Flask("benchmark")
        app.config["SHAREDSTATE_SOCKET"] = os.path.join(folder, "manager.sock")
        shared = SharedState(app)
        backend = app.extensions["sharedstate"].backend
        shared.set("n", 0)
        manager_pid = backend.server_pid()
        # Pin only now that every server thread that will serve us exists.
        for pid in (floor.pid, seed.pid, manager_pid):
            _pin(pid, server_cpu)  # type: ignore[arg-type]

        def atomic_incr() -> None:
            with shared.atomic():
                shared.dict["n"] += 1

        cases: dict[str, Callable[[], object]] = {
            "floor round trip": lambda: (
                floor_conn.send(("get", "n")),
                floor_conn.recv(),
            ),
            "seed get": lambda: seed_dict.get("n"),
            "seed set": lambda: seed_dict.__setitem__("n", 1),
            "seed incr (locked)": seed_incr,
            "manager get": lambda: shared.get("n"),
            "manager set": lambda: shared.set("n", 1),
            "manager incr": lambda: shared.incr("n"),
            "manager atomic block (one key)": atomic_incr,
        }
        results: dict[str, list[float]] = {name: [] for name in cases}
        for op in cases.values():  # warm up
            timing.microseconds_per_op(op, min(args.ops, 1000))
        for _ in range(args.rounds):
            for name, op in cases.items():
                results[name].append(timing.microseconds_per_op(op, args.ops))

        median = {name: statistics.median(v) for name, v in results.items()}
        floor_us = median["floor round trip"]
        print(f"placement: {args.placement}; {args.rounds} rounds of {args.ops} operations")
        print(f"{'case':34} {'µs/op':>8} {'x floor':>8}")
        for name, us in median.items():
            print(f"{name:34} {us:8.1f} {us / floor_us:8.2f}")
        print()
        speedup = median["seed incr (locked)"] / median["manager incr"]
        print(f"manager incr vs seed locked incr: {speedup:.2f}x faster")
        floor_conn.close()
        os.kill(manager_pid, 15)
        return 0
    finally:
        for p in processes:
            p.terminate()
            p.join(5)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


if __name__ == "__main__":
    sys.exit(main())
