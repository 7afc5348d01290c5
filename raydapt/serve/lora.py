"""Multi-LoRA: which adapters a deployment serves, and how a replica loads them lazily.

The driver resolves and validates adapters (`resolve_adapters`) before any replica starts:
each must be a PEFT folder whose rank fits `serve.max_lora_rank`. In the replica,
`AdapterLoader` is wrapped by `serve.multiplexed(max_num_models_per_replica=serve.max_loras)`,
so an adapter is loaded into the vLLM engine on its first request and Serve keeps an LRU of
at most `max_loras` per replica; Serve also reports the loaded ids to its router, so clients
that send the `serve_multiplexed_model_id` header are routed to a replica that holds it.
vLLM's own LoRA LRU (`max_cpu_loras` = `max_loras`) frees the weights of evicted adapters
after their in-flight requests finish, which is why Serve's eviction does not call
`remove_lora` itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raydapt.config import JobConfig
from raydapt.errors import UserError

log = logging.getLogger(__name__)


def adapter_rank(path: Path) -> int:
    cfg = json.loads((path / "adapter_config.json").read_text())
    return int(cfg.get("r", 0))


def resolve_adapters(cfg: JobConfig, model_dir: Path, base_name: str) -> dict[str, str]:
    """name -> absolute adapter folder: `serve.adapters`, else `<model_dir>/adapter` if present."""
    adapters = dict(cfg.serve.adapters)
    if not adapters and (model_dir / "adapter" / "adapter_config.json").is_file():
        adapters = {f"{base_name}-lora": str(model_dir / "adapter")}
    problems = []
    out: dict[str, str] = {}
    for name, folder in adapters.items():
        path = Path(folder).expanduser().resolve()
        where = f"serve.adapters.{name}"
        if name == base_name:
            problems.append(f"{where}: name collides with the base model's name {base_name!r}")
        elif not (path / "adapter_config.json").is_file():
            problems.append(
                f"{where}: {path} is not a PEFT adapter folder (no adapter_config.json)"
            )
        elif adapter_rank(path) > cfg.serve.max_lora_rank:
            problems.append(
                f"{where}: rank {adapter_rank(path)} > serve.max_lora_rank "
                f"{cfg.serve.max_lora_rank}; raise serve.max_lora_rank"
            )
        else:
            out[str(name)] = str(path)
    if problems:
        raise UserError("bad LoRA adapters:\n  - " + "\n  - ".join(problems))
    return out


class AdapterLoader:
    """Turns an adapter name into a loaded `LoRARequest` for one engine (in the replica)."""

    def __init__(self, engine: Any, adapters: dict[str, str]):
        self.engine = engine
        self.adapters = adapters
        # Stable small ids: vLLM needs a unique positive int per adapter.
        self.ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}

    async def load(self, name: str) -> Any:
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=name, lora_int_id=self.ids[name], lora_path=self.adapters[name])
        await self.engine.add_lora(req)  # loads now, so a broken adapter fails this request
        log.info("loaded LoRA adapter %s", name)
        return req
