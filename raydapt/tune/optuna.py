"""Optuna TPE for `tune.search: optuna`, fed only the reports that carry the metric.

The train loop reports at log and checkpoint steps too, where `val_loss` is absent (an eval
costs a pass over the validation set, so it runs every `train.eval_every` steps only).
Ray's OptunaSearch reads `result[metric]` on every intermediate report and fails the sweep
with a KeyError on the first report without it. Those reports hold nothing for the TPE
model, so they are skipped here; the final report always carries the metric (the loop
evaluates at the last step), which is what Optuna's study records as the trial's value.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class MetricReportsOptunaSearch(OptunaSearch):
    """OptunaSearch that ignores intermediate results without the searched metric."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, str) and result.get(self.metric) is None:
            return
        super().on_trial_result(trial_id, result)
