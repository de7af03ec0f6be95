"""The limits storage ``sharedstate://`` on every backend, against limits' own MemoryStorage."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from limits.storage import MemoryStorage, storage_from_string

from flask_sharedstate import SharedState
from flask_sharedstate.limiter import SharedStateStorage


@pytest.fixture
def storage(app: Flask, shared: SharedState) -> Iterator[SharedStateStorage]:
    with app.app_context():
        made = storage_from_string("sharedstate://")
        assert isinstance(made, SharedStateStorage)
        yield made


def test_moving_window_agrees_with_limits_memory_storage(storage: SharedStateStorage) -> None:
    """acquire_entry and get_moving_window answer as limits' MemoryStorage does."""
    model = MemoryStorage()
    for amount in (1, 2, 1, 1, 3, 4):
        assert storage.acquire_entry("mw", 4, 60, amount) == model.acquire_entry(
            "mw", 4, 60, amount
        )
    start, count = storage.get_moving_window("mw", 4, 60)
    assert count == model.get_moving_window("mw", 4, 60)[1] == 4
    assert start <= storage.get_moving_window("mw", 4, 60)[0]
    storage.clear("mw")
    assert storage.get_moving_window("mw", 4, 60)[1] == 0
    assert storage.acquire_entry("mw", 4, 60) is True


def test_sliding_window_counter_holds_its_limit(storage: SharedStateStorage) -> None:
    """acquire_sliding_window_entry lets exactly ``limit`` hits through in a window."""
    hits = [storage.acquire_sliding_window_entry("sw", 5, 3600, 1) for _ in range(8)]
    assert hits == [True] * 5 + [False] * 3
    previous, _, current, current_ttl = storage.get_sliding_window("sw", 3600)
    assert (previous, current) == (0, 5)
    assert 3600 < current_ttl <= 7200
    assert storage.acquire_sliding_window_entry("sw", 5, 3600, 6) is False  # amount > limit
    storage.clear_sliding_window("sw", 3600)
    assert storage.get_sliding_window("sw", 3600)[2] == 0


def test_fixed_window_and_reset(storage: SharedStateStorage, shared: SharedState) -> None:
    """incr/get/get_expiry as limits defines them; reset() removes only the limits' keys."""
    assert storage.incr("fw", 60) == 1
    assert storage.incr("fw", 60, amount=4) == 5
    assert storage.get("fw") == 5
    assert storage.get("other") == 0
    assert storage.check() is True
    shared.set("mine", 1)
    storage.acquire_entry("mw", 2, 60)
    assert storage.reset() == 2
    assert storage.get("fw") == 0
    assert shared.get("mine") == 1


def test_a_key_that_is_no_window_is_a_clear_error(
    storage: SharedStateStorage, shared: SharedState
) -> None:
    """A moving-window step on a key holding something else raises TypeError, writes nothing."""
    shared.set("limits:mw:taken", {"not": "a window"})
    with pytest.raises(TypeError, match="moving window"):
        storage.acquire_entry("taken", 3, 60)
    assert shared.get("limits:mw:taken") == {"not": "a window"}


def test_sharedstate_uri_without_sharedstate_says_what_it_needs() -> None:
    """sharedstate:// on an app with no SharedState fails each limited request with an
    error that says to add SharedState(app), not "did you forget to call 'init_app'"."""
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    app = Flask("unshared_app")
    app.config.update(TESTING=True, RATELIMIT_STORAGE_URI="sharedstate://")
    limiter = Limiter(get_remote_address, app=app)

    @app.get("/")
    @limiter.limit("5/minute")
    def index() -> str:
        return "ok"

    with pytest.raises(RuntimeError) as info:
        app.test_client().get("/")
    message = str(info.value)
    assert "RATELIMIT_STORAGE_URI = 'sharedstate://'" in message
    assert "SharedState(app)" in message and "init_app" in message
    assert "did you forget" not in message.lower()


def test_importing_sharedstate_registers_the_scheme() -> None:
    """As the docs say: `from flask_sharedstate import SharedState` registers sharedstate://
    with limits (in a fresh interpreter), while `import flask_sharedstate` imports neither
    Flask nor limits."""
    import subprocess
    import sys

    code = (
        "import sys, flask_sharedstate\n"
        "assert 'limits' not in sys.modules and 'flask' not in sys.modules\n"
        "from flask_sharedstate import SharedState\n"
        "from limits.storage import storage_from_string\n"
        "print(type(storage_from_string('sharedstate://')).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SharedStateStorage"
