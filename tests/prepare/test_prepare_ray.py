"""`raydapt prepare` on a real local Ray cluster: formats, drop reasons, packing, reruns."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydapt.config import job_from_dict
from raydapt.errors import UserError
from raydapt.pipeline import run_stage
from raydapt.prepare import split_files
from raydapt.storage import read_manifest


def make_cfg(tmp_path, model_dir, paths, **prepare):
    return job_from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "corpus": {"source": "files", "paths": [str(p) for p in paths]},
            "student": {"path": str(model_dir), "preset": ""},
            "prepare": {"seq_len": 64, "val_fraction": 0.2, **prepare},
        }
    )


def read_split(out, split):
    files = split_files(out / "prepared", split)
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_jsonl_rows_and_every_drop_reason(tmp_path, tiny_model_dir, ray_cluster):
    f = tmp_path / "c.jsonl"
    good = [{"text": f"hello world {i}"} for i in range(30)]
    good += [{"prompt": f"add {i} 1", "response": f"#### {i + 1}"} for i in range(30)]
    good += [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"yo {i}"},
            ]
        }
        for i in range(10)
    ]
    lines = [json.dumps(r) for r in good]
    lines += ['{"text": "broken', json.dumps([1, 2]), json.dumps({"other": 1})]  # 3 malformed
    lines += [json.dumps({"text": "   "}), json.dumps({"prompt": "", "response": "x"})]  # 2 empty
    lines += [json.dumps({"text": "x" * 5000})]  # too long chars
    lines += [json.dumps({"text": " ".join(["a b c d e f"] * 40)})]  # too long tokens
    lines += [json.dumps(good[0]), json.dumps(good[40])]  # 2 duplicates
    f.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, tiny_model_dir, [f], max_chars=1000)
    m = run_stage("prepare", cfg)
    assert m["dropped"] == {
        "malformed": 3,
        "empty": 2,
        "too_long_chars": 1,
        "too_long_tokens": 1,
        "duplicate": 2,
    }
    assert m["documents"] == 70
    assert any("broken" in ex for ex in m["drop_examples"]["malformed"])
    train, val = read_split(cfg.out, "train"), read_split(cfg.out, "validation")
    assert train.num_rows > 0 and val.num_rows > 0
    for t in (train, val):
        for ids, mask in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist()):
            assert len(ids) == len(mask) <= 64 and mask[-1] == 0
    assert m["prompts"] > 0  # prompt rows of the train split feed teacher generation

    # prompt tokens are masked: the loss covers exactly the response (+eos) of a prompt row
    from raydapt.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    nopack = make_cfg(tmp_path / "np", tiny_model_dir, [f], max_chars=1000, pack=False)
    run_stage("prepare", nopack)
    rows = (
        read_split(nopack.out, "train").to_pylist()
        + read_split(nopack.out, "validation").to_pylist()
    )
    for r in rows:
        text = tok.decode(r["input_ids"])
        if text.startswith("<|user|>add 3 1"):
            learned = [r["input_ids"][t + 1] for t, v in enumerate(r["loss_mask"]) if v]
            assert tok.decode(learned) == "#### 4<|eos|>"
            break
    else:
        pytest.fail("prompt row not found")

    # rerun: up to date, nothing rewritten
    before = (cfg.out / "prepared" / "manifest.json").stat().st_mtime_ns
    again = run_stage("prepare", cfg)
    assert again.get("skipped") is True
    assert (cfg.out / "prepared" / "manifest.json").stat().st_mtime_ns == before


def test_parquet_and_txt_inputs(tmp_path, tiny_model_dir, ray_cluster):
    pq.write_table(
        pa.table(
            {
                "prompt": [f"sort {i} 2" for i in range(20)],
                "response": [f"#### {i}" for i in range(20)],
            }
        ),
        tmp_path / "a.parquet",
    )
    cfg = make_cfg(tmp_path / "p", tiny_model_dir, [tmp_path / "*.parquet"])
    m = run_stage("prepare", cfg)
    assert m["documents"] == 20 and m["format"] == "parquet"
    assert m["source_files"][0]["size"] > 0 and m["source_files"][0]["mtime"] > 0

    (tmp_path / "t.txt").write_text("first line\n\nsecond line\nthird line\n")
    cfg = make_cfg(tmp_path / "t", tiny_model_dir, [tmp_path / "t.txt"], val_fraction=0.0)
    m = run_stage("prepare", cfg)
    assert m["documents"] == 3 and m["dropped"]["empty"] == 1


def test_zero_usable_rows_is_a_user_error(tmp_path, tiny_model_dir, ray_cluster):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"nope": 1}\nnot json\n')
    cfg = make_cfg(tmp_path, tiny_model_dir, [f])
    with pytest.raises(UserError, match="zero usable rows"):
        run_stage("prepare", cfg)
    assert read_manifest(cfg.out / "prepared") is None
    assert not list(cfg.out.glob("prepared.tmp-*"))  # nothing half-written left behind


def test_missing_file_unreadable_shard_and_vocab_mismatch(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="file not found"):
        run_stage("prepare", make_cfg(tmp_path, tiny_model_dir, [tmp_path / "absent.jsonl"]))
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="unreadable parquet shard .*x.parquet"):
        run_stage("prepare", make_cfg(tmp_path, tiny_model_dir, [tmp_path / "x.parquet"]))
    # a model whose embedding is smaller than its tokenizer
    import shutil

    small = tmp_path / "small"
    shutil.copytree(tiny_model_dir, small)
    cfgj = json.loads((small / "config.json").read_text())
    cfgj["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(cfgj))
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(
        UserError, match="tokenizer has .* tokens but the model's embedding has 100 rows"
    ):
        run_stage("prepare", make_cfg(tmp_path, small, [tmp_path / "ok.jsonl"]))


def test_leftover_tmp_folder_is_ignored(tmp_path, tiny_model_dir, ray_cluster):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(20)))
    cfg = make_cfg(tmp_path, tiny_model_dir, [f])
    stale = cfg.out / "prepared.tmp-crashed"
    (stale / "train").mkdir(parents=True)
    (stale / "manifest.json").write_text('{"complete": false}')
    assert read_manifest(stale) is None
    m = run_stage("prepare", cfg)
    assert m["documents"] == 20 and not stale.exists()
    assert read_manifest(cfg.out / "prepared")["complete"] is True


def test_prompt_only_rows_feed_the_teacher_not_the_packs(tmp_path, tiny_model_dir, ray_cluster):
    """An open instruction (a prompt with no response) is a prompt for teacher generation in
    its split, and never a training row: it has nothing to learn from until answered."""
    f = tmp_path / "c.jsonl"
    rows = [{"prompt": f"tell me about {i}"} for i in range(40)]
    rows += [{"prompt": f"add {i} 2", "response": f"#### {i + 2}"} for i in range(20)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = make_cfg(tmp_path, tiny_model_dir, [f], pack=False, val_fraction=0.3)
    m = run_stage("prepare", cfg)
    assert m["documents"] == 60 and m["prompts"] + m["prompts_validation"] == 60
    assert m["prompts_validation"] > 0
    packed = read_split(cfg.out, "train").num_rows + read_split(cfg.out, "validation").num_rows
    assert packed == 20  # only the prompt+response rows
    prompts = pq.read_table(cfg.out / "prepared" / "prompts")
    assert set(prompts.column("split").to_pylist()) == {"train", "validation"}
    open_ones = [p for p in prompts.to_pylist() if p["prompt"].startswith("tell me")]
    assert len(open_ones) == 40 and all(p["answer"] is None for p in open_ones)


def test_truncated_rows_are_counted(tmp_path, tiny_model_dir):
    """With drop_longer false a long document is cut to seq_len and kept, and counted."""
    from raydapt.config import PrepareConfig
    from raydapt.prepare.stage import write_prepared
    from raydapt.prepare.tokenize import Tokenize

    pcfg = PrepareConfig(seq_len=16, drop_longer=False, val_fraction=0.0)
    rules = Tokenize(str(tiny_model_dir), {**pcfg.__dict__, "format": "jsonl"})
    lines = [json.dumps({"text": " ".join(["a b c d"] * 20)}), json.dumps({"text": "short one"})]
    stats = write_prepared([rules(pa.table({"text": lines}))], tmp_path, pcfg)
    assert stats["truncated"] == 1 and stats["documents"] == 2
    assert stats["dropped"]["too_long_tokens"] == 0


def _naive_rows(model_dir, lines, pcfg):
    """The reference for the bulk writer: the transformers tokenizer row by row, the content
    hash as json.dumps, exact dedupe with a set, then `raydapt.rows.pack` over each split's
    whole document list and `loss_mask_of` per row."""
    import hashlib

    import numpy as np

    from raydapt.models import load_tokenizer
    from raydapt.prepare.stage import split_of
    from raydapt.prepare.tokenize import Tokenize
    from raydapt.rows import loss_mask_of, pack

    rules = Tokenize(load_tokenizer(model_dir), {**pcfg.__dict__, "format": "jsonl"})
    seen, docs = set(), {"train": [], "validation": []}
    for line in lines:
        doc, reason = rules.doc(json.loads(line))
        if reason or doc.hash in seen:
            continue
        content = json.dumps([doc.ids, doc.target, doc.label])
        assert doc.hash == hashlib.sha256(content.encode()).hexdigest()[:20]
        seen.add(doc.hash)
        if any(doc.target) or doc.label >= 0:
            docs[split_of(doc.hash, pcfg.val_fraction)].append(doc)
    out = {}
    for split, ds in docs.items():
        if pcfg.pack:
            rows = [
                (ids, mask, "".join(ds[i].hash for i in members))
                for ids, mask, members in pack(
                    [(np.array(d.ids), np.array(d.target)) for d in ds], pcfg.seq_len
                )
            ]
            ids_of = {r[2]: hashlib.sha256(r[2].encode()).hexdigest()[:20] for r in rows}
            rows = [(i.tolist(), m.tolist(), ids_of[h]) for i, m, h in rows]
        else:
            rows = [(d.ids, loss_mask_of(np.array(d.target)).tolist(), d.hash) for d in ds]
        out[split] = rows
    return out


@pytest.mark.parametrize("pack_rows", [True, False])
def test_bulk_writer_equals_a_naive_reference(tmp_path, tiny_model_dir, ray_cluster, pack_rows):
    """Ray Data's tokenizer tasks (the Rust tokenizer rebuilt from its JSON) and the bulk
    packer and writer give exactly the rows of a row-by-row reference: more than 512 docs
    per split (packing carries its open row across chunks), several shards, every row kind,
    duplicates."""
    rows = []
    for i in range(1400):
        if i % 4 == 0:
            rows.append({"text": f"doc {i} " + "word " * (i % 11)})
        elif i % 4 == 1:
            rows.append({"prompt": f"add {i} 7", "response": f"#### {i + 7}"})
        elif i % 4 == 2:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"hi {i}"},
                        {"role": "assistant", "content": f"yo {i % 50}"},
                    ]
                }
            )
        else:
            rows.append(rows[i - 3])  # an exact duplicate
    lines = [json.dumps(r) for r in rows]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, tiny_model_dir, [f], pack=pack_rows, rows_per_shard=31)
    m = run_stage("prepare", cfg)
    want = _naive_rows(tiny_model_dir, lines, cfg.prepare)
    assert m["dropped"] == {**dict.fromkeys(m["dropped"], 0), "duplicate": 350}
    for split in ("train", "validation"):
        files = split_files(cfg.out / "prepared", split)
        got = read_split(cfg.out, split)
        assert len(files) == -(-len(want[split]) // 31) > 1
        assert got.column("input_ids").to_pylist() == [r[0] for r in want[split]]
        assert got.column("loss_mask").to_pylist() == [r[1] for r in want[split]]
        assert got.column("id").to_pylist() == [r[2] for r in want[split]]
        assert m["rows"][split] == len(want[split])
        assert m["tokens"][split] == sum(len(r[0]) for r in want[split])
        assert m["loss_tokens"][split] == sum(sum(r[1]) for r in want[split])
