"""Peak memory of the KD losses, forward + backward, at a shape where (B, T, V) logits matter.

Why: distillation must not cost much more memory than plain CE (goal: top-k KD + CE <= 1.2x
CE-only), and chunked full-vocabulary KD must not hold (B, T, V) temporaries per position.

How: each variant builds the student's hidden states and LM head (and, for full KD, a teacher's),
runs its loss and ``backward()``, and reports its peak memory. On CUDA that is
``torch.cuda.max_memory_allocated`` in one process; on CPU each run is a fresh subprocess and
the figure is its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), since torch's CPU
allocator is not tracked; the child runs with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors
leave the RSS. "step" is the peak minus the memory held just before the loss (torch
runtime, inputs, weights), i.e. what the loss and its backward add. Medians of ``--runs`` runs.

Run:  .venv/bin/python bench/kd_memory.py                 # CPU, B=1 T=1024 V=32000 H=256 fp32
      .venv/bin/python bench/kd_memory.py --B 4 --runs 1  # the issue's shape (3.8 GiB naive KD)
      .venv/bin/python bench/kd_memory.py --device cuda   # on a GPU machine
      .venv/bin/python bench/kd_memory.py --B 2 --T 256 --V 8000 --runs 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import record  # noqa: E402 - bench/ is the script's folder

from raydapt.train import losses as L  # noqa: E402

VARIANTS = {
    "ce_logits": "CE-only on materialized logits (ce_loss)",
    "topk_ce_logits": "0.5 top-k KD + 0.5 CE on materialized logits (topk_kd_loss chunked)",
    "ce_hidden": "CE-only from hidden (chunked_ce_from_hidden)",
    "topk_ce_hidden": "0.5 top-k KD + 0.5 CE from hidden (chunked_distill_from_hidden)",
    "kd_naive": "full-vocab forward KL, both logits materialized, unchunked",
    "kd_chunked_logits": "full-vocab forward KL, materialized logits, chunked (full_kd_loss)",
    "kd_hidden": "full-vocab forward KL from hidden (chunked_kd_from_hidden)",
}
RATIOS = [
    ("topk_ce_logits", "ce_logits", "top-k KD + CE vs CE-only, logits (goal <= 1.2)"),
    ("topk_ce_hidden", "ce_hidden", "top-k KD + CE vs CE-only, hidden (goal <= 1.2)"),
    ("topk_ce_hidden", "ce_logits", "top-k KD + CE from hidden vs plain CE on logits"),
    ("kd_hidden", "kd_naive", "chunked-from-hidden full KD vs naive full KD"),
    ("kd_chunked_logits", "kd_naive", "chunked full KD on logits vs naive full KD"),
]


def _inputs(a: argparse.Namespace, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, V, H, k = a.B, a.T, a.V, a.H, a.k

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    t_logits_k = rnd(B, T, k) * 3  # fake teacher top-k: sorted log-probs that sum below 1
    return {
        "h": rnd(B, T, H).requires_grad_(),
        "w": (rnd(V, H) / H**0.5).requires_grad_(),
        "th": rnd(B, T, H),
        "tw": rnd(V, H) / H**0.5,
        "ids": torch.randint(0, V, (B, T), generator=g).to(device),
        "mask": torch.ones(B, T, device=device),
        "topk_ids": torch.randint(0, V, (B, T, k), generator=g).to(device),
        "topk_lp": (torch.log_softmax(t_logits_k, -1) + torch.log(torch.tensor(0.9))).float(),
    }


def _loss(name: str, x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    h, w, m = x["h"], x["w"], x["mask"]
    kd_args = L.KD("forward_kl", chunk=None if name == "kd_naive" else chunk)
    if name in ("ce_logits", "topk_ce_logits"):
        logits = h @ w.T  # (B, T, V)
        ce = L.ce_loss(logits, x["ids"], m)
        if name == "ce_logits":
            return ce
        kd = L.topk_kd_loss(logits, x["topk_ids"], x["topk_lp"], m, kd_args)
        return L.distill_loss(kd, ce, 0.5)[0]
    if name == "ce_hidden":
        return L.chunked_ce_from_hidden(h, w, x["ids"], m, chunk=chunk)
    if name == "topk_ce_hidden":
        kd, ce = L.chunked_distill_from_hidden(
            h, w, x["ids"], m, x["topk_ids"], x["topk_lp"], kd_args
        )
        return L.distill_loss(kd, ce, 0.5)[0]
    if name == "kd_hidden":
        return L.chunked_kd_from_hidden(h, w, x["th"], x["tw"], m, kd_args)
    with torch.no_grad():
        t_logits = x["th"] @ x["tw"].T  # (B, T, V), frozen teacher
    s_logits = h @ w.T  # (B, T, V)
    return L.full_kd_loss(s_logits, t_logits, m, kd_args)


def _rss_mib(peak: bool = True) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_run(name: str, a: argparse.Namespace) -> dict[str, float]:
    """Run one variant in this process; return peak and step memory in MiB."""
    device = a.device
    # Warm up on a tiny shape first: checkpoint and autograd load ~900 modules (~150 MiB) lazily,
    # which would otherwise count as the loss's memory.
    tiny = argparse.Namespace(**{**vars(a), "B": 1, "T": 6, "V": 32, "H": 8, "k": 4})
    _loss(name, _inputs(tiny, device), chunk=2).backward()
    x = _inputs(a, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib(peak=False)
    loss = _loss(name, x, a.chunk)
    loss.backward()
    assert torch.isfinite(loss).item()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mib()
    return {"peak_mib": peak, "step_mib": peak - before, "loss": float(loss.detach())}


# A fixed mmap threshold turns off glibc's dynamic one, so every large tensor is mmapped and
# unmapped on free; otherwise freed chunk temporaries stay in the heap and inflate the RSS.
_CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(name: str, a: argparse.Namespace) -> list[dict[str, float]]:
    if a.device == "cuda":
        out = []
        for _ in range(a.runs):
            out.append(one_run(name, a))
            torch.cuda.empty_cache()
        return out
    args = [f"--{k}={v}" for k, v in vars(a).items() if k not in ("child",)]
    out = []
    for _ in range(a.runs):  # a fresh process per run: ru_maxrss only ever grows
        res = subprocess.run(
            [sys.executable, __file__, *args, f"--child={name}"],
            capture_output=True,
            text=True,
            check=True,
            env=_CHILD_ENV,
        )
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for dim, val in (("B", 1), ("T", 1024), ("V", 32000), ("H", 256), ("k", 16), ("chunk", 128)):
        p.add_argument(f"--{dim}", type=int, default=val)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(one_run(a.child, a)))
        return
    print(
        f"device={a.device} B={a.B} T={a.T} V={a.V} H={a.H} k={a.k} chunk={a.chunk} fp32, "
        f"medians of {a.runs}; logits (B,T,V) = {a.B * a.T * a.V * 4 / 2**20:.0f} MiB"
    )
    med: dict[str, dict[str, float]] = {}
    for name, what in VARIANTS.items():
        runs = measure(name, a)
        med[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"{name:18s} peak {med[name]['peak_mib']:8.0f} MiB  step {med[name]['step_mib']:8.0f}"
            f" MiB  loss {med[name]['loss']:.4f}  | {what}",
            flush=True,
        )
    figures = []
    for num, den, what in RATIOS:
        peak = med[num]["peak_mib"] / med[den]["peak_mib"]
        step = med[num]["step_mib"] / max(med[den]["step_mib"], 1e-9)
        print(f"{num}/{den}: peak {peak:.2f}x  step {step:.2f}x  | {what}")
        goal = "<= 1.2" if "goal <= 1.2" in what else ""
        figures.append((f"B={a.B} T={a.T} V={a.V}: peak {num} / {den}", peak, goal))
    record("kd_memory", figures, {k: v for k, v in vars(a).items() if k != "child"})


if __name__ == "__main__":
    main()
