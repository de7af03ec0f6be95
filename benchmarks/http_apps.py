"""The apps ``throughput.py`` loads besides the example app: what users would pick instead.

Each is a bare Flask app with one route, the same for every store:

* ``/`` counts hits: ``seed_counter`` (the seed recipe: ``BaseManager`` with a
  ``DictProxy`` and an ``AcquirerProxy`` over loopback TCP; increment = lock, get,
  set, unlock), ``redis_counter`` (redis-py ``INCR``), ``diskcache_counter``
  (``diskcache.Cache.incr``, SQLite in a folder every worker opens);
* ``/flags`` reads five flags: ``global_flags`` (a per-process dict: the ceiling
  of a bare app), ``shared_flags`` (five ``shared.get``, with none of the example
  app's other extensions), ``redis_flags`` (five redis-py ``GET``).

The harness passes where the store is in the environment (``SEED_ADDRESS``,
``REDIS_URL``, ``DISKCACHE_DIR``); each worker connects on its first request,
after gunicorn forked it. ``serve_seed`` is the seed recipe's server.
"""

from __future__ import annotations

import os
import threading
from multiprocessing.managers import AcquirerProxy, BaseManager, DictProxy
from typing import Any

from flask import Flask

from flask_sharedstate import SharedState

FLAGS = ("shout", "new_ui", "beta_search", "dark_mode", "maintenance")
SEED_KEY = b"seed-benchmark"


class SeedManager(BaseManager):
    pass


_seed_dict: dict[str, int] = {"hits": 0}
_seed_lock = threading.Lock()
SeedManager.register("get_dict", callable=lambda: _seed_dict, proxytype=DictProxy)
SeedManager.register("get_lock", callable=lambda: _seed_lock, proxytype=AcquirerProxy)


def serve_seed(port: int) -> None:
    """The seed recipe's manager, serving forever on ``127.0.0.1:port``."""
    manager = SeedManager(address=("127.0.0.1", port), authkey=SEED_KEY)
    manager.get_server().serve_forever()


_local: dict[str, Any] = {}  # this worker's connection, made on its first request


def _seed() -> tuple[Any, Any]:
    if "seed" not in _local:
        host, port = os.environ["SEED_ADDRESS"].rsplit(":", 1)
        manager = SeedManager(address=(host, int(port)), authkey=SEED_KEY)
        manager.connect()
        _local["seed"] = (manager.get_dict(), manager.get_lock())  # type: ignore[attr-defined]
    return _local["seed"]  # type: ignore[no-any-return]


def _redis() -> Any:
    if "redis" not in _local:
        import redis

        _local["redis"] = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _local["redis"]


def _diskcache() -> Any:
    if "diskcache" not in _local:
        import diskcache

        _local["diskcache"] = diskcache.Cache(os.environ["DISKCACHE_DIR"])
    return _local["diskcache"]


seed_counter = Flask("seed_counter")


@seed_counter.get("/")
def seed_hit() -> str:
    hits, lock = _seed()
    with lock:
        hits["hits"] = hits["hits"] + 1
        count = hits["hits"]
    return f"{count}\n"


redis_counter = Flask("redis_counter")


@redis_counter.get("/")
def redis_hit() -> str:
    return f"{_redis().incr('hits')}\n"


diskcache_counter = Flask("diskcache_counter")


@diskcache_counter.get("/")
def diskcache_hit() -> str:
    return f"{_diskcache().incr('hits', default=0)}\n"


_process_flags = dict.fromkeys(FLAGS, False)
global_flags = Flask("global_flags")


@global_flags.get("/flags")
def global_read() -> dict[str, bool]:
    return {name: _process_flags[name] for name in FLAGS}


shared_flags = Flask("shared_flags")
shared_flags.config.from_prefixed_env()  # FLASK_SHAREDSTATE_SOCKET, ..._CLIENT_CACHE
_shared = SharedState(shared_flags, defaults={f"flag:{name}": False for name in FLAGS})


@shared_flags.get("/flags")
def shared_read() -> dict[str, bool]:
    return {name: bool(_shared.get(f"flag:{name}", False)) for name in FLAGS}


redis_flags = Flask("redis_flags")


@redis_flags.get("/flags")
def redis_read() -> dict[str, bool]:
    client = _redis()
    return {name: client.get(f"flag:{name}") == b"1" for name in FLAGS}
