"""Run a state server: ``python -m flask_sharedstate.server [options]``.

Started by the ``manager`` backend (see ``backends/manager.py``), which
passes the key on standard input (never on the command line, where ``ps``
would show it) and waits on ``--ready-fd`` for one line: ``ready PID`` once
the server listens, ``in-use`` if the address is taken (or another server holds
the pid file's lock: its socket file may have been deleted), or ``error MESSAGE``.
With ``--detach`` the server forks once after binding, so that it is nobody's
child but init's: its starter can exit, or be killed, without taking it along.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

from .persistence import Journal, PersistenceError
from .process import (
    PidFile,
    StateServer,
    install_signal_handlers,
    listen_unix,
    raise_descriptor_limit,
)
from .protocol import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_PEER
from .store import Store

log = logging.getLogger("flask_sharedstate.server")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flask_sharedstate.server")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on this TCP address")
    parser.add_argument("--owner-pid", type=int, help="stop when this process is gone")
    parser.add_argument(
        "--owner-start",
        help="the owner's start time (see processes.py), so a reused pid is not taken for it;"
        " without it, the pid alone is watched",
    )
    parser.add_argument("--ready-fd", type=int, help="write the readiness line here")
    parser.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    parser.add_argument("--persist", metavar="PATH", help="restore from and journal to this file")
    parser.add_argument(
        "--fsync", choices=("always", "everysec", "no"), default="everysec", help="with --persist"
    )
    parser.add_argument("--detach", action="store_true", help="fork once after binding")
    parser.add_argument(
        "--max-connections",
        type=_positive,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="refuse connections beyond N (SHAREDSTATE_MAX_CONNECTIONS)",
    )
    parser.add_argument(
        "--max-connections-per-peer",
        type=_positive,
        default=DEFAULT_MAX_CONNECTIONS_PER_PEER,
        metavar="N",
        help="refuse a process's (TCP: an address's) connections beyond N"
        " (SHAREDSTATE_MAX_CONNECTIONS_PER_PEER)",
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _bind(args: argparse.Namespace) -> socket.socket:
    if args.unix:
        return listen_unix(args.unix)
    host, _, port = args.tcp.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(512)
    return sock


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(message)s"))
    logging.getLogger("flask_sharedstate").addHandler(handler)
    logging.getLogger("flask_sharedstate").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ready = args.ready_fd if args.ready_fd is not None else sys.stdout.fileno()

    def say(line: str) -> None:
        # Unbuffered: after a broken pipe, no buffer is left to fail again at exit.
        try:
            os.write(ready, (line + "\n").encode())
        except BrokenPipeError:  # the starter stopped waiting (its timeout): log it instead
            log.warning("the process that started this server is gone; it was told: %s", line)

    log_to_stderr()
    key = sys.stdin.buffer.read()
    if not key:
        say("error no key on standard input")
        return 2
    # Keep nothing of the starter's: standard input was its pipe.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)

    def ready_and_close() -> None:
        say(f"ready {os.getpid()}")
        if args.ready_fd is not None:
            os.close(ready)

    return serve(args, key, say, ready_and_close)


def serve(
    args: argparse.Namespace,
    key: bytes,
    say: Callable[[str], None],
    on_ready: Callable[[], None],
) -> int:
    """Restore, bind, (detach,) and serve until stopped. Also ``flask sharedstate serve``."""
    raise_descriptor_limit()
    pid_file = None
    if args.pid_file:
        # Before the restore: a running server may still be writing the journal.
        try:
            pid_file = PidFile.claim(args.pid_file)
        except OSError as exc:
            say(f"error cannot lock the pid file {args.pid_file}: {exc}")
            return 2
        if pid_file is None:
            say("in-use")
            return 3
    try:
        return _serve(args, key, say, on_ready, pid_file)
    finally:
        if pid_file is not None:
            pid_file.release()


def _serve(
    args: argparse.Namespace,
    key: bytes,
    say: Callable[[str], None],
    on_ready: Callable[[], None],
    pid_file: PidFile | None,
) -> int:
    store = Store()
    if args.persist:
        journal = Journal(args.persist, args.fsync)
        try:
            keys = store.restore(journal.load())
        except PersistenceError as exc:
            say(f"error {exc}")
            return 2
        except Exception as exc:  # noqa: BLE001 - say it to the starter, whatever it is
            say(f"error cannot restore from {args.persist}: {type(exc).__name__}: {exc}")
            return 2
        store.journal = journal
        log.info("restored %d keys from %s (fsync %s)", keys, args.persist, args.fsync)

    try:
        listener = _bind(args)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            say("in-use")
            return 3
        say(f"error cannot listen on {args.unix or args.tcp}: {exc.strerror}")
        return 2

    if args.detach and os.fork() != 0:
        os._exit(0)  # the starter reaps this parent; the child serves on

    server = StateServer(
        listener,
        key,
        owner_pid=args.owner_pid,
        owner_start=args.owner_start,
        pid_file=pid_file,
        store=store,
        max_connections=args.max_connections,
        max_connections_per_peer=args.max_connections_per_peer,
    )
    install_signal_handlers(server)
    log.info("serving on %s (owner %s)", args.unix or args.tcp, args.owner_pid)
    on_ready()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
