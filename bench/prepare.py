"""Benchmark: `raydapt prepare` (Ray Data, tokenizer actor pool) vs a single-process loop.

Both tokenize and pack the same generated corpus (>= 50 MB of world jsonl) with the same
tokenizer, the same `Tokenize` and the same dedupe/pack/write code; the only difference
is that Ray Data runs tokenization in parallel. Prints tokens/s of each and the ratio.

    .venv/bin/python bench/prepare.py            # 50 MB, 2 runs each, medians
    .venv/bin/python bench/prepare.py --mb 5 --runs 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process, both sides
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
from _results import record  # noqa: E402 - bench/ is the script's folder

from raydapt import prepare  # noqa: E402
from raydapt.config import PrepareConfig, job_from_dict  # noqa: E402
from raydapt.prepare.stage import write_prepared  # noqa: E402
from raydapt.prepare.tokenize import Tokenize  # noqa: E402
from raydapt.sources import materialize  # noqa: E402
from raydapt.storage import read_manifest  # noqa: E402


def make_corpus(root: Path, mb: float) -> Path:
    """World problems and Markov text, repeated with a counter until the file reaches `mb`."""
    import json

    from raydapt.world import TASKS, generate_problems, markov_docs

    train, _ = generate_problems(list(TASKS), 20_000, 0, seed=1)
    text = [d["text"] for d in markov_docs(2_000, seed=1)]
    path = root / "corpus.jsonl"
    target, size, i = mb * 2**20, 0, 0
    with open(path, "w") as f:
        while size < target:
            p = train[i % len(train)]
            line = json.dumps({"prompt": f"{p.prompt} #{i}", "response": p.response}) + "\n"
            if i % 5 == 0:
                line += json.dumps({"text": text[i % len(text)] + f" {i}"}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return path


def baseline(cfg, model_dir: Path, path: Path, out: Path) -> dict:
    """The same Tokenize and write_prepared, in one process, no Ray."""
    tok = Tokenize(str(model_dir), {**cfg.prepare.__dict__, "format": "jsonl"})

    def batches():
        with open(path) as f:
            lines = []
            for line in f:
                lines.append(line.rstrip("\n"))
                if len(lines) == 1024:
                    yield tok(pa.table({"text": lines}))
                    lines = []
            if lines:
                yield tok(pa.table({"text": lines}))

    out.mkdir(parents=True)
    return write_prepared(batches(), out, cfg.prepare)


DEFAULT_WORKERS = PrepareConfig().workers


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        path = make_corpus(root, args.mb)
        cfg = job_from_dict(
            {
                "output_dir": str(root / "run"),
                "corpus": {"source": "files", "paths": [str(path)]},
                "student": {"preset": "tiny"},
                "teacher": {"preset": ""},
                "prepare": {"seq_len": 256, "workers": args.workers},
            }
        )
        # its own local cluster, even when another one runs on this machine (RAY_ADDRESS,
        # /tmp/ray/ray_current_cluster): num_cpus cannot be given to an existing one
        ray.init(address="local", num_cpus=8, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        materialize(cfg)  # the preset student's tokenizer, built once
        model_dir = Path(prepare.plan(cfg).tokenizer_path)
        ray_tps, base_tps = [], []
        for r in range(args.runs):
            shutil.rmtree(root / "run" / "prepared", ignore_errors=True)
            t0 = time.perf_counter()
            prepare.run(prepare.plan(cfg))  # the stage as run_stage runs it, without the skip
            dt = time.perf_counter() - t0
            m = read_manifest(root / "run" / "prepared")
            tokens = sum(m["tokens"].values())
            ray_tps.append(tokens / dt)
            t0 = time.perf_counter()
            stats = baseline(cfg, model_dir, path, root / f"base{r}")
            dt = time.perf_counter() - t0
            assert stats["rows"] == m["rows"], (stats["rows"], m["rows"])  # same work, same output
            base_tps.append(sum(stats["tokens"].values()) / dt)
            print(
                f"run {r}: raydapt {ray_tps[-1]:,.0f} tok/s, "
                f"single process {base_tps[-1]:,.0f} tok/s"
            )
        a, b = statistics.median(ray_tps), statistics.median(base_tps)
        print(
            f"\ncorpus {path.stat().st_size / 2**20:.1f} MB, {tokens:,} tokens, "
            f"{os.cpu_count()} cores"
        )
        print(f"raydapt prepare   {a:>12,.0f} tokens/s (median of {args.runs})")
        print(f"single process    {b:>12,.0f} tokens/s (median of {args.runs})")
        print(f"ratio             {a / b:>12.2f}x  (goal >= 1.5x)")
        # the headline is the default worker count; other counts get rows of their own
        # (no goal), so a scaling run never replaces the figure the goal is judged on
        tag = "" if args.workers == DEFAULT_WORKERS else f" (prepare.workers={args.workers})"
        record(
            "prepare",
            [
                (f"raydapt / single process, tokens/s{tag}", a / b, "" if tag else ">= 1.5"),
                (f"raydapt tokens/s{tag}", a, ""),
                (f"single process tokens/s{tag}", b, ""),
            ],
            {
                "corpus_mb": round(path.stat().st_size / 2**20, 1),
                "runs": args.runs,
                "workers": args.workers,
            },
        )
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
