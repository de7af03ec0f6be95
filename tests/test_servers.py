"""The example app under the other servers users run: flask run, and uWSGI."""

from __future__ import annotations

import signal

import pytest

from conftest import pid_alive, server_pids, wait_for
from servers import Server, start_flask_run, start_uwsgi


def exercise(server: Server, run_dir: str, requests: int = 300) -> tuple[int, set[int]]:
    """Counter and cart under concurrent load; returns the state server's pid and
    the pids of the processes that answered the load."""
    items = [f"item-{i}" for i in range(50)]
    load = [("GET", "/", None)] * requests + [("POST", "/cart", {"item": i}) for i in items]
    responses = server.load(load, concurrency=8)
    assert {r.status for r in responses} == {200}
    assert server.get("/stats").json()["hits"] == requests
    assert sorted(server.get("/cart").json()["cart"]) == sorted(items)
    (state_server,) = server_pids(run_dir)
    return state_server, {r.worker for r in responses}


@pytest.mark.parametrize("reloader", [False, True], ids=["no-reloader", "reloader"])
def test_flask_run(servers: list[Server], run_dir: str, reloader: bool) -> None:
    """The development server, threaded, with and without the reloader; the state
    server stops when flask run does."""
    args = ["--reload"] if reloader else ["--no-reload"]
    server = start_flask_run(run_dir, *args)
    servers.append(server)
    state_server, _ = exercise(server, run_dir)
    server.stop(signal.SIGINT)
    wait_for(lambda: not pid_alive(state_server), timeout=5)


def test_uwsgi_master_and_4_processes(servers: list[Server], run_dir: str) -> None:
    """uWSGI with --master --processes 4: exact counts, one server, gone with uWSGI."""
    server = start_uwsgi(run_dir, "--processes", "4")
    servers.append(server)
    state_server, answered_by = exercise(server, run_dir, requests=1000)
    assert len(answered_by) >= 2  # the exact counts came from several processes
    server.stop(signal.SIGTERM)
    wait_for(lambda: not pid_alive(state_server), timeout=5)
