"""What the latency benchmarks share: how one case is timed, and their options."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def microseconds_per_op(op: Callable[[], object], ops: int) -> float:
    """The mean latency of ``ops`` calls of ``op``, in microseconds."""
    start = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - start) / ops * 1e6


def interleaved(
    cases: dict[str, Callable[[], object]], ops: int, rounds: int
) -> dict[str, list[float]]:
    """Warm each case up, then time them all in turn, ``rounds`` times: µs/op per round."""
    for op in cases.values():
        microseconds_per_op(op, min(ops, 1000))
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, op in cases.items():
            results[name].append(microseconds_per_op(op, ops))
    return results


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every latency benchmark takes: --ops and --rounds."""
    result = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    result.add_argument("--ops", type=int, default=20000, help="operations per round")
    result.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    return result
