"""gunicorn started as root with ``user = nobody``: the state server is the workers' user's.

The master stays root and the workers become ``nobody``. Whether the gunicorn hooks
start the state server or the first worker does, the server must run as the
workers' user and own every file it and its starter write (runtime folder, socket,
key, lock, log, pid and persistence file), or the workers cannot reach it.

``nobody`` cannot read the project's own interpreter (under /root), so these tests
run gunicorn from a virtual environment of Debian's /usr/bin/python3 that they
build once per session in a world-readable folder.
"""

from __future__ import annotations

import grp
import importlib.metadata
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

from conftest import kill_servers, server_pids, wait_for
from servers import ROOT, Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gunicorn's user = needs root")

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else 65534
NOGROUP = grp.getgrnam("nogroup").gr_gid if os.geteuid() == 0 else 65534
REQUESTS = 600

APP = """
import os

from flask import Flask

from flask_sharedstate import SharedState

app = Flask("userapp")
app.config.from_prefixed_env()
shared = SharedState()
shared.init_app(app, defaults={"hits": 0})


@app.get("/alive")
def alive():
    return "ok"


@app.get("/")
def index():
    return str(shared.incr("hits"))


@app.get("/stats")
def stats():
    return {"hits": shared.get("hits"), "worker": os.getpid(), "uid": os.getuid()}
"""


@pytest.fixture(scope="session")
def world_python() -> Iterator[str]:
    """A Python every user can run, with flask, gunicorn and this worktree installed."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"these tests need {SYSTEM_PYTHON} (apt-get install python3 python3-venv)")
    folder = tempfile.mkdtemp(prefix="fss-venv-", dir="/tmp")
    os.chmod(folder, 0o755)  # mkdtemp makes it 0700: nobody could not enter
    venv = os.path.join(folder, "venv")
    python = os.path.join(venv, "bin", "python")
    pip = [python, "-m", "pip", "install", "--quiet"]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("flask", "gunicorn")]
    steps = [
        [SYSTEM_PYTHON, "-m", "venv", venv],
        [*pip, *pins],
        [*pip, "--no-deps", ROOT],
    ]
    try:
        for step in steps:
            try:
                done = subprocess.run(
                    step, capture_output=True, text=True, timeout=300, umask=0o022
                )  # whatever the caller's umask, every user must read the venv
            except subprocess.TimeoutExpired:
                pytest.fail(f"building the test venv: {' '.join(step)} took over 300s")
            if done.returncode != 0:
                pytest.fail(
                    f"cannot build the venv these tests need: {' '.join(step)} said:\n"
                    f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n(they need python3-venv"
                    " and PyPI, or a local index, for flask and gunicorn)"
                )
        as_nobody = dict(user=NOBODY, group=NOGROUP, extra_groups=[], cwd="/")
        check = [python, "-c", "import flask_sharedstate, gunicorn"]
        done = subprocess.run(check, capture_output=True, text=True, timeout=60, **as_nobody)
        if done.returncode != 0:
            pytest.fail(f"nobody cannot use the test venv in {folder}:\n{done.stderr[-2000:]}")
        yield python
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def site() -> Iterator[str]:
    """A folder (0755) holding the app, that the user nobody can read; every server started in it is
    killed afterwards."""
    folder = tempfile.mkdtemp(prefix="fss-site-", dir="/tmp")
    os.chmod(folder, 0o755)
    fd = os.open(os.path.join(folder, "userapp.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask
    with open(fd, "w") as f:
        f.write(APP)
    try:
        yield folder
    finally:
        kill_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def nobodys_folder(path: str) -> str:
    """A 0700 folder of nobody's, as /run/user/65534 would be."""
    os.mkdir(path, 0o700)
    os.chown(path, NOBODY, NOGROUP)
    return path


def start(python: str, site: str, hooks: bool, env: dict[str, str]) -> Server:
    """gunicorn -w 3 as root with user = nobody, group = nogroup, serving userapp."""
    import gunicorn

    conf = os.path.join(site, "gunicorn.conf.py")
    with open(conf, "w") as f:
        if hooks:
            f.write("from flask_sharedstate.gunicorn import on_exit, on_starting  # noqa\n")
        f.write(textwrap.dedent('user = "nobody"\ngroup = "nogroup"\n'))
    address = os.path.join(site, "http.sock")
    command = [python, "-m", "gunicorn", "-c", conf, "-w", "3", "--bind", f"unix:{address}"]
    if gunicorn.version_info >= (25,):  # the world venv's is this one's (pinned to it)
        command += ["--control-socket", os.path.join(site, "http.ctl")]
    command += ["userapp:app"]
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/root",  # root's, as a real start would leave it
        "PYTHONPATH": site,
        **env,
    }
    log_path = os.path.join(site, "gunicorn.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=site, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(proc, address, log_path, site)
    try:
        wait_for(
            lambda: proc.poll() is not None or server.get("/alive", timeout=2).status == 200,
            timeout=60,
            interval=0.05,
        )
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"gunicorn exited at start:\n{server.log()}")
    return server


def ids(pid: int) -> tuple[list[str], list[str], list[str]]:
    """The real/effective/saved/fs uids, gids and supplementary groups of ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return fields["Uid"], fields["Gid"], fields["Groups"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
@pytest.mark.parametrize("folder", ["default", "custom"])
def test_gunicorn_user_nobody(world_python: str, site: str, hooks: bool, folder: str) -> None:
    """gunicorn as root with user = nobody and group = nogroup, with the hooks or without,
    in the default runtime folder or a SHAREDSTATE_SOCKET folder of nobody's: every one
    of 600 concurrent requests is counted exactly once, and the server and all its files
    belong to nobody."""
    runtime = nobodys_folder(os.path.join(site, "xdg"))
    data = nobodys_folder(os.path.join(site, "data"))
    env = {
        "XDG_RUNTIME_DIR": runtime,
        "FLASK_SHAREDSTATE_PERSIST_PATH": os.path.join(data, "state.db"),
    }
    if folder == "custom":
        sockets = nobodys_folder(os.path.join(site, "sockets"))
        env["FLASK_SHAREDSTATE_SOCKET"] = os.path.join(sockets, "app.sock")
        files_in = sockets
    else:
        files_in = os.path.join(runtime, f"flask-sharedstate-{NOBODY}")
    server = start(world_python, site, hooks, env)
    try:
        first = server.get("/", timeout=60)
        assert first.status == 200, (first, server.log()[-3000:])
        responses = [first, *server.load([("GET", "/", None)] * (REQUESTS - 1), concurrency=16)]
        counts: dict[int, int] = {}
        for r in responses:
            counts[r.status] = counts.get(r.status, 0) + 1
        assert counts == {200: REQUESTS}, server.log()[-3000:]
        assert sorted(int(r.body) for r in responses) == list(range(1, REQUESTS + 1))
        stats = server.get("/stats").json()
        assert stats["hits"] == REQUESTS and stats["uid"] == NOBODY
        (pid,) = server_pids(site)
        uids, gids, groups = ids(pid)
        assert uids == [str(NOBODY)] * 4 and gids == [str(NOGROUP)] * 4
        if hooks:
            assert f"state server {pid} is running" in server.log()
            assert groups == []  # none of root's supplementary groups
        owned = [files_in, os.path.join(data, "state.db")]
        owned += [os.path.join(files_in, name) for name in os.listdir(files_in)]
        suffixes = sorted(os.path.splitext(name)[1] for name in os.listdir(files_in))
        assert suffixes == [".key", ".lock", ".log", ".pid", ".sock", ".versions"]
        for path in owned:
            info = os.stat(path)
            assert (info.st_uid, info.st_mode & 0o077) == (NOBODY, 0), path
    finally:
        server.stop()
    if hooks:  # on_exit stopped the server it started
        wait_for(lambda: server_pids(site) == [], timeout=15)
