"""Progress a person can read, the same for every stage.

On a terminal: a tqdm bar with rate and ETA. Elsewhere (a log file, `ray job submit`, a Ray
worker whose output the driver relays): one line every `every_s` seconds and one at the end,
so a long stage shows it is alive without a line per item.

    with Progress("teach", total=rows.num_rows, unit="rows") as bar:
        for batch in batches:
            bar.update(batch.num_rows, tokens=n_tokens)
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A progress bar (TTY) or periodic progress lines (anything else)."""

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        unit: str = "it",
        every_s: float = 15.0,
        stream: TextIO | None = None,
        done: int = 0,
    ):
        """`done`: items already done before this run (a resumed training run's step)."""
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.stream = stream or sys.stdout
        self.start = self.done = done
        self.extra: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, count) at the first update
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = (
            tqdm(
                total=total,
                initial=done,
                unit=unit,
                desc=f"[{stage}]",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
            if tty
            else None
        )

    def update(self, n: int = 1, **extra: Any) -> None:
        """`n` more items done; `extra` values (e.g. loss=0.52) are shown beside the count."""
        self.done += n
        if self.first is None:
            self.first = (time.monotonic(), self.done)
        self.extra.update(extra)
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix({k: _short(v) for k, v in self.extra.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def _rate(self) -> float:
        """Items per second since the first update: start-up before it (an engine loading, a
        worker group forming) would make every ETA too long."""
        now = time.monotonic()
        t, n = self.first or (self.t0, self.start)
        if now - t <= 0 or self.done - n <= 0:
            t, n = self.t0, self.start
        return (self.done - n) / (now - t) if now > t else 0.0

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.t0
        rate = self._rate()
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f", eta {_fmt_s((self.total - self.done) / rate)}"
        extra = "".join(f", {k} {_short(v)}" for k, v in self.extra.items())
        took = f" in {_fmt_s(elapsed)}" if final else ""
        print(
            f"[{self.stage}] {self.done}{of} {self.unit}{pct}{took}, "
            f"{rate:.1f} {self.unit}/s{eta}{extra}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.start:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
