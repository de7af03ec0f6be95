"""The example app plus two routes the fault tests need."""

from __future__ import annotations

import time

from example_app import create_app, shared
from flask import request

app = create_app()


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
