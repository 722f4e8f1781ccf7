"""AWQ W4A16 for a few rows (the modulation linears): stream the int4 weight once, near memory bandwidth.

``y[m,n] = Σ_g s[g,n]·Σ_{k∈g} x[m,k]·(q[n,k] − 8) + z[g,n]·Σ_{k∈g} x[m,k]``: per group, the codes
minus 8 (exact in the compute dtype) meet the input on the tensor cores with fp32 accumulation, and
the group's scale and zero point are applied in fp32, so the weight is never rounded to the compute
dtype (kitchen dequantizes it to bf16 first). Each program owns a block of output columns and, with
split-K, a fixed share of the groups; partial sums are added in a fixed order (no atomics), so the
result is bit-identical from call to call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from comfy.quant.kernels.triton_w4a4 import INTERPRETED, _launcher


@triton.jit
def _codes(u, dtype: tl.constexpr, BITS: tl.constexpr):
    """Unsigned nibbles ``u`` minus 8 in the compute dtype without an int-to-float conversion: the nibble
    set into the significand of 128 (bf16) or 1024 (fp16), then the exact subtraction of 136 or 1032
    (with BITS; without, two conversions: int -> fp32 -> the dtype, at a quarter of the fp32 rate)."""
    if not BITS:
        return (u.to(tl.float32) - 8.0).to(dtype)
    elif dtype == tl.bfloat16:
        return (u.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    else:
        return (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0


@triton.jit
def _awq_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm,
                GROUPS_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BITS: tl.constexpr,
                G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_in = rn % N
    j = tl.arange(0, G // 2)
    row_ok = (rm < M)[:, None]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + 2 * j[None, :]
    w_ptrs = w_ptr + rn_in[:, None] * (K // 2) + j[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, GROUPS_PER_SPLIT):  # a compile-time bound: Triton's interpreter needs that
        g = pid_k * GROUPS_PER_SPLIT + i
        xe = tl.load(x_ptrs + g * G, mask=row_ok, other=0.0)
        xo = tl.load(x_ptrs + g * G + 1, mask=row_ok, other=0.0)
        wb = tl.load(w_ptrs + g * (G // 2)).to(tl.uint8, bitcast=True)
        lo = _codes(wb & 15, xe.dtype, BITS)
        hi = _codes(wb >> 4, xe.dtype, BITS)
        if DOT_F32:  # Triton's interpreter multiplies bf16 as raw bits; these products are exact in fp32
            d = tl.dot(xe.to(tl.float32), tl.trans(lo.to(tl.float32)), input_precision="ieee")
            d = tl.dot(xo.to(tl.float32), tl.trans(hi.to(tl.float32)), acc=d, input_precision="ieee")
        else:
            d = tl.dot(xe, tl.trans(lo))
            d = tl.dot(xo, tl.trans(hi), acc=d)
        xsum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)
        s = tl.load(s_ptr + g * N + rn_in).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn_in).to(tl.float32)
        acc = tl.fma(d, s[None, :], acc)
        acc = tl.fma(xsum[:, None], z[None, :], acc)
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok & (rn < N)[None, :])


def _config(m: int, n: int, groups: int, device) -> dict:
    """Block sizes (docs/benchmarks.md): up to 16 rows one 16-row MMA tile and split-K for parallelism (measured
    on an H200); more rows, GEMM tiles."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, num_warps=4)
    if m > SMALL_M:  # a GEMM: tensor-core tiles, no split-K
        return dict(LARGE_CONFIG if m > 256 else MEDIUM_CONFIG)
    split = next(s for s in (8, 4, 2, 1) if groups % s == 0)
    return dict(BLOCK_M=16, BLOCK_N=128, SPLIT_K=split, num_warps=4, num_stages=3)


SMALL_M = 16
# codes - 8 by the bit trick in ``_codes`` instead of two conversions: on once measured on Hopper
# (tests_quant/gpu_hopper_bench.py); until then only where a config asks for it (BITS=True)
BIT_CODES = False
MEDIUM_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, SPLIT_K=1, num_warps=4, num_stages=3)
LARGE_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, SPLIT_K=1, num_warps=8, num_stages=3)


def supports(x: torch.Tensor, weight) -> bool:
    """Contiguous codes and scales, a power-of-two group of at least 32 columns, a half-precision input."""
    p = weight._params
    g = int(p.group_size)
    return (g >= 32 and g & (g - 1) == 0 and weight._qdata.is_contiguous() and p.scale.is_contiguous()
            and p.zeros.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16) and p.scale.dtype == x.dtype)


def gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor, group: int,
         bias: torch.Tensor | None, config: dict | None = None) -> torch.Tensor:
    """``(M, N)`` = ``x (M, K) @ Wᵀ + bias`` for AWQ codes ``qdata (N, K/2)``, ``scale``/``zeros (K/G, N)``."""
    n, k = qdata.shape[0], qdata.shape[1] * 2
    m = x.shape[0]
    cfg = dict(_config(m, n, k // group, x.device) if config is None else config)
    split = cfg.pop("SPLIT_K")
    out_dtype = x.dtype if split == 1 else torch.float32
    y = torch.empty(split, m, n, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    bits = cfg.pop("BITS", BIT_CODES) and not INTERPRETED  # the interpreter has no bf16 constants
    _launcher(_awq_kernel, x.device)[grid](
        x, qdata, scale, zeros, y if bias is None else bias, y, m, n, k, x.stride(0),
        GROUPS_PER_SPLIT=k // group // split, HAS_BIAS=bias is not None, DOT_F32=INTERPRETED, BITS=bits, G=group,
        **cfg)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)  # torch's reduction: fixed order, deterministic


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an AWQ W4A16 ``QuantizedTensor`` weight."""
    p = weight._params
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = gemv(x2, weight._qdata, p.scale, p.zeros, int(p.group_size), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
