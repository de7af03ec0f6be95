"""The example app: what Flask-SharedState is for, shared by every worker.

- ``GET /``: the seed's hit counter (``shared.incr``);
- ``POST /cart`` and ``GET /cart``: a cart edited in place under ``@shared.atomic``;
- ``GET /api/quote``: a per-client rate limit with Flask-Limiter on
  ``sharedstate://`` (RATE_LIMIT per minute, counted across workers);
- ``GET /flags``, ``PUT /flags/<name>``, ``GET /hello``: five feature flags, one
  key each, that one request sets and every worker reads at once (``GET /flags``
  reads all five: the read-mostly request ``benchmarks/throughput.py`` loads; with
  ``FLAGS_IN_PROCESS = True`` it reads a per-process dict instead, which is wrong,
  as no worker sees another's change, but is the ceiling it is measured against);
- ``GET /report``: a slow view cached with Flask-Caching on the shared state;
- ``POST /login/<name>``, ``GET /me``, ``POST /logout``: a Flask-Session login
  that every worker sees;
- a job every 10 seconds (APScheduler in every worker) that only the leader
  (``shared.leader("cleanup")``) runs: ``GET /jobs`` shows its runs;
- ``GET /stats``: the counter and the pid of the worker that answered.

Run it under gunicorn with four worker processes (``gunicorn.conf.py`` is
next to this file)::

    gunicorn -c example_app/gunicorn.conf.py 'example_app:create_app()'

``python -m example_app.demo`` does that, sends requests, and shows the result.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask, abort, request, session
from flask_caching import Cache
from flask_limiter import Limiter
from flask_session import Session

from flask_sharedstate import SharedState, SharedStateUnavailable
from flask_sharedstate.caching import SharedStateCache

shared = SharedState()
cache = Cache()

FLAGS = ("shout", "new_ui", "beta_search", "dark_mode", "maintenance")
_process_flags = dict.fromkeys(FLAGS, False)  # FLAGS_IN_PROCESS: this worker's own flags


def client_key() -> str:
    return request.headers.get("X-Api-Key") or request.remote_addr or "anonymous"


limiter = Limiter(client_key, storage_uri="sharedstate://")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config["RATE_LIMIT"] = 10  # requests per client per minute
    app.config["FLAGS_IN_PROCESS"] = False  # True: /flags without sharing (the ceiling)
    app.config["CACHE_TYPE"] = "flask_sharedstate.caching.SharedStateCache"
    app.config["SESSION_TYPE"] = "cachelib"
    app.config["SESSION_CACHELIB"] = SharedStateCache(key_prefix="session:")
    app.config.from_prefixed_env()  # FLASK_SHAREDSTATE_SOCKET=..., FLASK_RATE_LIMIT=...
    if config:
        app.config.update(config)
    shared.init_app(
        app,
        defaults={"hits": 0, "cart": [], **{f"flag:{name}": False for name in FLAGS}},
    )
    limiter.init_app(app)
    cache.init_app(app)
    Session(app)

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
    @limiter.limit(lambda: f"{app.config['RATE_LIMIT']}/minute")
    def quote() -> dict[str, Any]:
        """Rate limited per client by Flask-Limiter, counted in the shared state."""
        return {"quote": "Simple is better than complex."}

    @app.get("/report")
    @cache.cached(timeout=30)
    def report() -> dict[str, Any]:
        """A slow view: computed once, then served to every worker from the cache."""
        time.sleep(0.5)
        return {"rendered_by": os.getpid(), "at": time.time()}

    @app.post("/login/<name>")
    def login(name: str) -> dict[str, Any]:
        session["user"] = name
        return {"user": name}

    @app.get("/me")
    def me() -> dict[str, Any]:
        return {"user": session.get("user"), "worker": os.getpid()}

    @app.post("/logout")
    def logout() -> dict[str, Any]:
        session.clear()
        return {"user": None}

    @app.get("/jobs")
    def jobs() -> dict[str, Any]:
        return {"cleanup_runs": shared.get("cleanup_runs", 0), "by": shared.get("cleanup_by")}

    def flag(name: str) -> bool:
        if app.config["FLAGS_IN_PROCESS"]:
            return _process_flags[name]
        return bool(shared.get(f"flag:{name}", False))

    @app.get("/flags")
    def flags() -> dict[str, bool]:
        """Five reads per request: what a read cache is for."""
        return {name: flag(name) for name in FLAGS}

    @app.put("/flags/<name>")
    def set_flag(name: str) -> dict[str, bool]:
        if name not in FLAGS:
            abort(404, f"no flag {name!r}: the flags are {', '.join(FLAGS)}")
        value = request.get_json(silent=True)
        if not isinstance(value, bool):
            abort(400, "send JSON true or false")
        if app.config["FLAGS_IN_PROCESS"]:
            _process_flags[name] = value
        else:
            shared.set(f"flag:{name}", value)
        return {name: value}

    @app.get("/hello")
    def hello() -> str:
        greeting = f"hello from worker {os.getpid()}"
        if flag("shout"):
            greeting = greeting.upper()
        return greeting + "\n"

    return app


def cleanup(app: Flask) -> None:
    """The scheduled job: every worker's scheduler calls it, only the leader works."""
    with app.app_context():
        try:
            if shared.leader("cleanup"):
                shared.incr("cleanup_runs")
                shared.set("cleanup_by", os.getpid())
        except SharedStateUnavailable:
            pass  # the state server is restarting: the next run will do


_scheduler_lock = threading.Lock()


def start_scheduler(app: Flask) -> None:
    """Start this process's scheduler (once). gunicorn.conf.py calls it in each worker
    (``post_worker_init``); leadership makes the job run in one worker at a time."""
    from apscheduler.schedulers.background import BackgroundScheduler

    with _scheduler_lock:
        if "scheduler" not in app.extensions:
            scheduler = BackgroundScheduler(daemon=True)
            scheduler.add_job(cleanup, "interval", seconds=10, args=[app])
            scheduler.start()
            app.extensions["scheduler"] = scheduler
