"""What each FP8 tile of the W4A4 GEMM computes, in torch: the emulation both FP8 kernels (the Triton
GEMM and the warp-specialized Gluon one) must equal bit for bit on a GPU, and the case maker their tests share.

Per 64-group g: ``D_g = Σ_k q_x·q_w`` (e4m3 codes, a fresh fp32 accumulator per group, exact), then
``acc ← fma(fl(D_g·w[n]), a[m], acc)`` in fp32. float64 products of fp32 values are exact and the sum
is rounded once to fp32.
"""
import torch

from factories import svdquant_tensors
from kernel_env import DEVICE
from reference import w4a4_gemm_reference, w4a4_kernel_tolerance

E4M3 = torch.float8_e4m3fn
GPU = DEVICE.type == "cuda"
K, N = (3072, 520) if GPU else (256, 48)  # N: not a multiple of any tile


def natural(q):
    """Kernel codes (groups stored even columns then odd) in column order, as float64."""
    k = q.shape[1]
    return q.float().view(q.shape[0], k // 64, 2, 32).permute(0, 1, 3, 2).reshape(q.shape[0], k).double()


def truncate(v, bits):
    """``v`` (float64 integers) truncated toward zero to ``bits`` significant bits (Hopper's FP8 accumulator)."""
    e = torch.floor(torch.log2(v.abs().clamp(min=1)))
    ulp = torch.exp2(torch.clamp(e - (bits - 1), min=0))
    return torch.trunc(v / ulp) * ulp


def emulate(codes, ascales, wcodes, wscales, group=64, acc_bits=None, scale_shift=0):
    """fp32 main-path output of the FP8 tile arithmetic. ``codes`` (M, K) and ``wcodes`` (N, K) integer
    float64, ``ascales`` (K/64, M) fp32, ``wscales`` (K/64, N). ``group``: the length of one fresh
    accumulator (the kernel: 64); with ``acc_bits`` the accumulator keeps that many significant bits
    after each 32-long MMA step; ``scale_shift`` applies group g+shift's scales to group g."""
    m, k = codes.shape
    acc = torch.zeros(m, wcodes.shape[0], dtype=torch.float32)
    for g0 in range(0, k, group):
        d = torch.zeros(m, wcodes.shape[0], dtype=torch.float64)
        for c in range(g0, g0 + group, 32):  # one MMA k-step
            d = d + codes[:, c:c + 32] @ wcodes[:, c:c + 32].t()
            if acc_bits is not None:
                d = truncate(d, acc_bits)
        for s in range(g0 // 64, (g0 + group) // 64):  # the scales of each 64-group in the accumulator
            gs = (s + scale_shift) % (k // 64)
            t = (d.float().double() * wscales[gs].float().double()[None, :]).float()
            if group > 64:  # a longer group has no per-64 scales: its one sum meets the first group's
                acc = (t.double() * ascales[gs].double()[:, None] + acc.double()).float()
                break
            acc = (t.double() * ascales[gs].double()[:, None] + acc.double()).float()
    return acc


def fp8_case(m, dtype, seed, unsigned=False, rank=0):
    """Stored SVDQuant tensors (N, K) and an input (m, K) on the test device."""
    t = svdquant_tensors(N, K, rank, dtype=dtype, seed=seed, act_unsigned=unsigned)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, K, generator=g) * 2).to(dtype)
    if unsigned:
        x = torch.nn.functional.gelu(x.float()).to(dtype)
    return {k: v.to(DEVICE) for k, v in t.items()}, x.to(DEVICE)


def check_against_float64(y, q8, s8, t, x, dtype, rank):
    """``y`` (a GEMM's output on e4m3 codes ``q8``, scales ``s8``) within the derived bound of the float64
    reference (``reference.w4a4_kernel_tolerance``), and outside it once one group's weight scales are
    doubled (the negative control). Returns the bound."""
    m = y.shape[0]
    codes, ascales = natural(q8)[:m], s8[:, :m].t()
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(codes, ascales, t, x, t["bias"])
    tol = w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, rank)
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all() and (err <= tol).all(), f"max err/tol {(err / tol).max():.3g}"
    t_bad = dict(t, weight_scale=t["weight_scale"].clone())
    t_bad["weight_scale"][1] *= 2
    assert ((y.double() - w4a4_gemm_reference(codes, ascales, t_bad, x, t["bias"])[0]).abs() > tol).any()
    return tol
