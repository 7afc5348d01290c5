"""The eval stage (`raydapt eval JOB`): held-out loss and exact-match of a model or endpoint."""

from raydapt.eval.stage import EvalPlan, evaluate_model, fingerprint, plan, run

__all__ = ["EvalPlan", "evaluate_model", "fingerprint", "plan", "run"]
