"""The objectives computed from hidden states equal the same losses on whole logits.

Reference: the model's own `forward().logits` fed to `ce_loss` / `topk_kd_loss`, the path
the trainer took before (and still takes for heads that are more than a linear map).
Values and every parameter's gradient must agree, for tied and untied heads and through a
PEFT LoRA wrapper.
"""

from __future__ import annotations

import pytest
import torch

from raydapt.train.heads import supports_hidden
from raydapt.train.losses import KD, ce_loss, distill_loss, topk_kd_loss
from raydapt.train.objective import NextToken, TopKDistill


def tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).double()


def batch(seed: int = 1, B: int = 3, T: int = 11, V: int = 97, k: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).double()
    mask[:, -1] = 0
    t_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3, -1)
    lp, top = t_logp.topk(k, -1)
    return {"input_ids": ids, "loss_mask": mask, "topk_ids": top, "topk_logprobs": lp}


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [4, 128])
def test_next_token_from_hidden_equals_logits(tied, chunk):
    model, b = tiny_llama(tied), batch()
    assert supports_hidden(model)
    got, _ = NextToken(chunk)(model, b)
    g_got = grads(model, got)
    want = ce_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"])
    g_want = grads(model, want)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert g_got.keys() == g_want.keys() and len(g_got) > 10
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_distill_from_hidden_equals_logits(tied, alpha):
    model, b = tiny_llama(tied), batch(seed=2)
    kd = KD("forward_kl", 1.0, 0.5, 5)
    (got, parts) = TopKDistill(kd, alpha)(model, b)
    g_got = grads(model, got)
    logits = model(input_ids=b["input_ids"]).logits
    kd_want = topk_kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["loss_mask"], kd)
    ce_want = ce_loss(logits, b["input_ids"], b["loss_mask"])
    want, want_parts = distill_loss(kd_want, ce_want, alpha)
    g_want = grads(model, want)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for key in ("kd", "ce"):
        torch.testing.assert_close(parts[key], want_parts[key], rtol=1e-9, atol=1e-10)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-7, atol=1e-9, msg=name)


def test_lora_wrapped_model_trains_the_adapter_from_hidden():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(tied=True), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    b = batch(seed=3)
    for name, p in model.named_parameters():  # LoRA B starts at 0: then A gets no gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    assert supports_hidden(model)
    got, _ = NextToken(3)(model, b)
    g_got = grads(model, got)
    want = ce_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"])
    g_want = grads(model, want)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert g_got and all("lora_" in n for n in g_got)  # only the adapter trains
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-7, atol=1e-9, msg=name)


def test_a_head_with_extras_keeps_the_logits_path():
    model = tiny_llama(tied=False)
    model.config.final_logit_softcapping = 30.0
    assert not supports_hidden(model)
