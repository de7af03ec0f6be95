"""An app that uses Flask-Limiter, Flask-Caching, Flask-Session and leadership on the
shared state, for tests/test_integrations.py. Configured from FLASK_* variables:
FLASK_SHAREDSTATE_BACKEND, FLASK_SHAREDSTATE_REDIS_URL, FLASK_SHAREDSTATE_NAMESPACE."""

from __future__ import annotations

import os
import time

from flask import Flask, request, session
from flask_caching import Cache
from flask_limiter import Limiter
from flask_session import Session

from flask_sharedstate import SharedState
from flask_sharedstate.caching import SharedStateCache

app = Flask("integrationapp")
app.config["SECRET_KEY"] = "integration-tests-secret-key-0123456789abcdef"
app.config["SHAREDSTATE_TIMEOUT"] = 10.0
app.config["CACHE_TYPE"] = "flask_sharedstate.caching.SharedStateCache"
app.config["CACHE_KEY_PREFIX"] = "view:"
app.config["SESSION_TYPE"] = "cachelib"
app.config["SESSION_CACHELIB"] = SharedStateCache(key_prefix="session:")
app.config["PERMANENT_SESSION_LIFETIME"] = 3
app.config.from_prefixed_env()

shared = SharedState(app)
cache = Cache(app)
Session(app)


def client_id() -> str:
    return request.headers.get("X-Client", "anonymous")


# One limiter per strategy, each on its own route; and one on memory://, per process.
limiters = {
    strategy: Limiter(
        client_id, app=app, storage_uri="sharedstate://", strategy=strategy, key_prefix=strategy
    )
    for strategy in ("fixed-window", "moving-window", "sliding-window-counter")
}
per_process = Limiter(client_id, app=app, storage_uri="memory://", key_prefix="memory")


@app.after_request
def say_which_worker(response):  # type: ignore[no-untyped-def]
    response.headers["X-Worker"] = str(os.getpid())
    return response


@app.get("/alive")
def alive() -> str:
    return "ok"


@app.get("/worker")
def worker() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/limited/fixed-window")
@limiters["fixed-window"].limit("100/hour")
def limited_fixed() -> str:
    return "ok"


@app.get("/limited/moving-window")
@limiters["moving-window"].limit("100/hour")
def limited_moving() -> str:
    return "ok"


@app.get("/limited/sliding-window-counter")
@limiters["sliding-window-counter"].limit("100/hour")
def limited_sliding() -> str:
    return "ok"


@app.get("/limited/memory")
@per_process.limit("100/hour")
def limited_memory() -> str:
    return "ok"


@app.get("/cached")
@cache.cached(timeout=60)
def cached_view() -> str:
    shared.incr("cached_runs")
    time.sleep(0.3)  # a slow body: a cold burst finds it running
    return f"rendered by {os.getpid()}"


@app.get("/cold")
@cache.cached(timeout=60)
def cold_view() -> str:
    shared.incr("cold_runs")
    time.sleep(0.3)
    return f"rendered by {os.getpid()}"


@app.get("/once")
def once() -> dict[str, object]:
    def compute() -> str:
        shared.incr("once_runs")
        time.sleep(0.5)
        return f"computed by {os.getpid()}"

    return {"value": shared.get_or_set("once", compute, ttl=60, timeout=30)}


@app.get("/count/<name>")
def count(name: str) -> dict[str, object]:
    return {name: shared.get(name, 0)}


@app.post("/login/<user>")
def login(user: str) -> str:
    session["user"] = user
    session.permanent = True
    return "ok"


@app.get("/me")
def me() -> dict[str, object]:
    return {"user": session.get("user"), "pid": os.getpid()}


@app.post("/logout")
def logout() -> str:
    session.clear()
    return "ok"


# -- leadership: an APScheduler job every 0.5 s that only the leader runs ------------

TICK = 0.5


def tick() -> None:
    """Every worker's scheduler fires on the same 0.5 s grid; only the leader records.

    Idle until a test sets "ticking"; then each worker says it is a candidate."""
    slot = round(time.time() / TICK)
    with app.app_context():
        if not shared.get("ticking"):
            return
        shared.set(f"candidate:{os.getpid()}", slot)
        if shared.leader("ticker"):
            shared.set(f"tick:{slot}", os.getpid())
            shared.incr(f"ran:{slot}")


def start_scheduler() -> None:
    """Each worker's scheduler (tests/integration_gunicorn.py starts it in every worker)."""
    from datetime import datetime, timezone

    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(daemon=True)
    start = datetime.fromtimestamp(int(time.time()) + 1, timezone.utc)
    scheduler.add_job(tick, "interval", seconds=TICK, start_date=start)
    scheduler.start()


@app.post("/ticker")
def start_ticking() -> str:
    shared.set("ticking", True)
    return "ok"


@app.get("/ticks")
def ticks() -> dict[str, object]:
    keys = [k for k in shared.dict.keys() if k.startswith(("tick:", "ran:", "candidate:"))]
    values = shared.get_many(keys)
    return {
        "ticks": {k[5:]: v for k, v in values.items() if k.startswith("tick:")},
        "ran": {k[4:]: v for k, v in values.items() if k.startswith("ran:")},
        "candidates": [int(k[10:]) for k in values if k.startswith("candidate:")],
    }
