"""The read cache against a recorded history: no stale reads across processes.

Writer processes set keys on one real state server and record each write once
it is acknowledged, with the call's start and end on the machine's monotonic
clock (the same for every process). Reader processes read the same keys (most
reads answered by their read cache) and record each read with its start and
end. The checker then holds every read to what linearizability allows.
"""

from __future__ import annotations

import bisect
import json
import multiprocessing
import os
from collections import defaultdict
from typing import Any

import historyworkers
from historyworkers import TTL, TTL_KEY

ctx = multiprocessing.get_context("spawn")

WRITERS = 2
READERS = 3
SECONDS = 2.0


class Writes:
    """One key's writes, sorted by acknowledgement, with the latest start acknowledged so far."""

    def __init__(self, writes: list[dict[str, Any]]) -> None:
        self.by_ack = sorted(writes, key=lambda w: w["t1"])
        self.acks = [w["t1"] for w in self.by_ack]
        self.latest_start: list[float] = []
        latest = float("-inf")
        for w in self.by_ack:
            latest = max(latest, w["t0"])
            self.latest_start.append(latest)
        self.by_value = {tuple(w["value"]): w for w in writes}

    def acked_before(self, t: float) -> int:
        return bisect.bisect_left(self.acks, t)

    def overwritten_before(self, write: dict[str, Any], t: float) -> bool:
        """Whether a write begun after ``write``'s acknowledgement was acknowledged before t."""
        n = self.acked_before(t)
        return n > 0 and self.latest_start[n - 1] > write["t1"]


def violations(writes: list[dict[str, Any]], reads: list[dict[str, Any]]) -> list[str]:
    """Every read that returned what no linearization allows, explained."""
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in writes:
        per_key[w["key"]].append(w)
    index = {key: Writes(ws) for key, ws in per_key.items()}
    empty = Writes([])
    found = []
    for r in reads:
        key, value, start, end = r["key"], r["value"], r["t0"], r["t1"]
        ttl = TTL if key == TTL_KEY else None
        w = index.get(key, empty)
        if value is None:
            # Absent: wrong if a write was acknowledged before the read began and its
            # value (or a newer one's) cannot have expired before the read ended.
            for write in w.by_ack[: w.acked_before(start)]:
                if ttl is None or write["t0"] + ttl > end:
                    found.append(f"read of {key!r} at {start:.6f} found it absent, but {write}")
                    break
            continue
        if value == []:  # `key in shared.dict` said present
            live = [
                x for x in w.by_ack if x["t0"] < end and (ttl is None or x["t1"] + ttl >= start)
            ]
            if not live:
                found.append(f"read of {key!r} at {start:.6f} found it present; no write can be")
            continue
        write = w.by_value.get(tuple(value))
        if write is None:
            found.append(f"read of {key!r} returned {value}, which nobody wrote")
        elif write["t0"] >= end:
            found.append(f"read of {key!r} at {start:.6f} returned a later write: {write}")
        elif w.overwritten_before(write, start):
            found.append(
                f"STALE: read of {key!r} at {start:.6f}-{end:.6f} returned {value}"
                f" (acknowledged at {write['t1']:.6f}), overwritten by a write acknowledged"
                " before the read began"
            )
        elif ttl is not None and write["t1"] + ttl < start:
            found.append(
                f"EXPIRED: read of {key!r} at {start:.6f} returned {value}, whose ttl ran out"
                f" by {write['t1'] + ttl:.6f}"
            )
    return found


def test_checker_catches_a_stale_read() -> None:
    """The checker itself: a read of an overwritten value is reported, a current one is not."""
    writes = [
        {"key": "k0", "value": [1, 1], "t0": 0.0, "t1": 1.0},
        {"key": "k0", "value": [2, 1], "t0": 2.0, "t1": 3.0},
        {"key": TTL_KEY, "value": [1, 2], "t0": 0.0, "t1": 0.01},
    ]
    good = [{"key": "k0", "value": [2, 1], "t0": 3.5, "t1": 3.6}]
    concurrent = [{"key": "k0", "value": [1, 1], "t0": 2.5, "t1": 2.6}]
    stale = [{"key": "k0", "value": [1, 1], "t0": 3.5, "t1": 3.6}]
    expired = [{"key": TTL_KEY, "value": [1, 2], "t0": 1.0, "t1": 1.1}]
    absent = [{"key": "k0", "value": None, "t0": 1.5, "t1": 1.6}]
    assert violations(writes, good + concurrent) == []
    assert "STALE" in violations(writes, stale)[0]
    assert "EXPIRED" in violations(writes, expired)[0]
    assert "absent" in violations(writes, absent)[0]


def test_no_stale_reads_across_processes(run_dir: str) -> None:
    """2 writers and 3 readers on one server for 2 s: every read (mostly cache hits) returns
    the latest write acknowledged before it began, or a newer one; a key whose ttl ran out
    is absent from cached reads as it is on the server."""
    roles = [historyworkers.writer] * WRITERS + [historyworkers.reader] * READERS
    writes, reads, runs = run_history(run_dir, roles, SECONDS)
    hits = sum(run.get("stats", {}).get("hits", 0) for run in runs)
    assert len(writes) > 100 and len(reads) > 1000, f"{len(writes)} writes, {len(reads)} reads"
    assert hits > len(reads) // 4, f"only {hits} of {len(reads)} reads were cache hits"
    first_ttl_ack = min((w["t1"] for w in writes if w["key"] == TTL_KEY), default=float("inf"))
    expired = [
        r for r in reads if r["key"] == TTL_KEY and r["value"] is None and r["t0"] > first_ttl_ack
    ]
    assert expired, "no read found the ttl key expired after a write: the ttl check did not run"
    found = violations(writes, reads)
    stale = [f for f in found if f.startswith("STALE")]
    assert not found, (
        f"{len(found)} of {len(reads)} reads broke the history ({len(stale)} stale values):\n"
        + "\n".join(found[:3] + stale[:3])
    )


def run_history(
    run_dir: str, roles: list[Any], seconds: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Run each role (a historyworkers function) in a process of its own on one server
    for ``seconds``; return the writes, the reads, and each process's whole output."""
    socket_path = os.path.join(run_dir, "app.sock")
    barrier = ctx.Barrier(len(roles))
    procs = []
    outputs = []
    try:
        for i, role in enumerate(roles):
            out = os.path.join(run_dir, f"{role.__name__}-{i}.json")
            outputs.append(out)
            p = ctx.Process(target=role, args=(socket_path, i, barrier, seconds, out))
            p.start()
            procs.append(p)
        for p in procs:
            p.join(120)
            assert p.exitcode == 0, f"a history process exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    writes: list[dict[str, Any]] = []
    reads: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for out in outputs:
        with open(out) as f:
            data = json.load(f)
        runs.append(data)
        for record in data["records"]:
            (writes if record["kind"] == "write" else reads).append(record)
    return writes, reads, runs
