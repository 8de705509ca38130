"""Chunked completion log-probs against a plain log_softmax + gather, and their memory."""

import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.data.encode import IGNORE
from lorakit.losses import (
    causal_lm_loss_sum,
    causal_lm_loss_sum_from_hidden,
    sequence_logprobs,
    sequence_logprobs_from_logits,
)

# float64 on both sides; only the order of the sums differs.
F64 = {"rtol": 1e-10, "atol": 1e-12}


def _labels(batch, n, vocab):
    """Row 0: a prompt (IGNORE) then a completion; row 1: a completion then padding; the last
    row scores nothing."""
    labels = torch.randint(0, vocab, (batch, n))
    labels[0, : n // 3] = IGNORE
    labels[1, n - 4 :] = IGNORE
    labels[-1] = IGNORE
    return labels


def _reference(logits, labels):
    """Summed log-probs of each row's labelled tokens: the plain way, all logits at once."""
    logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(dim=1)


def _head(vocab, hidden, with_bias, dtype):
    weight = torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5
    bias = torch.randn(vocab, dtype=dtype) if with_bias else None
    return weight, bias


def _grads(value, tensors):
    return torch.autograd.grad(value, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sequence_logprobs_equals_log_softmax_gather_in_float64(chunk_tokens, with_bias):
    batch, n, hidden_size, vocab = 4, 11, 8, 37
    hidden = torch.randn(batch, n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight, bias = _head(vocab, hidden_size, with_bias, torch.float64)
    weight.requires_grad_()
    if bias is not None:
        bias.requires_grad_()
    labels = _labels(batch, n, vocab)
    leaves = [hidden, weight, bias]

    ours = sequence_logprobs(hidden, weight, labels, bias, chunk_tokens=chunk_tokens)
    expected = _reference(F.linear(hidden, weight, bias), labels)
    torch.testing.assert_close(ours, expected, **F64)
    assert ours[-1] == 0 and (ours[:-1] < 0).all()

    # Weighted, so that a gradient mixed up between rows would show.
    row_weights = torch.randn(batch, dtype=torch.float64)
    for got, want in zip(
        _grads((ours * row_weights).sum(), leaves),
        _grads((expected * row_weights).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_sequence_logprobs_from_logits_equals_log_softmax_gather_in_float64(chunk_tokens):
    batch, n, vocab = 3, 10, 29
    logits = torch.randn(batch, n, vocab, dtype=torch.float64, requires_grad=True)
    labels = _labels(batch, n, vocab)
    ours = sequence_logprobs_from_logits(logits, labels, chunk_tokens=chunk_tokens)
    expected = _reference(logits, labels)
    torch.testing.assert_close(ours, expected, **F64)
    row_weights = torch.randn(batch, dtype=torch.float64)
    (got,) = _grads((ours * row_weights).sum(), [logits])
    (want,) = _grads((expected * row_weights).sum(), [logits])
    torch.testing.assert_close(got, want, **F64)


def test_float32_inputs_give_float32_close_to_float64():
    batch, n, hidden_size, vocab = 3, 12, 16, 50
    hidden = torch.randn(batch, n, hidden_size)
    weight, bias = _head(vocab, hidden_size, True, torch.float32)
    labels = _labels(batch, n, vocab)
    ours = sequence_logprobs(hidden, weight, labels, bias, chunk_tokens=4)
    from_logits = sequence_logprobs_from_logits(F.linear(hidden, weight, bias), labels, 4)
    expected = _reference(F.linear(hidden.double(), weight.double(), bias.double()), labels)
    assert ours.dtype == from_logits.dtype == torch.float32
    # float32 rounding of a 16-term dot product and of sums over ~20 tokens: ~1e-6 relative.
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_sum_from_hidden_equals_causal_lm_loss_sum():
    batch, n, hidden_size, vocab = 3, 9, 8, 31
    hidden = torch.randn(batch, n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight, bias = _head(vocab, hidden_size, True, torch.float64)
    weight.requires_grad_()
    labels = _labels(batch, n, vocab)
    ours, count = causal_lm_loss_sum_from_hidden(hidden, weight, labels, bias, chunk_tokens=3)
    # causal_lm_loss_sum computes in float32: compare it on float64 logits at float32 precision,
    # and the value itself against the float64 reference.
    plain, plain_count = causal_lm_loss_sum(F.linear(hidden, weight, bias), labels)
    expected = -_reference(F.linear(hidden, weight, bias), labels).sum()
    assert count == plain_count == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ours, expected, **F64)
    torch.testing.assert_close(ours.float(), plain, rtol=1e-6, atol=0)
    for got, want in zip(
        _grads(ours, [hidden, weight]), _grads(expected, [hidden, weight]), strict=True
    ):
        torch.testing.assert_close(got, want, **F64)


def test_a_batch_that_scores_nothing_gives_zeros_and_zero_gradients():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(7, 4)
    labels = torch.full((2, 5), IGNORE)
    ours = sequence_logprobs(hidden, weight, labels)
    assert ours.tolist() == [0.0, 0.0]
    ours.sum().backward()
    assert hidden.grad.abs().sum() == 0
    logits = torch.randn(2, 5, 7, requires_grad=True)
    from_logits = sequence_logprobs_from_logits(logits, labels)
    assert from_logits.tolist() == [0.0, 0.0]
    from_logits.sum().backward()
    assert logits.grad.abs().sum() == 0


def test_bad_shapes_and_chunk_sizes_are_refused():
    hidden, weight = torch.zeros(2, 5, 4), torch.zeros(7, 4)
    with pytest.raises(ValueError, match=r"sequence_logprobs: expected \(batch, n, features\)"):
        sequence_logprobs(hidden, weight, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        sequence_logprobs(hidden, weight, torch.zeros(2, 5, dtype=torch.long), chunk_tokens=0)


# glibc's struct mallinfo2 (malloc.h): ten size_t counters, in this order.
_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS.split()]


class _PeakAllocated(TorchDispatchMode):
    """Peak growth of glibc's allocated bytes (heap in use + mmapped blocks), sampled after every
    aten op of the forward and backward passes run inside it. torch's CPU tensors come from
    glibc malloc, and every op's output is counted once it exists."""

    def __init__(self) -> None:
        super().__init__()
        self._mallinfo2 = ctypes.CDLL(None).mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self.base = self._allocated()
        self.peak = 0

    def _allocated(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._allocated() - self.base)
        return out


def _peak_bytes(loss_fn):
    with _PeakAllocated() as meter:
        loss_fn().sum().backward()
    return meter.peak


def test_one_chunk_of_logits_at_a_time_in_forward_and_backward():
    batch, n, hidden_size, vocab, chunk = 4, 129, 16, 32000, 16
    hidden = torch.randn(batch, n, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, n))
    labels[:, : n // 2 + 1] = IGNORE  # 64 scored tokens per row: 16 chunks in all
    scored = int((labels[:, 1:] != IGNORE).sum())
    all_logits = scored * vocab * 4
    one_chunk = chunk * vocab * 4

    plain = _peak_bytes(lambda: _reference((hidden @ weight.T).float(), labels))
    chunked = _peak_bytes(lambda: sequence_logprobs(hidden, weight, labels, chunk_tokens=chunk))
    # The meter sees the plain path's logits (it keeps them and their log-softmax for backward).
    assert plain >= 2 * all_logits
    # A chunk's backward needs its recomputed logits and one float32 buffer for their softmax
    # and gradient, plus the weight's gradient being accumulated (measured: 3.1 chunks with the
    # weight as large as one chunk); all the logits would be 16 chunks.
    weight_grads = 3 * weight.numel() * 4
    assert chunked <= 3 * one_chunk + weight_grads < all_logits
