"""Benchmark: the `raydapt teach` pool against raw vLLM in one process and HF transformers.

Same `small` preset model, same rows and prompts, same sampling parameters (each sample
seeded as the pool seeds it, so raw vLLM draws the very same tokens). Measured:

- generation output tokens/s: raydapt pool (1 actor) vs `LLM.generate` vs HF `generate`;
- score throughput (tokens/s with top-k prompt logprobs): pool vs `LLM.generate(prompt_logprobs=k)`
  vs HF forward + log_softmax + topk;
- bytes per token of the targets at k=16 (goal <= 100).

Pool numbers exclude the engine start (it happens once per actor and is reported apart): they
are the median per-batch rate measured inside the actor (engine + conversion to dense arrays
+ the parquet part write), and the whole-run rate from the first batch start to the last
batch end, which adds Ray Data's hand-offs. The raw vLLM baseline is timed per batch of the
same size; medians over batches. Goal: pool >= 0.9x raw vLLM.

    .venv/bin/python bench/teacher.py                 # about 5 minutes on 2 cores
    .venv/bin/python bench/teacher.py --rows 64 --prompts 32 --out runs/teacher_bench.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K = 16
SEQ = 128


def setup(work: Path, n_rows: int, n_prompts: int) -> Path:
    """A world, a `small` model and a prepared folder (rows packed to SEQ tokens, prompts)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydapt.models import init_model, load_tokenizer, tokenizer_hash
    from raydapt.storage import finish_manifest
    from raydapt.world import write_world

    model = work / "model"
    if not (model / "config.json").exists():
        write_world(work / "world", n_train=2000, n_heldout=10, n_markov=10, seed=0)
        init_model("small", work / "world" / "train.jsonl", model)
    tok = load_tokenizer(model)
    pairs = [json.loads(x) for x in open(work / "world" / "train.jsonl")]
    pairs = [p for p in pairs if isinstance(p.get("prompt"), str)]
    stream = [
        t
        for p in pairs
        for t in tok(p["prompt"] + " " + p["response"], add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    ]
    seqs = [np.asarray(stream[i * SEQ : (i + 1) * SEQ], np.int32) for i in range(n_rows)]
    prepared = work / "out" / "prepared"
    (prepared / "train").mkdir(parents=True, exist_ok=True)
    (prepared / "prompts").mkdir(exist_ok=True)
    mask = np.r_[np.ones(SEQ - 1, np.uint8), 0]
    pq.write_table(
        pa.table(
            {
                "id": [
                    hashlib.sha256(s.tobytes()).hexdigest()[:16] + str(i)
                    for i, s in enumerate(seqs)
                ],
                "input_ids": pa.array(seqs, pa.list_(pa.int32())),
                "loss_mask": pa.array([mask] * n_rows, pa.list_(pa.uint8())),
                "label": pa.array([-1] * n_rows, pa.int32()),
            }
        ),
        prepared / "train" / "part-00000.parquet",
    )
    prompts = [p["prompt"] for p in pairs[-n_prompts:]]
    ids = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    pq.write_table(
        pa.table(
            {
                "id": [
                    hashlib.sha256(f"{i}:{p}".encode()).hexdigest()[:16]
                    for i, p in enumerate(prompts)
                ],
                "prompt": prompts,
                "prompt_ids": pa.array(ids, pa.list_(pa.int32())),
                "answer": [None] * len(prompts),
            }
        ),
        prepared / "prompts" / "part-00000.parquet",
    )
    finish_manifest(
        prepared,
        {
            "fingerprint": "bench",
            "seq_len": SEQ,
            "tokenizer_path": str(model),
            "tokenizer_hash": tokenizer_hash(tok),
            "rows": {"train": n_rows, "validation": 0},
        },
    )
    return model


def gen_params(args):
    from raydapt.teach.spec import Sampling

    return Sampling(n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0)


def batches(table, bs: int) -> list:
    return [table.slice(i, bs) for i in range(0, table.num_rows, bs)]


def raw_vllm(model: Path, prepared: Path, args) -> dict:
    """Plain vLLM in this process: `LLM.generate` per batch, timed per batch."""
    import pyarrow.parquet as pq
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from raydapt.teach.convert import row_seed, sample_id

    t0 = time.perf_counter()
    llm = LLM(
        model=str(model),
        dtype=args.dtype,
        max_model_len=512,
        max_logprobs=K,
        enforce_eager=True,
        seed=0,
    )
    init_s = time.perf_counter() - t0
    g = gen_params(args)
    gen_rates, gen_tokens = [], 0
    for b in batches(pq.read_table(prepared / "prompts"), args.batch_size):
        reqs = [TokensPrompt(prompt_token_ids=p) for p in b.column("prompt_ids").to_pylist()]
        sps = [
            SamplingParams(
                temperature=g.temperature,
                top_p=g.top_p,
                max_tokens=g.max_tokens,
                seed=row_seed(0, sample_id(pid, 0)),
            )
            for pid in b.column("id").to_pylist()
        ]
        t = time.perf_counter()
        outs = llm.generate(reqs, sps, use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        gen_rates.append(n / (time.perf_counter() - t))
        gen_tokens += n
    score_rates = []
    sp = SamplingParams(max_tokens=1, prompt_logprobs=K)
    for b in batches(pq.read_table(prepared / "train"), args.batch_size):
        reqs = [TokensPrompt(prompt_token_ids=p) for p in b.column("input_ids").to_pylist()]
        t = time.perf_counter()
        llm.generate(reqs, sp, use_tqdm=False)
        score_rates.append(
            sum(len(r["prompt_token_ids"]) for r in reqs) / (time.perf_counter() - t)
        )
    del llm
    return {
        "init_s": init_s,
        "gen_tok_s": statistics.median(gen_rates),
        "gen_tokens": gen_tokens,
        "score_tok_s": statistics.median(score_rates),
    }


def pool(work: Path, model: Path, args) -> dict:
    from raydapt.cluster import connect
    from raydapt.config import job_from_dict
    from raydapt.pipeline import run_stage

    res = {}
    for kind in ("generate", "score"):
        out = work / "out"
        import shutil

        shutil.rmtree(out / "targets", ignore_errors=True)
        cfg = job_from_dict(
            {
                "name": "bench",
                "output_dir": str(out),
                "teacher": {"path": str(model), "dtype": args.dtype},
                "student": {"path": str(model)},
                "teach": {
                    "kind": kind,
                    "k": K,
                    "batch_size": args.batch_size,
                    "max_model_len": 512,
                    "max_tokens": args.max_tokens,
                    "temperature": 1.0,
                    "seed": 0,
                },
            }
        )
        connect(cfg.cluster)
        t = time.perf_counter()
        m = run_stage("teach", cfg)
        p = m["pool"]
        res[kind] = {
            "median_batch_tok_s": statistics.median(p["batch_tokens_per_s"]),
            "span_tok_s": m["computed_tokens"] / p["span_s"],
            "stage_s": time.perf_counter() - t,
            "tokens": m["computed_tokens"],
            "bytes_per_token": m["bytes_per_token"],
        }
        if kind == "generate":  # output tokens only: total minus the prompts
            import pyarrow.parquet as pq

            files = sorted((out / "targets").glob("targets-*.parquet"))
            n_out = sum(
                len(x)
                for f in files
                for x in pq.read_table(f, columns=["response_ids"]).column(0).to_pylist()
            )
            frac = n_out / m["computed_tokens"]
            res[kind].update(
                out_tokens=n_out,
                median_batch_tok_s=res[kind]["median_batch_tok_s"] * frac,
                span_tok_s=res[kind]["span_tok_s"] * frac,
            )
    return res


def hf(model: Path, prepared: Path, args) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from raydapt.teach.hf_backend import HFBackend
    from raydapt.teach.spec import ActorSpec

    be = HFBackend(ActorSpec(model=str(model), dtype=args.dtype, k=K))
    prompts = pq.read_table(prepared / "prompts").slice(0, args.hf_prompts)
    t = time.perf_counter()
    outs = be.generate(
        prompts.column("prompt_ids").to_pylist(),
        [[i] for i in range(prompts.num_rows)],
        gen_params(args),
    )
    gen = sum(len(s[0][0]) for s in outs) / (time.perf_counter() - t)
    rates = []
    for b in batches(pq.read_table(prepared / "train"), args.batch_size):
        seqs = [np.asarray(x) for x in b.column("input_ids").to_pylist()]
        t = time.perf_counter()
        be.score(seqs)
        rates.append(sum(map(len, seqs)) / (time.perf_counter() - t))
    return {"gen_tok_s": gen, "score_tok_s": statistics.median(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=192, help="score rows of 128 tokens")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--hf-prompts", type=int, default=8, help="HF generate is slow: fewer prompts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", default="runs/raydapt-bench-teacher")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.work)
    model = setup(work, args.rows, args.prompts)
    prepared = work / "out" / "prepared"
    raw = raw_vllm(model, prepared, args)
    ours = pool(work, model, args)
    ref = hf(model, prepared, args)
    g, s = ours["generate"], ours["score"]
    report = {
        "raw_vllm": raw,
        "raydapt": ours,
        "hf": ref,
        "gen_ratio_batch": g["median_batch_tok_s"] / raw["gen_tok_s"],
        "gen_ratio_span": g["span_tok_s"] / raw["gen_tok_s"],
        "score_ratio_batch": s["median_batch_tok_s"] / raw["score_tok_s"],
        "score_ratio_span": s["span_tok_s"] / raw["score_tok_s"],
        "hf_gen_ratio": ref["gen_tok_s"] / raw["gen_tok_s"],
        "hf_score_ratio": ref["score_tok_s"] / raw["score_tok_s"],
        "bytes_per_token_k16": s["bytes_per_token"],
    }
    print(json.dumps(report, indent=2))
    print(
        f"\ngenerate tok/s: raw vLLM {raw['gen_tok_s']:.0f} | "
        f"raydapt per-batch {g['median_batch_tok_s']:.0f} "
        f"({report['gen_ratio_batch']:.2f}x), whole run {g['span_tok_s']:.0f} "
        f"({report['gen_ratio_span']:.2f}x) | "
        f"HF {ref['gen_tok_s']:.0f} ({report['hf_gen_ratio']:.2f}x)"
    )
    print(
        f"score tok/s:    raw vLLM {raw['score_tok_s']:.0f} | "
        f"raydapt per-batch {s['median_batch_tok_s']:.0f} "
        f"({report['score_ratio_batch']:.2f}x), whole run {s['span_tok_s']:.0f} "
        f"({report['score_ratio_span']:.2f}x) | "
        f"HF {ref['score_tok_s']:.0f} ({report['hf_score_ratio']:.2f}x)"
    )
    print(f"targets at k={K}: {s['bytes_per_token']:.1f} bytes/token (goal <= 100)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
