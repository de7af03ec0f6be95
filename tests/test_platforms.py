"""The platforms other than Linux, forced here in real processes.

* **macOS and the BSDs have no /proc and no pidfd.** The servers, scripts and
  gunicorn of these tests run in a private mount namespace (``unshare -m``, as
  root) with an empty tmpfs over ``/proc``, and a ``sitecustomize`` on their
  ``PYTHONPATH`` deletes ``os.pidfd_open`` before anything runs. Mode ``ps``
  gives them a working ``ps`` (the real one, run where ``/proc`` is visible:
  macOS's ``ps`` needs no ``/proc``), mode ``no-proc`` gives them none, so
  every start time is unknown. The namespace, and its mount, ends with its last
  process; the run_dir fixture kills the state servers by pid.
* **Windows and macOS configuration**: a real interpreter whose ``sys.platform``
  is set, and whose ``os.getuid``/``os.fork``/``fcntl`` are removed, first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import pid_alive, server_pids, wait_for
from servers import ROOT, TESTS, Server, _start

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ps") is None,
    reason="hiding /proc needs root, unshare and ps",
)

MODES = ["ps", "no-proc"]

#: Runs "$@" with an empty tmpfs over /proc, in a mount namespace of its own.
HIDE_PROC = 'mount -t tmpfs -o size=64k,mode=555 fss-no-proc /proc && exec "$@"'

#: The real ps, run in a nested namespace where the tmpfs is unmounted again.
PS_SHIM = """#!/bin/sh
exec unshare --mount --propagation private sh -c 'umount /proc && exec {ps} "$@"' ps "$@"
"""

NO_PIDFD = """# This interpreter plays a platform without pidfd_open (macOS, the BSDs, old Linux).
import os

os.__dict__.pop("pidfd_open", None)
"""


def platform_env(run_dir: str, mode: str) -> dict[str, str]:
    """PYTHONPATH and PATH for processes that must see no pidfd (and, maybe, no ps)."""
    site = os.path.join(run_dir, "site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(NO_PIDFD)
    bin_dir = os.path.join(run_dir, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    path = [bin_dir, os.path.dirname(sys.executable)]
    for tool in ("unshare", "sh", "umount", "mount"):
        os.symlink(shutil.which(tool) or tool, os.path.join(bin_dir, tool))
    if mode == "ps":
        shim = os.path.join(bin_dir, "ps")
        with open(shim, "w") as f:
            f.write(PS_SHIM.format(ps=shutil.which("ps")))
        os.chmod(shim, 0o755)
    return {
        "PYTHONPATH": os.pathsep.join([site, ROOT, TESTS]),
        "PATH": os.pathsep.join(path),
    }


def hidden(command: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE_PROC, "sh"] + command


def check_mode(run_dir: str, socket_name: str, cmdline: list[bytes], mode: str) -> None:
    """The server got the start time the mode allows, and watched its owner by polling."""
    if mode == "ps":
        assert cmdline[cmdline.index(b"--owner-start") + 1].startswith(b"ps:")
    else:
        assert b"--owner-start" not in cmdline  # unknown, and never the string "None"
    with open(os.path.join(run_dir, socket_name + ".log"), errors="replace") as f:
        assert "by polling" in f.read()


def serving_lines(run_dir: str, socket_name: str) -> int:
    """How many state servers said they were serving at this socket."""
    with open(os.path.join(run_dir, socket_name + ".log"), errors="replace") as f:
        return f.read().count("serving on")


OWNER_SCRIPT = """
import json, os, sys, time
from flask import Flask
from flask_sharedstate import SharedState

assert not os.path.exists("/proc/self"), "/proc is not hidden"
assert not hasattr(os, "pidfd_open"), "pidfd_open is not hidden"
app = Flask("owner")
app.config["SHAREDSTATE_SOCKET"] = sys.argv[1]
shared = SharedState(app)
slowest = 0.0
for _ in range(12):
    start = time.monotonic()
    n = shared.incr("n")
    slowest = max(slowest, time.monotonic() - start)
    time.sleep(0.25)
print(json.dumps({"n": n, "slowest": slowest}), flush=True)
sys.stdin.read()  # live on until the test is done looking

"""


@needs_namespaces
@pytest.mark.parametrize("mode", MODES)
def test_owner_watched_without_proc_or_pidfd(run_dir: str, mode: str) -> None:
    """No /proc, no pidfd: the server serves its live owner throughout, then stops when it exits."""
    env = dict(os.environ, **platform_env(run_dir, mode))
    sock = os.path.join(run_dir, "owner.sock")
    owner = subprocess.Popen(
        hidden([sys.executable, "-c", OWNER_SCRIPT, sock]),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert owner.stdout is not None and owner.stdin is not None
        line = owner.stdout.readline()
        assert line, "the owner script failed (its stderr is above)"
        report = json.loads(line)
        assert report["n"] == 12
        assert serving_lines(run_dir, "owner.sock") == 1  # one server, never restarted
        assert report["slowest"] < 5.0  # no request waited for SHAREDSTATE_TIMEOUT
        (state_server,) = server_pids(run_dir)
        with open(f"/proc/{state_server}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        assert cmdline[cmdline.index(b"--owner-pid") + 1] == str(owner.pid).encode()
        check_mode(run_dir, "owner.sock", cmdline, mode)
        owner.stdin.close()
        assert owner.wait(60) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pipe in (owner.stdin, owner.stdout):
            if pipe is not None:
                pipe.close()
    # The owner has exited: the server sees it by polling (no pidfd, no kqueue here).
    wait_for(lambda: not pid_alive(state_server), timeout=15)
    assert not os.path.exists(sock)


@needs_namespaces
@pytest.mark.parametrize("mode", MODES)
def test_gunicorn_without_proc_or_pidfd(servers: list[Server], run_dir: str, mode: str) -> None:
    """gunicorn -w 4 with recycling, no /proc, no pidfd: 1,000 exact counts, one server owned
    by the master, no request waits for a timeout, and the server stops within 5 s of gunicorn."""
    env = platform_env(run_dir, mode)
    address = os.path.join(run_dir, "http.sock")
    command = [sys.executable, "-m", "gunicorn", "--bind", f"unix:{address}", "-w", "4"]
    command += ["--max-requests", "150", "--max-requests-jitter", "30", "loadapp:app"]
    server = _start(hidden(command), address, run_dir, env)
    servers.append(server)
    responses = server.load([("GET", "/", None)] * 1000, concurrency=16)
    assert [r.status for r in responses] == [200] * 1000
    assert int(server.get("/stats").json()["hits"]) == 1000
    slowest = max(r.seconds for r in responses)
    print(f"slowest of 1,000 requests ({mode}): {slowest:.3f}s")
    assert slowest < 5.0  # SHAREDSTATE_TIMEOUT: none waited for it
    (state_server,) = server_pids(run_dir)
    assert serving_lines(run_dir, "state.sock") == 1  # workers were recycled; one server
    with open(f"/proc/{state_server}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[cmdline.index(b"--owner-pid") + 1] == str(server.pid).encode()
    check_mode(run_dir, "state.sock", cmdline, mode)
    server.stop(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: not pid_alive(state_server), timeout=15)
    print(f"the state server stopped {time.monotonic() - stopped:.2f}s after gunicorn")
    assert time.monotonic() - stopped < 5.0


# -- process identity ----------------------------------------------------------------


def run_as(prelude: str, script: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", prelude + script, *args],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})),
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_ps_source_names_processes() -> None:
    """The ps source (macOS/BSD's): a process keeps its start time, and its command line shows."""
    from flask_sharedstate.server import processes

    child = subprocess.Popen(["sleep", "60"])
    try:
        first = processes.ps_source.start_time(child.pid)
        assert first is not None and first.startswith("ps:")
        assert processes.ps_source.start_time(child.pid) == first
        assert "sleep 60" in (processes.ps_source.command_line(child.pid) or "")
    finally:
        child.kill()
        child.wait()
    assert processes.ps_source.start_time(child.pid) is None  # gone: unknown, not a time


@pytest.mark.parametrize("source", ["proc", "ps"])
def test_process_gone_answers(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Gone means: no such pid, a zombie, or another start time; unknown is never gone."""
    from flask_sharedstate.server import processes

    monkeypatch.setattr(processes, "source", getattr(processes, f"{source}_source"))
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = processes.start_time(child.pid)
        assert start is not None and start.startswith(f"{source}:")
        assert not processes.process_gone(child.pid, start)
        assert not processes.process_gone(child.pid, None)  # unknown start: the pid decides
        assert not processes.process_gone(child.pid, "other-source:1")  # tells nothing
        assert processes.process_gone(child.pid, f"{source}:1")  # another process, same pid
        child.kill()
        wait_for(lambda: processes.process_gone(child.pid, start), timeout=10)  # a zombie
    finally:
        child.kill()
        child.wait()
    assert processes.process_gone(child.pid, start)  # reaped: no such process
    assert processes.start_time(child.pid) is None


NO_DESCRIPTORS = """
import os, resource, sys
from flask_sharedstate.server import processes

owner = os.getppid()
start = processes.start_time(owner)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
watch = processes.watch(owner, start)
print(watch.kind, watch.wait(0.1), processes.process_gone(owner, start))
"""


def test_no_descriptors_is_not_gone() -> None:
    """With every descriptor in use (EMFILE), the watch falls back to polling, and a live owner
    is not taken for gone."""
    out = run_as("", NO_DESCRIPTORS)
    assert out.split() == ["polling", "False", "False"]


# -- configuration on other platforms, in a real interpreter ---------------------------

PLAY_WINDOWS = """
import mmap, os, select, signal, socket, sys
# The standard library's own Windows branches need Windows itself: import it first.
import multiprocessing.connection, selectors, subprocess, tempfile
import click, flask, flask.cli, redis  # (and Flask's, Click's and redis-py's: only ours are tested)
sys.platform = "win32"  # os.name and os.path stay POSIX: ntpath needs Windows itself
# What CPython on Windows lacks, of what this package uses: the library reference's
# "Availability: Unix" (AF_UNIX: python/cpython#77589; set_blocking came in 3.12, fchmod in 3.13).
for name in (
    "fork", "register_at_fork", "getuid", "geteuid", "getegid", "setuid", "setgid", "setgroups",
    "initgroups", "pidfd_open", "statvfs", "pread", "pwrite", "O_CLOEXEC", "O_DIRECTORY",
    "O_NOFOLLOW",
) + (("set_blocking",) if sys.version_info < (3, 12) else ()) + (
    ("fchmod",) if sys.version_info < (3, 13) else ()
):
    os.__dict__.pop(name, None)
for module, names in (
    (signal, ("SIGHUP", "SIGKILL", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGPIPE", "SIGALRM",
              "SIGSTOP", "SIGCONT")),
    (socket, ("AF_UNIX", "MSG_DONTWAIT", "SO_PEERCRED")),
    (select, ("poll", "epoll", "POLLIN", "POLLOUT", "POLLERR", "POLLHUP")),
    (mmap, ("MAP_SHARED", "MAP_PRIVATE", "PROT_READ", "PROT_WRITE")),
):
    for name in names:
        module.__dict__.pop(name, None)
for name in ("fcntl", "pwd", "grp", "resource", "termios"):
    sys.modules[name] = None  # ImportError, as on Windows
for name in ("USER", "LOGNAME", "LNAME"):  # Windows names its user USERNAME
    os.environ.pop(name, None)
os.environ["USERNAME"] = "Jane Doe"
"""

WINDOWS_SCRIPT = """
import json, sys
import flask_sharedstate.backends.manager, flask_sharedstate.launcher  # no ImportError
from flask import Flask
from flask_sharedstate import ConfigError, SharedState

results = {}
for backend in ("memory", "redis", "manager"):
    app = Flask(backend)
    app.config["SHAREDSTATE_BACKEND"] = backend
    app.config["SHAREDSTATE_REDIS_URL"] = sys.argv[1]
    app.config["SHAREDSTATE_NAMESPACE"] = sys.argv[2]
    app.config["SECRET_KEY"] = "a secret key that signs the values stored in Redis"
    if backend != "redis":
        app.config["SHAREDSTATE_REDIS_URL"] = None
    try:
        shared = SharedState(app)
        results[backend] = shared.incr("n")
    except ConfigError as exc:
        results[backend] = "ConfigError: " + str(exc)
from flask_sharedstate.config import runtime_dir
results["runtime_dir"] = runtime_dir()
print(json.dumps(results))
"""


def test_windows_backends(redis_url: str, run_dir: str) -> None:
    """On Windows, memory and redis work, and manager is a ConfigError naming both."""
    namespace = f"windows-{os.path.basename(run_dir)}"
    results = json.loads(run_as(PLAY_WINDOWS, WINDOWS_SCRIPT, redis_url, namespace))
    assert results["memory"] == 1
    assert results["redis"] == 1
    message = results["manager"]
    assert message.startswith("ConfigError: SHAREDSTATE_BACKEND = 'manager'")
    assert "Windows" in message and "'memory'" in message and "'redis'" in message
    assert results["runtime_dir"].endswith("flask-sharedstate-Jane-Doe")  # no uid there


#: Modules that need Unix to do their work, and say so when imported elsewhere.
UNIX_ONLY = {
    "flask_sharedstate.gunicorn": "gunicorn",
    "flask_sharedstate.server.process": "state server",
    "flask_sharedstate.server.__main__": "state server",
}

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil
import flask_sharedstate

results = {}
for module in pkgutil.walk_packages(flask_sharedstate.__path__, "flask_sharedstate."):
    try:
        importlib.import_module(module.name)
        results[module.name] = None
    except ImportError as exc:  # anything else fails the script, traceback and all
        results[module.name] = str(exc)
print(json.dumps(results))
"""


def test_windows_imports_every_module() -> None:
    """On Windows every module imports, and those that need Unix raise an ImportError that
    says so and names the backends that work there."""
    results = json.loads(run_as(PLAY_WINDOWS, IMPORT_EVERY_MODULE))
    assert {"flask_sharedstate.cli", "flask_sharedstate.backends.manager"} <= set(results)
    failed = {name: message for name, message in results.items() if message is not None}
    assert set(failed) == set(UNIX_ONLY), failed
    for name, message in failed.items():
        assert UNIX_ONLY[name] in message and "Unix" in message, message
        assert "'memory'" in message and "'redis'" in message, message


CLI_APP = """
from flask import Flask
from flask_sharedstate import SharedState

app = Flask(__name__)
app.config.from_prefixed_env()
shared = SharedState(app)
"""


def windows_flask(run_dir: str, *args: str, **config: str) -> subprocess.CompletedProcess[str]:
    """``python -m flask --app winapp ARGS`` on Windows, configured by FLASK_SHAREDSTATE_*."""
    site = os.path.join(run_dir, "windows-site")
    if not os.path.isdir(site):
        os.makedirs(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(PLAY_WINDOWS)
        with open(os.path.join(run_dir, "winapp.py"), "w") as f:
            f.write(CLI_APP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, ROOT]))
    env.update({f"FLASK_{key}": value for key, value in config.items()})
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "winapp", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=run_dir,
        env=env,
    )


def test_windows_flask_cli(redis_url: str, run_dir: str) -> None:
    """On Windows, with the plugin installed, flask --help, flask run --help and flask
    sharedstate status work, and status says which backends this platform has."""
    from importlib.metadata import entry_points

    plugins = [e.value for e in entry_points(group="flask.commands")]
    assert "flask_sharedstate.cli:sharedstate" in plugins, "pip install -e . registers it"
    memory = {"SHAREDSTATE_BACKEND": "memory"}
    done = windows_flask(run_dir, "--help", **memory)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "sharedstate" in done.stdout
    done = windows_flask(run_dir, "run", "--help", **memory)
    assert done.returncode == 0 and "--port" in done.stdout, done.stderr

    done = windows_flask(run_dir, "sharedstate", "status", **memory)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "backend:     memory" in done.stdout
    assert "Windows" in done.stdout and "'manager'" in done.stdout, done.stdout

    redis = {
        "SHAREDSTATE_BACKEND": "redis",
        "SHAREDSTATE_REDIS_URL": redis_url,
        "SHAREDSTATE_NAMESPACE": f"windows-cli-{os.path.basename(run_dir)}",
        "SECRET_KEY": "a secret key that signs the values stored in Redis",
    }
    done = windows_flask(run_dir, "sharedstate", "status", **redis)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "backend:     redis" in done.stdout and "keys:        0" in done.stdout
    assert "Windows" in done.stdout and "'manager'" in done.stdout, done.stdout

    done = windows_flask(run_dir, "sharedstate", "status", SHAREDSTATE_BACKEND="manager")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("Error: SHAREDSTATE_BACKEND = 'manager'"), done.stderr
    assert "Windows" in done.stderr and "'memory'" in done.stderr and "'redis'" in done.stderr


PLAY_MACOS = """
import sys
# The standard library's own macOS branches need macOS itself (urllib.request's _scproxy,
# which Werkzeug 2.3 imports): import it, and Flask, first. Only ours are under test.
import urllib.request, flask
sys.platform = "darwin"
"""

SOCKET_SCRIPT = """
import json, sys
from flask import Flask
from flask_sharedstate import ConfigError
from flask_sharedstate.config import load_settings, runtime_dir

app = Flask("an-app-with-a-name-of-more-than-thirty-two-characters")
default = load_settings(app).socket_path
long_path = sys.argv[1]
app.config["SHAREDSTATE_SOCKET"] = long_path
try:
    load_settings(app)
    error = None
except ConfigError as exc:
    error = str(exc)
print(json.dumps({"default": default, "runtime_dir": runtime_dir(), "error": error}))
"""


def test_macos_socket_path_limit(run_dir: str) -> None:
    """macOS: the default socket path fits its 104-byte sun_path (with the NUL) under a long
    TMPDIR, and a user's 104-byte SHAREDSTATE_SOCKET is a ConfigError."""
    tmpdir = os.path.join(run_dir, "T" * (48 - len(run_dir)))  # as long as macOS's TMPDIR
    os.makedirs(tmpdir)
    too_long = os.path.join(run_dir, "s" * (104 - len(run_dir) - 1))
    assert len(too_long) == 104
    out = run_as(PLAY_MACOS, SOCKET_SCRIPT, too_long, env={"TMPDIR": tmpdir, "XDG_RUNTIME_DIR": ""})
    report = json.loads(out)
    assert len(os.fsencode(report["default"])) <= 103
    assert os.path.dirname(report["default"]) == report["runtime_dir"]
    assert report["runtime_dir"].startswith(tmpdir)
    assert report["error"] is not None
    assert "SHAREDSTATE_SOCKET" in report["error"] and "103 bytes" in report["error"]


SERVE_SCRIPT = """
import json, sys
from flask import Flask
from flask_sharedstate import SharedState

app = Flask("an-app-with-a-name-of-more-than-thirty-two-characters")
shared = SharedState(app)
path = app.extensions["sharedstate"].settings.socket_path
print(json.dumps({"n": shared.incr("n"), "socket": path}))
"""


@pytest.mark.parametrize("base_length", [60, 100])
def test_long_runtime_folder_is_shortened(run_dir: str, base_length: int) -> None:
    """Linux: a default socket path too long for sun_path is shortened (a hashed name, or a
    shorter folder); a real server binds it and serves."""
    base = os.path.join(run_dir, "R" * (base_length - len(run_dir) - 1))
    os.makedirs(base)
    out = run_as("", SERVE_SCRIPT, env={"XDG_RUNTIME_DIR": base})
    report = json.loads(out)
    try:
        assert report["n"] == 1
        assert len(os.fsencode(report["socket"])) <= 107
        folder = os.path.dirname(report["socket"])
        if base_length == 60:  # a hashed name fits the same private folder
            assert folder == os.path.join(base, f"flask-sharedstate-{os.getuid()}")
        else:  # not even that: a shorter private folder
            assert folder == f"/tmp/flask-sharedstate-{os.getuid()}"
    finally:
        if not report["socket"].startswith(run_dir):  # a shorter folder: clean up by hand
            stop_server_of(report["socket"])


def stop_server_of(socket_path: str) -> None:
    """Kill the state server of this one socket, by its pid file, and remove its files."""
    with contextlib.suppress(OSError, ValueError):
        with open(socket_path + ".pid") as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if socket_path.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    for suffix in ("", ".pid", ".key", ".lock", ".log"):
        with contextlib.suppress(OSError):
            os.unlink(socket_path + suffix)
