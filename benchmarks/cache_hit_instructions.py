"""Instructions per read-cache hit, counted by callgrind: a figure a busy machine cannot move.

Starts a state server (natively) and writes the values of ``client_cache.py``; then, for
each value, runs a reader under ``valgrind --tool=callgrind`` twice: it connects, reads the
key once (the miss that fills the cache), then reads it ``--base`` and ``--base + --hits``
times. The difference of the two runs' instruction counts divided by ``--hits`` is what
one hit costs, loop included; the ``empty loop`` line is that loop calling a function that
does nothing (subtract it to get the hit alone). Every run's start (interpreter, imports,
connecting) is the same, so it cancels. Run::

    python benchmarks/cache_hit_instructions.py [--hits 20000] [--case "short string"]
    python benchmarks/cache_hit_instructions.py --public-context   # Flask's public way

(needs valgrind; the package measured is the one first on the path, as for the others).
With ``--public-context`` the readers play a Flask without its private app-context
variable, so the package finds the current app with ``has_app_context()`` and
``app_ctx`` (``flask_sharedstate/app_context.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

if "--public-context" in sys.argv:  # before the package looks for it
    import flask.globals

    del flask.globals._cv_app

from flask import Flask

from flask_sharedstate import SharedState
from flask_sharedstate.app_context import FAST

NAMESPACE = "client-cache-bench"


def _values() -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from client_cache import VALUES  # the same four values

    return VALUES


def _shared(socket_path: str) -> tuple[Flask, SharedState]:
    app = Flask("cache_hit_instructions")
    app.config["SHAREDSTATE_SOCKET"] = socket_path
    app.config["SHAREDSTATE_NAMESPACE"] = NAMESPACE
    return app, SharedState(app)


def reader(socket_path: str, case: str, reads: int) -> None:
    """The process under callgrind: one miss, then ``reads`` hits of the case's key."""
    names = list(_values())
    app, shared = _shared(socket_path)
    with app.app_context():
        if case == "empty loop":

            def op(key: str) -> None:
                pass

            key = "value:0"
        else:
            name, via_dict, _ = case.partition(" via shared.dict")
            key = f"value:{names.index(name)}"
            op = shared.dict.__getitem__ if via_dict else shared.get  # type: ignore[assignment]
            op(key)
        for _ in range(reads):
            op(key)


def instructions(socket_path: str, case: str, reads: int, folder: str) -> int:
    out = os.path.join(folder, f"callgrind.{os.getpid()}.{reads}")
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--reader",
            socket_path,
            "--case",
            case,
            "--hits",
            str(reads),
            *(["--public-context"] if not FAST else []),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(out) as f:
        for line in f:
            match = re.match(r"summary: (\d+)", line) or re.match(r"totals: (\d+)", line)
            if match:
                return int(match.group(1))
    raise SystemExit(f"no instruction count in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=20000, help="hits counted (the difference)")
    parser.add_argument("--base", type=int, default=1000, help="hits of the shorter run")
    parser.add_argument("--case", action="append", help="a value's name (default: all)")
    parser.add_argument(
        "--public-context", action="store_true", help="find the app context the public way"
    )
    parser.add_argument("--reader", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader(args.reader, args.case[0], args.hits)
        return 0
    values = _values()
    cases = args.case or ["empty loop", *values, "short string via shared.dict"]
    folder = tempfile.mkdtemp(prefix="fss-hit-instr-")
    socket_path = os.path.join(folder, "state.sock")
    app, shared = _shared(socket_path)
    way = "private flask.globals._cv_app" if FAST else "public flask.globals.app_ctx"
    print(f"app context found by: {way}", flush=True)
    try:
        with app.app_context():
            for i, value in enumerate(values.values()):
                shared.set(f"value:{i}", value)
        for case in cases:
            low = instructions(socket_path, case, args.base, folder)
            high = instructions(socket_path, case, args.base + args.hits, folder)
            print(f"{case:32} {(high - low) / args.hits:8.0f} instructions per read", flush=True)
    finally:
        server_pid = shared.state().backend.server_pid()  # type: ignore[attr-defined]
        shared.state().backend.close()
        os.kill(server_pid, signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
