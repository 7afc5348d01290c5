"""Progress lines off a terminal: periodic, with counts, rate, ETA and a final line."""

import io

from raydapt.progress import Progress


def test_lines_off_a_tty_are_periodic_and_end_with_a_total():
    out = io.StringIO()
    with Progress("teach", total=10, unit="rows", every_s=0.0, stream=out) as bar:
        for _ in range(4):
            bar.update(2, loss=0.5)
    lines = out.getvalue().splitlines()
    assert (
        lines[0].startswith("[teach] 2/10 rows (20%)")
        and "eta" in lines[0]
        and "loss 0.5" in lines[0]
    )
    assert lines[-1].startswith("[teach] 8/10 rows (80%) in ") and "eta" not in lines[-1]
    assert len(lines) == 5  # four updates, one final line


def test_quiet_between_intervals():
    out = io.StringIO()
    with Progress("prepare", unit="docs", every_s=3600, stream=out) as bar:
        for _ in range(100):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("[prepare] 100 docs in ")


def test_start_up_before_the_first_item_does_not_stretch_the_eta(monkeypatch):
    import raydapt.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = Progress("teach", total=100, unit="rows", every_s=0.0, stream=out)
    now[0] = 100.0
    bar.update(10)  # the first batch, after a 100 s engine start
    now[0] = 101.0
    bar.update(10)  # 10 rows per second from here on
    line = out.getvalue().splitlines()[-1]
    assert "10.0 rows/s" in line and "eta 8s" in line, line
