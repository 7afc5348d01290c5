"""Where each stage reads and writes inside a job's output_dir. Stages talk through files.

<out>/corpus/            world: train.jsonl, heldout.jsonl (generated)
<out>/models/<role>/     models built from presets (init-model)
<out>/prepared/          prepare: train/ and validation/ parquet + manifest.json
<out>/targets/           teach: targets parquet + manifest.json (parts staged in targets.parts/)
<out>/train/             train: Ray Train storage, metrics.jsonl, final/ (HF export)
<out>/eval/              eval: metrics.json
<out>/tune/              tune: sweep folder, best/
"""

from __future__ import annotations

from pathlib import Path

from raydapt.config import JobConfig


def corpus_dir(cfg: JobConfig) -> Path:
    return cfg.out / "corpus"


def models_dir(cfg: JobConfig) -> Path:
    return cfg.out / "models"


def prepared_dir(cfg: JobConfig) -> Path:
    return cfg.out / "prepared"


def targets_dir(cfg: JobConfig) -> Path:
    return cfg.out / "targets"


def train_dir(cfg: JobConfig) -> Path:
    return cfg.out / "train"


def export_dir(cfg: JobConfig) -> Path:
    """The trained model in HF format (and `adapter/` for LoRA)."""
    return train_dir(cfg) / "final"


def eval_dir(cfg: JobConfig) -> Path:
    return cfg.out / "eval"


def tune_dir(cfg: JobConfig) -> Path:
    return cfg.out / "tune"


# artifact name (stage.Stage.produces / needs) -> its folder
ARTIFACTS = {
    "prepared": prepared_dir,
    "targets": targets_dir,
    "export": export_dir,
    "sweep": tune_dir,
    "metrics": eval_dir,
}
