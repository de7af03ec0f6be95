"""Run real WSGI servers (gunicorn, uWSGI, flask run) and send them bounded HTTP load.

Every server listens on a unix socket or a free loopback port, and is stopped by
pid. Load is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: no TCP port to find or collide on."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@dataclass
class Response:
    status: int  # 0: no response (connection refused, reset, timed out)
    body: bytes
    seconds: float
    error: str = ""
    #: time.monotonic() when the request was sent (comparable across processes)
    started: float = 0.0
    #: the pid of the worker that answered (loadapp's X-Worker header), 0 if unknown
    worker: int = 0

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    """A running server: its process, where it listens, and its log."""

    proc: subprocess.Popen[bytes]
    address: str  # a unix socket path, or "host:port"
    log_path: str
    run_dir: str
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.address.startswith("/"):
            return UnixHTTPConnection(self.address, timeout)
        host, port = self.address.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def request(
        self, method: str, url: str, body: Any = None, timeout: float = 30.0, **headers: str
    ) -> Response:
        start = time.monotonic()
        conn = self.connection(timeout)
        try:
            data = None
            if body is not None:
                data = json.dumps(body)
                headers["Content-Type"] = "application/json"
            conn.request(method, url, data, headers)
            response = conn.getresponse()
            body = response.read()
            worker = int(response.getheader("X-Worker") or 0)
            return Response(response.status, body, time.monotonic() - start, "", start, worker)
        except (OSError, http.client.HTTPException) as exc:
            return Response(0, b"", time.monotonic() - start, repr(exc), start)
        finally:
            conn.close()

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def load(
        self, requests: Iterable[tuple[str, str, Any]], concurrency: int = 32
    ) -> list[Response]:
        """Send every ``(method, url, body)`` from ``concurrency`` clients; return in order."""
        items = list(requests)
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(self.request, *item) for item in items]
            return [f.result(timeout=300) for f in futures]

    def load_during(
        self,
        method: str,
        url: str,
        fault: Callable[[LoadProgress], None],
        concurrency: int = 16,
        limit: int = 50_000,
        seconds: float = 120.0,
    ) -> list[Response]:
        """Send ``method url`` from ``concurrency`` clients, each in a loop, for as
        long as ``fault(progress)`` runs in the calling thread (bounded by ``limit``
        requests and ``seconds``); return every response, in the order they ended.

        ``fault`` waits on ``progress`` for the load to be under way, injects its
        fault, and waits for what it needs to see after it: so the fault happens
        during the load, whatever the machine's speed.
        """
        progress = LoadProgress()
        deadline = time.monotonic() + seconds

        def client() -> None:
            while not progress.stopped.is_set():
                if time.monotonic() > deadline or not progress.take_ticket(limit):
                    progress.exhausted.set()
                    return
                progress.add(self.request(method, url))

        with ThreadPoolExecutor(concurrency) as pool:
            clients = [pool.submit(client) for _ in range(concurrency)]
            try:
                fault(progress)
            finally:
                progress.stopped.set()
            for c in clients:
                c.result(timeout=300)
        return progress.snapshot()

    def children(self) -> list[int]:
        """The pids of the server's direct children (gunicorn's workers)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; its workers go too, even after SIGKILL
        (which would leave them orphaned for up to half gunicorn's --timeout)."""
        workers = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        finally:
            self.stopped = True
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        for pid in workers:
            wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid), 10)
        return code


class LoadProgress:
    """What a running :meth:`Server.load_during` has seen so far (thread-safe)."""

    def __init__(self) -> None:
        #: set when the fault is done: the clients stop
        self.stopped = threading.Event()
        #: set when the load reached its bound before the fault was done
        self.exhausted = threading.Event()
        self._lock = threading.Lock()
        self._responses: list[Response] = []
        self._tickets = 0

    def take_ticket(self, limit: int) -> bool:
        with self._lock:
            self._tickets += 1
            return self._tickets <= limit

    def add(self, response: Response) -> None:
        with self._lock:
            self._responses.append(response)

    def snapshot(self) -> list[Response]:
        with self._lock:
            return list(self._responses)

    def wait(
        self, condition: Callable[[list[Response]], bool], what: str, timeout: float = 60.0
    ) -> None:
        """Wait until ``condition(responses so far)`` holds; fail after ``timeout``
        seconds, or once the load reached its bound without it."""
        deadline = time.monotonic() + timeout
        while not condition(self.snapshot()):
            if time.monotonic() > deadline or self.exhausted.is_set():
                raise AssertionError(f"the load never showed {what} (within {timeout:g}s)")
            time.sleep(0.01)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    command: list[str], address: str, run_dir: str, env: dict[str, str], name: str = "server"
) -> Server:
    log_path = os.path.join(run_dir, f"{name}.log")
    full_env = dict(os.environ)
    full_env["FLASK_SHAREDSTATE_SOCKET"] = os.path.join(run_dir, "state.sock")
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, full_env.get("PYTHONPATH", "")])
    full_env.update(env)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(proc, address, log_path, run_dir)

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        return server.get("/alive", timeout=2).status == 200

    try:
        wait_for(ready, timeout=60, interval=0.05)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"the server exited at start:\n{server.log()}")
    return server


def start_gunicorn(
    run_dir: str,
    *args: str,
    app: str = "loadapp:app",
    env: dict[str, str] | None = None,
    name: str = "http",
) -> Server:
    """``gunicorn ARGS APP`` bound to the unix socket ``run_dir/NAME.sock``."""
    import gunicorn

    address = os.path.join(run_dir, f"{name}.sock")
    command = [sys.executable, "-m", "gunicorn", "--bind", f"unix:{address}"]
    if gunicorn.version_info >= (25,):  # keep its control socket out of the home folder
        command += ["--control-socket", os.path.join(run_dir, f"{name}.ctl")]
    command += [*args, app]
    return _start(command, address, run_dir, env or {}, name)


def start_flask_run(run_dir: str, *args: str) -> Server:
    """``flask --app loadapp run ARGS`` on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "loadapp:app", "run", "--port", str(port)]
    return _start([*command, *args], f"127.0.0.1:{port}", run_dir, {})


def start_uwsgi(run_dir: str, *args: str) -> Server:
    """``uwsgi --master --processes 4`` serving HTTP on a unix socket."""
    address = os.path.join(run_dir, "http.sock")
    uwsgi = os.path.join(os.path.dirname(sys.executable), "uwsgi")
    command = [uwsgi, "--http-socket", address, "--master", "--module", "loadapp:app"]
    command += ["--die-on-term", "--need-app", "--disable-logging", *args]
    return _start(command, address, run_dir, {})
