"""Chunked log-probs equal a full-vocabulary ``log_softmax`` + gather, values and gradients."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.utils import logprobs as logprobs_module
from nemo_aligner.utils.distributed import initialize_distributed
from nemo_aligner.utils.logprobs import from_parallel_logits_to_logprobs, shifted_logprobs

VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def _process_group():
    initialize_distributed()  # megatron's cross entropy reads the (size-1) tensor-parallel group


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 positions, so a [3, 17] batch runs in 15 chunks (the last one of each row partial)."""
    monkeypatch.setattr(logprobs_module, "CHUNK_BYTES", 4 * 4 * VOCAB)


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 17, VOCAB, generator=generator)).to(dtype).requires_grad_()
    target = torch.randint(0, VOCAB, (3, 17), generator=generator)
    grad_output = torch.randn(3, 17, generator=generator)
    return logits, target, grad_output


def _reference(logits, target, grad_output):
    """float64 log_softmax + gather and its gradient (the independent expectation)."""
    x = logits.detach().double().requires_grad_()
    values = torch.log_softmax(x, -1).gather(-1, target[..., None])[..., 0]
    (grad,) = torch.autograd.grad(values, x, grad_output.double())
    return values, grad


def test_chunked_equals_full_log_softmax(small_chunks):
    logits, target, grad_output = _inputs()
    values = from_parallel_logits_to_logprobs(logits, target)
    (grad,) = torch.autograd.grad(values, logits, grad_output)
    expected_values, expected_grad = _reference(logits, target, grad_output)
    assert values.dtype == torch.float32
    assert (values.double() - expected_values).abs().max() < 1e-6 * expected_values.abs().max()
    assert (grad.double() - expected_grad).abs().max() < 1e-6


def test_chunked_equals_unchunked_path(small_chunks, monkeypatch):
    logits, target, grad_output = _inputs()
    chunked = shifted_logprobs(logits, target)  # a strided view logits[:, :-1]
    (chunked_grad,) = torch.autograd.grad(chunked, logits, grad_output[:, 1:])
    monkeypatch.setattr(logprobs_module, "CHUNK_BYTES", 2**40)
    whole = shifted_logprobs(logits, target)
    (whole_grad,) = torch.autograd.grad(whole, logits, grad_output[:, 1:])
    assert (chunked - whole).abs().max() < 1e-6
    assert (chunked_grad - whole_grad).abs().max() < 1e-6
    assert torch.all(chunked_grad[:, -1] == 0)  # the last position predicts nothing


def test_bf16_logits_are_scored_in_float32(small_chunks):
    logits, target, grad_output = _inputs(torch.bfloat16)
    values = from_parallel_logits_to_logprobs(logits, target)
    (grad,) = torch.autograd.grad(values, logits, grad_output)
    expected_values, expected_grad = _reference(logits, target, grad_output)
    assert values.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert (values.double() - expected_values).abs().max() < 1e-5
    assert (grad.double() - expected_grad).abs().max() < 1e-2  # the gradient is rounded to bf16
