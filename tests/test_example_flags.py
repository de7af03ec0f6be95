"""The example app's /flags: five shared flags read per request, and the per-process ceiling
that benchmarks/throughput.py compares it with (the same route, sharing nothing)."""

from __future__ import annotations

import os

from example_app import create_app

from servers import Server, start_gunicorn

FLAGS = ("shout", "new_ui", "beta_search", "dark_mode", "maintenance")  # the example's five


def _until_three_workers(server: Server, expect: dict[str, bool]) -> set[int]:
    """Load GET /flags until 3 workers answered; every answer must be ``expect``."""
    workers: set[int] = set()
    for _ in range(20):  # one worker may take a whole batch
        responses = server.load([("GET", "/flags", None)] * 40, concurrency=16)
        assert {r.status for r in responses} == {200}
        assert all(r.json() == expect for r in responses), {r.body for r in responses}
        workers |= {r.worker for r in responses}
        if len(workers) >= 3:
            break
    return workers


def test_flags_reads_five_shared_flags(servers: list[Server], run_dir: str) -> None:
    """GET /flags answers all five flags, and one set through one worker reads true in
    every worker's answer while the other four stay false."""
    server = start_gunicorn(run_dir, "-w", "4")
    servers.append(server)
    off = dict.fromkeys(FLAGS, False)
    assert len(_until_three_workers(server, off)) >= 3
    assert server.request("PUT", "/flags/new_ui", True).json() == {"new_ui": True}
    assert len(_until_three_workers(server, {**off, "new_ui": True})) >= 3


def test_flags_in_process_shares_nothing(servers: list[Server], run_dir: str) -> None:
    """With FLAGS_IN_PROCESS (the benchmark's ceiling) a flag set through one worker is
    not seen by another: the ceiling really pays no sharing cost."""
    server = start_gunicorn(run_dir, "-w", "4", env={"FLASK_FLAGS_IN_PROCESS": "true"})
    servers.append(server)
    setter = server.request("PUT", "/flags/dark_mode", True)
    assert setter.json() == {"dark_mode": True}
    others: set[bool] = set()
    for _ in range(20):
        responses = server.load([("GET", "/flags", None)] * 40, concurrency=16)
        assert {r.status for r in responses} == {200}
        others |= {r.json()["dark_mode"] for r in responses if r.worker != setter.worker}
        if False in others:
            break
    assert False in others


def test_unknown_flag_is_refused_and_nothing_written(run_dir: str) -> None:
    """PUT /flags/<not a flag> is a 404 naming the five flags, and stores nothing."""
    app = create_app({"SHAREDSTATE_SOCKET": os.path.join(run_dir, "flags.sock")})
    client = app.test_client()
    response = client.put("/flags/new_iu", json=True)
    assert response.status_code == 404
    assert all(name in response.get_data(as_text=True) for name in FLAGS)
    assert client.get("/flags").json == dict.fromkeys(FLAGS, False)
    with app.app_context():
        from example_app import shared

        assert "flag:new_iu" not in shared.dict
