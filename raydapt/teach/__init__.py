"""The teach stage (`raydapt teach JOB`): a Ray Data pool of vLLM actors writes targets.

    raydapt teach jobs/distill-offline.yaml teach.kind=score teach.max_actors=2

Modules: stage.py (plan, checks, exactly-once bookkeeping, lineage), pool.py (the actor
pool), spec.py (what an actor is told), work.py (one batch -> one targets part),
vllm_backend.py / hf_backend.py (the engines), reference.py (plain-torch top-k scoring, the
parity reference), convert.py (pure numpy: logprobs -> dense (T, k) arrays, ids, seeds).
"""

from raydapt.teach.stage import TeachPlan, fingerprint, plan, run

__all__ = ["TeachPlan", "fingerprint", "plan", "run"]
