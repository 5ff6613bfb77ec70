"""The bundled evaluate metrics load offline from the package and agree with naive computations."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from kd_plugins import metrics

evaluate = pytest.importorskip("evaluate", reason="the metrics need the 'evaluate' package (eval extra)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hub switches set, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)

    def no_network(self, address, *args, **kwargs):
        raise AssertionError(f"a metric tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def _rows(seed: int, n: int = 23, vocab: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3


def test_every_metric_loads_by_name_and_by_path():
    for name in metrics.METRICS:
        path = metrics.metric_path(name)
        assert path.is_file(), path
        assert metrics.load(name).name == name
        assert evaluate.load(str(path)).name == name
        assert evaluate.load(str(path.parent)).name == name  # the directory form


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(ValueError, match="top1_agreement"):
        metrics.load("bleu")


def test_top1_agreement_from_logits_and_ids():
    student, teacher = _rows(0)
    teacher[:5] = student[:5]  # some certain agreement
    naive = sum(int(s.argmax() == t.argmax()) for s, t in zip(student, teacher)) / len(student)
    metric = metrics.load("top1_agreement")
    result = metric.compute(predictions=student.numpy(), references=teacher.numpy())
    assert result["num_positions"] == 23
    assert result["top1_agreement"] == pytest.approx(naive)

    ids = metric.compute(predictions=[3, 5, 7, 9], references=[3, 6, -100, 9])
    assert ids == {"top1_agreement": pytest.approx(2 / 3), "num_positions": 3}


def test_top1_agreement_accumulates_batches():
    metric = metrics.load("top1_agreement")
    metric.add_batch(predictions=[1, 2], references=[1, 2])
    metric.add_batch(predictions=[3, 4], references=[0, 4])
    assert metric.compute()["top1_agreement"] == pytest.approx(0.75)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_to_teacher_matches_naive(temperature):
    student, teacher = _rows(1)
    naive = 0.0
    for s, t in zip(student.double() / temperature, teacher.double() / temperature):
        p_t = torch.softmax(t, -1)
        naive += float((p_t * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum())
    naive /= len(student)
    metric = metrics.load("kl_to_teacher")
    result = metric.compute(predictions=student.numpy(), references=teacher.numpy(), temperature=temperature)
    assert result["num_positions"] == 23
    assert result["kl_to_teacher"] == pytest.approx(naive, rel=1e-5)
    # log-probabilities give the same value as logits (log_softmax is idempotent)
    if temperature == 1.0:
        from_logprobs = metric.compute(
            predictions=torch.log_softmax(student, -1).numpy(), references=torch.log_softmax(teacher, -1).numpy()
        )
        assert from_logprobs["kl_to_teacher"] == pytest.approx(naive, rel=1e-4)


def test_kl_to_teacher_is_zero_for_identical_and_handles_zero_mass():
    student, _ = _rows(2)
    metric = metrics.load("kl_to_teacher")
    assert metric.compute(predictions=student.numpy(), references=student.numpy())["kl_to_teacher"] == pytest.approx(
        0.0, abs=1e-6
    )
    teacher = torch.full((1, 4), -1e30)
    teacher[0, 0] = 0.0  # one-hot teacher
    student = torch.zeros(1, 4)
    result = metric.compute(predictions=student.numpy(), references=teacher.numpy())
    assert result["kl_to_teacher"] == pytest.approx(math.log(4), rel=1e-5)


def test_retention_for_accuracy_and_perplexity():
    metric = metrics.load("retention")
    acc = metric.compute(predictions=[0.5, 0.7], references=[0.8, 0.8])
    assert acc == {"retention": pytest.approx(0.75), "student": pytest.approx(0.6), "teacher": pytest.approx(0.8)}
    ppl = metric.compute(predictions=[12.0], references=[9.0], higher_is_better=False)
    assert ppl["retention"] == pytest.approx(0.75)
    assert math.isnan(metric.compute(predictions=[1.0], references=[0.0])["retention"])
