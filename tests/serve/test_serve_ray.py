"""`raydapt serve` end to end: real Ray Serve, real vLLM, real HTTP on 127.0.0.1.

One app per module (engine start ~35 s): a tiny Llama plus a PEFT LoRA adapter with random,
non-zero lora_B, API keys on, and small overload limits so a burst meets Serve's backpressure.

    .venv/bin/python -m pytest tests/serve -x -q
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import threading

import pytest
from builders import free_port

pytestmark = pytest.mark.slow

KEY = "sk-test-raydapt-123"
ADAPTER = "tiny-lora"
ADAPTER2 = "tiny-lora-2"
MAX_LEN = 128


def make_adapter(model_dir, out, seed: int = 1):
    """A PEFT LoRA on q/v with random non-zero B, so the adapter changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, ray_session):
    from ray import serve

    from raydapt.config import job_from_dict
    from raydapt.pipeline import run_stage

    ray_session()
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")
    adapter2 = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora2") / "adapter", seed=2)
    os.environ["RAYDAPT_TEST_KEYS"] = f"other-key,{KEY}"
    cfg = job_from_dict(
        {
            "output_dir": str(tmp_path_factory.mktemp("serve_out")),
            "serve": {
                "name": "tiny",
                "adapters": {ADAPTER: str(adapter), ADAPTER2: str(adapter2)},
                "max_loras": 1,
                "port": free_port(),
                "max_model_len": MAX_LEN,
                "dtype": "float32",
                "max_ongoing_requests": 8,
                "max_queued_requests": 4,
                "max_n": 4,
                "api_keys_env": "RAYDAPT_TEST_KEYS",
                "cpus_per_replica": 1.0,
            },
        }
    )
    url = run_stage("serve", cfg, model_dir=str(tiny_model_dir), block=False)["url"]
    yield {"url": url, "model_dir": tiny_model_dir}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(
        base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def test_models_and_health(server, client, http):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny", ADAPTER, ADAPTER2]
    assert httpx.get(server["url"] + "/health").status_code == 200  # no key needed


def test_completion_and_chat(client):
    r = client.completions.create(model="tiny", prompt="12+34=", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    again = client.completions.create(model="tiny", prompt="12+34=", max_tokens=6, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic

    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "sort 3 1 2"}],
        max_tokens=6,
        temperature=0,
    )
    assert c.choices[0].message.role == "assistant" and isinstance(
        c.choices[0].message.content, str
    )
    assert (
        c.usage.prompt_tokens > 3
        and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    )


def test_batch_prompts_n_and_seed(client, server):
    from raydapt.models import load_tokenizer

    ids = load_tokenizer(server["model_dir"])("7+8=")["input_ids"]
    r = client.completions.create(
        model="tiny", prompt=["1+1=", "9+9="], max_tokens=4, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    s1 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=1.0, seed=7)
    s2 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=1.0, seed=7)
    assert s1.choices[0].text == s2.choices[0].text and s1.usage.prompt_tokens == len(ids)


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", max_tokens=8, temperature=0)
    resp = client.completions.create(prompt="5+5=", **kw)
    full = resp.choices[0].text
    parts = [
        ch.choices[0].text
        for ch in client.completions.create(prompt="5+5=", stream=True, **kw)
        if ch.choices
    ]
    assert len(parts) >= 2 and "".join(parts) == full
    chunks = list(
        client.completions.create(
            prompt="5+5=", stream=True, echo=True, stream_options={"include_usage": True}, **kw
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == "5+5=" + full and chunks[0].choices[0].text.startswith("5+5=")
    assert (
        chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
        and not chunks[-1].choices
    )

    msgs = [{"role": "user", "content": "reverse abc"}]
    full = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    deltas = [
        ch.choices[0].delta.content or ""
        for ch in client.chat.completions.create(messages=msgs, stream=True, **kw)
        if ch.choices
    ]
    assert "".join(deltas) == full


def test_echo_logprobs_score_prompt(client, server):
    """lm-eval style scoring: echo + logprobs; values agree with the model's own sampling
    logprobs."""
    from raydapt.models import load_tokenizer

    ids = load_tokenizer(server["model_dir"])("12+34=46")["input_ids"]
    gen = client.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=4,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    glp = gen.choices[0].logprobs
    new_ids = [int(t.split(":")[1]) for t in glp.tokens]
    assert len(new_ids) == 4

    score = client.completions.create(
        model="tiny",
        prompt=ids + new_ids,
        max_tokens=0,
        echo=True,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = score.choices[0].logprobs
    assert [int(t.split(":")[1]) for t in lp.tokens] == ids + new_ids
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(math.isfinite(x) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # prompt logprobs of the generated tokens == the logprobs they had when sampled
    for a, b in zip(lp.token_logprobs[-4:], glp.token_logprobs, strict=False):
        assert abs(a - b) < 1e-3, (lp.token_logprobs[-4:], glp.token_logprobs)
    # greedy tokens are the argmax of their position's top-1
    for tok, top in zip(lp.tokens[-4:], lp.top_logprobs[-4:], strict=False):
        assert max(top, key=top.get) == tok

    again = client.completions.create(
        model="tiny",
        prompt=ids + new_ids,
        max_tokens=0,
        echo=True,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert again.choices[0].logprobs.token_logprobs == lp.token_logprobs

    text = client.completions.create(
        model="tiny", prompt="12+34=46", max_tokens=1, echo=True, logprobs=2
    )
    tlp = text.choices[0].logprobs
    assert text.choices[0].text.startswith("12+34=46") and len(tlp.tokens) == len(ids) + 1
    assert tlp.text_offset[0] == 0 and tlp.top_logprobs[1] is not None


def test_lora_switch(client):
    kw = dict(prompt="12+34=", max_tokens=8, temperature=0, logprobs=1)
    base = client.completions.create(model="tiny", **kw).choices[0]
    lora = client.completions.create(model=ADAPTER, **kw).choices[0]
    assert base.logprobs.token_logprobs != lora.logprobs.token_logprobs
    assert base.text != lora.text
    assert (
        client.completions.create(model="tiny", **kw).choices[0].text == base.text
    )  # base unchanged
    chat = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == ADAPTER


def test_lora_lru_eviction_and_reload(client):
    """max_loras=1: each switch evicts the other adapter; a reloaded adapter gives the same
    output."""
    kw = dict(prompt="add 12 34", max_tokens=8, temperature=0, logprobs=1)
    first = client.completions.create(model=ADAPTER, **kw).choices[0]
    other = client.completions.create(model=ADAPTER2, **kw).choices[0]
    again = client.completions.create(model=ADAPTER, **kw).choices[0]
    assert other.logprobs.token_logprobs != first.logprobs.token_logprobs
    assert again.text == first.text
    assert again.logprobs.token_logprobs == pytest.approx(first.logprobs.token_logprobs, abs=1e-4)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny", "prompt": "1+1=", "max_tokens": "many"}, "max_tokens"),
        ({"model": "tiny", "prompt": 123}, "prompt"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": []}, "prompt"),
        ({"model": "tiny", "prompt": "1+1=", "max_tokens": MAX_LEN}, "max_tokens"),
        ({"model": "tiny", "prompt": "1+1=", "n": 5}, "n"),
        ({"model": "tiny", "prompt": "1+1=", "temperature": -1}, "temperature"),
        ({"model": "tiny", "prompt": "1+1=", "logprobs": 50}, "logprobs"),
        ({"model": "tiny", "prompt": "1+1=", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "1+1="}, "model"),
    ],
)
def test_bad_completion_requests(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_chat_and_json(http, client):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 600}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post(
        "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "1"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and err["available_models"] == ["tiny", ADAPTER, ADAPTER2]
    assert "tiny" in err["message"]
    import openai

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="1", n=9)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="1")
    assert client.completions.create(model="tiny", prompt="1", max_tokens=2).choices  # still up


def test_auth(server):
    import httpx

    url = server["url"]
    body = {"model": "tiny", "prompt": "1+1=", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert (
        httpx.get(url + "/v1/models", headers={"Authorization": "Bearer other-key"}).status_code
        == 200
    )
    assert httpx.get(url + "/health").status_code == 200


def test_burst_overload_then_healthy(server, http):
    """32 requests at once against 8 ongoing + 4 queued: each is answered, 503s carry
    Retry-After."""
    import httpx

    barrier = threading.Barrier(32)

    def one(i: int) -> httpx.Response:
        body = {"model": "tiny", "prompt": f"{i}+{i}=", "max_tokens": 32, "temperature": 0}
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            return c.post(
                server["url"] + "/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {KEY}"},
            )

    with cf.ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(one, range(32), timeout=180))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 8
    assert codes.count(503) >= 1, codes  # more than 12 at once must meet backpressure
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["choices"][0]["text"] is not None
    assert http.get("/health").status_code == 200
    assert (
        http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "1", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_metrics(http):
    text = http.get("/metrics").text
    assert 'raydapt_requests_total{route="/v1/completions",status="200"}' in text
    assert 'raydapt_requests_total{route="/v1/completions",status="400"}' in text
    assert "raydapt_request_latency_seconds_bucket" in text
