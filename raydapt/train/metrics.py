"""Where a run's numbers go on rank 0: metrics.jsonl, TensorBoard, and the console.

These are separate from the Ray reports (see loop.py for when those happen): metrics.jsonl
and TensorBoard get every step; the console gets raydapt.progress's display (a bar on a
terminal, else a line every few seconds, with loss, val_loss and tokens/s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raydapt.progress import Progress
from raydapt.train.fsdp import world


class MetricsLog:
    """metrics.jsonl (rank 0, append; a resume drops lines past the restored step),
    TensorBoard when importable, and the console progress display."""

    def __init__(self, train_dir: Path, start_step: int, max_steps: int):
        self.rank, _ = world()
        self.path = train_dir / "metrics.jsonl"
        self.tb = None
        self.bar: Progress | None = None
        if self.rank != 0:
            return
        self.bar = Progress("train", total=max_steps, unit="steps", done=start_step)
        train_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tb = SummaryWriter(str(train_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, m: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, m["step"])
        extra = {"loss": m["loss"], "tok/s": round(m["tokens_per_s"])}
        if "val_loss" in m:
            extra["val_loss"] = m["val_loss"]
        self.bar.update(1, **extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
