"""lm-eval against a served model: EleutherAI's harness through `raydapt serve`'s HTTP API.

lm-eval's `local-completions` model speaks the legacy /v1/completions protocol: it scores a
(context, continuation) pair by sending the token ids of both with `echo`, `logprobs: 1` and
`max_tokens: 1`, and sums the echoed prompt logprobs of the continuation tokens; it generates
with plain completion requests and `stop`. raydapt's server answers both, so any lm-eval task
runs against a served student without loading the model in this process. The tokenizer is read
from the model folder (lm-eval needs it to find where the continuation starts), never from the
hub, and only the tasks under `include_path` are indexed by default: lm-eval's own catalogue
downloads its datasets, while the tasks shipped here (`lm_eval_tasks/`) read local files.

    from raydapt.eval.lm_eval import evaluate_served
    evaluate_served("http://127.0.0.1:8000", "final", "runs/demo/train/final")
    # {"raydapt_capitals": {"acc,none": 0.83, "acc_stderr,none": 0.11}}

lm-eval is imported inside the functions: it is a `dev` extra and slow to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
DEFAULT_TASKS = ("raydapt_capitals",)


def local_completions_args(
    url: str,
    model: str,
    tokenizer: str | Path,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    max_retries: int = 3,
    timeout_s: int = 300,
) -> dict[str, Any]:
    """Keyword arguments of lm-eval's `local-completions` for a raydapt server at `url`.

    `url` is the server's base URL (`http://host:port`, what `run_stage("serve", ...)`
    returns); `model` the served name; `tokenizer` the served model's folder. The tokenizer
    backend is fixed to huggingface so lm-eval neither probes the server for tokenizer routes
    nor looks the name up on the hub. Several prompts go in one request (`batch_size`): the
    server takes a list of token-id prompts and answers one choice per prompt in order.
    `max_length` is the served context (`serve.max_model_len`); lm-eval left-truncates longer
    inputs instead of sending requests the server refuses with 400.
    """
    args: dict[str, Any] = {
        "base_url": f"{url.rstrip('/')}/v1/completions",
        "model": model,
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": 1,
        "batch_size": batch_size,
        "max_retries": max_retries,
        "timeout": timeout_s,
    }
    if max_length is not None:
        args["max_length"] = max_length
    return args


def served_lm(
    url: str,
    model: str,
    tokenizer: str | Path,
    *,
    api_key: str | None = None,
    **kwargs: Any,
) -> Any:
    """lm-eval's `local-completions` LM for a raydapt server (kwargs: `local_completions_args`).

    `api_key` goes into the request header, built here and not passed as a model argument,
    because lm-eval logs the model arguments it is given.
    """
    from lm_eval.api.registry import get_model

    args = local_completions_args(url, model, tokenizer, **kwargs)
    if api_key:
        args["header"] = {"Authorization": f"Bearer {api_key}"}
    return get_model("local-completions")(**args)


def evaluate_served(
    url: str,
    model: str,
    tokenizer: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    include_path: str | Path | None = TASKS_DIR,
    include_defaults: bool = False,
    limit: int | float | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Run lm-eval's `simple_evaluate` on `tasks` against the server; metrics per task.

    Returns lm-eval's own result keys, `"<metric>,<filter>"`, e.g.
    `{"raydapt_capitals": {"acc,none": 0.83, "acc_stderr,none": 0.11}}`. `include_defaults`
    adds lm-eval's built-in tasks, which download their datasets; kwargs go to
    `local_completions_args` (batch_size, max_length, ...).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = served_lm(url, model, tokenizer, api_key=api_key, **kwargs)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
    )
    if out is None:  # only on non-zero ranks of a distributed run, which this never is
        raise RuntimeError("lm-eval returned no results")
    # besides "<metric>,<filter>" numbers, lm-eval's results hold `alias`, `name`, `sample_len`
    # and "N/A" for a stderr it did not compute
    return {
        task: {
            k: float(v)
            for k, v in metrics.items()
            if "," in k and isinstance(v, Real) and not isinstance(v, bool)
        }
        for task, metrics in out["results"].items()
    }
