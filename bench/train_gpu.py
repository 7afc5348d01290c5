"""GPU checks of the train loop: FSDP2 on nccl with bf16 mixed precision, 1 GPU, no Ray.

Runs raydapt's own pieces (modes.build_student, fsdp.shard_model, loop.train_step,
checkpoint.full_state_dict) on a random ~100M-parameter Llama, against a plain PyTorch
loop (autocast bf16, no FSDP) on the same batches: tokens/s of each and the ratio, bf16
vs fp32 loss agreement, activation checkpointing memory. Prints one JSON line.

    # on a CUDA machine (needs torch, transformers, peft, pyarrow, yaml)
    python bench/train_gpu.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def make_model(out: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def batches(n: int, b: int, t: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 32000, (b, t), generator=g)
        ids[:, 1::2] = ids[:, ::2]  # learnable structure: every odd token repeats the previous one
        mask = torch.ones(b, t)
        mask[:, -1] = 0
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def run_raydapt(path: str, data: list[dict], precision: str, ac: bool, min_world: int = 1) -> dict:
    from raydapt.config import TrainConfig
    from raydapt.train import checkpoint, fsdp, loop, modes
    from raydapt.train.objective import build_objective

    tc = TrainConfig(
        precision=precision,
        use_gpu=True,
        lr=1e-3,
        warmup_steps=1,
        max_steps=len(data),
        activation_checkpointing=ac,
    )
    dev = fsdp.device_for(True)
    model = modes.build_student(path, tc, 0).to(dev)
    model = fsdp.shard_model(model, fsdp.mixed_precision(precision, True), min_world=min_world)
    params = modes.trainable(model)
    optim = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: loop.lr_factor(s, tc))
    objective = build_objective(tc)
    torch.cuda.reset_peak_memory_stats()
    rates, losses = [], []
    for b in data:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = loop.train_step(model, objective, optim, sched, [b], tc, params, dev)
        torch.cuda.synchronize()
        rates.append(m["tokens"] / (time.perf_counter() - t0))
        losses.append(m["loss"])
    sd = checkpoint.full_state_dict(model)
    return {
        "tokens_per_s": statistics.median(rates[3:] or rates),
        "losses": losses,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "state_dict_keys": len(sd),
        "sharded": type(model).__name__,
    }


def run_plain(path: str, data: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM

    from raydapt.train.losses import ce_loss

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    rates, losses = [], []
    for b in data:
        b = {k: v.cuda() for k, v in b.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=b["input_ids"], use_cache=False).logits
        loss = ce_loss(logits, b["input_ids"], b["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        rates.append(float(b["loss_mask"][:, :-1].sum()) / (time.perf_counter() - t0))
        losses.append(float(loss))
    return {"tokens_per_s": statistics.median(rates[3:] or rates), "losses": losses}


def main() -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    path = make_model(Path(tempfile.mkdtemp()) / "m")
    data = batches(15, 8, 1024)
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "backend": dist.get_backend(),
    }
    bf16 = run_raydapt(path, data, "bf16", ac=False)
    fp32 = run_raydapt(path, data[:3], "fp32", ac=False)
    ac = run_raydapt(path, data[:5], "bf16", ac=True)
    plain = run_plain(path, data)
    unsharded = run_raydapt(
        path, data, "bf16", ac=False, min_world=2
    )  # what 1 worker runs by default
    out.update(
        {
            "raydapt_bf16_tokens_per_s": round(bf16["tokens_per_s"]),
            "plain_bf16_tokens_per_s": round(plain["tokens_per_s"]),
            "ratio_fsdp_1gpu": round(bf16["tokens_per_s"] / plain["tokens_per_s"], 3),
            "raydapt_1worker_default_tokens_per_s": round(unsharded["tokens_per_s"]),
            "ratio_1worker_default": round(unsharded["tokens_per_s"] / plain["tokens_per_s"], 3),
            "unsharded_losses": [round(x, 4) for x in unsharded["losses"]],
            "bf16_losses": [round(x, 4) for x in bf16["losses"]],
            "plain_losses": [round(x, 4) for x in plain["losses"]],
            "fp32_first_loss": round(fp32["losses"][0], 5),
            "bf16_first_loss": round(bf16["losses"][0], 5),
            "peak_gib_bf16": round(bf16["peak_gib"], 2),
            "peak_gib_bf16_activation_ckpt": round(ac["peak_gib"], 2),
            "state_dict_keys": bf16["state_dict_keys"],
            "sharded_type": bf16["sharded"],
            "bf16_loss_decreased": bf16["losses"][-1] < bf16["losses"][0] - 0.5,
            "bf16_vs_fp32_first_loss_rel": abs(bf16["losses"][0] - fp32["losses"][0])
            / fp32["losses"][0],
        }
    )
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
