"""The example third-party plugin (docs/examples/kd_plugins_example) works as a real installed package.

It is pip-installed (offline, no dependencies, no build isolation) into a temporary target directory, found
through the ``kd_plugins`` entry-point group, listed with its entry-point name as provider, and used by name
in a YAML KD config to train a tiny random Llama.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kd_plugins
from kd_plugins import plugins as registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "kd_plugins_example"
PROVIDER = "kd_example"

KD_YAML = """
ce_weight: 1.0
terms:
  - {name: hidden_l1, weight: 0.5, layers: last}
scheduler: {name: step_decay, step_size: 2, gamma: 0.5}
"""


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """Install the example package once per module; return the target directory."""
    work = tmp_path_factory.mktemp("example_plugin")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info under docs/.
    source = work / "src"
    shutil.copytree(EXAMPLE, source)
    target = work / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, f"pip install of the example plugin failed:\n{result.stdout}\n{result.stderr}"
    return target


@pytest.fixture
def example_on_path(installed_example, monkeypatch):
    """Put the installed example on sys.path with autoloading on, and rebuild the plugin manager."""
    monkeypatch.syspath_prepend(str(installed_example))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.setenv(registry.ALLOW_LIST_ENV, PROVIDER)  # other entry points of this venv stay out
    sys.modules.pop("kd_example_plugin", None)
    kd_plugins.reset_plugin_manager()
    yield installed_example
    kd_plugins.reset_plugin_manager()
    sys.modules.pop("kd_example_plugin", None)


def test_components_are_listed_with_the_entry_point_as_provider(example_on_path):
    available = kd_plugins.available_components()
    assert available["alignment"]["hidden_l1"] == PROVIDER
    assert available["scheduler"]["step_decay"] == PROVIDER
    assert available["alignment"]["mse"] == "kd_plugins.components.alignment"  # built-ins unaffected


def test_autoload_switch_hides_the_example(example_on_path, monkeypatch):
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    kd_plugins.reset_plugin_manager()
    available = kd_plugins.available_components()
    assert "hidden_l1" not in available["alignment"]
    assert "step_decay" not in available["scheduler"]


def test_cli_list_shows_the_example(installed_example):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_example), os.environ.get("PYTHONPATH", "")])}
    env.pop(registry.DISABLE_AUTOLOAD_ENV, None)
    env[registry.ALLOW_LIST_ENV] = PROVIDER
    # the installed console script when there is one (exactly what users run), else the same entry point
    script = Path(sys.executable).with_name("kd-plugins")
    command = [str(script), "list"] if script.is_file() else [
        sys.executable, "-c", "import sys; from kd_plugins.cli import main; sys.argv[1:] = ['list']; sys.exit(main())"
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("hidden_l1", "step_decay"):
        line = next((line for line in out.splitlines() if name in line), None)
        assert line is not None, f"`kd-plugins list` does not show {name}:\n{out}"
        assert PROVIDER in line, f"`kd-plugins list` does not name provider {PROVIDER} for {name}: {line!r}"


def test_step_decay_weights(example_on_path):
    from kd_plugins.plugins import get_component

    scheduler = get_component("scheduler", "step_decay").builder(
        base_weights={"a": 2.0}, step_size=3, gamma=0.5, min_factor=0.2
    )
    losses = {"a": torch.tensor(1.0)}
    got = [scheduler.weights(step=s, losses=losses)["a"] for s in range(10)]
    assert got == [2.0] * 3 + [1.0] * 3 + [0.5] * 3 + [0.4]


def test_hidden_l1_matches_naive_and_is_zero_when_all_masked(example_on_path):
    from kd_plugins import BatchContext, ModelCapture, ModelInfo
    from kd_plugins.plugins import get_component

    s_info = ModelInfo(hidden_size=6, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=3, vocab_size=11)
    t_info = ModelInfo(hidden_size=10, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=5, vocab_size=11)
    term = get_component("alignment", "hidden_l1").builder(student=s_info, teacher=t_info, layers=[[0, 1], [-1, -1]])
    assert term.requirements().student_layers == {0, 1} and term.requirements().teacher_layers == {1, 2}
    torch.manual_seed(0)
    hs = {i: torch.randn(2, 5, 6, requires_grad=True) for i in (0, 1)}
    ht = {i: torch.randn(2, 5, 10) for i in (1, 2)}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    hs[0].data[0, 4] = float("nan")  # garbage on padding must not leak
    batch = BatchContext(labels=torch.zeros(2, 5, dtype=torch.long), token_mask=mask,
                         sequence_ids=torch.zeros(2, 5, dtype=torch.long))
    loss = term(ModelCapture(s_info, hidden_states=hs), ModelCapture(t_info, hidden_states=ht), batch)
    expected = torch.stack([
        (proj(hs[s][mask]) - ht[t][mask]).abs().mean(-1).mean() for (s, t), proj in zip([(0, 1), (1, 2)], term.projectors)
    ]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(hs[0].grad).all()
    empty = BatchContext(labels=batch.labels, token_mask=torch.zeros_like(mask), sequence_ids=batch.sequence_ids)
    zero = term(ModelCapture(s_info, hidden_states=hs), ModelCapture(t_info, hidden_states=ht), empty)
    assert zero.item() == 0.0


# --- training a tiny Llama with both components selected by name ----------------------------------------------


def _tiny_llama(seed: int, **overrides):
    transformers = pytest.importorskip("transformers", reason="training the tiny Llama needs transformers")
    kwargs = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def _word_tokenizer(vocab: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _texts(n: int = 8) -> list[str]:
    return [" ".join(f"w{(start + 3 * k) % 120}" for k in range(8 + start % 5)) for start in range(n)]


def test_trains_a_tiny_llama_through_kdsft_trainer(example_on_path, tmp_path):
    pytest.importorskip("trl", reason="KDSFTTrainer needs trl")
    from kd_plugins.integrations.trl import KDSFTTrainer
    from datasets import Dataset
    from trl import SFTConfig

    config_path = tmp_path / "kd.yaml"
    config_path.write_text(KD_YAML)
    student = _tiny_llama(0)
    teacher = _tiny_llama(1, hidden_size=48, num_hidden_layers=3)
    # transformers 5.23 renamed gradient_checkpointing (SFTConfig turns it on by default)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], bf16=False, fp16=False, use_cpu=True,
        dataloader_num_workers=0, seed=0, max_length=32, lr_scheduler_type="constant", disable_tqdm=True,
        **{checkpointing: False},
    )
    trainer = KDSFTTrainer(
        model=student, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
        processing_class=_word_tokenizer(), teacher=teacher, kd_config=str(config_path),
    )
    before = {n: p.detach().clone() for n, p in trainer.distiller.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kd/loss/hidden_l1" in entry]
    assert logs, f"no kd/loss/hidden_l1 in the logs: {trainer.state.log_history}"
    assert all(torch.isfinite(torch.tensor(e["kd/loss/hidden_l1"])) for e in logs)
    # step_decay with step_size=2, gamma=0.5 on base weight 0.5
    weights = [e["kd/weight/hidden_l1"] for e in logs if "kd/weight/hidden_l1" in e]
    assert weights and set(weights) <= {0.5, 0.25, 0.375}, weights  # per-log averages of 0.5 / 0.25
    assert weights[0] == 0.5 and weights[-1] == 0.25
    changed = any(not torch.equal(p, before[n]) for n, p in trainer.distiller.named_parameters())
    assert changed, "the hidden_l1 projector was never optimised"
    pytest.importorskip("matplotlib", reason="`kd-plugins report` plots need matplotlib (the eval extra)")
    from kd_plugins.report import write_report  # the real log keys feed `kd-plugins report`

    trainer.save_state()
    written = write_report(tmp_path / "run")
    assert {p.name for p in written} == {"kd_losses.png", "kd_weights.png", "kd_weighted.png"}


def test_trains_a_tiny_llama_through_the_core_distiller(example_on_path):
    """The same plugin through the core only: hand-built captures from forward hooks, a plain optimizer."""
    from kd_plugins import BatchContext, Distiller, KDConfig, ModelCapture, ModelInfo

    student, teacher = _tiny_llama(0), _tiny_llama(1, hidden_size=48, num_hidden_layers=3).eval()
    s_info = ModelInfo.from_config(student.config, "student")
    t_info = ModelInfo.from_config(teacher.config, "teacher")
    distiller = Distiller(KDConfig.from_yaml(KD_YAML), student=s_info, teacher=t_info)
    req = distiller.requirements()
    assert req.student_layers == {1} and req.teacher_layers == {2}
    optimizer = torch.optim.AdamW([*student.parameters(), *distiller.parameters()], lr=5e-3)
    input_ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    weights, transfer = [], []
    for step in range(4):
        s_capture = _capture(student, s_info, req.student_layers)
        out = student(input_ids=input_ids, labels=input_ids)
        s_capture.done()
        with torch.no_grad():
            t_capture = _capture(teacher, t_info, req.teacher_layers)
            teacher(input_ids=input_ids)
            t_capture.done()
        batch = BatchContext.from_inputs(labels=input_ids, step=step)
        result = distiller(s_capture.capture, t_capture.capture, batch, task_loss=out.loss)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        weights.append(result.weights["hidden_l1"])
        transfer.append(float(result.losses["hidden_l1"]))
    assert weights == [0.5, 0.5, 0.25, 0.25]
    assert all(torch.isfinite(torch.tensor(transfer)))


class _capture:
    """Forward hooks on the decoder blocks that fill a :class:`ModelCapture` (block outputs only)."""

    def __init__(self, model, info, layers):
        from kd_plugins import ModelCapture

        self.capture = ModelCapture(info)
        blocks = model.get_decoder().layers
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index):
        def hook(module, args, output):
            self.capture.hidden_states[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def done(self):
        for handle in self.handles:
            handle.remove()


# --- declared traits: the host plans the example's components like built-ins ----------------------------------


def _sgd_step(tmp_path, texts, *, terms, batch, ga, ce_weight, scheduler, fuse=True):
    """One SGD step (lr 1, no clipping), samples in order; returns (parameter change, first log, LM-head-sized
    matmuls run by the step)."""
    pytest.importorskip("trl", reason="KDSFTTrainer needs trl")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    from kd_plugins.integrations.trl import KDSFTTrainer
    from tests.integrations._counting import VocabMatmuls
    from tests.integrations.conftest import kd_config, sft_args, tiny_model, tiny_tokenizer

    class InOrder(KDSFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    torch.manual_seed(0)
    student = tiny_model("llama", seed=0, vocab=VOCAB)
    trainer = InOrder(
        model=student,
        args=sft_args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                      optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1),
        train_dataset=Dataset.from_dict({"text": texts}), processing_class=tiny_tokenizer(VOCAB),
        teacher=tiny_model("llama", seed=1, hidden=48, layers=3, vocab=VOCAB),
        kd_config=kd_config(terms, ce_weight=ce_weight, scheduler=scheduler, fuse_task_loss=fuse),
    )
    torch.manual_seed(1)  # identical projectors in every run
    for p in trainer.distiller.parameters():
        torch.nn.init.normal_(p, std=0.2)
    before = {n: p.detach().clone() for n, p in [*trainer.model.named_parameters(),
                                                   *(("kd." + k, v) for k, v in trainer.distiller.named_parameters())]}
    with VocabMatmuls(VOCAB) as matmuls:
        trainer.train()
    after = dict([*trainer.model.named_parameters(), *(("kd." + k, v) for k, v in trainer.distiller.named_parameters())])
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: before[k] - after[k].detach() for k in before}, log, matmuls.total


VOCAB = 131  # no other dimension of the tiny models or batches is 131: every matmul with it is an LM-head one


def _unequal_texts():
    from tests.integrations.conftest import tiny_texts

    texts = tiny_texts(8, seed=3, min_len=3, max_len=14)
    pairs = [len(texts[i].split()) + len(texts[i + 1].split()) for i in range(0, 8, 2)]
    assert len(set(pairs)) > 1, pairs  # the micro-batches hold different numbers of tokens
    return texts


def _close(a, b) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=2e-4, atol=2e-6) for k in b)


def test_hidden_l1_is_exact_under_gradient_accumulation(example_on_path, tmp_path, monkeypatch):
    """hidden_l1 declares normalizer = TOKENS: GA 4 x 2 gives the same step as GA 1 x 8 although the micro-batches
    hold different numbers of tokens. Negative control: declared as a per-micro-batch mean (the default), it
    does not."""
    terms = [{"name": "hidden_l1", "weight": 0.5, "layers": "last"}]
    texts = _unequal_texts()
    common = dict(terms=terms, ce_weight=0.0, scheduler="constant")
    full, full_log, _ = _sgd_step(tmp_path / "full", texts, batch=8, ga=1, **common)
    acc, acc_log, _ = _sgd_step(tmp_path / "acc", texts, batch=2, ga=4, **common)
    assert sum(bool(v.abs().max() > 0) for v in full.values()) > len(full) // 2  # the step moved most parameters
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=2e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    assert acc_log["kd/loss/hidden_l1"] == pytest.approx(full_log["kd/loss/hidden_l1"], rel=1e-4)

    from kd_plugins import Normalizer
    from kd_plugins.plugins import get_component

    term_class = type(get_component("alignment", "hidden_l1").builder(
        student=_info(32, 2), teacher=_info(48, 3), layers="last"))
    monkeypatch.setattr(term_class, "normalizer", Normalizer.BATCH)
    wrong, _, _ = _sgd_step(tmp_path / "wrong", texts, batch=2, ga=4, **common)
    assert not _close(wrong, full)


def test_step_decay_with_ce_weight_zero_runs_the_backbone_only(example_on_path, tmp_path, monkeypatch):
    """step_decay declares reads_task_loss = False: with ce_weight 0 the student's LM head runs no matmul at all (no
    task loss is computed), and the step equals the host path's. Negative control: a scheduler that does not
    declare it keeps the host's loss, whose LM head runs forward and backward on every micro-batch."""
    terms = [{"name": "hidden_l1", "weight": 0.5, "layers": "last"}]
    scheduler = {"name": "step_decay", "step_size": 1, "gamma": 0.5}
    texts = _unequal_texts()
    common = dict(terms=terms, ce_weight=0.0, scheduler=scheduler, batch=4, ga=2)
    fused, fused_log, fused_calls = _sgd_step(tmp_path / "fused", texts, **common)
    host, host_log, host_calls = _sgd_step(tmp_path / "host", texts, fuse=False, **common)
    # the host path (TRL's chunked head) projects and differentiates the full head on every micro-batch
    assert fused_calls == 0 and host_calls >= 2 * 3
    for name in host:
        torch.testing.assert_close(fused[name], host[name], rtol=2e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    assert fused_log["kd/transfer"] == pytest.approx(host_log["kd/transfer"], rel=1e-4)

    from kd_plugins.plugins import get_component

    scheduler_class = get_component("scheduler", "step_decay").builder
    monkeypatch.setattr(scheduler_class, "reads_task_loss", True)
    _, _, undeclared_calls = _sgd_step(tmp_path / "undeclared", texts, **common)
    assert undeclared_calls == host_calls


def _info(hidden, layers):
    from kd_plugins import ModelInfo

    return ModelInfo(hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                     vocab_size=128)
