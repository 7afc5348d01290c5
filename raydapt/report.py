"""Tables, plots and the HTML report: what people would rather look at than read.

from raydapt.report import table, write_report
print(table(rows, ["model", "heldout_loss", "exact_match"]))
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return (f"{v:.4f}".rstrip("0").rstrip(".") or "0") if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table (also valid markdown)."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(
    curves: dict[str, list[dict]], key: str | tuple[str, ...], out: Path, title: str
) -> Path | None:
    """One line per run and key against `step` (several keys: one line style per key, the
    label says which); None when no run logged any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (key,) if isinstance(key, str) else key
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for name, rows in curves.items():
        for style, k in zip(("-", "--", ":", "-."), keys):
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                label = name if len(keys) == 1 else f"{name}: {k}"
                ax.plot(xs, ys, style, label=label, marker="o" if len(pts) < 20 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_bars(
    rows: list[dict], keys: list[str], out: Path, title: str, floor: float | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6))
    axes = [axes] if len(keys) == 1 else list(axes)
    for ax, key in zip(axes, keys):
        names = [r["model"] for r in rows]
        vals = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(names, vals, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(rows)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        if floor is not None and "markov" in key:
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"entropy floor {floor:.3f}")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    out_dir: str | Path, title: str, text_table: str, images: list[Path], notes: list[str]
) -> Path:
    """A self-contained report.html (images inlined) next to its PNG files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    imgs = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p in images
    )
    body = (
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(text_table)}</pre>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + imgs
    )
    page = (
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}pre{background:#f6f6f6;"
        "padding:1em}img{max-width:100%}figure{margin:1em 0}</style>" + body
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path
