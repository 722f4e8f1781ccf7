"""The warp-specialized W4A4 GEMM (``kernels/gluon_w4a4.py``): what CI can check without a GPU, and the
kernel itself on a Hopper GPU.

Without a GPU: the e4m3 bit trick its converter warpgroup runs (emulated in torch for every byte), and
the kernel compiled for sm_90 (ptxas: no local memory, FP8 and 16-bit warpgroup MMAs, none of them
serialized, one register budget per partition). On a Hopper GPU: bit-equal to ``fp8_emulation.emulate`` (the tile arithmetic:
fresh fp32 accumulator per 64-group, ``acc = fma(fl(D·w), a, acc)``) and to the Triton FP8 GEMM
without a low-rank branch; within the derived bound of the float64 reference with it
(``reference.w4a4_kernel_tolerance``); share-group column maps; negative controls; determinism.
"""
import re

import pytest
import torch
import triton

from comfy.quant.kernels import gluon_w4a4 as G
from fp8_emulation import E4M3, K, check_against_float64, emulate, fp8_case, natural
from kernel_env import W4A4, requires_kernels
from reference import unpack_nibbles, w4a4_gemm_reference, w4a4_kernel_tolerance

pytestmark = requires_kernels
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
requires_hopper = pytest.mark.skipif(not (HOPPER and G.ready()), reason="needs a Hopper GPU and Triton 3.6's Gluon")
requires_gluon = pytest.mark.skipif(G.IMPORT_ERROR is not None, reason=f"no Gluon: {G.IMPORT_ERROR}")


def _e4m3_bit_trick(byte: torch.Tensor, shift: int) -> torch.Tensor:
    """What one lane of ``triton_w4a4._E4M3`` computes for the nibble n at ``shift``: (n & 0xF) ^ 0x6408 read
    as fp16 is 1024 + (n ^ 8); minus 1032 (exact in fp16) it is the signed nibble, which e4m3 holds exactly."""
    bits = ((byte.to(torch.int32) >> shift) & 0xF) ^ 0x6408
    f16 = bits.to(torch.int16).view(torch.float16)
    return (f16 - torch.tensor(1032.0, dtype=torch.float16)).to(E4M3)


def test_converter_bit_trick_gives_every_signed_nibble_exactly():
    byte = torch.arange(256, dtype=torch.int32)
    for shift in (0, 4):
        nibble = (byte >> shift) & 0xF
        signed = torch.where(nibble >= 8, nibble - 16, nibble)
        assert torch.equal(_e4m3_bit_trick(byte, shift).float(), signed.float())
    # negative control: without the ^8 bias the high codes come out unsigned
    wrong = (((byte & 0xF) | 0x6400).to(torch.int16).view(torch.float16) - 1024).to(E4M3).float()
    assert not torch.equal(wrong, torch.where(byte & 0xF >= 8, (byte & 0xF) - 16, byte & 0xF).float())


@requires_gluon
@pytest.mark.parametrize("rank", [0, 32])
def test_compiles_for_sm90_without_local_memory(rank):
    import sm90_compile

    report, ptx = sm90_compile.gluon_gemm(rank=rank)
    assert report["stack"] == 0 and "LDL" not in report and "STL" not in report, report
    assert report.get("QGMMA", 0) >= 2 and (report.get("HGMMA", 0) >= 2) == (rank > 0), report
    budgets = {int(v) for v in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert {G.CONFIG["producer_regs"], G.CONFIG["converter_regs"]} <= budgets and max(budgets) > 128, budgets
    # no MMA serialized by ptxas (an in-flight accumulator moved or spilled would do it)
    assert sm90_compile.ptxas_notes(ptx) == []


def _run(m, dtype, seed, rank=0, unsigned=False, out=None, bias=True):
    t, x = fp8_case(m, dtype, seed=seed, unsigned=unsigned, rank=rank)
    q8, s8, la = W4A4.activation(x, t["weight_smooth_factor"], t["weight_proj_down"], unsigned, codes=E4M3)
    args = (q8, s8, m, t["weight"], t["weight_scale"], la, t["weight_proj_up"], t["bias"] if bias else None,
            out or dtype)
    return t, x, q8, s8, la, args


@requires_hopper
@pytest.mark.parametrize("m", [1, 300, 4097])
def test_bit_equal_to_the_tile_emulation_and_the_triton_fp8_gemm(m):
    t, _, q8, s8, _, args = _run(m, torch.bfloat16, seed=7 + m, out=torch.float32, bias=False)
    y = G.gemm(*args)
    emu = emulate(natural(q8)[:m].cpu(), s8[:, :m].cpu(), unpack_nibbles(t["weight"].cpu(), signed=True).double(),
                  t["weight_scale"].cpu())
    assert torch.equal(y.cpu(), emu)
    assert torch.equal(y, W4A4.gemm_fp8(*args))
    assert torch.equal(y, G.gemm(*args))  # deterministic


@requires_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 300, 4097])
@pytest.mark.parametrize("unsigned,rank", [(False, 0), (True, 32), (False, 160)])
def test_within_derived_bound_of_the_float64_reference(dtype, m, unsigned, rank):
    t, x, q8, s8, _, args = _run(m, dtype, seed=m + rank, rank=rank, unsigned=unsigned)
    y = G.gemm(*args)
    tol = check_against_float64(y, q8, s8, t, x, dtype, rank)
    assert ((y.double() - W4A4.gemm_fp8(*args).double()).abs() <= tol).all()


@requires_hopper
def test_a_members_compact_columns_read_its_own_low_rank_columns():
    """``lora_cols = (R0, C1)``: compact rank r reads column r below R0, r - R0 + C1 above; a wrong C1
    (another member's columns) is caught."""
    m, dtype, base, own = 300, torch.bfloat16, 32, 48
    t, x, q8, s8, la, args = _run(m, dtype, seed=5, rank=base + 3 * own)
    member = 1
    c1 = base + member * own
    up = t["weight_proj_up"]
    compact = torch.cat([up[:, :base], up[:, c1:c1 + own]], 1).contiguous()
    full = torch.zeros_like(up)
    full[:, :base], full[:, c1:c1 + own] = up[:, :base], up[:, c1:c1 + own]
    y = G.gemm(q8, s8, m, t["weight"], t["weight_scale"], la, compact, t["bias"], dtype, lora_cols=(base, c1))
    codes, ascales = natural(q8)[:m], s8[:, :m].t()
    tm = dict(t, weight_proj_up=full)
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(codes, ascales, tm, x, t["bias"])
    tol = w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, base + own)
    assert ((y.double() - ref).abs() <= tol).all()
    wrong = G.gemm(q8, s8, m, t["weight"], t["weight_scale"], la, compact, t["bias"], dtype,
                   lora_cols=(base, c1 + own))
    assert ((wrong.double() - ref).abs() > tol).any()


def test_another_triton_or_a_failed_compile_keeps_the_triton_kernels(monkeypatch, caplog):
    """Chosen only with Triton 3.6's Gluon on Hopper; another Triton, or a compile error at first use, is
    said once in the log and leaves the Triton FP8 GEMM in charge (the same function)."""
    G.ready.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    with caplog.at_level("INFO", logger=G.__name__):
        assert not G.ready() and not G.ready()
    assert sum("written for Triton 3.6" in r.message for r in caplog.records) == 1
    G.ready.cache_clear()
    monkeypatch.setattr(G, "_REFUSED", [])
    caplog.clear()
    with caplog.at_level("WARNING", logger=G.__name__):
        G.refuse(G.COMPILE_ERRORS[0]("x", None, None))
        G.refuse(G.COMPILE_ERRORS[0]("x", None, None))
    assert len(caplog.records) == 1 and "does not compile" in caplog.records[0].message
    q = torch.zeros(256, 128, dtype=E4M3)
    assert not G.takes(q, torch.zeros(8, 64, dtype=torch.int8), torch.zeros(2, 8))


def test_gemm_fp8_with_the_switch_on_computes_the_same_function(monkeypatch):
    """The switch changes no result: on Hopper the Gluon kernel takes the call (bit-equal: the same
    arithmetic, no low-rank branch here), elsewhere the Triton kernel keeps it."""
    _, _, _, _, _, args = _run(33, torch.bfloat16, seed=9, out=torch.float32, bias=False)
    y = W4A4.gemm_fp8(*args)
    monkeypatch.setattr(W4A4, "WARP_SPECIALIZED", True)
    assert torch.equal(W4A4.gemm_fp8(*args), y)
