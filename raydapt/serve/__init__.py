"""The serve stage (`raydapt serve JOB|MODEL_DIR`): OpenAI-compatible HTTP on Ray Serve + vLLM.

Modules: stage.py (plan and run), spec.py (the replica spec, checked in the driver),
app.py (the replica: FastAPI routes over vLLM's AsyncLLM), protocol.py (request and response
models), lora.py (adapters), auth.py (API keys).
"""

from raydapt.serve.spec import ReplicaSpec, build_spec, resolve_model_dir
from raydapt.serve.stage import APP_NAME, ServePlan, fingerprint, plan, run, shutdown

__all__ = [
    "APP_NAME",
    "ReplicaSpec",
    "ServePlan",
    "build_spec",
    "fingerprint",
    "plan",
    "resolve_model_dir",
    "run",
    "shutdown",
]
