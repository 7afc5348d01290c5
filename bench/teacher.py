"""Benchmark: the `raydapt teach` pool against raw vLLM in one process and HF transformers.

Same `small` preset model, same rows and prompts, same sampling parameters (each sample
seeded as the pool seeds it, so raw vLLM draws the very same tokens). Measured:

- generation output tokens/s: raydapt pool (1 actor) vs `LLM.generate` vs HF `generate`;
- score throughput (tokens/s with top-k prompt logprobs): pool vs `LLM.generate` with the
  pool's own request (`prompt_logprobs=k`, `logprobs=k`, flat lists, no detokenizing) vs
  HF forward + log_softmax + topk;
- bytes per token of the targets at k=16 (goal <= 100).

Like with like: the raw engine is the `vllm.LLM` the pool's actor builds, with the settings
of the pool's own `ActorSpec` (`raydapt.teach.stage.actor_spec`: dtype through
`engine_dtype`, max_model_len, max_logprobs, enforce_eager, seed) and the environment a
teacher actor sees (probed from a Ray actor with the pool's CPUs and env vars: in-process or
multiprocess engine, KV cache, reserved CPUs, OMP/torch threads). Those variables are set in
this process only while the raw engine exists, after the Ray cluster has started, so they
never reach Ray's workers. HF runs in this process with the same threads and dtype. Every
figure is printed with these settings, and the JSON records them.

Pool numbers exclude the engine start (it happens once per actor): they are the median
per-batch rate measured inside the actor (engine + conversion to dense arrays + the parquet
part write), and the whole-run rate from the first batch start to the last batch end, which
adds Ray Data's hand-offs. Raw vLLM and HF are timed per batch of the same size; medians
over batches. Goals (per batch): generation >= 0.9x raw `LLM.generate`; scoring >= 0.9x the
better of raw vLLM and HF forward + top-k.

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
# Ray starts its workers at nice 15, the raw engine here runs at nice 0: on a shared, loaded
# machine that alone skews the comparison, so the pool's workers run at this process's priority
os.environ.setdefault("RAY_worker_niceness", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _probe import probe_actor, scoped_env  # noqa: E402 - bench/ is the script's folder
from _results import record  # noqa: E402 - bench/ is the script's folder

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
        # ~25 tokens a problem: enough text for n_rows full rows of SEQ tokens
        write_world(work / "world", n_train=max(2000, 6 * n_rows), n_heldout=10, n_markov=10)
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
    if len(stream) < n_rows * SEQ:
        raise SystemExit(
            f"{work}: its world has {len(stream) // SEQ} rows of {SEQ} tokens, not {n_rows}; "
            "use another --work folder (the world is built once per folder)"
        )
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


def job(work: Path, model: Path, kind: str, args, actors: int = 1):
    """The job the pool runs; also the source of the raw side's settings."""
    from raydapt.config import job_from_dict

    return job_from_dict(
        {
            "name": "bench",
            "output_dir": str(work / "out"),
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
                "min_actors": actors,
                "max_actors": actors,
            },
        }
    )


def engine_settings(spec, tcfg, env: dict[str, str], threads: int) -> dict:
    multiproc = env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
    return {
        "dtype": spec.dtype,
        "engine": "multiprocess" if multiproc else "in-process",
        "batch_size": int(tcfg.batch_size),
        "enforce_eager": spec.enforce_eager,
        "max_logprobs": max(int(spec.k), 1),
        "max_model_len": spec.max_model_len,
        "kv_cache_gib": env.get("VLLM_CPU_KVCACHE_SPACE", "vLLM default"),
        "reserved_cpus": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM default"),
        "torch_threads": threads,
        "env": dict(sorted(env.items())),
    }


def describe(s: dict) -> str:
    return (
        f"{s['dtype']}, {s['engine']} engine, batch {s['batch_size']}, "
        f"{'eager' if s.get('enforce_eager') else 'compiled'}, "
        f"max_logprobs {s['max_logprobs']}, KV {s['kv_cache_gib']} GiB, "
        f"reserved CPUs {s['reserved_cpus']}, {s['torch_threads']} threads"
    )


def raw_vllm(spec, prepared: Path, args, env: dict[str, str], threads: int) -> dict:
    """Plain `LLM.generate` per batch on the engine a teacher actor builds, in this process.

    The engine is `VLLMBackend(spec).llm`: the very `vllm.LLM(...)` call of the pool, so no
    setting can differ; the timed calls are raw vLLM with the requests the pool sends.
    """
    import pyarrow.parquet as pq
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from raydapt.teach.convert import row_seed, sample_id
    from raydapt.teach.vllm_backend import VLLMBackend

    # vLLM reads its env vars when the engine is built and caches them after; the CPU worker
    # then disables torch.set_num_threads, so the threads are set first
    torch.set_num_threads(threads)
    with scoped_env(env):
        t0 = time.perf_counter()
        llm = VLLMBackend(spec).llm
        init_s = time.perf_counter() - t0
        g = gen_params(args)
        gen_rates, gen_tokens = [], 0
        for b in batches(pq.read_table(prepared / "prompts"), args.batch_size):
            reqs = [TokensPrompt(prompt_token_ids=p) for p in b.column("prompt_ids").to_pylist()]
            sps = [
                SamplingParams(
                    n=1,
                    temperature=g.temperature,
                    top_p=g.top_p,
                    max_tokens=g.max_tokens,
                    seed=row_seed(spec.seed, sample_id(pid, 0)),
                )
                for pid in b.column("id").to_pylist()
            ]
            t = time.perf_counter()
            outs = llm.generate(reqs, sps, use_tqdm=False)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            gen_rates.append(n / (time.perf_counter() - t))
            gen_tokens += n
        # the pool's scoring request: the first T-1 tokens as the prompt plus one sampled token
        # (T positions of top-k logprobs), flat logprob lists, no detokenizing
        sp = SamplingParams(
            max_tokens=1,
            prompt_logprobs=spec.k,
            logprobs=spec.k,
            detokenize=False,
            flat_logprobs=True,
            temperature=1.0,
        )
        score_rates = []
        for b in batches(pq.read_table(prepared / "train"), args.batch_size):
            rows = b.column("input_ids").to_pylist()
            reqs = [TokensPrompt(prompt_token_ids=r[:-1]) for r in rows]
            t = time.perf_counter()
            llm.generate(reqs, sp, use_tqdm=False)
            score_rates.append(sum(map(len, rows)) / (time.perf_counter() - t))
        del llm
    return {
        "init_s": init_s,
        "gen_tok_s": statistics.median(gen_rates),
        "gen_tokens": gen_tokens,
        "score_tok_s": statistics.median(score_rates),
        "torch_threads": torch.get_num_threads(),
    }


def pool(work: Path, model: Path, args, kinds=("generate", "score"), actors: int = 1) -> dict:
    import shutil

    import pyarrow.parquet as pq

    from raydapt.pipeline import run_stage

    res = {}
    for kind in kinds:
        out = work / "out"
        shutil.rmtree(out / "targets", ignore_errors=True)
        cfg = job(work, model, kind, args, actors)
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


def hf(spec, prepared: Path, args) -> dict:
    """HF transformers in this process: the engine's dtype, this process's torch threads."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from raydapt.teach.hf_backend import HFBackend
    from raydapt.teach.spec import ActorSpec

    be = HFBackend(ActorSpec(model=spec.model, dtype=spec.dtype, k=spec.k, backend="hf"))
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
    return {
        "gen_tok_s": gen,
        "score_tok_s": statistics.median(rates),
        "torch_threads": torch.get_num_threads(),
    }


def scaling(work: Path, model: Path, args) -> None:
    """Whole-run scoring throughput of the pool with 1 and 2 actors (1 CPU each).

    The whole-run rate (first batch start to last batch end) is what a corpus sees: it
    includes Ray Data's hand-offs, which per-batch rates leave out. Per-actor figures divide
    by the actors, which on this 2-core machine is also per core.
    """
    from raydapt.cluster import connect

    connect(job(work, model, "score", args).cluster)
    runs: dict[int, dict] = {}
    for n in (1, 2):
        r = pool(work, model, args, kinds=("score",), actors=n)["score"]
        runs[n] = r
        print(
            f"pool scoring, {n} actor(s): whole run {r['span_tok_s']:.0f} tok/s "
            f"({r['span_tok_s'] / n:.0f} per actor), per batch {r['median_batch_tok_s']:.0f}, "
            f"stage {r['stage_s']:.1f} s"
        )
    speedup = runs[2]["span_tok_s"] / runs[1]["span_tok_s"]
    print(f"2 actors / 1 actor, whole run: {speedup:.2f}x (ideal 2.0 on 2 free cores)")
    record(
        "teacher",
        [
            ("scaling: 1 actor, whole-run scoring tok/s", runs[1]["span_tok_s"], ""),
            ("scaling: 2 actors, whole-run scoring tok/s", runs[2]["span_tok_s"], ""),
            ("scaling: 2 actors / 1 actor, whole run", speedup, ""),
        ],
        {"rows": args.rows, "batch_size": args.batch_size, "k": K, "seq": SEQ},
    )
    if args.out:
        Path(args.out).write_text(json.dumps({str(n): r for n, r in runs.items()}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=192, help="score rows of 128 tokens")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--hf-prompts", type=int, default=8, help="HF generate is slow: fewer prompts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--dtype", default="auto", help="teacher.dtype (auto keeps a float32 model in float32)"
    )
    ap.add_argument("--work", default="runs/raydapt-bench-teacher")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="only the pool's scoring, whole run, with 1 then 2 actors (RESULTS' scaling section)",
    )
    args = ap.parse_args()
    work = Path(args.work)
    model = setup(work, args.rows, args.prompts)
    if args.scaling:
        scaling(work, model, args)
        return
    prepared = work / "out" / "prepared"

    from raydapt.cluster import connect
    from raydapt.teach.pool import actor_env
    from raydapt.teach.stage import actor_spec, plan

    cfg = job(work, model, "score", args)
    spec = actor_spec(plan(cfg))  # what each teacher actor is told (dtype, lengths, k, seed)
    tcfg = cfg.teach
    # the cluster starts before any engine env var is set here, so none reaches its workers
    connect(cfg.cluster)
    seen = probe_actor(tcfg.cpus_per_actor, actor_env(tcfg), in_process=True)
    seen_env, threads = seen["env"], seen["torch_threads"]
    settings = engine_settings(spec, tcfg, seen_env, threads)
    raw_settings = dict(settings, env=dict(sorted(seen_env.items())))
    hf_settings = {"dtype": spec.dtype, "batch_size": int(tcfg.batch_size), "torch_threads": 0}

    raw = raw_vllm(spec, prepared, args, seen_env, threads)
    ours = pool(work, model, args)
    ref = hf(spec, prepared, args)
    hf_settings["torch_threads"] = ref["torch_threads"]
    raw_settings["torch_threads"] = raw["torch_threads"]
    g, s = ours["generate"], ours["score"]
    best_name, best = max(
        (("raw vLLM", raw["score_tok_s"]), ("HF forward + top-k", ref["score_tok_s"])),
        key=lambda x: x[1],
    )
    report = {
        "settings": {
            "raydapt": settings,
            "raw_vllm": raw_settings,
            "hf": hf_settings,
            "ray_worker_niceness": os.environ.get("RAY_worker_niceness"),
            "actors": 1,
        },
        "raw_vllm": raw,
        "raydapt": ours,
        "hf": ref,
        "gen_ratio_batch": g["median_batch_tok_s"] / raw["gen_tok_s"],
        "gen_ratio_span": g["span_tok_s"] / raw["gen_tok_s"],
        "score_ratio_batch": s["median_batch_tok_s"] / raw["score_tok_s"],
        "score_ratio_span": s["span_tok_s"] / raw["score_tok_s"],
        "score_vs_hf_batch": s["median_batch_tok_s"] / ref["score_tok_s"],
        "score_best_baseline": best_name,
        "score_vs_best_batch": s["median_batch_tok_s"] / best,
        "score_vs_best_span": s["span_tok_s"] / best,
        "hf_gen_ratio": ref["gen_tok_s"] / raw["gen_tok_s"],
        "hf_score_ratio": ref["score_tok_s"] / raw["score_tok_s"],
        "bytes_per_token_k16": s["bytes_per_token"],
    }
    report["gen_goal_met"] = report["gen_ratio_batch"] >= 0.9
    report["score_goal_met"] = report["score_vs_best_batch"] >= 0.9
    print(json.dumps(report, indent=2))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\nraydapt pool (1 actor; {describe(settings)})")
    print(f"raw vLLM     ({describe(raw_settings)}; engine start {raw['init_s']:.1f} s)")
    print(f"HF           ({spec.dtype}, batch {tcfg.batch_size}, {ref['torch_threads']} threads)")
    print(
        f"generate tok/s: raw vLLM {raw['gen_tok_s']:.0f} | "
        f"raydapt per-batch {g['median_batch_tok_s']:.0f} "
        f"({report['gen_ratio_batch']:.2f}x), whole run {g['span_tok_s']:.0f} "
        f"({report['gen_ratio_span']:.2f}x) | "
        f"HF {ref['gen_tok_s']:.0f} ({report['hf_gen_ratio']:.2f}x raw)"
    )
    print(
        f"score tok/s:    raw vLLM {raw['score_tok_s']:.0f} | "
        f"HF forward + top-k {ref['score_tok_s']:.0f} | "
        f"raydapt per-batch {s['median_batch_tok_s']:.0f} "
        f"({report['score_ratio_batch']:.2f}x raw, {report['score_vs_hf_batch']:.2f}x HF), "
        f"whole run {s['span_tok_s']:.0f} ({report['score_vs_best_span']:.2f}x best)"
    )
    print(
        f"goal generate: pool per batch >= 0.9x raw LLM.generate: "
        f"{report['gen_ratio_batch']:.3f}x, {verdict(report['gen_goal_met'])} "
        f"(whole run {report['gen_ratio_span']:.2f}x)"
    )
    print(
        f"goal score: pool per batch >= 0.9x the better of raw vLLM and HF ({best_name}): "
        f"{report['score_vs_best_batch']:.3f}x, {verdict(report['score_goal_met'])} "
        f"(whole run {report['score_vs_best_span']:.2f}x)"
    )
    print(f"targets at k={K}: {s['bytes_per_token']:.1f} bytes/token (goal <= 100)")
    record(
        "teacher",
        [
            ("generate: pool / raw LLM.generate, per batch", report["gen_ratio_batch"], ">= 0.9"),
            (
                f"score: pool / better of raw vLLM and HF ({best_name}), per batch",
                report["score_vs_best_batch"],
                ">= 0.9",
            ),
            ("score: pool / raw vLLM, per batch", report["score_ratio_batch"], ""),
            ("score: pool / HF forward + top-k, per batch", report["score_vs_hf_batch"], ""),
            (f"targets bytes/token at k={K}", s["bytes_per_token"], "<= 100"),
        ],
        {"pool": describe(settings), "raw": describe(raw_settings)},
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
