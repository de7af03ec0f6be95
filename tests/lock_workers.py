"""Lock holders that the lock tests run in ``spawn`` processes (importable, so children find it).

Each builds its own app from a config dict, as a gunicorn worker would, and
reports what happened on a queue.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask

from flask_sharedstate import SharedState


def make_shared(config: dict[str, Any]) -> SharedState:
    app = Flask("lock_app")
    app.config.update(config)
    return SharedState(app)


def outcome(exc: BaseException | None) -> str:
    return "released" if exc is None else f"{type(exc).__name__}: {exc}"


def hold_for(config: dict[str, Any], name: str, seconds: float, results: Any) -> None:
    """Hold lock ``name`` for ``seconds`` (working past the lease), then release it."""
    shared = make_shared(config)
    lock = shared.lock(name)
    lock.acquire()
    results.put("held")
    time.sleep(seconds)
    release_and_report(lock, results)


def hold_until(config: dict[str, Any], name: str, go: Any, results: Any) -> None:
    """Hold lock ``name`` until ``go`` is set, then release it and report how that went."""
    shared = make_shared(config)
    lock = shared.lock(name)
    lock.acquire()
    results.put("held")
    go.wait(120)
    release_and_report(lock, results)


def release_and_report(lock: Any, results: Any) -> None:
    """Release ``lock`` and put how that went (None, or the exception) on ``results``."""
    try:
        lock.release()
    except Exception as exc:
        results.put(outcome(exc))
    else:
        results.put(outcome(None))
