"""On-policy runs that go wrong, on a real Ray cluster with real vLLM engines and a Ray Train
worker: a teacher that never ends where the student does (the EOS guard), and a rollout or
teacher engine SIGKILLed in the middle of a step (the step is redone, nothing trained twice,
and the run's losses equal an undisturbed run's)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from builders import run_train, train_metrics
from test_onpolicy_train_ray import _job

from raydapt.errors import UserError
from raydapt.models import init_model
from raydapt.pipeline import run_stage


def eos_biased(src: Path, out: Path, world_dir: Path, sign: float) -> Path:
    """A copy of the model at `src` whose lm_head row of EOS is fitted so that log p(EOS) is
    high (sign +1: it ends answers early and often) or low (sign -1) on the world's rows;
    only that row changes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = False  # a separate head row; the input embedding stays
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    lines = [json.loads(x) for x in (world_dir / "train.jsonl").read_text().splitlines()[:64]]
    text = [r.get("prompt", r.get("text", "")) + " " + r.get("response", "") for r in lines]
    batch = tok(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state[batch["attention_mask"].bool()]
    head = model.lm_head.weight
    row = torch.nn.Parameter(head[tok.eos_token_id].detach().clone())
    opt = torch.optim.Adam([row], lr=0.05)
    others = torch.cat([head[: tok.eos_token_id], head[tok.eos_token_id + 1 :]]).detach()
    for _ in range(300):
        logits = torch.cat([hidden @ row[:, None], hidden @ others.T], dim=1)
        loss = -sign * torch.log_softmax(logits, -1)[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head[tok.eos_token_id] = row
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def never_ending(src: Path, out: Path) -> Path:
    """A copy of the model at `src` trained (all weights, 60 Adam steps on random token
    rows) to give EOS a log-prob below -25 everywhere: its own samples never end. Fitting
    the head's EOS row alone does not generalise to the states the model samples into."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    eos, vocab = tok.eos_token_id, model.config.vocab_size
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = torch.randint(0, vocab, (8, 32), generator=gen)
        x[x == eos] = 5
        lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)[..., eos]
        loss = torch.nn.functional.softplus(lp + 25).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eos_pair(tiny_model_dir, world_dir, tmp_path_factory):
    """(a student that ends early and often, a teacher that never ends) on one tokenizer."""
    root = tmp_path_factory.mktemp("eos")
    student = init_model(
        "tiny", world_dir / "train.jsonl", root / "s0", seed=1, tokenizer_from=tiny_model_dir
    )
    student = eos_biased(student, root / "student", world_dir, +1.0)
    teacher = never_ending(tiny_model_dir, root / "teacher")
    for f in student.iterdir():  # the very same tokenizer files: on-policy checks its hash
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, teacher / f.name)
    return student, teacher


@pytest.mark.slow
def test_eos_guard_stops_or_masks_a_never_ending_teacher(tmp_path, eos_pair, ray_session):
    ray_session()
    student, teacher = eos_pair
    cfg = _job(tmp_path / "stop", teacher, student, max_steps=2)
    run_stage("prepare", cfg)
    with pytest.raises(UserError) as e:  # the default guard: stop at the first step
        run_train(cfg)
    assert "the teacher's own samples never end" in str(e.value)
    assert "at step 1" in str(e.value) and "below rollout.eos_min_logprob=-9.2" in str(e.value)

    cfg = _job(tmp_path / "mask", teacher, student, max_steps=2)
    cfg.rollout.eos_guard = "mask"
    run_stage("prepare", cfg)
    run_train(cfg)
    rows = train_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["eos_teacher_logprob"] < -9.2 and r["eos_masked"] > 0
        assert r["teacher_ended_fraction"] == 0.0  # the probe: the teacher never ends
        assert r["ended_fraction"] > 0 and math.isfinite(r["loss"])
        # every response token is learned except each ended response's EOS
        n = cfg.train.batch_size
        assert r["tokens"] == round(r["response_len_mean"] * n) - r["eos_masked"]


def _kill_when_parked(hold_file: Path, killed: list) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if hold_file.is_file():
                info = json.loads(hold_file.read_text())
                os.kill(info["pid"], signal.SIGKILL)
                killed.append(info)
                return
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, tiny_model_dir, student_dir, ray_session):
    ray_session()
    cfg = _job(tmp_path_factory.mktemp("clean"), tiny_model_dir, student_dir, kd_loss="reverse_kl")
    run_stage("prepare", cfg)
    run_train(cfg)
    return train_metrics(cfg)


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onpolicy-faults") / "student"
    return init_model("tiny", world_dir / "train.jsonl", out, seed=1, tokenizer_from=tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("role", ["rollout", "teacher", "trainer"])
def test_killed_mid_run_the_loop_continues_exactly(
    role, tmp_path, tiny_model_dir, student_dir, undisturbed, monkeypatch
):
    """An engine SIGKILLed in step 2's call: the step is redone by a new engine. The Train
    worker SIGKILLed after step 2: the worker group restarts from the step-2 checkpoint and
    pushes the restored weights to the rollout engine before it asks for step 3."""
    hold = tmp_path / "held.json"
    monkeypatch.setenv("RAYDAPT_HOLD_FILE", str(hold))
    cfg = _job(tmp_path, tiny_model_dir, student_dir, kd_loss="reverse_kl")
    if role == "trainer":
        monkeypatch.setenv("RAYDAPT_HOLD_AT_STEP", "2")
        cfg.train.max_failures = 1
        cfg.train.checkpoint_every = 2
        parked = Path(f"{hold}.s2.rank0")
    else:
        monkeypatch.setenv("RAYDAPT_HOLD_ENGINE", f"{role}:2")  # step 2's call parks, once
        parked = Path(f"{hold}.{role}.2")
    run_stage("prepare", cfg)
    killed: list = []
    watcher = _kill_when_parked(parked, killed)
    run_train(cfg)
    watcher.join(5)
    assert killed
    if role != "trainer":
        assert killed[0]["role"] == role and killed[0]["call"] == 2
    rows = train_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step trained once
    want_redone = [0, 1, 0, 0] if role != "trainer" else [0, 0, 0, 0]
    assert [r["redone"] for r in rows] == want_redone
    assert [r["lag"] for r in rows] == [0, 0, 0, 0]  # the new engine got the latest weights
    # the redone step drew the same samples from the same weights: the run goes on exactly
    for got, want in zip(rows, undisturbed, strict=True):
        assert got["response_len_mean"] == want["response_len_mean"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
