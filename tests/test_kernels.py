"""kernels.token_logprobs against float64 ground truth and the naive log_softmax + gather."""

import pytest
import torch

from kernels import naive_token_logprobs, token_logprobs


def test_gradcheck_float64_with_a_partial_last_chunk():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 13, dtype=torch.float64, generator=g, requires_grad=True)  # 10 rows, chunks of 4
    targets = torch.randint(0, 13, (2, 5), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, chunk_rows=4), (logits,))


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: peaked rows, p(target) close to 1 or 0
def test_float32_matches_naive_values_and_gradients(scale):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 1000, generator=g) * scale - 50.0).requires_grad_()  # all-negative logits
    targets = torch.randint(0, 1000, (3, 7), generator=g)
    targets[0, 0] = 999  # a target in the last column
    upstream = torch.randn(3, 7, generator=g)  # sign-changing, non-uniform: what a DPO loss sends back
    ours = token_logprobs(logits, targets, chunk_rows=5)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), logits)
    naive = naive_token_logprobs(logits, targets)
    (grad_naive,) = torch.autograd.grad((naive * upstream).sum(), logits)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, naive, atol=1e-5, rtol=0)
    assert torch.allclose(grad_ours, grad_naive, atol=1e-6, rtol=0)


def test_bf16_logits_accumulate_in_float32():
    g = torch.Generator().manual_seed(2)
    exact = torch.randn(64, 4096, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, 4096, (64,), generator=g)
    bf16 = exact.to(torch.bfloat16)
    truth = bf16.double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # exact math on the bf16 inputs
    ours = token_logprobs(bf16, targets, chunk_rows=16)
    in_bf16 = bf16.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).double()  # bf16 arithmetic throughout
    assert ours.dtype == torch.float32
    assert (ours.double() - truth).abs().max() < 1e-4
    assert (ours.double() - truth).abs().max() < (in_bf16 - truth).abs().max() / 10


def test_backward_keeps_the_logits_dtype():
    logits = torch.randn(4, 50, dtype=torch.bfloat16, requires_grad=True)
    token_logprobs(logits, torch.randint(0, 50, (4,))).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # Each row's gradient of log p(target) is onehot - softmax: it sums to zero.
    assert logits.grad.float().sum(-1).abs().max() < 0.02
