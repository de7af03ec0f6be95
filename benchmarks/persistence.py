"""Write throughput of the embedded server with each fsync policy, against no persistence.

One client does ``set`` and ``incr`` in turn against servers that persist with
``SHAREDSTATE_FSYNC`` = ``no``, ``everysec`` and ``always``, and one that does
not persist, in interleaved rounds on this machine's disk. Prints writes per
second (median of the rounds) and the ratio to no persistence. Run::

    python benchmarks/persistence.py [--writes 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from flask import Flask

from flask_sharedstate import SharedState

POLICIES = ("none", "no", "everysec", "always")


def _app(folder: str, policy: str) -> SharedState:
    app = Flask(f"bench_{policy}")
    app.config["SHAREDSTATE_SOCKET"] = os.path.join(folder, f"{policy}.sock")
    if policy != "none":
        app.config["SHAREDSTATE_PERSIST_PATH"] = os.path.join(folder, f"{policy}.db")
        app.config["SHAREDSTATE_FSYNC"] = policy
    return SharedState(app)


def _rate(shared: SharedState, writes: int) -> float:
    start = time.perf_counter()
    for i in range(writes // 2):
        shared.set(f"k{i % 500}", i)
        shared.incr("n")
    return writes / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fss-persist-bench-", dir=os.getcwd())
    apps = {policy: _app(folder, policy) for policy in POLICIES}
    rates: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    try:
        for shared in apps.values():
            _rate(shared, 200)  # start the servers, warm up
        for _ in range(args.rounds):
            for policy, shared in apps.items():
                # always: each write waits for the disk; fewer of them say as much.
                writes = args.writes if policy != "always" else max(args.writes // 10, 200)
                rates[policy].append(_rate(shared, writes))
        base = statistics.median(rates["none"])
        print(f"{args.rounds} rounds, one client, files in {folder}")
        print(f"{'SHAREDSTATE_FSYNC':20} {'writes/s':>10} {'x no persistence':>17}")
        for policy in POLICIES:
            rate = statistics.median(rates[policy])
            label = "(no persistence)" if policy == "none" else policy
            print(f"{label:20} {rate:10,.0f} {rate / base:17.2f}")
        return 0
    finally:
        for shared in apps.values():
            backend = shared.state().backend
            try:
                os.kill(backend.server_pid(), 15)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - best effort; they stop with us anyway
                pass
            backend.close()
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
