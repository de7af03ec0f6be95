"""Requests per second of the counter app under ``gunicorn -w 4``, against its ceiling.

The ceiling is the same app with a per-process global counter (wrong: four
counters, but no sharing cost). Both run with 4 sync workers on a loopback
port and are loaded by ``wrk -t2 -c32`` (``apt-get install wrk``), in
interleaved rounds; the median of the rounds is reported, and the ratio. Run::

    python benchmarks/throughput.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = {
    "per-process global (ceiling)": "global_counter:app",
    "Flask-SharedState incr": "example_app:create_app()",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(app: str, seconds: int, folder: str) -> tuple[float, int]:
    """Start gunicorn with ``app``, load it with wrk, stop it; return (req/s, final count)."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")])
    env["FLASK_SHAREDSTATE_SOCKET"] = os.path.join(folder, f"state-{port}.sock")
    command = [sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{port}"]
    command += ["--log-level", "warning", app]
    gunicorn = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start") from None
                time.sleep(0.1)
        out = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors:
            raise SystemExit(f"{app}: {errors.group(1)} failed requests")
        count = int(urllib.request.urlopen(url, timeout=5).read())
        return rate, count
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("this benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    rates: dict[str, list[float]] = {name: [] for name in APPS}
    with tempfile.TemporaryDirectory(prefix="fss-http-") as folder:
        for _ in range(args.rounds):
            for name, app in APPS.items():
                rate, count = _run(app, args.seconds, folder)
                rates[name].append(rate)
                print(f"  {name}: {rate:,.0f} req/s (last response said {count})", flush=True)
    ceiling = statistics.median(rates["per-process global (ceiling)"])
    print(f"\ngunicorn -w 4 (sync), wrk -t2 -c32 -d{args.seconds}s, median of {args.rounds}:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:32} {median:9,.0f} req/s {median / ceiling:6.2f} of the ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
