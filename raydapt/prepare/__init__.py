"""The prepare stage (`raydapt prepare JOB`): corpus files -> packed token rows.

Modules: stage.py (plan, checks, the Ray Data pipeline and the ordered writer),
tokenize.py (the row rules shared with eval).
"""

from raydapt.prepare.stage import PreparePlan, fingerprint, plan, run, split_files

__all__ = ["PreparePlan", "fingerprint", "plan", "run", "split_files"]
