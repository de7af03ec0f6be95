"""``flask sharedstate``: every command, through Flask's CLI runner, on a real server."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from flask_sharedstate import SharedState
from flask_sharedstate.cli import sharedstate

import workers
from conftest import make_app, pid_alive, server_pids, wait_for
from servers import ROOT, TESTS


@pytest.fixture
def cli_app(run_dir: str) -> Iterator[Flask]:
    """An app whose state server is running, with a few keys."""
    app = make_app(
        "manager",
        run_dir,
        name="cli_app",
        SHAREDSTATE_PERSIST_PATH=os.path.join(run_dir, "state.db"),
    )
    shared = SharedState(app)
    shared.set_many({"hits": 3, "flags": {"shout": True}, "rate:1": 1, "rate:2": 2})
    shared.set("session", "x", ttl=100)
    yield app
    app.extensions["sharedstate"].backend.close()


def run(app: Flask, *args: str, input: str | None = None) -> tuple[int, str]:
    runner: FlaskCliRunner = app.test_cli_runner()
    result = runner.invoke(sharedstate, list(args), input=input)
    return result.exit_code, result.output


def test_status(cli_app: Flask, run_dir: str) -> None:
    """status shows the address, pid, uptime, keys, memory, clients and persistence."""
    code, out = run(cli_app, "status")
    assert code == 0, out
    (pid,) = server_pids(run_dir)
    assert f"server pid:  {pid}" in out
    assert "keys:        5" in out
    assert os.path.join(run_dir, "cli_app.sock") in out
    assert "state.db" in out and "fsync everysec" in out
    assert "MiB" in out and "clients:" in out


def test_get_set_del_keys(cli_app: Flask) -> None:
    """get prints JSON; set takes JSON; del removes; keys lists and filters."""
    assert run(cli_app, "get", "flags") == (0, '{"shout": true}\n')
    assert run(cli_app, "set", "name", '"Ada"')[0] == 0
    assert run(cli_app, "get", "name") == (0, '"Ada"\n')
    assert run(cli_app, "set", "n", "41", "--ttl", "60")[0] == 0
    assert run(cli_app, "get", "n") == (0, "41\n")
    code, out = run(cli_app, "set", "bad", "not json")
    assert code == 2 and "is not JSON" in out
    assert run(cli_app, "keys", "rate:*") == (0, "rate:1\nrate:2\n")
    assert run(cli_app, "del", "rate:1")[0] == 0
    code, out = run(cli_app, "del", "rate:1")
    assert code == 1 and "no key 'rate:1'" in out
    code, out = run(cli_app, "get", "missing")
    assert code == 1 and "no key 'missing'" in out


def test_dump_and_load(cli_app: Flask, run_dir: str) -> None:
    """dump writes JSON (or pickle) with ttls; load puts it back; JSON refuses what it
    cannot hold exactly."""
    path = os.path.join(run_dir, "dump.json")
    assert run(cli_app, "dump", path)[0] == 0
    with open(path) as f:
        dumped = json.load(f)
    assert dumped["data"]["flags"] == {"shout": True}
    assert 90 < dumped["ttl"]["session"] <= 100
    assert run(cli_app, "clear", "--yes")[0] == 0
    assert run(cli_app, "keys") == (0, "")
    assert run(cli_app, "load", path)[0] == 0
    shared = cli_app.extensions["sharedstate"].direct
    assert shared.get("flags") == {"shout": True}
    remaining = shared.ttl("session")
    assert remaining is not None and 80 < remaining <= 100
    shared.set("pair", (1, 2))
    shared.set("tags", {"a", "b"})
    code, out = run(cli_app, "dump", path)
    assert code == 1 and "'pair' (tuple)" in out and "--format pickle" in out
    pickled = os.path.join(run_dir, "dump.pickle")
    assert run(cli_app, "dump", pickled, "--format", "pickle")[0] == 0
    with open(pickled, "rb") as f:
        assert pickle.load(f)["data"]["tags"] == {"a", "b"}
    assert run(cli_app, "clear", "--yes")[0] == 0
    assert run(cli_app, "load", pickled)[0] == 0
    assert shared.get("pair") == (1, 2)
    with open(os.path.join(run_dir, "other.json"), "w") as f:
        f.write('{"hello": 1}')
    code, out = run(cli_app, "load", os.path.join(run_dir, "other.json"))
    assert code == 1 and "not a Flask-SharedState dump" in out


def test_clear_asks_first(cli_app: Flask) -> None:
    """clear asks for confirmation, and a no keeps everything."""
    code, out = run(cli_app, "clear", input="n\n")
    assert code == 1 and "Delete all 5 keys" in out
    assert cli_app.extensions["sharedstate"].direct.length() == 5
    code, out = run(cli_app, "clear", input="y\n")
    assert code == 0
    assert cli_app.extensions["sharedstate"].direct.length() == 0


def test_stop_saves_and_stops(cli_app: Flask, run_dir: str) -> None:
    """stop ends the server, which saved first: a new one has the same state."""
    (pid,) = server_pids(run_dir)
    code, out = run(cli_app, "stop")
    assert code == 0, out
    assert not pid_alive(pid)
    shared = cli_app.extensions["sharedstate"]
    shared.backend.may_start = True  # as the app itself would
    assert shared.direct.get("hits") == 3


def test_commands_fail_clearly_without_a_server(run_dir: str) -> None:
    """With no server running, commands say so, and start none."""
    app = make_app("manager", run_dir, name="idle_app")
    SharedState(app)
    for args in (["status"], ["get", "k"], ["keys"], ["stop"]):
        code, out = run(app, *args)
        assert code == 1, args
        assert "no state server is running" in out, out
    assert server_pids(run_dir) == []
    code, out = run(Flask("plain"), "status")
    assert code == 1 and "does not use Flask-SharedState" in out


def test_status_of_the_memory_backend() -> None:
    """status on the memory backend says there is no server and counts this process's keys."""
    app = make_app("memory", None, name="memory_app")
    shared = SharedState(app)
    with app.app_context():
        shared.set("k", 1)
    code, out = run(app, "status")
    assert code == 0, out
    assert "backend:     memory" in out and "server:      none" in out
    assert "keys:        1 (in this command's own process)" in out
    assert "platform:" not in out  # every backend works here


def test_config_error_of_the_app_is_one_line(run_dir: str) -> None:
    """An app whose SharedState refuses its config: flask sharedstate says why in one line,
    with no traceback."""
    env = dict(os.environ, FLASK_SHAREDSTATE_TIMEOUT="soon")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS])
    command = [sys.executable, "-m", "flask", "--app", "loadapp:app", "sharedstate", "keys"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr == "Error: SHAREDSTATE_TIMEOUT = 'soon' is not valid: expected a number"
        " of seconds.\n"
    )
    assert server_pids(run_dir) == []


def test_serve_in_the_foreground(run_dir: str) -> None:
    """flask sharedstate serve runs the server for the app's address until SIGTERM."""
    socket_path = os.path.join(run_dir, "served.sock")
    env = dict(os.environ, FLASK_SHAREDSTATE_SOCKET=socket_path)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS])
    command = [sys.executable, "-m", "flask", "--app", "loadapp:app", "sharedstate", "serve"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_for(lambda: os.path.exists(socket_path) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None
        client = workers.make_shared(socket_path, SHAREDSTATE_NAMESPACE="example_app")
        client.state().backend.may_start = False
        assert client.incr("hits") == 1  # the app's defaults came with the first client
        assert workers.server_pid(client) == proc.pid
        client.state().backend.close()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already runs" in again.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(socket_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert "serving on" in log and "stopping: signal SIGTERM" in log
    wait_for(lambda: server_pids(run_dir) == [], timeout=5)


def test_dump_file_is_private(cli_app: Flask, run_dir: str) -> None:
    """dump creates FILE 0600 whatever the umask (the state may hold secrets), replaces an
    older 0644 dump, follows no symlink planted at a guessable temporary name, leaves no
    temporary file behind."""
    victim = os.path.join(run_dir, "victim")
    with open(victim, "wb") as f:
        f.write(b"precious\n")
    path = os.path.join(run_dir, "dumps", "dump.json")
    os.mkdir(os.path.dirname(path))
    os.symlink(victim, path + ".tmp")
    old = os.umask(0o022)
    try:
        assert run(cli_app, "dump", path)[0] == 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.chmod(path, 0o644)
        assert run(cli_app, "dump", path, "--format", "pickle")[0] == 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)
    with open(victim, "rb") as f:
        assert f.read() == b"precious\n"
    assert sorted(os.listdir(os.path.dirname(path))) == ["dump.json", "dump.json.tmp"]
    with open(path, "rb") as f:
        assert pickle.load(f)["data"]["hits"] == 3


def test_dump_to_standard_output(cli_app: Flask) -> None:
    """dump without FILE writes the bytes to standard output, through no API that click
    deprecates (warnings are errors here)."""
    runner: FlaskCliRunner = cli_app.test_cli_runner()
    result = runner.invoke(sharedstate, ["dump", "--format", "pickle"])
    assert result.exit_code == 0, result.output
    assert pickle.loads(result.stdout_bytes)["data"]["flags"] == {"shout": True}
    result = runner.invoke(sharedstate, ["dump"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["hits"] == 3
