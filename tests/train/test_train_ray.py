"""`raydapt train`: modes, resume, export and bad input, on a tiny Llama and real Ray.

Most tests use Train local mode (`train.num_workers=0`, in-process) on the shared local
cluster (Ray Data still reads the shards) and call the stage's parts, `train.run(train.plan(job))`;
the up-to-date rule is tested through `pipeline.run_stage`, as a user runs it. FSDP parity
runs two real gloo processes without Ray. Multi-worker TorchTrainer runs live in
tests/train/test_train_workers_ray.py.

    .venv/bin/python -m pytest tests/train/test_train_ray.py -x -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import (
    assert_resumed_exactly,
    run_train,
    train_job,
    train_metrics,
    train_rows,
    write_train_prepared,
)

from raydapt import layout, pipeline, train
from raydapt.config import TrainConfig
from raydapt.errors import UserError


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model part of a DCP checkpoint folder as a plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(dst))
    return torch.load(dst, weights_only=False)["model"]


@pytest.fixture(scope="module")
def rows(world_dir, tiny_model_dir):
    return train_rows(world_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def teacher_dir(world_dir, tiny_model_dir, tmp_path_factory):
    """A second tiny model sharing the student's tokenizer (the offline / online teacher)."""
    from transformers import AutoModelForCausalLM

    from raydapt.models import init_model
    from raydapt.rows import collate
    from raydapt.train.losses import ce_loss

    out = init_model(
        "tiny",
        world_dir / "train.jsonl",
        tmp_path_factory.mktemp("teacher") / "m",
        seed=1,
        tokenizer_from=tiny_model_dir,
    )
    model = AutoModelForCausalLM.from_pretrained(out)  # trained a little, so KD has a signal
    rows = train_rows(world_dir, tiny_model_dir)
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "input_ids": [r[1] for r in rows],
            "loss_mask": [r[2] for r in rows],
        }
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(25):
        b = collate(table, torch.randint(0, len(rows), (16,)).numpy(), 0)
        ce_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"]).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture
def job(tmp_path, tiny_model_dir, rows, ray_cluster):
    """Factory: a job under tmp_path with prepared data in place."""

    def make(sub: str = "run", **train):
        cfg = train_job(tmp_path / sub, tiny_model_dir, **train)
        if not layout.prepared_dir(cfg).exists():
            write_train_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows)
        return cfg

    return make


# ----------------------------------------------------------------------------- modes


def test_full_lowers_val_loss_and_export_loads(job, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydapt.rows import collate
    from raydapt.train.losses import ce_loss

    cfg = job(max_steps=8, eval_every=4, checkpoint_every=4)
    summary = run_train(cfg)
    m = train_metrics(cfg)
    assert [x["step"] for x in m] == list(range(1, 9))
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.2
    assert all(k in m[-1] for k in ("loss", "ce", "lr", "grad_norm", "tokens_per_s"))
    export = Path(summary["export_dir"])
    assert summary["complete"] and (export / "model.safetensors").is_file()
    # the export manifest records the stage fingerprint, which is what run_stage compares
    assert summary["fingerprint"] == train.fingerprint(train.plan(cfg))
    assert (
        json.loads((export / "manifest.json").read_text())["fingerprint"] == summary["fingerprint"]
    )
    # the export is the trained model: its held-out loss is the final val_loss
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert (
        AutoTokenizer.from_pretrained(export).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    )
    val = pq.read_table(layout.prepared_dir(cfg) / "validation" / "part-00000.parquet")
    val = val.take(pa.compute.sort_indices(val, [("id", "ascending")]))
    b = collate(val, np.arange(val.num_rows), 0)
    with torch.no_grad():
        loss = ce_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"])
    assert abs(float(loss) - vals[-1]) < 1e-4


def test_lora_changes_only_adapter(job, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = job(mode="lora", lora_r=4, lora_targets=["q_proj", "v_proj"], lr=1e-2, lora_merge=True)
    run_train(cfg)
    vals = [x["val_loss"] for x in train_metrics(cfg) if "val_loss" in x]
    assert vals[-1] < vals[0]
    state = checkpoint_state(layout.train_dir(cfg) / "checkpoints" / "checkpoint_000006")
    base = load_file(tiny_model_dir / "model.safetensors")
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
    for k, v in state.items():
        if "lora_" in k:
            continue
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(v, base[name]), f"{k} changed in lora mode"
    export = layout.export_dir(cfg)
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(export / "model.safetensors")
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        merged["model.layers.0.self_attn.k_proj.weight"],
        base["model.layers.0.self_attn.k_proj.weight"],
    )


def test_transfer_freezes_exactly(job, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = job(mode="transfer", freeze_embeddings=True, freeze_layers=1, freeze_regex=r"^lm_head")
    run_train(cfg)
    vals = [x["val_loss"] for x in train_metrics(cfg) if "val_loss" in x]
    assert vals[-1] < vals[0]
    base = load_file(tiny_model_dir / "model.safetensors")
    out = load_file(layout.export_dir(cfg) / "model.safetensors")
    frozen = [k for k in base if k.startswith(("model.embed_tokens", "model.layers.0.", "lm_head"))]
    assert len(frozen) > 5
    for k in base:
        assert torch.equal(out[k], base[k]) == (k in frozen), k


def test_transfer_classification_head(job):
    from transformers import AutoModelForSequenceClassification

    cfg = job(
        mode="transfer",
        new_head="classification",
        num_labels=4,
        freeze_layers=1,
        max_steps=8,
        lr=3e-3,
    )
    run_train(cfg)
    m = train_metrics(cfg)
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert vals[-1] < vals[0] and "val_acc" in m[-1]
    model = AutoModelForSequenceClassification.from_pretrained(layout.export_dir(cfg))
    assert model.config.num_labels == 4 and model.score.weight.shape[0] == 4


def test_distill_offline_with_reference_targets(job, teacher_dir, rows):
    from raydapt.teach.reference import score_topk

    cfg = job(mode="distill", teacher="offline", kd_alpha=0.5, teach_k=8, max_steps=6, lr=3e-3)
    table = pa.table(
        {
            "id": [r[0] for r in rows[32:]],
            "input_ids": [r[1] for r in rows[32:]],
            "loss_mask": [r[2] for r in rows[32:]],
        }
    )
    manifest = score_topk(teacher_dir, table, k=8, out=layout.targets_dir(cfg), batch_size=64)
    assert manifest["k"] == 8 and manifest["rows"] == len(rows) - 32
    run_train(cfg)
    m = train_metrics(cfg)
    assert all("kd" in x and "ce" in x for x in m)
    assert m[-1]["kd"] < m[0]["kd"]
    # the signal's bias diagnostics, every step: the teacher's top-8 covers most of its mass,
    # and the student moves its own mass onto those ids as KD pulls it toward the teacher
    assert all(abs(x["teacher_mass"] + x["tail_mass"] - 1) < 1e-6 for x in m)
    assert all(0.5 < x["teacher_mass"] <= 1 for x in m)
    assert m[-1]["student_mass"] > m[0]["student_mass"]
    assert abs(m[0]["loss"] - (0.5 * m[0]["kd"] + 0.5 * m[0]["ce"])) < 1e-4


def test_distill_offline_sequence_level(job, rows, tiny_model_dir):
    """Generation targets (no top-k columns): sequence-level KD is CE on the teacher's rows."""
    from raydapt.models import load_tokenizer, tokenizer_hash
    from raydapt.targets import PartStore, make_table

    cfg = job(mode="distill", teacher="offline", kd_alpha=0.5, max_steps=4, eval_every=4)
    part = rows[32:]
    table = make_table(
        [r[0] for r in part],
        [np.array(r[1]) for r in part],
        [np.array(r[2]) for r in part],
        None,
        None,
        k=16,
    )
    store = PartStore(layout.targets_dir(cfg))
    store.write(table)
    store.finalize(
        {"kind": "generate", "tokenizer_hash": tokenizer_hash(load_tokenizer(tiny_model_dir))}
    )
    run_train(cfg)
    m = train_metrics(cfg)
    assert all("kd" not in x and x["loss"] == x["ce"] for x in m)
    assert m[-1]["loss"] < m[0]["loss"]


def test_distill_online(job, teacher_dir):
    cfg = job(
        mode="distill",
        teacher="online",
        kd_alpha=1.0,
        kd_loss="jsd",
        teacher_model={"path": str(teacher_dir)},
        max_steps=4,
    )
    run_train(cfg)
    m = train_metrics(cfg)
    assert m[-1]["kd"] < m[0]["kd"] and m[-1]["loss"] == pytest.approx(m[-1]["kd"], abs=1e-6)


def test_grad_accum_and_activation_checkpointing_match_one_big_batch(job):
    """batch 4 x grad_accum 2 (recomputing blocks) takes the same steps as batch 8."""
    big = job("big", batch_size=8, max_steps=3, eval_every=0, checkpoint_every=0)
    acc = job(
        "acc",
        batch_size=4,
        grad_accum=2,
        activation_checkpointing=True,
        max_steps=3,
        eval_every=0,
        checkpoint_every=0,
    )
    run_train(big)
    run_train(acc)
    for x, y in zip(train_metrics(big), train_metrics(acc), strict=True):
        assert x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4


# ----------------------------------------------------------------------------- resume


def test_resume_local_mode_continues_exactly(job, monkeypatch):
    """Killed after step 5 (checkpoint at 5), rerun: steps 6-10 match a straight run."""
    kw = dict(max_steps=10, checkpoint_every=5, eval_every=5, lora_dropout=0.0)
    straight = job("straight", **kw)
    run_train(straight)
    killed = job("killed", **kw)
    monkeypatch.setenv("RAYDAPT_FAIL_AT_STEP", "5")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_train(killed)
    monkeypatch.delenv("RAYDAPT_FAIL_AT_STEP")
    assert [x["step"] for x in train_metrics(killed)] == [1, 2, 3, 4, 5]
    assert_resumed_exactly(straight, killed, 5, 10, run_train(killed))


def test_new_data_starts_over_instead_of_resuming(job, rows, tiny_model_dir, capsys):
    """As a user runs it: an up-to-date train stage is skipped; after the prepared data (or the
    teacher targets) changed, it runs again from step 0 instead of exporting the old model.
    The parts: a rerun on the same data resumes at the last checkpoint."""
    cfg = job("data")
    assert pipeline.run_stage("train", cfg)["start_step"] == 0
    assert pipeline.run_stage("train", cfg)["skipped"]
    assert run_train(cfg)["start_step"] == 6  # same data: the run resumes, nothing left to train
    assert "nothing was trained" in capsys.readouterr().out  # and says so, naming train.resume
    shutil.rmtree(layout.prepared_dir(cfg))
    write_train_prepared(
        layout.prepared_dir(cfg), tiny_model_dir, rows[:-8]
    )  # other rows: another manifest
    assert not train.plan(cfg).resume  # the plan starts over (and deletes nothing itself)
    assert (layout.train_dir(cfg) / "checkpoints" / "checkpoint_000006").is_dir()
    again = pipeline.run_stage("train", cfg)
    assert not again.get("skipped") and again["start_step"] == 0
    assert [x["step"] for x in train_metrics(cfg)] == list(range(1, 7))


def test_pipeline_skips_train_only_while_its_export_exists(job):
    """`raydapt run` skips an up-to-date train stage, but not once its export was deleted."""
    import dataclasses

    cfg = dataclasses.replace(job("pipe"), stages=["train"])
    status = lambda: [s["status"] for s in pipeline.run(cfg)["stages"]]  # noqa: E731
    assert status() == ["ran"]
    assert status() == ["skipped (up to date)"]
    shutil.rmtree(layout.export_dir(cfg))
    assert status() == ["ran"] and (layout.export_dir(cfg) / "config.json").is_file()


# ----------------------------------------------------------------------------- plan


def test_plan_and_fingerprint(job, tiny_model_dir):
    """The plan reads only; the fingerprint follows what decides the export and nothing else."""
    import dataclasses

    cfg = job("fp")
    before = sorted(p.relative_to(cfg.out) for p in cfg.out.rglob("*"))
    p = train.plan(cfg)
    assert sorted(q.relative_to(cfg.out) for q in cfg.out.rglob("*")) == before  # no writes
    assert p.output == layout.export_dir(cfg).resolve() and p.run_name == cfg.name and p.local_mode
    assert p.train_columns == ("id", "input_ids", "loss_mask") and p.val_files and p.hold is None

    def fp(**train_kw) -> str:
        return train.fingerprint(
            train.plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_kw)))
        )

    assert fp() == train.fingerprint(p)
    assert fp(resume=False) == fp()  # how the run goes, not what it exports
    assert fp(lr=1e-4) != fp() and fp(max_steps=7) != fp()
    mine = train.plan(cfg, train_dir=cfg.out / "elsewhere", export_dir=cfg.out / "x", run_name="r")
    assert (
        mine.train_dir == (cfg.out / "elsewhere").resolve() and mine.checkpoint_dirs[0].name == "r"
    )


def test_objective_and_reported_metrics_follow_the_config(job):
    """One objective per config, chosen once; every report carries its parts and val_loss."""
    from raydapt.train.loop import is_report_step, reported_metrics
    from raydapt.train.objective import (
        Classification,
        NextToken,
        OnlineDistill,
        TopKDistill,
        build_objective,
    )

    assert type(build_objective(TrainConfig())) is NextToken
    assert type(build_objective(TrainConfig(mode="distill"), has_topk=True)) is TopKDistill
    assert type(build_objective(TrainConfig(mode="distill"))) is NextToken  # generation targets: CE
    assert (
        type(build_objective(TrainConfig(mode="distill", teacher="online"), torch.nn.Linear(1, 1)))
        is OnlineDistill
    )
    assert (
        type(build_objective(TrainConfig(mode="transfer", new_head="classification")))
        is Classification
    )
    tc = TrainConfig(max_steps=11, eval_every=5, checkpoint_every=2)
    assert [s for s in range(1, 12) if is_report_step(s, tc)] == [2, 4, 5, 6, 8, 10, 11]
    assert {"step", "loss", "ce", "val_loss"} <= reported_metrics(train.plan(job("rm")))
    clf = reported_metrics(
        train.plan(job("rc", mode="transfer", new_head="classification", num_labels=4))
    )
    assert {"acc", "val_loss", "val_acc"} <= clf


# ----------------------------------------------------------------------------- bad input


def test_lora_target_matching_nothing(job):
    cfg = job(mode="lora", lora_targets=["q_proj", "query_key_value"])
    with pytest.raises(UserError, match=r"query_key_value.*q_proj"):
        train.plan(cfg)


def test_missing_prepared_and_targets(tmp_path, tiny_model_dir, job):
    cfg = train_job(tmp_path / "empty", tiny_model_dir)
    with pytest.raises(UserError, match="raydapt prepare"):
        train.plan(cfg)
    cfg = job("nt", mode="distill", teacher="offline")
    with pytest.raises(UserError, match="raydapt teach"):
        train.plan(cfg)


def test_targets_incompatible(job, teacher_dir, rows):
    from raydapt.teach.reference import score_topk

    cfg = job(mode="distill", teacher="offline", teach_k=4)
    table = pa.table(
        {
            "id": [r[0] for r in rows[:8]],
            "input_ids": [r[1] for r in rows[:8]],
            "loss_mask": [r[2] for r in rows[:8]],
        }
    )
    score_topk(teacher_dir, table, k=8, out=layout.targets_dir(cfg))
    with pytest.raises(UserError, match=r"top-8 but teach.k=4; rerun `raydapt teach JOB`"):
        train.plan(cfg)
    mpath = layout.targets_dir(cfg) / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "k": 4, "tokenizer_hash": "0123456789abcdef"}))
    with pytest.raises(UserError, match="tokenizer 0123456789abcdef"):
        train.plan(cfg)


def test_seq_len_above_max_positions(tmp_path, tiny_model_dir, rows, ray_cluster):
    cfg = train_job(tmp_path / "long", tiny_model_dir)
    write_train_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows[:40], n_val=8, seq_len=1024)
    with pytest.raises(UserError, match="seq_len=1024 exceed.*max_position_embeddings=512"):
        train.plan(cfg)


def test_online_teacher_vocab_mismatch(job, world_dir, tmp_path):
    from raydapt.models import init_model

    other = init_model("tiny", world_dir / "train.jsonl", tmp_path / "other", vocab_size=280)
    cfg = job(mode="distill", teacher="online", teacher_model={"path": str(other)})
    with pytest.raises(UserError, match=r"vocab_size=\d+ but the student has vocab_size=\d+"):
        train.plan(cfg)


def test_incompatible_and_incomplete_checkpoint(job):
    from raydapt.train.stage import prepare_train_dir

    cfg = job("ck", max_steps=2, checkpoint_every=1, eval_every=0, keep_checkpoints=1)
    run_train(cfg)
    kept = sorted(p.name for p in (layout.train_dir(cfg) / "checkpoints").glob("checkpoint_*"))
    assert kept == ["checkpoint_000002"]  # train.keep_checkpoints: 1, the newest
    with pytest.raises(UserError, match="past train.max_steps=1"):
        train.plan(job("ck", max_steps=1))
    lora = job("ck", mode="lora", max_steps=2)
    with pytest.raises(UserError, match="incompatible run"):
        train.plan(lora)
    latest = layout.train_dir(cfg) / "checkpoints" / "checkpoint_000002"
    (latest / ".metadata").unlink()
    with pytest.raises(UserError, match="incomplete"):
        train.plan(cfg)
    fresh = train.plan(job("ck", mode="lora", max_steps=2, resume=False))  # resume=false: no check
    assert not fresh.resume and latest.is_dir()  # planning deletes nothing
    prepare_train_dir(fresh)  # the first thing `run` does: start over
    assert not (layout.train_dir(cfg) / "checkpoints").exists()


# ----------------------------------------------------------------------------- FSDP parity


def _parity_worker(rank: int, world: int, model_dir: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from raydapt.train import loop
    from raydapt.train.fsdp import shard_model
    from raydapt.train.modes import build_student
    from raydapt.train.objective import build_objective

    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    torch.use_deterministic_algorithms(True)
    tc = TrainConfig(grad_clip=0.0)
    model = shard_model(build_student(model_dir, tc, seed=0))
    params = list(model.parameters())
    optim = torch.optim.SGD(params, lr=1.0)  # params_after = params_before - grad
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    batch = torch.load(Path(out).parent / "batch.pt")  # global batch (B, T); rank takes its half
    b = {k: v[rank::world] for k, v in batch.items()}
    m = loop.train_step(
        model, build_objective(tc), optim, sched, [b], tc, params, torch.device("cpu")
    )
    full = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }
    if rank == 0:
        torch.save({"metrics": m, "params": full}, out)
    if world > 1:
        dist.destroy_process_group()


def test_fsdp_two_ranks_match_one_process(tiny_model_dir, rows, tmp_path):
    """Same global batch, same loss and same gradients (SGD lr=1) within 1e-5 in fp32."""
    import torch.multiprocessing as mp

    from raydapt.rows import collate
    from raydapt.train.modes import load_student

    table = pa.table(
        {
            "id": [r[0] for r in rows[:8]],
            "input_ids": [r[1] for r in rows[:8]],
            "loss_mask": [r[2] for r in rows[:8]],
        }
    )
    batch = collate(table, np.arange(8), 0)
    batch["loss_mask"][1, 5:] = 0  # uneven token counts across ranks
    torch.save(batch, tmp_path / "batch.pt")
    mp.spawn(
        _parity_worker,
        args=(2, str(tiny_model_dir), str(tmp_path / "pg"), str(tmp_path / "two.pt")),
        nprocs=2,
    )
    _parity_worker(0, 1, str(tiny_model_dir), "", str(tmp_path / "one.pt"))
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert abs(two["metrics"]["loss"] - one["metrics"]["loss"]) < 1e-5
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"]
    base = dict(load_student(tiny_model_dir, TrainConfig()).named_parameters())
    worst = 0.0
    for name, p in one["params"].items():
        g1, g2 = base[name].detach() - p, base[name].detach() - two["params"][name]
        assert g1.abs().max() > 0, name  # every parameter got a gradient
        worst = max(worst, float((g1 - g2).abs().max()))
    assert worst < 1e-5, worst
