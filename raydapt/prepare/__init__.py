"""The prepare stage (`raydapt prepare JOB`): corpus files -> packed token rows.

Modules: stage.py (plan, checks, the Ray Data pipeline and the ordered writer),
tokenize.py (the row rules shared with eval).

The names below load stage.py on first use, so a tokenizer worker that imports
`raydapt.prepare.tokenize` does not also import the driver's modules (and torch with them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raydapt.prepare.stage import PreparePlan, fingerprint, plan, run, split_files

__all__ = ["PreparePlan", "fingerprint", "plan", "run", "split_files"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from raydapt.prepare import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
