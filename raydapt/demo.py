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
    tcfg = derived(cfg, "teacher", student={"path": str(model), "preset": ""},
                   train={**dataclasses.asdict(cfg.train), **TEACHER_TRAIN,
                          "max_steps": TEACHER_STEPS * cfg.train.max_steps,
                          "checkpoint_every": cfg.train.max_steps, "eval_every": cfg.train.max_steps})
    run_stages(dataclasses.replace(tcfg, stages=["train"]))
    return layout.export_dir(tcfg)


def _ask(url: str, model: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "add 123 456"}],
                                       max_tokens=64, temperature=0)
    return r.choices[0].message.content


def run_demo(cfg: JobConfig) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}

    def stages(c: JobConfig, names: list[str], prefix: str = "") -> None:
        for s in run_stages(dataclasses.replace(c, stages=names))["stages"]:
            timings[prefix + s["stage"]] = s["seconds"]
            if s["stage"] == "teach" and s["result"]:
                timings["teach_pool"] = {k: s["result"].get(k) for k in ("seconds", "pool", "computed_rows")}

    stages(cfg, ["prepare"])
    t = time.perf_counter()
    teacher_dir = _teacher(cfg)
    timings["teacher train"] = round(time.perf_counter() - t, 1)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=str(teacher_dir), preset=""))
    stages(cfg, ["teach", "train"], "kd ")
    ce = derived(cfg, "ce", train={"mode": "full"})
    stages(ce, ["train"], "ce ")
    timings["teach"] = timings.pop("kd teach")
    rows = []
    t = time.perf_counter()
    for name, c, model in (("teacher", cfg, teacher_dir), ("kd student", cfg, layout.export_dir(cfg)),
                           ("ce student", ce, layout.export_dir(ce))):
        m = run_stage("eval", c, model_dir=model, name=name.replace(" ", "_"))
        rows.append({**m, "model": name})
    timings["eval"] = round(time.perf_counter() - t, 1)
    cols = ["model", "heldout_loss", "markov_loss", "exact_match", "params", "decode_tokens_per_s"]
    text = report.table(rows, cols)
    floor = rows[0].get("markov_entropy_floor")
    print("\n" + text)
    if floor:
        print(f"markov_loss floor (true entropy rate of the world's language): {floor:.4f} nats/token")
    answer = None
    if "serve" in cfg.stages:
        t = time.perf_counter()
        answer = _serve_and_ask(cfg)
        timings["serve + ask"] = round(time.perf_counter() - t, 1)
    images = [p for p in (
        report.plot_curves({"teacher": report.read_metrics(teacher_dir.parent / "metrics.jsonl"),
                            "kd student": report.read_metrics(layout.train_dir(cfg) / "metrics.jsonl"),
                            "ce student": report.read_metrics(layout.train_dir(ce) / "metrics.jsonl")},
                           "ce", cfg.out / "loss_curves.png",
                           "training cross-entropy on the data (the KD loss adds its KL term)"),
        report.plot_bars(rows, ["heldout_loss", "markov_loss", "exact_match"], cfg.out / "metrics.png",
                         "held-out metrics", floor),
    ) if p]
    notes = [f"Markov entropy floor: {floor:.4f} nats/token." if floor else "",
             f"Served KD student answered `add 123 456` with: {answer!r}" if answer is not None else "",
             f"Wall time {time.perf_counter() - t0:.0f} s."]
    timings["total"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(cfg.out / "timings.json", timings)
    path = report.write_report(cfg.out, "raydapt demo", text, images, [n for n in notes if n])
    print(f"\nreport: {path}")
    return {"rows": rows, "report": str(path), "timings": timings}


def _serve_and_ask(cfg: JobConfig) -> str:
    url = run_stage("serve", cfg, block=False)["url"]
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            name = json.load(r)["data"][0]["id"]
        answer = _ask(url, name)
        print(f"\nserved at {url}; `add 123 456` -> {answer!r}")
        return answer
    finally:
        serve.shutdown()
