"""Writers and readers for the read-history checker (``test_read_history.py``).

Each process writes its history, as JSON lines, to a file of its own. Times are
``time.monotonic()``: one clock for every process of the machine.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from workers import make_shared

#: Keys without a ttl, and the one written with a short ttl.
KEYS = ["k0", "k1", "k2"]
TTL_KEY = "t"
TTL = 0.02
#: How often a write goes to the ttl key: rarely enough that it expires between writes.
TTL_SHARE = 0.05


def writer(socket_path: str, wid: int, barrier: Any, seconds: float, out: str) -> None:
    """Write (wid, n) values: acknowledged, then recorded with the call's start and end.

    Each write is followed at once by a read of the same key (from this process's read
    cache, filled by the read before the write): a read that begins a microsecond
    after the acknowledgement, the narrowest window a late version bump leaves."""
    shared = make_shared(socket_path)
    shared.get("warm-up")  # connected before the clock starts
    rng = random.Random(wid)
    records = []
    barrier.wait(60)
    until = time.monotonic() + seconds
    n = 0
    while time.monotonic() < until and n < 100_000:
        n += 1
        key = TTL_KEY if rng.random() < TTL_SHARE else rng.choice(KEYS)
        value = [wid, n]
        ttl = TTL if key == TTL_KEY else None
        shared.get(key)  # cached now, as most keys of a busy worker are
        began = time.monotonic()
        shared.set(key, value, ttl=ttl)
        acked = time.monotonic()
        records.append({"kind": "write", "key": key, "value": value, "t0": began, "t1": acked})
        began = time.monotonic()
        seen = shared.get(key)
        records.append(
            {"kind": "read", "key": key, "value": seen, "t0": began, "t1": time.monotonic()}
        )
        time.sleep(rng.random() * 0.004)
    with open(out, "w") as f:
        json.dump({"records": records}, f)


def reader(socket_path: str, rid: int, barrier: Any, seconds: float, out: str) -> None:
    """Read the keys again and again (get, dict[k], get_many); record each with its times."""
    shared = make_shared(socket_path)
    shared.get("warm-up")
    rng = random.Random(1000 + rid)
    records: list[dict[str, Any]] = []
    barrier.wait(60)
    until = time.monotonic() + seconds
    n = 0
    while time.monotonic() < until and n < 500_000:
        n += 1
        key = rng.choice([*KEYS, TTL_KEY])
        how = rng.random()
        began = time.monotonic()
        if how < 0.8:
            value = shared.get(key)
        elif how < 0.85:
            try:
                value = shared.dict[key]
            except KeyError:
                value = None
        elif how < 0.9:
            value = [] if key in shared.dict else None  # present: only "some value"
        else:
            value = shared.get_many([key])[key]
        ended = time.monotonic()
        records.append({"kind": "read", "key": key, "value": value, "t0": began, "t1": ended})
    cache = shared.state().backend.read_cache
    stats = cache.stats() if cache is not None else {}
    with open(out, "w") as f:
        json.dump({"records": records, "stats": stats}, f)


def threaded_reader(
    socket_path: str, rid: int, barrier: Any, seconds: float, out: str, threads: int = 8
) -> None:
    """Like ``reader``, in ``threads`` threads sharing one read cache too small for the
    keys (every few reads evict one): exceptions are recorded as failures."""
    import threading

    shared = make_shared(socket_path, SHAREDSTATE_CLIENT_CACHE=700)
    shared.get("warm-up")
    records: list[dict[str, Any]] = []
    errors: list[str] = []

    def run(tid: int) -> None:
        rng = random.Random(2000 + 100 * rid + tid)
        until = time.monotonic() + seconds
        mine: list[dict[str, Any]] = []
        n = 0
        try:
            while time.monotonic() < until and n < 200_000:
                n += 1
                key = rng.choice([*KEYS, TTL_KEY])
                how = rng.random()
                began = time.monotonic()
                if how < 0.7:
                    value = shared.get(key)
                elif how < 0.8:
                    value = [] if key in shared.dict else None
                else:
                    other = rng.choice(KEYS)
                    got = shared.get_many([key, other])
                    value = got[key]
                ended = time.monotonic()
                mine.append({"kind": "read", "key": key, "value": value, "t0": began, "t1": ended})
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(f"{type(exc).__name__}: {exc}")
        records.extend(mine)

    barrier.wait(60)
    workers_ = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in workers_:
        t.start()
    for t in workers_:
        t.join(seconds + 60)
    cache = shared.state().backend.read_cache
    stats = cache.stats() if cache is not None else {}
    with open(out, "w") as f:
        json.dump({"records": records, "stats": stats, "errors": errors}, f)
