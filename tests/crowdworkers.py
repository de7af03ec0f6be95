"""Client processes for ``test_crowd.py``, run as ``python crowdworkers.py JOB ...``.

Each starts at a wall-clock instant given by the test, runs its crowd (gevent
greenlets, monkey-patched before anything else is imported, or plain threads),
and prints one JSON line of counts. The backend comes from ``FSS_TEST_BACKEND``
(see ``workers.make_shared``).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[2] == "gevent":
    from gevent import monkey

    monkey.patch_all()

import json  # noqa: E402 - after gevent's patching
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workers  # noqa: E402


def _crowd(mode: str, count: int, task: Callable[[], None]) -> None:
    if mode == "gevent":
        import gevent

        gevent.joinall([gevent.spawn(task) for _ in range(count)], timeout=120)
    else:
        threads = [threading.Thread(target=task) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)


def _wait_until(start: float) -> None:
    while time.time() < start:
        time.sleep(0.01)


def get_or_set(socket_path: str, mode: str, count: int, start: float) -> dict[str, int]:
    """``count`` callers of get_or_set on one cold key; fn takes 0.5 s."""
    shared = workers.make_shared(socket_path, timeout=5.0)
    shared.incr("warm")  # connected (and the server elected) before the crowd starts
    out: Counter[str] = Counter()

    def fn() -> str:
        shared.incr("runs")
        time.sleep(0.5)
        return f"value-{os.getpid()}"

    def one() -> None:
        try:
            value = shared.get_or_set("cold", fn)
            out["value:" + str(value)] += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported by the test
            out[type(exc).__name__] += 1

    _wait_until(start)
    _crowd(mode, count, one)
    return dict(out)


def incr(socket_path: str, mode: str, count: int, start: float, each: int) -> dict[str, int]:
    """``count`` callers each calling incr ``each`` times on one key."""
    shared = workers.make_shared(socket_path, timeout=5.0)
    shared.incr("warm")
    out: Counter[str] = Counter()

    def one() -> None:
        for _ in range(each):
            try:
                shared.incr("n")
                out["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported by the test
                out[f"{type(exc).__name__}: {exc}"[:200]] += 1

    _wait_until(start)
    _crowd(mode, count, one)
    return dict(out)


def runner(socket_path: str, go_file: str) -> dict[str, str]:
    """One get_or_set whose fn says it started (``started``), then waits for ``go_file``."""
    shared = workers.make_shared(socket_path, timeout=5.0)

    def fn() -> str:
        shared.incr("started")
        for _ in range(1200):  # bounded: 60 s
            if os.path.exists(go_file):
                break
            time.sleep(0.05)
        return "first"

    try:
        return {"result": str(shared.get_or_set("k", fn))}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__" and sys.argv[1] == "runner":
    print(json.dumps(runner(sys.argv[3], sys.argv[4])), flush=True)
elif __name__ == "__main__":
    job, mode, path, count, start = sys.argv[1:6]
    extra = [int(a) for a in sys.argv[6:]]
    result = {"get_or_set": get_or_set, "incr": incr}[job](
        path, mode, int(count), float(start), *extra
    )
    print(json.dumps(result), flush=True)
