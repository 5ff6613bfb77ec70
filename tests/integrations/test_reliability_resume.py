"""Resuming is refused -- before anything is loaded -- when the KD state is corrupt (one flipped byte anywhere) or
was saved with another KD configuration (the message names every differing field; ``allow_config_change_on_resume``
restores what still fits), and a tensor that no longer fits gets a message instead of torch's ``size mismatch``
traceback."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kd_plugins import ConfigError, Distiller, KDError, ModelInfo
from kd_plugins.integrations.transformers import KD_STATE_NAME, DistillationCallback
from kd_plugins.integrations.trl import KDSFTTrainer

from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

STUDENT = ModelInfo(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=16, name="s")
TEACHER = ModelInfo(hidden_size=12, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=6, vocab_size=16, name="t")


def _small_distiller(seed=0, **config):
    torch.manual_seed(seed)
    data = {"terms": [{"name": "mse"}], "scheduler": {"name": "gradnorm", "every": 1}, **config}
    return Distiller(data, student=STUDENT, teacher=TEACHER)


def _snapshot(distiller):
    return {k: v.clone() for k, v in distiller.kd_state_dict().items()}


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()
                                                               if a.is_floating_point() else torch.equal(a, b))


def _unchanged(distiller, before):
    after = distiller.kd_state_dict()
    return set(after) == set(before) and all(_same(before[k], after[k]) for k in before)


# --- the file itself --------------------------------------------------------------------------------------------


def test_the_file_stores_the_resolved_config_and_a_checksum(tmp_path):
    path = DistillationCallback(_small_distiller()).save(str(tmp_path))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["producer"] == "kd_plugins" and len(metadata["kd_state_sha256"]) == 64
    stored = json.loads(metadata["kd_config"])
    assert stored["terms"][0]["name"] == "mse" and stored["terms"][0]["options"]["layers"] == "uniform"  # a default
    assert stored["scheduler"]["options"]["every"] == 1 and stored["teacher"]["hidden_size"] == 12


@pytest.mark.parametrize("pattern", [0x01, 0x80])
def test_every_single_flipped_byte_is_refused_and_nothing_is_loaded(tmp_path, pattern):
    source = _small_distiller(0)
    with torch.no_grad():  # scheduler state that a flipped byte would change, as in the issue
        source.scheduler.current.mul_(1.5)
    path = Path(DistillationCallback(source).save(str(tmp_path)))
    good = path.read_bytes()
    target = _small_distiller(1)
    before = _snapshot(target)
    callback = DistillationCallback(target)
    accepted = []
    for position in range(len(good)):
        damaged = bytearray(good)
        damaged[position] ^= pattern
        path.write_bytes(bytes(damaged))
        try:
            callback.load(str(tmp_path))
        except KDError:
            continue
        accepted.append(position)
    assert not accepted, f"{len(accepted)} of {len(good)} single-byte flips were loaded, first at {accepted[:5]}"
    assert _unchanged(target, before)
    path.write_bytes(good)
    assert callback.load(str(tmp_path)) and not _unchanged(target, before)  # the intact file loads


def test_a_flipped_data_byte_says_the_file_is_corrupt(tmp_path):
    path = Path(DistillationCallback(_small_distiller(0)).save(str(tmp_path)))
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(damaged))
    with pytest.raises(KDError) as info:
        DistillationCallback(_small_distiller(1)).load(str(tmp_path))
    assert str(info.value) == (f"{path} is corrupt: its content does not match the SHA-256 checksum stored with it (a "
                               "damaged copy or disk?), so it is not loaded; resume from an earlier checkpoint")


@pytest.mark.parametrize("change, expected", [
    ({"terms": [{"name": "mse", "weight": 5.0}]}, ["terms[mse].weight: 1.0 -> 5.0"]),
    ({"terms": [{"name": "cosine"}]}, ["terms[mse]: 'mse' (weight 1.0) -> (absent)",
                                      "terms[cosine]: (absent) -> 'cosine' (weight 1.0)"]),
    ({"scheduler": {"name": "gradnorm", "every": 3}}, ["scheduler.options.every: 1 -> 3"]),
    ({"ce_weight": 0.5}, ["ce_weight: 1.0 -> 0.5"]),
])
def test_another_config_is_refused_naming_the_fields(tmp_path, change, expected):
    DistillationCallback(_small_distiller(0)).save(str(tmp_path))
    target = _small_distiller(1, **change)
    before = _snapshot(target)
    with pytest.raises(ConfigError) as info:
        DistillationCallback(target).load(str(tmp_path))
    message = str(info.value)
    assert "was saved with another KD configuration" in message
    for line in expected:
        assert f"\n  {line}" in message, (line, message)
    assert "allow_config_change_on_resume: true" in message
    assert _unchanged(target, before)


def test_builder_defaults_written_out_are_the_same_config(tmp_path):
    DistillationCallback(_small_distiller(0)).save(str(tmp_path))
    explicit = _small_distiller(1, terms=[{"name": "mse", "layers": "uniform", "projector": "linear"}])
    assert DistillationCallback(explicit).load(str(tmp_path))


def test_term_order_is_part_of_the_config(tmp_path):
    terms = [{"name": "mse"}, {"name": "cosine"}]
    DistillationCallback(_small_distiller(0, terms=terms)).save(str(tmp_path))
    with pytest.raises(ConfigError, match=r"terms \(order\): \['mse', 'cosine'\] -> \['cosine', 'mse'\]"):
        DistillationCallback(_small_distiller(1, terms=terms[::-1])).load(str(tmp_path))


def test_a_changed_proj_dim_is_a_message_not_a_size_mismatch(tmp_path):
    def contrastive(dim):
        torch.manual_seed(0)
        return Distiller({"terms": [{"name": "contrastive", "proj_dim": dim}]}, student=STUDENT, teacher=TEACHER)

    DistillationCallback(contrastive(8)).save(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        DistillationCallback(contrastive(4)).load(str(tmp_path))
    message = str(info.value)
    assert "terms[contrastive].options.proj_dim: 8 -> 4" in message and "size mismatch" not in message


def test_tensors_that_do_not_fit_name_their_shapes(tmp_path):
    """A file without the stored configuration (an older kd_plugins) is checked by names and shapes."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    other = Distiller({"terms": [{"name": "contrastive", "proj_dim": 8}]}, student=STUDENT, teacher=TEACHER)
    save_file(other.kd_state_dict(), str(tmp_path / KD_STATE_NAME), metadata={"format": "pt"})
    target = Distiller({"terms": [{"name": "contrastive", "proj_dim": 4}]}, student=STUDENT, teacher=TEACHER)
    before = _snapshot(target)
    with pytest.raises(ConfigError) as info:
        DistillationCallback(target).load(str(tmp_path))
    message = str(info.value)
    assert ("shapes differ: terms.contrastive.student_projectors.0.bias: (8,) in the file, (4,) in this run"
            in message)
    assert "proj_dim" in message and _unchanged(target, before)


def test_allow_config_change_restores_what_fits(tmp_path, caplog):
    torch.manual_seed(0)
    source = Distiller({"terms": [{"name": "mse"}, {"name": "contrastive", "proj_dim": 8}]},
                       student=STUDENT, teacher=TEACHER)
    DistillationCallback(source).save(str(tmp_path))
    torch.manual_seed(1)
    target = Distiller({"terms": [{"name": "mse", "weight": 2.0}, {"name": "contrastive", "proj_dim": 4}],
                        "allow_config_change_on_resume": True}, student=STUDENT, teacher=TEACHER)
    fresh_before = target.kd_state_dict()["terms.contrastive.student_projectors.0.weight"].clone()
    with caplog.at_level(logging.WARNING, logger="kd_plugins.integrations.transformers"):
        assert DistillationCallback(target).load(str(tmp_path))
    state, saved = target.kd_state_dict(), source.kd_state_dict()
    assert torch.equal(state["terms.mse.projectors.0.weight"], saved["terms.mse.projectors.0.weight"])
    assert torch.equal(state["terms.contrastive.student_projectors.0.weight"], fresh_before)  # did not fit
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "terms[mse].weight: 1.0 -> 2.0" in logged and "start fresh" in logged
    assert "terms.contrastive.student_projectors.0.weight" in logged


# --- through the trainer: a refused resume changes nothing ----------------------------------------------------------


def _trainer(out, config, **args):
    return KDSFTTrainer(model=tiny_model(seed=0), args=sft_args(out, **args), train_dataset=tiny_dataset(8),
                        processing_class=tiny_tokenizer(), teacher=tiny_model(seed=1, hidden=48, layers=3),
                        kd_config=config)


TERMS = [{"name": "dkd", "weight": 1.0}, {"name": "contrastive", "weight": 0.5, "proj_dim": 16, "max_tokens": 64}]


def test_a_resume_with_another_config_is_refused_before_anything_loads(tmp_path):
    _trainer(tmp_path / "a", kd_config(TERMS), max_steps=1, save_strategy="steps", save_steps=1).train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    changed = [{"name": "forward_kl", "weight": 5.0}, TERMS[1]]
    trainer = _trainer(tmp_path / "b", kd_config(changed), max_steps=1)
    trainer.train()  # the trainer has trained: optimizer, scheduler, weights and KD state exist
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    kd_state = _snapshot(trainer.distiller)
    optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    scheduler = copy.deepcopy(trainer.lr_scheduler.state_dict())
    step = trainer.state.global_step
    with pytest.raises(ConfigError) as info:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(info.value)
    for line in ("terms[dkd]: 'dkd' (weight 1.0) -> (absent)", "terms[forward_kl]: (absent) -> 'forward_kl' (weight 5.0)"):
        assert line in message, message
    assert all(torch.equal(model[k], v) for k, v in trainer.model.state_dict().items())
    assert _unchanged(trainer.distiller, kd_state)
    assert str(trainer.optimizer.state_dict()) == str(optimizer)
    assert trainer.lr_scheduler.state_dict() == scheduler and trainer.state.global_step == step


def test_a_resume_from_a_corrupt_checkpoint_is_refused_before_anything_loads(tmp_path):
    _trainer(tmp_path / "a", kd_config(TERMS), max_steps=1, save_strategy="steps", save_steps=1).train()
    path = tmp_path / "a" / "checkpoint-1" / KD_STATE_NAME
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    trainer = _trainer(tmp_path / "b", kd_config(TERMS), max_steps=2)
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(KDError, match="is corrupt"):
        trainer.train(resume_from_checkpoint=str(path.parent))
    assert all(torch.equal(model[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.state.global_step == 0


def test_the_same_config_resumes(tmp_path):
    _trainer(tmp_path / "a", kd_config(TERMS), max_steps=1, save_strategy="steps", save_steps=1).train()
    trainer = _trainer(tmp_path / "b", kd_config(TERMS), max_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert trainer.state.global_step == 2
