"""Losses from the final hidden states, so a (B, T, V) logits tensor never exists whole.

At a real vocabulary the logits are where training memory goes: SmolLM2's 49,152 tokens at
B=8, T=512 are 0.8 GB in float32 for the logits alone, and as much again for their gradient.
The chunked `*_from_hidden` losses (raydapt.train.losses) apply the LM head a chunk of
positions at a time; this module gets them what they need, the decoder's last hidden state
and the head's weight, from any HF causal LM, plain, PEFT-wrapped or FSDP2-sharded.

Under FSDP2 the head weight is a shard outside the root module's forward, so the loss runs
*inside* a method registered with `register_fsdp_forward_method`: the root's parameters are
gathered around it like around `forward`, and the chunked losses take their gradients inside
that call (`_EagerChunkedSum`), while the weight is whole.

    prepare_hidden_losses(model)                     # after sharding, once
    loss = from_hidden(model, input_ids, fn)         # fn(hidden (B,T,H), weight (V,H)) -> any
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

METHOD = "raydapt_from_hidden"

# Configs whose head is more than `hidden @ weight.T`: these keep the logits path.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_hidden(model: nn.Module) -> bool:
    """The head is one plain linear map of the decoder's output, without bias or extras."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if config is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    if any(getattr(config, k, None) for k in _HEAD_EXTRAS):
        return False
    return hasattr(hf, "get_decoder") and hf.get_decoder() is not None


def _hidden_then(self: nn.Module, input_ids: Tensor, fn: Callable[[Tensor, Tensor], Any]) -> Any:
    hf = _hf_model(self)
    hidden = hf.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return fn(hidden, hf.get_output_embeddings().weight)


def prepare_hidden_losses(model: nn.Module) -> None:
    """Give `model` the method `from_hidden` calls; registered with FSDP2 when it is sharded."""
    setattr(model, METHOD, types.MethodType(_hidden_then, model))
    if hasattr(model, "_get_fsdp_state"):  # an FSDP2 root
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, METHOD)


def from_hidden(model: nn.Module, input_ids: Tensor, fn: Callable[[Tensor, Tensor], Any]) -> Any:
    """`fn(last hidden state, head weight)` evaluated inside the model's (FSDP) forward."""
    if not hasattr(model, METHOD):
        prepare_hidden_losses(model)
    return getattr(model, METHOD)(input_ids, fn)
