"""Fault-injection points for tests/faults/test_faults_ray.py and bench/chaos.py.

A fault test must kill a real process at a known moment (a Train worker right after step N,
a teacher actor right after it wrote a part), not whenever a timer fires. So the process
itself announces where it is (its pid and node id, in a JSON file written atomically) and
parks there; the test reads the file and sends SIGKILL, or removes the node. Nothing here
runs unless one of the RAYDAPT_*HOLD* variables is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raydapt.storage import write_json_atomic

PARK_TIMEOUT_S = 300.0  # a test that forgets to kill must not hang the suite


def park_until_killed(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write `info` plus this process's pid and node id to `path`, then wait to be killed."""
    import ray

    write_json_atomic(
        Path(path), {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), **info}
    )
    deadline = time.monotonic() + PARK_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
