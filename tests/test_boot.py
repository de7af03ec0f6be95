"""Nothing at import or init_app can fail a worker's boot; the server is a clean process."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

from flask_sharedstate import SharedState, SharedStateUnavailable

import workers
from conftest import make_app, server_pids

ctx = multiprocessing.get_context("spawn")


def test_init_app_touches_nothing(run_dir: str) -> None:
    """init_app creates no file, starts no server and raises nothing without a server."""
    socket_dir = os.path.join(run_dir, "not-yet")
    app = make_app("manager", None, SHAREDSTATE_SOCKET=os.path.join(socket_dir, "a.sock"))
    shared = SharedState(app, defaults={"hits": 0})
    assert not os.path.exists(socket_dir)
    assert server_pids(run_dir) == []
    assert "sharedstate" in app.extensions
    # First use does the work.
    assert shared.get("hits") == 0
    assert os.path.exists(os.path.join(socket_dir, "a.sock"))
    shared.state().backend.close()
    from conftest import kill_servers

    kill_servers(socket_dir)


def test_importing_the_example_app_starts_nothing(run_dir: str) -> None:
    """Importing an app module (as gunicorn's master does with --preload) connects nowhere."""
    env = dict(os.environ, FLASK_SHAREDSTATE_SOCKET=os.path.join(run_dir, "example.sock"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-c", "import example_app; example_app.create_app()"],
        cwd=root,
        env=env,
        check=True,
        timeout=60,
    )
    assert os.listdir(run_dir) == []


def test_unreachable_server_raises_unavailable_in_time(run_dir: str) -> None:
    """A server that cannot be started gives SharedStateUnavailable naming the address."""
    path = os.path.join(run_dir, "sub", "a.sock")
    app = make_app("manager", None, SHAREDSTATE_SOCKET=path, SHAREDSTATE_TIMEOUT=1.0)
    shared = SharedState(app)
    os.makedirs(os.path.dirname(path), mode=0o700)
    os.mkdir(path)  # a folder where the socket should be: nobody can listen there
    try:
        shared.get("k")
    except SharedStateUnavailable as exc:
        assert path in str(exc)
    else:
        raise AssertionError("expected SharedStateUnavailable")


def test_server_holds_no_descriptor_of_its_starter(run_dir: str) -> None:
    """The server shares no socket, pipe or file with the worker that started it,
    in particular not the worker's listening TCP socket."""
    socket_path = os.path.join(run_dir, "app.sock")
    results = ctx.Queue()
    starter = ctx.Process(target=workers.start_with_listener, args=(socket_path, results))
    starter.start()
    try:
        server_pid, starter_fds, listener_fd = results.get(timeout=60)
        server_fds = {}
        for fd in os.listdir(f"/proc/{server_pid}/fd"):
            try:
                server_fds[fd] = os.readlink(f"/proc/{server_pid}/fd/{fd}")
            except OSError:
                pass
        shared_targets = {
            target
            for target in starter_fds.values()
            if target.startswith(("socket:", "pipe:", "/")) and target != os.devnull
        } & set(server_fds.values())
        assert starter_fds[str(listener_fd)].startswith("socket:")
        assert starter_fds[str(listener_fd)] not in server_fds.values()
        assert shared_targets == set()
    finally:
        starter.kill()
        starter.join(10)


def test_server_does_not_import_flask() -> None:
    """The state server is a plain standard-library process: it never imports Flask."""
    code = (
        "import sys, flask_sharedstate.server.__main__;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'werkzeug')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
