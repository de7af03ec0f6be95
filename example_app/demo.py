"""Run the example app under gunicorn with 4 workers and show the shared state at work.

``python -m example_app.demo``: starts gunicorn (with ``example_app/gunicorn.conf.py``,
whose hooks start the state server in the master) on a free loopback port, sends
400 requests from 16 concurrent clients, 40 cart additions and 40 requests to
a route rate-limited by Flask-Limiter (10 per minute per client, counted in the
shared state), prints what the workers counted together, and stops gunicorn.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORKERS = 4
REQUESTS = 400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, data: bytes | None = None, extra: dict[str, str] | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if data else {}
    headers.update(extra or {})
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as r:
        return r.read()  # type: ignore[no-any-return]


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        _get(url, extra=headers)
    except urllib.error.HTTPError as error:
        return error.code
    return 200


def main() -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "gunicorn", "-c", "example_app/gunicorn.conf.py"]
    command += ["-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
    gunicorn = subprocess.Popen(
        [*command, "example_app:create_app()"],
        cwd=root,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(base + "/stats")
                break
            except OSError:
                if time.monotonic() > deadline or gunicorn.poll() is not None:
                    print("gunicorn did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        start_hits = json.loads(_get(base + "/stats"))["hits"]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: _get(base + "/"), range(REQUESTS)))
            workers = set(
                pool.map(lambda _: json.loads(_get(base + "/stats"))["worker"], range(64))
            )
            items = [f"item-{i}" for i in range(40)]
            list(pool.map(lambda i: _get(base + "/cart", json.dumps({"item": i}).encode()), items))
            key = f"demo-{port}"
            quotes = list(
                pool.map(lambda _: _status(base + "/api/quote", {"X-Api-Key": key}), range(40))
            )
        hits = json.loads(_get(base + "/stats"))["hits"]
        cart = json.loads(_get(base + "/cart"))["cart"]
        print(f"gunicorn -w {WORKERS}: {len(workers)} workers answered (pids {sorted(workers)})")
        print(
            f"{REQUESTS} requests to /  -> shared counter went {start_hits} -> {hits}"
            f" (+{hits - start_hits}; a per-process global would have counted about"
            f" {REQUESTS // WORKERS} in each worker)"
        )
        print(
            f"40 concurrent POST /cart  -> cart holds {len(cart)} items,"
            f" {len(set(cart))} distinct (atomic nested edits, nothing lost)"
        )
        print(
            f"40 concurrent GET /api/quote (limit 10/minute) -> {quotes.count(200)} passed,"
            f" {quotes.count(429)} got 429 (memory:// would let up to {WORKERS * 10} through)"
        )
        ok = hits - start_hits == REQUESTS and sorted(cart) == sorted(items)
        ok = ok and quotes.count(200) == 10 and quotes.count(429) == 30
        print("OK: one shared state across all workers" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(30)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait()


if __name__ == "__main__":
    sys.exit(main())
