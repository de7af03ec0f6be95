"""The ``manager`` backend: the client side of the embedded state server.

What it promises, and how:

* **Election.** Whoever cannot connect takes an ``flock`` on the address's
  ``.lock`` file, tries once more, and only then removes a stale socket file
  and starts a server. The kernel drops the ``flock`` of a process that dies,
  so a crashed starter never blocks the next one, and however many processes
  race, one server starts.
* **A fresh process.** The server is a new interpreter started with every
  descriptor closed, in a session of its own, and it detaches from its
  starter: killing or recycling the worker that started it does not touch it.
  It stops when its *owner* is gone (see :func:`owner_process`).
* **Self-healing.** A request that finds its connection dead before it was
  sent reconnects, re-electing a server if needed, and is sent again. A
  request whose reply is lost is not repeated (it may have been applied),
  except for reads; it raises :exc:`SharedStateUnavailable`.
* **Fork and thread safety.** Each thread has its own connection; a forked
  child drops every connection it inherited and opens its own.
* **Bounded waits.** Connecting (and starting a server) is bounded by
  ``SHAREDSTATE_TIMEOUT``; so is each request, from its first byte sent to
  its reply, plus the lock or atomic wait the caller asked for, plus
  :data:`REPLY_SLACK`. A server that takes no more of a request (stopped,
  say) costs at most the same.
* **Refusals.** A server at its connection limit refuses before the
  handshake with a reason naming the limit; that is raised at once as
  :exc:`SharedStateUnavailable`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from ..config import Settings, runtime_dir
from ..errors import (
    AuthenticationError,
    ConfigError,
    LockTimeout,
    SharedStateUnavailable,
)
from ..server import catalogue, protocol
from ..server.process import process_start_time
from .base import Backend, Packed

_ERRORS: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "TypeError": TypeError,
    "ValueError": ValueError,
    "RuntimeError": RuntimeError,
    "LockTimeout": LockTimeout,
}

#: Seconds a reply may come after ``SHAREDSTATE_TIMEOUT`` (plus any wait asked for):
#: a write to a key claimed by an atomic block waits up to the timeout in the
#: server, whose answer must still arrive in time.
REPLY_SLACK = 1.0

# Bumped in every forked child: connections of an older generation are the parent's.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _parent_is_gunicorn() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return b"gunicorn" in f.read()
    except OSError:
        return False


def owner_process() -> int:
    """The process whose end should end a server that this process starts.

    A worker of a pre-fork server is recycled at will, so its parent owns the
    state server: the gunicorn master, the Werkzeug reloader's watcher, the
    uWSGI master, or the parent of a :mod:`multiprocessing` child. Any other
    process (a script, ``flask run`` without the reloader, a gunicorn master
    using the state before it forks) owns the server itself.
    """
    parent = os.getppid()
    if parent > 1:
        if "gunicorn" in sys.modules and _parent_is_gunicorn():
            return parent
        if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
            return parent
        if multiprocessing.parent_process() is not None:
            return parent
        uwsgi = sys.modules.get("uwsgi")
        if uwsgi is not None and hasattr(uwsgi, "masterpid") and uwsgi.masterpid() > 0:
            return int(uwsgi.masterpid())
    return os.getpid()


def python_executable() -> str:
    """The Python interpreter to run the state server with.

    Usually ``sys.executable``; under uWSGI that is the uwsgi binary, so look
    for the interpreter of this environment instead.
    """
    if os.path.basename(sys.executable).startswith(("python", "pypy")):
        return sys.executable
    version = sys.version_info
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        for name in (f"python{version.major}.{version.minor}", f"python{version.major}", "python"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    raise SharedStateUnavailable(
        f"cannot find a Python interpreter to run the state server ({sys.executable} is"
        f" not one, nor is there a python in {sys.prefix}/bin)."
    )


def _gevent_patched() -> bool:
    """Whether gevent's monkey-patching made ``select`` cooperative in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("select"))


class _Link:
    """One authenticated connection of one thread to the server.

    Replies are read with a blocking read bounded by ``SO_RCVTIMEO`` (no
    extra ``poll`` per request): ``wait`` is the bound in force.
    """

    __slots__ = ("conn", "fd", "poller", "generation", "server_pid", "wait", "cooperative")

    def __init__(self, conn: Connection, wait: float) -> None:
        self.conn = conn  # for the handshake; requests use the descriptor directly
        self.fd = conn.fileno()
        # Under gevent, a blocking read would stall every greenlet of the worker,
        # including the one holding the lock we wait for: wait in the hub first.
        self.cooperative = _gevent_patched()
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.generation = _fork_generation
        self.server_pid = 0
        self.wait = wait

    def bound_reads(self, wait: float) -> None:
        if wait != self.wait:
            # The Connection owns the descriptor; borrow it for one setsockopt.
            fd = self.conn.fileno()
            sock = socket.socket(fileno=fd)
            try:
                protocol.set_receive_timeout(sock, wait)
            finally:
                sock.detach()
                os.set_blocking(fd, True)  # a gevent (or default-timeout) socket unset it
            self.wait = wait

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class _Broken(Exception):
    """The link died; ``delivered`` tells whether the request may have arrived."""

    def __init__(self, delivered: bool, cause: BaseException) -> None:
        self.delivered = delivered
        self.cause = cause


class ManagerBackend(Backend):
    name = "manager"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.address
        self._timeout = settings.timeout
        self._wait = settings.timeout + REPLY_SLACK
        self._local = threading.local()
        self._defaults: list[tuple[str, Packed]] = []
        self._key: bytes | None = settings.key
        self._key_lock = threading.Lock()
        #: set by ensure_server: the owner of a server this process starts
        self._owner: int | None = None
        #: False for the CLI, which works on a running server and never starts one
        self.may_start = True

    # -- the interface ---------------------------------------------------------

    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        # Sent on every new connection: a new server gets them from its first client.
        self._defaults = list(defaults)
        self.close()

    def close(self) -> None:
        link: _Link | None = getattr(self._local, "link", None)
        self._local.link = None
        if link is not None and link.generation == _fork_generation:
            link.close()

    def call(self, op: str, *args: Any) -> Any:
        # The server answers at once, except when an operation waits for a lock,
        # an atomic block, or a key claimed by one: at most the timeout it was given.
        entry = catalogue.lookup(op)
        wait = self._wait
        if entry.wait is not None:
            wait += args[entry.wait]
        request = protocol.dumps((op, *args))
        link = self._link()
        try:
            reply = self._round_trip(link, request, wait)
        except _Broken as broken:
            self._drop(link)
            if broken.delivered and not entry.read_only:
                raise SharedStateUnavailable(
                    f"lost the connection to the state server at {self.address} while"
                    f" waiting for the reply to {op!r}; it may or may not have been applied."
                ) from broken.cause
            try:
                link = self._link()
                reply = self._round_trip(link, request, wait)
            except _Broken as again:
                self._drop(link)
                raise SharedStateUnavailable(
                    f"the state server at {self.address} went away during {op!r}"
                ) from again.cause
        if reply[0]:
            return reply[1]
        raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])

    def server_pid(self) -> int:
        """The pid of the server this thread is connected to (connecting if needed)."""
        return self._link().server_pid

    def ensure_server(self, owner: int) -> int:
        """Connect, starting a server owned by process ``owner`` if none runs.

        For the gunicorn hooks, which start the server in the master's name.
        Returns the server's pid.
        """
        self._owner = owner
        try:
            return self.server_pid()
        finally:
            self._owner = None
            self.close()

    # -- one request -------------------------------------------------------------

    def _round_trip(self, link: _Link, request: bytes, wait: float) -> Any:
        """Send ``request`` and read its reply, both by one deadline ``wait`` from now."""
        fd = link.fd
        if self.settings.tcp is not None and link.poller.poll(0):
            # Nothing is due, so the server closed this connection (TCP would only
            # report that on the next receive, after the request had gone out).
            raise _Broken(False, EOFError("connection closed by the state server"))
        deadline = time.monotonic() + wait
        try:
            link.bound_reads(wait)
            protocol.write_within(fd, request, deadline)
        except TimeoutError:
            self._drop(link)  # part of the request may have gone: the framing is lost
            raise SharedStateUnavailable(
                f"the state server at {self.address} took no more of the request within"
                f" {wait:g}s ({self._bound_text(wait)}); is it overloaded or stopped?"
                " The request was not applied."
            ) from None
        except OSError as exc:
            raise _Broken(False, exc) from exc
        except BaseException:
            self._drop(link)  # e.g. gunicorn's timeout exception, mid-message
            raise
        remaining = deadline - time.monotonic()
        if remaining < wait - 0.05:  # a long send: the reply gets only what is left
            link.bound_reads(max(remaining, 0.001))
        try:
            if link.cooperative and not select.select([fd], [], [], max(remaining, 0))[0]:
                raise BlockingIOError
            return protocol.loads(protocol.read_message(fd))
        except BlockingIOError:
            self._drop(link)
            raise SharedStateUnavailable(
                f"the state server at {self.address} did not answer within"
                f" {wait:g}s ({self._bound_text(wait)}); is it overloaded or stopped?"
            ) from None
        except (OSError, EOFError) as exc:
            raise _Broken(True, exc) from exc
        except BaseException:
            self._drop(link)
            raise

    def _bound_text(self, wait: float) -> str:
        """How a request's bound ``wait`` is made up, for messages."""
        asked = wait - self._wait
        lock = f" + the {asked:g}s wait asked for" if asked > 0 else ""
        return f"SHAREDSTATE_TIMEOUT {self._timeout:g}s{lock} + {REPLY_SLACK:g}s"

    def _drop(self, link: _Link) -> None:
        link.close()
        if getattr(self._local, "link", None) is link:
            self._local.link = None

    # -- connecting ----------------------------------------------------------------

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            if link.generation == _fork_generation:
                return link
            # Inherited through fork: the parent owns it. Drop our copy quietly.
            link.close()
        link = self._local.link = self._connect()
        return link

    def _connect(self) -> _Link:
        deadline = time.monotonic() + self._timeout
        key = self._auth_key()
        # Only the reason is kept: a kept exception would hold this frame (and
        # the new connection with it) in a reference cycle.
        reason = "no attempt"
        # Connect; if nobody answers, elect (connect or start a server); repeat.
        attempts = (self._open, self._elect)
        while time.monotonic() < deadline:
            for attempt in attempts:
                try:
                    return attempt(key, deadline)
                except SharedStateUnavailable:
                    raise
                except (OSError, EOFError) as exc:
                    # Nobody listens (FileNotFoundError, ConnectionRefusedError), or
                    # the server went away between accept and handshake.
                    reason = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    break
            time.sleep(0.01)
        raise SharedStateUnavailable(
            f"cannot reach the state server at {self.address} within {self._timeout:g}s"
            f" (SHAREDSTATE_TIMEOUT): {reason}. See {self.settings.run_base}.log for the"
            " server's own account."
        )

    def _open(self, key: bytes, deadline: float) -> _Link:
        remaining = max(deadline - time.monotonic(), 0.001)
        if self.settings.tcp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.settings.socket_path
        else:
            host, port = self.settings.tcp
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = info[4]
        try:
            sock.settimeout(remaining)
            sock.connect(target)
            sock.settimeout(None)
            # Bound every read and write: a stopped server must not hang this worker.
            protocol.set_receive_timeout(sock, remaining)
            protocol.set_send_timeout(sock, min(remaining, self._timeout))
        except BaseException:
            sock.close()
            raise
        fd = sock.detach()
        os.set_blocking(fd, True)  # gevent's sockets are non-blocking underneath
        link = _Link(Connection(fd), remaining)
        # Handshake, hello and defaults, by the connecting deadline.
        conn = protocol.Handshake(fd, deadline)
        try:
            try:
                protocol.client_handshake(conn, key)
            except protocol.Refused as refused:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} refused the connection: {refused}."
                ) from None
            except multiprocessing.AuthenticationError:
                raise AuthenticationError(
                    f"the state server at {self.address} refused this process's key."
                    " Every worker of the app must use the same SHAREDSTATE_KEY (derived"
                    " from SECRET_KEY when unset); if it changed, stop the old server."
                ) from None
            except AssertionError:
                raise SharedStateUnavailable(
                    f"{self.address} is not a Flask-SharedState state server"
                ) from None
            conn.send_bytes(
                protocol.dumps(
                    (
                        "hello",
                        protocol.PROTOCOL_VERSION,
                        self.settings.namespace,
                        self._timeout,
                    )
                )
            )
            ok, welcome, *_ = protocol.loads(conn.recv_bytes())
            if not ok:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} speaks another protocol version;"
                    " stop it so that this version can start its own."
                )
            link.server_pid = welcome["pid"]
            if welcome.get("persist") != self.settings.persist_path:
                raise SharedStateUnavailable(
                    f"the state server at {self.address} (pid {link.server_pid}) persists to"
                    f" {welcome.get('persist') or 'nothing'}, but this app's"
                    f" SHAREDSTATE_PERSIST_PATH is {self.settings.persist_path or 'unset'}."
                    " Stop that server (flask sharedstate stop) so that one with this"
                    " configuration can start, or give the apps the same setting."
                )
            if self._defaults:
                conn.send_bytes(protocol.dumps(("apply_defaults", self._defaults)))
                reply = protocol.loads(conn.recv_bytes())
                if not reply[0]:
                    raise _ERRORS.get(reply[1], RuntimeError)(*reply[2])
            link.bound_reads(self._wait)
            if remaining < self._timeout:
                sock = socket.socket(fileno=fd)
                try:
                    protocol.set_send_timeout(sock, self._timeout)
                finally:
                    sock.detach()
                    os.set_blocking(fd, True)
            return link
        except (BlockingIOError, TimeoutError):
            link.close()
            raise SharedStateUnavailable(
                f"the state server at {self.address} accepted the connection but did not"
                f" answer within {self._timeout:g}s (SHAREDSTATE_TIMEOUT); is it stopped?"
            ) from None
        except BaseException:
            link.close()
            raise

    def _elect(self, key: bytes, deadline: float) -> _Link:
        """Under the election lock: connect if someone won, else start a server."""
        with self.election(deadline):
            try:
                return self._open(key, deadline)
            except (FileNotFoundError, ConnectionRefusedError):
                if not self.may_start:
                    raise SharedStateUnavailable(
                        f"no state server is running at {self.address}. Start the app (its"
                        " first use starts one) or run 'flask sharedstate serve'."
                    ) from None
            self._start_server(key, deadline)
            return self._open(key, deadline)

    def server_arguments(self, owner: int | None) -> list[str]:
        """The command-line arguments of ``python -m flask_sharedstate.server`` for this app."""
        settings = self.settings
        if settings.tcp is None:
            arguments = ["--unix", settings.socket_path]
        else:
            host, port = settings.tcp
            arguments = ["--tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        if owner is not None:
            arguments += [
                "--owner-pid",
                str(owner),
                "--owner-start",
                str(process_start_time(owner)),
            ]
        arguments += ["--pid-file", settings.run_base + ".pid"]
        if settings.persist_path is not None:
            arguments += ["--persist", settings.persist_path, "--fsync", settings.fsync]
        return arguments

    def remove_stale_socket(self) -> None:
        """Remove the socket file of a dead server; call only while holding the election."""
        if self.settings.tcp is None:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass

    @contextlib.contextmanager
    def election(self, deadline: float) -> Iterator[None]:
        """Hold the address's election lock (an flock, dropped by the kernel if we die)."""
        fd = os.open(self.settings.run_base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SharedStateUnavailable(
                            f"another process has been starting the state server at"
                            f" {self.address} for longer than SHAREDSTATE_TIMEOUT"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _start_server(self, key: bytes, deadline: float) -> None:
        settings = self.settings
        # Nobody listens (we hold the election lock): the file is a dead server's.
        self.remove_stale_socket()
        owner = self._owner or owner_process()
        command = [python_executable(), "-m", "flask_sharedstate.server"]
        command += [*self.server_arguments(owner), "--detach"]
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        ready_r, ready_w = os.pipe()
        log = os.fdopen(
            os.open(
                settings.run_base + ".log",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            ),
            "ab",
        )
        try:
            proc = subprocess.Popen(
                [*command, "--ready-fd", str(ready_w)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(ready_w,),
                close_fds=True,
                start_new_session=True,
                cwd="/",
                env=env,
            )
        finally:
            log.close()
            os.close(ready_w)
        try:
            assert proc.stdin is not None
            proc.stdin.write(key)
            proc.stdin.close()
            line = self._read_ready(ready_r, deadline)
        finally:
            os.close(ready_r)
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if line.startswith("ready") or line == "in-use":
            return  # in use: some other process listens there; connect to it
        raise SharedStateUnavailable(
            f"could not start the state server at {self.address}:"
            f" {line or 'it exited without a word'}. See {settings.run_base}.log."
        )

    @staticmethod
    def _read_ready(fd: int, deadline: float) -> str:
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return "error it did not say it was ready in time"
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    # -- the key ---------------------------------------------------------------------

    def _auth_key(self) -> bytes:
        self._private_folder()
        if self._key is not None:
            return self._key
        with self._key_lock:
            if self._key is None:
                self._key = _read_or_create_key(self.settings.key_file)
            return self._key

    def _private_folder(self) -> None:
        folder = os.path.dirname(self.settings.run_base)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the folder {folder} for the state server's socket:"
                f" {exc.strerror}. Set SHAREDSTATE_SOCKET to a path in a writable folder."
            ) from None
        if folder == runtime_dir():
            info = os.lstat(folder)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise ConfigError(
                    f"{folder} must be a folder owned by this user with mode 0700, so that"
                    " no one else can reach the state server; remove it, or set"
                    " SHAREDSTATE_SOCKET to a path in a private folder."
                )


def _read_or_create_key(path: str) -> bytes:
    """Read the key file, or create it (0600, atomically) with a random key."""
    for _ in range(50):
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                if info.st_uid != os.getuid() or info.st_mode & 0o077:
                    raise ConfigError(
                        f"the key file {path} must be owned by this user with mode 0600;"
                        " remove it, or set SHAREDSTATE_KEY."
                    )
                key = f.read()
            if key:
                return key
        except FileNotFoundError:
            pass
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(32).hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # fails if another process was first
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        finally:
            os.unlink(temporary)
    raise SharedStateUnavailable(f"cannot read the key file {path}")
