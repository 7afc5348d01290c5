"""The tune stage (`raydapt tune JOB`): a Ray Tune sweep of train.* values, one Train run per trial.

Modules: stage.py (plan, fingerprint, run, the trial function), space.py (the `tune` section
as a Tune search space, searcher and scheduler), pbt.py (Train checkpoints handed to PBT),
results.py (results table, curves, best/).
"""

from raydapt.tune.stage import FAIL_ENV, TunePlan, fingerprint, plan, run

__all__ = ["FAIL_ENV", "TunePlan", "fingerprint", "plan", "run"]
