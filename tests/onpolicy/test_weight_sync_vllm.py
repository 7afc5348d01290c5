"""Weight sync into a live vLLM engine (raydapt.teach.weights): the rollout side of on-policy KD.

A real engine in a Ray actor starts on model A, generates, takes model B's state dict through
the object store, and must then behave exactly like model B: greedy tokens equal to B's in
transformers on a prompt longer than one KV block (so a stale prefix cache would show), and
prompt log-probs equal to B's log_softmax. A bad payload is refused before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydapt.models import engine_dtype, init_model, load_tokenizer
from raydapt.teach.weights import check_payload, checkpoint_shapes, clean_name, to_payload

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _long_prompt(world_dir: Path, model_dir: Path, n: int = 160) -> list[int]:
    """World text through the model's tokenizer: longer than vLLM's 128-token CPU block."""
    tok = load_tokenizer(model_dir)
    ids: list[int] = []
    for line in (world_dir / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        ids += tok.encode(r.get("text") or r["prompt"] + " " + r["response"])
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError("world too small for the prompt")


def test_payload_names_and_shapes_are_checked(tiny_model_dir):
    model = _hf(tiny_model_dir)
    shapes = checkpoint_shapes(tiny_model_dir)
    tied = bool(model.config.tie_word_embeddings)
    payload = to_payload(model.state_dict())
    check_payload(payload, shapes, tied)  # the model's own weights pass
    first = next(iter(shapes))
    without = {"arrays": {k: v for k, v in payload["arrays"].items() if k != first}}
    with pytest.raises(ValueError, match=f"missing: {first}"):
        check_payload(without, shapes, tied)
    extra = {"arrays": {**payload["arrays"], "model.layers.9.mlp.up_proj.weight": np.zeros(2)}}
    with pytest.raises(ValueError, match="not in the model: model.layers.9.mlp.up_proj"):
        check_payload(extra, shapes, tied)
    bad = {"arrays": {**payload["arrays"], first: np.zeros((3, 3), np.float32)}}
    with pytest.raises(ValueError, match=r"shape: .*\(3, 3\) \(engine has"):
        check_payload(bad, shapes, tied)
    assert clean_name("_orig_mod.model._checkpoint_wrapped_module.norm.weight") == (
        "model.norm.weight"
    )


@pytest.mark.parametrize("multiprocess", [False, True], ids=["in-process", "multiprocess"])
def test_engine_takes_new_weights_in_place(
    tiny_model_dir, world_dir, tmp_path, ray_session, multiprocess
):
    """In-process engines take the tensors directly; vLLM's multiprocess engine (its default
    off CPU) through a safetensors file in shared memory. Both must end up as model B."""
    ray = ray_session()
    a = tiny_model_dir
    b = init_model("tiny", world_dir / "train.jsonl", tmp_path / "b", seed=1, tokenizer_from=a)
    prompt = _long_prompt(world_dir, a)
    model_b = _hf(b)
    want_b = _greedy(model_b, prompt, NEW_TOKENS)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if multiprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    shm_before = set(Path("/dev/shm").glob("raydapt-weights-*"))

    @ray.remote(num_cpus=1, runtime_env={"env_vars": env})
    class Rollout:
        def __init__(self, model: str, dtype: str):
            from raydapt.teach.spec import ActorSpec
            from raydapt.teach.vllm_backend import VLLMBackend

            self.b = VLLMBackend(ActorSpec(model=model, dtype=dtype, max_model_len=256, k=8))

        def greedy(self, prompt: list[int]) -> list[int]:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
            out = self.b.llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
            return list(out[0].outputs[0].token_ids)

        def load(self, payload: dict, version: int) -> float:
            return self.b.load_weights(payload, version)

        def score(self, seq: list[int]):
            return self.b.score([np.asarray(seq)])[0], self.b.weight_version

        def engine_pids(self) -> tuple[int, set[int]]:
            import os

            import psutil

            kids = {c.pid for c in psutil.Process().children(recursive=True)}
            return os.getpid(), kids

    actor = Rollout.remote(str(a), engine_dtype("auto", a, False))
    try:
        _, children = ray.get(actor.engine_pids.remote())
        assert bool(children) == multiprocess  # the engine core is a process of its own, or not
        before = ray.get(actor.greedy.remote(prompt))  # fills the prefix cache with A's KV
        assert before == _greedy(_hf(a), prompt, NEW_TOKENS)
        assert before != want_b, "A and B agree: the test could not see a failed sync"

        payload = ray.put(to_payload(model_b.state_dict()))
        seconds = ray.get(actor.load.remote(payload, 7))
        assert 0 < seconds < 30
        assert ray.get(actor.greedy.remote(prompt)) == want_b

        (ids, lps), version = ray.get(actor.score.remote(prompt))
        with torch.no_grad():
            ref = torch.log_softmax(model_b(input_ids=torch.tensor([prompt])).logits[0], -1)
        t = len(prompt) - 1
        got = np.take_along_axis(ref[:t].numpy(), ids[:t].astype(np.int64), 1)
        assert np.abs(got - lps[:t]).max() < 1e-4 and version == 7

        broken = to_payload(model_b.state_dict())
        broken["arrays"].pop("model.norm.weight")
        with pytest.raises(ray.exceptions.RayTaskError, match="missing: model.norm.weight"):
            ray.get(actor.load.remote(broken, 8))
        assert ray.get(actor.greedy.remote(prompt)) == want_b  # refused before loading anything
        # the shared-memory checkpoint is gone once loaded: nothing accumulates per sync
        assert set(Path("/dev/shm").glob("raydapt-weights-*")) == shm_before
    finally:
        ray.kill(actor)
