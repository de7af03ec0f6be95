"""The example app under real gunicorn workers and real HTTP load."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import pid_alive, server_pids, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over gunicorn's unix socket: no TCP port to find or collide on."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def request(path: str, method: str, url: str, body: Any = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def gunicorn(run_dir: str) -> Iterator[dict[str, Any]]:
    """example_app under ``gunicorn -w 4``, bound to a unix socket in run_dir."""
    http_socket = os.path.join(run_dir, "http.sock")
    env = dict(os.environ, FLASK_SHAREDSTATE_SOCKET=os.path.join(run_dir, "state.sock"))
    log = open(os.path.join(run_dir, "gunicorn.log"), "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "4",
            "--bind",
            f"unix:{http_socket}",
            "--timeout",
            "30",
            "example_app:create_app()",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: os.path.exists(http_socket) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, "gunicorn exited at start"
        yield {"proc": proc, "http": http_socket, "run_dir": run_dir}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_counter_is_exact_under_gunicorn(gunicorn: dict[str, Any]) -> None:
    """2,000 requests from 16 concurrent clients to 4 workers count exactly 2,000."""
    path = gunicorn["http"]

    def hit(_: int) -> int:
        return request(path, "GET", "/")[0]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(hit, range(2000)))
        workers = {json.loads(request(path, "GET", "/stats")[1])["worker"] for _ in range(40)}
    assert statuses.count(200) == 2000
    assert json.loads(request(path, "GET", "/stats")[1])["hits"] == 2000
    assert len(workers) > 1  # the load really was spread over several processes
    assert len(server_pids(gunicorn["run_dir"])) == 1


def test_cart_atomic_under_gunicorn(gunicorn: dict[str, Any]) -> None:
    """Concurrent atomic cart additions through 4 workers: every item exactly once."""
    path = gunicorn["http"]
    items = [f"item-{i}" for i in range(300)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: request(path, "POST", "/cart", {"item": i})[0], items))
    assert statuses.count(200) == 300
    cart = json.loads(request(path, "GET", "/cart")[1])["cart"]
    assert sorted(cart) == sorted(items)
    assert request(path, "POST", "/cart", {"item": 5})[0] == 400


def test_state_server_stops_with_gunicorn(gunicorn: dict[str, Any]) -> None:
    """When gunicorn stops, the state server it used is gone within five seconds."""
    assert request(gunicorn["http"], "GET", "/")[0] == 200
    (server,) = server_pids(gunicorn["run_dir"])
    gunicorn["proc"].send_signal(signal.SIGTERM)
    gunicorn["proc"].wait(30)
    start = time.monotonic()
    wait_for(lambda: not pid_alive(server), timeout=5)
    assert time.monotonic() - start < 5
