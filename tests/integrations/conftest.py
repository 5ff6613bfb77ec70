"""Helpers for the integration tests: tiny random models, an offline word-level tokenizer, tiny datasets and a
tiny SFT configuration. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="integration tests need transformers")
pytest.importorskip("trl", reason="integration tests need trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

import kd_plugins  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

VOCAB = 128
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

KD_TERMS = [
    {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0, "temperature": 1.0},
    {"name": "contrastive", "weight": 0.5, "layers": "uniform", "proj_dim": 16, "temperature": 0.1,
     "max_tokens": 4096},
    {"name": "attention_relation", "weight": 0.5, "student_layer": -1, "teacher_layer": -1, "relation_heads": 2},
]


def tiny_config(arch: str = "llama", *, vocab: int = VOCAB, hidden: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, **extra):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    kwargs.update(extra)
    return cls(**kwargs)


def tiny_model(arch: str = "llama", *, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), attn_implementation="sdpa")
    return model.float()


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_texts(n: int = 16, *, seed: int = 0, vocab: int = VOCAB, min_len: int = 6, max_len: int = 14):
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        # a learnable pattern: arithmetic progressions of word ids
        start, step = (int(x) for x in torch.randint(0, vocab - len(SPECIALS), (2,), generator=g))
        ids = [(start + k * (step % 5 + 1)) % (vocab - len(SPECIALS)) for k in range(length)]
        texts.append(" ".join(f"w{i}" for i in ids))
    return texts


def tiny_dataset(n: int = 16, *, seed: int = 0) -> Dataset:
    return Dataset.from_dict({"text": tiny_texts(n, seed=seed)})


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4,
        learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, seed=0, max_length=32,
        lr_scheduler_type="constant", disable_tqdm=True, save_safetensors=True,
    )
    kwargs.update(overrides)
    if "save_safetensors" in kwargs and "save_safetensors" not in SFTConfig.__dataclass_fields__:
        kwargs.pop("save_safetensors")
    return SFTConfig(**kwargs)


def kd_config(terms=None, **overrides):
    data = {"ce_weight": 1.0, "terms": KD_TERMS if terms is None else terms, "scheduler": {"name": "constant"}}
    data.update(overrides)
    return data


class StepRecorder(transformers.TrainerCallback):
    """Records the ``global_step`` of every optimizer step a trainer actually runs (``on_step_end``), and the
    number of loss computations, so a test can tell a resumed run from one that restarted from step 0."""

    def __init__(self):
        self.steps: list[int] = []
        self.loss_calls = 0

    def attach(self, trainer):
        trainer.add_callback(self)
        compute_loss = trainer.compute_loss

        def counting_compute_loss(*args, **kwargs):
            self.loss_calls += 1
            return compute_loss(*args, **kwargs)

        trainer.compute_loss = counting_compute_loss
        return self

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def builtin_plugins(monkeypatch):
    """The real built-in terms only: no entry-point plugins of whatever else is installed."""
    monkeypatch.setenv("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
    kd_plugins.reset_plugin_manager()
    yield
    kd_plugins.reset_plugin_manager()
