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


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every latency benchmark takes: --ops and --rounds."""
    result = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    result.add_argument("--ops", type=int, default=20000, help="operations per round")
    result.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    return result
