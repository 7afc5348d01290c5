"""Training throughput: raydapt (Ray Train, 1 FSDP2 worker) vs a plain PyTorch loop.

Both train the same model (a preset Llama built here), on the same rows, with the same
batch, AdamW settings and number of steps, in processes holding the same Ray CPU share
(the plain loop runs as a Ray task with num_cpus = train.cpus_per_worker, so both see the
same thread count). The plain loop's batches are collated before timing: it is the
ceiling. Like with like, the plain loop computes the loss raydapt computes (the chunked
next-token CE of `raydapt.train.objective.NextToken`, which never holds the whole logits);
a second plain loop with the textbook `model(...).logits` + cross-entropy is printed and
recorded for reference, since that is what most hand-written loops do. Tokens/s counts the
positions the loss uses, per step, median over the steps after `--skip` warm-up steps;
each side is run `--runs` times (interleaved) and the medians are compared.
Goal: raydapt / plain >= 0.9.

    .venv/bin/python bench/train.py                     # tiny preset, batch 16, seq 128, 30 steps
    .venv/bin/python bench/train.py --preset small --runs 3 --kd-memory
    .venv/bin/python bench/train.py --model runs/smollm2-distill/models/student --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYDAPT_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _results import record  # noqa: E402 - bench/ is the script's folder


def build(root: Path, preset: str, seq_len: int, n_rows: int, model: str = ""):
    """A model (the preset built here, or `model`) and `n_rows` full rows of `seq_len` tokens:
    the world's text through the model's tokenizer, packed end to end."""
    from builders import write_train_prepared

    from raydapt.models import init_model, load_tokenizer
    from raydapt.world import write_world

    write_world(root / "world", n_train=n_rows * 4, n_heldout=20, n_markov=n_rows, seed=0)
    corpus = root / "world" / "train.jsonl"
    model_dir = Path(model) if model else init_model(preset, corpus, root / "model")
    tok = load_tokenizer(model_dir)
    stream: list[int] = []
    for line in corpus.read_text().splitlines():
        r = json.loads(line)
        text = r.get("text") or (r["prompt"] + "\n" + r["response"])
        stream += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    rows = [
        (f"r{i:05d}", stream[i * seq_len : (i + 1) * seq_len], [1] * (seq_len - 1) + [0], -1)
        for i in range(min(n_rows, len(stream) // seq_len))
    ]
    return model_dir, rows, write_train_prepared


def plain_loop(
    model_dir: str, batches: list, lr: float, betas: list, skip: int, loss_kind: str = "chunked"
) -> dict:
    """The baseline: load, AdamW, forward/backward/step, nothing else.

    loss_kind "chunked": raydapt's own next-token objective (pure torch, no Ray), so the
    comparison measures the Ray Train and FSDP2 wrapping, not the loss; "logits": the whole
    logits and `ce_loss`, as a hand-written loop would.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from raydapt.train.losses import ce_loss
    from raydapt.train.objective import NextToken

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas))
    objective = NextToken()
    rates = []
    for b in batches:
        t0 = time.perf_counter()
        if loss_kind == "chunked":
            loss, _ = objective(model, b)
        else:
            loss = ce_loss(
                model(input_ids=b["input_ids"], use_cache=False).logits,
                b["input_ids"],
                b["loss_mask"],
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(float((b["loss_mask"][:, :-1] > 0).sum()) / (time.perf_counter() - t0))
    return {
        "tokens_per_s": statistics.median(rates[skip:]),
        "threads": torch.get_num_threads(),
        "loss": float(loss),
    }


def raydapt_run(cfg, skip: int) -> dict:
    from raydapt import layout, train

    t0 = time.perf_counter()
    train.run(train.plan(cfg))
    wall = time.perf_counter() - t0
    m = [json.loads(x) for x in (layout.train_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in m[skip:-1]]  # the last step also evaluates
    return {"tokens_per_s": statistics.median(rates), "wall_s": wall, "loss": m[-1]["loss"]}


def _params(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (6 x params x tokens: the FLOPs a step
    spends on weights; attention's own T^2 term is left out, so the figure is a floor)."""
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--model", default="", help="a model folder instead of the preset (e.g. a pruned SmolLM2)"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--peak-gflops",
        type=float,
        default=160.0,
        help="this CPU's fp32 peak on 2 threads (140-175 GFLOP/s measured): the GFLOP/s fraction",
    )
    ap.add_argument(
        "--cpus", type=float, default=2.0, help="train.cpus_per_worker and the baseline's num_cpus"
    )
    ap.add_argument(
        "--kd-memory", action="store_true", help="also run bench/kd_memory.py (quick shape)"
    )
    a = ap.parse_args()

    import pyarrow as pa
    import ray

    from raydapt import layout
    from raydapt.config import job_from_dict
    from raydapt.rows import collate
    from raydapt.train.data import micro_batch_rows

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model, rows, write_prepared = build(root, a.preset, a.seq_len, max(400, a.batch * 8), a.model)
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=1 << 30)
    train = {
        "num_workers": 1,
        "cpus_per_worker": a.cpus,
        "batch_size": a.batch,
        "max_steps": a.steps,
        "warmup_steps": 2,
        "eval_every": 0,
        "checkpoint_every": 0,
        "lr": 1e-3,
        "resume": False,
    }
    # the plain loop gets the same batches raydapt selects (rows sorted by id, seeded order)
    train_rows = sorted(rows[20:], key=lambda r: r[0])
    table = pa.table(
        {
            "id": [r[0] for r in train_rows],
            "input_ids": [r[1] for r in train_rows],
            "loss_mask": [r[2] for r in train_rows],
        }
    )
    batches = [
        collate(table, micro_batch_rows(table.num_rows, 0, g, a.batch, 0, a.batch), 0)
        for g in range(a.steps)
    ]
    remote_plain = ray.remote(num_cpus=a.cpus)(plain_loop)
    ours, base, naive = [], [], []
    for i in range(a.runs):
        cfg = job_from_dict(
            {
                "name": f"bench{i}",
                "output_dir": str(root / f"run{i}"),
                "student": {"path": str(model)},
                "train": train,
            }
        )
        if i == 0:
            write_prepared(layout.prepared_dir(cfg), model, rows, n_val=20, seq_len=a.seq_len)
        else:
            layout.prepared_dir(cfg).parent.mkdir(parents=True)
            os.symlink(root / "run0" / "prepared", layout.prepared_dir(cfg))
        ours.append(raydapt_run(cfg, a.skip))
        base.append(ray.get(remote_plain.remote(str(model), batches, 1e-3, [0.9, 0.95], a.skip)))
        naive.append(
            ray.get(remote_plain.remote(str(model), batches, 1e-3, [0.9, 0.95], a.skip, "logits"))
        )
        print(
            f"run {i}: raydapt {ours[-1]['tokens_per_s']:.0f} tok/s "
            f"(loss {ours[-1]['loss']:.4f}, wall "
            f"{ours[-1]['wall_s']:.1f}s) | plain, same loss {base[-1]['tokens_per_s']:.0f} tok/s "
            f"(loss {base[-1]['loss']:.4f}, {base[-1]['threads']} threads) | "
            f"plain, whole logits {naive[-1]['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    params = _params(Path(model))
    r = statistics.median(x["tokens_per_s"] for x in ours)
    p = statistics.median(x["tokens_per_s"] for x in base)
    q = statistics.median(x["tokens_per_s"] for x in naive)
    name = Path(a.model).name if a.model else a.preset
    peak = a.peak_gflops
    summary = {
        "model": a.model or a.preset,
        "params": params,
        "raydapt_gflops": round(6 * params * r / 1e9, 1),
        "plain_gflops": round(6 * params * p / 1e9, 1),
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "runs": a.runs,
        "raydapt_tokens_per_s": round(r),
        "plain_tokens_per_s": round(p),
        "plain_whole_logits_tokens_per_s": round(q),
        "ratio": round(r / p, 3),
        "ratio_vs_whole_logits": round(r / q, 3),
        "goal": ">= 0.9",
        "raydapt_fraction_of_peak": round(6 * params * r / 1e9 / peak, 3),
        "plain_fraction_of_peak": round(6 * params * p / 1e9 / peak, 3),
        "peak_gflops": peak,
    }
    print(json.dumps(summary, indent=2))
    record(
        "train",
        [
            (f"{name}: raydapt / plain loop, tokens/s", r / p, ">= 0.9"),
            (f"{name}: raydapt / plain loop with whole logits, tokens/s", r / q, ""),
            (f"{name}: raydapt GFLOP/s", summary["raydapt_gflops"], ""),
            (f"{name}: plain loop GFLOP/s", summary["plain_gflops"], ""),
            (f"{name}: raydapt fraction of fp32 peak", summary["raydapt_fraction_of_peak"], ""),
            (f"{name}: plain loop fraction of fp32 peak", summary["plain_fraction_of_peak"], ""),
        ],
        {
            k: summary[k]
            for k in ("model", "params", "batch", "seq_len", "steps", "runs", "peak_gflops")
        },
    )
    ray.shutdown()
    kd = Path(__file__).with_name("kd_memory.py")
    if a.kd_memory and kd.is_file():
        subprocess.run(
            [sys.executable, str(kd), "--B", "2", "--T", "256", "--V", "8000", "--runs", "1"],
            check=False,
        )


if __name__ == "__main__":
    main()
