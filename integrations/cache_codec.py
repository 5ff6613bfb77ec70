"""How the teacher cache stores its rows: codecs for the top-k log-probs and for the hidden states.

A codec turns one sequence's rows into the tensors of a safetensors shard and back; every encoding is
*row-local* (a token's bytes depend on that token's values only), so a cache written by several processes over
a split of the data decodes to exactly the rows a single process writes.

Top-k log-probs (:func:`logprob_codec`):

* ``float32`` (default): fp32 log-probs + int32 ids, ``8k`` bytes per token. The tail mass outside the top-k is
  implied, ``1 - sum(exp(topk))``.
* ``powerlaw`` (``bits=b``): ids bit-packed at ``ceil(log2 V)`` bits; the teacher's *tail mass* stored
  explicitly (``log tau``, fp32: the tail is often a large share of the mass, 9 % at k = 64 for half of
  SmolLM2's tokens); the ``head`` most likely log-probs in fp16; the other ``k - head`` sorted
  log-probs as a polynomial of ``log(rank)`` (a power law ``q_j ~ j^c`` and its corrections: the sorted top-k
  of an LM is close to one) whose ``degree`` coefficients are fp16, plus ``b``-bit residuals on a per-token
  uniform grid (fp16 offset and step). Decoding rebuilds the log-probs and shifts them so that
  ``sum(exp(topk)) = 1 - tau`` exactly: the tail mass the sparse losses imply from the decoded top-k
  (:func:`kd_plugins.functional.sparse_linear_kd`) is the stored one, not a by-product of rounding.
  Bytes per token: ``ceil(k * ceil(log2 V) / 8) + ceil((k - head) * b / 8) + 2 * (head + degree + 2) + 4``.

Hidden states (:func:`hidden_codec`):

* ``bfloat16`` / ``float16`` / ``float32``: stored as they are (``H * 2`` or ``H * 4`` bytes per layer and token).
* ``int8`` / ``int4``: the ``outliers`` largest-magnitude channels of each token kept in fp16 with their
  channel ids (the residual streams of LLMs carry a few huge channels; a per-token scale set by them would
  leave the others a handful of levels), the rest symmetric integers with one fp32 scale per token.
  ``H + 4 + 4 * outliers`` (int8) or ``H / 2 + 4 + 4 * outliers`` (int4) bytes.
* ``fp8``: ``float8_e4m3fn`` with one fp32 scale per token (absmax mapped to 448): ``H + 4`` bytes.

Non-finite teacher values stay non-finite after decoding (the trainer's non-finite-teacher check sees them).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = [
    "HIDDEN_CODECS",
    "LOGPROB_CODECS",
    "HiddenCodec",
    "LogprobCodec",
    "hidden_codec",
    "logprob_codec",
    "pack_bits",
    "unpack_bits",
]

LOGPROB_CODECS = ("float32", "powerlaw")
HIDDEN_CODECS = ("bfloat16", "float16", "float32", "int8", "int4", "fp8")
_RAW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP16_MAX = float(torch.finfo(torch.float16).max)


# --- top-k log-probs ----------------------------------------------------------------------------------------------


class LogprobCodec:
    """How one sequence's top-k log-probs and ids are stored: ``encode`` gives the shard tensors of its rows,
    ``decode`` reads them back (any row slice of them). Build one with :func:`logprob_codec`."""

    name: str = ""
    k: int
    vocab_size: int

    def encode(self, logprobs: Tensor, indices: Tensor, log_tail: Tensor | None) -> dict[str, Tensor]:
        """``logprobs (L, k)`` sorted in descending order, ``indices (L, k)``, ``log_tail (L,)`` (the log of the
        probability outside the top-k, ``-inf`` when ``k == V``; only codecs with :attr:`needs_tail` read it)."""
        raise NotImplementedError

    def decode(self, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logprobs float32 (L, k), indices int64 (L, k))`` from the tensors :meth:`encode` wrote."""
        raise NotImplementedError

    @property
    def names(self) -> tuple[str, ...]:
        """The shard tensors this codec writes."""
        raise NotImplementedError

    needs_tail: bool = False

    def bytes_per_token(self) -> float:
        """Stored bytes per token of the log-prob part (the token's own id not included)."""
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        """The manifest record from which :func:`logprob_codec` rebuilds this codec."""
        raise NotImplementedError


class RawLogprobs(LogprobCodec):
    """fp32 log-probs and int32 ids, the tail implied as ``1 - sum(exp(topk))``."""

    name = "float32"

    def __init__(self, k: int, vocab_size: int):
        self.k, self.vocab_size = k, vocab_size

    @property
    def names(self) -> tuple[str, ...]:
        return ("topk_logprobs", "topk_indices")

    def encode(self, logprobs, indices, log_tail=None):
        return {"topk_logprobs": logprobs.to(torch.float32).contiguous(),
                "topk_indices": indices.to(torch.int32).contiguous()}

    def decode(self, tensors):
        return tensors["topk_logprobs"].to(torch.float32), tensors["topk_indices"].long()

    def bytes_per_token(self) -> float:
        return 8.0 * self.k

    def manifest(self):
        return {"name": self.name}


class PowerLawLogprobs(LogprobCodec):
    """Bit-packed ids, fp16 head, a polynomial in ``log(rank)`` plus ``bits``-bit residuals, explicit tail."""

    name = "powerlaw"
    needs_tail = True

    def __init__(self, k: int, vocab_size: int, *, bits: int, head: int = 2, degree: int = 3):
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"logprob bits={bits!r} is invalid; expected an int in [1, 16] (8: ~1e-3 total "
                             "variation on real rows, 4: ~5e-3, 2: ~2e-2)")
        self.k, self.vocab_size, self.bits = k, vocab_size, bits
        self.head = min(head, k)
        rest = k - self.head
        self.degree = max(0, min(degree, rest - 1))
        self.id_bits = max(1, math.ceil(math.log2(vocab_size)))
        ranks = torch.arange(self.head + 1, k + 1, dtype=torch.float64).log()
        basis = torch.stack([ranks**p for p in range(self.degree + 1)], -1)  # (rest, degree + 1)
        # least squares with one design matrix for every token: coefficients = values @ pinv(basis)^T
        self._pinv = torch.linalg.pinv(basis) if rest else basis.new_zeros(self.degree + 1, 0)
        self._basis = basis[:, 1:]  # the constant is not stored: the residual offset and the shift absorb it

    @property
    def names(self) -> tuple[str, ...]:
        return ("topk_ids", "topk_codes", "topk_side", "topk_log_tail")

    @property
    def _side_width(self) -> int:  # fp16: head log-probs, coefficients, residual offset, residual step
        return self.head + self.degree + 2

    def bytes_per_token(self) -> float:
        return (math.ceil(self.k * self.id_bits / 8) + math.ceil((self.k - self.head) * self.bits / 8)
                + 2 * self._side_width + 4)

    def manifest(self):
        return {"name": self.name, "bits": self.bits, "head": self.head, "degree": self.degree,
                "id_bits": self.id_bits}

    def encode(self, logprobs, indices, log_tail=None):
        if log_tail is None:
            raise ValueError("the powerlaw log-prob codec stores the tail mass explicitly: pass log_tail")
        v = logprobs.double()
        rows = v.shape[0]
        head = v[:, : self.head]
        rest = v[:, self.head :]
        if rest.shape[1]:  # a -inf log-prob (masked vocabulary entry) is stored as ~zero mass, 30 nats below the rest
            finite = torch.where(torch.isfinite(rest), rest, torch.full_like(rest, math.inf)).amin(-1, keepdim=True)
            floor = torch.where(torch.isfinite(finite), finite, torch.zeros_like(finite)) - 30.0
            rest = torch.maximum(rest, floor)
        coef = _fp16_round(rest @ self._pinv.T.to(rest)[:, 1:] if rest.shape[1] else rest.new_zeros(rows, 0))
        residual = rest - coef @ self._basis.T.to(rest) if self.degree else rest
        if residual.shape[1]:
            low = _fp16_round(residual.amin(-1))
            levels = (1 << self.bits) - 1
            step = _fp16_round((residual.amax(-1) - low) / levels)
            tiny = float(torch.finfo(torch.float16).tiny)
            step = torch.where(step > 0, step, torch.full_like(step, tiny))
            codes = ((residual - low.unsqueeze(-1)) / step.unsqueeze(-1)).round().clamp(0, levels)
            codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes)).long()
        else:
            low = step = v.new_zeros(rows)
            codes = torch.zeros(rows, 0, dtype=torch.long)
        # a non-finite teacher row stays non-finite once decoded (the offset carries it)
        bad = torch.isnan(v).any(-1) | (v == float("inf")).any(-1)
        low = torch.where(bad, torch.nan, low)
        side = torch.cat([head, coef, low.unsqueeze(-1), step.unsqueeze(-1)], -1)
        return {"topk_ids": pack_bits(indices.long(), self.id_bits), "topk_codes": pack_bits(codes, self.bits),
                "topk_side": side.to(torch.float16).contiguous(),
                "topk_log_tail": log_tail.to(torch.float32).contiguous()}

    def decode(self, tensors):
        side = tensors["topk_side"].double()
        rows = side.shape[0]
        e, d = self.head, self.degree
        head, coef = side[:, :e], side[:, e : e + d]
        low, step = side[:, e + d], side[:, e + d + 1]
        log_tail = tensors["topk_log_tail"].double()
        rest_width = self.k - e
        codes = unpack_bits(tensors["topk_codes"], self.bits, rest_width).double()
        rest = low.unsqueeze(-1) + codes * step.unsqueeze(-1)
        if d:
            rest = rest + coef @ self._basis.T.to(rest)
        values = torch.cat([head, rest], -1)
        # shift so that the top-k mass is exactly 1 - tau (log1p(-tau) = log(-expm1(log tau)); log(1) if tau = 0)
        mass = torch.log(-torch.expm1(log_tail.clamp(max=-1e-7)))
        values = values - torch.logsumexp(values, -1, keepdim=True) + mass.unsqueeze(-1)
        ids = unpack_bits(tensors["topk_ids"], self.id_bits, self.k)
        return values.to(torch.float32).reshape(rows, self.k), ids


def logprob_codec(spec: Mapping[str, Any] | int | None, *, k: int, vocab_size: int) -> LogprobCodec:
    """The log-prob codec of a cache: ``None`` (fp32), a residual bit width (``powerlaw``), or a manifest record."""
    if spec is None:
        return RawLogprobs(k, vocab_size)
    if isinstance(spec, bool) or not isinstance(spec, (int, Mapping)):
        raise ValueError(f"logprob_bits={spec!r} is invalid; expected None (fp32) or an int in [1, 16]")
    if isinstance(spec, int):
        return PowerLawLogprobs(k, vocab_size, bits=spec)
    name = spec.get("name")
    if name == "float32":
        return RawLogprobs(k, vocab_size)
    if name == "powerlaw":
        codec = PowerLawLogprobs(k, vocab_size, bits=int(spec["bits"]), head=int(spec["head"]),
                                 degree=int(spec["degree"]))
        if codec.manifest() != dict(spec):
            raise ValueError(f"log-prob codec record {dict(spec)} does not match k={k}, V={vocab_size}")
        return codec
    raise ValueError(f"unknown log-prob codec {name!r}; this kd_plugins version reads {LOGPROB_CODECS}")


# --- hidden states ------------------------------------------------------------------------------------------------


class HiddenCodec:
    """How one layer's hidden states ``(L, H)`` are stored under ``hidden.<layer>`` (and suffixed side tensors).
    Build one with :func:`hidden_codec`."""

    name: str = ""
    hidden_size: int

    def suffixes(self) -> tuple[str, ...]:
        """Suffixes of the shard tensors of one layer (``""`` is ``hidden.<layer>`` itself)."""
        raise NotImplementedError

    def encode(self, hidden: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``(L, H)`` float32 (raw codecs: the stored dtype) from the tensors :meth:`encode` wrote."""
        raise NotImplementedError

    def bytes_per_token(self) -> float:
        """Stored bytes per token of one layer."""
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError


class RawHidden(HiddenCodec):
    def __init__(self, name: str, hidden_size: int):
        self.name, self.hidden_size, self.dtype = name, hidden_size, _RAW_DTYPES[name]

    def suffixes(self):
        return ("",)

    def encode(self, hidden):
        return {"": hidden.to(self.dtype).contiguous()}

    def decode(self, tensors):
        return tensors[""]

    def bytes_per_token(self):
        return self.hidden_size * self.dtype.itemsize

    def manifest(self):
        return {"name": self.name}


class IntHidden(HiddenCodec):
    """Symmetric ``bits``-bit integers with one fp32 scale per token, the ``outliers`` largest channels in fp16."""

    def __init__(self, bits: int, hidden_size: int, *, outliers: int = 4):
        if bits not in (4, 8):
            raise ValueError(f"integer hidden-state codec bits={bits} is invalid; expected 4 or 8")
        if hidden_size > 32767:
            raise ValueError(f"hidden size {hidden_size} is too large for int16 outlier channel ids")
        self.bits, self.hidden_size = bits, hidden_size
        self.name = f"int{bits}"
        self.outliers = max(0, min(outliers, hidden_size))
        self.qmax = (1 << (bits - 1)) - 1

    def suffixes(self):
        return ("", ".scale", ".outlier_channels", ".outlier_values")

    def bytes_per_token(self):
        return math.ceil(self.hidden_size * self.bits / 8) + 4 + 4 * self.outliers

    def manifest(self):
        return {"name": self.name, "outliers": self.outliers}

    def encode(self, hidden):
        x = hidden.float()
        channels = x.abs().nan_to_num(nan=float("inf")).topk(self.outliers, -1).indices
        values = x.gather(-1, channels)
        if (values.isfinite() & (values.abs() > _FP16_MAX)).any():
            raise ValueError(f"a teacher hidden state exceeds the fp16 range ({float(values.abs().max()):.3g}) that "
                             f"the {self.name} codec keeps its outlier channels in; use hidden_codec='fp8' or none")
        rest = x.scatter(-1, channels, 0.0)
        scale = rest.abs().amax(-1) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = torch.where(x.isfinite().all(-1), scale, torch.nan)  # non-finite rows decode to NaN
        codes = (rest / scale.unsqueeze(-1)).nan_to_num(0.0).round().clamp(-self.qmax, self.qmax).long()
        stored = codes.to(torch.int8) if self.bits == 8 else pack_bits(codes + self.qmax + 1, self.bits)
        return {"": stored.contiguous(), ".scale": scale.contiguous(),
                ".outlier_channels": channels.to(torch.int16).contiguous(),
                ".outlier_values": values.to(torch.float16).contiguous()}

    def decode(self, tensors):
        stored = tensors[""]
        codes = stored.float() if self.bits == 8 else (unpack_bits(stored, self.bits, self.hidden_size)
                                                        - (self.qmax + 1)).float()
        x = codes * tensors[".scale"].float().unsqueeze(-1)
        return x.scatter(-1, tensors[".outlier_channels"].long(), tensors[".outlier_values"].float())


class Fp8Hidden(HiddenCodec):
    """``float8_e4m3fn`` with one fp32 scale per token (the token's absmax maps to 448, the format's maximum)."""

    name = "fp8"
    _MAX = 448.0

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size

    def suffixes(self):
        return ("", ".scale")

    def bytes_per_token(self):
        return self.hidden_size + 4

    def manifest(self):
        return {"name": self.name}

    def encode(self, hidden):
        x = hidden.float()
        scale = x.abs().amax(-1) / self._MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = torch.where(x.isfinite().all(-1), scale, torch.nan)
        codes = (x / scale.unsqueeze(-1)).nan_to_num(0.0).clamp(-self._MAX, self._MAX).to(torch.float8_e4m3fn)
        return {"": codes.contiguous(), ".scale": scale.contiguous()}

    def decode(self, tensors):
        return tensors[""].float() * tensors[".scale"].float().unsqueeze(-1)


def hidden_codec(spec: Mapping[str, Any] | str, *, hidden_size: int) -> HiddenCodec:
    """The hidden-state codec of a cache, from its name (see the module docstring) or its manifest record."""
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    if name in _RAW_DTYPES:
        return RawHidden(name, hidden_size)
    if name in ("int8", "int4"):
        outliers = int(spec.get("outliers", 4)) if isinstance(spec, Mapping) else 4
        return IntHidden(int(name[3:]), hidden_size, outliers=outliers)
    if name == "fp8":
        return Fp8Hidden(hidden_size)
    raise ValueError(f"hidden_codec={name!r} is invalid; expected one of {HIDDEN_CODECS}")


# --- bit packing --------------------------------------------------------------------------------------------------


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ints ``(..., m)`` (each ``< 2**bits``) into ``(..., ceil(m * bits / 8))`` uint8, row by row
    (little-endian bit order; every row starts on a byte, so any row slice of the result unpacks on its own)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(values.min())}, {int(values.max())}]")
    lead, m = values.shape[:-1], values.shape[-1]
    shifts = torch.arange(bits, dtype=torch.int64)
    flat = ((values.long().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(*lead, m * bits)
    width = math.ceil(m * bits / 8)
    flat = torch.nn.functional.pad(flat, (0, width * 8 - m * bits)).reshape(*lead, width, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, m: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``(..., ceil(m * bits / 8))`` uint8 -> ``(..., m)`` int64."""
    lead = packed.shape[:-1]
    flat = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(*lead, -1)[..., : m * bits]
    return (flat.reshape(*lead, m, bits).long() << torch.arange(bits, dtype=torch.int64)).sum(-1)


def _fp16_round(x: Tensor) -> Tensor:
    """``x`` rounded to the nearest fp16 and back (what the shard will hold), so residuals absorb the rounding."""
    return x.to(torch.float16).to(x.dtype)
