"""Prompt log-probs taken as dense arrays inside the engine (teach/dense_logprobs.py) equal
vLLM's own Python path exactly, and both equal transformers' log_softmax: a real engine in a
Ray actor scores rows with and without the hook, and generation stays untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
K = 8


def test_dense_prompt_logprobs_equal_the_python_path(tiny_model_dir, ray_session):
    import ray
    from transformers import AutoModelForCausalLM

    from raydapt.onpolicy.source import engine_env

    ray_session()

    # defined here so Ray pickles it by value (the test module is not importable by workers)
    def _both_paths(model: str, seqs: list[np.ndarray]) -> dict:
        from raydapt.teach.spec import ActorSpec, Sampling
        from raydapt.teach.vllm_backend import VLLMBackend

        be = VLLMBackend(ActorSpec(model=model, k=K, dtype="float32", max_model_len=96, seed=0))
        out = {"dense_on": be.dense}
        out["dense"] = (be.score(seqs), be.score_tokens(seqs))
        gen = be.generate([list(map(int, seqs[0][:5]))], [[7]], Sampling(max_tokens=6, seed=7))
        be.dense = False
        out["flat"] = (be.score(seqs), be.score_tokens(seqs))
        out["generate"] = gen == be.generate(
            [list(map(int, seqs[0][:5]))], [[7]], Sampling(max_tokens=6, seed=7)
        )
        return out

    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 300, n) for n in (9, 40, 64, 2)]
    task = ray.remote(num_cpus=1, runtime_env={"env_vars": engine_env(1.0, 0)})(_both_paths)
    got = ray.get(task.remote(str(tiny_model_dir), seqs))
    assert got["dense_on"] and got["generate"]  # generation is not tagged: same samples
    for mode in ("score", "score_tokens"):
        i = 0 if mode == "score" else 1
        for a, b in zip(got["dense"][i], got["flat"][i], strict=True):
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(x, y), mode
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for seq, (ids, lps, tok) in zip(seqs, got["dense"][1]):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.as_tensor(seq)[None]).logits[0].float(), -1)
        n = len(seq)
        want_lp, want_ids = ref[: n - 1].topk(K, -1)
        assert np.allclose(lps[: n - 1], want_lp.numpy(), atol=1e-4)
        assert np.allclose(tok[: n - 1], ref[torch.arange(n - 1), seq[1:]].numpy(), atol=1e-4)
        # ids agree wherever the top-k values are not tied
        gap = np.diff(want_lp.numpy(), axis=1) < -1e-5
        assert (ids[: n - 1, 0] == want_ids[:, 0].numpy())[gap[:, 0]].all()
