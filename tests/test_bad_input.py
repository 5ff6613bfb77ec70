"""Bad input is refused before training with a message that says what is wrong (or handled safely, as
documented). Each test asserts on the message content, not just the exception type.

Covered elsewhere (not duplicated here): a plugin that fails to import is reported by name
(``tests/test_plugins.py::test_broken_plugin_is_reported_by_name``); YAML is loaded with ``safe_load``
(``tests/test_config.py::test_yaml_is_loaded_safely``); the trainer-level vocabulary check and the
``on_nonfinite_teacher: skip`` path (``tests/integrations/test_trl.py``).
"""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch

import kd_plugins
from kd_plugins import (
    BatchContext,
    ConfigError,
    Distiller,
    IncompatibleModelsError,
    KDConfig,
    ModelCapture,
    ModelInfo,
    UnknownComponentError,
)
from kd_plugins.plugins import available_components

STUDENT = ModelInfo(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=128,
                    name="tiny-student")
TEACHER = ModelInfo(hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, vocab_size=128,
                    name="tiny-teacher")

LOGIT_TERMS = ["forward_kl", "reverse_kl", "generalized_jsd", "dkd"]
ALIGNMENT_TERMS = [
    {"name": "contrastive", "proj_dim": 8, "max_tokens": 64},
    {"name": "mse"},
    {"name": "cosine"},
    {"name": "attention_relation", "relation_heads": 2},
]


@pytest.fixture(autouse=True)
def builtins_only(clean_plugin_manager):
    clean_plugin_manager.setenv("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
    kd_plugins.reset_plugin_manager()


def _distiller(terms, scheduler="constant", student=STUDENT, teacher=TEACHER, **config):
    return Distiller({"terms": terms, "scheduler": scheduler, **config}, student=student, teacher=teacher)


# --- models that cannot be distilled as configured --------------------------------------------------------------


@pytest.mark.parametrize("term", LOGIT_TERMS)
def test_vocabulary_mismatch_names_both_models(term):
    teacher = ModelInfo(**{**TEACHER.__dict__, "vocab_size": 100})
    with pytest.raises(IncompatibleModelsError) as info:
        _distiller([{"name": term}], teacher=teacher)
    message = str(info.value)
    for fragment in ("tiny-student", "tiny-teacher", "128", "100", term):
        assert fragment in message, (fragment, message)


def test_vocabulary_mismatch_is_fine_for_representation_terms():
    teacher = ModelInfo(**{**TEACHER.__dict__, "vocab_size": 100})
    distiller = _distiller(ALIGNMENT_TERMS, teacher=teacher)
    assert set(distiller.terms) == {t["name"] for t in ALIGNMENT_TERMS}


@pytest.mark.parametrize(
    "term, fragments",
    [
        ({"name": "mse", "layers": [[0, 5]]}, ["teacher layer 5", "out of range", "tiny-teacher", "3 layers"]),
        ({"name": "contrastive", "layers": [[-3, 0]]}, ["student layer -3", "out of range", "tiny-student"]),
        ({"name": "attention_relation", "student_layer": 2}, ["student_layer", "out of range", "-2..1"]),
        ({"name": "attention_relation", "teacher_layer": -4}, ["teacher_layer", "out of range", "-3..2"]),
    ],
)
def test_layer_map_out_of_range(term, fragments):
    with pytest.raises(ConfigError) as info:
        _distiller([term])
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_relation_heads_that_do_not_divide_a_width():
    with pytest.raises(ConfigError, match=r"relation_heads: 5 does not divide"):
        _distiller([{"name": "attention_relation", "relation_heads": 5}])


# --- names that are not registered --------------------------------------------------------------------------


def test_unknown_term_lists_available_terms():
    with pytest.raises(UnknownComponentError) as info:
        _distiller([{"name": "kl_divergence"}])
    message = str(info.value)
    assert "'kl_divergence'" in message
    registered = available_components()
    names = [*registered["logit"], *registered["alignment"]]
    assert set(LOGIT_TERMS) | {t["name"] for t in ALIGNMENT_TERMS} <= set(names)
    for name in names:
        assert name in message


def test_unknown_scheduler_lists_available_schedulers():
    with pytest.raises(UnknownComponentError) as info:
        _distiller([{"name": "mse"}], scheduler="warmup")
    message = str(info.value)
    assert "'warmup'" in message
    names = available_components()["scheduler"]
    assert set(_schedulers()) <= set(names)
    for name in names:
        assert name in message


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ConfigError) as info:
        _distiller([{"name": "contrastive", "projection_dim": 8}])
    assert "projection_dim" in str(info.value) and "proj_dim" in str(info.value)


# --- invalid hyper-parameters: config level --------------------------------------------------------------------


@pytest.mark.parametrize(
    "term, fragments",
    [
        ({"name": "dkd", "temperature": 0}, ["terms[dkd]", "temperature=0", "> 0"]),
        ({"name": "forward_kl", "temperature": -1.5}, ["temperature=-1.5", "> 0"]),
        ({"name": "forward_kl", "temperature": float("nan")}, ["temperature=nan", "finite"]),
        ({"name": "forward_kl", "temperature": "1.0"}, ["temperature='1.0'", "number"]),
        ({"name": "contrastive", "weight": -0.5}, ["terms[contrastive]", "weight=-0.5", ">= 0"]),
        ({"name": "dkd", "alpha": -1}, ["alpha=-1", ">= 0"]),
        ({"name": "dkd", "beta": -2}, ["beta=-2", ">= 0"]),
        ({"name": "generalized_jsd", "beta": 1.5}, ["beta=1.5", "0 <= beta <= 1"]),
        ({"name": "generalized_jsd", "beta": -0.1}, ["beta=-0.1", ">= 0"]),
    ],
)
def test_invalid_hyper_parameters_rejected_by_config(term, fragments):
    with pytest.raises(ConfigError) as info:
        KDConfig(terms=[term])
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "data, fragments",
    [
        ({"ce_weight": -1, "terms": ["mse"]}, ["ce_weight=-1"]),
        ({"terms": ["mse"], "teacher_dtype": "fp8"}, ["teacher_dtype='fp8'", "bfloat16"]),
        ({"terms": ["mse"], "on_nonfinite_teacher": "ignore"}, ["on_nonfinite_teacher='ignore'", "skip"]),
        ({"terms": ["mse"], "projector_lr": 0}, ["projector_lr=0", "> 0"]),
        ({"terms": ["mse"], "scheduler": {"name": "linear", "warmup_steps": -5}}, ["warmup_steps=-5", ">= 0"]),
        ({"ce_weight": 0, "terms": []}, ["nothing to train"]),
        ({"terms": ["mse"], "temperature": 2.0}, ["unknown keys ['temperature']", "terms"]),
    ],
)
def test_invalid_run_settings_rejected_by_config(data, fragments):
    with pytest.raises(ConfigError) as info:
        KDConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# --- invalid hyper-parameters: builder level (a config built in code, or a third-party caller) ------------------


@pytest.mark.parametrize(
    "builder, options, pattern",
    [
        ("build_dkd", {"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        ("build_forward_kl", {"temperature": -1.0}, r"temperature must be > 0"),
        ("build_dkd", {"alpha": -1.0}, r"dkd: alpha must be >= 0, got -1.0"),
        ("build_dkd", {"beta": -1.0}, r"dkd: beta must be >= 0"),
        ("build_generalized_jsd", {"beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
        ("build_reverse_kl", {"chunk_size": 0}, r"chunk_size must be a positive int"),
    ],
)
def test_invalid_hyper_parameters_rejected_by_logit_builders(builder, options, pattern):
    from kd_plugins.components import logit

    with pytest.raises(ValueError, match=pattern):
        getattr(logit, builder)(student=STUDENT, teacher=TEACHER, **options)


@pytest.mark.parametrize(
    "builder, options, pattern",
    [
        ("build_contrastive", {"temperature": 0.0}, r"temperature: must be a number > 0, got 0.0"),
        ("build_contrastive", {"max_tokens": 1}, r"max_tokens: must be an int >= 2"),
        ("build_contrastive", {"proj_dim": 0}, r"proj_dim: must be a positive int, got 0"),
        ("build_attention_relation", {"relation_heads": 0}, r"relation_heads: must be a positive int"),
        ("build_attention_relation", {"relations": ("q", "x")}, r"relations: got \('q', 'x'\)"),
        ("build_mse", {"layers": "every_other"}, r"unknown layer map 'every_other'"),
    ],
)
def test_invalid_hyper_parameters_rejected_by_alignment_builders(builder, options, pattern):
    from kd_plugins.components import alignment

    with pytest.raises(ConfigError, match=pattern):
        getattr(alignment, builder)(student=STUDENT, teacher=TEACHER, **options)


def test_scheduler_builder_errors_name_the_scheduler():
    with pytest.raises(ConfigError, match=r"scheduler 'linear': start=1.5 is invalid; expected 0 <= start <= 1"):
        _distiller(["mse"], scheduler={"name": "linear", "start": 1.5})


# --- an all-masked batch through the whole Distiller -------------------------------------------------------------


def _captures(batch=2, seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def capture(info, requires_grad):
        def t(*shape):
            return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

        kv = info.num_kv_heads * info.head_dim
        return ModelCapture(
            info=info,
            hidden_states={i: t(batch, seq, info.hidden_size) for i in range(info.num_layers)},
            qkv={i: (t(batch, seq, info.num_heads * info.head_dim), t(batch, seq, kv), t(batch, seq, kv))
                 for i in range(info.num_layers)},
            final_hidden=t(batch, seq, info.hidden_size),
            lm_head_weight=t(info.vocab_size, info.hidden_size),
        )

    return capture(STUDENT, True), capture(TEACHER, False)


def _all_terms():
    return [{"name": n} for n in LOGIT_TERMS] + ALIGNMENT_TERMS


def _schedulers():
    return ["constant", "linear", "gradnorm", "conflict", "dwa", "uncertainty"]


@pytest.mark.parametrize("num_items", [None, 0, 8])
def test_all_masked_batch_is_an_exact_zero_through_the_distiller(num_items):
    for scheduler in _schedulers():
        distiller = _distiller(_all_terms(), scheduler=scheduler)
        student, teacher = _captures()
        labels = torch.full((2, 5), -100)
        batch = BatchContext(labels=labels, token_mask=torch.zeros(2, 5, dtype=torch.bool),
                             sequence_ids=torch.full((2, 5), -1), num_items_in_batch=num_items)
        shared = torch.nn.Parameter(torch.ones(3))
        out = distiller(student, teacher, batch, shared_params=[shared])
        assert out.transfer.item() == 0.0, scheduler
        assert set(out.losses) == set(out.weights) == set(distiller.terms), (scheduler, out.losses, out.weights)
        assert all(v.item() == 0.0 for v in out.losses.values()), (scheduler, out.losses)
        assert all(torch.isfinite(torch.tensor(w)) for w in out.weights.values()), (scheduler, out.weights)
        out.loss.backward()
        # projectors and student features get exactly zero gradient. (The ``uncertainty`` scheduler's
        # log-variances are the exception by design: its regulariser sum_i base_i * s_i has gradient base_i
        # whatever the batch holds.)
        tensors = [*distiller.terms.parameters(), *student.hidden_states.values(), student.final_hidden,
                   *(x for qkv in student.qkv.values() for x in qkv)]
        grads = [p.grad for p in tensors if p.grad is not None]
        assert all(torch.count_nonzero(g) == 0 for g in grads), scheduler


# --- integration: teacher handling, non-finite teachers, checkpoint state ------------------------------------------



def _tiny_llama(seed=0, vocab=128, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)


@pytest.fixture
def integrations():
    # transformers is an optional extra; once it is installed, the shipped adapters must import (no skip)
    pytest.importorskip("transformers", reason="integration checks need transformers (extra 'trl')")
    import kd_plugins.integrations.teachers as teachers

    return teachers


def test_trainable_teacher_object_is_left_as_passed_and_gets_no_gradient(integrations, caplog):
    from kd_plugins import Requirements

    student, teacher = _tiny_llama(0), _tiny_llama(1)
    teacher.train()
    assert all(p.requires_grad for p in teacher.parameters())
    with caplog.at_level(logging.INFO, logger="kd_plugins.integrations.teachers"):
        resolved = integrations.resolve_teacher(teacher, student)
    # the user's object is not mutated: same object, flags and mode as passed
    assert resolved.model is teacher and teacher.training
    assert all(p.requires_grad for p in teacher.parameters())
    capture = resolved.capture({"input_ids": torch.randint(0, 128, (2, 5))}, Requirements(final_hidden=True))
    assert not capture.final_hidden.requires_grad  # run under no_grad
    assert teacher.training  # eval mode only during the capture
    count = len(list(teacher.parameters()))
    assert any(re.search(rf"its {count} trainable parameter tensors get no gradient", r.getMessage())
               for r in caplog.records)


@pytest.mark.parametrize("teacher_dtype", [torch.float64, torch.bfloat16])
def test_teacher_object_keeps_its_dtype_with_auto(integrations, teacher_dtype):
    student, teacher = _tiny_llama(0), _tiny_llama(1, dtype=teacher_dtype)
    resolved = integrations.resolve_teacher(teacher, student, dtype="auto")
    assert resolved.model is teacher
    assert {p.dtype for p in teacher.parameters()} == {teacher_dtype}  # not converted in place, no copy


@pytest.mark.parametrize("teacher_dtype, setting", [(torch.float32, "bfloat16"), (torch.bfloat16, "float32")])
def test_teacher_object_in_another_dtype_than_asked_is_refused(integrations, teacher_dtype, setting):
    student, teacher = _tiny_llama(0), _tiny_llama(1, dtype=teacher_dtype)
    with pytest.raises(ConfigError) as info:
        integrations.resolve_teacher(teacher, student, dtype=setting)
    message = str(info.value)
    held = str(teacher_dtype).removeprefix("torch.")
    for fragment in (f"teacher_dtype={setting!r}", f"holds {held} weights", "does not convert your object",
                     f"teacher.to(torch.{setting})", "teacher_dtype: auto"):
        assert fragment in message, (fragment, message)
    assert {p.dtype for p in teacher.parameters()} == {teacher_dtype}


@pytest.mark.parametrize("setting, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_teacher_path_is_loaded_in_the_asked_dtype(integrations, tmp_path, setting, expected):
    _tiny_llama(1, dtype=torch.bfloat16).save_pretrained(tmp_path / "teacher")
    resolved = integrations.resolve_teacher(str(tmp_path / "teacher"), _tiny_llama(0), dtype=setting)
    assert {p.dtype for p in resolved.model.parameters()} == {expected}
    assert not any(p.requires_grad for p in resolved.model.parameters()) and not resolved.model.training


def test_trust_remote_code_is_never_on_by_default(integrations, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    assert inspect.signature(integrations.resolve_teacher).parameters["trust_remote_code"].default is False
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return _tiny_llama(1)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(fake_from_pretrained))
    integrations.resolve_teacher(str(tmp_path), _tiny_llama(0))
    assert seen.get("trust_remote_code") is False
    # and no integration module hard-codes it on
    import kd_plugins.integrations as package
    from pathlib import Path

    for source in Path(package.__file__).parent.glob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", source.read_text()), source


def test_kd_state_is_safetensors_written_then_renamed(integrations, monkeypatch, tmp_path):
    import kd_plugins.integrations.transformers as transformers_glue
    import json
    import os
    import struct

    from safetensors import safe_open

    distiller = _distiller(ALIGNMENT_TERMS)
    callback = transformers_glue.DistillationCallback(distiller)
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst), os.path.getsize(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    path = callback.save(str(tmp_path))
    # written to a temporary file in the same folder, then atomically renamed over the final name
    assert len(renames) == 1 and renames[0][1] == transformers_glue.KD_STATE_NAME
    assert renames[0][0] != renames[0][1] and renames[0][2] > 0
    assert sorted(os.listdir(tmp_path)) == [transformers_glue.KD_STATE_NAME]
    # the safetensors layout: 8-byte little-endian header length, a JSON header, raw tensor bytes (no pickle)
    raw = open(path, "rb").read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(distiller.kd_state_dict())
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # neither a pickle nor a torch zip
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(distiller.kd_state_dict())
    # round trip into a fresh distiller
    fresh = _distiller(ALIGNMENT_TERMS)
    transformers_glue.DistillationCallback(fresh).load(str(tmp_path))
    for key, value in distiller.kd_state_dict().items():
        assert torch.equal(fresh.kd_state_dict()[key], value), key


def test_kd_state_from_another_config_is_refused(integrations, tmp_path):
    import kd_plugins.integrations.transformers as glue
    glue.DistillationCallback(_distiller(ALIGNMENT_TERMS)).save(str(tmp_path))
    other = _distiller([{"name": "mse"}])
    before = {k: v.clone() for k, v in other.kd_state_dict().items()}
    with pytest.raises(ConfigError) as info:
        glue.DistillationCallback(other).load(str(tmp_path))
    message = str(info.value)
    for fragment in ("was saved with another KD configuration", "terms[contrastive]: 'contrastive' (weight 1.0) -> "
                     "(absent)", "terms[cosine]", "allow_config_change_on_resume: true"):
        assert fragment in message, (fragment, message)
    assert all(torch.equal(before[k], v) for k, v in other.kd_state_dict().items())


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=8, vocab=128):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone(), "attention_mask": torch.ones_like(self.ids[i])}


def test_nonfinite_teacher_raise_names_the_step_and_the_switch(integrations, tmp_path):
    pytest.importorskip("trl", reason="KDTrainer needs trl (extra 'trl')")
    import kd_plugins.integrations.trl as trl_glue
    from transformers import TrainingArguments

    student, teacher = _tiny_llama(0), _tiny_llama(1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.fill_(float("inf"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = trl_glue.KDTrainer(model=student, args=args, train_dataset=_TokenDataset(), teacher=teacher,
                                 kd_config={"terms": [{"name": "mse"}]})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(trl_glue.NonFiniteTeacherError) as info:
        trainer.train()
    message = str(info.value)
    assert "NaN/inf" in message and "step 0" in message and "on_nonfinite_teacher: skip" in message
    # refused before any optimizer step: the student is untouched
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
