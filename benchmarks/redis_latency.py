"""Per-operation latency of the ``redis`` backend against plain redis-py, same server.

Starts its own ``redis-server`` on a free loopback port (``apt-get install
redis-server``), then measures in interleaved rounds: redis-py ``GET``, ``SET``
and ``INCR``, and Flask-SharedState's ``get``, ``set`` and ``incr`` on the
``redis`` backend. Each figure is the median over rounds of the mean latency
of ``--ops`` operations, in microseconds; "x per round" is the median of the
ratios within each round, which a shared machine's changing load disturbs
less (many short rounds, e.g. ``--ops 2000 --rounds 50``, steady it more).

``--instructions`` counts instead the client's CPU instructions per operation,
under ``valgrind --tool=callgrind`` (``apt-get install valgrind``): exact and
unmoved by the machine's load, though blind to the server's work and to time
spent waiting. Run::

    python benchmarks/redis_latency.py [--ops 20000] [--rounds 5] [--instructions]
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
import timing
from flask import Flask
from redisserver import redis_server

from flask_sharedstate import SharedState

PAIRS = (("get", "GET"), ("set", "SET"), ("incr", "INCR"))


@contextmanager
def cases(url: str) -> Iterator[dict[str, Callable[[], object]]]:
    """The six cases on the Redis at ``url``: redis-py's commands, then the backend's."""
    client = redis.Redis.from_url(url)
    app = Flask("benchmark")
    app.config.update(
        SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL=url, SECRET_KEY="benchmark"
    )
    shared = SharedState(app)
    client.set("plain", 0)
    shared.set("n", 0)
    try:
        yield {
            "redis-py GET": lambda: client.get("plain"),
            "redis-py SET": lambda: client.set("plain", 1),
            "redis-py INCR": lambda: client.incr("plain"),
            "redis backend get": lambda: shared.get("n"),
            "redis backend set": lambda: shared.set("n", 1),
            "redis backend incr": lambda: shared.incr("n"),
        }
    finally:
        shared.state().backend.close()
        client.close()


def main() -> int:
    parser = timing.parser(__doc__ or "")
    parser.add_argument(
        "--instructions", action="store_true", help="count CPU instructions under valgrind"
    )
    parser.add_argument("--phases", help=MARKED_RUN)  # (the run under valgrind)
    args = parser.parse_args()
    if args.phases:
        return marked_run(args.phases, args.ops)
    with redis_server() as url:
        if args.instructions:
            return count_instructions(url, min(args.ops, 2000))
        with cases(url) as ops:
            results = timing.interleaved(ops, args.ops, args.rounds)
        median = {name: statistics.median(v) for name, v in results.items()}
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{args.rounds} rounds of {args.ops} operations, one client, {url}")
        print(f"load average {load} on {os.cpu_count()} CPUs")
        print(f"{'case':24} {'µs/op':>8} {'x redis-py':>11} {'x per round':>12}")
        for ours, plain in PAIRS:
            base = median[f"redis-py {plain}"]
            print(f"{'redis-py ' + plain:24} {base:8.1f} {1:11.2f} {1:12.2f}")
            mine = median[f"redis backend {ours}"]
            rounds = zip(
                results[f"redis backend {ours}"], results[f"redis-py {plain}"], strict=True
            )
            paired = statistics.median(a / b for a, b in rounds)
            print(f"{'redis backend ' + ours:24} {mine:8.1f} {mine / base:11.2f} {paired:12.2f}")
        return 0


MARKED_RUN = (
    "internal: the Redis URL; run each case --ops times, calling getppid() (callgrind's"
    " dump marker) between cases"
)


def marked_run(url: str, ops: int) -> int:
    """Each case ``ops`` times after a warm-up, a ``getppid()`` before each: one dump each."""
    with cases(url) as ops_by_name:
        ops_by_name = {"(empty loop)": lambda: None, **ops_by_name}
        for op in ops_by_name.values():
            for _ in range(200):
                op()
        for op in ops_by_name.values():
            os.getppid()  # callgrind dumps the counts so far: the next dump is this case's
            for _ in range(ops):
                op()
        os.getppid()
    return 0


def count_instructions(url: str, ops: int) -> int:
    """Run :func:`marked_run` under callgrind; print instructions per op and the ratios."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind: apt-get install valgrind")
    folder = tempfile.mkdtemp(prefix="fss-callgrind-")
    try:
        out = os.path.join(folder, "callgrind.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
                sys.executable,
                os.path.abspath(__file__),
                "--phases",
                url,
                "--ops",
                str(ops),
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        totals = []
        dumps = [n for n in os.listdir(folder) if re.fullmatch(r"callgrind\.out\.\d+", n)]
        for name in sorted(dumps, key=lambda n: int(n.rsplit(".", 1)[1])):
            with open(os.path.join(folder, name)) as file:
                match = re.search(r"^totals: (\d+)", file.read(), re.MULTILINE)
            totals.append(int(match.group(1)) if match else 0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # Dump 1 is the start-up; dumps 2.. are the cases in order (the last is the rest).
    names = ["(empty loop)", "redis-py GET", "redis-py SET", "redis-py INCR"] + [
        f"redis backend {o}" for o, _ in PAIRS
    ]
    per_op = dict(zip(names, [t / ops for t in totals[1 : 1 + len(names)]], strict=True))
    loop = per_op.pop("(empty loop)")
    print(f"client CPU instructions per operation (callgrind, {ops} operations each)")
    print(f"{'case':24} {'instr/op':>10} {'x redis-py':>11}")
    for ours, plain in PAIRS:
        base = per_op[f"redis-py {plain}"] - loop
        mine = per_op[f"redis backend {ours}"] - loop
        print(f"{'redis-py ' + plain:24} {base:10.0f} {1:11.3f}")
        print(f"{'redis backend ' + ours:24} {mine:10.0f} {mine / base:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
