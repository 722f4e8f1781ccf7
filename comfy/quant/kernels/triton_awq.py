"""AWQ W4A16 for every M: a GEMV kernel at memory bandwidth for few rows, a GEMM kernel for many.

``y[m,n] = Σ_g s[g,n]·Σ_{k∈g} x[m,k]·(q[n,k] − 8) + z[g,n]·Σ_{k∈g} x[m,k]``. ``_awq_kernel`` (few rows):
each program owns a tile of output columns (the weight is the MMA's A operand, ``x``ᵀ its B operand, so
one row of ``x`` wastes no weight bytes) and, with split-K, a fixed share of the groups.
``_awq_gemm_kernel`` (many rows): ``x`` is the A operand, the weight tile dequantized once per row tile.
Which one runs, with which tiles, is ``CONFIGS`` (per bucket of rows).

Why the GEMV's data moves the way it does (Hopper, M = 1: the int4 weight is the whole traffic):

- The weight is read as 32-bit words of 8 nibbles (nibble i = column 8c + i). One ``lop3`` turns nibbles
  j and j + 4 of a word into a bf16x2 (fp16x2) register holding 128 + q (1024 + q), one packed FMA makes
  that q − 8, exactly: 1.4 instructions per weight element, no int-to-float conversion.
- Such a register is a pair of adjacent K entries of the MMA's A fragment, so the kernel gives the MMA the
  K order (word c, nibble j + 4t) instead of the natural one, in four "pair planes" per group (j = 0..3,
  K = 2·G/8 each), and loads ``x`` in the same order: x's 32-bit words hold two columns, and a ``prmt``
  pairs the right halves of two words. The words of a thread's A fragment are adjacent in memory
  (``_word_order``), and nothing of the weight passes through shared memory except Triton's own
  cp.async pipeline (``num_stages``), which keeps the next groups' bytes in flight.
- Σ x over the group (for the zero point) comes from the MMA too: an all-ones A operand against the same
  B, which the compiler computes once per warp, so there is no cross-lane reduction in the loop.

``EXACT`` (default): a fresh fp32 accumulator per group and the group's scale and zero point applied in
fp32 (``tests_quant/reference.awq_kernel_tolerance``): the weight is never rounded. ``EXACT=False`` (for
large M, where the per-group promotion costs CUDA-core time per output element) rounds each dequantized
weight once to the compute dtype, as kitchen and a bf16 model do, and accumulates all of K on the tensor
cores (``reference.kernel_tolerance``). Split-K partial sums are added by a second kernel in a fixed
order, so every result is bit-identical from call to call (no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from comfy.quant.kernels.triton_w4a4 import INTERPRETED, _launcher

# nibbles j, j + 4 of a word (already shifted down by 4j) -> (128 + q) bf16x2 -> q - 8 (exact: every value is an
# integer below 2^8); fp16: 1024 + q -> q - 8
_CODES_BF16 = tl.constexpr("{ .reg .b32 t, k, one; mov.b32 k, 0xC308C308; mov.b32 one, 0x3F803F80; "
                           "lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 t, t, one, k; "
                           "mov.b32 {$0, $1}, t; }")
_CODES_F16 = tl.constexpr("{ .reg .b32 t, k, one; mov.b32 k, 0xE408E408; mov.b32 one, 0x3C003C00; "
                          "lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xea; fma.rn.f16x2 t, t, one, k; "
                          "mov.b32 {$0, $1}, t; }")
# the low (even column) or high (odd column) halves of two x words, as one pair
_X_LOW = tl.constexpr("{ .reg .b32 t; prmt.b32 t, $2, $3, 0x5410; mov.b32 {$0, $1}, t; }")
_X_HIGH = tl.constexpr("{ .reg .b32 t; prmt.b32 t, $2, $3, 0x7632; mov.b32 {$0, $1}, t; }")


@triton.jit
def _word_order(c):
    """Physical word of tensor column ``c`` within a group: the MMA's A fragment gives a lane columns c and
    c + 4 of each 8-word K step, so those two are made neighbours in memory (one 8-byte access)."""
    return 8 * (c // 8) + 2 * (c % 4) + (c % 8) // 4


@triton.jit
def _code_pair(w, J: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr, F32: tl.constexpr):
    """Codes − 8 of nibbles J and J + 4 of each int32 word of ``w``, as two tensors shaped like ``w``.
    ``ASM``: one lop3 and one packed FMA per pair; else the same values through the fp32 significand
    (2²³ + q, minus 2²³ + 8), which Triton's interpreter can run (``F32``: left in fp32)."""
    v = w >> (4 * J)
    if ASM:
        if dtype == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_CODES_BF16, "=h,=h,r", [v], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_CODES_F16, "=h,=h,r", [v], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=1)
    else:
        lo = ((v & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = (((v >> 16) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        if not F32:
            lo, hi = lo.to(dtype), hi.to(dtype)
    return lo, hi


@triton.jit
def _pair_codes(w, J: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr, F32: tl.constexpr):
    """Pair plane J of words ``w`` (R, C) as (R, 2C): column 2c + t holds nibble J + 4t of word c, so each
    packed register is one pair of adjacent K entries of the MMA operand."""
    lo, hi = _code_pair(w, J, dtype, ASM, F32)
    return tl.reshape(tl.join(lo, hi), (w.shape[0], 2 * w.shape[1]))


@triton.jit
def _natural_codes(w, dtype: tl.constexpr, ASM: tl.constexpr, F32: tl.constexpr):
    """Words ``w`` (R, C) as codes − 8 in column order (R, 8C): joined so that index (c, t, u, v) is
    nibble 4t + 2u + v of word c."""
    a0, a4 = _code_pair(w, 0, dtype, ASM, F32)
    a1, a5 = _code_pair(w, 1, dtype, ASM, F32)
    a2, a6 = _code_pair(w, 2, dtype, ASM, F32)
    a3, a7 = _code_pair(w, 3, dtype, ASM, F32)
    even = tl.join(tl.join(a0, a4), tl.join(a2, a6))
    odd = tl.join(tl.join(a1, a5), tl.join(a3, a7))
    return tl.reshape(tl.join(even, odd), (w.shape[0], 8 * w.shape[1]))


@triton.jit
def _pair_x(a, b, ODD: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr, F32: tl.constexpr):
    """x words ``a``, ``b`` (C, BM), each two columns -> (2C, BM): row 2c + t is the low (``ODD`` False) or
    high half of ``a`` (t = 0) or ``b`` (t = 1). ``F32``: as fp32 values (the interpreter's dot)."""
    if ASM:
        if ODD:
            lo, hi = tl.inline_asm_elementwise(_X_HIGH, "=h,=h,r,r", [a, b], dtype=(tl.int16, tl.int16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_X_LOW, "=h,=h,r,r", [a, b], dtype=(tl.int16, tl.int16),
                                               is_pure=True, pack=1)
    else:
        if ODD:
            a, b = a >> 16, b >> 16
        lo, hi = a.to(tl.int16), b.to(tl.int16)
    r = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * a.shape[0], a.shape[1]))
    if not F32:
        out = r.to(dtype, bitcast=True)
    elif dtype == tl.bfloat16:  # a bf16 is the top half of its fp32 value
        out = (r.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        out = r.to(tl.float16, bitcast=True).to(tl.float32)
    return out


@triton.jit
def _rounded(codes, s, z, dtype: tl.constexpr, op_dtype: tl.constexpr):
    """The dequantized weight (codes − 8)·s + z rounded once to the compute dtype (kitchen's operand)."""
    return (codes.to(tl.float32) * s[:, None] + z[:, None]).to(dtype).to(op_dtype)


@triton.jit
def _group_pairs(acc, w_rows, x_cols, s, z, g, row_ok, ones, dtype: tl.constexpr, op_dtype: tl.constexpr,
                 G: tl.constexpr, EXACT: tl.constexpr, XSUM_MMA: tl.constexpr, ASM: tl.constexpr,
                 F32: tl.constexpr):
    """One group in pair-plane K order (four dots of K = G/4): no shared-memory copy of the weight. Returns
    the group's dot d and Σx (as a tile e) for EXACT, else ``acc`` plus the group's rounded-weight dots."""
    words = tl.load(w_rows + g * (G // 8))
    x0 = tl.load(x_cols + g * (G // 2), mask=row_ok, other=0)  # columns 8·pc + {0, 1}
    x1 = tl.load(x_cols + g * (G // 2) + 1, mask=row_ok, other=0)  # 8·pc + {2, 3}
    x2 = tl.load(x_cols + g * (G // 2) + 2, mask=row_ok, other=0)  # 8·pc + {4, 5}
    x3 = tl.load(x_cols + g * (G // 2) + 3, mask=row_ok, other=0)  # 8·pc + {6, 7}
    d = tl.zeros(acc.shape, dtype=tl.float32)
    e = tl.zeros(acc.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        xj = _pair_x(x0 if j < 2 else x1, x2 if j < 2 else x3, j % 2 == 1, dtype, ASM, F32)
        if EXACT:
            d = tl.dot(_pair_codes(words, j, dtype, ASM, F32), xj, d, input_precision="ieee")
            if XSUM_MMA:  # every row of ones @ x is Σx: the compiler keeps one row tile
                e = tl.dot(ones, xj, e, input_precision="ieee")
            else:
                e += tl.sum(xj.to(tl.float32), axis=0)[None, :]
        else:
            acc = tl.dot(_rounded(_pair_codes(words, j, dtype, ASM, F32), s, z, dtype, op_dtype), xj, acc,
                         input_precision="ieee")
    return d, e, acc


@triton.jit
def _awq_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, stride_xm,
                K: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr, EXACT: tl.constexpr,
                XSUM_MMA: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMV (and small-M) kernel: weight as the MMA's A operand in pair-plane K order."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    dtype = x_ptr.dtype.element_ty
    op_dtype = tl.float32 if DOT_F32 else dtype  # Triton's interpreter multiplies bf16 as raw bits
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_in = rn % N  # a tail tile re-reads valid columns; its stores are masked
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rm < M)[None, :]
    pc = _word_order(tl.arange(0, G // 8))
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rn_in[:, None] * (K // 8) + pc[None, :]
    x_cols = x_ptr.to(tl.pointer_type(tl.int32)) + rm[None, :] * (stride_xm // 2) + 4 * pc[:, None]
    ones = tl.full((BLOCK_N, 2 * G // 8), 1.0, op_dtype)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in tl.range(0, K // G // SPLIT_K):  # a compile-time trip count: Triton's interpreter needs one
        g = pid_k * (K // G // SPLIT_K) + i
        s = tl.load(s_ptr + g * N + rn_in).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn_in).to(tl.float32)
        d, e, acc = _group_pairs(acc, w_rows, x_cols, s, z, g, row_ok, ones, dtype, op_dtype, G, EXACT, XSUM_MMA,
                                 ASM, DOT_F32)
        if EXACT:  # the group's scale and zero point in fp32, in this order
            acc = tl.fma(d, s[:, None], acc)
            acc = tl.fma(e, z[:, None], acc)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
        out = y_ptr + rm[None, :] * N + rn[:, None]
    else:
        out = y_ptr + pid_k * M * N + rm[None, :] * N + rn[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok & (rn < N)[:, None])


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: GROUP_M row tiles in turn per column tile, so a weight
    tile and a band of x rows are reused from L2."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_tiles
    first = (pid // width) * GROUP_M
    rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
    return first + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _awq_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, stride_xm,
                     K: tl.constexpr, G: tl.constexpr, EXACT: tl.constexpr, XSUM_MMA: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The GEMM kernel for many rows: x is the MMA's A operand as Triton's cp.async pipeline loads it, the
    dequantized weight tile (column order) its B operand; the dequantization is paid once per BLOCK_M rows."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = x_ptr.dtype.element_ty
    op_dtype = tl.float32 if DOT_F32 else dtype
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_in = rn % N
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rn_in[:, None] * (K // 8) + tl.arange(0, G // 8)[None, :]
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm + tl.arange(0, G)[None, :]  # tail rows re-read, not stored
    ones = tl.full((G, 16), 1.0, op_dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in tl.range(0, K // G):
        s = tl.load(s_ptr + g * N + rn_in).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn_in).to(tl.float32)
        codes = _natural_codes(tl.load(w_rows + g * (G // 8)), dtype, ASM, DOT_F32)
        xg = tl.load(x_rows + g * G).to(op_dtype)
        if EXACT:
            d = tl.dot(xg, tl.trans(codes), input_precision="ieee")
            if XSUM_MMA:  # each column of x @ ones is an fp32 sum of the group: take one (max: no rounding)
                xs = tl.max(tl.dot(xg, ones, input_precision="ieee"), axis=1)
            else:
                xs = tl.sum(xg.to(tl.float32), axis=1)
            acc = tl.fma(d, s[None, :], acc)
            acc = tl.fma(xs[:, None], z[None, :], acc)
        else:
            acc = tl.dot(xg, tl.trans(_rounded(codes, s, z, dtype, op_dtype)), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _sum_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = Σ_s partial[s] (+ bias), added in the order s = 0, 1, ...: deterministic, one rounding to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(p_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# One launch configuration per bucket of rows: the first bucket >= M applies, the last one beyond it.
# ``PER_SM``: split-K until the grid has at least that many programs per SM; ``GEMM``: the many-rows kernel
# (no split-K). Paste from ``tests_quant/gpu_awq_sweep.py``, which prints this dict (docs/benchmarks.md
# records the run). Until an H100 run, from the sm_90 SASS only (tests_quant/sm90_compile.py): 2 warps keep
# the GEMV on mma.sync (4 warps and 64+ columns make Triton pick wgmma, whose B operand must then be copied
# to shared memory every group), 128 columns per program give 16 weight words per thread and group; the
# GEMM tiles are the exact ones ptxas fits in 255 registers without spilling.
CONFIGS = {
    8: dict(BLOCK_M=8, BLOCK_N=128, num_warps=2, num_stages=4, PER_SM=4, EXACT=True, XSUM_MMA=True),
    16: dict(BLOCK_M=16, BLOCK_N=128, num_warps=2, num_stages=4, PER_SM=4, EXACT=True, XSUM_MMA=True),
    64: dict(GEMM=True, BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, EXACT=True, XSUM_MMA=True),
    4096: dict(GEMM=True, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EXACT=True, XSUM_MMA=True),
}
CPU_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, PER_SM=1, EXACT=True, XSUM_MMA=True)
CPU_SMS = 4  # the interpreter has no SMs; split-K still runs where a config asks for it


def _bucket(m: int) -> dict:
    for rows in sorted(CONFIGS):
        if m <= rows:
            return CONFIGS[rows]
    return CONFIGS[max(CONFIGS)]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(cfg: dict, m: int, n: int, groups: int, device) -> int:
    """The split-K: ``SPLIT_K`` if the config names one, else the smallest that gives at least ``PER_SM``
    programs per SM; always a divisor of the group count (every program sums the same number of groups)."""
    if "SPLIT_K" in cfg:
        want = int(cfg["SPLIT_K"])
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else CPU_SMS
        tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
        want = triton.cdiv(int(cfg.get("PER_SM", 1)) * sms, tiles)
    return next(s for s in range(max(1, min(want, groups)), groups + 1) if groups % s == 0)


def _config(m: int, n: int, groups: int, device) -> dict:
    """Launch configuration for ``m`` rows on ``device`` with ``SPLIT_K`` resolved for this shape (what
    ``gemv`` runs when no config is given; 1 for the GEMM kernel)."""
    cfg = dict(CPU_CONFIG if device.type != "cuda" else _bucket(m))
    cfg["SPLIT_K"] = 1 if cfg.get("GEMM") else _split(cfg, m, n, groups, device)
    cfg.pop("PER_SM", None)
    return cfg


def supports(x: torch.Tensor, weight) -> bool:
    """Contiguous, 4-byte aligned codes and contiguous scales, a power-of-two group of at least 64 columns
    (four pair planes of at least 16 MMA columns each), a half-precision input."""
    p = weight._params
    g = int(p.group_size)
    q = weight._qdata
    return (g >= 64 and g & (g - 1) == 0 and q.is_contiguous() and q.data_ptr() % 4 == 0
            and p.scale.is_contiguous() and p.zeros.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16)
            and p.scale.dtype == x.dtype and p.zeros.dtype == x.dtype)


def _word_aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) with unit column stride, an even row stride and a 4-byte aligned start (the kernel reads
    two columns per 32-bit load); a copy only where the view is not."""
    if x.stride(-1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:
        return x.contiguous()
    return x


def gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor, group: int,
         bias: torch.Tensor | None, config: dict | None = None) -> torch.Tensor:
    """``(M, N)`` = ``x (M, K) @ Wᵀ + bias`` for AWQ codes ``qdata (N, K/2)``, ``scale``/``zeros (K/G, N)``."""
    n, k = qdata.shape[0], qdata.shape[1] * 2
    x = _word_aligned(x)
    m = x.shape[0]
    cfg = dict(CPU_CONFIG if x.device.type != "cuda" else _bucket(m)) if config is None else dict(config)
    cfg.setdefault("EXACT", True)
    cfg.setdefault("XSUM_MMA", True)
    asm = cfg.pop("ASM", True) and not INTERPRETED  # inline PTX does not run in the interpreter
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, qdata, scale, zeros, y if bias is None else bias)
    consts = dict(K=k, G=group, HAS_BIAS=bias is not None, ASM=asm, DOT_F32=INTERPRETED)
    if cfg.pop("GEMM", False):
        for key in ("SPLIT_K", "PER_SM"):
            cfg.pop(key, None)
        cfg.setdefault("GROUP_M", 8)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _launcher(_awq_gemm_kernel, x.device)[grid](*args, y, m, n, x.stride(0), **consts, **cfg)
        return y
    split = _split(cfg, m, n, k // group, x.device)
    for key in ("SPLIT_K", "PER_SM"):
        cfg.pop(key, None)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    _launcher(_awq_kernel, x.device)[grid](*args, out, m, n, x.stride(0), SPLIT_K=split, **consts, **cfg)
    if split > 1:
        block = 1024
        _launcher(_sum_kernel, x.device)[(triton.cdiv(m * n, block),)](
            out, y if bias is None else bias, y, m * n, n, SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block)
    return y


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an AWQ W4A16 ``QuantizedTensor`` weight."""
    p = weight._params
    x2 = x.reshape(-1, x.shape[-1])
    y = gemv(x2, weight._qdata, p.scale, p.zeros, int(p.group_size), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
