"""SharedState follows Flask's extension conventions."""

from __future__ import annotations

import pytest
from flask import Flask, current_app

from flask_sharedstate import SharedState

from conftest import make_app


def test_app_factory_pattern(backend: str, run_dir: str) -> None:
    """One SharedState, init_app on each app; each app's state stays its own."""
    shared = SharedState()
    one = make_app(backend, run_dir, name="one")
    two = make_app(backend, run_dir, name="two")
    shared.init_app(one)
    shared.init_app(two)
    try:
        with one.app_context():
            shared.dict["who"] = "one"
            assert current_app.extensions["sharedstate"] is one.extensions["sharedstate"]
        with two.app_context():
            assert "who" not in shared.dict
            shared.dict["who"] = "two"
        with one.app_context():
            assert shared.dict["who"] == "one"
    finally:
        for app in (one, two):
            app.extensions["sharedstate"].backend.close()


def test_init_app_twice_is_refused() -> None:
    """A second registration on one app raises a RuntimeError that says why."""
    app = Flask("twice")
    SharedState(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        SharedState(app)


def test_missing_init_app_is_explained() -> None:
    """Using the extension on an app it was not registered on says init_app is missing."""
    shared = SharedState()
    app = Flask("forgot")
    with app.app_context(), pytest.raises(RuntimeError, match="forget to call 'init_app'"):
        shared.get("k")


def test_outside_app_context() -> None:
    """Without an app context, SharedState() explains; SharedState(app) just works."""
    shared = SharedState()
    shared.init_app(Flask("noctx"))
    with pytest.raises(RuntimeError, match="outside of application context"):
        shared.get("k")
    app = Flask("script")
    app.config["SHAREDSTATE_BACKEND"] = "memory"
    scripted = SharedState(app)
    scripted.set("k", 1)
    assert scripted.get("k") == 1


def test_views_share_state(app: Flask, shared: SharedState, client) -> None:  # type: ignore[no-untyped-def]
    """Routes read and write the state through pytest-flask's client."""

    @app.get("/")
    def index() -> str:
        return str(shared.incr("hits"))

    @app.post("/cart")
    @shared.atomic
    def add() -> dict[str, int]:
        from flask import request

        shared.dict.setdefault("cart", []).append(request.get_json()["item"])
        return {"items": len(shared.dict["cart"])}

    assert client.get("/").text == "1"
    assert client.get("/").text == "2"
    assert client.post("/cart", json={"item": "apple"}).json == {"items": 1}
    assert client.post("/cart", json={"item": "pear"}).json == {"items": 2}
    assert shared.dict["cart"] == ["apple", "pear"]
