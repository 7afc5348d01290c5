"""A sweep's outputs in the tune folder: results.csv, results.md, curves.png, best/ and
serve_command.txt, from Tune's results (one row per trial, the best one's export copied).
"""

from __future__ import annotations

import csv
import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from raydapt.config import JobConfig
from raydapt.report import table
from raydapt.storage import read_manifest


def _trial_rows(cfg: JobConfig, results, sweep_dir: Path) -> tuple[list[dict], dict[str, list]]:
    """One row per trial and each trial's (step, metric) curve as Tune saw it."""
    metric, rows, curves = cfg.tune.metric, [], {}
    for r in results:
        m = dict(r.metrics or {})
        tid = _trial_id(m, Path(r.path), sweep_dir)
        df = r.metrics_dataframe
        pts: list = []
        if df is not None and metric in df.columns and "step" in df.columns:
            sub = df[["step", metric]].dropna()
            pts = [(int(s), float(v)) for s, v in zip(sub["step"], sub[metric], strict=True)]
        steps = int(df["step"].max()) if df is not None and "step" in df.columns and len(df) else 0
        export = sweep_dir / "trials" / tid / "final"
        status = (
            "error" if r.error else ("done" if steps >= cfg.train.max_steps else "stopped early")
        )
        params = {f"train.{k}": v for k, v in (r.config or {}).get("train", {}).items()}
        rows.append(
            {
                "trial": tid,
                **params,
                metric: pts[-1][1] if pts else float("nan"),
                "steps": steps,
                "status": status,
                "export": str(export) if read_manifest(export) else "",
            }
        )
        curves[tid] = pts
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def _trial_id(metrics: dict, path: Path, sweep_dir: Path) -> str:
    """The id `_trial` used for its folder: from the result, else from Tune's folder name.

    Ids look like `ab12c_00000` (random/grid) or `ef5800e1` (search algorithms such as
    Optuna); a trial that errored before its first report has no metrics, only its folder.
    """
    if metrics.get("trial_id"):
        return str(metrics["trial_id"])
    known = [p.name for p in (sweep_dir / "trials").glob("*")]
    for tid in sorted(known, key=len, reverse=True):
        if f"_{tid}_" in f"{path.name}_":
            return tid
    return path.name


def _best(rows: list[dict], metric: str, mode: str) -> dict | None:
    ok = [r for r in rows if r["export"] and not math.isnan(r[metric])]
    if not ok:
        return None
    return (min if mode == "min" else max)(ok, key=lambda r: r[metric])


def _copy_best(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def plot_trials(curves: dict[str, list], best: str | None, metric: str, out: Path) -> Path | None:
    """The metric against step, one line per trial, the best one thick and labelled."""
    import matplotlib  # slow to import, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for tid, pts in sorted(curves.items()):
        if pts:
            xs, ys = zip(*pts, strict=True)
            is_best = tid == best
            ax.plot(
                xs,
                ys,
                marker="o",
                ms=3,
                lw=2.8 if is_best else 1.0,
                alpha=1.0 if is_best else 0.6,
                color="#c44e52" if is_best else None,
                label=f"{tid} (best)" if is_best else tid,
                zorder=3 if is_best else 2,
            )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"tune: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(cfg: JobConfig, results, sweep_dir: Path) -> dict[str, Any]:
    """results.csv, results.md, curves.png, best/ and serve_command.txt in the sweep folder."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows, curves = _trial_rows(cfg, results, sweep_dir)
    cols = [
        "trial",
        *sorted({k for r in rows for k in r if k.startswith("train.")}),
        metric,
        "steps",
        "status",
    ]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["export"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = table(
        [
            {
                **r,
                **{
                    k: f"{v:g}"
                    for k, v in r.items()
                    if k.startswith("train.") and isinstance(v, float)
                },
            }
            for r in rows
        ],
        cols,
    )
    best = _best(rows, metric, mode)
    plot = plot_trials(curves, best["trial"] if best else None, metric, sweep_dir / "curves.png")
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir),
        "rows": rows,
        "plot": str(plot) if plot else None,
    }
    lines = [f"# tune: {len(rows)} trials, {metric} ({mode})", "", text, ""]
    if best:
        dst = sweep_dir / "best"
        _copy_best(Path(best["export"]), dst)
        command = f"raydapt serve {shlex.quote(str(dst.resolve()))}"
        (sweep_dir / "serve_command.txt").write_text(command + "\n")
        lines += [
            f"best: trial {best['trial']}, {metric} {best[metric]:.4f}",
            "",
            f"    {command}",
            "",
        ]
        summary.update(
            best=str(dst), best_trial=best["trial"], best_metric=best[metric], serve_command=command
        )
    errored = [r["trial"] for r in rows if r["status"] == "error"]
    if errored:
        lines.append(
            f"errored trials {errored}: "
            "rerun the same command to resume them from their checkpoints"
        )
    (sweep_dir / "results.md").write_text("\n".join(lines))
    print(text, flush=True)
    print("\n".join(lines[4:]), flush=True)
    summary["failed"] = bool(errored) or best is None
    return summary
