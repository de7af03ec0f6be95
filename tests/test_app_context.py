"""The current app context: the fast way (Flask's private variable) where Flask has it, the
public way otherwise, and the read cache right through either."""

from __future__ import annotations

import os
import subprocess
import sys

import flask.globals
from flask import Flask

from flask_sharedstate import app_context

from servers import ROOT, TESTS

#: The read cache's checks that go through the current app: two apps, hits, misses and
#: invalidation, expiry, atomic blocks, copies, the bound.
CORE_CHECKS = (
    "clear_invalidates or get_many or expired_key or atomic_blocks_never or"
    " one_shared_state_on_two_apps or every_cached_read or least_recently_used or hit_again"
)


def test_fast_way_where_flask_has_it() -> None:
    """The private variable is used exactly where the installed Flask has it."""
    assert app_context.FAST == hasattr(flask.globals, "_cv_app")


def test_both_ways_give_the_same_context() -> None:
    """Outside any app, in an app, in another app inside it, and back: the same answer."""
    first, second = Flask("first"), Flask("second")
    ways = (app_context.current_context, app_context.public_context)
    assert [way(None) for way in ways] == [None, None]
    with first.app_context():
        outer = [way(None) for way in ways]
        assert outer[0] is outer[1] and outer[0].app is first
        with second.app_context():
            inner = [way(None) for way in ways]
            assert inner[0] is inner[1] and inner[0].app is second
        assert [way(None) for way in ways] == outer
    assert [way(None) for way in ways] == [None, None]


def test_read_cache_the_public_way() -> None:
    """With Flask's private variable gone, the read cache's core checks and the extension's
    tests pass, the app context found the public way."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "public_app_context", "-q", "-p", "no:cacheprovider"]
        + ["tests/test_client_cache.py", "tests/test_extension.py"]
        + ["-k", f"test_extension or {CORE_CHECKS}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT])),
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "app context found by: public app_ctx" in done.stdout
    with open(os.path.join(TESTS, "test_extension.py")) as f:
        extension_tests = sum(line.startswith("def test_") for line in f)
    passed = int(done.stdout.split(" passed")[0].rsplit("\n", 1)[-1].strip())
    assert passed >= 8 + extension_tests, done.stdout[-2000:]  # each check ran, none skipped
    assert " skipped" not in done.stdout and " failed" not in done.stdout
