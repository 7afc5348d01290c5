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

import contextlib
import dataclasses
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI
from ray import serve

from raydapt import layout, report
from raydapt.config import JobConfig
from raydapt.pipeline import derived, run_stage
from raydapt.pipeline import run as run_stages
from raydapt.sources import build_model, world_dir
from raydapt.storage import write_json_atomic
from raydapt.train.diagnostics import DIAGNOSTICS
from raydapt.world import read_jsonl

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


def question(cfg: JobConfig) -> str:
    """What the served student is asked: a world problem, or, for a chat teacher's job, the
    first held-out instruction (never in the training split)."""
    if "instruct" not in cfg.corpus.world_tasks:
        return "add 123 456"
    rows = read_jsonl(world_dir(cfg) / "heldout.jsonl")
    return next(r["prompt"] for r in rows if r.get("task") == "instruct")


def _ask(url: str, model: str, text: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=96,
        temperature=0,
    )
    return r.choices[0].message.content


@dataclass
class _Clock:
    """Seconds per demo step, for timings.json and bench/pipeline.py."""

    t0: float = field(default_factory=time.perf_counter)
    timings: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 1)

    def stages(self, job: JobConfig, names: list[str], prefix: str = "") -> None:
        """Run `names` of `job` through the pipeline, recording each stage's seconds."""
        for s in run_stages(dataclasses.replace(job, stages=names), quiet=True)["stages"]:
            self.timings[(prefix + s["stage"]).replace("kd teach", "teach")] = s["seconds"]
            if s["stage"] == "teach" and "pool" in s["result"]:  # computed, not up to date
                keys = ("seconds", "pool", "computed_rows")
                pool = (prefix + "teach_pool").replace("kd ", "")
                self.timings[pool] = {k: s["result"].get(k) for k in keys}


def run_demo(cfg: JobConfig) -> dict:
    """The six steps; returns the table rows, the report path and the timings."""
    clock = _Clock()
    step(1, "prepare the world corpus (Ray Data)")
    clock.stages(cfg, ["prepare"])
    if cfg.teacher.path:  # a real model: imported (GGUF) or a folder, used as it is
        step(2, f"the teacher: {cfg.teacher.path}")
        with clock.timed("teacher import"):
            teacher_dir = build_model(cfg, "teacher")
    else:
        step(2, f"train the `{cfg.teacher.preset}` teacher (cached after the first run)")
        with clock.timed("teacher train"):
            teacher_dir = _teacher(cfg)
        cfg = dataclasses.replace(
            cfg, teacher=dataclasses.replace(cfg.teacher, path=str(teacher_dir), preset="")
        )
    scored = cfg.teach.kind == "score"
    what = "score the corpus" if scored else "answer the prompts and score the answers"
    step(3, f"{what} with the vLLM teacher pool (top-{cfg.teach.k}), distill the student")
    clock.stages(cfg, ["teach", "train"], "kd ")
    step(4, "train the same student with cross-entropy alone, for comparison")
    if scored:  # CE on the corpus the teacher scored
        ce = derived(cfg, "ce", train={"mode": "full"})
    else:  # CE on the teacher's answers (sequence-level KD): same rows, no logits
        ce = derived(cfg, "ce", share=("prepared", "targets"), train={"kd_alpha": 0.0})
    clock.stages(ce, ["train"], "ce ")
    if not scored:  # the teacher's answers to held-out prompts, to measure agreement on
        heldout = derived(cfg, "heldout", teach={"split": "validation"})
        clock.stages(heldout, ["teach"], "heldout ")
        targets = str(layout.targets_dir(heldout))
        cfg, ce = (derived_eval(c, teacher_targets=targets) for c in (cfg, ce))
    step(5, "evaluate the teacher and both students on held-out data")
    models = {
        "teacher": (cfg, teacher_dir),
        "kd student": (cfg, layout.export_dir(cfg)),
        "ce student": (ce, layout.export_dir(ce)),
    }
    with clock.timed("eval"):
        rows = [
            {**run_stage("eval", job, model_dir=model, name=name.replace(" ", "_")), "model": name}
            for name, (job, model) in models.items()
        ]
    url = answer = asked = None
    if "serve" in cfg.stages:
        step(6, "serve the KD student over HTTP and ask it one question")
        with clock.timed("serve + ask"):
            url, answer = _serve_and_ask(cfg, asked := question(cfg))
    curves = {
        name: report.read_metrics(layout.train_dir(job) / "metrics.jsonl")
        for name, (job, _) in models.items()
        if name != "teacher"
    }
    curves = {"teacher": report.read_metrics(teacher_dir.parent / "metrics.jsonl"), **curves}
    return _finish(cfg, clock, rows, curves, url, asked, answer)


def _finish(
    cfg: JobConfig,
    clock: _Clock,
    rows: list[dict],
    curves: dict[str, list[dict]],
    url: str | None,
    asked: str | None,
    answer: str | None,
) -> dict:
    """Write the report and timings, then print the table and the served answer last."""
    cols = ["model", "heldout_loss", "markov_loss", "exact_match", "params", "decode_tokens_per_s"]
    if any("teacher_kl" in r for r in rows):
        cols[1:1] = ["teacher_nll", "teacher_kl", "top1_agreement"]
        cols = [c for c in cols if any(c in r for r in rows)]
    text = report.table(rows, cols)
    floor = rows[0].get("markov_entropy_floor")
    images = [
        p
        for p in (
            report.plot_curves(
                curves,
                "ce",
                cfg.out / "loss_curves.png",
                "training cross-entropy on the data (the KD loss adds its KL term)",
            ),
            report.plot_curves(
                curves,
                DIAGNOSTICS,
                cfg.out / "signal_diagnostics.png",
                "the stored teacher signal: mass covered by its ids (teacher, tail, student)",
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
    clock.timings["total"] = round(time.perf_counter() - clock.t0, 1)
    notes = [
        f"Markov entropy floor: {floor:.4f} nats/token." if floor else "",
        f"Served KD student answered {asked!r} with: {answer!r}" if answer else "",
        f"Wall time {clock.timings['total']:.0f} s.",
    ]
    write_json_atomic(cfg.out / "timings.json", clock.timings)
    path = report.write_report(cfg.out, "raydapt demo", text, images, [n for n in notes if n])
    print(f"\n[demo] done in {clock.timings['total']:.0f} s; report with loss curves: {path}")
    print(
        "\nthe teacher's answers to held-out prompts (lower nll and kl are better):"
        if "teacher_kl" in text
        else "\nheld-out problems and Markov text (lower loss is better; exact_match is greedy):"
    )
    print(text)
    if floor:
        print(
            f"markov_loss floor (the true entropy rate of the world's language): "
            f"{floor:.4f} nats/token"
        )
    if answer is not None:
        print(f"served KD student at {url}: {asked!r} -> {answer!r}")
    return {"rows": rows, "report": str(path), "timings": clock.timings}


def derived_eval(job: JobConfig, **values: Any) -> JobConfig:
    """`job` with other eval settings (same output folder)."""
    return dataclasses.replace(job, eval=dataclasses.replace(job.eval, **values))


def _serve_and_ask(cfg: JobConfig, text: str) -> tuple[str, str]:
    """Serve the KD student, ask it one question through the openai client, stop serving."""
    url = run_stage("serve", cfg, block=False)["url"]
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            name = json.load(r)["data"][0]["id"]
        return url, _ask(url, name, text)
    finally:
        serve.shutdown()
