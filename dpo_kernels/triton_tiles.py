"""Triton versions of the two element-wise steps of dpo_kernels.linear_logprobs, on one float32 logits tile.

The matmuls that make a tile (hidden @ weight.T) stay with the BLAS (cuBLAS on CUDA). What PyTorch would do in
half a dozen passes over the tile, each reading and writing it whole, these kernels do in one:

- fold: the tile's rows into the running max, the rescaled sum of exp, the rescaled sum of exp * z (entropy) and
  the target's logit;
- grad: the tile, in place, into g * (onehot(target) - softmax) / temperature.

One program per row, the row read in BLOCK-wide chunks. On CPU they run only under TRITON_INTERPRET=1 (the tests
do so at small shapes); the PyTorch path is what the CPU uses.
"""

import triton
import triton.language as tl


@triton.jit
def _fold_kernel(z_ptr, stride_z, targets_ptr, max_ptr, sum_ptr, zsum_ptr, target_logit_ptr, width, v0, inv_temp,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    run_max = tl.load(max_ptr + row)
    run_sum = tl.load(sum_ptr + row)
    run_zsum = tl.load(zsum_ptr + row)
    picked = tl.load(target_logit_ptr + row)
    target = tl.load(targets_ptr + row) - v0
    for c in range(0, width, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        inside = cols < width
        z = tl.load(z_ptr + row * stride_z + cols, mask=inside, other=0.0) * inv_temp
        new_max = tl.maximum(run_max, tl.max(tl.where(inside, z, float("-inf")), 0))
        scale = tl.exp(run_max - new_max)
        e = tl.where(inside, tl.exp(z - new_max), 0.0)
        run_sum = run_sum * scale + tl.sum(e, 0)
        run_zsum = run_zsum * scale + tl.sum(e * z, 0)
        picked += tl.sum(tl.where((cols == target) & inside, z, 0.0), 0)
        run_max = new_max
    tl.store(max_ptr + row, run_max)
    tl.store(sum_ptr + row, run_sum)
    tl.store(zsum_ptr + row, run_zsum)
    tl.store(target_logit_ptr + row, picked)


@triton.jit
def _grad_kernel(z_ptr, stride_z, targets_ptr, lse_ptr, g_ptr, width, v0, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    target = tl.load(targets_ptr + row) - v0
    for c in range(0, width, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        inside = cols < width
        z = tl.load(z_ptr + row * stride_z + cols, mask=inside, other=0.0) * inv_temp
        onehot = tl.where((cols == target) & inside, 1.0, 0.0)
        tl.store(z_ptr + row * stride_z + cols, g * (onehot - tl.exp(z - lse)) * inv_temp, mask=inside)


def fold(z, targets, v0: int, temperature: float, run_max, run_sum, run_zsum, target_logit, block: int = 1024) -> None:
    """z (rows, width) float32 contiguous rows, pre-temperature; the four (rows,) float32 states are updated in place."""
    _fold_kernel[(z.shape[0],)](z, z.stride(0), targets, run_max, run_sum, run_zsum, target_logit, z.shape[1], v0,
                                1.0 / temperature, BLOCK=block)


def grad(z, targets, v0: int, temperature: float, lse, g, block: int = 1024) -> None:
    """z (rows, width) float32, pre-temperature, becomes g * (onehot - softmax) / temperature in place."""
    _grad_kernel[(z.shape[0],)](z, z.stride(0), targets, lse, g, z.shape[1], v0, 1.0 / temperature, BLOCK=block)
