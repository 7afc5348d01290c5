"""The bytes-per-token frontier of the offline teacher signals (issue 15, item 3).

At budgets of about 16, 32, 64, 128 and 256 bytes per token, how good is a student distilled
from each stored teacher signal (`teach.signal`), against full-vocabulary KD (the exact
reference: the embedded world's tokenizer has 311 tokens, so the teacher's whole distribution
is cheap to use live)?

  topk          k = budget / 4 (uint16 id + float16 logprob = 4 B per entry, nominal)
  sampled       s draws (RS-KD), s the largest whose ACTUAL signal bytes on disk fit the budget
  topk+sampled  half and half: k = budget / 8, then the largest s of tail draws whose actual
                signal bytes (head + draws) fit the budget
  full          OnlineDistill against the live teacher (full_kd_loss): the reference
  ce            plain next-token CE on the same rows (no teacher): the scale of the gaps

Everything runs in one process, no Ray. The teacher is the `small` preset, trained here with
a plain torch CE loop on the world corpus (order-2 Markov text, whose true entropy rate is
2.23 nats/token, plus the exact tasks), so its distribution is genuinely soft. For every
signal and budget a fixed set of packed training rows is scored with `HFBackend.score`, turned
into a targets table with `teach.work.scored_table`, written to parquet with zstd (as
`targets.PartStore` writes it) and read back: the students train on what the disk holds, and
the bytes per token are measured on disk (the compressed column chunks of the signal columns
over all tokens; the whole file is reported too). The choice of s is made on 64 evenly spaced
calibration rows (the backend's own draw code on cached teacher log-probs), then checked on
the full table, and searched again lower if the full table overshoots; s is capped at 4096
(past it the distinct draws saturate), and a budget that repeats a smaller one's table is
trained once.

Students: the `tiny` preset, one init per seed, identical across kinds; the same batches in
the same order (per seed), the same steps, AdamW, pure KD by default (--alpha 1, forward KL,
tau 1, raydapt's objectives TopKDistill / SampledDistill / OnlineDistill via `rows.collate`
batches). The teacher's draws are seeded with the student seed too (teach.seed), so a second
seed varies the draws as well as the init and the batch order. Seed noise: the sd of the
full-KD student's held-out CE over the paired seeds plus --noise-seeds (full KD only).

Metrics on held-out world rows (packed the same way): CE (and its paired gap to the full-KD
student of the same seed), KL(teacher || student) exact over the full vocabulary, ECE of the
student's next-token predictions (15 equal-width confidence bins), and the cosine between
the kind's loss gradient and the full-KD gradient on 4 fixed batches, at the student init and
at the trained full-KD student (float64).

    .venv/bin/python bench/signal_frontier.py                      # 2 seeds + 2 noise seeds
    .venv/bin/python bench/signal_frontier.py --seeds 0 --steps 60 --budgets 16 64
    .venv/bin/python bench/signal_frontier.py --alpha 0.5 --budgets 16 32 64 --noise-seeds
        # side study (KD mixed with CE): writes only --out/summary_alpha0.5.json, which the
        # next main run adds to the .md

Writes bench/signal_frontier.md (table, choices, verdict; a hand-written section below its
marker line survives reruns), bench/signal_frontier.png (held-out CE gap and KL gap to full KD
against actual bytes/token) and the headline figures into bench/results.json.
Scratch (world, teacher, tables, per-run records) under --out (default /tmp/sf); a rerun with
the same --out reuses the teacher, the tables and every finished run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from _results import record  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

KINDS = ("topk", "sampled", "topk+sampled")
SIGNAL_COLS = ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts")
SEQ_LEN = 128
GOAL_BYTES = 40.0
HAND_MARK = "<!-- written by hand below: kept by reruns -->"
N_BINS = 15
# Per --model: the world's exact-reference study, and the real-LLM one sized for 2 cores
# (a SmolLM2 student step costs about 100x a `tiny` one; its log-probs are 49k wide).
DEFAULTS = {
    "world": dict(
        steps=200,
        batch=16,
        lr=3e-3,
        train_rows=640,
        budgets=[16, 32, 64, 128, 256],
        noise_seeds=[2, 3],
        grad_batches=4,
        held_batch=32,
        out=Path("/tmp/sf"),
    ),
    "smollm2": dict(
        steps=40,
        batch=4,
        lr=3e-4,
        train_rows=120,
        budgets=[16, 32, 64, 128],
        noise_seeds=[],
        grad_batches=2,
        held_batch=4,
        out=Path("/tmp/sf-smollm2"),
    ),
}
CALIB_ROWS = 64
S_MAX = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def packed_rows(path: Path, tok) -> list[tuple[np.ndarray, np.ndarray]]:
    """world jsonl -> (input_ids, loss_mask) rows packed to SEQ_LEN, by raydapt's row rules."""
    from raydapt.prepare.tokenize import Tokenize
    from raydapt.rows import pack
    from raydapt.world import read_jsonl

    t = Tokenize(tok, {"format": "jsonl"})
    docs = []
    for row in read_jsonl(path):
        doc, _ = t.doc(row)
        if doc is not None and sum(doc.target):
            docs.append((np.asarray(doc.ids, np.int32), np.asarray(doc.target, np.uint8)))
    return [(ids, mask) for ids, mask, _ in pack(docs, SEQ_LEN)]


def rows_table(rows: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    return pa.table(
        {
            "input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
            "loss_mask": pa.array([r[1] for r in rows], pa.list_(pa.uint8())),
        }
    )


# ----------------------------------------------------------------------------- teacher


def build_teacher(a: argparse.Namespace, out: Path) -> Path:
    """world + `small` teacher trained with plain CE (cached: a rerun reuses it)."""
    from raydapt.models import init_model, load_model, load_tokenizer
    from raydapt.rows import collate
    from raydapt.train.losses import ce_loss
    from raydapt.world import write_world

    world, tdir = out / "world", out / "teacher"
    done = tdir / "trained.json"
    if done.is_file():
        log(f"teacher: reusing {tdir} ({json.loads(done.read_text())})")
        return tdir
    summary = write_world(world, n_train=2000, n_heldout=200, n_markov=1000, seed=0)
    init_model("small", world / "train.jsonl", tdir, vocab_size=512, seed=1234)
    tok = load_tokenizer(tdir)
    rows = packed_rows(world / "train.jsonl", tok)
    table = rows_table(rows)
    model = load_model(tdir).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=a.teacher_lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    sched = lr_schedule(opt, a.teacher_steps, 20)
    rng = np.random.default_rng(1234)
    order = epoch_order(rng, len(rows), a.teacher_steps, 16)
    t0, losses = time.time(), []
    for step, idx in enumerate(order):
        b = collate(table, idx, tok.pad_token_id)
        loss = ce_loss(
            model(input_ids=b["input_ids"], use_cache=False).logits, b["input_ids"], b["loss_mask"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"teacher step {step + 1}/{a.teacher_steps}: CE {np.mean(losses[-50:]):.3f}")
    model.eval().save_pretrained(tdir, safe_serialization=True)
    info = {
        "steps": a.teacher_steps,
        "rows": len(rows),
        "final_train_ce": round(float(np.mean(losses[-20:])), 4),
        "wall_s": round(time.time() - t0, 1),
        "world": summary,
        "vocab": len(tok),
    }
    done.write_text(json.dumps(info))
    log(f"teacher trained: {info}")
    return tdir


def smollm2_inputs(a: argparse.Namespace, out: Path) -> tuple[Path, Path, list, list, dict]:
    """`--model smollm2`: the teacher is SmolLM2-135M-Instruct, the student is cut from it
    (`student.keep_every`), and the rows are the teacher's own answers to the world's open
    instructions through its chat template: `jobs/smollm2-distill.yaml`'s prepare and teach
    stages (`teach.kind: generate`, vLLM pool), for the train and validation splits. This
    is the real-LLM case where a distilled student learns from teacher text, with the
    49,152-token vocabulary whose tails top-k cuts. Cached under --out/job."""
    import ray

    from raydapt import layout
    from raydapt.cluster import connect
    from raydapt.config import load_job
    from raydapt.models import load_tokenizer
    from raydapt.pipeline import derived, run_stage
    from raydapt.sources import build_model
    from raydapt.storage import read_manifest
    from raydapt.targets import read_targets

    job = load_job(
        ROOT / "jobs" / "smollm2-distill.yaml",
        [
            f"output_dir={(out / 'job').absolute()}",
            f"student.keep_every={a.keep_every}",
            "teach.kind=generate",
        ],
    )
    held = derived(job, "heldout", teach={"split": "validation"})
    timing = out / "job" / "answers_s.json"  # a rerun reports the first invocation's time
    if not all(read_manifest(layout.targets_dir(j)) for j in (job, held)):
        t0 = time.time()
        connect(job.cluster, None)
        for j in (job, held):
            if j is job:
                run_stage("prepare", job)
            run_stage("teach", j)
        ray.shutdown()
        timing.write_text(json.dumps(round(time.time() - t0, 1)))

    def rows(j) -> list[tuple[np.ndarray, np.ndarray]]:
        _, files = read_targets(layout.targets_dir(j))
        t = pa.concat_tables(pq.read_table(f, columns=["input_ids", "loss_mask"]) for f in files)
        return [
            (np.asarray(i, np.int32), np.asarray(m, np.uint8))
            for i, m in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist())
        ]

    tdir, sdir = build_model(job, "teacher"), build_model(job, "student")
    pruned = json.loads((sdir / "pruned.json").read_text())
    info = {
        "model": "SmolLM2-135M-Instruct",
        "steps": 0,
        "wall_s": json.loads(timing.read_text()) if timing.is_file() else float("nan"),
        "vocab": len(load_tokenizer(tdir)),
        "student_layers": pruned["kept_layers"],
        "student_params": pruned["params"],
        "max_tokens": job.teach.max_tokens,
        "temperature": job.teach.temperature,
    }
    return tdir, sdir, rows(job), rows(held), info


def lr_schedule(opt, steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def epoch_order(rng: np.random.Generator, n: int, steps: int, batch: int) -> list[np.ndarray]:
    """steps batches of row indices: epochs of a permutation, no row twice in a batch."""
    out, perm = [], np.array([], np.int64)
    while len(out) < steps:
        if len(perm) < batch:
            perm = np.concatenate([perm, rng.permutation(n)])
        out.append(np.sort(perm[:batch]))
        perm = perm[batch:]
    return out


# ----------------------------------------------------------------------------- tables


def signal_bytes(path: Path) -> tuple[int, int]:
    """(compressed bytes of the signal columns' chunks, file size) of one parquet file."""
    md = pq.ParquetFile(path).metadata
    sig = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] in SIGNAL_COLS:
                sig += col.total_compressed_size
    return sig, path.stat().st_size


def write_measure(table: pa.Table, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")  # as targets.PartStore / finalize write
    sig, size = signal_bytes(path)
    n_tok = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py())
    return {"signal_bpt": sig / n_tok, "file_bpt": size / n_tok, "tokens": n_tok}


class Scorer:
    """The teacher behind HFBackend, plus the inputs every table shares.

    The teacher's (T, V) float32 log-probs of every row are computed once, by the backend's
    own model, and every table is rebuilt from them with the backend's own signal code
    (`HFBackend.signal_of`): one forward pass per row for the whole study, which is what
    makes the 49k-vocabulary version affordable on 2 cores (about 3.5 GB held in memory)."""

    def __init__(self, tdir: Path, seqs: list[np.ndarray], masks: list[np.ndarray]):
        from raydapt.teach.hf_backend import HFBackend
        from raydapt.teach.spec import ActorSpec

        self.tdir, self.seqs, self.masks = tdir, seqs, masks
        self.ids = [hashlib.sha256(s.tobytes()).hexdigest()[:20] for s in seqs]
        self.base = ActorSpec(model=str(tdir), backend="hf", dtype="float32", id_dtype="uint16")
        self._be = HFBackend(self.base)
        self._lp: list[torch.Tensor | None] = [None] * len(seqs)
        # evenly spaced rows: the packed rows run from the exact tasks to the Markov text
        self.calib = np.linspace(0, len(seqs) - 1, min(CALIB_ROWS, len(seqs))).round().astype(int)

    @property
    def teacher_model(self):
        return self._be.model

    def spec(self, kind: str, k: int, s: int, seed: int):
        return dataclasses.replace(
            self.base, signal=kind, k=max(k, 1) if kind != "sampled" else 1, samples=s, seed=seed
        )

    def logp(self, i: int) -> torch.Tensor:
        if self._lp[i] is None:
            x = torch.as_tensor(self.seqs[i].astype(np.int64))[None]
            with torch.inference_mode():
                logits = self._be.model(input_ids=x, use_cache=False).logits.float()
                self._lp[i] = torch.log_softmax(logits, -1)[0]
        return self._lp[i]

    def dense(self, spec, rows) -> list[tuple]:
        """What `HFBackend(spec).score` returns for `rows`, from the cached log-probs."""
        be = copy.copy(self._be)
        be.set_signal(spec)
        with torch.inference_mode():
            return [be.signal_of(self.logp(i), self.seqs[i]) for i in rows]

    def table(self, spec, rows=None) -> pa.Table:
        from raydapt.teach.work import scored_table

        rows = range(len(self.seqs)) if rows is None else rows
        return scored_table(
            [self.ids[i] for i in rows],
            [self.seqs[i] for i in rows],
            [self.masks[i] for i in rows],
            self.dense(spec, rows),
            spec,
        )

    def calib_bytes(self, spec, scratch: Path) -> float:
        """Signal bytes/token of the calibration rows under `spec` (the search for s)."""
        return write_measure(self.table(spec, self.calib), scratch)["signal_bpt"]


def largest_s(fits, lo: int = 1) -> int:
    """The largest s in [lo, S_MAX] with fits(s) (fits is about monotone), lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    good, bad = lo, None
    s = lo
    while bad is None:
        s = min(s * 2, S_MAX)
        if fits(s):
            good = s
            if s == S_MAX:
                return s
        else:
            bad = s
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def make_tables(a, sc: Scorer, out: Path, seed: int) -> dict[tuple[str, int], dict]:
    """Every (kind, budget) table for one seed: chosen k/s, actual bytes, the parquet path."""
    tabdir = out / "tables"
    made: dict[tuple[str, int], dict] = {}
    for kind in a.kinds:
        for budget in a.budgets:
            if f"{kind}:{budget}" in a.skip:
                continue
            # top-k tables hold no draws, so they are the same for every seed
            tag = f"{kind.replace('+', '_')}_B{budget}" + ("" if kind == "topk" else f"_seed{seed}")
            meta_p = tabdir / f"{tag}.json"
            if meta_p.is_file():
                made[(kind, budget)] = json.loads(meta_p.read_text())
                continue
            t0 = time.time()
            k = budget // 4 if kind == "topk" else budget // 8 if kind == "topk+sampled" else 0
            s, target, path = 0, float(budget), tabdir / f"{tag}.parquet"
            for _attempt in range(4):
                if kind != "topk":
                    scratch = out / "scratch" / f"{tag}.parquet"

                    def fits(s_: int, kind=kind, k=k, scratch=scratch, target=target) -> bool:
                        return sc.calib_bytes(sc.spec(kind, k, s_, seed), scratch) <= target

                    s = largest_s(fits, lo=1)
                    if s < 1:
                        break
                m = write_measure(sc.table(sc.spec(kind, k, s, seed)), path)
                if kind == "topk" or m["signal_bpt"] <= budget:
                    break
                log(
                    f"{tag}: s={s} gives {m['signal_bpt']:.2f} B/token on the full table; "
                    "searching again with a lower calibration target"
                )
                target *= budget / m["signal_bpt"] * 0.995
            if kind != "topk" and (s < 1 or m["signal_bpt"] > budget):
                log(f"{tag}: no s fits {budget} B/token; skipped")
                continue
            from raydapt.train.sampled_kd import bytes_per_token

            nominal = bytes_per_token(kind, k=k if kind != "sampled" else 0, s=s, id_dtype="uint16")
            meta = {
                "kind": kind,
                "budget": budget,
                "k": k,
                "s": s,
                "path": str(path),
                "nominal_bpt": nominal,
                "score_s": round(time.time() - t0, 1),
                **m,
            }
            meta_p.write_text(json.dumps(meta))
            made[(kind, budget)] = meta
            log(
                f"table {tag}: k={k} s={s} signal {m['signal_bpt']:.2f} B/token "
                f"(file {m['file_bpt']:.2f}, nominal {nominal}) in {meta['score_s']} s"
            )
    return made


# ----------------------------------------------------------------------------- students


def held_eval(model, batches, t_logps) -> dict:
    """Held-out CE, exact KL(teacher || student) and ECE over the masked positions."""
    from raydapt.rows import next_token_targets

    ce_sum = kl_sum = n = 0.0
    conf_all, hit_all = [], []
    model.eval()
    with torch.inference_mode():
        for b, t_lp in zip(batches, t_logps):
            lp = torch.log_softmax(
                model(input_ids=b["input_ids"], use_cache=False).logits.float(), -1
            )
            tgt, mask = next_token_targets(b["input_ids"], b["loss_mask"])
            m = mask > 0
            ce_sum += -lp.gather(-1, tgt[..., None])[..., 0][m].sum().item()
            kl_sum += (t_lp.exp() * (t_lp - lp)).sum(-1)[m].sum().item()
            conf, pred = lp[m].exp().max(-1)
            conf_all.append(conf)
            hit_all.append((pred == tgt[m]).float())
            n += m.sum().item()
    model.train()
    conf, hit = torch.cat(conf_all), torch.cat(hit_all)
    bins = torch.clamp((conf * N_BINS).long(), max=N_BINS - 1)
    ece = 0.0
    for i in range(N_BINS):
        sel = bins == i
        if sel.any():
            ece += sel.float().mean().item() * abs(hit[sel].mean().item() - conf[sel].mean().item())
    return {
        "held_ce": ce_sum / n,
        "kl": kl_sum / n,
        "ece": ece,
        "acc": hit.mean().item(),
        "positions": int(n),
    }


def flat_grad(model, obj, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss, _ = obj(model, batch)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g.detach().double()  # float64: a float32 cosine of near-parallel vectors exceeds 1


def objective_for(kind: str, kd, teacher, alpha: float = 1.0):
    from raydapt.train.objective import (
        NextToken,
        OnlineDistill,
        SampledDistill,
        TopKDistill,
        TopKSampledDistill,
    )

    if kind == "full":
        return OnlineDistill(kd, alpha, teacher)
    if kind == "ce":
        return NextToken(kd.chunk)
    if kind == "topk":
        return TopKDistill(kd, alpha)
    if kind == "topk+sampled":
        return TopKSampledDistill(kd, alpha)
    return SampledDistill(kd, alpha)


def train_student(a, kind: str, table: pa.Table, order, init_state, ctx, save_state=None) -> dict:
    from raydapt.rows import collate

    model = ctx["student_cls"](ctx["student_cfg"])
    model.load_state_dict(init_state)
    model.train()
    obj = objective_for(kind, ctx["kd"], ctx["teacher"], ctx["alpha"])
    pad = ctx["pad"]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = lr_schedule(opt, a.steps, a.warmup)
    t0, losses = time.time(), []
    for idx in order:
        batch = collate(table, idx, pad)
        loss, _ = obj(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.time() - t0
    if save_state is not None:
        torch.save(model.state_dict(), save_state)
    res = held_eval(model, ctx["held_batches"], ctx["held_tlp"])
    res.update(train_s=round(train_s, 1), final_loss=float(np.mean(losses[-20:])))
    return res


# ----------------------------------------------------------------------------- study


def run_seed(
    a, seed: int, tdir: Path, sc: Scorer, hb, held_tlp, teacher, out: Path, only_full: bool = False
) -> list[dict]:
    """Every run of one seed (only the full-KD reference for a noise seed), cached per run."""
    from transformers import LlamaForCausalLM

    from raydapt.config import TrainConfig
    from raydapt.models import init_model, load_model, load_tokenizer
    from raydapt.train.objective import kd_of

    tag = f"steps{a.steps}_b{a.batch}_lr{a.lr}_n{a.train_rows}" + (
        f"_alpha{a.alpha}" if a.alpha != 1 else ""
    )
    rdir = out / "runs" / tag / f"seed{seed}"
    rdir.mkdir(parents=True, exist_ok=True)
    tables = {} if only_full else make_tables(a, sc, out, seed)

    sdir = a.student_dir or out / "students" / f"init{seed}"  # smollm2: one pruned init
    if not (sdir / "config.json").is_file():
        init_model("tiny", "", sdir, seed=seed, tokenizer_from=tdir)
    student = load_model(sdir)
    init_state = {k: v.clone() for k, v in student.state_dict().items()}
    tok = load_tokenizer(tdir)
    pad = tok.pad_token_id
    kd = kd_of(TrainConfig(kd_loss="forward_kl", kd_temperature=1.0))
    order = epoch_order(np.random.default_rng(seed), a.train_rows, a.steps, a.batch)
    grad_rows = [np.arange(i * a.batch, (i + 1) * a.batch) for i in range(a.grad_batches)]
    base_tab = rows_table(list(zip(sc.seqs, sc.masks)))  # the input columns every table holds
    ctx = {
        "student_cls": LlamaForCausalLM,
        "student_cfg": student.config,
        "kd": kd,
        "alpha": a.alpha,
        "teacher": teacher,
        "pad": pad,
        "grad_rows": grad_rows,
        "held_batches": hb,
        "held_tlp": held_tlp,
    }

    plan = [("full", 0, None)] if only_full else [("full", 0, None), ("ce", 0, None)]
    seen: dict[tuple, int] = {}
    for (kind, budget), meta in tables.items():
        same = seen.setdefault((kind, meta["k"], meta["s"]), budget)
        if same != budget:  # s capped at S_MAX: the budget does not bind, the table repeats
            log(
                f"seed {seed} {kind} B={budget}: same k={meta['k']}, s={meta['s']} as B={same} "
                f"(s capped at {S_MAX}); not trained twice"
            )
            continue
        plan.append((kind, budget, meta))
    results = []
    for kind, budget, meta in plan:
        rp = rdir / f"{kind.replace('+', '_')}_B{budget}.json"
        if rp.is_file():
            r = json.loads(rp.read_text())
        else:
            table = pq.read_table(meta["path"]) if meta else base_tab  # what the disk holds
            t0 = time.time()
            save = rdir / "full_state.pt" if kind == "full" else None
            r = train_student(a, kind, table, order, init_state, ctx, save)
            r.update(kind=kind, budget=budget, seed=seed, wall_s=round(time.time() - t0, 1))
            if meta:
                r.update({x: meta[x] for x in ("k", "s", "signal_bpt", "file_bpt", "nominal_bpt")})
            rp.write_text(json.dumps(r))
        results.append(r)
        log(
            f"seed {seed} {kind:>12} B={budget:<4} held CE {r['held_ce']:.4f} KL {r['kl']:.4f} "
            f"ECE {r['ece']:.4f} ({r['wall_s']} s)"
        )
    if not only_full and a.grad_cos:
        grad_cosines(a, seed, rdir, plan, results, base_tab, init_state, order, ctx)
    return results


def grad_cosines(a, seed, rdir, plan, results, base_tab, init_state, order, ctx) -> None:
    """Each run's loss-gradient cosine to the full-KD gradient on the fixed batches, at the
    student init (`grad_cos`) and at the trained full-KD student (`grad_cos_trained`): at the
    init every kind's gradient points the same coarse way (away from the uniform init), so the
    init cosine says little; near the end the fine structure counts. Float64 throughout."""
    from raydapt.rows import collate

    state_p = rdir / "full_state.pt"
    for r in results:
        if r["kind"] == "full":
            r.update(grad_cos=1.0, grad_cos_trained=1.0, cos64=True)
    todo = [(r, meta) for r, (_, _, meta) in zip(results, plan) if not r.get("cos64")]
    if not todo:
        return
    if not state_p.is_file():  # a record from before the state was kept: train it again
        full_r = next(r for r in results if r["kind"] == "full")
        again = train_student(a, "full", base_tab, order, init_state, ctx, state_p)
        log(
            f"seed {seed}: full KD retrained for its weights, held CE {again['held_ce']:.4f} "
            f"(recorded {full_r['held_ce']:.4f})"
        )
    init_m, trained_m = (ctx["student_cls"](ctx["student_cfg"]) for _ in range(2))
    init_m.load_state_dict(init_state)
    trained_m.load_state_dict(torch.load(state_p))
    full_obj = objective_for("full", ctx["kd"], ctx["teacher"], ctx["alpha"])
    pad = ctx["pad"]
    refs = {
        key: [
            flat_grad(m.train(), full_obj, collate(base_tab, idx, pad)) for idx in ctx["grad_rows"]
        ]
        for key, m in (("grad_cos", init_m), ("grad_cos_trained", trained_m))
    }
    for r, meta in todo:
        table = pq.read_table(meta["path"]) if meta else base_tab
        obj = objective_for(r["kind"], ctx["kd"], ctx["teacher"], ctx["alpha"])
        for key, m in (("grad_cos", init_m), ("grad_cos_trained", trained_m)):
            cos = [
                torch.nn.functional.cosine_similarity(
                    flat_grad(m, obj, collate(table, idx, pad)), g, dim=0
                ).item()
                for idx, g in zip(ctx["grad_rows"], refs[key])
            ]
            r[key] = float(np.mean(cos))
        r["cos64"] = True
        (rdir / f"{r['kind'].replace('+', '_')}_B{r['budget']}.json").write_text(json.dumps(r))
        log(
            f"seed {seed} {r['kind']:>12} B={r['budget']:<4} grad cos to full KD: at the init "
            f"{r['grad_cos']:.5f}, at the trained full-KD student {r['grad_cos_trained']:.5f}"
        )


def summarize(
    results: list[dict], seeds: list[int], noise_runs: list[dict] = ()
) -> tuple[list[dict], dict]:
    """Per (kind, budget) means over seeds; the seed noise is the sd of the full-KD student's
    held-out CE over the seeds and the extra noise seeds (full KD only)."""
    by = {(r["kind"], r["budget"], r["seed"]): r for r in results}
    full = {s: by[("full", 0, s)] for s in seeds}
    all_full = [full[s] for s in seeds] + [r for r in noise_runs if r["seed"] not in full]
    full_ce = [r["held_ce"] for r in all_full]
    noise = statistics.stdev(full_ce) if len(full_ce) > 1 else float("nan")
    keys = sorted(
        {(r["kind"], r["budget"]) for r in results},
        key=lambda kb: (["full", "ce", *KINDS].index(kb[0]), kb[1]),
    )
    rows = []
    for kind, budget in keys:
        rs = [by[(kind, budget, s)] for s in seeds if (kind, budget, s) in by]
        gaps = [r["held_ce"] - full[r["seed"]]["held_ce"] for r in rs]
        kl_gaps = [r["kl"] - full[r["seed"]]["kl"] for r in rs]
        row = {
            "kind": kind,
            "budget": budget,
            "n": len(rs),
            "kl_gap": float(np.mean(kl_gaps)),
            "k": rs[0].get("k", ""),
            "s": "/".join(str(r.get("s", "")) for r in rs),
            "gap": float(np.mean(gaps)),
            "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
            "gaps": gaps,
        }
        for m in (
            "held_ce",
            "kl",
            "ece",
            "grad_cos",
            "grad_cos_trained",
            "wall_s",
            "signal_bpt",
            "file_bpt",
            "nominal_bpt",
        ):
            vals = [r[m] for r in rs if m in r]
            row[m] = float(np.mean(vals)) if vals else float("nan")
        rows.append(row)
    full_kl = [r["kl"] for r in all_full]
    info = {
        "noise": noise,
        "full_ce": full_ce,
        "full_mean": float(np.mean([full[s]["held_ce"] for s in seeds])),
        "full_kl": full_kl,
        "kl_noise": statistics.stdev(full_kl) if len(full_kl) > 1 else float("nan"),
    }
    return rows, info


def verdicts(rows: list[dict], info: dict) -> dict[str, dict]:
    """Per kind: the best mean gap among points whose actual signal bytes are <= 40."""
    out = {}
    for kind in KINDS:
        pts = [r for r in rows if r["kind"] == kind and r["signal_bpt"] <= GOAL_BYTES]
        if not pts:
            out[kind] = {"best": None}
            continue
        best = min(pts, key=lambda r: r["gap"])
        noise = info["noise"]
        best_kl = min(pts, key=lambda r: r["kl_gap"])
        out[kind] = {
            "best": best,
            "met": bool(not math.isnan(noise) and best["gap"] <= noise),
            "best_kl": best_kl,
            "met_kl": bool(
                not math.isnan(info["kl_noise"]) and best_kl["kl_gap"] <= info["kl_noise"]
            ),
        }
    return out


COLUMNS = (
    "kind", "budget", "k", "s (per seed)", "signal B/tok (disk)", "file B/tok", "nominal B/tok",
    "held-out CE", "gap to full KD (mean ± sd)", "KL(T‖S) (gap)", "ECE", "grad cos init",
    "grad cos trained", "train+eval s",
)  # fmt: skip


def fmt_table(rows: list[dict]) -> str:
    def num(x: float, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        na = r["kind"] in ("full", "ce")
        cells = [
            r["kind"],
            str(r["budget"] or "-"),
            str(r["k"]) if r["kind"] in ("topk", "topk+sampled") else "-",
            str(r["s"]) if r["kind"] in ("sampled", "topk+sampled") else "-",
            "-" if na else num(r["signal_bpt"], ".2f"),
            "-" if na else num(r["file_bpt"], ".2f"),
            "-" if na else num(r["nominal_bpt"], ".0f"),
            num(r["held_ce"], ".4f"),
            f"{r['gap']:+.4f} ± {r['gap_sd']:.4f}",
            f"{r['kl']:.4f} ({r['kl_gap']:+.4f})",
            num(r["ece"], ".4f"),
            num(r["grad_cos"], ".5f"),
            num(r["grad_cos_trained"], ".5f"),
            num(r["wall_s"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], info: dict, path: Path, title: str) -> None:
    """Left: held-out CE gap to full KD; right: KL(teacher || student) gap; both against the
    actual signal bytes per token, one line per kind (symlog y: the gaps span 3 decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (
        ("gap", "gap_sd", "noise", "held-out CE minus the full-KD student's (nats)"),
        ("kl_gap", None, "kl_noise", "KL(teacher || student) minus the full-KD student's"),
    )
    for ax, (key, sd, noise_key, ylabel) in zip(axes, panels):
        for kind, marker in zip(KINDS, "osD"):
            pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["signal_bpt"])
            if pts:
                ax.errorbar(
                    [r["signal_bpt"] for r in pts],
                    [r[key] for r in pts],
                    yerr=[r[sd] for r in pts] if sd else None,
                    marker=marker,
                    capsize=3,
                    label=kind,
                )
        ax.axhline(0.0, color="k", lw=1, label="full KD (reference)")
        noise = info[noise_key]
        if not math.isnan(noise):
            ax.axhspan(
                -noise, noise, color="grey", alpha=0.25, label=f"± seed sd of full KD ({noise:.4f})"
            )
        ce = [r for r in rows if r["kind"] == "ce"]
        if ce:
            ax.axhline(
                ce[0][key], color="grey", ls=":", label=f"CE only, no teacher ({ce[0][key]:+.3f})"
            )
        ax.axvline(GOAL_BYTES, color="r", ls="--", lw=1, label=f"goal: {GOAL_BYTES:.0f} B/token")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("teacher signal, actual bytes per token on disk (parquet, zstd)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        choices=sorted(DEFAULTS),
        default="world",
        help="world: the `small` teacher and `tiny` students on the embedded world (311-token "
        "vocabulary); smollm2: SmolLM2-135M-Instruct and a student pruned from it, on the "
        "teacher's own answers (49k vocabulary). Sets the defaults marked (model)",
    )
    ap.add_argument(
        "--keep-every", type=int, default=6, help="smollm2: the student keeps every n-th layer"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="paired student seeds")
    ap.add_argument(
        "--noise-seeds",
        type=int,
        nargs="*",
        help="extra seeds trained with full KD only, for the seed-noise estimate (model)",
    )
    ap.add_argument("--steps", type=int, help="student steps per run (model)")
    ap.add_argument("--batch", type=int, help="rows per student step (model)")
    ap.add_argument("--lr", type=float, help="student peak learning rate (model)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="kd_alpha of every distilled student (1: pure KD, the signal alone)",
    )
    ap.add_argument("--budgets", type=int, nargs="+", help="bytes per token (model)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="KIND:BUDGET",
        help="points not to run, e.g. sampled:64 (a point over the 40 B/token goal, to save time)",
    )
    ap.add_argument(
        "--no-grad-cos",
        dest="grad_cos",
        action="store_false",
        help="skip the gradient cosines (the table shows nan)",
    )
    ap.add_argument("--train-rows", type=int, help="rows scored and trained on (model)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 holds up best on a shared, oversubscribed 2-core box)",
    )
    ap.add_argument("--out", type=Path, help="scratch folder, reused by a rerun (model)")
    ap.add_argument(
        "--no-write", action="store_true", help="print only: no md, png or results.json"
    )
    a = ap.parse_args()
    for key, value in DEFAULTS[a.model].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.train_rows < a.batch * a.grad_batches:
        # the gradient cosines read the first grad_batches batches of the training rows
        ap.error(
            f"--train-rows {a.train_rows} is below --batch x grad_batches "
            f"({a.batch} x {a.grad_batches} = {a.batch * a.grad_batches}): raise --train-rows"
        )
    torch.set_num_threads(a.threads)
    t_start = time.time()

    from raydapt.models import load_tokenizer

    a.out.mkdir(parents=True, exist_ok=True)
    if a.model == "smollm2":
        tdir, a.student_dir, rows, held_rows, tinfo = smollm2_inputs(a, a.out)
        tok = load_tokenizer(tdir)
    else:
        tdir, a.student_dir = build_teacher(a, a.out), None
        tinfo = json.loads((tdir / "trained.json").read_text())
        tok = load_tokenizer(tdir)
        rows = packed_rows(a.out / "world" / "train.jsonl", tok)
        held_rows = packed_rows(a.out / "world" / "heldout.jsonl", tok)
    pick = np.random.default_rng(7).permutation(len(rows))[: a.train_rows]
    train_rows = [rows[i] for i in sorted(pick)]
    a.train_rows = len(train_rows)
    for _, m in train_rows:
        m[-1] = 0  # as teach.work.score_batch: the last position predicts nothing
    sc = Scorer(tdir, [r[0] for r in train_rows], [r[1] for r in train_rows])
    teacher = sc.teacher_model  # one copy in memory: it scores the tables and teaches full KD
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_tok = sum(len(r[0]) for r in train_rows)
    log(
        f"{len(train_rows)} train rows ({n_tok} tokens), {len(held_rows)} held-out rows; "
        f"vocab {len(tok)}"
    )

    from raydapt.rows import collate

    held_tab = rows_table(held_rows)
    hb = [
        collate(held_tab, np.arange(i, min(i + a.held_batch, len(held_rows))), tok.pad_token_id)
        for i in range(0, len(held_rows), a.held_batch)
    ]
    t_lp = []
    with torch.inference_mode():
        for b in hb:
            t_lp.append(
                torch.log_softmax(
                    teacher(input_ids=b["input_ids"], use_cache=False).logits.float(), -1
                )
            )
    teacher_eval = held_eval(teacher, hb, t_lp)
    teacher.eval()
    log(f"teacher held-out CE {teacher_eval['held_ce']:.4f}, ECE {teacher_eval['ece']:.4f}")

    results = []
    for seed in a.seeds:
        t0 = time.time()
        results += run_seed(a, seed, tdir, sc, hb, t_lp, teacher, a.out)
        log(f"seed {seed} done in {time.time() - t0:.0f} s")
    noise_runs = []
    for seed in [s for s in a.noise_seeds if s not in a.seeds]:
        t0 = time.time()
        noise_runs += run_seed(a, seed, tdir, sc, hb, t_lp, teacher, a.out, only_full=True)
        log(f"noise seed {seed} (full KD only) done in {time.time() - t0:.0f} s")
    rows_s, info = summarize(results, a.seeds, noise_runs)
    wall = time.time() - t_start
    table_md = fmt_table(rows_s)
    print(table_md)
    v = verdicts(rows_s, info)
    for kind, d in v.items():
        if d["best"] is None:
            print(f"{kind}: no point at <= {GOAL_BYTES:.0f} B/token")
        else:
            b = d["best"]
            print(
                f"{kind}: best at <= {GOAL_BYTES:.0f} B/token: budget {b['budget']} "
                f"({b['signal_bpt']:.1f} B/token) gap {b['gap']:+.4f} "
                f"vs seed noise {info['noise']:.4f}: "
                f"{'within' if d['met'] else 'NOT within'}"
            )
    print(f"wall {wall:.0f} s")
    summary = a.out / ("summary.json" if a.alpha == 1 else f"summary_alpha{a.alpha}.json")
    json.dump(
        {
            "rows": rows_s,
            "info": info,
            "teacher": tinfo,
            "teacher_eval": teacher_eval,
            "args": {k: str(x) for k, x in vars(a).items()},
            "wall_s": wall,
        },
        open(summary, "w"),
        indent=1,
        default=str,
    )
    if (
        a.no_write or a.alpha != 1
    ):  # a side study (another kd_alpha) leaves the headline files alone
        log(f"summary in {summary}; md, png and results.json left as they were")
        return
    bench = Path(__file__).resolve().parent
    name = "signal_frontier" if a.model == "world" else f"signal_frontier_{a.model}"
    if a.model == "world":
        title = (
            f"signal frontier: tiny student, {a.steps} steps x {a.batch} rows, seeds {a.seeds}; "
            f"teacher small ({tinfo['steps']} CE steps), V={tinfo['vocab']}"
        )
    else:
        title = (
            f"signal frontier on SmolLM2-135M-Instruct (V={tinfo['vocab']}): student of "
            f"{len(tinfo['student_layers'])} layers, {a.steps} steps x {a.batch} rows, "
            f"seeds {a.seeds}"
        )
    plot(rows_s, info, bench / f"{name}.png", title)
    figures = [
        ("full KD held-out CE (nats)", info["full_mean"], ""),
        (
            "full KD seed noise (sd of held-out CE, nats)",
            0.0 if math.isnan(info["noise"]) else info["noise"],
            "",
        ),
    ]
    for kind, d in v.items():
        if d["best"] is not None:
            goal = f"<= {info['noise']:.4f}" if not math.isnan(info["noise"]) else ""
            figures.append(
                (
                    f"{kind}: best held-out gap to full KD at <= 40 B/token (nats)",
                    d["best"]["gap"],
                    goal,
                )
            )
            figures.append((f"{kind}: bytes/token of that point", d["best"]["signal_bpt"], "<= 40"))
            kl_goal = f"<= {info['kl_noise']:.4f}" if not math.isnan(info["kl_noise"]) else ""
            figures.append(
                (
                    f"{kind}: best KL(teacher||student) gap to full KD at <= 40 B/token",
                    d["best_kl"]["kl_gap"],
                    kl_goal,
                )
            )
    settings = {
        "alpha": a.alpha,
        "seeds": a.seeds,
        "steps": a.steps,
        "batch": a.batch,
        "lr": a.lr,
        "budgets": a.budgets,
        "train_rows": a.train_rows,
        "teacher_steps": tinfo["steps"],
        "wall_s": round(wall),
    }
    record(name, figures, settings)
    timing = {
        "tables_s": sum(
            json.loads(f.read_text()).get("score_s", 0) for f in (a.out / "tables").glob("*.json")
        ),
        "runs": len(results) + len(noise_runs),
        "runs_s": sum(r["wall_s"] for r in results + noise_runs),
    }
    write_md(
        bench / f"{name}.md",
        a,
        rows_s,
        info,
        v,
        tinfo,
        teacher_eval,
        wall,
        n_tok,
        len(held_rows),
        table_md,
        timing,
    )
    log(f"wrote {bench / name}.md and .png")


def write_md(
    path, a, rows, info, v, tinfo, teacher_eval, wall, n_tok, n_held, table_md, timing
) -> None:
    noise = info["noise"]
    full = next(r for r in rows if r["kind"] == "full")
    ce = next((r for r in rows if r["kind"] == "ce"), None)
    smol = a.model == "smollm2"
    lines = [
        "# Teacher-signal frontier: student quality against stored bytes per token"
        + (" (SmolLM2-135M-Instruct)" if smol else ""),
        "",
        "Issue 15, item 3. Generated by `bench/signal_frontier.py` "
        f"(`{'--model smollm2 ' if smol else ''}--seeds {' '.join(map(str, a.seeds))} "
        f"--steps {a.steps}`) on "
        f"{time.strftime('%Y-%m-%d')} on a shared 2-core CPU machine (no GPU), from the cached "
        f"runs under `{a.out}`. Compute: teacher {'answers ' if smol else ''}"
        f"{tinfo['wall_s'] / 60:.1f} min, scoring the "
        f"tables {timing['tables_s'] / 60:.1f} min, {timing['runs']} student runs "
        f"{timing['runs_s'] / 60:.1f} min (train + eval; gradient cosines and reruns not counted); "
        f"this invocation {wall / 60:.1f} min.",
        "",
        "## Verdict",
        "",
    ]
    if math.isnan(noise):
        lines.append("One seed only: no seed-noise estimate, so no verdict on the goal.")
    else:
        lines.append(
            "Goal: within seed noise of full-KD quality at no more than "
            f"{GOAL_BYTES:.0f} bytes per "
            f"token. Seed noise here is the standard deviation over {len(info['full_ce'])} seeds "
            f"(the {len(a.seeds)} paired seeds plus the full-KD-only noise seeds) of the "
            f"full-KD student's held-out CE: **{noise:.4f} nats** (full KD: "
            f"{', '.join(f'{x:.4f}' for x in info['full_ce'])})."
        )
        lines.append("")
        for kind in KINDS:
            d = v.get(kind, {"best": None})
            b = d["best"]
            if b is None:
                lines.append(f"- **{kind}**: no point at or under {GOAL_BYTES:.0f} B/token.")
                continue
            lines.append(
                f"- **{kind}**: best point at <= {GOAL_BYTES:.0f} B/token is budget {b['budget']} "
                f"({b['signal_bpt']:.1f} B/token on disk), held-out gap {b['gap']:+.4f} nats "
                f"(per seed {', '.join(f'{g:+.4f}' for g in b['gaps'])}): "
                f"**{'meets' if d['met'] else 'does not meet'}** the goal."
            )
        lines += [
            "",
            f"The same rule on KL(teacher || student) (seed sd of full KD's KL: "
            f"{info['kl_noise']:.4f}):",
        ]
        for kind in KINDS:
            d = v.get(kind, {"best": None})
            if d["best"] is not None:
                b = d["best_kl"]
                lines.append(
                    f"- {kind}: best KL gap at <= {GOAL_BYTES:.0f} B/token {b['kl_gap']:+.4f} "
                    f"(budget {b['budget']}, {b['signal_bpt']:.1f} B/token): "
                    f"{'meets' if d['met_kl'] else 'does not meet'}."
                )
        met = [k for k in KINDS if v.get(k, {}).get("met")]
        lines += [
            "",
            f"**{'Met by ' + ', '.join(met) if met else 'No kind meets the goal'}** "
            f"by this rule (mean paired gap <= the seed sd of full KD).",
            "",
            "The rule takes each kind's best point, a best-of-a-few that flatters noisy "
            "points, and compares a paired gap with an unpaired sd; so here is every point "
            f"at <= {GOAL_BYTES:.0f} B/token (held-out CE gap, mean over seeds):",
        ]
        for kind in KINDS:
            pts = sorted(
                (r for r in rows if r["kind"] == kind and r["signal_bpt"] <= GOAL_BYTES),
                key=lambda r: r["signal_bpt"],
            )
            inside = sum(abs(r["gap"]) <= noise for r in pts)
            lines.append(
                f"- {kind}: "
                + ", ".join(f"{r['signal_bpt']:.1f} B: {r['gap']:+.4f}" for r in pts)
                + f" ({inside} of {len(pts)} within ±{noise:.4f})"
            )
        lines.append("")
        if ce is not None:
            lines.append(
                f"For scale: CE alone (no teacher) is {ce['gap']:+.4f} nats from full KD "
                "at the same "
                f"steps, KL(teacher || student) {ce['kl']:.4f} against full KD's {full['kl']:.4f}."
            )
    lines += [
        "",
        "## Table",
        "",
        f"Means over seeds {a.seeds}; the gap is paired (same seed, init, batches). "
        "`signal B/tok`: compressed bytes of the signal columns on disk over all stored tokens; "
        "`file B/tok`: the whole parquet file (with input_ids, loss_mask, id); `nominal`: "
        "`sampled_kd.bytes_per_token` (fixed width, uncompressed, s slots). KL(T‖S) is exact over "
        f"the {tinfo['vocab']}-token vocabulary; ECE over {N_BINS} bins; grad cos: the loss "
        f"gradient's cosine to the full-KD gradient, mean over {a.grad_batches} fixed batches, at "
        "the student init (`init`) and at the trained full-KD student of the same seed "
        "(`trained`).",
        "",
        table_md,
        "",
        f"![frontier]({path.stem}.png)",
        "",
        "## Set-up and choices",
        "",
        *(smollm2_setup if smol else world_setup)(a, tinfo, teacher_eval, n_tok, n_held),
        "- Tables: `HFBackend(ActorSpec(signal, k, samples, seed=student seed, id_dtype=uint16))"
        ".signal_of` on the teacher's float32 log-probs, computed once per row (what `.score` "
        "returns), then `teach.work.scored_table`, written with `pq.write_table(..., "
        "compression='zstd')` and read back for training.",
        "- topk: k = budget / 4 (4 B per entry nominal). Compression puts the actual bytes well "
        "under the budget, so each topk point sits left of its budget on the plot.",
        "- sampled: the largest s whose actual signal bytes fit the budget (searched on "
        f"{CALIB_ROWS} evenly spaced calibration rows with the backend's own draw code, then "
        "checked on the full table and searched again with a lower target if it overshoots). "
        f"s is capped at {S_MAX} draws: past that the budget does not bind (the distinct ids "
        "saturate at the teacher's effective support), and a budget whose table would repeat a "
        "smaller budget's is not trained again (the table lists the point once).",
        "- topk+sampled: k = budget / 8 (half the budget, nominal), then the largest s of tail "
        "draws whose actual head + draws bytes fit the whole budget.",
        "",
        "Scratch, tables and per-run records: " + f"`{a.out}` (summary.json).",
        "",
    ]
    for side in sorted(Path(a.out).glob("summary_alpha*.json")):
        d = json.loads(side.read_text())
        sargs = d["args"]
        lines += [
            f"## Side study: kd_alpha {sargs['alpha']} (KD mixed with CE)",
            "",
            f"Seeds {sargs['seeds']}, budgets {sargs['budgets']}, otherwise the same set-up "
            f"(`--alpha {sargs['alpha']} --seeds ... --budgets ... --noise-seeds`); "
            "gaps are to the "
            "full-KD student trained at the same kd_alpha. Pure KD (the main table) asks the "
            "stored signal to carry everything; with a CE term the student also learns the "
            "observed next token, which is what a top-k store lacks inside its tail.",
            "",
            fmt_table(d["rows"]),
            "",
        ]
    # a hand-written reading below the marker survives a rerun (it is about that run's numbers)
    old = path.read_text() if path.is_file() else ""
    if HAND_MARK in old:
        lines += [HAND_MARK + old.split(HAND_MARK, 1)[1].rstrip("\n")]
    path.write_text("\n".join(lines) + "\n")


def student_recipe(a) -> str:
    return (
        f"{a.steps} steps of "
        f"{a.batch} rows, AdamW lr {a.lr} (betas 0.9/0.95, no decay), {a.warmup} warmup steps, "
        f"cosine to 10%, clip 1.0; kd_alpha {a.alpha} (1: pure KD, the signal alone), forward KL "
        "at tau 1 (`kd_of(TrainConfig(kd_loss='forward_kl'))`). The same batch "
        "order per seed for every kind."
    )


def world_setup(a, tinfo, teacher_eval, n_tok, n_held) -> list[str]:
    return [
        f"- World: `write_world(n_train=2000, n_heldout=200, n_markov=1000, seed=0)`, tokenizer of "
        f"{tinfo['vocab']} tokens; rows tokenized by `prepare.tokenize.Tokenize` and packed to "
        f"{SEQ_LEN} tokens (`rows.pack`). Students train on {a.train_rows} packed rows "
        f"({n_tok} tokens); held-out: {n_held} packed rows of heldout.jsonl.",
        f"- Teacher: `small` preset (4 layers, hidden 256), {tinfo['steps']} CE steps of 16 rows, "
        f"AdamW lr {a.teacher_lr}, in {tinfo['wall_s']:.0f} s; held-out CE "
        f"{teacher_eval['held_ce']:.4f}, ECE {teacher_eval['ece']:.4f}.",
        "- Students: `tiny` preset (2 layers, hidden 128), one init per seed; " + student_recipe(a),
    ]


def smollm2_setup(a, tinfo, teacher_eval, n_tok, n_held) -> list[str]:
    return [
        "- Rows: `jobs/smollm2-distill.yaml`'s prepare and teach stages with `teach.kind="
        "generate`: the teacher's own answers (vLLM pool, temperature "
        f"{tinfo['temperature']}, up to {tinfo['max_tokens']} new tokens) to the world's open "
        "instructions through its chat template, loss on the answer tokens. Students train on "
        f"{a.train_rows} rows ({n_tok} tokens); held-out: the teacher's answers to "
        f"{n_held} validation prompts. Making the answers took {tinfo['wall_s']:.0f} s.",
        f"- Teacher: SmolLM2-135M-Instruct, float32, {tinfo['vocab']}-token vocabulary; on "
        f"its own held-out answers CE {teacher_eval['held_ce']:.4f}, ECE "
        f"{teacher_eval['ece']:.4f}.",
        f"- Student: cut from the teacher (`raydapt.prune`, layers {tinfo['student_layers']}, "
        f"{tinfo['student_params'] / 1e6:.1f}M parameters), the same init for every seed (the "
        "seed sets the batch order and the teacher's draws); " + student_recipe(a),
    ]


if __name__ == "__main__":
    main()
