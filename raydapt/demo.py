"""`raydapt demo` (`make demo`): the embedded world from corpus to served student.

    raydapt demo                       # jobs/demo.yaml
    raydapt demo train.max_steps=100   # overrides as for any job

1. prepare the world corpus (shared by every model below);
2. train the `small` teacher on it (cached: a rerun skips it);
3. the vLLM teacher pool scores the corpus: top-k logprobs per position;
4. distill the `tiny` student from those targets (KD), and train the same student with CE
   alone for the same steps;
5. evaluate teacher and both students on held-out problems;
6. serve the KD student over HTTP and ask it one question with the `openai` client;
7. print a table and write report.html with loss curves and metric bars.

Every number printed is measured here on held-out data.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from openai import OpenAI
from ray import serve

from raydapt import layout, report
from raydapt.config import JobConfig
from raydapt.pipeline import derived, run_stage
from raydapt.pipeline import run as run_stages
from raydapt.sources import build_model
from raydapt.storage import write_json_atomic

# The teacher trains for TEACHER_STEPS x the student's steps: it must know the world clearly
# better than a student can learn in its own budget, or there is nothing to distill.
TEACHER_STEPS = 2
TEACHER_TRAIN = {"mode": "full", "lr": 3e-3, "batch_size": 16, "warmup_steps": 20}


def _teacher(cfg: JobConfig) -> Path:
    model = build_model(cfg, "teacher")
    tcfg = derived(
        cfg,
        "teacher",
        student={"path": str(model), "preset": ""},
        train={
            **dataclasses.asdict(cfg.train),
            **TEACHER_TRAIN,
            "max_steps": TEACHER_STEPS * cfg.train.max_steps,
            "checkpoint_every": cfg.train.max_steps,
            "eval_every": cfg.train.max_steps,
        },
    )
    run_stages(dataclasses.replace(tcfg, stages=["train"]), quiet=True)
    return layout.export_dir(tcfg)


def step(i: int, text: str) -> None:
    print(f"\n[demo] {i}/6 {text}", flush=True)


def _ask(url: str, model: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "add 123 456"}],
        max_tokens=64,
        temperature=0,
    )
    return r.choices[0].message.content


def run_demo(cfg: JobConfig) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}

    def stages(c: JobConfig, names: list[str], prefix: str = "") -> None:
        for s in run_stages(dataclasses.replace(c, stages=names), quiet=True)["stages"]:
            timings[prefix + s["stage"]] = s["seconds"]
            if s["stage"] == "teach" and s["result"]:
                timings["teach_pool"] = {
                    k: s["result"].get(k) for k in ("seconds", "pool", "computed_rows")
                }

    step(1, "prepare the world corpus (Ray Data)")
    stages(cfg, ["prepare"])
    step(2, f"train the `{cfg.teacher.preset}` teacher (cached after the first run)")
    t = time.perf_counter()
    teacher_dir = _teacher(cfg)
    timings["teacher train"] = round(time.perf_counter() - t, 1)
    cfg = dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, path=str(teacher_dir), preset="")
    )
    step(3, f"score the corpus with the vLLM teacher pool (top-{cfg.teach.k}), distill the student")
    stages(cfg, ["teach", "train"], "kd ")
    step(4, "train the same student with cross-entropy alone, for comparison")
    ce = derived(cfg, "ce", train={"mode": "full"})
    stages(ce, ["train"], "ce ")
    step(5, "evaluate the teacher and both students on held-out problems")
    timings["teach"] = timings.pop("kd teach")
    rows = []
    t = time.perf_counter()
    for name, c, model in (
        ("teacher", cfg, teacher_dir),
        ("kd student", cfg, layout.export_dir(cfg)),
        ("ce student", ce, layout.export_dir(ce)),
    ):
        m = run_stage("eval", c, model_dir=model, name=name.replace(" ", "_"))
        rows.append({**m, "model": name})
    timings["eval"] = round(time.perf_counter() - t, 1)
    cols = ["model", "heldout_loss", "markov_loss", "exact_match", "params", "decode_tokens_per_s"]
    text = report.table(rows, cols)
    floor = rows[0].get("markov_entropy_floor")
    answer = None
    if "serve" in cfg.stages:
        step(6, "serve the KD student over HTTP and ask it one question")
        t = time.perf_counter()
        url, answer = _serve_and_ask(cfg)
        timings["serve + ask"] = round(time.perf_counter() - t, 1)
    images = [
        p
        for p in (
            report.plot_curves(
                {
                    "teacher": report.read_metrics(teacher_dir.parent / "metrics.jsonl"),
                    "kd student": report.read_metrics(layout.train_dir(cfg) / "metrics.jsonl"),
                    "ce student": report.read_metrics(layout.train_dir(ce) / "metrics.jsonl"),
                },
                "ce",
                cfg.out / "loss_curves.png",
                "training cross-entropy on the data (the KD loss adds its KL term)",
            ),
            report.plot_bars(
                rows,
                ["heldout_loss", "markov_loss", "exact_match"],
                cfg.out / "metrics.png",
                "held-out metrics",
                floor,
            ),
        )
        if p
    ]
    notes = [
        f"Markov entropy floor: {floor:.4f} nats/token." if floor else "",
        f"Served KD student answered `add 123 456` with: {answer!r}" if answer is not None else "",
        f"Wall time {time.perf_counter() - t0:.0f} s.",
    ]
    timings["total"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(cfg.out / "timings.json", timings)
    path = report.write_report(cfg.out, "raydapt demo", text, images, [n for n in notes if n])
    print(f"\n[demo] done in {timings['total']:.0f} s; report with loss curves: {path}")
    print("\nheld-out problems and Markov text (lower loss is better; exact_match is greedy):")
    print(text)
    if floor:
        print(
            "markov_loss floor (the true entropy rate of the world's language): "
            f"{floor:.4f} nats/token"
        )
    if answer is not None:
        print(f"served KD student at {url}: `add 123 456` -> {answer!r}")
    return {"rows": rows, "report": str(path), "timings": timings}


def _serve_and_ask(cfg: JobConfig) -> tuple[str, str]:
    """Serve the KD student, ask it one question through the openai client, stop serving."""
    url = run_stage("serve", cfg, block=False)["url"]
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            name = json.load(r)["data"][0]["id"]
        return url, _ask(url, name)
    finally:
        serve.shutdown()
