"""The example app: a shared hit counter and a shared cart, for several workers.

Run it under gunicorn with four worker processes::

    gunicorn -w 4 'example_app:create_app()'

``python -m example_app.demo`` does that, sends requests, and shows the result.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request

from flask_sharedstate import SharedState

shared = SharedState()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()  # FLASK_SHAREDSTATE_SOCKET=... and friends
    if config:
        app.config.update(config)
    shared.init_app(app, defaults={"hits": 0, "cart": []})

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
            return {"error": 'send JSON like {"item": "apple"}'}, 400  # type: ignore[return-value]
        shared.dict["cart"].append(item)
        return {"items": len(shared.dict["cart"])}

    @app.get("/cart")
    def show_cart() -> dict[str, Any]:
        return {"cart": shared.get("cart")}

    return app
