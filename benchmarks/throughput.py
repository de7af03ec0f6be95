"""Requests per second under ``gunicorn -w 4``, each app against its ceiling, in one run.

Two apps, each with the variants a user could pick, every variant with 4 sync
workers on a loopback port, loaded by ``wrk -t2 -c32`` (``apt-get install wrk``)
after a one-second warm-up, in interleaved rounds; the median of the rounds is
reported, and its fraction of the group's ceiling.

* ``counter``: ``GET /`` counts hits. The ceiling is a per-process global
  counter (wrong: four counters, but no sharing cost); then the example app's
  ``shared.incr``, the seed recipe (``BaseManager``, lock + get + set), Redis
  ``INCR`` and diskcache ``incr`` (``http_apps.py``). "lost" is how many
  requests wrk saw answered that the shared counter missed.
* ``flags``: ``GET /flags`` reads five flags. The ceiling is the example app
  with ``FLAGS_IN_PROCESS`` (the same app and route, the flags in a
  per-process dict); then the example app with the client cache on (the
  default) and off (``SHAREDSTATE_CLIENT_CACHE = 0``), five redis-py ``GET``;
  and, for scale (the example app's other extensions cost something on every
  request), a bare Flask app with the flags in a per-process dict and the same
  bare app with five ``shared.get`` (cache at its default).

Redis variants use a private ``redis-server`` this benchmark starts. Run::

    python benchmarks/throughput.py [--apps counter,flags] [--seconds 8] [--rounds 3]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "example_app:create_app()"


@dataclass
class Variant:
    group: str
    name: str
    app: str
    path: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    counts: bool = False  # its response is the shared count: report lost increments
    ceiling: bool = False


VARIANTS = [
    Variant("counter", "per-process global (ceiling)", "global_counter:app", ceiling=True),
    Variant("counter", "Flask-SharedState incr", EXAMPLE, counts=True),
    Variant("counter", "the seed recipe (lock + get + set)", "http_apps:seed_counter", counts=True),
    Variant("counter", "Redis INCR", "http_apps:redis_counter", counts=True),
    Variant("counter", "diskcache incr", "http_apps:diskcache_counter", counts=True),
    Variant(
        "flags",
        "per-process globals (ceiling)",
        EXAMPLE,
        "/flags",
        {"FLASK_FLAGS_IN_PROCESS": "true"},
        ceiling=True,
    ),
    Variant("flags", "Flask-SharedState, cache on", EXAMPLE, "/flags"),
    Variant(
        "flags",
        "Flask-SharedState, cache off",
        EXAMPLE,
        "/flags",
        {"FLASK_SHAREDSTATE_CLIENT_CACHE": "0"},
    ),
    Variant("flags", "Redis, five GETs", "http_apps:redis_flags", "/flags"),
    Variant("flags", "bare Flask app, per-process globals", "http_apps:global_flags", "/flags"),
    Variant("flags", "bare Flask app, Flask-SharedState", "http_apps:shared_flags", "/flags"),
]


def _python_cwd(folder: str) -> str:
    """gunicorn's working folder, first on its path (``-m``): this checkout's example app
    alone, so that a ``flask_sharedstate`` put first on PYTHONPATH is the one measured."""
    cwd = os.path.join(folder, "cwd")
    if not os.path.exists(cwd):
        os.mkdir(cwd)
        os.symlink(os.path.join(ROOT, "example_app"), os.path.join(cwd, "example_app"))
    return cwd


def _python_env(folder: str) -> dict[str, str]:
    paths = (os.environ.get("PYTHONPATH"), ROOT, os.path.join(ROOT, "benchmarks"))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def measured_package(folder: str) -> str:
    """The folder of the flask_sharedstate the workers import."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import flask_sharedstate as p, os; print(os.path.dirname(p.__file__))",
        ],
        cwd=_python_cwd(folder),
        env=_python_env(folder),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()  # type: ignore[no-any-return]


def _wrk(url: str, seconds: int) -> str:
    return subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout


def _run(variant: Variant, seconds: int, folder: str, env: dict[str, str]) -> dict[str, float]:
    """Start gunicorn with the variant, warm it up, load it with wrk, stop it."""
    port = _free_port()
    run_env = dict(_python_env(folder), **env, **variant.env)
    run_env["FLASK_SHAREDSTATE_SOCKET"] = os.path.join(folder, f"state-{port}.sock")
    command = [sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{port}"]
    command += ["--log-level", "warning", variant.app]
    gunicorn = subprocess.Popen(command, cwd=_python_cwd(folder), env=run_env)
    url = f"http://127.0.0.1:{port}{variant.path}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(url)
                break
            except OSError:
                if time.monotonic() > deadline or gunicorn.poll() is not None:
                    raise SystemExit(f"{variant.name}: gunicorn did not start") from None
                time.sleep(0.1)
        _wrk(url, 1)  # every worker connected to its store, caches warm
        before = int(_get(url)) if variant.counts else 0
        out = _wrk(url, seconds)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        served = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors:
            raise SystemExit(f"{variant.name}: {errors.group(1)} failed requests")
        result = {"requests/s": rate, "served": served}
        if variant.counts:
            after = int(_get(url))
            # wrk does not count the (at most 32) requests in flight when it stops,
            # which the server did count: a counter can only be short, never over.
            result["lost"] = max(0, served - (after - before - 1))
        return result
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(30)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait(10)


@contextlib.contextmanager
def stores(variants: list[Variant], folder: str) -> Iterator[dict[str, str]]:
    """Start what the chosen variants need (redis-server, the seed's manager); yield env."""
    env = {"DISKCACHE_DIR": os.path.join(folder, "diskcache")}
    with contextlib.ExitStack() as stack:
        if any(v.app.startswith("http_apps:redis") for v in variants):
            from redisserver import redis_server

            env["REDIS_URL"] = stack.enter_context(redis_server())
        if any(v.app == "http_apps:seed_counter" for v in variants):
            from http_apps import serve_seed

            port = _free_port()
            seed = multiprocessing.get_context("fork").Process(
                target=serve_seed, args=(port,), daemon=True
            )
            seed.start()
            stack.callback(seed.join, 10)
            stack.callback(seed.terminate)
            env["SEED_ADDRESS"] = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the seed recipe's manager did not start") from None
                    time.sleep(0.05)
        yield env


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--apps", default="counter,flags", help="counter, flags or both")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("this benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    groups = [g.strip() for g in args.apps.split(",") if g.strip()]
    unknown = set(groups) - {v.group for v in VARIANTS}
    if unknown or not groups:
        parser.error(f"--apps takes counter, flags or both, comma-separated (not {args.apps!r})")
    variants = [v for v in VARIANTS if v.group in groups]
    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="fss-http-") as folder, stores(variants, folder) as env:
        package = measured_package(folder)
        print(f"flask_sharedstate from {package}", flush=True)
        for round_ in range(args.rounds):
            for variant in variants:
                result = _run(variant, args.seconds, folder, env)
                runs[variant.name].append(result)
                lost = f", lost {result['lost']:.0f}" if "lost" in result else ""
                rate = result["requests/s"]
                print(f"  round {round_ + 1}: {variant.name}: {rate:,.0f} req/s{lost}", flush=True)
    report: dict[str, list[dict[str, object]]] = {}
    print(f"\ngunicorn -w 4 (sync), wrk -t2 -c32 -d{args.seconds}s, median of {args.rounds}:")
    for group in groups:
        members = [v for v in variants if v.group == group]
        (top,) = [v for v in members if v.ceiling]
        ceiling = statistics.median(r["requests/s"] for r in runs[top.name])
        print(f"\n{group}:")
        report[group] = []
        for v in members:
            rate = statistics.median(r["requests/s"] for r in runs[v.name])
            row: dict[str, object] = {
                "variant": v.name,
                "requests/s": rate,
                "of ceiling": rate / ceiling,
                "runs": [r["requests/s"] for r in runs[v.name]],
            }
            lost = ""
            if v.counts:
                row["lost"] = [r["lost"] for r in runs[v.name]]
                lost = f"  lost {max(r['lost'] for r in runs[v.name]):.0f} (most in a run)"
            report[group].append(row)
            print(f"{v.name:40} {rate:9,.0f} req/s {rate / ceiling:6.2f} of the ceiling{lost}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "throughput",
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "load average at the end": os.getloadavg(),
                    "python": platform.python_version(),
                    "package": package,
                    "wrk": f"-t2 -c32 -d{args.seconds}s",
                    "rounds": args.rounds,
                    "apps": report,
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
