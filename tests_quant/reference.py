"""Independent float references for the int4 formats, written from the format spec (not kitchen code).

Every quantized path is compared against these, computed in float64 from the stored tensors.
"""
import torch

UNSIGNED_SHIFT = 0.171875


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """(N, K/2) int8 → (N, K) int64 codes; byte j holds column 2j (low nibble) and 2j+1 (high)."""
    b = packed.to(torch.int64) % 256
    lo, hi = b % 16, b // 16
    if signed:
        lo = torch.where(lo > 7, lo - 16, lo)
        hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int64, device=packed.device)
    out[:, 0::2], out[:, 1::2] = lo, hi
    return out


def svdquant_residual(t: dict) -> torch.Tensor:
    """Dense residual weight W_res[n, k] = code[n, k] · scale[k // 64, n] (float64)."""
    codes = unpack_nibbles(t["weight"], signed=True).double()
    scale = t["weight_scale"].double().t().repeat_interleave(64, dim=1)
    return codes * scale


def quantize_activation(x_main: torch.Tensor, smooth: torch.Tensor, unsigned: bool, dtype: torch.dtype):
    """Per row, per 64-channel group: scale = absmax/7 (absmax/15 unsigned), round, clamp.

    The division by ``smooth`` and by the scale happen in ``dtype`` (the compute dtype the kernel
    quantizes in) so that the codes are the ones a kernel in that dtype must produce.
    """
    codes, scale = activation_codes(x_main, smooth, unsigned, dtype)
    m, k = codes.shape
    return (codes.view(m, k // 64, 64) * scale.unsqueeze(-1)).view(m, k)


def svdquant_forward(x, t, act_unsigned, bias=None, dtype=torch.float32):
    """Reference y for an SVDQuant layer and the elementwise magnitude Σ|terms| used for tolerances."""
    x2 = x.reshape(-1, x.shape[-1])
    x_main = x2 + UNSIGNED_SHIFT if act_unsigned else x2
    a = quantize_activation(x_main, t["weight_smooth_factor"], act_unsigned, dtype)
    w = svdquant_residual(t)
    low = (x2.double() @ t["weight_proj_down"].double()) @ t["weight_proj_up"].double().t()
    y = a @ w.t() + low
    mag = a.abs() @ w.abs().t() + low.abs()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    shape = (*x.shape[:-1], y.shape[-1])
    return y.view(shape), mag.view(shape)


def awq_weight(t, group_size):
    """Dense AWQ weight W[n, k] = (q[n, k] − 8) · scale[k // G, n] + zeros[k // G, n] (float64)."""
    q = unpack_nibbles(t["weight"], signed=False).double()
    scale = t["weight_scale"].double().t().repeat_interleave(group_size, dim=1)
    zeros = t["weight_zeros"].double().t().repeat_interleave(group_size, dim=1)
    return (q - 8) * scale + zeros


def awq_forward(x, t, group_size, bias=None):
    w = awq_weight(t, group_size)
    x2 = x.reshape(-1, x.shape[-1]).double()
    y = x2 @ w.t()
    mag = x2.abs() @ w.abs().t()
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    shape = (*x.shape[:-1], y.shape[-1])
    return y.view(shape), mag.view(shape)


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


def kernel_tolerance(mag: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """Elementwise error bound for a kernel computing in ``dtype``.

    The kernel rounds each dequantized operand once (act·scale, weight·scale: ≤ u each), accumulates
    the dot product (≤ k·2⁻²⁴ relative in fp32 accumulation), rounds the low-rank term, the sums and
    the output (≤ u each). With Σ|terms| = ``mag`` this gives |error| ≤ (4u + k·2⁻²⁴)·mag; we allow 2×
    that for the bias/low-rank additions' own roundings.
    """
    u = unit_roundoff(dtype)
    return 2 * (4 * u + k * 2.0 ** -24) * mag + 1e-30


def w4a4_gemm_reference(codes, ascales, t, x, bias=None):
    """float64 y of the W4A4 GEMM from given activation codes (M, K) and scales (M, K/64), and the
    magnitudes a tolerance weighs: Σ|main terms|, Σ|low-rank terms| (+|bias|) and |x proj_down|·|proj_up|.

    The main path is Σ_g a[m,g]·w[g,n]·Σ_{k∈g} q_x·q_w; the low-rank branch is x @ proj_down @ proj_upᵀ.
    """
    a = codes.double() * ascales.double().repeat_interleave(64, dim=1)
    w = svdquant_residual(t)
    down, up = t["weight_proj_down"].double(), t["weight_proj_up"].double()
    la = x.double() @ down
    y = a @ w.t() + la @ up.t()
    mag_low = (x.double().abs() @ down.abs()) @ up.abs().t()
    if bias is not None:
        y = y + bias.double()
        mag_low = mag_low + bias.double().abs()
    return y, a.abs() @ w.abs().t(), mag_low, la.abs() @ up.abs().t()


def w4a4_kernel_tolerance(y, mag_main, mag_low, mag_la, dtype, k, rank):
    """Elementwise bound for the project's W4A4 kernel (fp32 accumulation, output in ``dtype``).

    Main path: each group's integer dot is exact; D·w and the multiply-add by a round once each
    (2·2⁻²⁴), and the K/64 group partials accumulate in fp32 (≤ (K/64)·2⁻²⁴ relative of Σ|terms|).
    Low-rank: x @ proj_down accumulates in fp32 (K·2⁻²⁴ of Σ|x||proj_down||proj_up|) and each of its
    values is rounded to ``dtype`` (u·|x proj_down|·|proj_up|), then meets proj_up exactly on the
    tensor cores and accumulates (rank·2⁻²⁴). Output: one rounding to ``dtype``, taken as a whole ulp
    (2u) because Triton's interpreter truncates to bf16. Twice all that, for the bias addition's own
    rounding and the interleaving of the bounds.
    """
    u, e = unit_roundoff(dtype), 2.0 ** -24
    main = (2 + k // 64 + 2) * e * mag_main
    low = u * mag_la + (k + rank + 2) * e * mag_low
    return 2 * (2 * u * y.abs() + main + low) + 1e-30


def awq_magnitude(t, x, group_size):
    """Σ_k |x|·(|q − 8|·|scale| + |zeros|): the terms the project's AWQ kernel sums (it applies scale and
    zero point separately, so its rounding is weighed by these, not by Σ|x||W|)."""
    q = unpack_nibbles(t["weight"], signed=False).double()
    s = t["weight_scale"].double().t().repeat_interleave(group_size, dim=1)
    z = t["weight_zeros"].double().t().repeat_interleave(group_size, dim=1)
    return x.double().abs() @ ((q - 8).abs() * s.abs() + z.abs()).t()


def awq_kernel_tolerance(y, mag, dtype, k, group_size, split):
    """Elementwise bound for the project's AWQ kernel: products of the input and (code − 8) are exact;
    fp32 sums over a group, the K/G groups and the split-K partials; the scale and zero-point
    multiply-adds round once each; the output rounds once (a whole ulp, as in the W4A4 bound). Twice
    that, for the bias addition's own rounding."""
    u = unit_roundoff(dtype)
    return 2 * (2 * u * y.abs() + (group_size + 2 * (k // group_size) + split + 4) * 2.0 ** -24 * mag) + 1e-30


def activation_codes(x_main: torch.Tensor, smooth: torch.Tensor, unsigned: bool, dtype: torch.dtype):
    """The codes (M, K) and per-group scales (M, K/64) that ``quantize_activation`` multiplies, float64
    (the same arithmetic: division by ``smooth`` and by the scale in ``dtype``, round half to even, clamp)."""
    xs = x_main.to(dtype) / smooth.to(dtype)
    m, k = xs.shape
    g = xs.view(m, k // 64, 64)
    qmax, qmin = (15, 0) if unsigned else (7, -7)
    scale = g.abs().amax(-1).clamp(min=1e-10) / qmax
    codes = (g / scale.unsqueeze(-1)).round().clamp(qmin, qmax)
    return codes.double().view(m, k), scale.double()


def split_activation_codes(x: torch.Tensor, t: dict, in_splits, act_unsigned, dtype: torch.dtype):
    """An input-split layer's activation codes (M, K) and scales (M, K/64), float64: input part i (columns
    of width ``in_splits[i]``) quantized with its own signedness ``act_unsigned[i]`` (an unsigned part
    shifted by 0.171875 first, in the input's dtype), per 64-group, with its own smoothing columns.
    ``w4a4_gemm_reference(codes, scales, t, x, bias)`` is then the layer's float64 output."""
    x2 = x.reshape(-1, x.shape[-1])
    codes, scales, start = [], [], 0
    for width, unsigned in zip(in_splits, act_unsigned):
        part = x2[:, start:start + width]
        c, s = activation_codes(part + UNSIGNED_SHIFT if unsigned else part,
                                t["weight_smooth_factor"][start:start + width], unsigned, dtype)
        codes.append(c)
        scales.append(s)
        start += width
    return torch.cat(codes, 1), torch.cat(scales, 1)


def w4a4_split_tolerance(mag: torch.Tensor, dtype: torch.dtype, k: int, parts: int) -> torch.Tensor:
    """Elementwise bound for kitchen's path of an input-split layer: one plain kitchen call per input
    part i (its own K_i columns, no bias), the parts' outputs and the bias then summed in fp32 and
    rounded once to ``dtype``.

    Part i is a plain SVDQuant layer, so its error is within ``kernel_tolerance(mag_i, dtype, K_i)``
    (the bound plain layers are held to) with ``mag_i`` its Σ|terms|; that bound is linear in mag and
    grows with k, so the parts together stay within ``kernel_tolerance(Σ mag_i, dtype, K)``. The
    ``parts`` fp32 additions (the other parts and the bias) add ≤ parts·2⁻²⁴·Σ|summands| and the final
    rounding u·|y|; both summands and |y| are within mag (+ the parts' own errors, far below mag), taken
    as 2u + (parts + 1)·2⁻²⁴ of mag. ``mag`` = Σ_i mag_i + |bias|, what ``arch_fixtures.w4a4_reference``
    returns."""
    u = unit_roundoff(dtype)
    return kernel_tolerance(mag, dtype, k) + (2 * u + (parts + 1) * 2.0 ** -24) * mag
