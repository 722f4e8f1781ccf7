"""The project's Triton kernels against kitchen's eager reference and the float64 reference.

The integer part must be exact: activation codes and scales bit-identical to kitchen's eager
quantizer. The float part must stay within the bounds derived in ``reference.py``. On a machine
without CUDA these run under Triton's interpreter at small shapes; on a GPU at the real widths.
"""
import pytest
import torch
from comfy_kitchen.backends.eager import awq as eager_awq
from comfy_kitchen.backends.eager import svdquant as eager_svd

import comfy.ops
from comfy.quant import kernels
from comfy.quant.deltas import LowRankDelta
from comfy.quant.formats import format_of
from comfy.quant.layer import run_linear_group, tie_shared_quant
from comfy.quant.packing import pack_int4
from factories import awq_tensors, prefixed, svdquant_tensors
from kernel_env import AWQ, DEVICE, W4A4, assert_same_arithmetic, requires_cuda, requires_kernels
from reference import (awq_kernel_tolerance, awq_magnitude, awq_weight, kernel_tolerance, w4a4_gemm_reference,
                       w4a4_kernel_tolerance)

pytestmark = requires_kernels
GPU = DEVICE.type == "cuda"
ROWS = (1, 7, 255, 4097) if GPU else (1, 7, 255)
K, N = (3072, 520) if GPU else (192, 80)  # the real input width on a GPU; N not a multiple of the tile
DTYPES = (torch.bfloat16, torch.float16)


def _input(m, k, dtype, unsigned, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, :: max(1, k // 17)] *= 8  # a few outlier channels, as real activations have
    if unsigned:
        x = torch.nn.functional.gelu(x)
    return x.to(dtype).to(DEVICE)


def _natural_codes(q, k):
    """Kernel codes (groups stored even columns then odd) back in column order."""
    return q.view(q.shape[0], k // 64, 2, 32).permute(0, 1, 3, 2).reshape(q.shape[0], k)


def _on_device(t):
    return {k: v.to(DEVICE) for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shuffle", [True, False])
def test_activation_codes_and_scales_equal_kitchen_eager(dtype, unsigned, m, shuffle):
    x = _input(m, K, dtype, unsigned, seed=m)
    smooth = (torch.rand(K, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).to(DEVICE)
    q, s = W4A4.quantize(x, smooth, unsigned, config=dict(W4A4.QUANT_CONFIG, SHUFFLE=shuffle))
    x_main = x + 0.171875 if unsigned else x
    down = torch.zeros(K, 1, dtype=dtype, device=DEVICE)
    q_ref, s_ref, _ = eager_svd.quantize_svdquant_w4a4(x_main, smooth, down, act_unsigned=unsigned, lora_x=x)
    assert q.shape == (q_ref.shape[0], K) and s.shape == s_ref.shape  # rows padded to 256, as kitchen pads
    assert torch.equal(pack_int4(_natural_codes(q, K)), q_ref)
    assert torch.equal(s.to(dtype), s_ref) and torch.equal(s.to(dtype).float(), s)  # fp32 holding the dtype's value
    assert not q[m:].any() and not s[:, m:].any()


def _w4a4_case(dtype, unsigned, rank, loras, m, seed=0):
    t = svdquant_tensors(N, K, rank, dtype=dtype, seed=seed, act_unsigned=unsigned)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(loras):  # an appended LoRA is more rank in the same branch
        t["weight_proj_down"] = torch.cat([t["weight_proj_down"], (torch.randn(K, 64, generator=g) * 0.02).to(dtype)], 1)
        t["weight_proj_up"] = torch.cat([t["weight_proj_up"], (torch.randn(N, 64, generator=g) * 0.02).to(dtype)], 1)
    return _on_device(t), _input(m, K, dtype, unsigned, seed=seed + m)


def _bound(t, x, q, s, bias, dtype):
    """float64 reference and the kernel's error bound for output rows of ``x`` given the kernel's own
    activation codes and scales (those are checked bit-exact against kitchen separately)."""
    m = x.shape[0]
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(_natural_codes(q, K)[:m], s[:, :m].t(), t, x, bias)
    return ref, w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, t["weight_proj_down"].shape[1])


def _run_gemm(t, x, unsigned, dtype, config=None):
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], unsigned)
    la = W4A4.lora_activation(x, t["weight_proj_down"]) if t["weight_proj_down"].shape[1] else None
    y = W4A4.gemm(q, s, x.shape[0], t["weight"], t["weight_scale"], la, t["weight_proj_up"], t["bias"],
                  dtype, config=config)
    return y, q, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("rank,loras", [(0, 0), (32, 0), (128, 1), (32, 2)])
@pytest.mark.parametrize("m", ROWS)
def test_w4a4_gemm_within_derived_bound_of_float64_and_kitchen(dtype, unsigned, rank, loras, m):
    t, x = _w4a4_case(dtype, unsigned, rank, loras, m)
    y, q, s = _run_gemm(t, x, unsigned, dtype)
    codes = _natural_codes(q, K)[:m]
    ascales = s[:, :m].t()
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(codes, ascales, t, x, t["bias"])
    r = t["weight_proj_down"].shape[1]
    tol = w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, r)
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all() and (err <= tol).all(), f"max err/tol {(err / tol).max():.3g}"

    # negative control: the bound sees a kernel that applied group 0's weight scales twice
    t_bad = dict(t, weight_scale=t["weight_scale"].clone())
    t_bad["weight_scale"][0] *= 2
    ref_bad = w4a4_gemm_reference(codes, ascales, t_bad, x, t["bias"])[0]
    assert ((y.double() - ref_bad).abs() > tol).any()

    # kitchen's eager path on the same stored tensors (it rounds dequantized operands to the dtype)
    eager = eager_svd.scaled_mm_svdquant_w4a4(
        act=pack_int4(codes), wgt=t["weight"], ascales=s[:, :m].to(dtype), wscales=t["weight_scale"],
        lora_act_in=x.float() @ t["weight_proj_down"].float(), lora_up=t["weight_proj_up"], bias=t["bias"],
        act_unsigned=unsigned)
    eager_tol = kernel_tolerance(mag_main + mag_low, dtype, K)
    assert ((y.double() - eager.double()).abs() <= tol + eager_tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("pipe", [False, True])
def test_w4a4_gemm_variants_compute_the_same_function(dtype, unsigned, swap, pipe):
    """Each compiled variant (weight as the MMA's A or B operand, bit-trick or plain nibble unpacking,
    magic-number or converted int32) stays within the same bound."""
    m = ROWS[-1]
    t, x = _w4a4_case(dtype, unsigned, 32, 1, m, seed=21)
    asm = (False, True) if GPU else (False,)  # inline PTX does not run in the interpreter
    for use_asm in asm:
        cfg = dict(W4A4._config(m, N, DEVICE), SWAP=swap, ASM=use_asm, PIPE=pipe)
        y, q, s = _run_gemm(t, x, unsigned, dtype, config=cfg)
        ref, tol = _bound(t, x, q, s, t["bias"], dtype)
        assert ((y.double() - ref).abs() <= tol).all()


def _layer(t, n, k, dtype=torch.bfloat16):
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=dtype).Linear(k, n, device=DEVICE)
    lin._load_from_state_dict(prefixed("l", {k: v.to(DEVICE) for k, v in t.items()}), "l.", {}, True, [], [], [])
    return lin


def test_layer_forward_runs_the_chosen_kernel_and_appended_lora():
    dtype, m = torch.bfloat16, 33
    t, x = _w4a4_case(dtype, False, 32, 0, m, seed=5)
    lin = _layer(t, N, K)
    with kernels.forced("triton"):
        assert kernels.w4a4_kernel(DEVICE) is W4A4
        y = lin(x)
        direct = W4A4.linear(x, lin.weight, lin.bias)
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], False)
    ref, tol = _bound(t, x, q, s, t["bias"], dtype)
    assert ((y.double() - ref).abs() <= tol).all()
    assert_same_arithmetic(y, direct, tol)  # the layer adds nothing on top of the kernel
    with kernels.forced("kitchen"):
        assert kernels.w4a4_kernel(DEVICE) is None
    a = torch.randn(16, K) * 0.02
    b = torch.randn(N, 16) * 0.02
    format_of(lin.weight).apply_deltas([(lin, [LowRankDelta(b, a)])])
    with kernels.forced("triton"):
        y_lora = lin(x)
    a, b = a.to(DEVICE, dtype).double(), b.to(DEVICE, dtype).double()
    delta = (x.double() @ a.t()) @ b.t()
    t_l = dict(t, weight_proj_down=lin.weight._params.proj_down, weight_proj_up=lin.weight._params.proj_up)
    y_direct = _run_gemm(t_l, x, False, dtype)[0]
    ref, mag_main, mag_low, _ = w4a4_gemm_reference(_natural_codes(q, K)[:m], s[:, :m].t(), t_l, x, t["bias"])
    assert ((ref - (w4a4_gemm_reference(_natural_codes(q, K)[:m], s[:, :m].t(), t, x, t["bias"])[0] + delta)).abs()
            <= 1e-9 * (mag_low + mag_main)).all()  # the appended ranks are exactly s·(x Aᵀ) Bᵀ (in float64)
    ref, tol = _bound(t_l, x, q, s, t["bias"], dtype)
    assert ((y_lora.double() - ref).abs() <= tol).all()
    assert_same_arithmetic(y_lora, y_direct, tol)


def test_grouped_forward_quantizes_once_and_equals_separate_calls():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = svdquant_tensors(N, K, 32, seed=3)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                t = svdquant_tensors(N, K, 32, seed=3 + i)
                t["weight_proj_down"], t["weight_smooth_factor"] = base["weight_proj_down"], base["weight_smooth_factor"]
                setattr(self, name, _layer(t, N, K))

    attn = Attn()
    assert tie_shared_quant(attn) == 1
    x = _input(20, K, torch.bfloat16, False, seed=9)
    mods = (attn.to_q, attn.to_k, attn.to_v)
    with kernels.forced("triton"):
        grouped = run_linear_group(x, mods)
        separate = [m(x) for m in mods]
    q, s = W4A4.quantize(x, attn.to_q.weight._params.smooth_factor, False)
    for m, a, b in zip(mods, grouped, separate):  # same quantization, same GEMM: the same arithmetic
        assert_same_arithmetic(a, b, _bound(_stored(m), x, q, s, m.bias, torch.bfloat16)[1])

    # a LoRA on each: one stacked proj_down, each proj_up zero where the siblings' ranks are
    g = torch.Generator().manual_seed(4)
    deltas = [LowRankDelta(torch.randn(N, 16, generator=g) * 0.02, torch.randn(16, K, generator=g) * 0.02)
              for _ in mods]
    format_of(attn.to_q.weight).apply_deltas([(m, [d]) for m, d in zip(mods, deltas)])
    assert attn.to_q.weight._params.proj_down is attn.to_v.weight._params.proj_down
    with kernels.forced("triton"):
        grouped = run_linear_group(x, mods)
    for m, y in zip(mods, grouped):
        ref, tol = _bound(_stored(m), x, q, s, m.bias, torch.bfloat16)
        assert ((y.double() - ref).abs() <= tol).all()


def _stored(module):
    """A loaded SVDQuant layer's tensors under their file names (what the references take)."""
    return format_of(module.weight).state_dict(module.weight)


AWQ_GEMV = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4)
# every code path of the two AWQ kernels, at tiles that run quickly under the interpreter
AWQ_VARIANTS = {
    "gemv rows 8": dict(AWQ_GEMV, BLOCK_M=8, num_warps=2),
    "gemv xsum by reduction": dict(AWQ_GEMV, XSUM_MMA=False, SPLIT_K=2),
    "gemv rounded weight": dict(AWQ_GEMV, EXACT=False, SPLIT_K=3),
    "gemm": dict(GEMM=True, BLOCK_M=16, BLOCK_N=32, num_warps=4, GROUP_M=2),
    "gemm xsum by reduction": dict(GEMM=True, BLOCK_M=32, BLOCK_N=32, num_warps=4, XSUM_MMA=False),
    "gemm rounded weight": dict(GEMM=True, BLOCK_M=32, BLOCK_N=64, num_warps=4, EXACT=False),
}


def _awq_case(n, k, group, dtype, m, seed):
    t = _on_device(awq_tensors(n, k, group_size=group, dtype=dtype, seed=seed))
    return t, _input(m, k, dtype, False, seed=seed + 1)


def _awq_reference(t, x, group, scale=None):
    """float64 y and the bound's two magnitudes: Σ|x|(|q − 8||s| + |z|) (the exact kernels apply scale and
    zero point separately) and Σ|x||W| (a kernel that rounds W meets x once per weight)."""
    w = awq_weight(t if scale is None else dict(t, weight_scale=scale), group)
    bias = t["bias"].double()
    mag_dense = x.double().abs() @ w.abs().t() + bias.abs()
    return x.double() @ w.t() + bias, awq_magnitude(t, x, group) + bias.abs(), mag_dense


def _awq_tolerance(cfg, ref, mag_split, mag_dense, dtype, k, group, split):
    """The derived bound of the configuration's arithmetic: exact (weight never rounded, per-group fp32
    promotion; ``awq_kernel_tolerance``) or the rounded weight meeting x on the tensor cores over all of K
    (each dequantized operand rounded once, fp32 accumulation: ``kernel_tolerance``, kitchen's bound)."""
    if cfg.get("EXACT", True):
        return awq_kernel_tolerance(ref, mag_split, dtype, k, group, split)
    return kernel_tolerance(mag_dense, dtype, k)


def _awq_run(t, x, group, cfg):
    return AWQ.gemv(x, t["weight"], t["weight_scale"], t["weight_zeros"], group, t["bias"], config=dict(cfg))


def _assert_awq_bound_and_control(y, t, x, group, cfg, dtype, split):
    """Within the derived bound of the float64 reference, and outside it against a weight whose group 0
    scales are doubled (the bound is tight enough to see one group's scale)."""
    k = x.shape[1]
    ref, mag_split, mag_dense = _awq_reference(t, x, group)
    tol = _awq_tolerance(cfg, ref, mag_split, mag_dense, dtype, k, group, split)
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all() and (err <= tol).all(), f"max err/tol {(err / tol).max():.3g}"
    bad = t["weight_scale"].clone()
    bad[0] *= 2
    ref_bad = _awq_reference(t, x, group, scale=bad)[0]
    assert ((y.double() - ref_bad).abs() > tol).any()
    return tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("m", (1, 2, 7, 16, 17, 255) if GPU else (1, 7, 17))
@pytest.mark.parametrize("split", [1, 3])
def test_awq_within_derived_bound_of_float64_and_kitchen(dtype, group, m, split):
    n, k = (18432, 3072) if GPU else (96, 384)
    t, x = _awq_case(n, k, group, dtype, m, seed=m)
    cfg = dict(AWQ_GEMV, SPLIT_K=split)
    y = _awq_run(t, x, group, cfg)
    tol = _assert_awq_bound_and_control(y, t, x, group, cfg, dtype, split)
    eager = eager_awq.gemv_awq_w4a16(x, t["weight"], t["weight_scale"], t["weight_zeros"], t["bias"], group_size=group)
    mag = _awq_reference(t, x, group)[1]
    assert ((y.double() - eager.double()).abs() <= tol + kernel_tolerance(mag, dtype, k)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(AWQ_VARIANTS))
def test_awq_kernel_variants_within_their_derived_bounds(dtype, variant):
    """Both kernels, both ways of summing x per group, the exact and the rounded-weight arithmetic; rows
    that fill no tile and columns that are not a multiple of the tile."""
    cfg = AWQ_VARIANTS[variant]
    n, k, m = (520, 3072, 300) if GPU else (80, 384, 21)
    t, x = _awq_case(n, k, 64, dtype, m, seed=len(variant))
    y = _awq_run(t, x, 64, cfg)
    split = 1 if cfg.get("GEMM") else AWQ._split(cfg, m, n, k // 64, x.device)
    _assert_awq_bound_and_control(y, t, x, 64, cfg, dtype, split)


def test_awq_rounded_weight_is_outside_the_exact_bound_somewhere():
    """Control for the bounds above: the exact bound is tight enough to tell the rounded-weight arithmetic
    apart (on inputs with cancellation), so passing it is evidence of the exact arithmetic."""
    n, k, m = 64, 384, 16
    t, x = _awq_case(n, k, 64, torch.bfloat16, m, seed=40)
    x = x - x.mean(1, keepdim=True)  # rows that cancel against the zero points
    cfg = dict(AWQ_GEMV, EXACT=False)
    y = _awq_run(t, x, 64, cfg)
    ref, mag_split, mag_dense = _awq_reference(t, x, 64)
    assert ((y.double() - ref).abs() <= kernel_tolerance(mag_dense, torch.bfloat16, k)).all()
    assert ((y.double() - ref).abs() > awq_kernel_tolerance(ref, mag_split, torch.bfloat16, k, 64, 1)).any()


def test_awq_split_k_divides_the_groups_and_fills_the_machine():
    """Every program sums the same number of groups; PER_SM asks for enough programs per SM."""
    cpu = torch.device("cpu")
    cfg = dict(BLOCK_M=16, BLOCK_N=32, PER_SM=8)  # the interpreter counts AWQ.CPU_SMS SMs
    want = -(-8 * AWQ.CPU_SMS // 3)  # 3 column tiles of 96 columns
    split = AWQ._split(cfg, 1, 96, 48, cpu)
    assert 48 % split == 0 and split >= want and all(48 % s for s in range(want, split))
    assert AWQ._split(dict(cfg, SPLIT_K=5), 1, 96, 48, cpu) == 6  # the next divisor of 48
    assert AWQ._split(dict(cfg, SPLIT_K=100), 1, 96, 48, cpu) == 48
    assert AWQ._config(4096, 96, 48, cpu)["SPLIT_K"] >= 1


def test_awq_input_views_are_read_as_their_values():
    """A view that starts on an odd column, or with an odd row stride, is copied before the kernel reads two
    columns per 32-bit load; the result is the same as from the contiguous input."""
    n, k, m = 64, 384, 5
    t, x = _awq_case(n, k, 64, torch.bfloat16, m, seed=7)
    wide = torch.zeros(m, k + 3, dtype=x.dtype, device=x.device)
    wide[:, 1:k + 1] = x
    view = wide[:, 1:k + 1]
    assert view.data_ptr() % 4 and view.stride(0) % 2
    y, y_view = _awq_run(t, x, 64, AWQ_GEMV), _awq_run(t, view, 64, AWQ_GEMV)
    assert_same_arithmetic(y_view, y, _assert_awq_bound_and_control(y, t, x, 64, AWQ_GEMV, torch.bfloat16, 1))


def test_awq_layer_uses_the_project_kernel_in_triton_mode_and_on_hopper_in_auto():
    t = awq_tensors(N, K, dtype=torch.bfloat16, seed=2)
    lin = _layer(t, N, K)
    for rows in (2, 40):
        x = _input(rows, K, torch.bfloat16, False, seed=4)
        td = _on_device(t)
        ref, mag_split, mag_dense = _awq_reference(td, x, 64)
        cfg = AWQ._config(rows, N, K // 64, DEVICE)
        tol = _awq_tolerance(cfg, ref, mag_split, mag_dense, torch.bfloat16, K, 64, cfg["SPLIT_K"])
        with kernels.forced("triton"):
            assert kernels.awq_kernel(DEVICE, rows) is AWQ
            y = lin(x)
            assert ((y.double() - ref).abs() <= tol).all()
            assert_same_arithmetic(y, AWQ.linear(x, lin.weight, lin.bias), tol)
        with kernels.forced("kitchen"):
            assert kernels.awq_kernel(DEVICE, rows) is None
    hopper = GPU and torch.cuda.get_device_capability()[0] == 9
    with kernels.forced("auto"):  # every M on Hopper (kitchen's fused path took 2.3 ms at M = 256)
        assert all((kernels.awq_kernel(DEVICE, rows) is AWQ) == hopper for rows in (1, 16, 17, 256, 4096))


def test_kernel_mode_is_checked():
    with pytest.raises(kernels.KernelModeError, match="COMFY_INT4_KERNELS"):
        kernels.set_mode("fast")
    assert kernels.mode() in kernels.MODES
    with kernels.forced("kitchen"):
        assert kernels.describe(DEVICE)["svdquant_w4a4"] == "kitchen"


@requires_cuda
def test_kernels_are_deterministic_at_full_size():
    t, x = _w4a4_case(torch.bfloat16, True, 128, 2, 4096, seed=11)
    first = _run_gemm(t, x, True, torch.bfloat16)[0]
    assert all(torch.equal(first, _run_gemm(t, x, True, torch.bfloat16)[0]) for _ in range(5))
    ta = awq_tensors(18432, 3072, seed=1)
    wt = _layer(ta, 18432, 3072).weight
    xa = _input(8, 3072, torch.bfloat16, False, seed=2)
    ya = AWQ.linear(xa, wt, None)
    assert all(torch.equal(ya, AWQ.linear(xa, wt, None)) for _ in range(5))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
def test_awq_asm_and_plain_codes_are_the_same_arithmetic(dtype, m):
    """codes − 8 by lop3 + packed FMA (inline PTX) or through the fp32 significand: the same values, so the
    same output bit for bit, for the tiles ``CONFIGS`` picks and for the other kernel's, within the bound."""
    n, k = 18432, 3072
    t, x = _awq_case(n, k, 64, dtype, m, seed=m + 2)
    own = AWQ._config(m, n, k // 64, DEVICE)
    other = dict(AWQ.CONFIGS[16], SPLIT_K=1) if own.get("GEMM") else dict(AWQ.CONFIGS[max(AWQ.CONFIGS)])
    for cfg in (own, other):
        y = _awq_run(t, x, 64, dict(cfg, ASM=True))
        assert torch.equal(y, _awq_run(t, x, 64, dict(cfg, ASM=False)))
        _assert_awq_bound_and_control(y, t, x, 64, cfg, dtype, cfg.get("SPLIT_K", 1))
