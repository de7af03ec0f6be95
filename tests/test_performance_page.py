"""docs/performance.md says what the committed benchmark results say, and how to get them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "performance.md")


def _page() -> str:
    with open(PAGE) as f:
        return f.read()


def test_tables_are_the_committed_results() -> None:
    """Every table row of the page is a row that plots.py --markdown makes from
    benchmarks/results/*.json, so the page cannot drift from the measurements."""
    tables = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "plots.py"), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    made = set(tables.splitlines())
    rows = [line for line in _page().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 20, "the page shows the latency, cache and end-to-end tables"
    assert [row for row in rows if row not in made] == []


def test_figures_and_commands_exist() -> None:
    """The page's figures are committed, and each benchmark it tells to run is a file
    that writes the JSON the figures are drawn from."""
    page = _page()
    figures = re.findall(r"\]\((_static/perf-[\w-]+\.png)\)", page)
    assert len(figures) == 3, figures
    for figure in figures:
        assert os.path.getsize(os.path.join(ROOT, "docs", figure)) > 1000, figure
    scripts = set(re.findall(r"python (benchmarks/\w+\.py)", page))
    assert {"benchmarks/latency.py", "benchmarks/client_cache.py"} <= scripts
    assert {"benchmarks/throughput.py", "benchmarks/plots.py"} <= scripts
    for script in scripts:
        assert os.path.exists(os.path.join(ROOT, script)), script
    for name in ("latency", "client_cache", "throughput"):
        assert f"--json benchmarks/results/{name}.json" in page, name
        assert os.path.exists(os.path.join(ROOT, "benchmarks", "results", f"{name}.json")), name
