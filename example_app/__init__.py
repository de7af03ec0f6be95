"""The example app: what Flask-SharedState is for, shared by every worker.

- ``GET /``: the seed's hit counter (``shared.incr``);
- ``POST /cart`` and ``GET /cart``: a cart edited in place under ``@shared.atomic``;
- ``GET /api/quote``: a per-client rate limit (``incr`` with a ``ttl`` window);
- ``GET /flags``, ``PUT /flags/<name>``, ``GET /hello``: feature flags that
  one request sets and every worker reads at once;
- ``GET /stats``: the counter and the pid of the worker that answered.

Run it under gunicorn with four worker processes (``gunicorn.conf.py`` is
next to this file)::

    gunicorn -c example_app/gunicorn.conf.py 'example_app:create_app()'

``python -m example_app.demo`` does that, sends requests, and shows the result.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort, request

from flask_sharedstate import SharedState, SharedStateUnavailable

shared = SharedState()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config["RATE_LIMIT"] = 10  # requests per client per window
    app.config["RATE_WINDOW"] = 60.0  # seconds
    app.config.from_prefixed_env()  # FLASK_SHAREDSTATE_SOCKET=..., FLASK_RATE_LIMIT=...
    if config:
        app.config.update(config)
    shared.init_app(app, defaults={"hits": 0, "cart": [], "flags": {"shout": False}})

    @app.errorhandler(SharedStateUnavailable)
    def state_unavailable(error: SharedStateUnavailable) -> tuple[dict[str, str], int]:
        # The state server is restarting (or gone): tell the client to retry.
        return {"error": "shared state unavailable, retry shortly"}, 503

    @app.get("/")
    def index() -> str:
        """The seed's counter: every worker counts into one number."""
        return f"{shared.incr('hits')}\n"

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {"hits": shared.get("hits"), "worker": os.getpid()}

    @app.post("/cart")
    @shared.atomic
    def add_to_cart() -> dict[str, Any]:
        """A nested edit: safe because the whole view is one atomic block."""
        item = (request.get_json(silent=True) or {}).get("item")
        if not isinstance(item, str):
            abort(400, 'send JSON like {"item": "apple"}')
        shared.dict["cart"].append(item)
        return {"items": len(shared.dict["cart"])}

    @app.get("/cart")
    def show_cart() -> dict[str, Any]:
        return {"cart": shared.get("cart")}

    @app.get("/api/quote")
    def quote() -> tuple[dict[str, Any], int]:
        """Rate limited per client: RATE_LIMIT requests per RATE_WINDOW seconds."""
        client = request.headers.get("X-Api-Key") or request.remote_addr or "anonymous"
        used = shared.incr(f"rate:{client}", ttl=app.config["RATE_WINDOW"])
        limit = app.config["RATE_LIMIT"]
        headers = {"X-RateLimit-Remaining": max(limit - used, 0)}
        if used > limit:
            return {"error": "rate limit exceeded", **headers}, 429
        return {"quote": "Simple is better than complex.", **headers}, 200

    @app.get("/flags")
    def flags() -> dict[str, Any]:
        return shared.get("flags", {})  # type: ignore[no-any-return]

    @app.put("/flags/<name>")
    @shared.atomic
    def set_flag(name: str) -> dict[str, Any]:
        value = request.get_json(silent=True)
        if not isinstance(value, bool):
            abort(400, "send JSON true or false")
        shared.dict["flags"][name] = value
        return shared.dict["flags"]  # type: ignore[no-any-return]

    @app.get("/hello")
    def hello() -> str:
        greeting = f"hello from worker {os.getpid()}"
        if shared.get("flags", {}).get("shout"):
            greeting = greeting.upper()
        return greeting + "\n"

    return app
