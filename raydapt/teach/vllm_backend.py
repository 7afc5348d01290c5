"""The vLLM backend: one `vllm.LLM` engine, scoring top-k logprobs and sampling completions.

Scoring asks for `prompt_logprobs=k` on the first T-1 tokens of a row plus `logprobs=k` on
the one token it then samples. Position p of the prompt logprobs is the distribution over
token p (so row t = p-1 for t = 0..T-3), and the sampled token's logprobs are the
distribution after tokens 0..T-2, i.e. row T-2. Both come from the same raw logits
(`logprobs_mode="raw_logprobs"`, before temperature), so a row as long as the engine's
`max_model_len` still fits, which a prompt of T tokens plus one output token would not.
We ask for `flat_logprobs` and `detokenize=False`: the engine then hands back flat lists
and skips decoding every top-k token to text, which is most of the per-token overhead.

On CPU the engine runs inside the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which
also keeps the single worker in that process). By default vLLM starts an engine-core process
and then a worker process, each importing torch and vLLM again: on 2 cores that was 47 s of
a 53 s engine start, against 19 s in-process, with identical scores. Scoring is somewhat
slower in-process (6.0 s against 4.7 s for 256 rows in a Ray actor: the engine-core process
had overlapped the model with the caller's logprob conversion), so a pool scoring millions of
rows should set the variable to 1, which gives vLLM's default. With the default, only a script
that builds the engine itself needs the
`if __name__ == "__main__"` guard; inside a Ray actor the subprocesses start fine.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raydapt.teach import dense_logprobs
from raydapt.teach.convert import dense_from_flat, pad_row
from raydapt.teach.spec import ActorSpec, Sampling

Sample = tuple[list[int], str, bool]  # (response token ids, text, ended with eos)


class VLLMBackend:
    """A vLLM engine held for the life of the object (one per teacher actor)."""

    name = "vllm"

    def __init__(self, spec: ActorSpec):
        from vllm import LLM

        tp = spec.tensor_parallel_size
        in_process_engine(tp)
        self.k, self.tp = int(spec.k), tp
        self.llm = LLM(
            model=spec.model,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len or None,
            max_logprobs=max(self.k, 1),
            enforce_eager=spec.enforce_eager,
            tensor_parallel_size=tp,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            trust_remote_code=spec.trust_remote_code,
            seed=spec.seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.model_dir = spec.model
        # prompt log-probs straight from the engine's tensors (teach/dense_logprobs.py); only
        # an engine in this process lets the patch see them
        self.dense = (
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
            and os.environ.get("RAYDAPT_DENSE_LOGPROBS", "1") != "0"
        )
        if self.dense:
            dense_logprobs.install()
        self.weight_version: int | str = 0  # bumped by every load_weights

    def load_weights(self, payload: dict, version: int | str) -> float:
        """Take a trainer's weights in place (raydapt.teach.weights); seconds taken.

        The payload is checked against this engine's checkpoint first, so a bad one raises
        ValueError and leaves the engine serving its old weights.
        """
        from raydapt.teach.weights import check_payload, checkpoint_shapes, load_into_engine

        if not hasattr(self, "_shapes"):
            self._shapes = checkpoint_shapes(self.model_dir)
            self._tied = bool(
                getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False)
            )
        check_payload(payload, self._shapes, self._tied)
        # tensor-parallel workers are processes of their own whatever the variable says
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and self.tp == 1
        seconds = load_into_engine(self.llm, payload, version, in_process)
        self.weight_version = version
        return seconds

    def score(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each (T,) row -> (T, k) top-k ids and logprobs (row t: distribution over token t+1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self.k
        sp = SamplingParams(
            max_tokens=1,
            prompt_logprobs=k,
            logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            temperature=1.0,
            extra_args=self._extra(),
        )
        todo = [i for i, s in enumerate(seqs) if len(s) >= 2]
        prompts = [TokensPrompt(prompt_token_ids=[int(x) for x in seqs[i][:-1]]) for i in todo]
        outs = self.llm.generate(prompts, sp, use_tqdm=False) if prompts else []
        result: list[tuple[np.ndarray, np.ndarray]] = [_all_pad(len(s), k) for s in seqs]
        for i, out in zip(todo, outs, strict=True):
            n = len(seqs[i])
            # prompt of n-1 tokens -> rows 0..n-3 (and a padded row n-2 that we overwrite)
            ids, lps = self._prompt_topk(out, n - 1)[:2]
            last_ids, last_lps = dense_from_flat(_shift(out.outputs[0].logprobs), 2, k)
            ids = np.concatenate([ids[:-1], last_ids[:1], np.zeros((1, k), np.int64)])  # (T, k)
            lps = np.concatenate([lps[:-1], last_lps[:1], np.zeros((1, k), np.float32)])  # (T, k)
            pad_row(ids, lps, n - 1)
            result[i] = (ids, lps)
        return result

    def score_tokens(
        self, seqs: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each (T,) row -> (T, k) top-k ids and logprobs, and (T,) the log-prob of the row's
        own next token (on-policy: the teacher's log p of each token the student sampled).

        Unlike `score`, the whole row is the prompt, so T + 1 must fit the engine's
        max_model_len; in exchange every position's actual token comes with its log-prob
        whatever its rank (vLLM puts it first at each position).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self.k
        sp = SamplingParams(
            max_tokens=1,
            prompt_logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            extra_args=self._extra(),
        )
        prompts = [TokensPrompt(prompt_token_ids=[int(x) for x in s]) for s in seqs]
        outs = self.llm.generate(prompts, sp, use_tqdm=False) if prompts else []
        result = []
        for seq, out in zip(seqs, outs, strict=True):
            n = len(seq)
            ids, lps, own_ids, own_lps = self._prompt_topk(out, n)  # row n-1 padded
            tok = np.zeros(n, np.float32)
            tok[: n - 1] = own_lps
            if not (own_ids == np.asarray(seq[1:])).all():
                raise RuntimeError(
                    "vLLM's prompt_logprobs no longer put each position's own token first; "
                    "score_tokens reads the teacher's token log-probs from there"
                )
            result.append((ids, lps, tok))
        return result

    def _extra(self) -> dict | None:
        return {dense_logprobs.DENSE: True} if self.dense else None

    def _prompt_topk(self, out: Any, n: int) -> tuple[np.ndarray, ...]:
        """One prompt of n tokens: (n, k) top-k ids and logprobs (row t: token t + 1; row n-1
        padded), and (n - 1,) each position's own token and its log-prob."""
        k = self.k
        if self.dense:
            dids, dlps, _ = dense_logprobs.take(out.request_id)
            ids, lps = dense_logprobs.topk_rows(dids, dlps, n, k)
            pad_row(ids, lps, n - 1)
            return ids, lps, dids[: n - 1, 0], dlps[: n - 1, 0]
        flat = out.prompt_logprobs
        ids, lps = dense_from_flat(flat, n, k)
        first = np.asarray(flat.start_indices[1:n], np.int64)
        own_ids = np.asarray(flat.token_ids, np.int64)[first]
        return ids, lps, own_ids, np.asarray(flat.logprobs, np.float32)[first]

    def generate(
        self, prompts: list[list[int]], seeds: list[list[int]], gen: Sampling
    ) -> list[list[Sample]]:
        """len(seeds[i]) samples of prompt i, one request per sample with its own seed.

        vLLM derives the seeds of an n > 1 request as seed + j, so rows with nearby seeds would
        share samples; one hashed seed per (row, sample) avoids that. Prefix caching still
        shares the prompt's KV cache between the samples of a prompt.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs, params = [], []
        for p, row_seeds in zip(prompts, seeds, strict=True):
            for seed in row_seeds:
                reqs.append(TokensPrompt(prompt_token_ids=list(map(int, p))))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=gen.temperature,
                        top_p=gen.top_p,
                        max_tokens=gen.max_tokens,
                        stop=list(gen.stop) or None,
                        seed=seed,
                    )
                )
        outs = iter(self.llm.generate(reqs, params, use_tqdm=False))
        eos = self.tokenizer.eos_token_id
        result = []
        for row_seeds in seeds:
            row = []
            for _ in row_seeds:
                c = next(outs).outputs[0]
                row.append(
                    (list(c.token_ids), c.text, bool(c.token_ids) and c.token_ids[-1] == eos)
                )
            result.append(row)
        return result


def in_process_engine(tensor_parallel_size: int) -> None:
    """Keep a CPU engine in this process unless the user chose otherwise (module docstring)."""
    from vllm.platforms import current_platform

    if tensor_parallel_size == 1 and current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class _shift:
    """View of a one-position sample FlatLogprobs as position 1 of a two-position prompt."""

    def __init__(self, flat: Any):
        self.token_ids, self.logprobs, self.ranks = flat.token_ids, flat.logprobs, flat.ranks
        self.start_indices = [0, flat.start_indices[0]]
        self.end_indices = [0, flat.end_indices[0]]


def _all_pad(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((n, k), np.int64)
    lps = np.full((n, k), -np.inf, np.float32)
    for t in range(n):
        pad_row(ids, lps, t)
    return ids, lps
