"""Where a run's numbers go on rank 0: metrics.jsonl, TensorBoard, and the console line.

These are separate from the Ray reports (see loop.py for when those happen): the console
shows a progress line every `train.log_every` steps, at evaluations and at the last step;
metrics.jsonl gets every step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from raydapt.train.fsdp import world


class MetricsLog:
    """metrics.jsonl (rank 0, append; a resume drops lines past the restored step),
    TensorBoard when importable, and a console progress line with ETA."""

    def __init__(self, train_dir: Path, start_step: int, max_steps: int, log_every: int):
        self.rank, _ = world()
        self.path = train_dir / "metrics.jsonl"
        self.max_steps, self.log_every, self.start_step = max_steps, log_every, start_step
        self.t0 = time.perf_counter()
        self.tb = None
        if self.rank != 0:
            return
        train_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= start_step]
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
        step = m["step"]
        if step % self.log_every == 0 or step == self.max_steps or "val_loss" in m:
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.max_steps - step)
            val = f" val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
            print(
                f"[train] step {step}/{self.max_steps} loss {m['loss']:.4f}{val} lr {m['lr']:.2e} "
                f"gnorm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s eta {eta:.0f}s",
                flush=True,
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
