"""Gunicorn hooks: the state server is started by the master, before any worker.

Put this in ``gunicorn.conf.py``::

    from flask_sharedstate.gunicorn import on_exit, on_starting

Without the hooks, the first worker that uses the state starts the server and
names the master as its owner, which works as well. The hooks make the
server's owner certain (the master's pid, not a guess from the worker's
parent), start it before the workers fork (no start-up stampede), apply the
app's ``defaults`` once, and stop it as the last thing gunicorn does.

The master must not import the app (that would be ``--preload`` behind the
user's back, and ``kill -HUP`` would no longer load new code), so
:func:`on_starting` loads it in a short-lived forked child.

With gunicorn's ``user``/``group`` settings the master runs as root and the
workers as that user, so the child first becomes the workers' user, as a
worker does: the app is loaded, and the server started, with the workers'
identity, and its folder, key, socket, lock, log, pid and persistence files
are theirs. It runs with no supplementary groups but those of ``initgroups``.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

from flask import Flask

try:
    import pwd
except ImportError:  # Windows
    raise ImportError(
        "flask_sharedstate.gunicorn holds gunicorn's hooks, and gunicorn runs on Unix only:"
        " on Windows use SHAREDSTATE_BACKEND = 'memory' for one process (flask run), or"
        " 'redis' under a server that runs there (waitress, say)."
    ) from None

from .backends.manager import ManagerBackend
from .server.processes import process_gone, start_time

#: How long on_exit waits for the server to save and stop.
STOP_TIMEOUT = 5.0


def _find_flask_app(wsgi: Any) -> Flask:
    if isinstance(wsgi, Flask):
        return wsgi
    for name in ("app", "application", "wrapped"):  # common middleware attributes
        inner = getattr(wsgi, name, None)
        if isinstance(inner, Flask):
            return inner
    raise RuntimeError(
        f"flask_sharedstate.gunicorn: the WSGI app is a {type(wsgi).__name__}, not a Flask"
        " app; call flask_sharedstate.gunicorn.start_server(flask_app) from your own"
        " on_starting hook instead."
    )


def start_server(app: Flask, owner: int | None = None) -> int:
    """Make sure the state server of ``app`` runs, owned by ``owner`` (default: this process).

    Returns the server's pid. For the ``manager`` backend only; other
    backends have no server to start, and this returns 0.
    """
    backend = app.extensions["sharedstate"].backend
    if not isinstance(backend, ManagerBackend):
        return 0
    return backend.ensure_server(owner if owner is not None else os.getpid())


def _become_workers_user(cfg: Any) -> None:
    """Take the identity gunicorn gives its workers (its ``util.set_owner_process``)."""
    uid, gid = cfg.uid, cfg.gid
    if uid == os.geteuid() and gid == os.getegid():
        return
    if cfg.initgroups:
        os.initgroups(pwd.getpwuid(uid).pw_name, gid)
    else:
        # gunicorn's workers keep the master's supplementary groups (root's); the
        # state server needs none of them.
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def on_starting(server: Any) -> None:
    """Gunicorn hook: start the app's state server in the master's name."""
    master = os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child, reported through the pipe
        os.close(read_end)
        status = 1
        try:
            _become_workers_user(server.cfg)
            app = _find_flask_app(server.app.wsgi())
            os.write(write_end, f"{start_server(app, owner=master)} started".encode())
            status = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode()[-4000:])
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        report = f.read().decode(errors="replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        # Never stop gunicorn for this: the workers will elect a server themselves.
        server.log.error("flask_sharedstate: could not start the state server:\n%s", report)
        return
    server_pid = int(report.split(" ", 1)[0])
    server.log.info("flask_sharedstate: state server %d is running", server_pid)
    server._sharedstate_server = (server_pid, start_time(server_pid))


def on_exit(server: Any) -> None:
    """Gunicorn hook: stop the state server (which saves first, if it persists)."""
    started = getattr(server, "_sharedstate_server", None)
    if started is None:
        return
    pid, started_at = started  # a start time of None (unknown): the pid alone is checked
    if process_gone(pid, started_at):
        return  # gone already; the pid may even belong to someone else now
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while not process_gone(pid, started_at) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not process_gone(pid, started_at):
        server.log.warning("flask_sharedstate: state server %d did not stop in time", pid)
