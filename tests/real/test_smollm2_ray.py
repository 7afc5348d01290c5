"""A real pretrained LLM through every stage: SmolLM2-135M-Instruct from its packaged GGUF.

One short job, run once by a module fixture (about 3 minutes on 2 cores): the world's open
instructions rendered with SmolLM2's chat template; the vLLM teacher pool answers and scores
them at top-64 over the 49,152-token vocabulary; a 2-layer student pruned from the teacher
trains 3 KD steps on 2 FSDP2 workers; teacher answers to held-out prompts score both models.
The claims here are the ones a toy model cannot make: a real BPE vocabulary, a chat template
and its end-of-turn token, tied embeddings and grouped-query attention.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import final_table, train_metrics

from raydapt import layout
from raydapt.config import job_from_dict
from raydapt.models import load_tokenizer
from raydapt.pipeline import derived, run_stage
from raydapt.prune import pruned_record
from raydapt.targets import decode_row_topk
from raydapt.teach.hf_backend import HFBackend
from raydapt.teach.spec import ActorSpec

pytestmark = pytest.mark.slow
K = 64
EOS = 2  # <|im_end|>: SmolLM2-Instruct's eos is its end-of-turn token


@pytest.fixture(scope="module")
def real(smollm2_dir, tmp_path_factory, ray_session):
    ray_session()
    out = tmp_path_factory.mktemp("smollm2")
    job = job_from_dict(
        {
            "output_dir": str(out),
            "corpus": {"source": "world", "world_tasks": ["instruct"], "world_train": 24},
            "teacher": {"path": str(smollm2_dir), "preset": ""},
            "student": {"init": "prune", "keep_layers": [0, 29], "preset": ""},
            "prepare": {"seq_len": 128, "val_fraction": 0.25},
            "teach": {
                "kind": "generate+score",
                "k": K,
                "max_tokens": 16,
                "temperature": 0.7,
                "batch_size": 8,
                "max_model_len": 256,
            },
            "train": {
                "mode": "distill",
                "kd_alpha": 1.0,
                "num_workers": 2,
                "batch_size": 4,
                "max_steps": 3,
                "warmup_steps": 1,
                "lr": 3e-4,
            },
        }
    )
    res = {"job": job, "prepare": run_stage("prepare", job), "teach": run_stage("teach", job)}
    heldout = derived(job, "heldout", teach={"split": "validation"})
    res["heldout"] = run_stage("teach", heldout)
    res["train"] = run_stage("train", job)
    targets = str(layout.targets_dir(heldout))
    evaluated = job_from_dict({**job.to_dict(), "eval": {"teacher_targets": targets}})
    res["eval"] = {
        name: run_stage("eval", evaluated, model_dir=model, name=name)
        for name, model in (("teacher", smollm2_dir), ("student", layout.export_dir(job)))
    }
    res["heldout_cfg"] = heldout
    return res


def test_prompts_are_rendered_with_the_models_chat_template(real, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    prompts = pq.read_table(layout.prepared_dir(real["job"]) / "prompts").to_pylist()
    assert real["prepare"]["prompts"] + real["prepare"]["prompts_validation"] == len(prompts) > 0
    text = tok.decode(prompts[0]["prompt_ids"])
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{prompts[0]['prompt']}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_teacher_answers_and_scores_over_the_real_vocabulary(real, smollm2_dir):
    manifest, table = final_table(real["job"])
    assert manifest["k"] == K and table.num_rows == real["prepare"]["prompts"]
    assert table.schema.field("topk_ids").type.value_type.value_type.bit_width == 16  # uint16
    rows = table.to_pylist()
    assert any(r["response_ids"][-1] == EOS for r in rows) or all(
        len(r["response_ids"]) == 16 for r in rows
    )
    # vLLM's stored top-64 against transformers' log_softmax of the same sequences
    seqs = [np.asarray(r["input_ids"], np.int64) for r in rows[:4]]
    ref = HFBackend(ActorSpec(model=str(smollm2_dir), dtype="float32", k=K)).score(seqs)
    for i, (r_ids, r_lps) in enumerate(ref):
        ids, lps = decode_row_topk(table, i)
        mask = np.asarray(rows[i]["loss_mask"], bool)
        np.testing.assert_allclose(lps[mask][:, :8], r_lps[mask][:, :8], atol=2e-2)
        assert (ids[mask][:, 0] == r_ids[mask][:, 0]).mean() > 0.9


def test_pruned_student_trains_on_two_fsdp_workers(real, smollm2_dir):
    from transformers import AutoModelForCausalLM

    job = real["job"]
    record = pruned_record(layout.models_dir(job) / "student")
    assert record["kept_layers"] == [0, 29] and record["teacher_layers"] == 30
    export = layout.export_dir(job)
    config = json.loads((export / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    metrics = train_metrics(job)
    assert metrics[-1]["step"] == 3 and np.isfinite(metrics[-1]["loss"])
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.model.embed_tokens.weight is model.lm_head.weight  # still tied after FSDP


def test_fsdp_two_workers_match_one_process_on_this_architecture(real):
    """Tied embeddings and grouped-query attention under FSDP2: 2 workers x batch 4 take the
    same steps as one process x batch 8 on the same rows."""
    job = real["job"]
    local = derived(
        job, "local", share=("prepared", "targets"), train={"num_workers": 0, "batch_size": 8}
    )
    run_stage("train", local)
    a, b = train_metrics(job), train_metrics(local)
    train_steps = [(x["step"], x["loss"], x["tokens"]) for x in a if "loss" in x]
    local_steps = [(x["step"], x["loss"], x["tokens"]) for x in b if "loss" in x]
    assert len(train_steps) == len(local_steps) == 3
    for (s1, l1, t1), (s2, l2, t2) in zip(train_steps, local_steps, strict=True):
        assert s1 == s2 and t1 == t2
        assert abs(l1 - l2) < 1e-3 * max(1.0, abs(l2)), (s1, l1, l2)


def test_agreement_with_the_teacher_on_held_out_answers(real):
    manifest, _ = final_table(real["heldout_cfg"])
    assert manifest["split"] == "validation"
    teacher, student = real["eval"]["teacher"], real["eval"]["student"]
    # the teacher against its own vLLM scores: only float16 storage and kernels differ
    assert teacher["teacher_kl"] < 0.02 and teacher["top1_agreement"] > 0.95
    assert student["teacher_kl"] > 10 * teacher["teacher_kl"]
    assert student["teacher_nll"] > teacher["teacher_nll"]
    assert 0 <= student["top1_agreement"] < teacher["top1_agreement"]


def test_served_chat_uses_the_template_and_stops_at_end_of_turn(
    smollm2_dir, tmp_path_factory, ray_session
):
    """The official openai client against Ray Serve on the imported model: the chat template
    is applied server-side and generation stops at <|im_end|>, which never leaks into text."""
    from builders import free_port
    from openai import OpenAI
    from ray import serve

    ray_session()
    cfg = job_from_dict(
        {
            "output_dir": str(tmp_path_factory.mktemp("serve_real")),
            "serve": {"name": "smollm2", "port": free_port(), "max_model_len": 256},
        }
    )
    url = run_stage("serve", cfg, model_dir=str(smollm2_dir), block=False)["url"]
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=48,
            temperature=0,
        )
    finally:
        serve.shutdown()
    answer = r.choices[0].message.content
    assert "Paris" in answer and "<|im_end|>" not in answer and "<|im_start|>" not in answer
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 48
