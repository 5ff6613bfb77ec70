"""Teacher-generated distillation data: bucketing, batched sampling against batch-1 generate, EOS stops, rows
leaving the batch, the dataset (packing, prompt masks, mixing), the cache against a live teacher, resuming, the CLI,
and prompt sources that never touch evaluation text."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from kd_plugins.errors import ConfigError
from kd_plugins.integrations.teacher_cache import TeacherCache
from kd_plugins.recipes.generate import (
    Generation,
    SamplingConfig,
    _next_token,
    distillation_dataset,
    generate_distillation_data,
    length_buckets,
    sample_teacher,
)
from kd_plugins.recipes.prompts import (
    TEMPLATES,
    TRAINING_CORPORA,
    build_prompts,
    corpus_openings,
    instruction_prompts,
    word_ngrams,
)

from .conftest import kd_config, sft_args, tiny_model, tiny_tokenizer

EOS, PAD = 1, 0


def _prompts(n=12, vocab=16, seed=0, lo=2, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def _reference(model, prompt, max_new_tokens):
    """Batch-1 greedy Hugging Face generate, cut after the first EOS."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


@pytest.fixture(scope="module")
def eos_model():
    """A float64 tiny model that ends some greedy completions with EOS and not others: EOS's head row becomes a
    frequent greedy token's row scaled by 1.01, so EOS wins wherever that token would win with a positive logit.
    The token is the rarest one that ends between a quarter and three quarters of the test prompts."""
    model = tiny_model(vocab=16, layers=2).double().eval()
    greedy = SamplingConfig(batch_size=12, max_new_tokens=10, temperature=0)
    prompts = _prompts()

    def completions():
        return [g.completion_ids for g in sample_teacher(model, prompts, greedy, stop_ids=[EOS], pad_id=PAD,
                                                         progress=False)]

    counts = Counter(t for c in completions() for t in c)
    for token in sorted((t for t in counts if t != EOS), key=lambda t: counts[t]):
        with torch.no_grad():
            model.lm_head.weight[EOS] = 1.01 * model.lm_head.weight[token]
        ended = sum(EOS in c for c in completions())
        if len(prompts) // 4 <= ended <= 3 * len(prompts) // 4:
            return model
    raise AssertionError("no token gives a mix of finished and unfinished completions")


def test_length_buckets_sort_prompts_by_length_and_cover_every_index():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8]
    buckets = length_buckets(lengths, 3)
    assert [len(b) for b in buckets] == [3, 3, 2]
    assert sorted(i for b in buckets for i in b) == list(range(8))
    flat = [lengths[i] for b in buckets for i in b]
    assert flat == sorted(lengths)
    assert buckets[0] == [1, 6, 3]  # ties (3, 3) keep index order
    assert length_buckets([], 4) == []


def test_batched_greedy_sampling_equals_batch1_generate_and_stops_at_eos(eos_model):
    model = eos_model
    prompts = _prompts()
    out = sample_teacher(model, prompts, SamplingConfig(batch_size=5, max_new_tokens=10, temperature=0),
                         stop_ids=[EOS], pad_id=PAD, progress=False)
    assert [g.index for g in out] == list(range(len(prompts)))
    finished = 0
    for g, prompt in zip(out, prompts):
        assert g.prompt_ids == prompt
        assert g.completion_ids == _reference(model, prompt, 10)
        assert g.finished == (g.completion_ids[-1] == EOS)
        assert EOS not in g.completion_ids[:-1]  # nothing after the first EOS
        assert g.finished or len(g.completion_ids) == 10
        finished += g.finished
    assert len(prompts) // 4 <= finished <= 3 * len(prompts) // 4  # both kinds of row were exercised


def test_finished_rows_leave_the_batch(eos_model):
    model = eos_model
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    prompts = _prompts()
    out = sample_teacher(model, prompts, SamplingConfig(batch_size=12, max_new_tokens=10, temperature=0),
                         stop_ids=[EOS], pad_id=PAD, progress=False)
    handle.remove()
    lengths = sorted(len(g.completion_ids) for g in out)
    # one forward per generated position; at step s only the rows still running are in the batch
    expected = [sum(1 for n in lengths if n > s) for s in range(max(lengths))]
    assert batch_sizes == expected[: len(batch_sizes)] and len(batch_sizes) == max(lengths)
    assert batch_sizes[0] == 12 and batch_sizes[-1] < 12


def test_next_token_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert _next_token(logits, SamplingConfig(temperature=0), g).item() == 0
    assert all(_next_token(logits, SamplingConfig(top_k=1), g).item() == 0 for _ in range(20))
    assert all(_next_token(logits, SamplingConfig(top_p=0.4), g).item() == 0 for _ in range(20))
    draws = Counter(_next_token(logits.expand(4000, 4), SamplingConfig(temperature=1.0, top_p=0.8), g).tolist())
    assert set(draws) == {0, 1}  # the nucleus of mass 0.8 is {0.5, 0.3}
    assert draws[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    hot = Counter(_next_token(logits.expand(4000, 4), SamplingConfig(temperature=2.0, top_p=1.0), g).tolist())
    p = torch.softmax(logits[0] / 2.0, -1)
    for token in range(4):
        assert hot[token] / 4000 == pytest.approx(float(p[token]), abs=0.03)


def test_sampling_is_reproducible():
    model = tiny_model(vocab=16, layers=2).eval()
    config = SamplingConfig(batch_size=3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    a = sample_teacher(model, _prompts(6), config, stop_ids=[EOS], pad_id=PAD, progress=False)
    b = sample_teacher(model, _prompts(6), config, stop_ids=[EOS], pad_id=PAD, progress=False)
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]


def _generation(prompt, completion, finished=True, index=0):
    return Generation(prompt_ids=prompt, completion_ids=completion, finished=finished, index=index)


def test_dataset_unpacked_with_prompt_mask():
    gens = [_generation([5, 6], [7, 8, EOS]), _generation([9], [10, 11], finished=False, index=1)]
    data, info = distillation_dataset(gens, mask_prompt=True, block_size=None)
    rows = sorted(zip(data["input_ids"], data["labels"]))
    assert rows == [([5, 6, 7, 8, EOS], [-100, -100, 7, 8, EOS]), ([9, 10, 11], [-100, 10, 11])]
    assert info["teacher_tokens"] == 8 and info["real_tokens"] == 0 and info["max_length"] == 5
    assert info["masked_prompt_tokens"] == 3
    plain, _ = distillation_dataset(gens, block_size=None)
    assert plain.column_names == ["input_ids"]


def test_dataset_packing_and_mixing_real_text():
    gens = [_generation([5, 6], [7, EOS]), _generation([9], [10, 11], finished=False, index=1),
            _generation([12, 13, 14], [15, EOS], index=2)]
    data, info = distillation_dataset(gens, mask_prompt=True, block_size=4, eos_id=EOS)
    # stream: 5 6 7 EOS | 9 10 11 EOS(separator) | 12 13 14 15 EOS -> three full blocks, tail dropped
    assert sorted(data["input_ids"]) == [[5, 6, 7, EOS], [9, 10, 11, EOS], [12, 13, 14, 15]]
    labels = dict(zip(map(tuple, data["input_ids"]), data["labels"]))
    assert labels[(5, 6, 7, EOS)] == [-100, -100, 7, EOS]
    assert labels[(9, 10, 11, EOS)] == [-100, 10, 11, EOS]
    assert labels[(12, 13, 14, 15)] == [-100, -100, -100, 15]
    real = [[100 + i] * 4 for i in range(10)]
    mixed, info = distillation_dataset(gens, real_blocks=real, teacher_share=0.5, block_size=4, eos_id=EOS)
    assert info["teacher_tokens"] == 12 and info["real_tokens"] == 12 and info["sources"].count("real") == 3
    assert sum(1 for ids in mixed["input_ids"] if ids[0] >= 100) == 3
    with pytest.raises(ValueError, match="real tokens"):
        distillation_dataset(gens, real_blocks=real[:1], teacher_share=0.1, block_size=4, eos_id=EOS)
    with pytest.raises(ValueError, match="teacher_share"):
        distillation_dataset(gens, teacher_share=0.0)
    with pytest.raises(ValueError, match="eos_id"):
        distillation_dataset(gens, block_size=4)
    with pytest.raises(ValueError, match="fewer than one block"):
        distillation_dataset(gens, block_size=64, eos_id=EOS)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(max_new_tokens=0)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingConfig(**bad)


def _word_prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (int(k),), generator=g))
            for k in torch.randint(2, 7, (n,), generator=g)]


def _prompt_objects(tokenizer, texts):
    from kd_plugins.recipes.prompts import Prompt

    return [Prompt(text=t, ids=tuple(tokenizer(t, add_special_tokens=False)["input_ids"]), kind="file") for t in texts]


def test_cache_rows_equal_a_live_teacher_on_the_generated_text(tmp_path):
    teacher, tokenizer = tiny_model(seed=1, hidden=48, layers=3), tiny_tokenizer()
    state = generate_distillation_data(
        teacher, tokenizer, tmp_path / "run", prompts=_prompt_objects(tokenizer, _word_prompts()),
        sampling=SamplingConfig(batch_size=5, max_new_tokens=10, temperature=1.0), mask_prompt=True,
        block_size=None, k=8, layers=[0, 2], hidden_dtype="float32", progress=False)
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "run" / "dataset"))
    cache = TeacherCache(tmp_path / "run" / "cache", tokenizer=tokenizer, dataset=data, k=8, layers=[0, 2])
    assert state["cache"]["layers"] == [0, 2] and len(cache) == len(data) == 12
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(12))
    texts = {tuple(r["prompt_ids"] + r["completion_ids"]) for r in records}
    for i in range(len(data)):
        ids = data[i]["input_ids"]
        assert tuple(ids) in texts
        rows = cache.example(i)
        with torch.no_grad():
            out = teacher(torch.tensor([ids]), output_hidden_states=True)
        top = torch.log_softmax(out.logits[0].float(), -1).topk(8, -1)
        torch.testing.assert_close(rows["topk_logprobs"], top.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(rows["topk_indices"].long(), top.indices)
        torch.testing.assert_close(rows["hidden.0"], out.hidden_states[1][0], rtol=1e-5, atol=1e-5)


def test_kd_trainer_trains_from_the_generated_dataset_and_cache(tmp_path):
    from datasets import load_from_disk

    from kd_plugins.integrations.trl import KDSFTTrainer

    teacher, tokenizer = tiny_model(seed=1, hidden=48, layers=3), tiny_tokenizer()
    generate_distillation_data(
        teacher, tokenizer, tmp_path / "run", prompts=_prompt_objects(tokenizer, _word_prompts(16)),
        sampling=SamplingConfig(batch_size=8, max_new_tokens=12), mask_prompt=True, block_size=16, k=8,
        layers=[1], hidden_dtype="float32", progress=False)
    data = load_from_disk(str(tmp_path / "run" / "dataset"))
    student = tiny_model(seed=2, hidden=32, layers=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = KDSFTTrainer(
        model=student, args=sft_args(tmp_path / "out", max_steps=2, per_device_train_batch_size=2),
        train_dataset=data, processing_class=tokenizer, teacher=TeacherCache(tmp_path / "run" / "cache"),
        kd_config=kd_config([{"name": "forward_kl", "weight": 1.0},
                             {"name": "mse", "weight": 0.5, "layers": [[1, 1]]}]))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_run_resumes_after_a_budget_stop_and_refuses_other_settings(tmp_path):
    teacher, tokenizer = tiny_model(seed=1, layers=2), tiny_tokenizer()
    prompts = _prompt_objects(tokenizer, _word_prompts(12))
    kwargs = dict(prompts=prompts, sampling=SamplingConfig(batch_size=3, max_new_tokens=6), block_size=None,
                  cache=False, progress=False)
    first = generate_distillation_data(teacher, tokenizer, tmp_path, max_cpu_seconds=0.0, **kwargs)
    assert first["sampling_stats"]["generations"] == 3 and not first["sampling_stats"]["complete"]
    with open(tmp_path / "generations.jsonl", "a") as handle:
        handle.write('{"prompt_ids": [4, 5')  # an interrupted write
    second = generate_distillation_data(teacher, tokenizer, tmp_path, **kwargs)
    assert second["sampling_stats"]["generations"] == 12 and second["sampling_stats"]["complete"]
    assert second["sampling_stats"]["this_run"]["generations"] == 9
    indices = [json.loads(line)["index"] for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert sorted(indices) == list(range(12))
    assert second["dataset"]["examples"] == 12
    with pytest.raises(ConfigError, match="other settings"):
        generate_distillation_data(teacher, tokenizer, tmp_path, **{**kwargs, "block_size": 8})


def test_cli_generates_from_a_prompt_file(tmp_path, capsys):
    from kd_plugins.cli import main

    teacher, tokenizer = tiny_model(seed=1, layers=2), tiny_tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("\n".join(_word_prompts(6)) + "\n")
    code = main(["generate", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-new-tokens", "5", "--block-size", "0",
                 "--k", "4", "--layers", "0", "--compare-batch1", "1", "--threads", "1"])
    assert code == 0
    state = json.loads((tmp_path / "run" / "generate.json").read_text())
    assert state["sampling_stats"]["generations"] == 6 and state["cache"]["layers"] == [0]
    assert state["throughput_vs_batch1"]["ratio"]["n"] == 1
    assert "6 generations" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0


# --- prompt sources -----------------------------------------------------------------------------------------


def test_instruction_prompts_are_distinct_and_bounded():
    prompts = instruction_prompts(200, seed=1)
    assert len(set(prompts)) == 200 and prompts == instruction_prompts(200, seed=1)
    with pytest.raises(ValueError, match="distinct"):
        instruction_prompts(10**6)


def test_build_prompts_sources(tokenizer):
    texts = ["alpha " * 40 + "\n\n" + "beta " * 40, "gamma " * 50]
    mixed = build_prompts(tokenizer, "mixed", 5, texts=texts)
    assert [p.kind for p in mixed] == ["instruction", "corpus", "instruction", "corpus", "instruction"]
    assert all(p.ids for p in mixed)
    corpus = build_prompts(tokenizer, "corpus", 3, texts=texts)
    assert {p.text.split()[0] for p in corpus} == {"alpha", "beta", "gamma"}
    with pytest.raises(ValueError, match="training corpora"):
        build_prompts(tokenizer, "corpus", 2, corpus="not_a_training_corpus")
    with pytest.raises(ValueError, match="source"):
        build_prompts(tokenizer, "wikipedia", 2)
    with pytest.raises(ValueError, match="usable paragraphs"):
        corpus_openings(texts, 10)


def _evaluation_texts() -> dict[str, str]:
    """Every text the evaluation may score: the held-out split of each training corpus, every other corpus
    recipes/data.py offers, and the files of recipes/tasks (when the evaluation suite ships them)."""
    from kd_plugins.recipes import data

    texts = {}
    for name in TRAINING_CORPORA:
        _, heldout = data.split_corpus(data.load_corpus(name), heldout_fraction=0.1, seed=0)
        texts[f"{name} (held out)"] = "\n".join(heldout)
    names = set(data.CORPORA)
    for attribute in dir(data):  # evaluation corpora listed under their own name(s)
        value = getattr(data, attribute)
        if "CORPORA" in attribute and isinstance(value, (tuple, list)):
            names |= {v for v in value if isinstance(v, str)}
    for name in sorted(names - set(TRAINING_CORPORA)):
        loader = data.load_eval_corpus if name in getattr(data, "EVAL_CORPORA", ()) else data.load_corpus
        texts[name] = "\n".join(loader(name))
    tasks = Path(data.__file__).parent / "tasks"
    if tasks.is_dir():
        for path in sorted(tasks.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".yml", ".txt", ".csv"):
                texts[f"tasks/{path.relative_to(tasks)}"] = path.read_text(errors="replace")
    return texts


def test_prompt_sources_are_disjoint_from_every_evaluation_text():
    """No prompt shares a run of eight words with any evaluation text (shorter prompts: no verbatim occurrence)."""
    tokenizer = tiny_tokenizer()
    openings = [p.text for p in build_prompts(tokenizer, "corpus", 200, seed=0)]
    instructions = instruction_prompts(len(TEMPLATES) * 50, seed=0)
    assert len(openings) == 200
    for name, text in _evaluation_texts().items():
        grams = word_ngrams(text)
        flat = " ".join(text.split())
        for prompt in openings + instructions:
            if len(prompt.split()) >= 8:
                shared = word_ngrams(prompt) & grams
                assert not shared, f"prompt {prompt!r} shares {sorted(shared)[0]} with evaluation text {name}"
            else:
                assert " ".join(prompt.split()) not in flat, f"prompt {prompt!r} occurs in {name}"


def test_openings_skip_paragraphs_shared_with_avoided_text():
    shared = "one two three four five six seven eight nine ten " * 4
    texts = [shared, "eleven twelve " * 25]
    openings = corpus_openings(texts, 1, avoid=["x " + shared], max_words=12)
    assert openings[0].startswith("eleven")
    with pytest.raises(ValueError, match="usable paragraphs"):
        corpus_openings(texts, 2, avoid=[shared], max_words=12)
