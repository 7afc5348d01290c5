"""bench/results.json: every bench's headline figures, their goals and whether they are met.

Each bench calls `record(...)` once at its end; a figure replaces the row of the same
(bench, figure) and leaves the others, so `make bench` (all of them) and a single
`bench/X.py` rerun both leave one current row per figure. Read it with

    .venv/bin/python bench/_results.py          # a table: figure, value, goal, met, date

Why a file beside RESULTS.md: RESULTS.md is prose with history, written by hand; this is what
a reader or a script checks at a glance ("which goals are not met today, on which machine").
"""

from __future__ import annotations

import json
import operator
import os
import platform
import time
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("results.json")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def goal_met(value: float, goal: str) -> bool | None:
    """'>= 0.9' against a value; None for no goal (a figure recorded for reference)."""
    if not goal:
        return None
    op, _, bound = goal.strip().partition(" ")
    if op not in _OPS:
        raise ValueError(f"goal {goal!r}: expected '<op> <number>' with op in {sorted(_OPS)}")
    return bool(_OPS[op](value, float(bound)))


def machine() -> str:
    """Cores, CPU model, memory and accelerator, in one line (the RESULTS.md headings' form)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError):
        mem = 0.0
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch missing"
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {gpu}"


def record(
    bench: str,
    figures: list[tuple[str, float, str]],
    settings: dict[str, Any] | None = None,
    path: Path = PATH,
) -> list[dict]:
    """Write `figures` ((name, value, goal), goal '' for none) for `bench`; print the verdicts.

    The file is replaced atomically (write, then rename), so a bench killed mid-write never
    leaves half a JSON file behind for the next reader.
    """
    rows = json.loads(path.read_text()) if path.is_file() else []
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    new = [
        {
            "bench": bench,
            "figure": name,
            "value": round(float(value), 4),
            "goal": goal,
            "met": goal_met(float(value), goal),
            **stamp,
            "settings": settings or {},
        }
        for name, value, goal in figures
    ]
    names = {r["figure"] for r in new}
    keep = [r for r in rows if not (r["bench"] == bench and r["figure"] in names)]
    out = sorted(keep + new, key=lambda r: (r["bench"], r["figure"]))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    for r in new:
        verdict = {True: "met", False: "NOT met", None: "no goal"}[r["met"]]
        print(
            f"[results.json] {bench}: {r['figure']} = {r['value']} ({r['goal'] or '-'}: {verdict})"
        )
    return new


def main() -> None:
    rows = json.loads(PATH.read_text()) if PATH.is_file() else []
    if not rows:
        print(f"{PATH} holds no figures yet: run `make bench` or a bench/*.py")
        return
    w = max(len(f"{r['bench']}: {r['figure']}") for r in rows)
    for r in rows:
        met = {True: "met", False: "NOT met", None: ""}[r["met"]]
        name = f"{r['bench']}: {r['figure']}"
        print(f"{name:<{w}}  {r['value']:>12g}  {r['goal'] or '':>7}  {met:<7}  {r['date']}")
    print(f"machine: {rows[-1]['machine']}")


if __name__ == "__main__":
    main()
