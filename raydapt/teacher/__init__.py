"""The teacher stage (`raydapt teach JOB`): a Ray Data pool of vLLM actors writes targets.

    raydapt teach jobs/distill-offline.yaml teach.kind=score teach.max_actors=2

Modules: stage.py (checks, exactly-once bookkeeping, lineage), pool.py (the actor pool),
work.py (one batch -> one targets part), vllm_backend.py / hf_backend.py (the engines),
convert.py (pure numpy: logprobs -> dense (T, k) arrays, ids, seeds).
"""

from __future__ import annotations

from raydapt.config import JobConfig


def run(cfg: JobConfig) -> dict:
    """Teach the job's prepared rows; returns the targets manifest plus run counters."""
    from raydapt.teacher.stage import run as run_stage

    return run_stage(cfg)


__all__ = ["run"]
