"""The W4A4 GEMM on FP8 tensor cores and the one-pass activation path.

What each FP8 tile computes, per 64-group g: ``D_g = Σ_k q_x·q_w`` on the tensor cores (e4m3 codes, a
fresh fp32 accumulator per group), then ``acc ← fma(fl(D_g·w[n]), a[m], acc)`` in fp32.
``fp8_emulation.emulate`` does exactly that in torch (float64 products of fp32 values are exact; the sum is rounded once
to fp32), so on a GPU the kernel must equal it bit for bit (|D_g| ≤ 64·15·8 < 2¹⁴: exact in the FP8
accumulator, whose measured precision is ~14 significant bits, formats.md §6), and anywhere it must
stay within the derived bound of the float64 reference (``reference.w4a4_kernel_tolerance``).
Negative controls: a 256-long group in one FP8 accumulator (the same emulation with the accumulator
truncated to 14 significant bits, as measured) and scales applied to the wrong group both break it.
"""
import pytest
import torch
from comfy_kitchen.backends.eager import svdquant as eager_svd

from comfy.quant.packing import pack_int4
from fp8_emulation import GPU, K, check_against_float64, emulate, fp8_case, natural
from kernel_env import DEVICE, W4A4, requires_cuda, requires_kernels
from reference import unpack_nibbles, w4a4_gemm_reference, w4a4_kernel_tolerance

pytestmark = requires_kernels
E4M3 = torch.float8_e4m3fn
ROWS = (1, 300, 4097) if GPU else (5, 70)


def _main_bound(codes, ascales, t, x, dtype):
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(codes, ascales, t, x)
    return ref, w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, torch.float32, K, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_fp8_tile_is_within_bound_and_the_controls_are_not(dtype):
    t, x = fp8_case(40, dtype, seed=3)
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], False, codes=E4M3)
    codes, ascales = natural(q)[:40].cpu(), s[:, :40].cpu()
    wcodes = unpack_nibbles(t["weight"].cpu(), signed=True).double()
    tc = {k: v.cpu() for k, v in t.items()}
    ref, tol = _main_bound(codes, ascales.t(), tc, x.cpu(), dtype)
    y = emulate(codes, ascales, wcodes, tc["weight_scale"])
    assert ((y.double() - ref).abs() <= tol).all()
    # the FP8 accumulator model changes nothing for 64-long groups (|D| < 2^13)
    assert torch.equal(emulate(codes, ascales, wcodes, tc["weight_scale"], acc_bits=14), y)
    # scales applied to the wrong group
    bad = emulate(codes, ascales, wcodes, tc["weight_scale"], scale_shift=1)
    assert ((bad.double() - ref).abs() > tol).any()


def test_a_256_long_group_in_one_fp8_accumulator_is_not_exact():
    """Adversarial same-sign codes (15·7 per product, one 14 per 32: each MMA step adds an odd 3353):
    256-long sums pass 2^14 and lose low bits in a 14-bit accumulator; 64-long sums never do."""
    m, n, k = 4, 3, 256
    codes = torch.full((m, k), 15.0, dtype=torch.float64)
    codes[:, ::32] = 14.0
    wcodes = torch.full((n, k), 7.0, dtype=torch.float64)
    exact = codes @ wcodes.t()
    one = torch.ones(k // 64, m), torch.ones(k // 64, n)
    grouped = emulate(codes, one[0], wcodes, one[1], acc_bits=14)
    assert torch.equal(grouped.double(), exact)
    long_group = emulate(codes, one[0], wcodes, one[1], group=256, acc_bits=14)
    assert not torch.equal(long_group.double(), exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("unsigned,rank", [(False, 0), (True, 32), (False, 160)])
def test_fp8_gemm_within_derived_bound_and_same_as_int8_gemm(dtype, m, unsigned, rank):
    t, x = fp8_case(m, dtype, seed=m, unsigned=unsigned, rank=rank)
    q8, s8, la = W4A4.activation(x, t["weight_smooth_factor"], t["weight_proj_down"], unsigned, codes=E4M3)
    y = W4A4.gemm(q8, s8, m, t["weight"], t["weight_scale"], la, t["weight_proj_up"], t["bias"], dtype)
    tol = check_against_float64(y, q8, s8, t, x, dtype, rank)  # and the doubled-scale negative control
    # the int8 GEMM on the same codes: the same arithmetic (bit-equal on a GPU)
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], unsigned)
    y_int8 = W4A4.gemm(q, s, m, t["weight"], t["weight_scale"], la, t["weight_proj_up"], t["bias"], dtype)
    if GPU:
        assert torch.equal(y, y_int8)
    else:
        assert ((y.double() - y_int8.double()).abs() <= tol).all()


@requires_cuda
@pytest.mark.parametrize("m", [1, 300, 4096])
def test_fp8_kernel_is_bit_equal_to_the_emulation(m):
    t, x = fp8_case(m, torch.bfloat16, seed=7 + m)
    q8, s8 = W4A4.quantize(x, t["weight_smooth_factor"], False, codes=E4M3)
    y = W4A4.gemm(q8, s8, m, t["weight"], t["weight_scale"], None, t["weight_proj_up"], None, torch.float32)
    wcodes = unpack_nibbles(t["weight"].cpu(), signed=True).double()
    emu = emulate(natural(q8)[:m].cpu(), s8[:, :m].cpu(), wcodes, t["weight_scale"].cpu())
    assert torch.equal(y.cpu(), emu)


SPLIT = ((0, 64, False), (64, 192, True), (192, 256, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", [False, True, SPLIT])
@pytest.mark.parametrize("m", ROWS[:2])
@pytest.mark.parametrize("k_split", [1, 2])
def test_one_pass_activation_equals_quantize_and_kitchen(dtype, parts, m, k_split):
    """Codes and scales bit-identical to ``quantize`` (itself bit-identical to kitchen's eager quantizer,
    test_kernels), also where bf16 divides fast; the low-rank input within its fp32-accumulation bound."""
    t, x = fp8_case(m, dtype, seed=11 + m, rank=48)
    if parts == SPLIT:
        parts = tuple((a * K // 256, b * K // 256, u) for a, b, u in SPLIT)
    cfg = dict(W4A4.ACT_CONFIG, K_SPLIT=k_split)
    q, s, la = W4A4.activation(x, t["weight_smooth_factor"], t["weight_proj_down"], parts, config=cfg)
    q_ref, s_ref = W4A4.quantize(x, t["weight_smooth_factor"], parts)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    if isinstance(parts, bool):
        x_main = x + 0.171875 if parts else x
        kq, ks, _ = eager_svd.quantize_svdquant_w4a4(x_main, t["weight_smooth_factor"], t["weight_proj_down"][:, :1],
                                                     act_unsigned=parts, lora_x=x)
        assert torch.equal(pack_int4(natural(q).long()), kq) and torch.equal(s.to(dtype), ks)
    q8, s8, _ = W4A4.activation(x, t["weight_smooth_factor"], t["weight_proj_down"], parts, codes=E4M3, config=cfg)
    assert q8.dtype == E4M3 and torch.equal(q8.float(), q.float()) and torch.equal(s8, s)
    ref = x.double() @ t["weight_proj_down"].double()
    mag = x.double().abs() @ t["weight_proj_down"].double().abs()
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = 2 * (u * ref.abs() + K * 2.0 ** -24 * mag) + 1e-30
    assert ((la.double() - ref).abs() <= tol).all()
    assert not ((la.double() - ref - 4 * tol).abs() <= tol).all()  # negative control: the bound is not vacuous


def test_rank_zero_gives_no_low_rank_input():
    t, x = fp8_case(5, torch.bfloat16, seed=1)
    q, s, la = W4A4.activation(x, t["weight_smooth_factor"], t["weight_proj_down"], False)
    assert la is None and q.shape == (256, K)


def test_gemm_codes_are_e4m3_only_on_hopper_once_switched_on(monkeypatch):
    for on in (False, True):
        monkeypatch.setattr(W4A4, "FP8_GEMM", on)
        assert W4A4.gemm_codes(torch.device("cpu")) == torch.int8
        if GPU:
            hopper = torch.cuda.get_device_capability()[0] == 9
            assert (W4A4.gemm_codes(DEVICE) == E4M3) == (on and hopper)


@pytest.mark.parametrize("fused,fp8", [(False, False), (True, False), (True, True)])
def test_layer_forward_through_each_switch_is_the_same_function(monkeypatch, fused, fp8):
    """The forward's path (int8 or FP8 GEMM, two passes or one over x) changes no code and no scale, and
    the output stays within the same bound (bit-equal on a GPU: the same arithmetic)."""
    m, dtype = 33, torch.bfloat16
    t, x = fp8_case(m, dtype, seed=2, rank=32)
    monkeypatch.setattr(W4A4, "FUSED_ACTIVATION", fused)
    monkeypatch.setattr(W4A4, "FP8_GEMM", fp8)
    monkeypatch.setattr(W4A4, "gemm_codes", lambda device: E4M3 if fp8 else torch.int8)
    weight = type("W", (), {})()
    weight._qdata, weight._params = t["weight"], type("P", (), dict(
        scale=t["weight_scale"], proj_down=t["weight_proj_down"], proj_up=t["weight_proj_up"],
        smooth_factor=t["weight_smooth_factor"], act_unsigned=False))()
    y = W4A4.linear(x, weight, t["bias"])
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], False)
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(natural(q)[:m], s[:, :m].t(), t, x, t["bias"])
    tol = w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, 32)
    assert ((y.double() - ref).abs() <= tol).all()
