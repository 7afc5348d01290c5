"""A student pruned from its teacher computes what the teacher's kept layers compute."""

from __future__ import annotations

import copy

import pytest
import torch

from raydapt.config import job_from_dict
from raydapt.errors import UserError
from raydapt.models import init_model, load_model
from raydapt.prune import layers_to_keep, prune_model, pruned_record, renamed_key


def test_layers_to_keep_every_nth_always_keeps_the_last():
    assert layers_to_keep(30, every=6) == [0, 6, 12, 18, 24, 29]
    assert layers_to_keep(4, every=2) == [0, 2, 3]
    assert layers_to_keep(4, keep=[3, 1]) == [1, 3]


@pytest.mark.parametrize(
    "keep, every, message",
    [([4], 0, "out of range"), ([1, 1], 0, "twice"), ([], 0, "keep_layers or student.keep_every")],
)
def test_layers_to_keep_rejects_bad_selections(keep, every, message):
    with pytest.raises(UserError, match=message):
        layers_to_keep(4, keep, every)


def test_renamed_key_maps_kept_layers_and_drops_the_rest():
    index = {0: 0, 3: 1}
    assert (
        renamed_key("model.layers.3.mlp.up_proj.weight", index)
        == "model.layers.1.mlp.up_proj.weight"
    )
    assert renamed_key("model.layers.2.self_attn.q_proj.weight", index) is None
    assert renamed_key("model.embed_tokens.weight", index) == "model.embed_tokens.weight"


def test_pruned_student_matches_the_teacher_with_those_layers(world_dir, tmp_path):
    """The reference: the teacher object with its layer list cut in memory, against the
    student written through the renamed state dict and loaded back from disk."""
    teacher_dir = init_model("small", world_dir / "train.jsonl", tmp_path / "teacher", seed=3)
    student_dir = prune_model(teacher_dir, tmp_path / "student", [0, 3])
    teacher = load_model(teacher_dir).eval()
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in (0, 3)])
    reference.config.num_hidden_layers = 2
    student = load_model(student_dir).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        got = student(ids, use_cache=False).logits
        full = teacher(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the cut really removed layers
    record = pruned_record(student_dir)
    assert record["kept_layers"] == [0, 3] and record["teacher_layers"] == 4
    assert record["params"] < record["teacher_params"]
    assert (student_dir / "tokenizer.json").read_text() == (
        teacher_dir / "tokenizer.json"
    ).read_text()


def test_prune_config_checks_name_the_keys():
    base = {"teacher": {"preset": "small"}}
    with pytest.raises(UserError, match="exactly one of keep_layers and keep_every"):
        job_from_dict({**base, "student": {"init": "prune", "preset": ""}})
    with pytest.raises(UserError, match="student.init: 'grow'"):
        job_from_dict({**base, "student": {"init": "grow"}})
    with pytest.raises(UserError, match="only used with student.init=prune"):
        job_from_dict({**base, "student": {"keep_every": 2}})
    job = job_from_dict({**base, "student": {"init": "prune", "keep_every": 2, "preset": ""}})
    assert job.student.keep_every == 2
