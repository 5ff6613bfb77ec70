"""The retention suite: its arithmetic against hand-computed values, the cached teacher against the live one,
lm-evaluation-harness on a tiny random model with the shipped task files (against a hand-written log-likelihood
scorer), the shipped task data against its generator, the guarantee that no training path reads the evaluation
corpora, and RetentionCallback in ``trainer.state.log_history``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

from kd_plugins.recipes import retention as R  # noqa: E402
from kd_plugins.recipes.evaluation import evaluate_lm  # noqa: E402

DOMAINS = ("pydoc_heldout", "wikipedia", "dialog")


def _blocks(n=5, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {d: torch.randint(4, 128, (n, length), generator=g).tolist() for d in DOMAINS}


# --- arithmetic ---------------------------------------------------------------------------------------------


def test_lm_retention_hand_computed():
    teacher = {"accuracy": 0.40, "perplexity": 10.0, "nll": math.log(10.0)}
    student = {"accuracy": 0.30, "perplexity": 20.0, "nll": math.log(20.0), "agreement": 0.6,
               "kl_teacher_student": 0.5}
    r = R.lm_retention(student, teacher)
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["perplexity"] == pytest.approx(0.5)
    assert r["nll"] == pytest.approx(math.log(10) / math.log(20))
    assert r["agreement"] == pytest.approx(0.6)
    assert r["kl"] == pytest.approx(math.exp(-0.5))
    same = R.lm_retention({**teacher, "agreement": 1.0, "kl_teacher_student": 0.0}, teacher)
    assert same == pytest.approx({"accuracy": 1.0, "perplexity": 1.0, "nll": 1.0, "agreement": 1.0, "kl": 1.0})
    assert math.isnan(R.lm_retention({"accuracy": 0.1}, {"accuracy": 0.0})["accuracy"])


def test_task_retention_above_chance_hand_computed():
    assert R.task_retention(0.50, 0.75, 0.25) == pytest.approx(0.5)  # (0.50-0.25)/(0.75-0.25)
    assert R.task_retention(0.25, 0.75, 0.25) == 0.0  # a guess keeps nothing
    assert R.task_retention(0.75, 0.75, 0.25) == pytest.approx(1.0)
    assert R.task_retention(0.20, 0.45, 0.25) == pytest.approx(-0.25)  # below chance: negative
    assert R.task_retention(0.60, 0.55, 0.5) == pytest.approx(2.0)  # better than the teacher: above 1
    assert math.isnan(R.task_retention(0.4, 0.25, 0.25))  # teacher at chance: nothing to retain
    with pytest.raises(ValueError, match="chance"):
        R.task_retention(0.5, 0.6, 1.0)


def test_summarize_hand_computed():
    def domain(kind, acc, ppl):
        return {"kind": kind, "retention": {"accuracy": acc, "perplexity": ppl, "agreement": 0.5, "kl": 0.4}}

    def task(s, t, raw, above):
        return {"student": {"acc": s}, "teacher": {"acc": t}, "retention": {"acc": raw, "acc_above_chance": above}}

    report = {"domains": {"a": domain("in_domain", 0.7, 0.5), "b": domain("out_of_domain", 0.4, 0.2),
                          "c": domain("out_of_domain", 0.2, 0.1)},
              "tasks": {"x": task(0.5, 0.75, 0.5 / 0.75, 0.5), "y": task(0.3, 0.45, 0.3 / 0.45, float("nan"))}}
    s = R.summarize(report)
    assert s["in_domain_top1"] == pytest.approx(0.7) and s["in_domain_perplexity"] == pytest.approx(0.5)
    assert s["out_of_domain_top1"] == pytest.approx(0.3) and s["out_of_domain_perplexity"] == pytest.approx(0.15)
    assert s["tasks_acc"] == pytest.approx((0.5 / 0.75 + 0.3 / 0.45) / 2)
    assert s["tasks_acc_above_chance"] == pytest.approx(0.5)  # the NaN task is left out of the mean
    assert s["tasks_student_acc"] == pytest.approx(0.4) and s["tasks_teacher_acc"] == pytest.approx(0.6)


def test_suite_config_validation():
    with pytest.raises(ValueError, match="unknown domain"):
        R.SuiteConfig(domains=("pydoc_heldout", "reddit"))
    with pytest.raises(ValueError, match="unknown task"):
        R.SuiteConfig(tasks=("hellaswag",))
    with pytest.raises(ValueError, match="max_blocks=0"):
        R.SuiteConfig(max_blocks=0)
    with pytest.raises(ValueError, match="task_limit"):
        R.SuiteConfig(task_limit=0)
    with pytest.raises(ValueError, match="nothing to measure"):
        R.SuiteConfig(domains=(), tasks=())


# --- the teacher's side: stored hidden states == the live teacher; the disk cache ---------------------------


def test_stored_teacher_equals_live_teacher_and_student_metrics_match_evaluate_lm(tmp_path):
    teacher, student, tok = tiny_model(layers=3, seed=1), tiny_model(layers=2, seed=0), tiny_tokenizer()
    blocks = _blocks()
    config = R.SuiteConfig(tasks=(), max_blocks=5, block_size=12, batch_size=2)
    reference = R.TeacherReference(teacher, tok, config, blocks=blocks, progress=False)
    student.train()
    report = R.run_suite(student, reference, progress=False)
    assert student.training  # mode restored
    for name in DOMAINS:
        live = evaluate_lm(student, blocks[name], teacher=teacher)
        d = report["domains"][name]
        assert d["tokens"] == 5 * 11 and d["kind"] == R.DOMAINS[name].kind
        assert d["student"]["accuracy"] == live["accuracy"] and d["student"]["agreement"] == live["agreement"]
        assert d["student"]["nll"] == pytest.approx(live["nll"], rel=1e-5)
        assert d["student"]["kl_teacher_student"] == pytest.approx(live["kl_teacher_student"], rel=1e-4, abs=1e-6)
        assert d["teacher"]["accuracy"] == live["teacher_accuracy"]
        assert d["teacher"]["perplexity"] == pytest.approx(live["teacher_perplexity"], rel=1e-5)
        assert d["retention"] == pytest.approx(R.lm_retention(d["student"], d["teacher"]), nan_ok=True)
    assert report["summary"]["in_domain_perplexity"] == pytest.approx(
        report["domains"]["pydoc_heldout"]["retention"]["perplexity"])
    with pytest.raises(KeyError):  # a row that is not one of the domain's blocks
        reference.domain_teacher("wikipedia")(torch.full((1, 12), 5))


def test_disk_cache_skips_the_teacher_and_is_keyed_by_its_weights(tmp_path, monkeypatch):
    teacher, student, tok = tiny_model(layers=3, seed=1), tiny_model(layers=2, seed=0), tiny_tokenizer()
    blocks = _blocks(n=3)
    config = R.SuiteConfig(tasks=(), max_blocks=3, block_size=12)
    first = R.run_suite(student, R.TeacherReference(teacher, tok, config, blocks=blocks, cache_dir=tmp_path,
                                                    progress=False).prepare(), progress=False)
    assert len(list(tmp_path.rglob("domain-*.pt"))) == 3

    def no_backbone(*args, **kwargs):
        raise AssertionError("the teacher's blocks ran although the cache holds its hidden states")

    monkeypatch.setattr(teacher, "get_decoder", lambda: no_backbone)
    second = R.run_suite(student, R.TeacherReference(teacher, tok, config, blocks=blocks, cache_dir=tmp_path,
                                                     progress=False), progress=False)
    for name in DOMAINS:
        assert second["domains"][name]["student"] == pytest.approx(first["domains"][name]["student"])
    other = tiny_model(layers=3, seed=2)
    assert R.model_fingerprint(other) != R.model_fingerprint(teacher)
    assert R.model_fingerprint(tiny_model(layers=3, seed=1)) == R.model_fingerprint(teacher)


# --- lm-evaluation-harness with the shipped task files -----------------------------------------------------


def _task_tokenizer(items):
    """A word-level tokenizer whose vocabulary covers every word of ``items`` (no <unk>: choices differ)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for item in items for text in [item["context"], *item["choices"]] for w in text.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>"), len(vocab)


def _hand_scored_accuracy(model, tok, items):
    """Pick the choice with the highest summed log-probability of its tokens after the context."""
    correct = 0
    with torch.no_grad():
        for item in items:
            context = tok(item["context"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in item["choices"]:
                whole = tok(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].double(), -1)
                scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
            correct += int(max(range(len(scores)), key=lambda i: (scores[i], -i)) == item["label"])
    return correct / len(items)


@pytest.mark.parametrize("task", sorted(R.TASKS))
def test_lm_eval_on_a_tiny_model_matches_a_hand_written_scorer(task):
    pytest.importorskip("lm_eval")
    items = [json.loads(line) for line in (R.TASKS_DIR / "data" / f"{task}.jsonl").read_text().splitlines()[:12]]
    tok, vocab = _task_tokenizer(items)
    model = tiny_model(vocab=vocab, seed=3, initializer_range=0.5, max_position_embeddings=256).eval()
    scores = R.evaluate_tasks(model, tok, [task], limit=12, batch_size=4)
    assert scores[task]["items"] == 12
    assert scores[task]["acc"] == pytest.approx(_hand_scored_accuracy(model, tok, items))
    assert 0.0 <= scores[task]["acc_norm"] <= 1.0


# --- the shipped task data ----------------------------------------------------------------------------------


def test_shipped_tasks_are_well_formed():
    for name, spec in R.TASKS.items():
        assert (R.TASKS_DIR / f"{name}.yaml").is_file()
        items = [json.loads(line) for line in (R.TASKS_DIR / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert len(items) >= 200, f"{name}: a few hundred items expected"
        for item in items:
            assert len(item["choices"]) == round(1 / spec.chance) and len(set(item["choices"])) == len(item["choices"])
            assert 0 <= item["label"] < len(item["choices"]) and item["context"]
        labels = [item["label"] for item in items]  # the answer position is not a give-away
        assert max(labels.count(k) for k in range(4)) < 0.35 * len(items)


def test_shipped_task_data_is_the_generators_output():
    pytest.importorskip("yaml")
    from kd_plugins.recipes.tasks import build_tasks

    try:
        built = build_tasks.build_all()
    except FileNotFoundError as exc:
        pytest.skip(f"evaluation corpora not installed: {exc}")
    for name, items in built.items():
        shipped = (R.TASKS_DIR / "data" / f"{name}.jsonl").read_text(encoding="utf-8")
        assert shipped == "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), name
    assert set(built) == set(R.TASKS)


# --- evaluation-only corpora: never training data --------------------------------------------------------------


def test_training_loader_refuses_the_evaluation_corpora():
    from kd_plugins.recipes.data import CORPORA, EVAL_CORPORA, load_corpus

    assert not set(CORPORA) & set(EVAL_CORPORA)
    for name in EVAL_CORPORA:
        with pytest.raises(ValueError, match="evaluation only"):
            load_corpus(name)


def test_training_data_never_contains_evaluation_text():
    from kd_plugins.recipes.data import EVAL_CORPORA, load_corpus, load_eval_corpus, split_corpus

    train = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)[0]
    stream = "\n".join(load_corpus())
    for name in EVAL_CORPORA:
        try:
            docs = load_eval_corpus(name)
        except FileNotFoundError as exc:
            pytest.skip(f"evaluation corpus not installed: {exc}")
        assert len(docs) >= 10 and sum(map(len, docs)) > 50_000
        lines = [line for doc in docs for line in doc.split("\n") if len(line) > 60]
        assert lines and not [line for line in lines[::7] if line in stream]
        assert not set(docs) & set(train)


def test_training_paths_do_not_read_evaluation_corpora():
    """Static guarantee: the modules that build training data never call the evaluation-only loaders."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    eval_only = {"load_eval_corpus", "dialog_conversations", "wikipedia_articles", "_wikipedia_pages",
                 "_dialog_conversations", "domain_blocks"}
    training = [root / "recipes" / "training.py", root / "recipes" / "student.py", root / "benchmarks" / "ablation.py",
                root / "integrations" / "teacher_cache.py", root / "integrations" / "sft_cli.py",
                root / "integrations" / "trl.py"]
    for path in training:
        names = {node.id if isinstance(node, ast.Name) else node.attr
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.Name, ast.Attribute))}
        assert not names & eval_only, f"{path.name} reads an evaluation-only corpus: {names & eval_only}"
    tree = ast.parse((root / "recipes" / "data.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("load_corpus", "split_corpus",
                                                                                       "token_blocks", "lm_dataset")):
        called = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert not called & eval_only, f"{fn.name} calls {called & eval_only}"


def test_wikitext_to_text_strips_markup():
    from kd_plugins.recipes.data import wikitext_to_text

    wiki = ("{{Infobox|name={{nested|x}}}}'''Albedo''' ({{IPA|x}}) is the [[diffuse reflection|diffuse reflectivity]] "
            "of a [[surface]] in [[optics]] and climate.<ref>Some source</ref>\n{|\n| table || cell |}\n"
            "[[File:a.png|thumb|a [[caption]]]]\n* a list item that is long enough to pass the filter\n"
            "==References==\nShould not appear in the text at all because it follows references.")
    assert wikitext_to_text(wiki) == "Albedo is the diffuse reflectivity of a surface in optics and climate."


# --- RetentionCallback ----------------------------------------------------------------------------------------


def _tiny_trainer(tmp_path, callbacks=()):
    from kd_plugins.integrations.trl import KDSFTTrainer

    student, teacher, tok = tiny_model(seed=0), tiny_model(layers=3, seed=1), tiny_tokenizer()
    trainer = KDSFTTrainer(model=student, args=sft_args(tmp_path, max_steps=4), train_dataset=tiny_dataset(),
                           processing_class=tok, teacher=teacher,
                           kd_config=kd_config([{"name": "forward_kl", "weight": 1.0}]), callbacks=list(callbacks))
    return trainer, teacher, tok


def test_retention_callback_logs_into_log_history(tmp_path):
    blocks = _blocks(n=3)
    config = R.SuiteConfig(tasks=(), max_blocks=3, block_size=12)
    trainer, teacher, tok = _tiny_trainer(tmp_path)
    callback = R.RetentionCallback(teacher, tok, every=2, config=config, blocks=blocks)
    trainer.add_callback(callback.attach(trainer))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "retention/wikipedia/top1" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert all(f"retention/{d}/{k}" in h for h in logged for d in DOMAINS
               for k in ("top1", "perplexity", "agreement", "kl", "top1_retention", "perplexity_retention"))
    direct = R.run_suite(trainer.model, R.TeacherReference(teacher, tok, config, blocks=blocks, progress=False),
                         progress=False)  # the step-4 entry is the suite on the final model
    assert logged[-1]["retention/dialog/top1"] == direct["domains"]["dialog"]["student"]["accuracy"]
    assert logged[-1]["retention/dialog/kl"] == pytest.approx(direct["domains"]["dialog"]["student"]["kl_teacher_student"],
                                                              rel=1e-5)
    assert callback.reference is not None and len(callback.reports) == 2


def test_retention_callback_without_a_trainer_warns_and_still_records(tmp_path):
    config = R.SuiteConfig(domains=("dialog",), tasks=(), max_blocks=3, block_size=12)
    trainer, teacher, tok = _tiny_trainer(tmp_path)
    trainer.add_callback(R.RetentionCallback(teacher, tok, every=4, config=config, blocks=_blocks(n=3)))
    with pytest.warns(UserWarning, match="TensorBoard"):
        trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "retention/dialog/top1" in h] == [4]
    with pytest.raises(ValueError, match="every"):
        R.RetentionCallback(teacher, tok, every=0)


def test_report_table_and_plot(tmp_path):
    teacher, student, tok = tiny_model(layers=3, seed=1), tiny_model(layers=2, seed=0), tiny_tokenizer()
    config = R.SuiteConfig(tasks=(), max_blocks=3, block_size=12)
    report = R.run_suite(student, R.TeacherReference(teacher, tok, config, blocks=_blocks(n=3), progress=False),
                         progress=False)
    report["tasks"] = {"kd_wiki_cloze": {"chance": 0.25, "items": 10, "teacher": {"acc": 0.6, "acc_norm": 0.6},
                                         "student": {"acc": 0.4, "acc_norm": 0.5, "acc_stderr": 0.15},
                                         "retention": {"acc": 0.4 / 0.6, "acc_above_chance": 0.15 / 0.35,
                                                       "acc_norm": 0.5 / 0.6, "acc_norm_above_chance": 0.25 / 0.35}}}
    table = R.report_table(report).splitlines()
    assert len(table) == 2 + 3 + 1 and "| kd_wiki_cloze (10 items) | task |" in table[-1] and "42.9%" in table[-1]
    paths = R.write_report(report, tmp_path)
    assert paths["png"].stat().st_size > 10_000 and json.loads(paths["json"].read_text())["domains"]
    assert "retention.png" in paths["md"].read_text()
