"""Teacher-cache codecs: bit packing, the compressed top-k (against a loop-style float64 decoder of the documented
layout, its error bounds, the stored tail), the compressed hidden states, and non-finite rows."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.integrations.cache_codec import (
    Fp8Hidden,
    IntHidden,
    PowerLawLogprobs,
    RawLogprobs,
    hidden_codec,
    logprob_codec,
    pack_bits,
    unpack_bits,
)


def _teacher_rows(rows=40, vocab=300, k=16, seed=0, sharp=3.0):
    """Sorted top-k log-probs, ids and the exact log tail of random (peaked) distributions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * sharp
    logprobs = torch.log_softmax(logits, -1)
    top = logprobs.topk(k, -1)
    tail = torch.logsumexp(logprobs.scatter(-1, top.indices, -math.inf), -1)
    return top.values.float(), top.indices, tail.float(), logprobs


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 15, 16, 17])
def test_pack_bits_round_trip_row_by_row(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (7, 13), generator=g)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 13), values)
    assert torch.equal(unpack_bits(packed[2:5], bits, 13), values[2:5])  # any row slice unpacks alone
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(values + (1 << bits), bits)


def _reference_decode(codec: PowerLawLogprobs, stored) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented layout read one token and one entry at a time, in float64."""
    out_values, out_ids = [], []
    e, d = codec.head, codec.degree
    for row in range(stored["topk_side"].shape[0]):
        side = [float(x) for x in stored["topk_side"][row].double()]
        id_bits = [(int(byte) >> bit) & 1 for byte in stored["topk_ids"][row] for bit in range(8)]
        ids = [sum(id_bits[j * codec.id_bits + b] << b for b in range(codec.id_bits)) for j in range(codec.k)]
        code_bits = [(int(byte) >> bit) & 1 for byte in stored["topk_codes"][row] for bit in range(8)]
        values = side[:e]
        low, step = side[e + d], side[e + d + 1]
        for j in range(codec.k - e):
            code = sum(code_bits[j * codec.bits + b] << b for b in range(codec.bits))
            x = math.log(e + j + 1)  # log of the 1-based rank
            values.append(low + code * step + sum(side[e + i] * x ** (i + 1) for i in range(d)))
        log_tail = float(stored["topk_log_tail"][row])
        lse = math.log(sum(math.exp(v) for v in values))
        mass = math.log1p(-math.exp(log_tail))
        out_values.append([v - lse + mass for v in values])
        out_ids.append(ids)
    return torch.tensor(out_values, dtype=torch.float64), torch.tensor(out_ids)


@pytest.mark.parametrize("k", [16, 5, 3, 2, 1])
def test_powerlaw_decode_equals_a_loop_reference_and_keeps_the_stored_tail(k):
    values, ids, log_tail, _ = _teacher_rows(k=k, rows=12)
    codec = logprob_codec(4, k=k, vocab_size=300)
    assert isinstance(codec, PowerLawLogprobs) and codec.id_bits == 9
    stored = codec.encode(values, ids, log_tail)
    decoded, decoded_ids = codec.decode(stored)
    ref_values, ref_ids = _reference_decode(codec, stored)
    assert torch.equal(decoded_ids, ids) and torch.equal(ref_ids, ids)
    torch.testing.assert_close(decoded.double(), ref_values, rtol=0, atol=2e-6)
    # the tail a sparse loss implies from the decoded top-k is the stored (exact) one
    implied = 1.0 - decoded.double().exp().sum(-1)
    torch.testing.assert_close(implied, log_tail.double().exp(), rtol=0, atol=2e-6)
    assert sum(t[0].numel() * t.element_size() for t in stored.values()) == codec.bytes_per_token()


def test_powerlaw_error_is_half_a_step_per_entry_and_shrinks_with_bits():
    values, ids, log_tail, _ = _teacher_rows(k=32, rows=64)
    errors = {}
    for bits in (2, 4, 8):
        codec = logprob_codec(bits, k=32, vocab_size=300)
        stored = codec.encode(values, ids, log_tail)
        decoded, _ = codec.decode(stored)
        diff = decoded.double() - values.double()
        # decoding shifts every entry of a row by the same amount (the renormalisation); beyond it, a quantised
        # entry is within half a residual step (+ fp16 rounding of the stored fit), a head entry within fp16
        shift = diff[:, 0] - (stored["topk_side"][:, 0].double() - values[:, 0].double())
        off = (diff - shift.unsqueeze(-1)).abs()
        step = stored["topk_side"][:, codec.head + codec.degree + 1].double()
        assert (off[:, : codec.head] <= 1e-3 * values[:, : codec.head].abs() + 1e-6).all()
        assert (off[:, codec.head :] <= step.unsqueeze(-1) / 2 + 2e-3).all(), bits
        errors[bits] = (decoded.double().exp() - values.double().exp()).abs().sum(-1).mean()
    assert errors[8] < errors[4] < errors[2] < 0.2
    assert errors[8] < 2e-3


def test_powerlaw_full_vocabulary_sums_to_one_and_nonfinite_rows_stay_nonfinite():
    values, ids, _, _ = _teacher_rows(k=300, rows=6)
    codec = logprob_codec(8, k=300, vocab_size=300)
    decoded, decoded_ids = codec.decode(codec.encode(values, ids, torch.full((6,), -math.inf)))
    torch.testing.assert_close(decoded.double().exp().sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(decoded_ids, ids)
    values, ids, log_tail, _ = _teacher_rows(k=8, rows=4)
    values[1, 3] = math.nan
    values[2, -2:] = -math.inf  # masked vocabulary entries (sorted last): ~zero mass, the row stays usable
    codec = logprob_codec(8, k=8, vocab_size=300)
    decoded, _ = codec.decode(codec.encode(values, ids, log_tail))
    assert torch.isnan(decoded[1]).all()
    assert torch.isfinite(decoded[[0, 2, 3]]).all() and (decoded[2, -2:].exp() < 1e-12).all()
    # equal up to the row's renormalisation shift, within half a step of a grid that now spans ~30 nats more
    diff = decoded[2, :-2] - values[2, :-2]
    assert (diff - diff.mean()).abs().max() < 0.5 * (30 + 5) / 255 * 2


def test_logprob_codec_specs_and_refusals():
    assert isinstance(logprob_codec(None, k=8, vocab_size=300), RawLogprobs)
    codec = logprob_codec(4, k=8, vocab_size=300)
    assert logprob_codec(codec.manifest(), k=8, vocab_size=300).manifest() == codec.manifest()
    with pytest.raises(ValueError, match=r"bits=0 is invalid.*\[1, 16\]"):
        logprob_codec(0, k=8, vocab_size=300)
    with pytest.raises(ValueError, match="is invalid"):
        logprob_codec("8", k=8, vocab_size=300)
    with pytest.raises(ValueError, match="unknown log-prob codec 'zip'"):
        logprob_codec({"name": "zip"}, k=8, vocab_size=300)
    with pytest.raises(ValueError, match="does not match"):
        logprob_codec({**codec.manifest(), "id_bits": 3}, k=8, vocab_size=300)
    with pytest.raises(ValueError, match="pass log_tail"):
        codec.encode(*_teacher_rows(k=8)[:2], None)


def _hidden(rows=32, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, 7] *= 80.0  # a massive-activation channel, as in LLM residual streams
    x[::3, 21] -= 40.0
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_hidden_codec_error_bound_and_outliers(bits):
    x = _hidden()
    codec = hidden_codec(f"int{bits}", hidden_size=64)
    assert isinstance(codec, IntHidden) and codec.outliers == 4
    stored = codec.encode(x)
    assert sum(t[0].numel() * t.element_size() for t in stored.values()) == codec.bytes_per_token()
    y = codec.decode(stored)
    channels = stored[".outlier_channels"].long()
    assert torch.equal(y.gather(-1, channels), x.gather(-1, channels).half().float())  # kept in fp16
    assert (channels == 7).any(-1).all()  # the massive channel is an outlier of every token
    scale = stored[".scale"].unsqueeze(-1)
    rest = torch.ones_like(x, dtype=torch.bool).scatter(-1, channels, False)
    assert ((y - x).abs()[rest] <= (scale / 2 + 1e-6).expand_as(x)[rest]).all()
    rel = ((y - x).norm(dim=-1) / x.norm(dim=-1)).median()
    assert rel < (0.01 if bits == 8 else 0.1)
    zero = codec.decode(codec.encode(torch.zeros(2, 64)))
    assert torch.equal(zero, torch.zeros(2, 64))


def test_fp8_hidden_codec_error_bound():
    x = _hidden()
    codec = hidden_codec("fp8", hidden_size=64)
    assert isinstance(codec, Fp8Hidden)
    y = codec.decode(codec.encode(x))
    scale = x.abs().amax(-1, keepdim=True) / 448
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values, absolute 2^-10 * scale below
    assert ((y - x).abs() <= x.abs() / 16 + scale * 2.0**-9).all()


@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "bfloat16"])
def test_hidden_codecs_keep_nonfinite_rows_nonfinite(name):
    x = _hidden(rows=4)
    x[1, 3] = math.nan
    x[2, 9] = math.inf
    y = hidden_codec(name, hidden_size=64).decode(hidden_codec(name, hidden_size=64).encode(x)).float()
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[[0, 3]]).all()


def test_hidden_codec_refusals():
    with pytest.raises(ValueError, match="hidden_codec='int2' is invalid"):
        hidden_codec("int2", hidden_size=8)
    x = torch.zeros(2, 8)
    x[0, 1] = 1e6
    with pytest.raises(ValueError, match="fp16 range"):
        hidden_codec("int8", hidden_size=8).encode(x)
