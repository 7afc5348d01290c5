"""Dataset loader for the raydapt_capitals tasks, referenced from their YAML by `!function`.

lm-eval imports this file by its path (it sits next to the YAML), so the tasks work from any
working directory: `dataset_path: json` would resolve `data_files` against the current
directory instead. Nothing is downloaded; the rows are read from capitals.jsonl beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("capitals.jsonl")


def load_capitals(**_: Any) -> dict[str, Any]:
    """{"test": Dataset} of the 12 rows; lm-eval passes the task's metadata as kwargs."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
