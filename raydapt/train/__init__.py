"""The train stage (`raydapt train JOB`): Ray Train V2 workers with FSDP2, exporting HF format.

Modules: stage.py (plan, checks, fingerprint, run), spec.py (the TrainPlan a worker gets),
trainer.py (the TorchTrainer), loop.py (the per-worker train function and its reporting
policy), objective.py (the loss, chosen once per run), losses.py (pure tensor losses),
modes.py (full | lora | transfer | distill models), data.py (deterministic batches),
checkpoint.py (sharded checkpoints and the export), fsdp.py, progress.py (metrics.jsonl and
the console line).
"""

from raydapt.train.spec import TrainPlan
from raydapt.train.stage import fingerprint, plan, run

__all__ = ["TrainPlan", "fingerprint", "plan", "run"]
