"""SVDQuant W4A4 GEMM on Hopper's FP8 tensor cores, warp-specialized (Gluon).

The function is ``triton_w4a4.gemm``'s: ``y = Σ_g a[m,g]·w[g,n]·D_g[m,n] + lora_act @ proj_upᵀ + bias``,
with the same arithmetic as ``triton_w4a4.gemm_fp8`` (so the two are bit-equal without a low-rank
branch): per 64-group a fresh fp32 tensor-core accumulator ``D_g`` (exact: |D_g| ≤ 64·15·8 < 2¹⁴),
then ``acc = fma(D_g·w, a, acc)`` in fp32. What changes is who does what, DeepGEMM's way:

* a **producer** warp issues the TMA copies of each group (activation codes, the packed weight tile,
  as stored: 4 bits a weight) into a ring of ``STAGES`` shared-memory slots;
* a **converter** warpgroup turns the packed nibbles into e4m3 codes (the fp16 bit trick of
  ``triton_w4a4._E4M3``) in shared memory, once per tile and group, for both consumers;
* two **math** warpgroups, each its own partition with its own 64 weight rows of the tile (and all
  128 tokens), issue the group's ``warpgroup_mma`` into the registers of their last partial, wait for
  it and promote it. Being separate partitions they drift apart: while one promotes (CUDA cores) the
  other's MMAs run (tensor cores), which is the overlap DeepGEMM gets from its two math warpgroups. An
  MMA is never left in flight across other code: ptxas serializes every MMA of a kernel in which an
  in-flight accumulator is moved (``tests_quant/test_gluon_w4a4.py`` checks ptxas's notes).

Weight rows are the MMA's M dimension (so a thread's weight scales are 2 registers and its activation
scales come as fp32 pairs), tokens its N. The low-rank branch runs after the main loop on the same
accumulator as a bf16/fp16 ``warpgroup_mma`` (``proj_up`` rows × low-rank activation), then bias, one
rounding to the output dtype, and a masked store. No atomics, no split-K: each output element is
written once by one program, so results are bit-identical from call to call.

Gluon's API moves between Triton releases; this file is written against Triton 3.6 and checked at first
use (``ready``). Importing it never fails: without Gluon, ``IMPORT_ERROR`` says why and ``ready`` is False.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.compiler.errors

from comfy.quant import kernels
from comfy.quant.kernels import triton_w4a4 as W

logger = logging.getLogger(__name__)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # another Triton: the Triton kernels stay in use
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

GLUON_TRITON = (3, 6)
BLOCK_W = 128   # weight rows per program: two consumer warpgroups of 64
CONFIG = dict(BLOCK_T=128, STAGES=4, BLOCK_R=32, num_warps=4, maxnreg=128, consumer_regs=224, producer_regs=24,
              converter_regs=40)


if IMPORT_ERROR is None:
    @gluon.jit
    def _producer(a_desc, w_desc, a_even, a_odd, w_packed, w_lo, w_hi, ready, converted, empty, t0, w0,
                  GROUPS: gl.constexpr, STAGES: gl.constexpr):
        """TMA copies of each group's activation codes (even, odd columns) and packed weight tile."""
        nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + w_desc.block_type.nbytes
        for g in range(GROUPS):
            s = g % STAGES
            mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [t0, g * 64], bar, a_even.index(s))
            tma.async_copy_global_to_shared(a_desc, [t0, g * 64 + 32], bar, a_odd.index(s))
            tma.async_copy_global_to_shared(w_desc, [w0, g * 32], bar, w_packed.index(s))

    @gluon.jit
    def _converter(a_desc, w_desc, a_even, a_odd, w_packed, w_lo, w_hi, ready, converted, empty, t0, w0,
                   GROUPS: gl.constexpr, STAGES: gl.constexpr):
        """Packed nibbles → e4m3 codes in shared memory (low nibbles: even columns, high: odd)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [gl.num_warps(), 1], [1, 0])
        for g in range(GROUPS):
            s = g % STAGES
            mbarrier.wait(ready.index(s), (g // STAGES) & 1)
            for h in gl.static_range(2):  # one 64-row half per math warpgroup
                packed = w_packed.index(s).slice(h * 64, 64, dim=0).load(layout)
                lo = gl.inline_asm_elementwise(W._E4M3_LO, "=r,r", [packed], dtype=gl.int8, is_pure=True, pack=4)
                hi = gl.inline_asm_elementwise(W._E4M3_HI, "=r,r", [packed], dtype=gl.int8, is_pure=True, pack=4)
                w_lo.index(2 * s + h).store(lo.to(gl.float8e4nv, bitcast=True))
                w_hi.index(2 * s + h).store(hi.to(gl.float8e4nv, bitcast=True))
            fence_async_shared()  # generic-proxy stores before the consumers' wgmma reads them
            mbarrier.arrive(converted.index(s), count=1)

    @gluon.jit
    def _group_mma(a_even, a_odd, w_lo, w_hi, ready, converted, g, wg, into, STAGES: gl.constexpr):
        """Group ``g``'s dot products for this warpgroup's 64 weight rows, in the registers of ``into``
        (a fresh accumulator: use_acc=False), waited for. No MMA is left in flight across other code:
        ptxas serializes every MMA of a kernel that moves an in-flight accumulator."""
        s = g % STAGES
        phase = (g // STAGES) & 1
        mbarrier.wait(ready.index(s), phase)      # the TMA data (already complete once converted)
        mbarrier.wait(converted.index(s), phase)
        d = warpgroup_mma(w_lo.index(2 * s + wg), a_even.index(s).permute((1, 0)), into, use_acc=False,
                          is_async=True)
        d = warpgroup_mma(w_hi.index(2 * s + wg), a_odd.index(s).permute((1, 0)), d, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=[d])

    @gluon.jit
    def _scales(as_ptr, ws_ptr, rt, rw_in, g, N, M_pad):
        """Group ``g``'s activation scales (this tile's tokens) and weight scales (its rows), fp32."""
        return gl.load(as_ptr + g * M_pad + rt), gl.load(ws_ptr + g * N + rw_in).to(gl.float32)

    @gluon.jit
    def _promote(acc, d, sa, sw):
        """``acc + a·(w·D)``: ``D·w`` rounded once, then one fma (the int8 and FP8 GEMMs' arithmetic)."""
        return gl.fma(d * sw[:, None], sa[None, :], acc)

    @gluon.jit
    def _low_rank(acc, la_ptr, up_ptr, up_smem, la_smem, rt, rw_in, M, R, R0, C1, stride_la, stride_up, R_BLOCKS):
        """``acc + proj_up @ lora_actᵀ`` on the tensor cores (fp32 accumulation). Compact rank r reads the
        low-rank activation's column r below R0 and column r - R0 + C1 above (a share-group member's own
        LoRA columns)."""
        BT: gl.constexpr = la_smem.type.shape[0]
        BLOCK_R: gl.constexpr = la_smem.type.shape[1]
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [gl.num_warps(), 1], [1, 0])
        rr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, ld))
        rw = gl.convert_layout(rw_in, gl.SliceLayout(1, ld))
        rtl = gl.convert_layout(rt, gl.SliceLayout(1, ld))
        # the same registers as the FP8 accumulator's layout; a 16-bit MMA names its own k in the layout
        mma16: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                        instr_shape=[16, BT, 16])
        main_layout: gl.constexpr = acc.type.layout
        acc = gl.convert_layout(acc, mma16)
        for rb in range(R_BLOCKS):
            r = rb * BLOCK_R + rr
            col = gl.where(r < R0, r, r - R0 + C1)
            up = gl.load(up_ptr + rw[:, None] * stride_up + r[None, :], mask=(r < R)[None, :], other=0.0)
            la = gl.load(la_ptr + rtl[:, None] * stride_la + col[None, :],
                         mask=(rtl < M)[:, None] & (r < R)[None, :], other=0.0)
            up_smem.store(up)
            la_smem.store(la)
            fence_async_shared()
            acc = warpgroup_mma(up_smem, la_smem.permute((1, 0)), acc)
        gl.static_assert(BT % 8 == 0)
        return gl.convert_layout(acc, main_layout)

    @gluon.jit
    def _consumer(WG, a_even, a_odd, w_lo, w_hi, ready, converted, empty, up_smem, la_smem,
                  as_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr, t0, w0, M, N, M_pad, R, R0, C1,
                  stride_la, stride_up, stride_ym,
                  GROUPS: gl.constexpr, STAGES: gl.constexpr, R_BLOCKS: gl.constexpr, BLOCK_R: gl.constexpr,
                  HAS_BIAS: gl.constexpr):
        """Math warpgroup ``WG`` (weight rows 64·WG ... 64·WG + 63 of the tile). The two run as separate
        partitions, so while one promotes its partial the other's MMAs keep the tensor cores busy."""
        BT: gl.constexpr = a_even.type.shape[1]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                      instr_shape=[16, BT, 32])
        w0 = w0 + WG * 64
        rt = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, mma))
        rw_in = (w0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))) % N
        acc = gl.zeros([64, BT], gl.float32, mma)
        d = gl.zeros([64, BT], gl.float32, mma)
        for g in range(GROUPS):
            sa, sw = _scales(as_ptr, ws_ptr, rt, rw_in, g, N, M_pad)  # loads in flight during the MMA
            d = _group_mma(a_even, a_odd, w_lo, w_hi, ready, converted, g, WG, d, STAGES)
            mbarrier.arrive(empty.index(g % STAGES), count=1)
            acc = _promote(acc, d, sa, sw)
        if R_BLOCKS > 0:
            acc = _low_rank(acc, la_ptr, up_ptr, up_smem.index(WG), la_smem.index(WG), rt, rw_in, M, R, R0, C1,
                            stride_la, stride_up, R_BLOCKS)
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + rw_in).to(gl.float32)[:, None]
        out: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, gl.num_warps()], [0, 1])
        y = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), out)
        ow = w0 + gl.arange(0, 64, layout=gl.SliceLayout(1, out))
        ot = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, out))
        gl.store(y_ptr + ot[None, :] * stride_ym + ow[:, None], y, mask=(ow < N)[:, None] & (ot < M)[None, :])

    @gluon.jit
    def _gemm_kernel(a_desc, w_desc, as_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr,
                     M, N, M_pad, R, R0, C1, stride_la, stride_up, stride_ym,
                     GROUPS: gl.constexpr, STAGES: gl.constexpr, R_BLOCKS: gl.constexpr, BLOCK_R: gl.constexpr,
                     HAS_BIAS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                     CONVERTER_REGS: gl.constexpr):
        BT: gl.constexpr = a_desc.block_type.shape[0]
        BW: gl.constexpr = w_desc.block_type.shape[0]
        gl.static_assert(BW == 128)  # two math warpgroups of 64 rows
        pid = gl.program_id(0)
        n_w = gl.cdiv(N, BW)
        t0 = (pid // n_w) * BT   # consecutive programs share the activation tile and walk the weights
        w0 = (pid % n_w) * BW
        e4m3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
        a_even = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BT, 32], a_desc.layout)
        a_odd = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BT, 32], a_desc.layout)
        w_packed = gl.allocate_shared_memory(gl.int8, [STAGES, BW, 32], w_desc.layout)
        w_lo = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, 64, 32], e4m3)  # [stage·2 + warpgroup]
        w_hi = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, 64, 32], e4m3)
        half: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BLOCK_R], up_ptr.dtype.element_ty)
        up_smem = gl.allocate_shared_memory(up_ptr.dtype.element_ty, [2, 64, BLOCK_R], half)
        la_smem = gl.allocate_shared_memory(la_ptr.dtype.element_ty, [2, BT, BLOCK_R], half)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        converted = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(converted.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive from each math warpgroup
        workers = (a_desc, w_desc, a_even, a_odd, w_packed, w_lo, w_hi, ready, converted, empty, t0, w0,
                   GROUPS, STAGES)
        math0 = (0, a_even, a_odd, w_lo, w_hi, ready, converted, empty, up_smem, la_smem,
                 as_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr, t0, w0, M, N, M_pad, R, R0, C1,
                 stride_la, stride_up, stride_ym, GROUPS, STAGES, R_BLOCKS, BLOCK_R, HAS_BIAS)
        math1 = (1, a_even, a_odd, w_lo, w_hi, ready, converted, empty, up_smem, la_smem,
                 as_ptr, ws_ptr, la_ptr, up_ptr, bias_ptr, y_ptr, t0, w0, M, N, M_pad, R, R0, C1,
                 stride_la, stride_up, stride_ym, GROUPS, STAGES, R_BLOCKS, BLOCK_R, HAS_BIAS)
        gl.warp_specialize([(_consumer, math0), (_consumer, math1), (_producer, workers), (_converter, workers)],
                           [4, 1, 4], [CONSUMER_REGS, PRODUCER_REGS, CONVERTER_REGS])


@functools.lru_cache(maxsize=None)
def ready() -> bool:
    """Whether this Triton has the Gluon API the kernel is written against (checked once, logged once)."""
    if IMPORT_ERROR is not None:
        logger.info("Gluon unavailable (%s): the W4A4 GEMM uses the Triton kernels", IMPORT_ERROR)
        return False
    if W.triton_version() != GLUON_TRITON:
        logger.info("Triton %s: the warp-specialized W4A4 GEMM is written for Triton %s's Gluon; using the "
                    "Triton kernels", triton.__version__, ".".join(map(str, GLUON_TRITON)))
        return False
    return True


def layouts(block_t: int):
    """Shared-memory layouts of the two TMA tiles: e4m3 activation codes (``block_t`` tokens) and packed
    int8 weights."""
    return (gl.NVMMASharedLayout.get_default_for([block_t, 32], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([BLOCK_W, 32], gl.int8))


def gemm(q: torch.Tensor, ascales: torch.Tensor, m: int, weight: torch.Tensor, wscales: torch.Tensor,
         lora_act: torch.Tensor | None, proj_up: torch.Tensor, bias: torch.Tensor | None,
         out_dtype: torch.dtype, config: dict | None = None,
         lora_cols: tuple[int, int] | None = None) -> torch.Tensor:
    """``triton_w4a4.gemm_fp8`` on the warp-specialized kernel: e4m3 codes ``q`` (M_pad, K) from the
    activation pass, packed weight (N, K/2), scales; ``lora_cols = (R0, C1)`` maps a share-group
    member's compact ``proj_up`` columns onto the shared low-rank activation (``low_rank_columns``).
    The TMA tiles need 16-byte aligned codes and weight (``takes`` says whether a call fits)."""
    cfg = dict(CONFIG, **(config or {}))
    n, k = weight.shape[0], weight.shape[1] * 2
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    rank, r0, c1 = W.low_rank_columns(lora_act, proj_up, lora_cols)
    bt = cfg["BLOCK_T"]
    a_layout, w_layout = layouts(bt)
    a_desc = TensorDescriptor.from_tensor(q, [bt, 32], a_layout)
    w_desc = TensorDescriptor.from_tensor(weight, [BLOCK_W, 32], w_layout)
    la = lora_act if rank else y
    up = proj_up if rank else y
    grid = (triton.cdiv(m, bt) * triton.cdiv(n, BLOCK_W),)
    _gemm_kernel[grid](
        a_desc, w_desc, ascales, wscales, la, up, y if bias is None else bias, y,
        m, n, q.shape[0], rank, r0, c1, la.stride(0), up.stride(0), y.stride(0),
        GROUPS=k // W.GROUP, STAGES=cfg["STAGES"], R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]),
        BLOCK_R=cfg["BLOCK_R"], HAS_BIAS=bias is not None, CONSUMER_REGS=cfg["consumer_regs"],
        PRODUCER_REGS=cfg["producer_regs"],
        CONVERTER_REGS=cfg["converter_regs"], num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return y


_REFUSED: list[str] = []  # why the kernel failed to compile here, once it did


def refuse(error: Exception) -> None:
    """The kernel did not compile with this Triton: say so once; ``takes`` answers False from now on."""
    if not _REFUSED:
        logger.warning("the warp-specialized W4A4 GEMM does not compile with Triton %s (%s); using the Triton "
                       "kernels", triton.__version__, str(error).splitlines()[0][:200])
    _REFUSED.append(type(error).__name__)


COMPILE_ERRORS = (triton.compiler.errors.CompilationError,)


def takes(q: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor) -> bool:
    """Whether ``gemm`` takes this call: e4m3 codes on a Hopper GPU with Triton 3.6's Gluon (that compiled
    the kernel, once tried), and the TMA tiles' 16-byte alignment."""
    return (q.dtype == torch.float8_e4m3fn and q.is_cuda and not _REFUSED and ready() and kernels._hopper(q.device)
            and q.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and weight.stride(0) % 16 == 0
            and wscales.is_contiguous())
