"""Builders shared by test modules: prepared folders, teach and train jobs, free ports.

`tests/` is on sys.path (it holds conftest.py), so test modules import these as
`from builders import ...`.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydapt import layout, train
from raydapt.config import job_from_dict
from raydapt.models import load_tokenizer, tokenizer_hash
from raydapt.pipeline import run_stage
from raydapt.storage import atomic_dir, finish_manifest
from raydapt.targets import read_targets

K = 8  # top-k of the teach tests
TASKS = ["add", "sort", "reverse", "base"]
SEQ_LEN = 64  # rows of the train tests


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on every interface, below Linux's ephemeral range (32768+) and above Ray's
    worker ports (10002-19999): a port the kernel hands to someone else's bind(0) between our
    check and the server's own bind (seen: a Ray dashboard agent losing its port to another
    Ray cluster starting at the same time) cannot come from here."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-32000")


def world_pairs(world_dir: Path, n: int) -> list[tuple[str, str]]:
    out = []
    for line in open(Path(world_dir) / "train.jsonl"):
        row = json.loads(line)
        if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            out.append((row["prompt"], row["response"]))
        if len(out) == n:
            break
    return out


def write_teach_prepared(
    out: Path, model_dir: Path, world_dir: Path, n_rows: int = 12, n_prompts: int = 4
) -> Path:
    """<out>/prepared with n_rows train rows and n_prompts prompts, tokenized by model_dir."""
    tok = load_tokenizer(model_dir)
    pairs = world_pairs(world_dir, n_rows + n_prompts)
    prepared = Path(out) / "prepared"
    (prepared / "train").mkdir(parents=True, exist_ok=True)
    (prepared / "prompts").mkdir(exist_ok=True)
    seqs = [
        np.asarray(tok(p + r, add_special_tokens=False)["input_ids"][:64], np.int32)
        for p, r in pairs[:n_rows]
    ]
    masks = [np.r_[np.ones(len(s) - 1, np.uint8), np.zeros(1, np.uint8)] for s in seqs]
    pq.write_table(
        pa.table(
            {
                "id": pa.array([_h(p + r) for p, r in pairs[:n_rows]], pa.string()),
                "input_ids": pa.array(seqs, pa.list_(pa.int32())),
                "loss_mask": pa.array(masks, pa.list_(pa.uint8())),
                "label": pa.array([-1] * n_rows, pa.int32()),
            }
        ),
        prepared / "train" / "part-00000.parquet",
    )
    prompts = [p for p, _ in pairs[n_rows:]]
    rendered = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    pq.write_table(
        pa.table(
            {
                "id": pa.array([_h(p) for p in prompts], pa.string()),
                "prompt": pa.array(prompts, pa.string()),
                "prompt_ids": pa.array(
                    [tok(t, add_special_tokens=False)["input_ids"] for t in rendered],
                    pa.list_(pa.int32()),
                ),
                "answer": pa.array([r for _, r in pairs[n_rows:]], pa.string()),
            }
        ),
        prepared / "prompts" / "part-00000.parquet",
    )
    finish_manifest(
        prepared,
        {
            "fingerprint": "test",
            "seq_len": 64,
            "tokenizer_path": str(model_dir),
            "tokenizer_hash": tokenizer_hash(tok),
            "pad_id": tok.pad_token_id,
            "vocab_size": len(tok),
            "rows": {"train": n_rows, "validation": 0},
        },
    )
    return prepared


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def teach_job(out: Path, teacher: Path | str, **teach):
    return job_from_dict(
        {
            "name": "t",
            "output_dir": str(out),
            "stages": ["teach"],
            "teacher": {"path": str(teacher), "dtype": "float32"},
            "student": {"path": str(teacher)},
            "teach": {"batch_size": 4, "k": K, "max_model_len": 256, **teach},
        }
    )


def run_teach(cfg) -> dict:
    """The teach stage as `raydapt teach` runs it (up-to-date check and lock included)."""
    return run_stage("teach", cfg)


def final_table(cfg) -> tuple[dict, pa.Table]:
    manifest, files = read_targets(layout.targets_dir(cfg))
    return manifest, pa.concat_tables([pq.read_table(f) for f in files])


# ----------------------------------------------------------------------------- train


# ----------------------------------------------------------------------------- helpers


def train_rows(world_dir: Path, model_dir: Path, limit: int = 240) -> list[tuple]:
    """(id, input_ids, loss_mask, label) rows from the world corpus, as `raydapt prepare` writes."""
    tok = load_tokenizer(model_dir)
    rows = []
    for line in open(world_dir / "train.jsonl"):
        r = json.loads(line)
        text = r.get("text") or (r["prompt"] + "\n" + r["response"])
        ids = (
            [tok.bos_token_id]
            + tok.encode(text, add_special_tokens=False)[: SEQ_LEN - 2]
            + [tok.eos_token_id]
        )
        label = TASKS.index(r["task"]) if r["task"] in TASKS else -1
        rows.append((f"r{len(rows):05d}", ids, [1] * (len(ids) - 1) + [0], label))
        if len(rows) >= limit:
            break
    return rows


def write_train_prepared(
    out: Path, model_dir: Path, rows: list[tuple], n_val: int = 32, seq_len: int = SEQ_LEN
) -> Path:
    tok = load_tokenizer(model_dir)
    with atomic_dir(out) as tmp:
        for split, part in (("train", rows[n_val:]), ("validation", rows[:n_val])):
            (tmp / split).mkdir()
            table = pa.table(
                {
                    "id": pa.array([r[0] for r in part], pa.string()),
                    "input_ids": pa.array([r[1] for r in part], pa.list_(pa.int32())),
                    "loss_mask": pa.array([r[2] for r in part], pa.list_(pa.uint8())),
                    "label": pa.array([r[3] for r in part], pa.int32()),
                }
            )
            pq.write_table(table, tmp / split / "part-00000.parquet")
        finish_manifest(
            tmp,
            {
                "seq_len": seq_len,
                "tokenizer_hash": tokenizer_hash(tok),
                "tokenizer_path": str(model_dir),
                "pad_id": tok.pad_token_id,
                "rows": {"train": len(rows) - n_val, "validation": n_val},
                "tokens": sum(len(r[1]) for r in rows),
                "splits": ["train", "validation"],
            },
        )
    return out


def train_job(out: Path, model_dir: Path, **keys):
    """A job on `model_dir`; `teach_k`, `student` and `teacher_model` set those sections, the
    rest is train.*. The world corpus is small: the pipeline generates it, tests bring rows."""
    base = {
        "max_steps": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "eval_every": 3,
        "num_workers": 0,
        "cpus_per_worker": 0.5,
    }
    student = keys.pop("student", {"path": str(model_dir)})
    teacher = keys.pop("teacher_model", {"path": str(model_dir)})
    teach_k = keys.pop("teach_k", 16)
    return job_from_dict(
        {
            "name": "t",
            "output_dir": str(out),
            "student": student,
            "teacher": teacher,
            "corpus": {"world_train": 60, "world_heldout": 10, "world_markov_docs": 0},
            "teach": {"k": teach_k},
            "train": {**base, **keys},
        }
    )


def train_metrics(cfg) -> list[dict]:
    return [
        json.loads(x) for x in (layout.train_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    ]


def assert_resumed_exactly(straight, killed, start: int, steps: int, summary: dict) -> None:
    """A run killed after `start` and rerun matches the uninterrupted run step for step."""
    assert summary["start_step"] == start
    a, b = train_metrics(straight), train_metrics(killed)
    assert [x["step"] for x in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5


def run_train(cfg) -> dict:
    """The train stage's parts, without the up-to-date skip: plan (checks), then run."""
    return train.run(train.plan(cfg))
