"""The training objective, chosen once from the config, called the same way every micro-batch.

    objective = build_objective(tc, teacher, has_topk)   # in setup, once
    loss, parts = objective(model, batch)                # every micro-batch, train and eval
    n = objective.count(batch)                           # positions the mean runs over

Why one object: the loop then has no branch on mode, teacher or target columns per
micro-batch (the torchtune pattern: the loss is built in setup). Every objective returns the
mean loss over `count(batch)` positions (so the loop can weight micro-batches and ranks by
it) and detached parts named in `parts` (the metrics it logs and reports).

    mode / targets                         objective      parts
    transfer + new_head=classification     Classification ce, acc
    full, lora, transfer                   NextToken      ce
    distill, targets without top-k         NextToken      ce   (sequence-level KD: CE on the
                                                                teacher's generated rows)
    distill, targets with top-k (offline)  TopKDistill    kd, ce, teacher_mass, tail_mass,
                                                          student_mass (diagnostics.py)
    distill, teach.signal sampled          SampledDistill kd, ce, student_mass (RS-KD)
    distill, teach.signal topk+sampled     TopKSampledDistill  as TopKDistill
    distill, teacher=online                OnlineDistill  kd, ce
    distill, on_policy, reverse_kl_sampled SampledReverseKL kd, kl_estimate
    distill, on_policy, other kd_loss      TopKDistill    as above (rows: the student's samples,
                                                                scored by the teacher pool)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydapt.config import TrainConfig
from raydapt.rows import next_token_targets
from raydapt.train.diagnostics import DIAGNOSTICS, Probe, signal_parts
from raydapt.train.heads import from_hidden, supports_hidden
from raydapt.train.losses import (
    KD,
    ce_loss,
    chunked_ce_from_hidden,
    chunked_distill_from_hidden,
    distill_loss,
    full_kd_loss,
    sampled_kl_estimate,
    sampled_reverse_kl,
    topk_kd_loss,
)
from raydapt.train.modes import is_classification
from raydapt.train.sampled_kd import sampled_kd_loss, topk_sampled_kd_loss

Batch = dict[str, Tensor]
Parts = dict[str, Tensor]


class Objective:
    """Base: next-token positions are counted; subclasses define `__call__`."""

    parts: ClassVar[tuple[str, ...]] = ("ce",)

    def count(self, batch: Batch) -> int:
        """Positions the loss averages over: CE positions (loss_mask, last position off)."""
        return int((batch["loss_mask"][:, :-1] > 0).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class NextToken(Objective):
    """Masked next-token cross-entropy, from the hidden states a `chunk` of positions at a
    time where the head allows it (raydapt.train.heads), so the logits never exist whole."""

    chunk: int | None = 128

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        ids, mask = batch["input_ids"], batch["loss_mask"]  # (B, T)
        if supports_hidden(model):
            ce = from_hidden(
                model, ids, lambda h, w: chunked_ce_from_hidden(h, w, ids, mask, self.chunk)
            )
        else:
            ce = ce_loss(model(input_ids=ids, use_cache=False).logits, ids, mask)
        return ce, {"ce": ce.detach()}


class Classification(Objective):
    """Cross-entropy of a sequence classification head on labelled rows (label >= 0)."""

    parts: ClassVar[tuple[str, ...]] = ("ce", "acc")

    def count(self, batch: Batch) -> int:
        return int((batch["label"] >= 0).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        logits = model(input_ids=batch["input_ids"]).logits.float()  # (B, C)
        labels = batch["label"]  # (B,), -1: unlabelled or padding
        ok = labels >= 0
        n = ok.sum().clamp_min(1)
        per_row = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")  # (B,)
        loss = torch.where(ok, per_row, 0.0).sum() / n
        acc = ((logits.argmax(-1) == labels) & ok).sum() / n
        return loss, {"ce": loss.detach(), "acc": acc.detach().float()}


def kd_of(tc: TrainConfig) -> KD:
    """The train.kd_* settings of the KD term (all but kd_alpha), as the losses take them."""
    return KD(tc.kd_loss, tc.kd_temperature, tc.jsd_beta, tc.kd_chunk)


@dataclass(frozen=True, eq=False)
class Distill(Objective):
    """alpha * KD + (1 - alpha) * CE; a subclass says where the teacher's distribution is."""

    kd: KD
    alpha: float
    parts: ClassVar[tuple[str, ...]] = ("kd", "ce")

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        return self.losses(model, batch)

    def losses(
        self, model: nn.Module, batch: Batch, probe: Probe | None = None
    ) -> tuple[Tensor, Parts]:
        """KD and CE on the whole logits; `probe` goes to the KD term (diagnostics.py)."""
        ids = batch["input_ids"]  # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        ce = ce_loss(logits, ids, batch["loss_mask"])
        return distill_loss(self.kd_term(logits, batch, probe), ce, self.alpha)

    def kd_term(self, logits: Tensor, batch: Batch, probe: Probe | None = None) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class StoredSignalDistill(Distill):
    """Distill against a stored teacher signal, logging its bias diagnostics every step
    (raydapt.train.diagnostics): teacher mass on the stored ids, the tail, student mass."""

    parts: ClassVar[tuple[str, ...]] = ("kd", "ce", *DIAGNOSTICS)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        probe = Probe()
        loss, parts = self.losses(model, batch, probe)
        return loss, parts | signal_parts(probe, batch["loss_mask"], batch.get("topk_logprobs"))


@dataclass(frozen=True, eq=False)
class TopKDistill(StoredSignalDistill):
    """KD against the stored teacher top-k, exact over k ids plus a tail bucket; KD and CE
    share one head matmul per chunk of hidden states where the head allows it."""

    def losses(
        self, model: nn.Module, batch: Batch, probe: Probe | None = None
    ) -> tuple[Tensor, Parts]:
        if not supports_hidden(model):
            return super().losses(model, batch, probe)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        top_ids, top_lp = batch["topk_ids"], batch["topk_logprobs"]  # (B, T, k)

        def both(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
            return chunked_distill_from_hidden(h, w, ids, mask, top_ids, top_lp, self.kd, probe)

        kd, ce = from_hidden(model, ids, both)
        return distill_loss(kd, ce, self.alpha)

    def kd_term(self, logits: Tensor, batch: Batch, probe: Probe | None = None) -> Tensor:
        ids, lp = batch["topk_ids"], batch["topk_logprobs"]  # (B, T, k)
        return topk_kd_loss(logits, ids, lp, batch["loss_mask"], self.kd, probe)


@dataclass(frozen=True, eq=False)
class SampledDistill(StoredSignalDistill):
    """Forward KL against the teacher's stored draws (teach.signal sampled: RS-KD's unbiased
    estimate). The store holds no teacher probability for a draw, so this signal's
    diagnostics are the student's mass on the drawn ids only."""

    parts: ClassVar[tuple[str, ...]] = ("kd", "ce", "student_mass")

    def kd_term(self, logits: Tensor, batch: Batch, probe: Probe | None = None) -> Tensor:
        ids, counts, mask = batch["sample_ids"], batch["sample_counts"], batch["loss_mask"]
        return sampled_kd_loss(logits, ids, counts, mask, self.kd, probe=probe).loss


@dataclass(frozen=True, eq=False)
class TopKSampledDistill(StoredSignalDistill):
    """teach.signal topk+sampled: the top k' exactly and the tail estimated from draws."""

    def kd_term(self, logits: Tensor, batch: Batch, probe: Probe | None = None) -> Tensor:
        ids, counts, mask = batch["sample_ids"], batch["sample_counts"], batch["loss_mask"]
        top_ids, top_lp = batch["topk_ids"], batch["topk_logprobs"]
        return topk_sampled_kd_loss(
            logits, top_ids, top_lp, ids, counts, mask, self.kd, probe=probe
        ).loss


@dataclass(frozen=True, eq=False)
class OnlineDistill(Distill):
    """Full-vocabulary KD against a live, frozen teacher."""

    teacher: nn.Module | None = None

    def kd_term(self, logits: Tensor, batch: Batch, probe: Probe | None = None) -> Tensor:
        ids = batch["input_ids"]  # no stored signal, nothing for a probe
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        return full_kd_loss(logits, t_logits, batch["loss_mask"], self.kd)


class SampledReverseKL(Objective):
    """On-policy per-token reverse KL on the student's own samples (losses.sampled_reverse_kl):
    needs the teacher's log-prob of each sampled token (`teacher_token_logprob`), not its
    top-k. Reports the surrogate (`kd`) and the k1 estimate of KL(q || p) (`kl_estimate`)."""

    parts: ClassVar[tuple[str, ...]] = ("kd", "kl_estimate")

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Parts]:
        ids = batch["input_ids"]  # (B, T)
        targets, mask = next_token_targets(ids, batch["loss_mask"])
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        b, t, v = logits.shape
        s_tok = -F.cross_entropy(
            logits.float().reshape(b * t, v), targets.reshape(b * t), reduction="none"
        ).view(b, t)
        t_tok = batch["teacher_token_logprob"]
        loss = sampled_reverse_kl(s_tok, t_tok, mask)
        return loss, {"kd": loss.detach(), "kl_estimate": sampled_kl_estimate(s_tok, t_tok, mask)}


def objective_class(
    tc: TrainConfig, online: bool, has_topk: bool, signal: str = "topk"
) -> type[Objective]:
    """Which objective `tc` trains with (see the module table); the driver uses it to know
    the parts every report carries before any worker starts. `signal`: teach.signal."""
    if is_classification(tc):
        return Classification
    on_policy_rows = tc.teacher == "on_policy" and has_topk  # not the validation split
    if tc.mode == "distill" and on_policy_rows and tc.kd_loss == "reverse_kl_sampled":
        return SampledReverseKL
    if tc.mode == "distill" and online:
        return OnlineDistill
    if tc.mode == "distill" and has_topk and signal != "topk" and not on_policy_rows:
        return SampledDistill if signal == "sampled" else TopKSampledDistill
    if tc.mode == "distill" and has_topk:
        return TopKDistill
    return NextToken


def build_objective(
    tc: TrainConfig, teacher: nn.Module | None = None, has_topk: bool = False, signal: str = "topk"
) -> Objective:
    """The objective of `tc`. `teacher`: the online teacher, if any; `has_topk`: the training
    rows carry topk_ids / topk_logprobs.

    Validation uses `build_objective(tc)`: CE (or the classification loss) only, since the
    validation split has no teacher targets."""
    cls = objective_class(tc, teacher is not None, has_topk, signal)
    if cls in (SampledDistill, TopKSampledDistill):
        return cls(kd_of(tc), tc.kd_alpha)
    if cls is OnlineDistill:
        return OnlineDistill(kd_of(tc), tc.kd_alpha, teacher)
    if cls is TopKDistill:
        return TopKDistill(kd_of(tc), tc.kd_alpha)
    if cls is NextToken:
        return NextToken(tc.kd_chunk)
    return cls()  # Classification, SampledReverseKL
