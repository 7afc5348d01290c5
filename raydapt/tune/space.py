"""The `tune` section turned into Ray Tune objects: search space, search algorithm, scheduler.

    space = tune_space(cfg.tune)            # {"train": {"lr": tune.loguniform(1e-4, 1e-2)}}
    check_space(cfg)                        # UserError naming the key, before a trial starts
    scheduler = make_scheduler(cfg)         # ASHA or PBT on `step`, or FIFO

Space forms (`tune.space` maps "train.key" to one of them):
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi exclusive, as in
Tune), `{choice: [...]}` and `{grid: [...]}` (every value, `num_samples` times each). With
`tune.search: grid`, `choice` entries are searched exhaustively too.

ASHA's clock is the train loop's `step` (optimizer steps), so `max_t = train.max_steps`.
Every report carries the metric (the train loop's reporting policy: it reports, after an
evaluation, at every `train.eval_every` and `train.checkpoint_every` step and the last), so
`tune.grace_period` counts reports: in steps it is `grace_period * report_interval(cfg)`.

PBT (`tune.scheduler: pbt`) perturbs every `train.checkpoint_every` steps, where the loop
has just evaluated, so trials are ranked on fresh validation scores: a trial in the
bottom quantile continues from a top trial's checkpoint with a mutated copy of its train.*
values (the `tune.space` entries are the mutations; `grid` lists become choices). Only
values that can change in the middle of a run may be searched: lr, weight decay, KD
temperature and weights, and the like; keys that change the model's shape or the data order
(lora_r, mode, batch_size, ...) are refused. See raydapt.tune.pbt for how checkpoints move.
By default PBT is synchronous (`tune.pbt_synch`): each trial pauses at a perturbation step
until every trial has reached it, so trials are ranked on scores from the same step. On a
shared machine trials start seconds apart and train at different speeds; asynchronous PBT
then compares a trial with whatever the others last reported, or with nobody at all when a
fast trial has already finished, and may never exploit.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raydapt.config import ConfigError, JobConfig, TuneConfig, job_from_dict
from raydapt.errors import UserError
from raydapt.tune.pbt import FinalStepPBT


def _domain(form: str, args: list, exhaustive: bool) -> Any:
    if form == "loguniform":
        return tune.loguniform(float(args[0]), float(args[1]))
    if form == "uniform":
        return tune.uniform(float(args[0]), float(args[1]))
    if form == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    if form == "grid" or (form == "choice" and exhaustive):
        return tune.grid_search(list(args))
    return tune.choice(list(args))


def tune_space(tc: TuneConfig) -> dict[str, dict[str, Any]]:
    """`tune.space` as a nested Tune param space: {"train": {key: domain}}."""
    exhaustive = tc.search == "grid"
    train: dict[str, Any] = {}
    for dotted, spec in tc.space.items():
        ((form, args),) = spec.items()
        train[dotted.split(".", 1)[1]] = _domain(form, args, exhaustive)
    return {"train": train}


def _probe_values(form: str, args: list) -> list:
    """Values whose config must validate: every listed value, or a range's two ends."""
    if form == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return list(args)


def check_space(cfg: JobConfig) -> None:
    """Every value a trial can get must give a valid job; errors name the `tune.space` key.

    The shape of each entry is checked by config.py already; this checks values against the
    train section's own rules (type, choices, ranges), and search/scheduler combinations.
    """
    tc = cfg.tune
    problems: list[str] = []
    if not tc.space:
        problems.append(
            "tune.space: empty; give at least one train.* key, "
            "e.g. train.lr: {loguniform: [1e-4, 1e-2]}"
        )
    base = cfg.to_dict()
    for dotted, spec in tc.space.items():
        ((form, args),) = spec.items()
        for value in _probe_values(form, args):
            try:
                job_from_dict({**base, "train": {**base["train"], dotted.split(".", 1)[1]: value}})
            except ConfigError as e:
                why = "; ".join(e.problems)
                problems.append(
                    f"tune.space.{dotted}: value {value!r} gives an invalid job ({why})"
                )
    if tc.search == "optuna" and any("grid" in s for s in tc.space.values()):
        problems.append(
            "tune.space: `grid` entries need tune.search=grid or random; "
            "optuna samples, use `choice`"
        )
    if tc.scheduler == "pbt":
        problems += _pbt_problems(cfg)
    if tc.scheduler == "asha" and cfg.train.eval_every <= 0 and cfg.train.checkpoint_every <= 0:
        problems.append(
            "tune.scheduler: with train.eval_every=0 and train.checkpoint_every=0 "
            "a trial reports only at "
            "its last step, so ASHA cannot stop anything early; "
            "set train.eval_every or tune.scheduler=fifo"
        )
    if tc.scheduler == "asha" and (tc.reduction_factor < 2 or tc.grace_period < 1):
        problems.append(
            "tune.reduction_factor/grace_period: "
            "ASHA needs reduction_factor >= 2 and grace_period >= 1, "
            f"got {tc.reduction_factor} and {tc.grace_period}"
        )
    if tc.cpus_per_trial < 0:
        problems.append(f"tune.cpus_per_trial: must be >= 0, got {tc.cpus_per_trial}")
    if problems:
        raise ConfigError(problems, "tune")


# What PBT may mutate: values a restored checkpoint can continue with. Anything else changes
# the model's parameters (lora_*, mode, heads), the checkpoint layout, or the data order.
PBT_MUTABLE = (
    "lr",
    "weight_decay",
    "betas",
    "grad_clip",
    "min_lr_ratio",
    "kd_loss",
    "kd_alpha",
    "kd_temperature",
    "jsd_beta",
)


def _pbt_problems(cfg: JobConfig) -> list[str]:
    tc, tr = cfg.tune, cfg.train
    out = [
        f"tune.space.{k}: PBT mutates values inside a running trial and {k} cannot change there; "
        f"PBT can search {', '.join('train.' + m for m in PBT_MUTABLE)} (use asha for the rest)"
        for k in tc.space
        if k.split(".", 1)[1] not in PBT_MUTABLE
    ]
    if tr.checkpoint_every <= 0:
        out.append(
            "train.checkpoint_every: PBT perturbs at checkpoints; "
            "set it (e.g. a quarter of max_steps)"
        )
    if tc.num_samples * max(1, sum(len(s.get("grid", [None])) for s in tc.space.values())) < 2:
        out.append("tune.num_samples: PBT needs a population of at least 2 trials")
    return out


def report_interval(cfg: JobConfig) -> int:
    """Steps to a trial's first report (eval and checkpoint steps report; see the train loop)."""
    tr = cfg.train
    every = [n for n in (tr.eval_every, tr.checkpoint_every) if n > 0]
    return min(every + [tr.max_steps])


def make_scheduler(cfg: JobConfig) -> Any:
    """FIFO, ASHA or PBT with `step` as their clock (see the module docstring)."""
    tc = cfg.tune
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    if tc.scheduler == "asha":
        grace = min(cfg.train.max_steps, tc.grace_period * report_interval(cfg))
        return ASHAScheduler(
            time_attr="step",
            max_t=cfg.train.max_steps,
            grace_period=grace,
            reduction_factor=tc.reduction_factor,
        )
    if tc.scheduler == "pbt":
        mutations = {}
        for dotted, spec in tc.space.items():
            ((form, args),) = spec.items()
            mutations[dotted.split(".", 1)[1]] = _domain(
                "choice" if form == "grid" else form, args, exhaustive=False
            )
        return FinalStepPBT(
            final_step=cfg.train.max_steps,
            time_attr="step",
            perturbation_interval=cfg.train.checkpoint_every,
            hyperparam_mutations={"train": mutations},
            synch=tc.pbt_synch,
        )
    raise UserError(f"tune.scheduler: {tc.scheduler!r} is not supported; use asha, pbt or fifo")


def make_search(cfg: JobConfig) -> Any:
    """None (Tune's random/grid variant generator) or Ray's OptunaSearch (TPE). Every trial
    report carries the metric, which OptunaSearch reads on each one."""
    if cfg.tune.search != "optuna":
        return None
    try:
        import optuna  # noqa: F401 - an optional dependency (Ray's OptunaSearch only asserts it later)
    except ImportError as e:
        raise UserError(
            f"tune.search: optuna needs the `optuna` package ({e}); "
            "install raydapt[tune] or use tune.search=random"
        ) from None
    from ray.tune.search.optuna import OptunaSearch  # slow to import; only optuna sweeps need it

    return OptunaSearch(seed=cfg.train.seed)
