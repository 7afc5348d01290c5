"""The transformers reference backend (`teach.backend=hf`): the same interface as VLLMBackend.

Scoring is one forward pass, `log_softmax` in float32 and a top-k, so `logits[t]` (the
distribution over token t+1) is row t directly. It is the ground truth for the vLLM parity
test and a fallback where vLLM does not run. Generation samples prompt by prompt with
`torch.manual_seed(row seed)`; it is reproducible but does not draw the same samples as vLLM.
"""

from __future__ import annotations

import hashlib

import numpy as np

from raydapt.models import load_model, load_tokenizer
from raydapt.teach.convert import cut_at_stop, pad_row
from raydapt.teach.spec import ActorSpec, Sampling

Sample = tuple[list[int], str, bool]


class HFBackend:
    name = "hf"

    def __init__(self, spec: ActorSpec):
        import torch

        self.set_signal(spec)
        dtype = "float32" if spec.dtype == "auto" else spec.dtype
        self.model = load_model(spec.model, dtype, trust_remote_code=spec.trust_remote_code).eval()
        self.tokenizer = load_tokenizer(spec.model)
        self.device = "cuda" if torch.cuda.is_available() and spec.num_gpus else "cpu"
        self.model.to(self.device)
        self.max_batch_tokens = int(spec.hf_batch_tokens)

    def set_signal(self, spec: ActorSpec) -> None:
        """Take what to store (teach.signal, k, samples, seed) from `spec`; the model stays, so
        a study can rebuild every signal from one loaded teacher (bench/signal_frontier.py)."""
        self.k, self.signal = int(spec.k), spec.signal
        self.samples, self.seed = int(spec.samples), int(spec.seed)

    def score(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each (T,) row -> (T, k) top-k ids and logprobs, in micro-batches of similar rows."""
        import torch

        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        i = 0
        while i < len(order):
            t_max = len(seqs[order[i]])
            j = i
            while (
                j < len(order)
                and (j - i + 1) * max(t_max, len(seqs[order[j]])) <= self.max_batch_tokens
            ):
                t_max = max(t_max, len(seqs[order[j]]))
                j += 1
            j = max(j, i + 1)
            group = order[i:j]
            with torch.inference_mode():
                for idx, res in zip(
                    group, self._score_group([seqs[g] for g in group]), strict=True
                ):
                    out[idx] = res
            i = j
        return out  # type: ignore[return-value]

    def _score_group(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        t_max = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), t_max), dtype=torch.long)  # (B, T)
        attn = torch.zeros((len(seqs), t_max), dtype=torch.long)  # (B, T)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.as_tensor(np.asarray(s, np.int64))
            attn[b, : len(s)] = 1
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device)
        ).logits  # (B, T, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        return [self.signal_of(logp[b, : len(s)], s) for b, s in enumerate(seqs)]

    def signal_of(self, logp, seq: np.ndarray) -> tuple:
        """One row's stored signal from its (T, V) float32 log-probs: what `score` returns for
        the row. Public so that a study holding the teacher's log-probs can rebuild any signal
        without another forward pass (bench/signal_frontier.py)."""
        if self.signal != "topk":
            return self._draws(logp, seq)
        top_lp, top_id = logp.topk(self.k, dim=-1)  # (T, k), sorted descending
        a = top_id.cpu().numpy().astype(np.int64)
        p = top_lp.cpu().numpy().astype(np.float32)
        pad_row(a, p, len(seq) - 1)
        return a, p

    def _draws(self, logp, seq: np.ndarray) -> tuple:
        """One row's sampled signal: (top-k ids, logprobs or None, draw ids, counts), (T, .)
        each; the generator is seeded from teach.seed and the row's tokens, so a row draws the
        same samples however it is batched. The last position (no next token) has no draws."""
        import torch

        from raydapt.teach.draws import draw_samples, topk_plus_samples

        h = hashlib.sha256(np.asarray(seq, np.int64).tobytes()).hexdigest()[:8]
        gen = torch.Generator(device=logp.device).manual_seed(self.seed ^ int(h, 16))
        a = p = None
        if self.signal == "sampled":
            ids, counts = draw_samples(logp, self.samples, gen)
        else:
            top_id, top_lp, ids, counts = topk_plus_samples(logp, self.k, self.samples, gen)
            a = top_id.cpu().numpy().astype(np.int64)
            p = top_lp.cpu().numpy().astype(np.float32)
            pad_row(a, p, len(seq) - 1)
        counts[-1] = 0
        return a, p, ids.cpu().numpy(), counts.cpu().numpy()

    def generate(
        self, prompts: list[list[int]], seeds: list[list[int]], gen: Sampling
    ) -> list[list[Sample]]:
        """len(seeds[i]) samples of prompt i, each drawn after torch.manual_seed(its seed)."""
        import torch

        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        results = []
        for prompt, row_seeds in zip(prompts, seeds, strict=True):
            x = torch.as_tensor([list(map(int, prompt))], device=self.device)  # (1, P)
            row = []
            for seed in row_seeds:
                torch.manual_seed(seed)
                with torch.inference_mode():
                    y = self.model.generate(
                        x,
                        attention_mask=torch.ones_like(x),
                        do_sample=gen.temperature > 0,
                        temperature=gen.temperature or None,
                        top_p=gen.top_p,
                        top_k=0,
                        max_new_tokens=gen.max_tokens,
                        eos_token_id=eos,
                        pad_token_id=pad,
                    )  # (1, P + new)
                row.append(self._sample(y[0, x.shape[1] :].tolist(), eos, gen.stop))
            results.append(row)
        return results

    def _sample(self, new: list[int], eos: int | None, stop: list[str]) -> Sample:
        ended = eos is not None and eos in new
        if ended:
            new = new[: new.index(eos) + 1]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stop)
        if stopped:  # like vLLM, the text ends before the stop string; ids follow the text
            new, ended = self.tokenizer(text, add_special_tokens=False)["input_ids"], False
        return new, text, ended
