"""`raydapt train`: modes, resume, export and bad input, on a tiny Llama and real Ray.

Most tests use Train local mode (`train.num_workers=0`, in-process) on the shared local
cluster (Ray Data still reads the shards); FSDP parity runs two real gloo processes
without Ray. Multi-worker TorchTrainer runs live in tests/test_train_slow.py.

    .venv/bin/python -m pytest tests/test_train.py -x -q
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

from raydapt import layout
from raydapt.config import job_from_dict
from raydapt.errors import UserError
from raydapt.storage import atomic_dir, finish_manifest

TASKS = ["add", "sort", "reverse", "base"]
SEQ_LEN = 64


# ----------------------------------------------------------------------------- helpers


def prepared_rows(world_dir: Path, model_dir: Path, limit: int = 240) -> list[tuple]:
    """(id, input_ids, loss_mask, label) rows from the world corpus, as `raydapt prepare` writes."""
    from raydapt.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = []
    for line in open(world_dir / "train.jsonl"):
        r = json.loads(line)
        text = r.get("text") or (r["prompt"] + "\n" + r["response"])
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)[: SEQ_LEN - 2] + [tok.eos_token_id]
        label = TASKS.index(r["task"]) if r["task"] in TASKS else -1
        rows.append((f"r{len(rows):05d}", ids, [1] * (len(ids) - 1) + [0], label))
        if len(rows) >= limit:
            break
    return rows


def write_prepared(out: Path, model_dir: Path, rows: list[tuple], n_val: int = 32, seq_len: int = SEQ_LEN) -> Path:
    from raydapt.models import load_tokenizer, tokenizer_hash

    tok = load_tokenizer(model_dir)
    with atomic_dir(out) as tmp:
        for split, part in (("train", rows[n_val:]), ("validation", rows[:n_val])):
            (tmp / split).mkdir()
            table = pa.table({
                "id": pa.array([r[0] for r in part], pa.string()),
                "input_ids": pa.array([r[1] for r in part], pa.list_(pa.int32())),
                "loss_mask": pa.array([r[2] for r in part], pa.list_(pa.uint8())),
                "label": pa.array([r[3] for r in part], pa.int32()),
            })
            pq.write_table(table, tmp / split / "part-00000.parquet")
        finish_manifest(tmp, {
            "seq_len": seq_len, "tokenizer_hash": tokenizer_hash(tok), "tokenizer_path": str(model_dir),
            "pad_id": tok.pad_token_id, "rows": {"train": len(rows) - n_val, "validation": n_val},
            "tokens": sum(len(r[1]) for r in rows), "splits": ["train", "validation"],
        })
    return out


def make_job(out: Path, model_dir: Path, **train):
    base = {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 3,
            "eval_every": 3, "log_every": 3, "num_workers": 0, "cpus_per_worker": 0.5}
    student = train.pop("student", {"path": str(model_dir)})
    teacher = train.pop("teacher_model", {"path": str(model_dir)})
    return job_from_dict({"name": "t", "output_dir": str(out), "student": student, "teacher": teacher,
                          "teach": {"k": train.get("kd_k", 16)}, "train": {**base, **train}})


def metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (layout.train_dir(cfg) / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_exactly(straight, killed, start: int, steps: int, summary: dict) -> None:
    """A run killed after `start` and rerun matches the uninterrupted run step for step."""
    assert summary["return_value"]["start_step"] == start
    a, b = metrics(straight), metrics(killed)
    assert [x["step"] for x in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model part of a DCP checkpoint folder as a plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(dst))
    return torch.load(dst, weights_only=False)["model"]


@pytest.fixture(scope="module")
def rows(world_dir, tiny_model_dir):
    return prepared_rows(world_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def teacher_dir(world_dir, tiny_model_dir, tmp_path_factory):
    """A second tiny model sharing the student's tokenizer (the offline / online teacher)."""
    from transformers import AutoModelForCausalLM

    from raydapt.models import init_model
    from raydapt.train.data import collate
    from raydapt.train.losses import ce_loss

    out = init_model("tiny", world_dir / "train.jsonl", tmp_path_factory.mktemp("teacher") / "m",
                     seed=1, tokenizer_from=tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(out)  # trained a little, so KD has a signal
    rows = prepared_rows(world_dir, tiny_model_dir)
    table = pa.table({"id": [r[0] for r in rows], "input_ids": [r[1] for r in rows], "loss_mask": [r[2] for r in rows]})
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
        cfg = make_job(tmp_path / sub, tiny_model_dir, **train)
        if not layout.prepared_dir(cfg).exists():
            write_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows)
        return cfg

    return make


def run(cfg) -> dict:
    from raydapt.train.launch import run as train_run

    return train_run(cfg)


# ----------------------------------------------------------------------------- modes


def test_full_lowers_val_loss_and_export_loads(job, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydapt.train.data import collate
    from raydapt.train.losses import ce_loss

    cfg = job(max_steps=8, eval_every=4, checkpoint_every=4)
    summary = run(cfg)
    m = metrics(cfg)
    assert [x["step"] for x in m] == list(range(1, 9))
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.2
    assert all(k in m[-1] for k in ("loss", "ce", "lr", "grad_norm", "tokens_per_s"))
    export = Path(summary["export_dir"])
    assert summary["export_manifest"]["complete"] and (export / "model.safetensors").is_file()
    # the export is the trained model: its held-out loss is the final val_loss
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert AutoTokenizer.from_pretrained(export).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    val = pq.read_table(layout.prepared_dir(cfg) / "validation" / "part-00000.parquet")
    val = val.take(pa.compute.sort_indices(val, [("id", "ascending")]))
    b = collate(val, np.arange(val.num_rows), 0)
    with torch.no_grad():
        loss = ce_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"])
    assert abs(float(loss) - vals[-1]) < 1e-4


def test_lora_changes_only_adapter(job, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = job(mode="lora", lora_r=4, lora_targets=["q_proj", "v_proj"], lr=1e-2, lora_merge=True)
    run(cfg)
    vals = [x["val_loss"] for x in metrics(cfg) if "val_loss" in x]
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
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_transfer_freezes_exactly(job, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = job(mode="transfer", freeze_embeddings=True, freeze_layers=1, freeze_regex=r"^lm_head")
    run(cfg)
    vals = [x["val_loss"] for x in metrics(cfg) if "val_loss" in x]
    assert vals[-1] < vals[0]
    base = load_file(tiny_model_dir / "model.safetensors")
    out = load_file(layout.export_dir(cfg) / "model.safetensors")
    frozen = [k for k in base if k.startswith(("model.embed_tokens", "model.layers.0.", "lm_head"))]
    assert len(frozen) > 5
    for k in base:
        assert torch.equal(out[k], base[k]) == (k in frozen), k


def test_transfer_classification_head(job):
    from transformers import AutoModelForSequenceClassification

    cfg = job(mode="transfer", new_head="classification", num_labels=4, freeze_layers=1, max_steps=8, lr=3e-3)
    run(cfg)
    m = metrics(cfg)
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert vals[-1] < vals[0] and "val_acc" in m[-1]
    model = AutoModelForSequenceClassification.from_pretrained(layout.export_dir(cfg))
    assert model.config.num_labels == 4 and model.score.weight.shape[0] == 4


def test_distill_offline_with_reference_targets(job, teacher_dir, rows):
    from raydapt.teach.reference import score_topk

    cfg = job(mode="distill", teacher="offline", kd_alpha=0.5, kd_k=8, max_steps=6, lr=3e-3)
    table = pa.table({"id": [r[0] for r in rows[32:]], "input_ids": [r[1] for r in rows[32:]],
                      "loss_mask": [r[2] for r in rows[32:]]})
    manifest = score_topk(teacher_dir, table, k=8, out=layout.targets_dir(cfg), batch_size=64)
    assert manifest["k"] == 8 and manifest["rows"] == len(rows) - 32
    run(cfg)
    m = metrics(cfg)
    assert all("kd" in x and "ce" in x for x in m)
    assert m[-1]["kd"] < m[0]["kd"]
    assert abs(m[0]["loss"] - (0.5 * m[0]["kd"] + 0.5 * m[0]["ce"])) < 1e-4


def test_distill_offline_sequence_level(job, rows, tiny_model_dir):
    """Generation targets (no top-k columns): sequence-level KD is CE on the teacher's rows."""
    from raydapt.models import load_tokenizer, tokenizer_hash
    from raydapt.targets import PartStore, make_table

    cfg = job(mode="distill", teacher="offline", kd_alpha=0.5, max_steps=4, eval_every=4)
    part = rows[32:]
    table = make_table([r[0] for r in part], [np.array(r[1]) for r in part], [np.array(r[2]) for r in part],
                       None, None, k=16)
    store = PartStore(layout.targets_dir(cfg))
    store.write(table)
    store.finalize({"kind": "generate", "tokenizer_hash": tokenizer_hash(load_tokenizer(tiny_model_dir))})
    run(cfg)
    m = metrics(cfg)
    assert all("kd" not in x and x["loss"] == x["ce"] for x in m)
    assert m[-1]["loss"] < m[0]["loss"]


def test_distill_online(job, teacher_dir):
    cfg = job(mode="distill", teacher="online", kd_alpha=1.0, kd_loss="jsd", teacher_model={"path": str(teacher_dir)}, max_steps=4)
    run(cfg)
    m = metrics(cfg)
    assert m[-1]["kd"] < m[0]["kd"] and m[-1]["loss"] == pytest.approx(m[-1]["kd"], abs=1e-6)


def test_grad_accum_and_activation_checkpointing_match_one_big_batch(job):
    """batch 4 x grad_accum 2 (recomputing blocks) takes the same steps as batch 8."""
    big = job("big", batch_size=8, max_steps=3, eval_every=0, checkpoint_every=0)
    acc = job("acc", batch_size=4, grad_accum=2, activation_checkpointing=True, max_steps=3, eval_every=0, checkpoint_every=0)
    run(big)
    run(acc)
    for x, y in zip(metrics(big), metrics(acc), strict=True):
        assert x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4


# ----------------------------------------------------------------------------- resume


def test_resume_local_mode_continues_exactly(job, monkeypatch):
    """Killed after step 5 (checkpoint at 5), rerun: steps 6-10 match a straight run."""
    kw = dict(max_steps=10, checkpoint_every=5, eval_every=5, log_every=5, lora_dropout=0.0)
    straight = job("straight", **kw)
    run(straight)
    killed = job("killed", **kw)
    monkeypatch.setenv("RAYDAPT_FAIL_AT_STEP", "5")
    with pytest.raises(RuntimeError, match="injected failure"):
        run(killed)
    monkeypatch.delenv("RAYDAPT_FAIL_AT_STEP")
    assert [x["step"] for x in metrics(killed)] == [1, 2, 3, 4, 5]
    assert_resumed_exactly(straight, killed, 5, 10, run(killed))


def test_new_data_starts_over_instead_of_resuming(job, rows, tiny_model_dir):
    """A rerun on the same data resumes at the last checkpoint; a rerun after the prepared data
    (or the teacher targets) changed trains from step 0 instead of exporting the old model."""
    cfg = job("data")
    run(cfg)
    assert run(cfg)["return_value"]["start_step"] == 6  # same data: nothing left to train
    shutil.rmtree(layout.prepared_dir(cfg))
    write_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows[:-8])  # other rows: another manifest
    again = run(cfg)
    assert again["return_value"]["start_step"] == 0
    assert [x["step"] for x in metrics(cfg)] == list(range(1, 7))


def test_pipeline_skips_train_only_while_its_export_exists(job):
    """`raydapt run` skips an up-to-date train stage, but not once its export was deleted."""
    import dataclasses

    from raydapt import pipeline

    cfg = dataclasses.replace(job("pipe"), stages=["train"])
    status = lambda: [s["status"] for s in pipeline.run(cfg)["stages"]]  # noqa: E731
    assert status() == ["ran"]
    assert status() == ["skipped (up to date)"]
    shutil.rmtree(layout.export_dir(cfg))
    assert status() == ["ran"] and (layout.export_dir(cfg) / "config.json").is_file()


# ----------------------------------------------------------------------------- bad input


def test_lora_target_matching_nothing(job):
    cfg = job(mode="lora", lora_targets=["q_proj", "query_key_value"])
    with pytest.raises(UserError, match=r"query_key_value.*q_proj"):
        run(cfg)


def test_missing_prepared_and_targets(tmp_path, tiny_model_dir, job):
    cfg = make_job(tmp_path / "empty", tiny_model_dir)
    from raydapt.train.launch import make_plan

    with pytest.raises(UserError, match="raydapt prepare"):
        make_plan(cfg)
    cfg = job("nt", mode="distill", teacher="offline")
    with pytest.raises(UserError, match="raydapt teach"):
        make_plan(cfg)


def test_targets_incompatible(job, teacher_dir, rows):
    from raydapt.train.launch import make_plan
    from raydapt.teach.reference import score_topk

    cfg = job(mode="distill", teacher="offline", kd_k=4)
    table = pa.table({"id": [r[0] for r in rows[:8]], "input_ids": [r[1] for r in rows[:8]],
                      "loss_mask": [r[2] for r in rows[:8]]})
    score_topk(teacher_dir, table, k=8, out=layout.targets_dir(cfg))
    with pytest.raises(UserError, match="top-8 but train.kd_k=4"):
        make_plan(cfg)
    mpath = layout.targets_dir(cfg) / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "k": 4, "tokenizer_hash": "0123456789abcdef"}))
    with pytest.raises(UserError, match="tokenizer 0123456789abcdef"):
        make_plan(cfg)


def test_seq_len_above_max_positions(tmp_path, tiny_model_dir, rows, ray_cluster):
    from raydapt.train.launch import make_plan

    cfg = make_job(tmp_path / "long", tiny_model_dir)
    write_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows[:40], n_val=8, seq_len=1024)
    with pytest.raises(UserError, match="seq_len=1024 exceed.*max_position_embeddings=512"):
        make_plan(cfg)


def test_online_teacher_vocab_mismatch(job, world_dir, tmp_path):
    from raydapt.models import init_model
    from raydapt.train.launch import make_plan

    other = init_model("tiny", world_dir / "train.jsonl", tmp_path / "other", vocab_size=280)
    cfg = job(mode="distill", teacher="online", teacher_model={"path": str(other)})
    with pytest.raises(UserError, match=r"vocab_size=\d+ but the student has vocab_size=\d+"):
        make_plan(cfg)


def test_incompatible_and_incomplete_checkpoint(job):
    from raydapt.train.launch import make_plan

    cfg = job("ck", max_steps=2, checkpoint_every=1, eval_every=0)
    run(cfg)
    lora = job("ck", mode="lora", max_steps=2)
    with pytest.raises(UserError, match="incompatible run"):
        make_plan(lora)
    latest = layout.train_dir(cfg) / "checkpoints" / "checkpoint_000002"
    (latest / ".metadata").unlink()
    with pytest.raises(UserError, match="incomplete"):
        make_plan(cfg)
    fresh = job("ck", mode="lora", max_steps=2, resume=False)
    make_plan(fresh)  # resume=false starts over: the old checkpoints are gone
    assert not (layout.train_dir(cfg) / "checkpoints").exists()


# ----------------------------------------------------------------------------- FSDP parity


def _parity_worker(rank: int, world: int, model_dir: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from raydapt.config import TrainConfig
    from raydapt.train import loop
    from raydapt.train.fsdp import shard_model
    from raydapt.train.modes import build_student

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.use_deterministic_algorithms(True)
    tc = TrainConfig(grad_clip=0.0)
    model = shard_model(build_student(model_dir, tc, seed=0))
    params = list(model.parameters())
    optim = torch.optim.SGD(params, lr=1.0)  # params_after = params_before - grad
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    batch = torch.load(Path(out).parent / "batch.pt")  # global batch (B, T); rank takes its half
    b = {k: v[rank::world] for k, v in batch.items()}
    m = loop.train_step(model, None, optim, sched, [b], tc, params, torch.device("cpu"))
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"metrics": m, "params": full}, out)
    if world > 1:
        dist.destroy_process_group()


def test_fsdp_two_ranks_match_one_process(tiny_model_dir, rows, tmp_path):
    """Same global batch, same loss and same gradients (SGD lr=1) within 1e-5 in fp32."""
    import torch.multiprocessing as mp

    from raydapt.config import TrainConfig
    from raydapt.train.data import collate
    from raydapt.train.modes import load_student

    table = pa.table({"id": [r[0] for r in rows[:8]], "input_ids": [r[1] for r in rows[:8]],
                      "loss_mask": [r[2] for r in rows[:8]]})
    batch = collate(table, np.arange(8), 0)
    batch["loss_mask"][1, 5:] = 0  # uneven token counts across ranks
    torch.save(batch, tmp_path / "batch.pt")
    mp.spawn(_parity_worker, args=(2, str(tiny_model_dir), str(tmp_path / "pg"), str(tmp_path / "two.pt")), nprocs=2)
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
