"""An app for the read cache's gunicorn probes: set and get one key per request.

With ``--preload`` the master imports this module, and (``FSS_MASTER_READS=1``)
reads the key itself, so every forked worker starts with the master's read cache
already holding it.
"""

from __future__ import annotations

import os

from flask import Flask, Response

from flask_sharedstate import SharedState

app = Flask("cacheapp")
app.config["SHAREDSTATE_SOCKET"] = os.environ["FLASK_SHAREDSTATE_SOCKET"]
shared = SharedState(app)

if os.environ.get("FSS_MASTER_READS") == "1":
    with app.app_context():
        shared.set("k", -1)
        assert shared.get("k") == -1 and shared.get("k") == -1  # cached in the master


@app.after_request
def say_which_worker(response: Response) -> Response:
    response.headers["X-Worker"] = str(os.getpid())
    return response


@app.get("/alive")
def alive() -> str:
    return "ok"


@app.post("/set/<int:value>")
def set_value(value: int) -> str:
    shared.set("k", value)
    return "ok"


@app.get("/get")
def get_value() -> str:
    """The value, and this worker's read-cache hits so far."""
    value = shared.get("k")
    cache = shared.state().backend.read_cache
    return f"{value} {cache.hits if cache is not None else 0}"
