from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import SharedState

BACKENDS = ["memory", "manager"]


def server_pids(folder: str) -> list[int]:
    """Pids of the state servers whose pid files lie in ``folder``, still running."""
    pids = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        # The pid may have been reused: only a server of this folder counts.
        if b"flask_sharedstate.server" in cmdline and folder.encode() in cmdline:
            pids.append(pid)
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(interval)


def kill_servers(folder: str) -> None:
    for pid in server_pids(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10)


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A short private folder for sockets; every server started in it is killed after."""
    folder = tempfile.mkdtemp(prefix="fss-", dir="/tmp")
    try:
        yield folder
    finally:
        kill_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def make_app(backend: str, run_dir: str | None, name: str = "test_app", **config: Any) -> Flask:
    app = Flask(name)
    app.config["SHAREDSTATE_BACKEND"] = backend
    if run_dir is not None:
        app.config["SHAREDSTATE_SOCKET"] = os.path.join(run_dir, f"{name}.sock")
    app.config.update(config)
    return app


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def app(backend: str, run_dir: str) -> Flask:
    """The app that pytest-flask's fixtures (client, ...) use: one per backend."""
    return make_app(backend, run_dir, SHAREDSTATE_TIMEOUT=3.0)


@pytest.fixture
def shared(app: Flask) -> Iterator[SharedState]:
    ext = SharedState(app)
    yield ext
    app.extensions["sharedstate"].backend.close()
