"""The sdist and wheel, built and checked as PyPI would see them, and the wheel installed
into a fresh virtual environment serving a shared counter under gunicorn."""

from __future__ import annotations

import configparser
import email
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

import pytest

from conftest import pid_alive, server_pids, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "flask_sharedstate"


@pytest.fixture(scope="module")
def dist() -> Iterator[str]:
    """``python -m build``: the sdist, then the wheel built from that sdist (as pip would)."""
    folder = tempfile.mkdtemp(prefix="fss-dist-")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", folder, ROOT],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _one(folder: str, suffix: str) -> str:
    names = [n for n in os.listdir(folder) if n.endswith(suffix)]
    assert len(names) == 1, names
    return os.path.join(folder, names[0])


def _wheel_metadata(dist: str) -> Message:
    with zipfile.ZipFile(_one(dist, ".whl")) as wheel:
        (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(wheel.read(path))


def test_twine_check_strict(dist: str) -> None:
    """twine check --strict passes on both files (PyPI renders the README as markdown)."""
    files = [_one(dist, ".tar.gz"), _one(dist, ".whl")]
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_metadata(dist: str) -> None:
    """A release version, an SPDX license with its file, project URLs, and no license
    classifier beside the expression."""
    meta = _wheel_metadata(dist)
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["Version"]), meta["Version"]
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL", []))
    assert set(urls) == {"Documentation", "Changes", "Source", "Issue Tracker"}, urls
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# Flask-SharedState")


def test_python_classifiers_match_the_tested_versions(dist: str) -> None:
    """Every Python the project tests on (tox.ini's envlist) has a classifier, and no other."""
    meta = _wheel_metadata(dist)
    classified = {
        c.rsplit(" :: ", 1)[1]
        for c in meta.get_all("Classifier", [])
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    tox = configparser.ConfigParser()
    tox.read(os.path.join(ROOT, "tox.ini"))
    envlist = tox["tox"]["envlist"]
    # py3{13,12,11,10} or py313, py312, ...
    tested = {f"3.{m}" for m in re.findall(r"\d+", envlist.split("}")[0].replace("py3", ""))}
    assert tested and classified == tested, (classified, tested)
    minimum = min(tested, key=lambda v: int(v.split(".")[1]))
    assert meta["Requires-Python"] == f">={minimum}"


def test_sdist_and_wheel_contents(dist: str) -> None:
    """The wheel holds the package (with py.typed) and the license, no tests; the sdist also
    holds what a packager needs to run the tests and build the docs."""
    with zipfile.ZipFile(_one(dist, ".whl")) as wheel:
        names = wheel.namelist()
    assert f"{NAME}/__init__.py" in names and f"{NAME}/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "example_app/"))]
    with tarfile.open(_one(dist, ".tar.gz")) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert top.lower().startswith("flask_sharedstate-")
    for needed in [
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "tox.ini",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_package.py",
        "docs/conf.py",
        "example_app/__init__.py",
    ]:
        assert needed in members, needed


def readme_app() -> str:
    """The README's smallest app (its first Python block), plus a route that tells on it."""
    with open(os.path.join(ROOT, "README.md")) as f:
        code = f.read().split("```python\n", 1)[1].split("```", 1)[0]
    return code + STATS


STATS = """

import os as _os
import flask_sharedstate as _package


@app.get("/stats")
def stats():
    return {"hits": shared.get("hits"), "pid": _os.getpid(), "package": _package.__file__}
"""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _get(path: str, url: str) -> bytes:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def _log(work: str) -> str:
    with open(os.path.join(work, "gunicorn.log"), errors="replace") as f:
        return "gunicorn exited:\n" + f.read()[-3000:]


def test_wheel_serves_a_shared_counter_under_gunicorn(dist: str, run_dir: str) -> None:
    """The built wheel, installed into a fresh venv (not the source tree), runs the README's
    smallest app under gunicorn -w 3 from a folder outside the repository and counts every
    request."""
    work = tempfile.mkdtemp(prefix="fss-venv-")
    gunicorn: subprocess.Popen[bytes] | None = None
    try:
        venv = os.path.join(work, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        python = os.path.join(venv, "bin", "python")
        install = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            + [_one(dist, ".whl"), "gunicorn"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        site = os.path.join(work, "site")
        os.mkdir(site)
        with open(os.path.join(site, "app.py"), "w") as f:
            f.write(readme_app())
        sock = os.path.join(run_dir, "http.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FLASK_"))}
        env.update(XDG_RUNTIME_DIR=run_dir, PATH=os.path.dirname(python) + ":" + env["PATH"])
        log = open(os.path.join(work, "gunicorn.log"), "wb")  # closed in the finally below
        gunicorn = subprocess.Popen(
            [os.path.join(venv, "bin", "gunicorn"), "-w", "3", "-b", f"unix:{sock}", "app:app"],
            cwd=site,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert gunicorn is not None and gunicorn.poll() is None, _log(work)
            try:
                return bool(_get(sock, "/stats"))
            except OSError:
                return False

        wait_for(ready, timeout=60, interval=0.1)
        stats = json.loads(_get(sock, "/stats"))
        assert stats["package"].startswith(venv + os.sep), stats["package"]
        assert stats["hits"] is None  # nothing counted yet

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: int(_get(sock, "/").split()[0]), range(300)))
            pids = set(pool.map(lambda _: json.loads(_get(sock, "/stats"))["pid"], range(60)))
        assert sorted(replies) == list(range(1, 301))  # every increment seen exactly once
        assert json.loads(_get(sock, "/stats"))["hits"] == 300
        assert len(pids) >= 2, pids  # the count was shared, not one worker's

        servers = server_pids(run_dir)
        assert len(servers) == 1, servers
        gunicorn.send_signal(signal.SIGTERM)
        assert gunicorn.wait(timeout=60) == 0
        wait_for(lambda: not pid_alive(servers[0]), timeout=30)  # the state server went too
    finally:
        if gunicorn is not None and gunicorn.poll() is None:
            gunicorn.kill()
            gunicorn.wait(timeout=30)
        if gunicorn is not None:
            log.close()
        shutil.rmtree(work, ignore_errors=True)
