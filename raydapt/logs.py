"""Where output goes: raydapt's progress and results on the console, everyone else's logs in
`<output_dir>/logs/console.log`.

Ray, vLLM and transformers log to standard error, and so do the C++ parts of Ray, which no
Python logging setting reaches; Ray relays its workers' standard error to the driver's. A
stage command therefore points file descriptor 2 at the log file while it runs, and raydapt
prints what a person needs (progress, results, the served answer) on standard output.
`raydapt --verbose` leaves standard error on the console instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "console.log"


@contextlib.contextmanager
def console(log_dir: Path, verbose: bool) -> Iterator[Path | None]:
    """Send fd 2 to `log_dir/console.log` for the duration (not with `verbose`).

    raydapt's own warnings still reach the console. Yields the log file, or None when
    nothing is redirected.
    """
    if verbose:
        yield None
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    sys.stderr.flush()
    saved = os.dup(2)
    user = os.fdopen(os.dup(saved), "w", buffering=1)
    visible = logging.StreamHandler(user)
    visible.setLevel(logging.WARNING)
    visible.setFormatter(logging.Formatter("raydapt: %(levelname)s: %(message)s"))
    ours = logging.getLogger("raydapt")
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 2)
        ours.addHandler(visible)
        print(
            f"[raydapt] Ray, vLLM and library logs: {path} (--verbose shows them here)", flush=True
        )
        try:
            yield path
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            ours.removeHandler(visible)
            user.close()
