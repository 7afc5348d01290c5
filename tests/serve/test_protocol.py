"""Fast checks of the serve stage's pure parts: request validation, logprob layout, auth, adapters.

No Ray, no engine: the end-to-end behaviour over HTTP is in tests/serve/test_serve_ray.py.

    .venv/bin/python -m pytest tests/serve/test_protocol.py -q
"""

from __future__ import annotations

import json

import pytest

from raydapt.config import job_from_dict
from raydapt.errors import UserError
from raydapt.serve import build_spec, resolve_model_dir
from raydapt.serve import protocol as P
from raydapt.serve.auth import authorized, digest, load_key_digests
from raydapt.serve.lora import resolve_adapters


def _parse(body, cls=P.CompletionRequest):
    return P.parse_request(json.dumps(body).encode(), cls)


@pytest.mark.parametrize(
    "raw,param,code",
    [
        (b"{oops", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'{"prompt": "x"}', "model", "missing_required_parameter"),
        (b'{"model": "m", "prompt": "x", "max_tokens": "lots"}', "max_tokens", "invalid_type"),
        (b'{"model": "m", "prompt": {"a": 1}}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": "x", "echo": "maybe"}', "echo", "invalid_type"),
    ],
)
def test_parse_errors_name_the_field(raw, param, code):
    with pytest.raises(P.APIError) as e:
        P.parse_request(raw, P.CompletionRequest)
    body = e.value.body()["error"]
    assert e.value.status == 400 and body["param"] == param and body["code"] == code
    assert body["type"] == "invalid_request_error" and body["message"]


def test_chat_message_shapes():
    with pytest.raises(P.APIError) as e:
        _parse(
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, P.ChatCompletionRequest
        )
    assert e.value.param == "messages"
    req = _parse(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {}},
                        {"type": "text", "text": "b"},
                    ],
                }
            ],
        },
        P.ChatCompletionRequest,
    )
    assert req.messages[0].text() == "ab"


def test_prompt_forms():
    assert P.prompts_of(_parse({"model": "m", "prompt": "hi"})) == ["hi"]
    assert P.prompts_of(_parse({"model": "m", "prompt": ["a", "b"]})) == ["a", "b"]
    assert P.prompts_of(_parse({"model": "m", "prompt": [1, 2, 3]})) == [[1, 2, 3]]
    assert P.prompts_of(_parse({"model": "m", "prompt": [[1], [2, 3]]})) == [[1], [2, 3]]
    for empty in ("", [], [""], [[]]):
        with pytest.raises(P.APIError) as e:
            P.prompts_of(_parse({"model": "m", "prompt": empty}))
        assert e.value.param == "prompt"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_sampling_checks(extra, param):
    with pytest.raises(P.APIError) as e:
        P.check_sampling(_parse({"model": "m", "prompt": "x", **extra}), max_n=8)
    assert e.value.param == param
    P.check_sampling(_parse({"model": "m", "prompt": "x", "max_tokens": 0, "echo": True}), max_n=8)


def test_completion_logprobs_layout():
    lp = P.completion_logprobs(
        [("ab", None, None), ("c", -0.5, {"c": -0.5, "d": float("-inf")}), ("", -1.0, {"": -1.0})]
    )
    assert lp["tokens"] == ["ab", "c", ""] and lp["text_offset"] == [0, 2, 3]
    assert lp["token_logprobs"] == [None, -0.5, -1.0]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1]["d"] == -9999.0  # JSON-safe
    chat = P.chat_logprobs([("x", -0.25, {"x": -0.25, "y": -2.0})])["content"][0]
    assert chat["token"] == "x" and chat["bytes"] == [120] and len(chat["top_logprobs"]) == 2


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    cfg = job_from_dict({"serve": {"api_keys_env": "RD_KEYS_T"}}).serve
    monkeypatch.delenv("RD_KEYS_T", raising=False)
    assert load_key_digests(cfg) == [] and authorized(None, [])
    monkeypatch.setenv("RD_KEYS_T", " k1 , k2 ")
    ds = load_key_digests(cfg)
    assert ds == sorted([digest("k1"), digest("k2")]) and "k1" not in "".join(ds)
    assert authorized("Bearer k2", ds) and authorized("bearer k1", ds)
    assert not authorized("Bearer k3", ds) and not authorized(None, ds) and not authorized("k1", ds)

    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nfile-key\n\n")
    cfg = job_from_dict({"serve": {"api_keys_env": "", "api_keys_file": str(f)}}).serve
    assert authorized("Bearer file-key", load_key_digests(cfg))
    f.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no keys"):
        load_key_digests(cfg)
    cfg = job_from_dict({"serve": {"api_keys_file": str(tmp_path / "missing")}}).serve
    with pytest.raises(UserError, match="serve.api_keys_file"):
        load_key_digests(cfg)


def _fake_adapter(path, r=8):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_adapters_resolved_and_checked(tmp_path):
    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text("{}")
    good = _fake_adapter(tmp_path / "good")
    big = _fake_adapter(tmp_path / "big", r=64)
    cfg = job_from_dict({"serve": {"adapters": {"a": str(good)}}})
    assert resolve_adapters(cfg, model, "base") == {"a": str(good.resolve())}
    bad = job_from_dict(
        {"serve": {"adapters": {"big": str(big), "gone": str(tmp_path / "x"), "base": str(good)}}}
    )
    with pytest.raises(UserError) as e:
        resolve_adapters(bad, model, "base")
    msg = str(e.value)
    assert "serve.adapters.big" in msg and "max_lora_rank" in msg
    assert "serve.adapters.gone" in msg and "serve.adapters.base" in msg
    # the train stage's export: <out>/train/final with adapter/ -> served as <name>-lora
    out = tmp_path / "run"
    export = out / "train" / "final"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    _fake_adapter(export / "adapter")
    spec = build_spec(
        job_from_dict({"name": "demo", "output_dir": str(out), "serve": {"api_keys_env": ""}})
    )
    assert spec.name == "demo" and list(spec.adapters) == ["demo-lora"]
    assert spec.engine["enable_lora"] and spec.engine["max_lora_rank"] == 16


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="raydapt train"):
        resolve_model_dir(job_from_dict({"output_dir": str(tmp_path)}))
    with pytest.raises(UserError, match="serve.model"):
        resolve_model_dir(job_from_dict({"serve": {"model": str(tmp_path / "nope")}}))


def test_serve_takes_a_job_file_or_a_model_folder(tmp_path):
    from raydapt.cli import _load, build_parser

    job = tmp_path / "j.yaml"
    job.write_text("serve:\n  port: 9001\n")
    cfg = _load(build_parser().parse_args(["serve", str(job), "serve.max_n=2"]))
    assert cfg.serve.model == "" and cfg.serve.port == 9001 and cfg.serve.max_n == 2
    cfg = _load(build_parser().parse_args(["serve", str(tmp_path)]))
    assert cfg.serve.model == str(tmp_path) and cfg.serve.port == 8000
    with pytest.raises(UserError, match="job file not found"):
        _load(build_parser().parse_args(["serve", str(tmp_path / "missing.yaml")]))
