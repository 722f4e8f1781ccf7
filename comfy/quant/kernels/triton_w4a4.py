"""SVDQuant W4A4 on int8 or FP8 tensor cores: activation quantization and the int4 GEMM with the low-rank branch.

Hopper has no int4 tensor-core instruction, so the nibbles are widened to int8 and multiplied on the
int8 tensor cores; the format's per-64-group scales are applied per group in fp32.

``quantize`` (one pass over x): per row and 64-channel group, the codes kitchen's eager quantizer
emits, computed with the same roundings in the compute dtype (shift, division by the smoothing
factor, absmax/7 or absmax/15, division, round half to even, clamp), so the codes and scales are
bit-identical to ``comfy_kitchen.quantize_svdquant_w4a4``. Codes are stored one per byte, each group
as its 32 even columns then its 32 odd columns (the order of the weight's low and high nibbles);
scales as fp32 ``(K/64, M_pad)``; rows are padded to a multiple of 256 with zero codes and scales,
as kitchen pads them. An input-split layer (``act_unsigned`` one per input part, e.g. Flux's
``linear2``) is quantized one launch per part, each with its own signedness, into the same code and
scale buffers: the codes are int8 either way (signed [-7, 7] or unsigned [0, 15]), so the GEMM below
runs the whole K at once and its bound |D_g| ≤ 64·15·8 covers both kinds of group.

``gemm``: ``y = Σ_g a[m,g]·w[g,n]·D_g[m,n] + lora_act @ proj_upᵀ + bias`` with ``D_g`` the exact int32
dot product of group g. ``D_g`` becomes fp32 without a conversion instruction: the tensor cores
accumulate onto ``0x4B400000`` (1.5·2²³), so the int32 result read as fp32 is ``1.5·2²³ + D_g``
exactly (|D_g| ≤ 64·15·8 < 2²²), and one fused multiply-add with the exact constant ``-1.5·2²³·w``
gives ``D_g·w`` rounded once. The low-rank branch (its appended LoRA ranks included) runs on the
tensor cores in the compute dtype, in the same kernel. No atomics: every output is written once by
one program, so results are bit-identical from call to call.

``gemm_fp8`` (Hopper; ``gemm`` takes it for e4m3 codes): the same function on the FP8 tensor cores.
Every int4 code is exact in e4m3, and a 64-long dot of codes (|D_g| ≤ 7680 < 2¹³) is exact in the FP8
MMA's fp32 accumulator (whose measured precision is ~14 significant bits, so groups are never summed
in it: a fresh accumulator per group), so ``D_g`` is the same exact integer, now already fp32, and
``acc = fma(D_g·w, a, acc)`` is the int8 GEMM's arithmetic: the two are bit-equal. Activation codes
are written as e4m3 by the quantizer; the stored weight nibbles become e4m3 in registers (fp16 bit
trick + ``cvt.e4m3x2``); both tiles arrive by TMA (host-side tensor descriptors).

``activation`` (one pass over x): ``quantize``'s codes and scales and the low-rank input
``x @ proj_down`` together, per-group signedness from a table for input-split layers. For bf16 it
divides with the fast fp32 division: bit-identical codes (see ``_div``).
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from comfy.quant import kernels

logger = logging.getLogger(__name__)

GROUP = 64
ROW_PAD = 256  # kitchen pads activation rows to this
MAGIC_BITS = 0x4B400000  # fp32 12582912.0 = 1.5·2²³
MAGIC = 12582912.0
SHIFT = 0.171875  # main-path shift of unsigned (post-GELU) layers


@triton.jit
def _round(v, BF16: tl.constexpr):
    """fp32 ``v`` rounded to the compute dtype (nearest, ties to even) and back to fp32.

    bf16 rounds by integer arithmetic on the bits, which is exact everywhere (Triton's interpreter
    truncates in its own fp32 -> bf16 conversion); inputs are finite.
    """
    if BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits & -65536).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float16).to(tl.float32)


@triton.jit
def _quantize_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, M, M_pad, K, stride_xm, eps, G0,
                     SHIFTED: tl.constexpr, QMAX: tl.constexpr, QMIN: tl.constexpr, BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, SHUFFLE: tl.constexpr):
    # groups G0 + program_id(1)·GROUPS + i (G0: the first group of this launch's input part)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < M
    c = tl.arange(0, 64)
    for i in tl.static_range(GROUPS):
        g = G0 + tl.program_id(1) * GROUPS + i
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (g * 64 + c)[None, :], mask=real[:, None], other=0.0)
        xf = x.to(tl.float32)
        if SHIFTED:
            xf = _round(xf + 0.171875, BF16)
        sm = tl.load(smooth_ptr + g * 64 + c).to(tl.float32)
        xs = _round(tl.math.div_rn(xf, sm[None, :]), BF16)
        amax = tl.maximum(tl.max(tl.abs(xs), axis=1), eps)
        scale = _round(tl.math.div_rn(amax, QMAX), BF16)
        r = _round(tl.math.div_rn(xs, scale[:, None]), BF16)
        fl = tl.floor(r)
        frac = r - fl  # exact; round half to even:
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
        q = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        # fp16 all-zero group: codes 0; int8 or e4m3 codes (both exact), as the GEMM reads them
        q = tl.where(real[:, None] & (scale[:, None] > 0), q, 0.0).to(q_ptr.dtype.element_ty)
        # each group as its even columns then its odd ones: the weight's low/high nibble order
        if SHUFFLE:
            q = tl.reshape(tl.permute(tl.reshape(q, (BLOCK_M, 32, 2)), (0, 2, 1)), (BLOCK_M, 64))
            tl.store(q_ptr + rows[:, None] * K + (g * 64 + c)[None, :], q)
        else:
            tl.store(q_ptr + rows[:, None] * K + (g * 64 + (c % 2) * 32 + c // 2)[None, :], q)
        tl.store(s_ptr + g * M_pad + rows, tl.where(real, scale, 0.0))


@triton.jit
def _div(a, b, BF16: tl.constexpr):
    """``a / b`` in fp32 as the compute dtype will round it: for bf16 operands the fast division (<= 2 ulp of
    fp32) rounds to the same bf16 value as the exact one, because a quotient of two 8-bit significands
    is never a bf16 rounding tie and lies at least 2⁻¹⁷ (relative) away from one; fp16's 11-bit
    significands leave no such margin, so fp16 divides exactly."""
    if BF16:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _activation_kernel(x_ptr, smooth_ptr, down_ptr, unsigned_ptr, q_ptr, s_ptr, la_ptr, M, M_pad, R, stride_xm,
                       stride_down, eps, K: tl.constexpr, GROUPS: tl.constexpr, SIGN: tl.constexpr,
                       BF16: tl.constexpr, HAS_LA: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """One pass over x: codes and scales (as ``_quantize_kernel``) and this program's share of the low-rank
    input ``x @ proj_down`` (groups program_id(1)·GROUPS + i, fp32 partial sums, one slice per K share).
    SIGN: 0 every group signed, 1 every group unsigned, 2 per group as ``unsigned_ptr`` says."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < M
    c = tl.arange(0, 64)
    rr = tl.arange(0, BLOCK_R)
    la = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(GROUPS):
        g = tl.program_id(1) * GROUPS + i
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (g * 64 + c)[None, :], mask=real[:, None], other=0.0)
        if SIGN == 2:
            unsigned = tl.load(unsigned_ptr + g) != 0
        else:
            unsigned = SIGN == 1
        xf = x.to(tl.float32)
        xf = tl.where(unsigned, _round(xf + 0.171875, BF16), xf)
        qmax = tl.where(unsigned, 15.0, 7.0)
        sm = tl.load(smooth_ptr + g * 64 + c).to(tl.float32)
        xs = _round(_div(xf, sm[None, :], BF16), BF16)
        amax = tl.maximum(tl.max(tl.abs(xs), axis=1), eps)
        scale = _round(_div(amax, qmax, BF16), BF16)
        r = _round(_div(xs, scale[:, None], BF16), BF16)
        fl = tl.floor(r)
        frac = r - fl  # exact; round half to even:
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
        q = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
        q = tl.minimum(tl.maximum(q, tl.where(unsigned, 0.0, -7.0)), qmax)
        q = tl.where(real[:, None] & (scale[:, None] > 0), q, 0.0).to(q_ptr.dtype.element_ty)
        q = tl.reshape(tl.permute(tl.reshape(q, (BLOCK_M, 32, 2)), (0, 2, 1)), (BLOCK_M, 64))
        tl.store(q_ptr + rows[:, None] * K + (g * 64 + c)[None, :], q)
        tl.store(s_ptr + g * M_pad + rows, tl.where(real, scale, 0.0))
        if HAS_LA:  # raw x (not shifted, not smoothed) meets proj_down on the tensor cores
            dn = tl.load(down_ptr + (g * 64 + c)[:, None] * stride_down + rr[None, :], mask=(rr < R)[None, :],
                         other=0.0)
            if DOT_F32:  # Triton's interpreter multiplies bf16 as raw bits; products of halves are exact in fp32
                la = tl.dot(x.to(tl.float32), dn.to(tl.float32), acc=la, input_precision="ieee")
            else:
                la = tl.dot(x, dn, acc=la)
    if HAS_LA:
        out = la_ptr + tl.program_id(1) * M_pad * R + rows[:, None] * R + rr[None, :]
        tl.store(out, la, mask=(rr < R)[None, :])


@triton.jit
def _unpack(wb, ASM: tl.constexpr):
    """Signed low and high nibbles of int8 ``wb`` as int8 (low = even column).

    ``ASM`` works on 4 bytes per 32-bit register: t = w & 0x0F0F0F0F; t + (t & 0x08080808)·30 sets each
    byte's high nibble to its sign (8·30 = 0xF0, no carry between bytes).
    """
    if ASM:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; and.b32 t, $1, 0x0F0F0F0F; and.b32 s, t, 0x08080808; mad.lo.u32 $0, s, 30, t; }",
            "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; and.b32 s, t, 0x08080808; "
            "mad.lo.u32 $0, s, 30, t; }",
            "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = (wb << 4) >> 4
        hi = wb >> 4
    return lo, hi


# e4m3 of a two's-complement nibble, 4 per register: (n & 0xF) ^ 0x6408 is the fp16 1032 + n', n' = n ^ 8
# = code + 8; subtracting 1032 leaves the code, exact in fp16; cvt rounds it to e4m3, exactly (|code| <= 8).
# Bytes 0 and 2 go through one f16x2, bytes 1 and 3 through another; prmt puts them back in order.
_E4M3 = ("{ .reg .b32 t0, t1, k, u; .reg .b16 h0, h1; mov.b32 k, 0x64086408; "
             "shr.u32 t0, $1, SHIFT0; shr.u32 t1, $1, SHIFT1; "
             "lop3.b32 t0, t0, 0x000F000F, 0x64086408, 0x6a; lop3.b32 t1, t1, 0x000F000F, 0x64086408, 0x6a; "
             "sub.rn.f16x2 t0, t0, k; sub.rn.f16x2 t1, t1, k; "
             "cvt.rn.satfinite.e4m3x2.f16x2 h0, t0; cvt.rn.satfinite.e4m3x2.f16x2 h1, t1; "
             "mov.b32 u, {h0, h1}; prmt.b32 $0, u, u, 0x3120; }")
_E4M3_LO = tl.constexpr(_E4M3.replace("SHIFT0", "0").replace("SHIFT1", "8"))
_E4M3_HI = tl.constexpr(_E4M3.replace("SHIFT0", "4").replace("SHIFT1", "12"))


@triton.jit
def _unpack_e4m3(wb, ASM: tl.constexpr):
    """Low and high nibbles of int8 ``wb`` as e4m3 codes (every int4 code is exact in e4m3)."""
    if ASM:
        lo = tl.inline_asm_elementwise(_E4M3_LO, "=r,r", [wb],
                                       dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_E4M3_HI, "=r,r", [wb],
                                       dtype=tl.int8, is_pure=True, pack=4)
        return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)
    else:
        return ((wb << 4) >> 4).to(tl.float32).to(tl.float8e4nv), (wb >> 4).to(tl.float32).to(tl.float8e4nv)


@triton.jit
def _group_dot(a_ptrs, w_ptrs, as_ptr, ws_ptr, rm, rn_in, g, N, M_pad, MAGIC_FMA: tl.constexpr, ASM: tl.constexpr,
               SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group ``g``'s exact int32 dot products (on 1.5·2²³ with MAGIC_FMA) and its two scale vectors,
    shaped to broadcast over the tile (transposed with SWAP: weight rows as the MMA's A operand)."""
    a_even = tl.load(a_ptrs + g * 64)
    a_odd = tl.load(a_ptrs + g * 64 + 32)
    lo, hi = _unpack(tl.load(w_ptrs + g * 32), ASM)
    sa = tl.load(as_ptr + g * M_pad + rm)
    sw = tl.load(ws_ptr + g * N + rn_in).to(tl.float32)
    if SWAP:
        d = tl.full((BLOCK_N, BLOCK_M), 0x4B400000 if MAGIC_FMA else 0, tl.int32)
        d = tl.dot(lo, tl.trans(a_even), acc=d, out_dtype=tl.int32)
        d = tl.dot(hi, tl.trans(a_odd), acc=d, out_dtype=tl.int32)
        return d, sa[None, :], sw[:, None]
    else:
        d = tl.full((BLOCK_M, BLOCK_N), 0x4B400000 if MAGIC_FMA else 0, tl.int32)
        d = tl.dot(a_even, tl.trans(lo), acc=d, out_dtype=tl.int32)
        d = tl.dot(a_odd, tl.trans(hi), acc=d, out_dtype=tl.int32)
        return d, sa[:, None], sw[None, :]


@triton.jit
def _scaled_add(acc, d, sa, sw, MAGIC_FMA: tl.constexpr):
    """``acc + a·w·D`` with ``D·w`` rounded once."""
    if MAGIC_FMA:  # 1.5·2²³ + D read as fp32; one fma with the exact -1.5·2²³·w gives D·w
        t = tl.fma(d.to(tl.float32, bitcast=True), sw, -12582912.0 * sw)
    else:  # plain conversion; exact too (Triton's interpreter does not fuse fma)
        t = d.to(tl.float32) * sw
    return tl.fma(t, sa, acc)


@triton.jit
def _low_rank(acc, la_ptr, up_ptr, rm, rn_in, M, R, R0, C1, stride_la, stride_up, R_BLOCKS: tl.constexpr,
              SEG_ALIGNED: tl.constexpr, DOT_F32: tl.constexpr, SWAP: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + lora_act[:, cols] @ proj_upᵀ`` on the tensor cores in the compute dtype (fp32 accumulation).

    ``proj_up`` is this layer's compact (N, R): its column r meets ``lora_act`` column r when r < R0 (the base
    rank) and r - R0 + C1 otherwise (its own LoRA columns of a low-rank input shared with q/k/v siblings);
    R0 = R, C1 = 0 is the plain branch. SEG_ALIGNED (R0 a multiple of BLOCK_R, or R0 >= R): no block straddles
    R0, so the column offset is one scalar per block and the loads stay contiguous."""
    rr = tl.arange(0, BLOCK_R)
    for rb in range(0, R_BLOCKS):
        r0 = rb * BLOCK_R
        rmask = (r0 + rr) < R
        if SEG_ALIGNED:
            cols = tl.where(r0 < R0, r0, r0 - R0 + C1) + rr
        else:
            cols = tl.where(r0 + rr < R0, r0 + rr, r0 + rr - R0 + C1)
        la = tl.load(la_ptr + rm[:, None] * stride_la + cols[None, :], mask=(rm < M)[:, None] & rmask[None, :],
                     other=0.0)
        up = tl.load(up_ptr + rn_in[:, None] * stride_up + (r0 + rr)[None, :], mask=rmask[None, :], other=0.0)
        if DOT_F32:  # Triton's interpreter multiplies bf16 as raw bits; products of halves are exact in fp32
            la, up = la.to(tl.float32), up.to(tl.float32)
        if SWAP:
            acc = tl.dot(up, tl.trans(la), acc=acc, input_precision="ieee" if DOT_F32 else None)
        else:
            acc = tl.dot(la, tl.trans(up), acc=acc, input_precision="ieee" if DOT_F32 else None)
    return acc


@triton.jit
def _store(acc, bias_ptr, y_ptr, rm, rn, rn_in, M, N, stride_ym, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr):
    bias = tl.load(bias_ptr + rn_in).to(tl.float32) if HAS_BIAS else tl.zeros(rn.shape, tl.float32)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SWAP:
        out = tl.trans(acc + bias[:, None])
    else:
        out = acc + bias[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (pid_m, pid_n): GROUP_M row blocks at a time, so neighbouring programs share weights in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _gemm_kernel(q_ptr, as_ptr, w_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr,
                 M, N, M_pad, R, R0, C1, stride_la, stride_up, stride_ym,
                 K: tl.constexpr, R_BLOCKS: tl.constexpr, SEG_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 MAGIC_FMA: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr,
                 PIPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # < M_pad: BLOCK_M divides ROW_PAD
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_in = rn % N  # in-range row of the weight for loads; stores are masked
    k32 = tl.arange(0, 32)
    a_ptrs = q_ptr + rm[:, None] * K + k32[None, :]
    w_ptrs = w_ptr + rn_in[:, None] * (K // 2) + k32[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    # loop bounds are compile-time: Triton's interpreter needs that
    if PIPE:  # the next group's MMAs are issued before this group's scaling, so the two can overlap
        d, sa, sw = _group_dot(a_ptrs, w_ptrs, as_ptr, ws_ptr, rm, rn_in, 0, N, M_pad, MAGIC_FMA, ASM, SWAP,
                               BLOCK_M, BLOCK_N)
        for g in range(1, K // 64):
            d_next, sa_next, sw_next = _group_dot(a_ptrs, w_ptrs, as_ptr, ws_ptr, rm, rn_in, g, N, M_pad,
                                                  MAGIC_FMA, ASM, SWAP, BLOCK_M, BLOCK_N)
            acc = _scaled_add(acc, d, sa, sw, MAGIC_FMA)
            d, sa, sw = d_next, sa_next, sw_next
        acc = _scaled_add(acc, d, sa, sw, MAGIC_FMA)
    else:
        for g in range(0, K // 64):
            d, sa, sw = _group_dot(a_ptrs, w_ptrs, as_ptr, ws_ptr, rm, rn_in, g, N, M_pad, MAGIC_FMA, ASM, SWAP,
                                   BLOCK_M, BLOCK_N)
            acc = _scaled_add(acc, d, sa, sw, MAGIC_FMA)

    acc = _low_rank(acc, la_ptr, up_ptr, rm, rn_in, M, R, R0, C1, stride_la, stride_up, R_BLOCKS, SEG_ALIGNED,
                    DOT_F32, SWAP, BLOCK_R)
    _store(acc, bias_ptr, y_ptr, rm, rn, rn_in, M, N, stride_ym, HAS_BIAS, SWAP)


@triton.jit
def _fp8_group(a_desc, w_desc, as_ptr, ws_ptr, m0, n0, rm, rn_in, g, N, M_pad, ASM: tl.constexpr,
               SWAP: tl.constexpr, DOT_F32: tl.constexpr):
    """Group ``g``'s dot products (exact: a fresh fp32 accumulator per 64-group) and its two scale vectors,
    shaped to broadcast over the tile (transposed with SWAP: weight rows as the MMA's A operand)."""
    a_even = a_desc.load([m0, g * 64])
    a_odd = a_desc.load([m0, g * 64 + 32])
    lo, hi = _unpack_e4m3(w_desc.load([n0, g * 32]), ASM)
    sa = tl.load(as_ptr + g * M_pad + rm)
    sw = tl.load(ws_ptr + g * N + rn_in).to(tl.float32)
    if DOT_F32:  # Triton's interpreter: the same exact products and sums, in fp32
        lo, hi, a_even, a_odd = lo.to(tl.float32), hi.to(tl.float32), a_even.to(tl.float32), a_odd.to(tl.float32)
    prec: tl.constexpr = "ieee" if DOT_F32 else None
    if SWAP:
        d = tl.dot(lo, tl.trans(a_even), input_precision=prec)
        d = tl.dot(hi, tl.trans(a_odd), acc=d, input_precision=prec)
        return d, sa[None, :], sw[:, None]
    else:
        d = tl.dot(a_even, tl.trans(lo), input_precision=prec)
        d = tl.dot(a_odd, tl.trans(hi), acc=d, input_precision=prec)
        return d, sa[:, None], sw[None, :]


@triton.jit
def _gemm_fp8_kernel(a_desc, w_desc, as_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr,
                     M, N, M_pad, R, R0, C1, stride_la, stride_up, stride_ym,
                     K: tl.constexpr, R_BLOCKS: tl.constexpr, SEG_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_F32: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """The W4A4 GEMM on the FP8 tensor cores: e4m3 activation codes and e4m3 weight codes (converted from the
    stored nibbles in registers), both tiles fetched by TMA; per group ``acc += a·(w·D)`` in fp32."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rn_in = rn % N
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // 64):
        d, sa, sw = _fp8_group(a_desc, w_desc, as_ptr, ws_ptr, m0, n0, rm, rn_in, g, N, M_pad, ASM, SWAP, DOT_F32)
        acc = tl.fma(d * sw, sa, acc)
    acc = _low_rank(acc, la_ptr, up_ptr, rm, rn_in, M, R, R0, C1, stride_la, stride_up, R_BLOCKS, SEG_ALIGNED,
                    DOT_F32, SWAP, BLOCK_R)
    _store(acc, bias_ptr, y_ptr, rm, rn, rn_in, M, N, stride_ym, HAS_BIAS, SWAP)


# Triton runs CPU tensors only in its interpreter, which it enables at import (TRITON_INTERPRET=1)
INTERPRETED = isinstance(_gemm_kernel, InterpretedFunction)


def runs_on(device: torch.device) -> bool:
    """Whether these kernels can run on ``device``: CUDA compiled, the CPU under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def _launcher(kernel, device):
    if not runs_on(device):
        raise RuntimeError(f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before Triton is "
                           f"imported to run on the CPU; got {device}")
    return kernel


def padded_rows(m: int) -> int:
    """``m`` rounded up to kitchen's activation row padding."""
    return -(-m // ROW_PAD) * ROW_PAD


def quantize(x: torch.Tensor, smooth: torch.Tensor, act_unsigned, config: dict | None = None,
             codes: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4 codes (one per byte, nibble order) ``(M_pad, K)`` and scales ``(K/64, M_pad)`` fp32 of ``x`` (M, K).

    ``codes`` is the codes' dtype: int8 for the int8 GEMM, ``torch.float8_e4m3fn`` for the FP8 one.
    ``x`` is the raw input: the 0.171875 shift of an unsigned layer is applied here. ``act_unsigned`` is
    a bool for the whole input, or ``((start, stop, unsigned), ...)`` covering K in 64-aligned parts,
    each quantized with its own signedness (``segments``).
    """
    m, k = x.shape
    m_pad = padded_rows(m)
    q = torch.empty(m_pad, k, dtype=codes, device=x.device)
    s = torch.empty(k // GROUP, m_pad, dtype=torch.float32, device=x.device)
    parts = _checked_parts(act_unsigned, k)
    launch = _launcher(_quantize_kernel, x.device)
    for start, stop, unsigned in parts:
        groups = (stop - start) // GROUP
        cfg = dict(QUANT_CONFIG if config is None else config)
        if groups % cfg["GROUPS"]:
            cfg["GROUPS"] = 1
        grid = (m_pad // cfg["BLOCK_M"], groups // cfg["GROUPS"])
        launch[grid](x, smooth, q, s, m, m_pad, k, x.stride(0), _EPS[x.dtype], start // GROUP,
                     SHIFTED=unsigned, QMAX=15.0 if unsigned else 7.0, QMIN=0.0 if unsigned else -7.0,
                     BF16=x.dtype == torch.bfloat16, **cfg)
    return q, s


ACT_CONFIG = dict(BLOCK_M=32, num_warps=4)


def activation(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, act_unsigned,
               codes: torch.dtype = torch.int8, config: dict | None = None):
    """``quantize(x, smooth, act_unsigned, codes=codes)`` and ``x @ proj_down`` (None for rank 0) in one pass
    over x. The low-rank input is summed in fp32 over K/``K_SPLIT`` shares, the shares added in a fixed
    order, then rounded once to x's dtype."""
    m, k = x.shape
    m_pad = padded_rows(m)
    rank = proj_down.shape[1]
    parts = _checked_parts(act_unsigned, k)
    signs = {u for _, _, u in parts}
    cfg = dict(ACT_CONFIG if config is None else config)
    groups = k // GROUP
    split = next(d for d in (cfg.pop("K_SPLIT", _act_split(m_pad, cfg["BLOCK_M"], x.device)), 2, 1)
                 if groups % d == 0)
    if rank and proj_down.stride(1) != 1:
        proj_down = proj_down.contiguous()
    q = torch.empty(m_pad, k, dtype=codes, device=x.device)
    s = torch.empty(groups, m_pad, dtype=torch.float32, device=x.device)
    la = torch.empty(split, m_pad, rank, dtype=torch.float32, device=x.device) if rank else s
    table = s
    if len(signs) > 1:
        table = torch.tensor([int(u) for a, b, u in parts for _ in range(a // GROUP, b // GROUP)], dtype=torch.int8,
                             device=x.device)
    grid = (m_pad // cfg["BLOCK_M"], split)
    _launcher(_activation_kernel, x.device)[grid](
        x, smooth, proj_down if rank else s, table, q, s, la, m, m_pad, rank, x.stride(0),
        proj_down.stride(0) if rank else 0, _EPS[x.dtype], K=k, GROUPS=groups // split,
        SIGN=2 if len(signs) > 1 else int(signs.pop()), BF16=x.dtype == torch.bfloat16, HAS_LA=rank > 0,
        DOT_F32=INTERPRETED, BLOCK_R=max(16, triton.next_power_of_2(rank)), **cfg)
    if not rank:
        return q, s, None
    return q, s, (la[0] if split == 1 else la.sum(0))[:m].to(x.dtype)  # torch's sum: fixed order


def _act_split(m_pad: int, block_m: int, device) -> int:
    """K shares per row block: enough programs to fill the GPU when there are few row blocks."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    return max(1, min(8, (2 * sms) // max(1, m_pad // block_m)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _checked_parts(act_unsigned, k: int):
    parts = ((0, k, act_unsigned),) if isinstance(act_unsigned, bool) else tuple(act_unsigned)
    starts, stops = [a for a, _, _ in parts], [b for _, b, _ in parts]
    if starts != [0] + stops[:-1] or stops[-1] != k or any(b <= a or a % GROUP or b % GROUP
                                                          for a, b in zip(starts, stops)):
        raise ValueError(f"quantize: parts {parts} do not cover K={k} in consecutive 64-aligned ranges")
    return parts


def segments(weight) -> tuple[tuple[int, int, bool], ...]:
    """``((start, stop, unsigned), ...)``: the input parts of one signedness of an SVDQuant weight (one
    part unless its ``act_unsigned`` is an input split, which lists its own ``runs()``)."""
    au = weight._params.act_unsigned
    runs = getattr(au, "runs", None)
    return tuple(runs()) if runs is not None else ((0, weight._qdata.shape[1] * 2, bool(au)),)


# kitchen clamps absmax at 1e-10 in the compute dtype
_EPS = {dt: float(torch.tensor(1e-10, dtype=dt)) for dt in (torch.bfloat16, torch.float16)}
QUANT_CONFIG = dict(BLOCK_M=16, GROUPS=1, SHUFFLE=True, num_warps=2)


def lora_activation(x: torch.Tensor, proj_down: torch.Tensor) -> torch.Tensor:
    """The low-rank branch's input ``x @ proj_down`` (M, R), on raw x, in the compute dtype."""
    return x @ proj_down


def _config(m: int, n: int, device) -> dict:
    """Tile sizes by problem size (measured on an H200; see docs/benchmarks.md)."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_R=16, GROUP_M=4, num_warps=4)
    tile = dict(BLOCK_M=64, BLOCK_N=128) if 256 < m <= 1024 else dict(BLOCK_M=128, BLOCK_N=64)
    return dict(tile, BLOCK_R=32, GROUP_M=8, num_warps=4, num_stages=3 if m > 1024 else 4, SWAP=True, PIPE=True)


def low_rank_columns(lora_act: torch.Tensor | None, proj_up: torch.Tensor,
                     lora_cols: tuple[int, int] | None) -> tuple[int, int, int]:
    """``(R, R0, C1)`` of a GEMM's low-rank branch: ``proj_up``'s R (compact) columns, of which the first R0
    meet ``lora_act`` columns ``[0, R0)`` (the base rank) and the rest its columns ``[C1, C1 + R - R0)`` (the
    layer's own LoRA columns in a low-rank input shared by q/k/v; ``lora_cols = (R0, C1)``). None: the plain
    branch, every column in order, so ``proj_up`` must be exactly as wide as ``lora_act`` (a column map lost
    on the way would otherwise read a sibling's LoRA columns without a word). (0, 0, 0) without a branch."""
    if lora_act is None or proj_up.shape[1] == 0:
        return 0, 0, 0
    rank, width = proj_up.shape[1], lora_act.shape[1]
    r0, c1 = (rank, 0) if lora_cols is None else (int(lora_cols[0]), int(lora_cols[1]))
    if (lora_cols is None and rank != width) or not (0 <= r0 <= min(rank, width) and 0 <= c1
                                                     and c1 + rank - r0 <= width):
        raise ValueError(f"low-rank branch: proj_up has {rank} columns, lora_act {width}, column map "
                         f"{lora_cols}: the columns do not lie inside lora_act")
    return rank, r0, c1


def gemm(q: torch.Tensor, ascales: torch.Tensor, m: int, weight: torch.Tensor, wscales: torch.Tensor,
         lora_act: torch.Tensor | None, proj_up: torch.Tensor, bias: torch.Tensor | None,
         out_dtype: torch.dtype, config: dict | None = None,
         lora_cols: tuple[int, int] | None = None) -> torch.Tensor:
    """``(M, N)`` output of the int4 GEMM on quantized activations plus the low-rank branch and bias.
    ``lora_cols = (R0, C1)``: ``proj_up`` is compact, see ``low_rank_columns``."""
    if q.dtype == torch.float8_e4m3fn:
        return gemm_fp8(q, ascales, m, weight, wscales, lora_act, proj_up, bias, out_dtype, config,
                        lora_cols=lora_cols)
    n, k = weight.shape[0], weight.shape[1] * 2
    m_pad = q.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    rank, r0, c1 = low_rank_columns(lora_act, proj_up, lora_cols)
    cfg = dict(_config(m, n, q.device) if config is None else config)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    la = lora_act if rank else y
    up = proj_up if rank else y
    _launcher(_gemm_kernel, q.device)[grid](
        q, ascales, weight, wscales, la, up, y if bias is None else bias, y,
        m, n, m_pad, rank, r0, c1, la.stride(0), up.stride(0), y.stride(0),
        K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), SEG_ALIGNED=r0 % cfg["BLOCK_R"] == 0 or r0 >= rank,
        HAS_BIAS=bias is not None,
        MAGIC_FMA=cfg.pop("MAGIC_FMA", not INTERPRETED), ASM=cfg.pop("ASM", not INTERPRETED),
        SWAP=cfg.pop("SWAP", False), PIPE=cfg.pop("PIPE", False), DOT_F32=INTERPRETED, **cfg)
    return y


def _fp8_config(m: int, n: int, device) -> dict:
    """Tile sizes of the FP8 GEMM by problem size (docs/benchmarks.md)."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_R=16, GROUP_M=4, num_warps=4)
    return dict(FP8_CONFIG_LARGE if m > 1024 else FP8_CONFIG_SMALL)


FP8_CONFIG_LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=32, GROUP_M=8, num_warps=8, num_stages=3, SWAP=True)
FP8_CONFIG_SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=32, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True)


def gemm_fp8(q: torch.Tensor, ascales: torch.Tensor, m: int, weight: torch.Tensor, wscales: torch.Tensor,
             lora_act: torch.Tensor | None, proj_up: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype, config: dict | None = None,
             lora_cols: tuple[int, int] | None = None) -> torch.Tensor:
    """``gemm`` on e4m3 activation codes (``quantize(..., codes=torch.float8_e4m3fn)``): the FP8 tensor cores,
    through the warp-specialized Gluon kernel where ``WARP_SPECIALIZED`` is on and it takes the call (no
    ``config``: that is this kernel's), else this module's kernel. Both compute the same function."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4 (gemm_codes checks the version)

    if WARP_SPECIALIZED and config is None:
        from comfy.quant.kernels import gluon_w4a4
        if gluon_w4a4.takes(q, weight, wscales):
            try:
                return gluon_w4a4.gemm(q, ascales, m, weight, wscales, lora_act, proj_up, bias, out_dtype,
                                       lora_cols=lora_cols)
            except gluon_w4a4.COMPILE_ERRORS as e:  # a Triton whose Gluon moved: this kernel from now on
                gluon_w4a4.refuse(e)

    n, k = weight.shape[0], weight.shape[1] * 2
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    rank, r0, c1 = low_rank_columns(lora_act, proj_up, lora_cols)
    cfg = dict(_fp8_config(m, n, q.device) if config is None else config)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    a_desc = TensorDescriptor.from_tensor(q, [bm, 32])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, 32])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    la = lora_act if rank else y
    up = proj_up if rank else y
    _launcher(_gemm_fp8_kernel, q.device)[grid](
        a_desc, w_desc, ascales, wscales, la, up, y if bias is None else bias, y,
        m, n, q.shape[0], rank, r0, c1, la.stride(0), up.stride(0), y.stride(0),
        K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), SEG_ALIGNED=r0 % cfg["BLOCK_R"] == 0 or r0 >= rank,
        HAS_BIAS=bias is not None, DOT_F32=INTERPRETED,
        ASM=cfg.pop("ASM", not INTERPRETED), SWAP=cfg.pop("SWAP", False), **cfg)
    return y


MAX_FUSED_RANK = 256  # the fused activation pass keeps (BLOCK_M, rank) fp32 sums in registers
# The FP8 GEMM and the one-pass activation are chosen by the forward only once measured faster on Hopper
# than the int8 GEMM and quantize + cuBLAS (tests_quant/gpu_hopper_bench.py; docs/benchmarks.md). Until
# then they run where called directly (tests, the bench script).
FP8_GEMM = False
FUSED_ACTIVATION = False
WARP_SPECIALIZED = False  # gemm_fp8 through gluon_w4a4 (Hopper, Triton 3.6's Gluon)


def gemm_codes(device: torch.device) -> torch.dtype:
    """The activation codes' dtype for ``device``'s GEMM: e4m3 (the FP8 GEMM) on Hopper with the Triton it
    was written for, once ``FP8_GEMM`` is on; int8 (the int8 GEMM) elsewhere."""
    if not FP8_GEMM or device.type != "cuda" or not _fp8_ready():
        return torch.int8
    return torch.float8_e4m3fn if kernels._hopper(device) else torch.int8


def triton_version() -> tuple[int, ...]:
    """This Triton's (major, minor)."""
    return tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())


@functools.lru_cache(maxsize=None)
def _fp8_ready() -> bool:
    """Whether this Triton has what the FP8 GEMM uses as written (3.6: host-side TMA descriptors, e4m3 dots)."""
    if triton_version() != FP8_TRITON:
        logger.info("Triton %s: the W4A4 FP8 GEMM is written for Triton %s; using the int8 GEMM",
                    triton.__version__, ".".join(map(str, FP8_TRITON)))
        return False
    return True


FP8_TRITON = (3, 6)


def supports(x: torch.Tensor, weight) -> bool:
    """Whether these kernels take this call: contiguous codes and side tensors, K a multiple of 64, a
    half-precision input in the side tensors' dtype (any M and N)."""
    p = weight._params
    k = weight._qdata.shape[1] * 2
    contiguous = all(t.is_contiguous() for t in (weight._qdata, p.scale, p.proj_up, p.smooth_factor))
    return k % GROUP == 0 and contiguous and x.dtype in (torch.bfloat16, torch.float16) and p.scale.dtype == x.dtype


def _side(weight):
    p = weight._params
    return weight._qdata, p.scale, p.proj_down, p.proj_up, p.smooth_factor, segments(weight)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an SVDQuant W4A4 ``QuantizedTensor`` weight."""
    return grouped_linear(x, [weight], [bias])[0]


def grouped_linear(x: torch.Tensor, weights, biases) -> list[torch.Tensor]:
    """One output per weight; the weights share ``smooth_factor``, ``proj_down`` and ``act_unsigned``
    (the caller checked), so the activation is quantized once and the low-rank input computed once. A
    weight whose LoRA columns sit among its siblings' (its ``lora_cols``) reads only its own: base rank and
    its LoRA's columns of that one low-rank input, against its compact ``proj_up``.
    An input-split weight's parts are quantized each with its own signedness; the GEMM, the low-rank
    branch (on the whole raw input) and the bias run once over the whole K."""
    _, _, proj_down, _, smooth, parts = _side(weights[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    codes = gemm_codes(x.device)
    if any(w._qdata.data_ptr() % 16 for w in weights):  # TMA reads 16-byte aligned tensors only
        codes = torch.int8
    if FUSED_ACTIVATION and proj_down.shape[1] <= MAX_FUSED_RANK:
        q, s, la = activation(x2, smooth, proj_down, parts, codes=codes)
    else:
        q, s = quantize(x2, smooth, parts, codes=codes)
        la = lora_activation(x2, proj_down)
    outs = []
    for w, b in zip(weights, biases):
        qd, wscales, _, proj_up, _, _ = _side(w)
        y = gemm(q, s, x2.shape[0], qd, wscales, la, proj_up, b, x.dtype,
                 lora_cols=getattr(w._params, "lora_cols", None))
        outs.append(y.reshape(*lead, qd.shape[0]))
    return outs
