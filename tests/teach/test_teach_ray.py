"""The teacher stage: conversions, the HF reference pool, bad input, and (slow) real vLLM pools.

    .venv/bin/python -m pytest tests/teach -x -q            # all: 6 min on 2 busy cores
    .venv/bin/python -m pytest tests/teach -x -q -m "not slow"

The prepared folder is written here with pyarrow in the prepare stage's layout, so these
tests do not depend on `raydapt prepare`. The slow tests start vLLM engines inside Ray
actors: one module-scoped fixture runs every pool once and the assertions share its outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import K, final_table, run_teach
from builders import teach_job as job
from builders import write_teach_prepared as write_prepared

from raydapt import layout
from raydapt.errors import UserError
from raydapt.rows import collate
from raydapt.storage import read_manifest
from raydapt.targets import PartStore, decode_row_topk
from raydapt.teach import convert
from raydapt.teach.hf_backend import HFBackend
from raydapt.teach.spec import ActorSpec, Sampling
from raydapt.teach.work import generate_batch

# ----------------------------------------------------------------------------- helpers


def hf_reference(model_dir: Path, seqs: list[np.ndarray], k: int = K):
    return HFBackend(ActorSpec(model=str(model_dir), dtype="float32", k=k)).score(seqs)


def rows_of(table: pa.Table, col: str = "input_ids") -> list[np.ndarray]:
    return [np.asarray(x, np.int64) for x in table.column(col).to_pylist()]


# ----------------------------------------------------------------------------- pure conversions


def _lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_dense_keeps_exactly_top_k_by_rank_and_pads_last_position():
    k = 2
    # position 0 is None (vLLM); position 1: actual token 9 outside the top 2;
    # position 2: actual in top 2
    positions = [
        None,
        {9: _lp(-5.0, 7), 4: _lp(-0.1, 1), 3: _lp(-2.5, 2)},
        {5: _lp(-1.0, 2), 6: _lp(-0.5, 1)},
    ]
    ids, lps = convert.dense_from_dicts(positions, 3, k)
    assert ids.tolist() == [[4, 3], [6, 5], [0, 0]]
    np.testing.assert_allclose(lps[:2], [[-0.1, -2.5], [-0.5, -1.0]], rtol=0, atol=1e-6)
    assert lps[2, 0] == 0.0 and np.isneginf(lps[2, 1])


def test_flat_form_drops_the_duplicated_actual_token():
    # vLLM's flat form lists the actual token first, then the top k: token 6 appears twice
    flat = SimpleNamespace(
        token_ids=[6, 6, 5, 9, 1, 2],
        logprobs=[-0.5, -0.5, -1.0, -4.0, -0.2, -0.3],
        ranks=[1, 1, 2, 9, 1, 2],
        start_indices=[0, 0, 3],
        end_indices=[0, 3, 6],
    )
    ids, lps = convert.dense_from_flat(flat, 3, 2)
    assert ids.tolist() == [[6, 5], [1, 2], [0, 0]]
    assert lps[1].tolist() == pytest.approx([-0.2, -0.3])


def _random_flat(rng: np.random.Generator, n: int, k: int, vocab: int = 40) -> SimpleNamespace:
    """A flat form shaped as vLLM builds it: position 0 empty, then the actual token and the
    top k."""
    tok, lp, rank, starts, ends = [], [], [], [0], [0]
    for _ in range(1, n):
        logp = rng.normal(size=vocab)
        logp -= np.log(np.exp(logp).sum())
        top, actual = np.argsort(-logp)[:k], int(rng.integers(vocab))
        starts.append(len(tok))
        tok += [actual, *top.tolist()]
        lp += [float(logp[actual]), *logp[top].tolist()]
        rank += [int((logp > logp[actual]).sum()) + 1, *range(1, k + 1)]
        ends.append(len(tok))
    return SimpleNamespace(
        token_ids=tok, logprobs=lp, ranks=rank, start_indices=starts, end_indices=ends
    )


def test_flat_fast_path_equals_the_per_position_path():
    """The one-reshape path for vLLM's usual layout gives what sorting each position by rank
    gives."""
    rng = np.random.default_rng(0)
    for n, k in ((2, 1), (17, 4), (60, 16)):
        flat = _random_flat(rng, n, k)
        assert convert._dense_from_full_flat(flat, n, k) is not None
        fast = convert.dense_from_flat(flat, n, k)
        general = SimpleNamespace(
            **{**vars(flat), "ranks": [None, *flat.ranks[1:]]}
        )  # a None rank: no fast path
        assert convert._dense_from_full_flat(general, n, k) is None
        slow = convert.dense_from_flat(general, n, k)
        assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
        assert (np.diff(fast[1][:-1], axis=1) <= 0).all()  # each row in descending logprob order


def test_response_mask_ids_and_seeds():
    m = convert.response_loss_mask(3, 2)  # tokens p0 p1 p2 r0 r1: positions 2, 3 predict r0, r1
    assert m.tolist() == [0, 0, 1, 1, 0]
    assert convert.response_loss_mask(3, 0).tolist() == [0, 0, 0]
    assert convert.sample_id("a", 0) == convert.sample_id("a", 0) != convert.sample_id("a", 1)
    assert convert.row_seed(0, "a") == convert.row_seed(0, "a") != convert.row_seed(1, "a")
    assert convert.cut_at_stop("12 #### 3", ["####"]) == ("12 ", True)


# ------------------------------------------------------------------------ HF backend, real Ray pool


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tiny_model_dir, world_dir, ray_session):
    ray_session()
    out = tmp_path_factory.mktemp("teach_hf")
    write_prepared(out, tiny_model_dir, world_dir)
    cfg = job(out, tiny_model_dir, backend="hf")
    return cfg, run_teach(cfg)


@pytest.mark.slow
def test_hf_pool_writes_targets_with_lineage(hf_run, tiny_model_dir):
    cfg, result = hf_run
    manifest, table = final_table(cfg)
    assert manifest["rows"] == 12 == result["computed_rows"] and table.num_rows == 12
    assert manifest["k"] == K and manifest["kind"] == "score"
    assert manifest["encoding"] == {"topk_ids": "uint16", "topk_logprobs": "float16"}
    assert manifest["teacher"]["weights_hash"] and manifest["source"]["manifest_hash"]
    assert table.schema.field("topk_ids").type.value_type.value_type == pa.uint16()
    ref = hf_reference(tiny_model_dir, rows_of(table))
    for i, (r_ids, r_lps) in enumerate(ref):
        ids, lps = decode_row_topk(table, i)
        n = len(ids)
        assert (ids[: n - 1] == r_ids[: n - 1]).all()
        np.testing.assert_allclose(lps[: n - 1], r_lps[: n - 1], atol=4e-3)  # float16 storage
        assert lps[n - 1, 0] == 0 and np.isneginf(lps[n - 1, 1:]).all()
        assert table.column("loss_mask")[i].as_py()[-1] == 0


@pytest.mark.slow
def test_rerun_is_up_to_date(hf_run, capsys):
    cfg, _ = hf_run
    assert run_teach(cfg)["skipped"] is True
    assert "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_round_trip_through_the_trainer_reader(hf_run):
    cfg, _ = hf_run
    _, table = final_table(cfg)
    batch = {k: v.numpy() for k, v in collate(table, np.arange(3), pad_id=0).items()}
    longest = max(len(x) for x in table.column("input_ids").to_pylist()[:3])
    assert batch["topk_ids"].shape == (3, longest, K)
    for i in range(3):
        ids, lps = decode_row_topk(table, i)
        n = len(ids)
        assert (batch["topk_ids"][i, :n] == ids).all()
        np.testing.assert_array_equal(batch["topk_logprobs"][i, :n], lps)
        assert batch["input_ids"][i, :n].tolist() == table.column("input_ids")[i].as_py()
        assert batch["loss_mask"][i, n - 1 :].sum() == 0  # the last token predicts nothing
        assert (batch["topk_logprobs"][i, n:, 1:] == -np.inf).all()  # padding: all mass on slot 0


@pytest.mark.slow
def test_parts_removed_during_a_run_are_not_finalized(
    tiny_model_dir, world_dir, tmp_path, monkeypatch, ray_session
):
    """A part deleted from outside while the pool runs (a second run on the same output_dir):
    the stage refuses to finalize a targets folder that lacks rows, and a rerun fills the gap."""
    import raydapt.teach.stage as stage

    ray_session()
    write_prepared(tmp_path, tiny_model_dir, world_dir)
    cfg = job(tmp_path, tiny_model_dir, backend="hf")
    real = stage.run_pool

    def run_then_lose_a_part(rows, spec, tcfg):
        stats = real(rows, spec, tcfg)
        PartStore(spec.final).files()[0].unlink()
        return stats

    monkeypatch.setattr(stage, "run_pool", run_then_lose_a_part)
    with pytest.raises(UserError, match=r"rows have no targets part .* changed from outside"):
        run_teach(cfg)
    assert read_manifest(layout.targets_dir(cfg)) is None
    monkeypatch.setattr(stage, "run_pool", real)
    again = run_teach(cfg)
    assert again["rows"] == 12 and again["computed_rows"] == 4 and again["already_done"] == 8


def test_hf_generate_is_reproducible_and_aligned(tiny_model_dir, world_dir, tmp_path):
    prepared = write_prepared(tmp_path, tiny_model_dir, world_dir, n_rows=2, n_prompts=3)
    batch = pq.read_table(prepared / "prompts")
    spec = ActorSpec(
        model=str(tiny_model_dir),
        dtype="float32",
        kind="generate+score",
        k=K,
        id_dtype="uint16",
        same_tokenizer=True,
        seed=3,
        gen=Sampling(n=2, temperature=1.0, max_tokens=6),
    )
    backend = HFBackend(spec)
    a, b = generate_batch(backend, batch, spec), generate_batch(backend, batch, spec)
    assert (
        a.num_rows == 6
        and a.column("response_ids").to_pylist() == b.column("response_ids").to_pylist()
    )
    assert len(set(a.column("id").to_pylist())) == 6
    for r in a.to_pylist():
        assert r["input_ids"] == r["prompt_ids"] + r["response_ids"]
        p, t = len(r["prompt_ids"]), len(r["input_ids"])
        assert r["loss_mask"] == [0] * (p - 1) + [1] * (t - p) + [0]
        assert len(r["topk_ids"]) == t


@pytest.fixture(scope="module")
def other_model(world_dir, tmp_path_factory):
    """A tiny teacher whose tokenizer differs from the student's (trained on other text)."""
    from raydapt.models import init_model

    return init_model(
        "tiny", world_dir / "heldout.jsonl", tmp_path_factory.mktemp("other") / "m", vocab_size=300
    )


def test_generate_with_another_tokenizer_retokenizes_for_the_student(
    tiny_model_dir, other_model, world_dir, tmp_path
):
    from raydapt.models import load_tokenizer

    prepared = write_prepared(tmp_path, tiny_model_dir, world_dir, n_rows=2, n_prompts=2)
    batch = pq.read_table(prepared / "prompts")
    student = load_tokenizer(tiny_model_dir)
    spec = ActorSpec(
        model=str(other_model),
        dtype="float32",
        kind="generate",
        k=K,
        id_dtype="uint16",
        same_tokenizer=False,
        seed=0,
        gen=Sampling(n=1, temperature=1.0, max_tokens=8),
    )
    table = generate_batch(HFBackend(spec), batch, spec, student)
    assert "topk_ids" not in table.column_names and table.num_rows == 2
    for r, p_ids in zip(table.to_pylist(), batch.column("prompt_ids").to_pylist(), strict=True):
        assert r["prompt_ids"] == p_ids  # the student's prompt tokens, not the teacher's
        assert student.decode(r["response_ids"], skip_special_tokens=True) == r["text"]
        assert r["input_ids"] == r["prompt_ids"] + r["response_ids"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_input_battery(hf_run, tiny_model_dir, other_model, world_dir, tmp_path):
    """Every bad input is a UserError before an engine starts, and staged parts survive it."""
    cfg, _ = hf_run
    out = cfg.out
    with pytest.raises(UserError, match="teach.k=500"):
        run_teach(job(out, tiny_model_dir, k=500))
    with pytest.raises(UserError, match="teacher.path: model folder not found"):
        run_teach(job(out, tmp_path / "no-such-teacher"))
    with pytest.raises(UserError, match=r"longer than the engine context .*id \w+ with \d+ tokens"):
        run_teach(job(out, tiny_model_dir, max_model_len=16))
    with pytest.raises(UserError, match=r"(?s)share a tokenizer.*other.*prepared data"):
        run_teach(job(out, other_model))
    empty = tmp_path / "empty"
    prepared = write_prepared(empty, tiny_model_dir, world_dir, n_rows=2, n_prompts=1)
    pq.write_table(
        pq.read_table(prepared / "prompts").slice(0, 0), prepared / "prompts" / "part-00000.parquet"
    )
    with pytest.raises(UserError, match="no prompts"):
        run_teach(job(empty, tiny_model_dir, kind="generate"))
    # the CLI turns it into exit code 2
    import yaml

    from raydapt.cli import main

    jf = tmp_path / "job.yaml"
    jf.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "teacher": {"path": str(tiny_model_dir)},
                "student": {"path": str(tiny_model_dir)},
                "teach": {"max_model_len": 16},
            }
        )
    )
    assert main(["teach", str(jf)]) == 2
    # rows already done are kept across a failed start
    store = PartStore(layout.targets_dir(cfg))
    store.write(pq.read_table(next(layout.targets_dir(cfg).glob("*.parquet"))).slice(0, 2))
    with pytest.raises(UserError):
        run_teach(job(out, tiny_model_dir, max_model_len=16))
    assert len(store.done_ids()) == 2


# ------------------------------------------------------------------------- real vLLM pools (slow)


def _vllm_score_in_actor(ray, model_dir: Path, seqs: list[np.ndarray]):
    """fp32 scores straight from a vLLM engine in a Ray actor (before float16 storage)."""

    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    class Scorer:
        def score(self, model: str, seqs: list) -> list:
            from raydapt.teach.vllm_backend import VLLMBackend

            return VLLMBackend(
                ActorSpec(model=model, dtype="float32", max_model_len=256, k=K)
            ).score(seqs)

    actor = Scorer.remote()
    return actor, actor.score.remote(str(model_dir), seqs)


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory, tiny_model_dir, world_dir, ray_session):
    """Every vLLM run the assertions need, each once (engine starts dominate the time):
    a 2-actor score pool; a 1-actor generate+score pool crashed after one part, then rerun;
    and, beside the crash run, one engine's raw fp32 scores (parity, 1-engine reference)."""
    from raydapt.teach.pool import FAIL_AFTER_ENV

    ray = ray_session()
    base = tmp_path_factory.mktemp("teach_vllm")
    res: dict = {}
    for name in ("two", "gen"):
        write_prepared(base / name, tiny_model_dir, world_dir)
    seqs = rows_of(pq.read_table(base / "two" / "prepared" / "train"))
    res["two_cfg"] = job(base / "two", tiny_model_dir, min_actors=2, max_actors=2, batch_size=2)
    res["two"] = run_teach(res["two_cfg"])
    scorer, raw = _vllm_score_in_actor(ray, tiny_model_dir, seqs)
    res["gen_cfg"] = cfg = job(
        base / "gen",
        tiny_model_dir,
        kind="generate+score",
        n=2,
        max_tokens=12,
        seed=7,
        batch_size=1,
    )
    os.environ[FAIL_AFTER_ENV] = "1"
    try:
        with pytest.raises(Exception, match="simulated crash"):
            run_teach(cfg)
    finally:
        del os.environ[FAIL_AFTER_ENV]
    res["staged"] = PartStore(layout.targets_dir(cfg)).done_ids()
    res["gen"] = run_teach(cfg)
    res["raw"], res["seqs"] = ray.get(raw), seqs
    ray.kill(scorer)
    return res


@pytest.mark.slow
def test_vllm_parity_with_transformers_fp32(vllm_runs, tiny_model_dir):
    ref = hf_reference(tiny_model_dir, vllm_runs["seqs"])
    for (r_ids, r_lps), (ids, lps), s in zip(ref, vllm_runs["raw"], vllm_runs["seqs"], strict=True):
        n = len(s)
        np.testing.assert_allclose(lps[: n - 1], r_lps[: n - 1], atol=1e-3, rtol=0)
        # ids agree except where two logprobs tie within the tolerance
        differ = ids[: n - 1] != r_ids[: n - 1]
        assert (np.abs(lps[: n - 1] - r_lps[: n - 1])[differ] < 1e-3).all()
        assert differ.mean() < 0.01
        assert ids[n - 1, 0] == 0 and lps[n - 1, 0] == 0 and np.isneginf(lps[n - 1, 1:]).all()


@pytest.mark.slow
def test_vllm_pool_targets_match_reference_and_lineage(vllm_runs, tiny_model_dir):
    import vllm

    manifest, table = final_table(vllm_runs["two_cfg"])
    assert manifest["vllm_version"] == vllm.__version__ and manifest["k"] == K
    assert manifest["tokenizer_hash"] and manifest["teacher"]["weights_hash"]
    assert manifest["bytes_per_token"] < 100
    ref = hf_reference(tiny_model_dir, rows_of(table))
    for i, (_r_ids, r_lps) in enumerate(ref):
        ids, lps = decode_row_topk(table, i)
        np.testing.assert_allclose(
            lps[:-1], r_lps[:-1], atol=4e-3
        )  # float16 storage: half an ulp at |lp| < 8


@pytest.mark.slow
def test_two_actors_equal_one_engine(vllm_runs):
    """The 2-actor pool's rows equal one engine's scores of the same rows (ids and values)."""
    _, two = final_table(vllm_runs["two_cfg"])
    one = {tuple(s.tolist()): r for s, r in zip(vllm_runs["seqs"], vllm_runs["raw"], strict=True)}
    assert two.num_rows == len(one) == 12
    for i in range(two.num_rows):
        ids, lps = decode_row_topk(two, i)
        r_ids, r_lps = one[tuple(two.column("input_ids")[i].as_py())]
        assert (ids == r_ids).mean() > 0.99
        np.testing.assert_allclose(lps, r_lps.astype(np.float16).astype(np.float32), atol=1e-3)


@pytest.mark.slow
def test_crash_then_rerun_computes_only_missing_rows(vllm_runs):
    staged, result = vllm_runs["staged"], vllm_runs["gen"]
    # whole parts (one prompt, n=2 samples each) landed before the crash failed the run: the
    # failing batch's, and maybe one more already queued on the actor before the driver saw it
    assert len(staged) in (2, 4)
    assert result["already_done"] == len(staged) and result["computed_rows"] == 8 - len(staged)
    _, table = final_table(vllm_runs["gen_cfg"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and staged <= set(ids)
    assert not PartStore(layout.targets_dir(vllm_runs["gen_cfg"])).dir.exists()


@pytest.mark.slow
def test_generate_and_score(vllm_runs, tiny_model_dir):
    manifest, table = final_table(vllm_runs["gen_cfg"])
    assert manifest["kind"] == "generate+score" and manifest["sampling"]["n"] == 2
    assert sorted(set(table.column("sample_index").to_pylist())) == [0, 1]
    rows = table.to_pylist()
    for r in rows:
        assert r["input_ids"] == r["prompt_ids"] + r["response_ids"]
        assert 1 <= len(r["response_ids"]) <= 12
        p, t = len(r["prompt_ids"]), len(r["input_ids"])
        assert r["loss_mask"] == [0] * (p - 1) + [1] * (t - p) + [0]
    assert len({tuple(r["response_ids"]) for r in rows}) > 1  # per-sample seeds differ
    ref = hf_reference(tiny_model_dir, rows_of(table))
    for i, (_, r_lps) in enumerate(ref):
        _, lps = decode_row_topk(table, i)
        np.testing.assert_allclose(lps[:-1], r_lps[:-1], atol=4e-3)
