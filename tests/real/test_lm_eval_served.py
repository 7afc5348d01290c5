"""lm-eval's `local-completions` model against Ray Serve on SmolLM2-135M-Instruct.

The harness talks to the server only over HTTP, as it would to any OpenAI-compatible
endpoint: multiple-choice tasks are scored by echoed prompt logprobs (`echo`, `logprobs: 1`,
`max_tokens: 1` on token-id prompts), generation tasks by completions with `stop`. The tasks
are the ones shipped in raydapt/eval/lm_eval_tasks and read a local jsonl: nothing is
downloaded. One server for the module: about 3 minutes on a busy 2-core machine, two thirds
of it importing SmolLM2 and starting Serve; lm-eval's 48 scorings and 12 generations take ~25 s.
"""

from __future__ import annotations

import pytest
from builders import free_port

from raydapt.config import job_from_dict
from raydapt.eval.lm_eval import evaluate_served, served_lm
from raydapt.pipeline import run_stage

pytestmark = pytest.mark.slow
NAME = "smollm2"
MAX_LEN = 256


@pytest.fixture(scope="module")
def url(smollm2_dir, tmp_path_factory, ray_session):
    from ray import serve

    ray_session()
    cfg = job_from_dict(
        {
            "output_dir": str(tmp_path_factory.mktemp("serve_lm_eval")),
            "serve": {"name": NAME, "port": free_port(), "max_model_len": MAX_LEN},
        }
    )
    try:
        yield run_stage("serve", cfg, model_dir=str(smollm2_dir), block=False)["url"]
    finally:
        serve.shutdown()


def test_lm_eval_scores_the_capitals_tasks_through_the_server(url, smollm2_dir):
    """12 questions, 4 cities each (chance 0.25): SmolLM2 knows most capitals, by
    loglikelihood and by greedy generation stopped at the first `.`/`,`/newline."""
    metrics = evaluate_served(
        url,
        NAME,
        smollm2_dir,
        tasks=("raydapt_capitals", "raydapt_capitals_gen"),
        max_length=MAX_LEN,
    )
    mc, gen = metrics["raydapt_capitals"], metrics["raydapt_capitals_gen"]
    print("lm-eval:", metrics)
    assert mc["acc,none"] >= 0.65, mc  # measured 0.833; transformers agrees (10 of 12)
    assert gen["exact_match,strip"] >= 0.5, gen


def test_lm_eval_loglikelihoods_equal_transformers_on_the_same_tokens(url, smollm2_dir):
    """The served scores lm-eval sums are the model's: the continuation's log_softmax under
    transformers (float32, same folder), with lm-eval's own context/continuation split."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Marseille"),
        ("The capital of Russia is", " Saint Petersburg"),
        ("Question: What is the capital of Japan?\nAnswer:", " Tokyo"),
    ]
    lm = served_lm(url, NAME, smollm2_dir, max_length=MAX_LEN)
    got = lm.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        disable_tqdm=True,
    )

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for (context, continuation), (served, greedy) in zip(pairs, got, strict=True):
        # lm-eval's split: encode the whole text, the continuation is what follows the context
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        assert 0 < n_ctx < len(whole)
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0]
        lps = torch.log_softmax(logits.float(), dim=-1)
        ref = sum(lps[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))
        ref_greedy = all(lps[t - 1].argmax().item() == whole[t] for t in range(n_ctx, len(whole)))
        print(f"{context!r} + {continuation!r}: served {served:.5f} transformers {ref:.5f}")
        assert served == pytest.approx(ref, abs=1e-2)
        assert greedy == ref_greedy
    assert got[0][0] > got[1][0] and got[0][1]  # Paris over Marseille, and Paris is greedy
