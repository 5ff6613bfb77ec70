"""evaluate_lm against a naive computation, retention arithmetic, generation speed and the table."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kd_plugins.recipes.evaluation import (  # noqa: E402
    compare_generation_speed,
    evaluate_lm,
    generation_speed,
    markdown_table,
    retention,
    speedup,
)


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        initializer_range=0.5,  # confident, varied predictions so accuracy is not trivially 0
    )
    return LlamaForCausalLM(config).float()


def _naive(model, blocks, teacher=None):
    nll, correct, agree, kl, n = 0.0, 0, 0, 0.0, 0
    with torch.no_grad():
        for row in blocks:
            x = torch.tensor([row])
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            tlogp = torch.log_softmax(teacher(input_ids=x).logits[0].double(), -1) if teacher else None
            for t in range(len(row) - 1):
                nll -= float(logp[t, row[t + 1]])
                correct += int(int(logp[t].argmax()) == row[t + 1])
                if teacher:
                    agree += int(int(logp[t].argmax()) == int(tlogp[t].argmax()))
                    kl += float((tlogp[t].exp() * (tlogp[t] - logp[t])).sum())
                n += 1
    return nll / n, correct / n, agree / n, kl / n, n


def test_evaluate_lm_matches_naive_computation():
    student, teacher = _model(0), _model(1)
    blocks = torch.randint(3, 40, (5, 9), generator=torch.Generator().manual_seed(0)).tolist()
    student.train()
    out = evaluate_lm(student, blocks, teacher=teacher, batch_size=2)
    assert student.training  # mode restored
    nll, acc, agree, kl, n = _naive(student.eval(), blocks, teacher.eval())
    assert out["tokens"] == n == 5 * 8
    assert out["accuracy"] == acc  # exact: same argmax decisions, counted
    assert out["agreement"] == agree
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]), rel=1e-12)
    assert out["kl_teacher_student"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    alone = evaluate_lm(teacher, blocks)
    assert out["teacher_accuracy"] == alone["accuracy"]
    assert out["teacher_nll"] == pytest.approx(alone["nll"], rel=1e-6)
    assert out["teacher_perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)


def test_evaluate_lm_against_itself_and_bad_input():
    model = _model(0)
    blocks = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(2))
    out = evaluate_lm(model, blocks, teacher=model)
    assert out["agreement"] == 1.0 and out["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert "agreement" not in evaluate_lm(model, blocks)
    with pytest.raises(ValueError, match="blocks"):
        evaluate_lm(model, torch.zeros(2, 1, dtype=torch.long))


def test_retention_arithmetic():
    teacher = {"accuracy": 0.5, "perplexity": 10.0, "nll": math.log(10.0)}
    student = {"accuracy": 0.4, "perplexity": 20.0, "nll": math.log(20.0)}
    r = retention(student, teacher)
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["perplexity"] == pytest.approx(0.5)
    assert r["nll"] == pytest.approx(math.log(10) / math.log(20))
    assert retention({"accuracy": 0.1}, {"accuracy": 0.0})["accuracy"] != retention({"accuracy": 0.1}, {"accuracy": 0.0})["accuracy"]  # nan
    assert retention({}, teacher) == {}


class _Tok:
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[3 + (ord(c) % 30) for c in text]]),
                "attention_mask": torch.ones(1, len(text), dtype=torch.long)}


def test_generation_speed_interleaved():
    a, b = _model(0), _model(1)
    stats = compare_generation_speed({"teacher": a, "student": b}, _Tok(), ["abc", "hello"], max_new_tokens=4)
    assert set(stats) == {"teacher", "student"}
    for s in stats.values():
        assert s["new_tokens"] == 8 and s["tokens_per_s"] > 0 and s["latency_s"] > 0
        assert s["ms_per_token"] == pytest.approx(1000 * s["latency_s"] * 2 / 8)
    single = generation_speed(a, _Tok(), ["abc"], max_new_tokens=3)
    assert single["new_tokens"] == 3


def test_generation_speed_repeats_and_paired_speedup():
    a, b = _model(0), _model(1)
    stats = compare_generation_speed({"teacher": a, "student": b}, _Tok(), ["abc", "hello"], max_new_tokens=3,
                                     repeats=3)
    for s in stats.values():
        assert s["repeats"] == 3 and s["new_tokens"] == 3 * 2 * 3
        per = s["per_repeat"]["tokens_per_s"]
        assert len(per) == 3 and s["tokens_per_s_min"] <= s["tokens_per_s"] <= s["tokens_per_s_max"]
        assert s["tokens_per_s"] == sorted(per)[1]  # the median of three
        assert len(s["per_repeat"]["tokens_per_cpu_s"]) == 3 and s["tokens_per_cpu_s"] > 0
    up = speedup(stats, "student", "teacher")
    ratios = [x / y for x, y in zip(stats["student"]["per_repeat"]["tokens_per_s"],
                                    stats["teacher"]["per_repeat"]["tokens_per_s"])]
    assert up["values"] == pytest.approx(ratios) and up["median"] == pytest.approx(sorted(ratios)[1])
    assert up["min"] == pytest.approx(min(ratios)) and up["max"] == pytest.approx(max(ratios)) and up["repeats"] == 3
    with pytest.raises(ValueError, match="repeats"):
        compare_generation_speed({"a": a}, _Tok(), ["abc"], repeats=0)


def test_markdown_table():
    table = markdown_table({"teacher": {"acc": 0.5}, "student": {}}, [("acc", "top-1", ".1%")])
    assert table.splitlines() == ["| model | top-1 |", "|---|---:|", "| teacher | 50.0% |", "| student |  |"]
