"""Model factory: init-model presets round-trip through transformers and run in vLLM."""

import subprocess
import sys
import textwrap

import pytest
import torch

from raydapt import models
from raydapt.errors import UserError


def test_init_model_round_trip(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_model(tiny_model_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.head_dim in models.VLLM_CPU_HEAD_DIMS
    assert (tiny_model_dir / "model.safetensors").is_file()
    ids = tok("add 123 456", return_tensors="pt")["input_ids"]
    # digits are single tokens, so arithmetic sees one token per digit
    assert [tok.decode([i]) for i in ids[0][-3:]] == ["4", "5", "6"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    again = models.load_model(tiny_model_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )
    assert models.tokenizer_hash(tok) == models.tokenizer_hash(
        models.load_tokenizer(tiny_model_dir)
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>hi<|assistant|>"


def test_missing_model_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        models.load_model(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="unknown preset"):
        models.init_model("huge", tmp_path / "c.jsonl", tmp_path / "m")


def test_hub_id_offline_is_user_error():
    with pytest.raises(UserError, match="cannot load a tokenizer from raydapt-test/does-not-exist"):
        models.load_tokenizer("raydapt-test/does-not-exist")


@pytest.mark.slow
def test_vllm_generates_from_init_model(tiny_model_dir, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(
        textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model_dir)!r}, dtype="float32", enforce_eager=True,
                      max_model_len=256)
            out = llm.generate(["add 123 456"],
                               SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            print("TOKENS", len(out[0].outputs[0].token_ids))
    """)
    )
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert "TOKENS 8" in r.stdout, r.stderr[-3000:]


def test_engine_dtype_keeps_float32_checkpoints_on_cpu(tiny_model_dir, tmp_path):
    """vLLM's `auto` would run a float32 checkpoint in bfloat16; on CPU raydapt asks for float32."""
    from raydapt.models import engine_dtype

    assert '"float32"' in (tiny_model_dir / "config.json").read_text()
    assert engine_dtype("auto", tiny_model_dir, on_gpu=False) == "float32"
    assert engine_dtype("auto", tiny_model_dir, on_gpu=True) == "auto"
    assert engine_dtype("bfloat16", tiny_model_dir, on_gpu=False) == "bfloat16"
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert engine_dtype("auto", half, on_gpu=False) == "auto"
    assert engine_dtype("auto", "org/model-on-the-hub", on_gpu=False) == "auto"
