"""Cross-depth repair: which teacher states each block reads, the block runner against the model's own forward,
block-local training that lowers every repaired block's loss and touches nothing else, every loss, width-pruned
students, resuming, budgets, the hand-over config and argument errors."""

from __future__ import annotations

import pytest
import torch

from kd_plugins.errors import ConfigError
from kd_plugins.integrations.teacher_cache import cache_teacher
from kd_plugins.recipes.repair import (
    RepairConfig,
    _BlockRunner,
    block_targets,
    handover_kd_config,
    repair_layers,
    repair_student,
)
from kd_plugins.recipes.student import derive_student

from .conftest import tiny_model, tiny_tokenizer

KEPT = [0, 3, 5]


def _teacher(layers=6):
    model = tiny_model(seed=1, hidden=32, layers=layers, heads=4, kv_heads=2).eval()
    with torch.no_grad():  # distinct, non-trivial blocks
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _blocks(n=20, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (n, length), generator=g).tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = _teacher()
    cache = cache_teacher(teacher, tiny_tokenizer(), _blocks(), tmp_path_factory.mktemp("cache") / "c", k=4,
                          layers=repair_layers(KEPT, 6), dtype="float32", progress=False)
    return teacher, cache


def test_block_targets_follow_the_residual_stream():
    assert block_targets([0, 3, 5], 6) == [(0, -1, 2), (1, 2, 4), (2, 4, 5)]
    assert block_targets([2, 4], 8) == [(0, 1, 3), (1, 3, 7)]
    assert repair_layers([0, 3, 5], 6) == [2, 4, 5]
    assert repair_layers([2, 4], 8) == [1, 3, 7]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_block_runner_reproduces_the_models_own_forward(attention):
    from transformers import AutoModelForCausalLM

    from .conftest import tiny_config

    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(tiny_config(hidden=32, layers=6), attn_implementation=attention).eval()
    ids = torch.tensor(_blocks(3))
    with torch.no_grad():
        states = teacher(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, ..., final norm]
        runner = _BlockRunner(teacher)
        torch.testing.assert_close(runner.embeddings(ids), states[0])
        for k in range(5):  # the last entry is after the final norm
            torch.testing.assert_close(runner(teacher.model.layers[k], states[k]), states[k + 1], rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before, model, prefix):
    return any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k.startswith(prefix))


@pytest.mark.parametrize("loss", ["mse", "cosine", "contrastive"])
def test_block_local_training_lowers_each_blocks_loss_and_touches_nothing_else(setup, loss):
    teacher, cache = setup
    student, _ = derive_student(teacher, keep_layers=KEPT)
    before = _snapshot(student)
    steps = 40 if loss == "contrastive" else 20
    config = RepairConfig(loss=loss, steps=steps, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_examples=4,
                          temperature=0.1)
    reports = repair_student(student, cache, config, progress=False)
    # block 2 stands for teacher block 5 alone (its target is its own output): exact, not repaired
    assert [r.block for r in reports] == [0, 1]
    for r in reports:
        assert r.steps == steps and len(r.losses) == steps
        # the held-out loss falls (contrastive starts nearly solved: a copied block already tells tokens apart)
        assert r.loss_after < (0.99 if loss == "contrastive" else 0.9) * r.loss_before, (loss, r)
        if loss == "mse":
            assert r.relative_error_after < r.relative_error_before
    assert _changed(before, student, "model.layers.0.") and _changed(before, student, "model.layers.1.")
    assert not _changed(before, student, "model.layers.2.")
    for name in ("model.embed_tokens.", "model.norm.", "lm_head."):
        assert not _changed(before, student, name)
    assert all(p.requires_grad for p in student.parameters())  # restored


def test_repairing_one_block_leaves_the_others_alone(setup):
    teacher, cache = setup
    student, _ = derive_student(teacher, keep_layers=KEPT)
    before = _snapshot(student)
    reports = repair_student(student, cache, RepairConfig(steps=5, batch_size=2, blocks=[1]), progress=False)
    assert [r.block for r in reports] == [1]
    assert _changed(before, student, "model.layers.1.")
    assert not _changed(before, student, "model.layers.0.") and not _changed(before, student, "model.layers.2.")


def test_exact_blocks_start_at_zero_loss_and_attention_only_moves_the_attention(setup):
    teacher, cache = setup
    student, _ = derive_student(teacher, keep_layers=KEPT)
    before = _snapshot(student)
    reports = repair_student(student, cache, RepairConfig(steps=3, batch_size=2, blocks="all", parameters="attention"),
                             progress=False)
    assert [r.block for r in reports] == [0, 1, 2]
    assert reports[2].loss_before == pytest.approx(0.0, abs=1e-10)  # block 2 is teacher block 5 on its own input
    assert reports[0].loss_before > 1e-4
    for k in range(3):  # block 2 is exact: zero gradient, so even its attention stays put
        assert _changed(before, student, f"model.layers.{k}.self_attn.") == (k < 2)
        assert not _changed(before, student, f"model.layers.{k}.mlp.")
        assert not _changed(before, student, f"model.layers.{k}.post_attention_layernorm.")


def test_width_pruned_student_repairs_every_block_on_its_channels(tmp_path):
    teacher = _teacher(layers=4)
    blocks = _blocks()
    cal = torch.tensor(blocks[:4])
    student, kept = derive_student(teacher, num_layers=2, strategy="mixed", calibration=cal, num_heads=2,
                                   num_kv_heads=1, intermediate_size=24, hidden_size=24)
    cache = cache_teacher(teacher, None, blocks, tmp_path / "c", k=4, layers=repair_layers(kept, 4),
                          dtype="float32", progress=False)
    reports = repair_student(student, cache, RepairConfig(steps=30, batch_size=4, learning_rate=3e-3),
                             progress=False)
    assert [r.block for r in reports] == [0, 1]
    assert all(r.loss_after < r.loss_before for r in reports)


def test_resume_from_checkpoints_and_refuse_other_settings(setup, tmp_path):
    teacher, cache = setup
    config = RepairConfig(steps=6, batch_size=2)
    first, _ = derive_student(teacher, keep_layers=KEPT)
    reports = repair_student(first, cache, config, checkpoint_dir=tmp_path, progress=False)
    again, _ = derive_student(teacher, keep_layers=KEPT)
    resumed = repair_student(again, cache, config, checkpoint_dir=tmp_path, progress=False)
    assert [(r.block, r.steps, r.loss_after) for r in resumed] == [(r.block, r.steps, r.loss_after) for r in reports]
    for k, v in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="other settings"):
        repair_student(again, cache, RepairConfig(steps=7, batch_size=2), checkpoint_dir=tmp_path, progress=False)


def test_cpu_budget_bounds_the_stage(setup):
    teacher, cache = setup
    student, _ = derive_student(teacher, keep_layers=KEPT)
    reports = repair_student(student, cache, RepairConfig(steps=10_000, batch_size=2, max_cpu_seconds=0.0),
                             progress=False)
    assert [r.steps for r in reports] == [0, 0]


def test_handover_config_builds_through_the_recipes(setup):
    from kd_plugins import Distiller, KDConfig, ModelInfo
    from kd_plugins.recipes.training import resolve_kd_config

    teacher, _ = setup
    student, kept = derive_student(teacher, keep_layers=KEPT)
    data = resolve_kd_config(handover_kd_config(handover_steps=20, mode="gradient", every=5), kept, 6)
    assert data["terms"][1]["layers"] == [[0, 2], [1, 4], [2, 5]]
    distiller = Distiller(KDConfig.from_dict(data), student=ModelInfo.from_config(student.config),
                          teacher=ModelInfo.from_config(teacher.config))
    assert type(distiller.scheduler).__name__ == "CurriculumScheduler"
    assert distiller.scheduler.alignment == {"mse"} and distiller.scheduler.mode == "gradient"


def test_errors(setup, tmp_path):
    teacher, cache = setup
    student, _ = derive_student(teacher, keep_layers=[0, 2, 5])  # needs layer 1, not cached
    with pytest.raises(ConfigError, match="repair needs"):
        repair_student(student, cache, progress=False)
    plain = tiny_model(layers=2)
    with pytest.raises(ConfigError, match="kept teacher blocks"):
        repair_student(plain, cache, progress=False)
    student, _ = derive_student(teacher, keep_layers=KEPT)
    with pytest.raises(ConfigError, match="out of range"):
        repair_student(student, cache, RepairConfig(blocks=[3]), progress=False)
    for bad in (dict(loss="l1"), dict(blocks="some"), dict(steps=-1), dict(learning_rate=0.0),
                dict(parameters="norms"), dict(max_cpu_seconds=-1.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RepairConfig(**bad)
