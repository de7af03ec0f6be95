"""The example app plus the routes the fault tests need."""

from __future__ import annotations

import fcntl
import os
import time

from example_app import create_app, shared
from flask import Response, request

app = create_app()


@app.after_request
def say_which_worker(response: Response) -> Response:
    """Every response names the worker process that made it (tests/servers.py reads it)."""
    response.headers["X-Worker"] = str(os.getpid())
    return response


@app.get("/race")
def race() -> dict[str, object]:
    """This worker's first use of the state, started at the same instant as every
    other worker's: say we arrived, block until the test opens the gate, then use it.

    The test holds an exclusive flock on ``$FSS_RACE_DIR/gate`` until every worker
    has arrived; a sync worker blocked here takes no other request, so N concurrent
    requests reach N distinct workers.
    """
    folder = os.environ["FSS_RACE_DIR"]
    with open(os.path.join(folder, f"arrived-{os.getpid()}"), "w"):
        pass
    with open(os.path.join(folder, "gate"), "rb") as gate:
        fcntl.flock(gate, fcntl.LOCK_SH)  # released when the test drops its lock
    started = time.monotonic()
    racers = shared.incr("racers")
    ended = time.monotonic()
    server = shared.state().backend.server_pid()  # type: ignore[attr-defined]
    return {"started": started, "ended": ended, "racers": racers, "server": server}


@app.get("/alive")
def alive() -> str:
    """Readiness without touching the state, so a test can start its workers cold."""
    return "ok"


@app.post("/record/<rid>")
def record(rid: str) -> str:
    """Count a request id once: its key and the counter change together, or not at all."""
    with shared.atomic():
        shared.dict[f"req:{rid}"] = True
        shared.incr("recorded")
    return "ok"


@app.get("/recorded")
def recorded() -> dict[str, object]:
    keys = [k for k in shared.dict if k.startswith("req:")]
    return {"count": shared.get("recorded", 0), "ids": sorted(k[4:] for k in keys)}


@app.get("/key/<name>")
def key(name: str) -> dict[str, object]:
    return {name: shared.get(name)}


@app.get("/slow-atomic")
def slow_atomic() -> str:
    """Hold an atomic block, with a write made, for longer than gunicorn's timeout."""
    with shared.atomic():
        shared.dict["partial"] = shared.dict.get("partial", 0) + 1
        shared.dict["cart"].append("from-a-killed-block")
        time.sleep(float(request.args.get("seconds", "60")))
    return "finished"
