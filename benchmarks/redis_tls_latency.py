"""Per-operation latency of the ``redis`` backend over TLS against plain TCP, same server.

Makes a CA and a server certificate with ``openssl`` in a temp folder, starts one
``redis-server`` listening on a plain port and a TLS port (loopback, no
persistence; client certificates not asked for), and measures in interleaved
rounds, over each: redis-py ``GET``, ``SET``, ``INCR`` and Flask-SharedState's
``get``, ``set``, ``incr``. Each figure is the median over rounds of the mean
latency of ``--ops`` operations, in microseconds, on one connection (opened
before timing: the handshake is not counted). Run::

    python benchmarks/redis_tls_latency.py [--ops 20000] [--rounds 5]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import redis
import timing
from flask import Flask
from redisserver import wait_for_ping

from flask_sharedstate import SharedState


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _certificates(folder: str) -> None:
    """ca.crt, and server.crt/server.key for the name localhost, signed by it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", "-new", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=benchmark-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=s")
    with open(os.path.join(folder, "server.ext"), "w") as f:
        f.write(
            "basicConstraints=critical,CA:FALSE\nauthorityKeyIdentifier=keyid\n"
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"
        )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip


@contextlib.contextmanager
def tls_redis_server() -> Iterator[tuple[str, str]]:
    """Yield ``(plain URL, TLS URL)`` of one redis-server; stop it by pid after."""
    server = shutil.which("redis-server")
    if server is None or shutil.which("openssl") is None:
        raise SystemExit("this benchmark needs redis-server and openssl (apt-get install)")
    folder = tempfile.mkdtemp(prefix="fss-tls-bench-")
    _certificates(folder)
    port, tls_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            server, "--port", str(port), "--tls-port", str(tls_port), "--bind", "127.0.0.1",
            "--save", "", "--dir", folder, "--tls-auth-clients", "no",
            "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
            "--tls-ca-cert-file", "ca.crt",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        plain = f"redis://127.0.0.1:{port}/0"
        tls = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={folder}/ca.crt"
        deadline = time.monotonic() + 20
        for url in (plain, tls):
            wait_for_ping(url, deadline)
        yield plain, tls
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = timing.parser(__doc__ or "")
    args = parser.parse_args()
    with tls_redis_server() as (plain, tls):
        cases: dict[str, Callable[[], object]] = {}
        closers: list[Callable[[], None]] = []
        for transport, url in (("tcp", plain), ("tls", tls)):
            client = redis.Redis.from_url(url)
            app = Flask(f"benchmark-{transport}")
            app.config.update(
                SHAREDSTATE_BACKEND="redis", SHAREDSTATE_REDIS_URL=url, SECRET_KEY="benchmark"
            )
            shared = SharedState(app)
            client.set(f"plain-{transport}", 0)
            shared.set("n", 0)
            cases[f"redis-py GET {transport}"] = lambda c=client, t=transport: c.get(f"plain-{t}")
            cases[f"redis-py SET {transport}"] = lambda c=client, t=transport: c.set(
                f"plain-{t}", 1
            )
            cases[f"redis-py INCR {transport}"] = lambda c=client, t=transport: c.incr(f"plain-{t}")
            cases[f"backend get {transport}"] = lambda s=shared: s.get("n")
            cases[f"backend set {transport}"] = lambda s=shared: s.set("n", 1)
            cases[f"backend incr {transport}"] = lambda s=shared: s.incr("n")
            closers += [client.close, shared.state().backend.close]
        results = timing.interleaved(cases, args.ops, args.rounds)
        median = {name: statistics.median(v) for name, v in results.items()}
        print(f"{args.rounds} rounds of {args.ops} operations, one client, one redis-server")
        print(f"{'case':20} {'TCP µs/op':>10} {'TLS µs/op':>10} {'TLS / TCP':>10}")
        for name in (
            "redis-py GET", "backend get", "redis-py SET", "backend set",
            "redis-py INCR", "backend incr",
        ):  # fmt: skip
            tcp, tls_ = median[f"{name} tcp"], median[f"{name} tls"]
            print(f"{name:20} {tcp:10.1f} {tls_:10.1f} {tls_ / tcp:10.2f}")
        for close in closers:
            close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
