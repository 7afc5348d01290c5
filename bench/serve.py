"""Benchmark: `raydapt serve` (Ray Serve + vLLM) against a raw vLLM OpenAI server, same model.

Both servers get the same `small` preset model, the same prompts and the same closed-loop load
(concurrency 1, 8 and 32; fixed output length through `ignore_eos`). Both stay up and are
measured in alternating rounds, so drifting background load hits them alike; an idle engine
costs next to nothing. Prints requests/s and p50/p99 latency per concurrency and the ratios
raydapt/raw. Goals: throughput >= 0.9x raw, p99 <= 1.2x raw. Loopback only.

Like with like: the raw server gets the engine arguments of the replica's own spec
(`raydapt.serve.spec.build_spec`: dtype through `engine_dtype`, enforce_eager, max_model_len,
max_logprobs, log stats off) as its flags, and the environment a replica sees (probed from a
Ray actor with the replica's CPUs and `replica_env`: in-process worker or not, KV cache,
reserved CPUs, OMP threads) as its env vars. Those are passed to the raw server's process
only; the Ray cluster starts first, from this process's unchanged env. The settings of both
sides are printed and recorded in the JSON.

    .venv/bin/python bench/serve.py                  # about 5 minutes on 2 cores
    .venv/bin/python bench/serve.py --requests 1 --max-tokens 16 --out runs/serve_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts its workers (Serve's proxy, the replica and its vLLM processes) at nice 15; the raw
# server would run at nice 0. On a shared, loaded machine that alone halves our CPU share, so
# the bench's local cluster runs workers at the raw server's priority. Override to compare.
os.environ.setdefault("RAY_worker_niceness", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _probe import ENGINE_ENV_PREFIXES, probe_actor  # noqa: E402 - bench/ is the script's folder
from _results import record  # noqa: E402 - bench/ is the script's folder

NAME = "small"
MAX_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(cache: Path) -> Path:
    """The `small` preset with a tokenizer trained on the embedded world (cached)."""
    from raydapt.models import init_model
    from raydapt.world import write_world

    model = cache / "model"
    if not (model / "config.json").is_file():
        write_world(cache / "world", n_train=600, n_heldout=40, n_markov=60, seed=0)
        init_model("small", cache / "world" / "train.jsonl", model)
    return model


def prompts(model: Path, n: int = 64) -> list[str]:
    rows = [
        json.loads(x) for x in (model.parent / "world" / "heldout.jsonl").read_text().splitlines()
    ]
    texts = [r.get("prompt") or r.get("text") or "" for r in rows]
    texts = [t for t in texts if t] or ["12+34="]
    return [texts[i % len(texts)][:200] for i in range(n)]


async def load(url: str, texts: list[str], concurrency: int, total: int, max_tokens: int) -> dict:
    """Closed loop: `concurrency` workers send `total` requests; latency per request."""
    import httpx

    lat: list[float] = []
    errors = [0]
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(texts[i % len(texts)])

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {
                "model": NAME,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens:
                lat.append(time.perf_counter() - t0)
            else:
                errors[0] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": total,
        "errors": errors[0],
        "wall_s": wall,
        "rps": len(lat) / wall,
        "p50_s": pct(0.50),
        "p99_s": pct(0.99),
    }


def measure(
    urls: dict[str, str], texts: list[str], args: argparse.Namespace
) -> dict[str, list[dict]]:
    """Both servers stay up; each level runs raw, ours, raw, ours ... and keeps the median round.

    The machine is shared, so background load drifts over minutes: interleaving the two
    servers' rounds gives both the same conditions, which back-to-back runs would not.
    """
    for url in urls.values():
        asyncio.run(load(url, texts, 4, 8, args.max_tokens))  # warm-up, not measured
    out: dict[str, list[dict]] = {k: [] for k in urls}
    for c in args.concurrency:
        rounds: dict[str, list[dict]] = {k: [] for k in urls}
        for _ in range(args.rounds):
            for k, url in urls.items():
                rounds[k].append(
                    asyncio.run(load(url, texts, c, max(c * args.requests, 8), args.max_tokens))
                )
        for k in urls:
            res = sorted(rounds[k], key=lambda r: r["rps"])[len(rounds[k]) // 2]
            res["rounds_rps"] = [round(r["rps"], 2) for r in rounds[k]]
            out[k].append(res)
            print(
                f"  {k:>7} c={c:>3}: {res['rps']:.2f} req/s  p50 {res['p50_s'] * 1e3:.0f} ms  "
                f"p99 {res['p99_s'] * 1e3:.0f} ms  errors {res['errors']}  "
                f"rounds {res['rounds_rps']}",
                flush=True,
            )
    return out


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


# what a replica's environment may hold that changes how its engine runs


def job(args: argparse.Namespace):
    from raydapt.config import job_from_dict

    return job_from_dict(
        {
            "name": "bench",
            "serve": {
                "name": NAME,
                "port": free_port(),
                "dtype": args.dtype,
                "max_model_len": MAX_LEN,
                "max_ongoing_requests": 64,
                "max_queued_requests": 64,
                "api_keys_env": "",
                "cpus_per_replica": 1.0,
            },
            "cluster": {"num_cpus": 8},
        }
    )


def probe_replica_env(cfg) -> dict:
    """What a Ray actor with the replica's CPUs and env vars sees (engine env vars, threads);
    the replica's engine-core process inherits it, and the raw server must get the same."""
    from raydapt.serve.spec import replica_env

    s = cfg.serve
    return probe_actor(s.cpus_per_replica, replica_env(cfg), num_gpus=s.gpus_per_replica)


def engine_flags(engine: dict) -> list[str]:
    """A replica's AsyncEngineArgs keyword arguments as `vllm serve` flags."""
    flags = []
    for k, v in engine.items():
        if k == "model" or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    return flags


def settings(engine: dict, env: dict[str, str], threads: int, what: str) -> dict:
    multiproc = env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
    return {
        "process": what,
        "dtype": engine.get("dtype"),
        "worker": "in engine-core process" if not multiproc else "own process",
        "enforce_eager": bool(engine.get("enforce_eager")),
        "max_model_len": engine.get("max_model_len"),
        "max_logprobs": engine.get("max_logprobs"),
        "kv_cache_gib": env.get("VLLM_CPU_KVCACHE_SPACE", "vLLM default"),
        "reserved_cpus": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM default"),
        "omp_threads": threads,
        "engine": engine,
        "env": dict(sorted(env.items())),
    }


def describe(s: dict) -> str:
    return (
        f"{s['process']}: {s['dtype']}, worker {s['worker']}, "
        f"{'eager' if s['enforce_eager'] else 'compiled'}, max_model_len {s['max_model_len']}, "
        f"max_logprobs {s['max_logprobs']}, KV {s['kv_cache_gib']} GiB, "
        f"reserved CPUs {s['reserved_cpus']}, {s['omp_threads']} OMP threads"
    )


def start_raw(
    engine: dict, env: dict[str, str], args: argparse.Namespace
) -> tuple[str, subprocess.Popen]:
    """`vllm serve` with the replica's engine arguments, and its engine env vars only."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        engine["model"],
        "--served-model-name",
        NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *engine_flags(engine),
    ]
    # this process's env minus any engine variable, plus exactly those the replica sees
    penv = {k: v for k, v in os.environ.items() if not k.startswith(ENGINE_ENV_PREFIXES)}
    penv.update(env)
    log = open(args.log_dir / "raw_vllm.log", "w")
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=penv
    )
    return f"http://127.0.0.1:{port}", proc


def stop_raw(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def start_raydapt(cfg, model: Path) -> str:
    from raydapt.pipeline import run_stage

    return run_stage("serve", cfg, model_dir=str(model), block=False)["url"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per worker per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per level (median kept)"
    )
    ap.add_argument(
        "--dtype", default="auto", help="serve.dtype (auto keeps a float32 model in float32)"
    )
    ap.add_argument("--cache", type=Path, default=Path("runs/raydapt_bench_serve"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    args.log_dir = args.cache
    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache)
    texts = prompts(model)

    from raydapt.cluster import connect
    from raydapt.serve.spec import build_spec

    cfg = job(args)
    engine = dict(build_spec(cfg, model_dir=str(model)).engine)  # what the replica builds
    # the cluster starts before any engine env var is chosen, from this process's env
    connect(cfg.cluster)
    seen = probe_replica_env(cfg)
    env, threads = seen["env"], seen["torch_threads"]
    sides = {
        "raw": settings(engine, env, threads, "raw `vllm serve` subprocess"),
        "raydapt": settings(engine, env, threads, "Serve replica (1 CPU)"),
    }
    print(
        f"model {model} ({NAME} preset), {args.max_tokens} new tokens per request; "
        f"Ray worker niceness {os.environ['RAY_worker_niceness']}, raw server niceness "
        f"{os.getpriority(os.PRIO_PROCESS, 0)}",
        flush=True,
    )
    for k, v in sides.items():
        print(f"  {k:>7}: {describe(v)}", flush=True)
    raw_url, proc = start_raw(engine, env, args)  # starts in the background while Serve starts
    try:
        ours_url = start_raydapt(cfg, model)
        wait_ready(raw_url, proc)
        wait_ready(ours_url, None)
        print(f"raw vLLM at {raw_url}; raydapt serve at {ours_url}", flush=True)
        res = measure({"raw": raw_url, "raydapt": ours_url}, texts, args)
    finally:
        import ray
        from ray import serve

        stop_raw(proc)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    raw, ours = res["raw"], res["raydapt"]
    print(
        f"\n{'conc':>5} {'raw rps':>8} {'ours rps':>9} {'rps x':>6} {'raw p99':>8} {'ours p99':>9} "
        f"{'p99 x':>6} {'p50 x':>6}"
    )
    rows = []
    for r, o in zip(raw, ours, strict=False):
        row = {
            "concurrency": r["concurrency"],
            "rps_ratio": o["rps"] / r["rps"],
            "p99_ratio": o["p99_s"] / r["p99_s"],
            "p50_ratio": o["p50_s"] / r["p50_s"],
            "raw": r,
            "raydapt": o,
        }
        rows.append(row)
        print(
            f"{r['concurrency']:>5} {r['rps']:>8.2f} {o['rps']:>9.2f} {row['rps_ratio']:>6.2f} "
            f"{r['p99_s'] * 1e3:>7.0f}ms {o['p99_s'] * 1e3:>8.0f}ms {row['p99_ratio']:>6.2f} "
            f"{row['p50_ratio']:>6.2f}"
        )
    for x in rows:
        x["goals_met"] = x["rps_ratio"] >= 0.9 and x["p99_ratio"] <= 1.2
    ok = all(x["goals_met"] for x in rows)
    print(
        f"goals (throughput >= 0.9x raw, p99 <= 1.2x raw): {'met' if ok else 'NOT met'}"
        + "".join(f"; c={x['concurrency']} {'met' if x['goals_met'] else 'NOT met'}" for x in rows)
    )
    print(f"both sides: {describe(sides['raw']).split(': ', 1)[1]}")
    figures = []
    for x in rows:
        c = x["concurrency"]
        figures += [
            (f"c={c}: raydapt / raw vllm serve, req/s", x["rps_ratio"], ">= 0.9"),
            (f"c={c}: raydapt / raw vllm serve, p99 latency", x["p99_ratio"], "<= 1.2"),
        ]
    record("serve", figures, {"both sides": describe(sides["raw"]).split(": ", 1)[1]})
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "goals_met": ok,
                    "settings": dict(sides, ray_worker_niceness=os.environ["RAY_worker_niceness"]),
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
