"""Draw the performance page's figures from the benchmarks' own JSON output.

Reads ``benchmarks/results/{latency,client_cache,throughput}.json`` (written by
``latency.py --json``, ``client_cache.py --json`` and ``throughput.py --json``)
and writes ``docs/_static/perf-*.png``, which are committed, so building the
docs needs no matplotlib. Run after the benchmarks::

    python benchmarks/plots.py [--results benchmarks/results] [--out docs/_static]

``--markdown`` prints the same figures as the tables of ``docs/performance.md`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "#c0392b"
OPS = ["get", "set", "incr"]
COLOURS = {
    "floor": "#7f8c8d",
    "seed": "#8e44ad",
    "redis-py": "#2980b9",
    "diskcache": "#27ae60",
    "Flask-SharedState, cache off": "#e6a09a",
    "Flask-SharedState": OURS,
}


def _pyplot() -> Any:
    """matplotlib, drawing to files only (imported here: --markdown needs none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(folder: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        print(f"skipped: no {path}", file=sys.stderr)
        return None
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]


def _label(bars: Any, ax: Any, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=90,
            xytext=(0, 2),
            textcoords="offset points",
        )


def latency(data: dict[str, Any], out: str) -> str:
    """get, set, incr: µs per operation of each store, one client."""
    plt = _pyplot()
    table: dict[str, dict[str, float]] = data["us"]
    stores = [s for s in COLOURS if s in table]
    ops = OPS
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(stores)
    for i, store in enumerate(stores):
        xs = [j + (i - (len(stores) - 1) / 2) * width for j, op in enumerate(ops)]
        ys = [table[store].get(op, 0.0) for op in ops]
        shown = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
        bars = ax.bar(
            [x for x, _ in shown],
            [y for _, y in shown],
            width,
            label=store,
            color=COLOURS[store],
        )
        _label(bars, ax, "{:.3g}")
    ax.set_xticks(range(len(ops)), ops)
    ax.set_yscale("log")
    ax.set_ylabel("µs per operation (log scale; lower is better)")
    ax.set_title(f"One client, one operation at a time ({data['when'][:10]}, {data['placement']})")
    ax.legend(fontsize=8, ncols=2)
    ax.margins(y=0.25)
    return _save(fig, out, "perf-latency.png")


def client_cache(data: dict[str, Any], out: str) -> str:
    """get of four values: cache on, off, redis-py GET and the floors."""
    plt = _pyplot()
    table: dict[str, dict[str, float]] = data["latency_us"]
    cases = {
        "cache on": OURS,
        "cache off": "#e6a09a",
        "redis-py GET": "#2980b9",
        "floor round trip": "#7f8c8d",
        "pickle.loads": "#bdc3c7",
    }
    values = list(table)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(cases)
    for i, (case, colour) in enumerate(cases.items()):
        xs = [j + (i - (len(cases) - 1) / 2) * width for j in range(len(values))]
        bars = ax.bar(xs, [table[v][case] for v in values], width, label=case, color=colour)
        _label(bars, ax, "{:.3g}")
    ax.set_xticks(range(len(values)), values)
    ax.set_yscale("log")
    ax.set_ylabel("µs per get (log scale; lower is better)")
    ax.set_title(f"get of an unchanged key ({data['when'][:10]})")
    ax.legend(fontsize=8, ncols=3)
    ax.margins(y=0.25)
    return _save(fig, out, "perf-client-cache.png")


def end_to_end(data: dict[str, Any], out: str) -> str:
    """Each app's variants as a fraction of the app's ceiling."""
    plt = _pyplot()
    groups = data["apps"]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(8, 1.2 + 0.45 * sum(map(len, groups.values())))
    )
    if len(groups) == 1:
        axes = [axes]
    for ax, (group, rows) in zip(axes, groups.items(), strict=True):
        names = [r["variant"] for r in rows][::-1]
        fractions = [r["of ceiling"] for r in rows][::-1]
        colours = [
            OURS
            if "Flask-SharedState" in n and "off" not in n
            else "#e6a09a"
            if "Flask-SharedState" in n
            else "#7f8c8d"
            if "ceiling" in n or "per-process" in n
            else "#2980b9"
            for n in names
        ]
        bars = ax.barh(names, fractions, color=colours)
        for bar, row in zip(bars, rows[::-1], strict=True):
            ax.annotate(
                f"{row['of ceiling']:.2f}  ({row['requests/s']:,.0f}/s)",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                va="center",
                fontsize=8,
                xytext=(3, 0),
                textcoords="offset points",
            )
        ax.axvline(1.0, color="black", linewidth=0.6)
        ax.set_xlim(0, max(1.45, max(fractions) * 1.35))
        ax.set_title(f"{group}: requests/s as a fraction of the ceiling", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"gunicorn -w 4, wrk {data['wrk']}, median of {data['rounds']}", fontsize=9)
    return _save(fig, out, "perf-end-to-end.png")


def markdown(results: dict[str, dict[str, Any] | None]) -> str:
    """The figures as Markdown tables (what docs/performance.md shows)."""
    out: list[str] = []
    lat = results.get("latency")
    if lat:
        floor = lat["us"]["floor"]["get"]
        out += [f"latency.py --placement {lat['placement']}, {lat['when']}:", ""]
        out += ["| store | get | set | incr |", "| --- | --- | --- | --- |"]
        for store, ops in lat["us"].items():
            cells = [
                f"{ops[op]:.1f} µs ({ops[op] / floor:.2f}x)" if op in ops else "" for op in OPS
            ]
            out.append(f"| {store} | " + " | ".join(cells) + " |")
        out.append("")
    cc = results.get("client_cache")
    if cc:
        out += [f"client_cache.py, {cc['when']}:", ""]
        if cc["latency_us"]:
            cases = ["cache on", "cache off", "redis-py GET", "floor round trip", "pickle.loads"]
            out.append("| value | " + " | ".join(cases) + " | off / on | redis / on |")
            out.append("| --- " * (len(cases) + 3) + "|")
            for name, row in cc["latency_us"].items():
                cells = [f"{row[c]:.2f}" for c in cases]
                ratios = [row["cache off"] / row["cache on"], row["redis-py GET"] / row["cache on"]]
                out.append(
                    f"| {name} | "
                    + " | ".join(cells)
                    + " | "
                    + " | ".join(f"{r:.1f}x" for r in ratios)
                    + " |"
                )
            out.append("")
        mix = cc.get("mix")
        if mix:
            rates = mix["ops per second"]
            out.append(
                f"Mix ({mix['procs']} processes, 50% writes, {mix['keys']} keys):"
                f" {rates['cache on']:,.0f} ops/s with the cache, {rates['cache off']:,.0f}"
                f" without; slowdown {mix['slowdown with cache']:.2f}x (median of"
                f" {len(mix['slowdown per round'])} rounds' ratios); control (off against off)"
                f" {mix['control']:.2f}x."
            )
            out.append("")
    tp = results.get("throughput")
    if tp:
        out += [f"throughput.py, wrk {tp['wrk']}, median of {tp['rounds']}, {tp['when']}:", ""]
        for group, rows in tp["apps"].items():
            out += [f"{group}:", "", "| variant | requests/s | of the ceiling | lost |"]
            out.append("| --- | --- | --- | --- |")
            for row in rows:
                lost = f"{max(row['lost']):.0f}" if "lost" in row else "n/a"
                out.append(
                    f"| {row['variant']} | {row['requests/s']:,.0f} | {row['of ceiling']:.2f}"
                    f" | {lost} |"
                )
            out.append("")
    return "\n".join(out)


def _save(fig: Any, out: str, name: str) -> str:
    plt = _pyplot()
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "_static"))
    parser.add_argument("--markdown", action="store_true", help="print tables, draw nothing")
    args = parser.parse_args()
    if args.markdown:
        names = ("latency", "client_cache", "throughput")
        print(markdown({name: _load(args.results, name) for name in names}))
        return 0
    os.makedirs(args.out, exist_ok=True)
    drawn = []
    for name, draw in (
        ("latency", latency),
        ("client_cache", client_cache),
        ("throughput", end_to_end),
    ):
        data = _load(args.results, name)
        if data is not None:
            drawn.append(draw(data, args.out))
    for path in drawn:
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
