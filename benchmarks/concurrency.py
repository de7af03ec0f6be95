"""Many concurrent clients: ``incr`` throughput against Redis ``INCR``, in one run.

Each shape is 4 client processes, each running N threads (1, 16, 64, 256) or
256 gevent greenlets, every one calling ``incr`` on one key in a loop for a
fixed time. The same shapes run against Flask-SharedState's embedded state
server (``manager`` backend, unix socket, defaults) and against a private
``redis-server`` (redis-py, one client and so one connection pool per process,
``max_connections`` above the thread count, on loopback TCP) that this
benchmark starts. Reported per shape and target: operations per second,
the ratio to Redis, errors, and the server's threads and open descriptors
sampled mid-run (``/proc/PID/task``, ``/proc/PID/fd``). Run::

    python benchmarks/concurrency.py [--seconds 5] [--shapes 1,16,64,256,g256]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from redisserver import redis_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 4

# One client process: prints "ops errors" after the run. argv: target, url or
# socket, clients, seconds, start time (wall clock, so that all four start together),
# gevent (0/1).
CLIENT = textwrap.dedent(
    """
    import sys
    if sys.argv[6] == "1":
        from gevent import monkey; monkey.patch_all()
        import gevent
    import threading, time
    target, where, clients, seconds, start = (
        sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    if target == "manager":
        from flask import Flask
        from flask_sharedstate import SharedState
        app = Flask("bench")
        app.config.update(SHAREDSTATE_SOCKET=where, SHAREDSTATE_KEY="concurrency-benchmark-key")
        shared = SharedState(app)
        incr = shared.incr
        shared.incr("warm")
    else:
        import redis
        client = redis.Redis.from_url(where, max_connections=clients + 8)
        incr = client.incr
        client.incr("warm")
    counts = [0] * clients
    errors = [0]
    def run(i):
        while time.time() < start:
            time.sleep(0.001)
        end = start + seconds
        n = 0
        while time.time() < end:
            try:
                incr("n")
                n += 1
            except Exception as exc:
                errors[0] += 1
                if errors[0] <= 3:
                    print("error:", type(exc).__name__, exc, file=sys.stderr)
        counts[i] = n
    if sys.argv[6] == "1":
        gevent.joinall([gevent.spawn(run, i) for i in range(clients)])
    else:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads: t.start()
        for t in threads: t.join()
    print(sum(counts), errors[0])
    """
)


def server_pid_of(socket_path: str) -> int:
    with open(socket_path + ".pid") as f:
        return int(f.read().strip())


def sample(pid: int) -> tuple[int, int]:
    try:
        return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1, -1


def run_shape(
    target: str, where: str, server_pid: int, clients: int, greenlets: bool, seconds: float
) -> dict[str, Any]:
    start = time.time() + 3.0 + clients / 200  # time for every process to connect
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLIENT,
                target,
                where,
                str(clients),
                str(seconds),
                str(start),
                "1" if greenlets else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(PROCESSES)
    ]
    peak_threads = peak_fds = 0
    while time.time() < start + seconds / 2:
        time.sleep(0.05)
    for _ in range(5):  # mid-run
        threads, fds = sample(server_pid)
        peak_threads, peak_fds = max(peak_threads, threads), max(peak_fds, fds)
        time.sleep(0.1)
    ops = errors = 0
    notes = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0 or not out.strip():
            errors += 1
            notes.append(err[-500:])
            continue
        done, failed = out.split()
        ops += int(done)
        errors += int(failed)
        if err.strip():
            notes.append(err[-500:])
    return {
        "ops_per_s": ops / seconds,
        "errors": errors,
        "server_threads": peak_threads,
        "server_descriptors": peak_fds,
        "notes": notes[:2],
    }


def start_manager(folder: str) -> tuple[str, int]:
    """Start the app's server (as its first use would), owned by this process."""
    socket_path = os.path.join(folder, "bench.sock")
    sys.path.insert(0, ROOT)
    from flask import Flask

    from flask_sharedstate import SharedState

    app = Flask("bench")
    app.config.update(SHAREDSTATE_SOCKET=socket_path, SHAREDSTATE_KEY="concurrency-benchmark-key")
    SharedState(app).incr("warm")
    return socket_path, server_pid_of(socket_path)


def redis_pid(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--shapes", default="1,16,64,256,g256")
    parser.add_argument("--json")
    args = parser.parse_args()
    shapes = [(int(s.lstrip("g")), s.startswith("g")) for s in args.shapes.split(",")]
    folder = tempfile.mkdtemp(prefix="fss-concurrency-")
    results = []
    with redis_server() as url:
        socket_path, manager_pid = start_manager(folder)
        rpid = redis_pid(url)
        for clients, greenlets in shapes:
            row: dict[str, Any] = {
                "processes": PROCESSES,
                "clients_per_process": clients,
                "kind": "greenlets" if greenlets else "threads",
            }
            row["manager"] = run_shape(
                "manager", socket_path, manager_pid, clients, greenlets, args.seconds
            )
            row["redis"] = run_shape("redis", url, rpid, clients, greenlets, args.seconds)
            row["ratio"] = row["manager"]["ops_per_s"] / max(row["redis"]["ops_per_s"], 1)
            results.append(row)
            print_row(row)
    if args.json:
        meta = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


def print_row(row: dict[str, Any]) -> None:
    m, r = row["manager"], row["redis"]
    shape = f"{row['processes']} x {row['clients_per_process']} {row['kind']}"
    print(
        f"{shape:24} manager {m['ops_per_s']:9,.0f}/s err {m['errors']:4}"
        f" thr {m['server_threads']:4} fd {m['server_descriptors']:4} |"
        f" redis {r['ops_per_s']:9,.0f}/s err {r['errors']:4} | ratio {row['ratio']:.2f}",
        flush=True,
    )
    for note in m["notes"] + r["notes"]:
        print("   ", note.strip().replace("\n", " | ")[:300], flush=True)


if __name__ == "__main__":
    main()
