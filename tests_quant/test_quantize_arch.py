"""The offline quantizer on Z-Image (NextDiT) and Flux.1: bf16 ComfyUI file -> ComfyUI-native int4 file.

The tiny float files come from ``arch_fixtures.comfy_float_state_dict``. The layer tables below are
written out here from nunchaku-format.md §5 (not read from comfy.quant.architectures), so the quantizer's
tables are checked against a second statement of the same facts. Nothing here loads a model: only the
stored tensors are checked, in float64, against the float weights, with bounds derived from how the
quantizer rounds (each test states its bound).

Notation: W (N, K) the float weight, s (K,) the stored smooth factor, U (N, R) / D (K, R) the stored
proj_up / proj_down, L = U·Dᵀ, Q (N, K) = code·scale the dequantized residual (smoothed space), so the
stored layer's dense weight is Ŵ = L + Q·diag(1/s). u = 2⁻⁸ (bf16 unit roundoff), e = 2⁻²⁴ (fp32).
"""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from arch_fixtures import ARCHS, comfy_float_state_dict, tiny_config, w4a4_reference
from comfy.quant_tools import cli, quantizer
from comfy.quant.errors import QuantFileError, QuantizeInputError
from comfy.quant_tools.quantizer import (QuantizeOptions, layer_configs, quantize_file, quantize_state_dict,
                                   quantize_svdquant, record_activation_stats)
from reference import UNSIGNED_SHIFT, awq_weight, svdquant_residual, unpack_nibbles

RANK = 32
OPTS = QuantizeOptions(rank=RANK)
U = 2.0 ** -8     # bf16 unit roundoff (8 significant bits, round to nearest)
E = 2.0 ** -24    # fp32 unit roundoff
W4A4_KEYS = ("weight", "weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor")
AWQ_KEYS = ("weight", "weight_scale", "weight_zeros")


# ============================================================================ expected tables (nunchaku-format §5)

def _w4a4(unsigned=False, **extra):
    return {"format": "svdquant_w4a4", "group_size": 64, "rank": RANK, "act_unsigned": unsigned, **extra}


AWQ_JSON = {"format": "awq_w4a16", "group_size": 64}


def expected_layers(arch: str) -> dict:
    """{ComfyUI layer: its comfy_quant JSON} of every int4 layer the quantizer must write."""
    cfg = tiny_config(arch)
    if arch == "zimage":   # layers.N only: refiners (skip_refiners) and adaLN_modulation stay float; no AWQ
        return {f"layers.{i}.{m}": _w4a4() for i in range(cfg.n_layers)
                for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                          "feed_forward.w3")}
    out = {}
    for i in range(cfg.depth):
        for st in ("img", "txt"):
            p = f"double_blocks.{i}.{st}"
            out.update({f"{p}_mod.lin": AWQ_JSON, f"{p}_attn.qkv": _w4a4(), f"{p}_attn.proj": _w4a4(),
                        f"{p}_mlp.0": _w4a4(), f"{p}_mlp.2": _w4a4(True)})
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        out.update({f"{p}.modulation.lin": AWQ_JSON, f"{p}.linear1": _w4a4(),
                    f"{p}.linear2": _w4a4([False, True], in_splits=[cfg.hidden_size, cfg.mlp_hidden])})
    return out


def expected_share_groups(arch: str) -> list:
    """Layers quantized jointly (one input: one smooth factor and proj_down)."""
    if arch == "zimage":
        return [(f"layers.{i}.feed_forward.w3", f"layers.{i}.feed_forward.w1")
                for i in range(tiny_config(arch).n_layers)]
    return []


def groups_of(arch: str) -> list:
    """Every W4A4 unit: share groups and single layers."""
    grouped = {m for g in expected_share_groups(arch) for m in g}
    singles = [(name,) for name, conf in expected_layers(arch).items()
               if conf["format"] == "svdquant_w4a4" and name not in grouped]
    return expected_share_groups(arch) + singles


# ============================================================================ fixtures and helpers

def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@pytest.fixture(scope="module", params=ARCHS)
def quantized(request, tmp_path_factory):
    arch = request.param
    sd = comfy_float_state_dict(arch)
    d = tmp_path_factory.mktemp(arch)
    src, dst = d / "bf16.safetensors", d / "int4.safetensors"
    save_file(sd, str(src))
    counts = quantize_file(src, dst, OPTS, progress=False)
    out, meta = _read(dst)
    return SimpleNamespace(arch=arch, cfg=tiny_config(arch), float=sd, out=out, meta=meta, counts=counts,
                           src=src, dst=dst)


def tensors_of(out: dict, layer: str) -> dict:
    return {k[len(layer) + 1:]: v for k, v in out.items() if k.startswith(layer + ".") and k != f"{layer}.comfy_quant"}


def conf_of(out: dict, layer: str) -> dict:
    return layer_configs({f"{layer}.comfy_quant": out[f"{layer}.comfy_quant"]})[layer]


def unsigned_columns(conf: dict, k: int) -> torch.Tensor:
    """(K,) bool: the input columns whose activations the layer reads unsigned."""
    au = conf["act_unsigned"]
    if "in_splits" not in conf:
        return torch.full((k,), bool(au))
    return torch.cat([torch.full((w,), bool(f)) for w, f in zip(conf["in_splits"], au)])


def w4a4_parts(t: dict):
    """float64 (L, Q, s, |U|·|D|ᵀ) of a stored W4A4 layer."""
    up, down = t["weight_proj_up"].double(), t["weight_proj_down"].double()
    return up @ down.t(), svdquant_residual(t), t["weight_smooth_factor"].double(), up.abs() @ down.abs().t()


def w4a4_weight_bound(t: dict, w: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of |W − Ŵ| for a W4A4 layer the quantizer wrote.

    The quantizer computes the residual R = (W − L)·s in fp32 from the STORED (already bf16-rounded) U, D
    and s, so the factors' rounding is not an error of Ŵ: it moves into R. R's fp32 evaluation is off by
    ≤ e·s·((R+2)·|U||D|ᵀ + 2·|W − L|) (rank-R dot product, subtraction, product by s). The codes round
    R/scale to nearest (fp32 division: ≤ 8e·scale more) and clamp to ±7, which loses at most
    7·scale·u < scale/2 because scale = bf16(absmax/7) ≥ (absmax/7)·(1 − u). So per element
    |(W − Ŵ)·s| ≤ scale/2·(1 + 16e) + e·s·((R+2)·|U||D|ᵀ + 2|W − L|), divided by s here."""
    low, _, s, lowmag = w4a4_parts(t)
    step = t["weight_scale"].double().t().repeat_interleave(64, dim=1)
    rank = t["weight_proj_up"].shape[1]
    smoothed = step / 2 * (1 + 16 * E) + E * s * ((rank + 2) * lowmag + 2 * (w - low).abs())
    return smoothed / s + 1e-12 * w.abs().max()


def awq_weight_bound(t: dict, w: torch.Tensor, group: int = 64) -> torch.Tensor:
    """Elementwise bound of |W − Ŵ| for an AWQ layer: the grid zeros + (c − 8)·scale, c in 0..15, spans
    [lo + δz, lo + δz + 15·scale] with δz = zeros − (lo + 8·scale) (bf16 rounding: ≤ u|zeros| + fp32
    e·(|lo| + 8·scale)) and 15·scale within 15u·scale of hi − lo, so every weight of the group is within
    scale/2 of a grid point or within |δz| + 15u·scale of an end: |W − Ŵ| ≤ scale·(1/2 + 16u) + u·|zeros|
    + e·(group absmax + 16·scale)."""
    n, k = w.shape
    step = t["weight_scale"].double().t().repeat_interleave(group, dim=1)
    zeros = t["weight_zeros"].double().t().repeat_interleave(group, dim=1)
    gmax = w.abs().view(n, k // group, group).amax(-1).repeat_interleave(group, dim=1)
    return step * (0.5 + 16 * U) + U * zeros.abs() + E * (gmax + 16 * step)


# ============================================================================ the layers written

def test_exactly_the_expected_int4_layers_and_float_passthrough(quantized):
    q, expected = quantized, expected_layers(quantized.arch)
    assert layer_configs(q.out) == expected
    header = json.loads(q.meta["_quantization_metadata"])
    assert header == {"format_version": "1.0", "layers": expected}

    keys, quantized_inputs = set(), set()
    for layer, conf in expected.items():
        slots = W4A4_KEYS if conf["format"] == "svdquant_w4a4" else AWQ_KEYS
        keys |= {f"{layer}.{s}" for s in slots} | {f"{layer}.comfy_quant"}
        quantized_inputs |= {f"{layer}.weight", f"{layer}.bias"}
        if f"{layer}.bias" in q.float:
            keys.add(f"{layer}.bias")
    passthrough = [k for k in q.float if k not in quantized_inputs]
    assert set(q.out) == keys | set(passthrough)
    for key in passthrough:   # bit-identical, same dtype
        assert q.out[key].dtype == q.float[key].dtype and torch.equal(q.out[key], q.float[key]), key
    assert q.counts == {"svdquant_w4a4": sum(c["format"] == "svdquant_w4a4" for c in expected.values()),
                        "awq_w4a16": sum(c["format"] == "awq_w4a16" for c in expected.values()),
                        "float": len(passthrough)}

    if q.arch == "zimage":   # what stays float, explicitly: the refiners (all of them) and adaLN_modulation
        for p in ("noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"):
            for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
                assert f"{p}.{m}.weight" in passthrough and f"{p}.{m}.comfy_quant" not in q.out
        assert "layers.0.adaLN_modulation.0.weight" in passthrough
        assert "noise_refiner.0.adaLN_modulation.0.weight" in passthrough
    else:
        assert "final_layer.adaLN_modulation.1.weight" in passthrough and "img_in.weight" in passthrough


def test_stored_shapes_and_dtypes(quantized):
    q = quantized
    for layer, conf in expected_layers(q.arch).items():
        t, (n, k) = tensors_of(q.out, layer), q.float[f"{layer}.weight"].shape
        assert t["weight"].dtype == torch.int8 and tuple(t["weight"].shape) == (n, k // 2), layer
        assert tuple(t["weight_scale"].shape) == (k // 64, n) and t["weight_scale"].dtype == torch.bfloat16
        if conf["format"] == "svdquant_w4a4":
            assert tuple(t["weight_proj_down"].shape) == (k, RANK) and tuple(t["weight_proj_up"].shape) == (n, RANK)
            assert tuple(t["weight_smooth_factor"].shape) == (k,)
            assert all(t[s].dtype == torch.bfloat16 for s in W4A4_KEYS[1:])
            codes = unpack_nibbles(t["weight"], signed=True)
            assert int(codes.min()) >= -7 and int(codes.max()) <= 7, f"{layer}: symmetric codes, never -8"
        else:
            assert tuple(t["weight_zeros"].shape) == (k // 64, n) and t["weight_zeros"].dtype == torch.bfloat16
        if f"{layer}.bias" in q.float:
            assert t["bias"].dtype == torch.bfloat16 and tuple(t["bias"].shape) == (n,)


def test_share_groups_share_smooth_and_proj_down_and_nothing_else_does(quantized):
    q = quantized
    downs = {}
    for group in groups_of(q.arch):
        first = tensors_of(q.out, group[0])
        for m in group[1:]:
            t = tensors_of(q.out, m)
            assert torch.equal(t["weight_proj_down"], first["weight_proj_down"]), m
            assert torch.equal(t["weight_smooth_factor"], first["weight_smooth_factor"]), m
            assert not torch.equal(t["weight_proj_up"], first["weight_proj_up"]), m
        downs[group] = first["weight_proj_down"]
    groups = list(downs)
    for i, a in enumerate(groups):   # separate units share nothing
        for b in groups[i + 1:]:
            assert downs[a].shape != downs[b].shape or not torch.equal(downs[a], downs[b]), (a, b)
    if q.arch == "zimage":
        assert groups[:2] == [("layers.0.feed_forward.w3", "layers.0.feed_forward.w1"),
                              ("layers.1.feed_forward.w3", "layers.1.feed_forward.w1")]


def test_low_rank_branch_is_the_groups_joint_best_rank_r(quantized):
    """Without calibration s = 1, so L = U·Dᵀ over a group's stacked rows (and, for linear2, over the whole
    K of both input segments: one rank-R branch, not one per segment) must be the best rank-R
    approximation of the stacked W (Eckart–Young): τ ≤ ‖W − L‖_F ≤ τ + ‖ΔL‖_F with τ² = Σ_{i>R} σ_i²(W).
    ΔL is the bf16 rounding of the factors, |ΔU| ≤ u'|U|, |ΔD| ≤ u'|D| elementwise (u' = u/(1 − u), U, D
    the stored ones), so ‖ΔL‖_F ≤ u'(‖U‖_F‖D‖₂ + ‖U‖₂‖D‖_F) + u'²‖U‖_F‖D‖_F; plus 1e-5·‖W‖_F for the fp32
    SVD itself. The members' own best branches (their tails summed) are a different, smaller optimum."""
    q = quantized
    u1 = U / (1 - U)
    for group in groups_of(q.arch):
        w = torch.cat([q.float[f"{m}.weight"].double() for m in group])
        up = torch.cat([tensors_of(q.out, m)["weight_proj_up"].double() for m in group])
        down = tensors_of(q.out, group[0])["weight_proj_down"].double()
        assert torch.equal(tensors_of(q.out, group[0])["weight_smooth_factor"].float(), torch.ones(w.shape[1]))
        tail = float(torch.linalg.svdvals(w)[RANK:].pow(2).sum().sqrt())
        got = float((w - up @ down.t()).norm())
        fro, two = (lambda a: float(a.norm())), (lambda a: float(torch.linalg.matrix_norm(a, 2)))
        rounding = u1 * (fro(up) * two(down) + two(up) * fro(down)) + u1 ** 2 * fro(up) * fro(down)
        assert tail * (1 - 1e-9) <= got <= tail + rounding + 1e-5 * fro(w), (group, got, tail, rounding)
        if len(group) > 1:
            own = sum(float(torch.linalg.svdvals(q.float[f"{m}.weight"].double())[RANK:].pow(2).sum()) for m in group)
            assert own < tail ** 2 * 0.99


# ============================================================================ dequantized weights

def test_w4a4_layers_dequantize_within_the_rounding_bound(quantized):
    q = quantized
    for layer, conf in expected_layers(q.arch).items():
        if conf["format"] != "svdquant_w4a4":
            continue
        t, w = tensors_of(q.out, layer), q.float[f"{layer}.weight"].double()
        low, res, s, _ = w4a4_parts(t)
        err = (w - (low + res / s)).abs()
        bound = w4a4_weight_bound(t, w)
        assert bool((err <= bound).all()), (layer, float((err / bound).max()))
        # and not vacuous: the bound is about half a quantization step, the error a small part of W
        assert float((err.norm() / w.norm())) < 0.1, layer


def test_awq_layers_dequantize_within_the_rounding_bound_in_planar_order(quantized):
    q = quantized
    awq = [layer for layer, conf in expected_layers(q.arch).items() if conf["format"] == "awq_w4a16"]
    assert (q.arch == "flux") == bool(awq)
    for layer in awq:   # an output interleave (Nunchaku's S = 6 / 3) would put rows far outside the bound
        t, w = tensors_of(q.out, layer), q.float[f"{layer}.weight"].double()
        err = (awq_weight(t, 64) - w).abs()
        assert bool((err <= awq_weight_bound(t, w)).all()), (layer, float(err.max()))
        assert torch.equal(t["bias"], q.float[f"{layer}.bias"]), f"{layer}: bias as is (no '+1' folded)"


# ============================================================================ forward of the stored layers

def layer_input(conf: dict, m: int, k: int, seed: int) -> torch.Tensor:
    """Activations of the right kind: N(0, 1) where the layer reads signed input, GELU-tanh(2·N(0, 1))
    (≥ −0.17, what follows the MLP's GELU) on its unsigned columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    gelu = torch.nn.functional.gelu(2 * torch.randn(m, k, generator=g), approximate="tanh")
    return torch.where(unsigned_columns(conf, k), gelu, x).to(torch.bfloat16).float()


def forward_bound(x: torch.Tensor, t: dict, conf: dict, w: torch.Tensor, b):
    """Elementwise bound of |y_stored − y_float|, y_float = x·Wᵀ + b, y_stored = w4a4_reference (fp32
    activation quantization, as the kernel).

    With x_m = x + 0.171875 on the unsigned columns, a the dequantized activation codes and Ŵ = L + Q/s:
      y_stored − y_float = (a − x_m/s)·Qᵀ − x·(W − Ŵ)ᵀ + (b_stored − b_c),   b_c = b − Σ_k 0.171875_k·Q[n,k]/s_k
    (the identity x·Ŵᵀ = x·Lᵀ + (x/s)·Qᵀ is exact; the shift's Σ_k 0.171875·Q/s is what b_c removes).
    Per (row, 64-group) the activation scale is absmax(x_m/s)/q (q = 7 signed, 15 unsigned), so
    |a − x_m/s| ≤ scale/2·(1 + 32e) + 3e·|x_m/s| (fp32 shift, division, rounding). The weight term uses
    ``w4a4_weight_bound``; the bias term is measured from the stored tensors (its own bound is
    test_linear2_bias_compensation_is_exact)."""
    k = x.shape[1]
    cols = unsigned_columns(conf, k)
    _, res, s, _ = w4a4_parts(t)
    xm = (x.double() + UNSIGNED_SHIFT * cols) / s
    qmax = torch.where(cols, 15.0, 7.0).double()
    ascale = xm.abs().view(-1, k // 64, 64).amax(-1).repeat_interleave(64, dim=1) / qmax
    act_err = ascale / 2 * (1 + 32 * E) + 3 * E * xm.abs()
    bias_c = (0 if b is None else b.double()) - ((UNSIGNED_SHIFT * cols) * res / s).sum(1)
    bias_err = 0 if b is None else (t["bias"].double() - bias_c).abs()
    return act_err @ res.abs().t() + x.double().abs() @ w4a4_weight_bound(t, w).t() + bias_err


def rounding_sigma(x: torch.Tensor, t: dict, conf: dict) -> torch.Tensor:
    """The standard deviation of y_stored − y_float if every rounding were an independent uniform error:
    activation errors ~ U(±ascale/2) meet Q, weight errors ~ U(±scale/(2s)) meet x, so
    σ² = Σ_k ascale²/12·Q[n,k]² + Σ_k x_k²·(scale/s_k)²/12."""
    k = x.shape[1]
    cols = unsigned_columns(conf, k)
    _, res, s, _ = w4a4_parts(t)
    xm = (x.double() + UNSIGNED_SHIFT * cols) / s
    ascale = xm.abs().view(-1, k // 64, 64).amax(-1).repeat_interleave(64, dim=1) / torch.where(cols, 15.0, 7.0)
    step = t["weight_scale"].double().t().repeat_interleave(64, dim=1)
    return ((ascale ** 2 / 12) @ (res ** 2).t() + (x.double() ** 2) @ ((step / s) ** 2 / 12).t()).sqrt()


def test_w4a4_forward_of_stored_layers_is_within_the_derived_bound(quantized):
    """Per layer, 64 tokens: |y_stored − y_float| within ``forward_bound`` everywhere (worst case: it adds
    every rounding's magnitude, so it is ~10× the error seen), and, sharper, the error's RMS in units of
    ``rounding_sigma`` is 1 ± 0.15 (what independent round-to-nearest errors give; observed 0.98–1.02),
    with no element beyond 6.5σ. A wrong segment signedness, bias or scale shows up in the second check."""
    q = quantized
    for i, (layer, conf) in enumerate(expected_layers(q.arch).items()):
        if conf["format"] != "svdquant_w4a4":
            continue
        t, w = tensors_of(q.out, layer), q.float[f"{layer}.weight"].double()
        b = q.float.get(f"{layer}.bias")
        x = layer_input(conf, 64, w.shape[1], seed=i)
        y, mag = w4a4_reference(x, t, conf, torch.float32)
        y_float = x.double() @ w.t() + (0 if b is None else b.double())
        err, bound = (y - y_float).abs(), forward_bound(x, t, conf, w, b) + 1e-12 * mag
        assert bool((err <= bound).all()), (layer, float((err / bound).max()))
        z = err / rounding_sigma(x, t, conf)
        rms = float(z.pow(2).mean().sqrt())
        assert 0.85 <= rms <= 1.15 and float(z.max()) < 6.5, (layer, rms, float(z.max()))
        assert float(err.norm() / y_float.norm()) < 0.1, layer   # 4-bit weights and activations, still close


@pytest.mark.parametrize("quantized", ["flux"], indirect=True)
def test_linear2_needs_its_split_signedness(quantized):
    """The same stored linear2 read with ONE signedness for the whole input is measurably worse than its
    rounding σ: all signed, the GELU half loses a bit of grid and the bias's shift compensation is not
    added back (observed RMS ≈ 1.33σ); all unsigned, the signed attention half is clamped at −0.171875
    (≈ 2.1σ). Read as written (per-segment signedness): 1σ."""
    q = quantized
    for i in range(q.cfg.depth_single_blocks):
        layer = f"single_blocks.{i}.linear2"
        t, conf, w = tensors_of(q.out, layer), conf_of(q.out, layer), q.float[f"{layer}.weight"].double()
        x = layer_input(conf, 64, w.shape[1], seed=100 + i)
        y_float = x.double() @ w.t() + q.float[f"{layer}.bias"].double()
        sigma = rounding_sigma(x, t, conf)

        def rms(c):
            y, _ = w4a4_reference(x, t, c, torch.float32)
            return float(((y - y_float) / sigma).pow(2).mean().sqrt())

        assert rms(conf) <= 1.15
        for single in (False, True):
            wrong = {k: v for k, v in conf.items() if k != "in_splits"} | {"act_unsigned": single}
            assert rms(wrong) >= 1.25, (layer, single, rms(wrong))


@pytest.mark.parametrize("quantized", ["flux"], indirect=True)
def test_stored_layers_load_and_run_as_the_runtime_reads_them(quantized):
    """One layer at a time (no model): every int4 layer of the Flux file loads through
    ``comfy.ops.mixed_precision_ops`` (nothing missing, nothing left over) and its kitchen forward in fp32
    agrees with ``w4a4_reference`` / ``awq_forward`` of the stored tensors within reference.py's kernel
    bounds (``w4a4_split_tolerance`` for linear2's two segments): the runtime reads the representation the
    quantizer writes, K-split included."""
    import comfy.ops
    from comfy.quant import kernels
    from comfy.quant.formats import format_of
    from reference import awq_forward, kernel_tolerance, w4a4_split_tolerance

    q = quantized
    for i, (layer, conf) in enumerate(expected_layers(q.arch).items()):
        t = {k: v.float() if v.is_floating_point() else v for k, v in tensors_of(q.out, layer).items()}
        n, k = q.float[f"{layer}.weight"].shape
        lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(k, n, bias="bias" in t)
        sd = {f"{layer}.{key}": v for key, v in t.items()} | {f"{layer}.comfy_quant": q.out[f"{layer}.comfy_quant"]}
        missing, unexpected = [], []
        lin._load_from_state_dict(sd, layer + ".", {}, True, missing, unexpected, [])
        assert not missing and not sd, (layer, missing, list(sd))
        assert format_of(lin.weight).name == conf["format"], layer
        x = layer_input(conf if conf["format"] == "svdquant_w4a4" else {"act_unsigned": False}, 5, k, seed=i)
        with torch.no_grad(), kernels.forced("kitchen"):
            y = lin(x).double()
        if conf["format"] == "svdquant_w4a4":
            ref, mag = w4a4_reference(x, t, conf, torch.float32)
            tol = (w4a4_split_tolerance(mag, torch.float32, k, len(conf["in_splits"])) if "in_splits" in conf
                   else kernel_tolerance(mag, torch.float32, k))
        else:
            ref, mag = awq_forward(x, t, 64, t.get("bias"))
            tol = kernel_tolerance(mag, torch.float32, k)
        assert bool(((y - ref).abs() <= tol).all()), (layer, float(((y - ref).abs() / tol).max()))


# ============================================================================ linear2's bias

def _linear2_compensation(t, b, dim):
    """(b_c, the fp32 error bound of computing it) from the stored tensors: b_c = b − 0.171875·Σ_{k ≥ dim}
    Q[n,k]/s_k, the unsigned (MLP) columns only."""
    _, res, s, _ = w4a4_parts(t)
    terms = res[:, dim:] / s[dim:]
    k_u = terms.shape[1]
    bc = b.double() - UNSIGNED_SHIFT * terms.sum(1)
    # fp32: Q/s rounds (e), the K_u-term sum (K_u·e), the product by 0.171875 and the subtraction (e each)
    fp32 = E * (k_u + 4) * (b.double().abs() + UNSIGNED_SHIFT * terms.abs().sum(1))
    return bc, fp32, res, s


@pytest.mark.parametrize("quantized", ["flux"], indirect=True)
def test_linear2_bias_compensation_is_exact(quantized):
    """Checked from the stored tensors: linear2's bias is b − 0.171875·Σ_{k ≥ dim} Q[n,k]/s_k, the sum over
    the unsigned MLP columns only — in the bf16 file to the bias's own bf16 rounding (≤ u·|b_c|) plus
    the fp32 evaluation bound, and when quantized in fp32 to that fp32 bound alone (the fp32 sum of
    K_u terms: exact up to summation order). Compensating over the whole K, or not at all, misses it by
    orders of magnitude more."""
    q, dim = quantized, quantized.cfg.hidden_size
    for i in range(q.cfg.depth_single_blocks):
        layer = f"single_blocks.{i}.linear2"
        t, b = tensors_of(q.out, layer), q.float[f"{layer}.bias"]
        bc, fp32, res, s = _linear2_compensation(t, b, dim)
        stored = t["bias"].double()
        bound = U * bc.abs() + fp32
        assert bool(((stored - bc).abs() <= bound).all()), (layer, float(((stored - bc).abs() / bound).max()))
        whole_k = b.double() - UNSIGNED_SHIFT * (res / s).sum(1)
        for wrong in (whole_k, b.double()):
            assert float((stored - wrong).abs().max()) > 20 * float(bound.max())

    layer = "single_blocks.0.linear2"   # fp32 storage: nothing but the fp32 sum
    w, b = q.float[f"{layer}.weight"], q.float[f"{layer}.bias"]
    (t,) = quantize_svdquant([w], [b], act_unsigned=[False, True], in_splits=[dim, w.shape[1] - dim],
                             options=QuantizeOptions(rank=RANK, dtype=torch.float32))
    bc, fp32, _, _ = _linear2_compensation(t, b, dim)
    assert t["bias"].dtype == torch.float32
    assert bool(((t["bias"].double() - bc).abs() <= fp32).all())


@pytest.mark.parametrize("quantized", ["flux"], indirect=True)
def test_unsigned_whole_layers_compensate_over_all_columns(quantized):
    """Flux double blocks' img_mlp.2 / txt_mlp.2 (act_unsigned true, no split): b − 0.171875·Σ_k Q/s over
    every column, to u·|b_c| + the fp32 bound."""
    q = quantized
    for layer in ("double_blocks.0.img_mlp.2", "double_blocks.1.txt_mlp.2"):
        t, b = tensors_of(q.out, layer), q.float[f"{layer}.bias"]
        bc, fp32, _, _ = _linear2_compensation(t, b, 0)
        assert bool(((t["bias"].double() - bc).abs() <= U * bc.abs() + fp32).all()), layer


# ============================================================================ streaming, calibration, CLI

def test_streamed_file_equals_in_memory_quantization(quantized):
    q = quantized
    mem, meta = quantize_state_dict(dict(q.float), OPTS, progress=False)
    assert set(mem) == set(q.out)
    for key, v in mem.items():
        assert v.dtype == q.out[key].dtype and torch.equal(v, q.out[key]), key
    assert json.loads(meta["_quantization_metadata"]) == json.loads(q.meta["_quantization_metadata"])


def _calibration(arch, seed=3):
    """Input absmax (K,) for every W4A4 layer, in [0.5, 3.5), a few outlier channels × 8."""
    g = torch.Generator().manual_seed(seed)
    sd = comfy_float_state_dict(arch)
    out = {}
    for layer, conf in expected_layers(arch).items():
        if conf["format"] == "svdquant_w4a4":
            k = sd[f"{layer}.weight"].shape[1]
            a = torch.rand(k, generator=g) * 3 + 0.5
            a[torch.randint(0, k, (k // 64,), generator=g)] *= 8
            out[layer] = a
    return out


def _expected_smooth(a, w, unsigned_cols, alpha=0.5):
    """s_k = (a_k + 0.171875·[k unsigned])^α / max(colabsmax W, 1e-6)^(1−α), clamped to [1e-4, 1e4] (float64)."""
    a = a.double() + UNSIGNED_SHIFT * unsigned_cols
    wmax = w.double().abs().amax(0).clamp_min(1e-6)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-4, 1e4)


def test_calibration_smooths_each_input_segment_with_its_own_signedness():
    """Flux linear2: the attention columns are smoothed from a, the MLP columns from a + 0.171875 (the
    kernel quantizes x + 0.171875 there); within bf16 rounding of s (≤ u relative, plus fp32 e's)."""
    arch, cfg = "flux", tiny_config("flux")
    cal, sd = _calibration(arch), comfy_float_state_dict(arch)
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] in cal}   # just the W4A4 layers (a partial dict)
    out, _ = quantize_state_dict(dict(sd), OPTS, calibration=cal, progress=False)
    for layer, conf in expected_layers(arch).items():
        if conf["format"] != "svdquant_w4a4":
            continue
        w = sd[f"{layer}.weight"]
        cols = unsigned_columns(conf, w.shape[1])
        want = _expected_smooth(cal[layer], w, cols)
        got = out[f"{layer}.weight_smooth_factor"].double()
        assert bool(((got - want).abs() <= (U + 8 * E) * want).all()), layer
        if layer.endswith("linear2"):   # the shift only on the MLP half: the all-signed rule misses that half
            signed = _expected_smooth(cal[layer], w, torch.zeros_like(cols))
            d = cfg.hidden_size
            assert torch.allclose(got[:d], signed[:d], rtol=2 * U, atol=0)
            apart = (want[d:] - signed[d:]).abs() > 4 * U * signed[d:]   # all but the ×8 outlier channels
            assert float(apart.double().mean()) > 0.9
            assert bool(((got[d:] - signed[d:]).abs() > 2 * U * signed[d:])[apart].all())


def test_calibration_reaches_a_share_group_under_any_members_name():
    """Z-Image w3 + w1 read one input: a calibration entry under either name smooths both (one factor)."""
    arch = "zimage"
    sd, cal = comfy_float_state_dict(arch), _calibration(arch)
    only_w1 = {k: v for k, v in cal.items() if not k.endswith("feed_forward.w3")}
    ffn = {k: v for k, v in sd.items() if k.startswith("layers.") and ".feed_forward.w" in k}
    out, _ = quantize_state_dict(ffn, OPTS, calibration=only_w1, progress=False)
    for i in range(tiny_config(arch).n_layers):
        w3, w1 = f"layers.{i}.feed_forward.w3", f"layers.{i}.feed_forward.w1"
        w = torch.cat([sd[f"{w3}.weight"], sd[f"{w1}.weight"]])
        want = _expected_smooth(cal[w1], w, torch.zeros(w.shape[1], dtype=torch.bool))
        for m in (w3, w1):
            got = out[f"{m}.weight_smooth_factor"].double()
            assert bool(((got - want).abs() <= (U + 8 * E) * want).all()), m


def test_calibration_that_does_not_fit_is_refused_naming_the_entry(tmp_path):
    sd = comfy_float_state_dict("flux")
    src = tmp_path / "bf16.safetensors"
    save_file(sd, str(src))
    cal = _calibration("flux")
    cal["single_blocks.0.linear2"] = cal["single_blocks.0.linear2"][:256]
    with pytest.raises(QuantizeInputError, match=r"calibration entry 'single_blocks\.0\.linear2': expected finite "
                                                 r"float input absmax of shape \[1280\]"):
        quantize_file(src, tmp_path / "int4.safetensors", OPTS, calibration=cal, progress=False)
    with pytest.raises(QuantizeInputError,
                       match=r"W4A4 layers \(first entries: x\.y\); expected keys like double_blocks\.0\."):
        quantize_file(src, tmp_path / "int4.safetensors", OPTS, calibration={"x.y": torch.ones(4)}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.safetensors"]


def _module_tree(shapes: dict) -> torch.nn.Module:
    """A module whose named_modules are the float file's linears (paths as in ComfyUI's model)."""
    root = torch.nn.Module()
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        *heads, last = key[: -len(".weight")].split(".")
        parent = root
        for h in heads:
            if not hasattr(parent, h):
                parent.add_module(h, torch.nn.Module())
            parent = getattr(parent, h)
        parent.add_module(last, torch.nn.Linear(shape[1], shape[0], bias=False))
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_record_activation_stats_hooks_exactly_the_w4a4_layers(arch):
    shapes = {k: tuple(v.shape) for k, v in comfy_float_state_dict(arch).items()}
    model = _module_tree(shapes)
    g = torch.Generator().manual_seed(0)
    inputs = {p: torch.randn(3, m.in_features, generator=g) for p, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}

    def run():
        for p, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                m(inputs[p])

    stats = record_activation_stats(model, run)
    w4a4 = {layer for layer, conf in expected_layers(arch).items() if conf["format"] == "svdquant_w4a4"}
    assert set(stats) == w4a4   # not the refiners, adaLN, AWQ modulation or embedders
    for p, a in stats.items():
        assert torch.equal(a, inputs[p].abs().amax(0))
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())


@pytest.mark.parametrize("arch", ["flux"])   # the CLI is a thin layer over quantize_file (the fixture's)
def test_cli_quantize(arch, tmp_path, capsys):
    src, out = tmp_path / "bf16.safetensors", tmp_path / "int4.safetensors"
    save_file(comfy_float_state_dict(arch), str(src))
    assert cli.main(["quantize", "--rank", str(RANK), str(src), str(out)]) == 0, capsys.readouterr().err
    tensors, _ = _read(out)
    assert layer_configs(tensors) == expected_layers(arch)


# ============================================================================ refusals, before any work

def _variant(arch, drop=(), **changes):
    sd = comfy_float_state_dict(arch)
    sd = {k: v for k, v in sd.items() if k not in drop}
    return {**sd, **changes}


def _rename(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


def _refusal(name):
    zsd, fsd = comfy_float_state_dict("zimage"), comfy_float_state_dict("flux")
    f8 = fsd["single_blocks.0.linear2.weight"].to(torch.float8_e4m3fn)
    return {
        "zimage no w1": (_variant("zimage", drop=("layers.1.feed_forward.w1.weight",)),
                         "layers.1: joint w3/w1 quantization needs ['layers.1.feed_forward.w1'] (no tensor "
                         "'layers.1.feed_forward.w1.weight' in the file)",
                         "layers.1.feed_forward.w1.weight"),
        "zimage no w3": (_variant("zimage", drop=("layers.0.feed_forward.w3.weight",)),
                         "layers.0: joint w3/w1 quantization needs ['layers.0.feed_forward.w3']",
                         "layers.0.feed_forward.w3.weight"),
        "zimage int8 w3": (_variant("zimage", **{"layers.0.feed_forward.w3.weight":
                                                 zsd["layers.0.feed_forward.w3.weight"].to(torch.int8)}),
                           "tensor 'layers.0.feed_forward.w3.weight' is I8; quantize needs float linear weights",
                           "layers.0.feed_forward.w3.weight"),
        "zimage w1 width": (_variant("zimage", **{"layers.1.feed_forward.w1.weight":
                                                  zsd["layers.1.feed_forward.w1.weight"][:, :320].contiguous()}),
                            "tensor 'layers.1.feed_forward.w1.weight': in_features 320, but "
                            "'layers.1.feed_forward.w3.weight' has 384; layers.1.feed_forward.w3, "
                            "layers.1.feed_forward.w1 are quantized together", "layers.1.feed_forward.w1.weight"),
        "flux fp8 linear2": (_variant("flux", **{"single_blocks.0.linear2.weight": f8}),
                             "tensor 'single_blocks.0.linear2.weight' is F8_E4M3", "single_blocks.0.linear2.weight"),
        "flux fp8 mod bias": (_variant("flux", **{"double_blocks.1.txt_mod.lin.bias":
                                                  fsd["double_blocks.1.txt_mod.lin.bias"].to(torch.float8_e4m3fn)}),
                              "tensor 'double_blocks.1.txt_mod.lin.bias' is F8_E4M3",
                              "double_blocks.1.txt_mod.lin.bias"),
        "flux no mlp.2 bias": (_variant("flux", drop=("double_blocks.1.img_mlp.2.bias",)),
                               "no tensor 'double_blocks.1.img_mlp.2.bias': double_blocks.1.img_mlp.2 reads unsigned",
                               "double_blocks.1.img_mlp.2.bias"),
        "flux linear2 split": (_variant("flux", **{"single_blocks.1.linear2.weight":
                                                   fsd["single_blocks.1.linear2.weight"][:224].contiguous(),
                                                   "single_blocks.1.linear2.bias":
                                                   fsd["single_blocks.1.linear2.bias"][:224].contiguous()}),
                               "tensor 'single_blocks.1.linear2.weight': its input splits into [224, 1056] "
                               "(attention+mlp), each must be a positive multiple of 64",
                               "single_blocks.1.linear2.weight"),
        "lumina2": (_rename(zsd, "adaLN_modulation.0", "adaLN_modulation.1"),
                    "not a Z-Image model: no layers.N.adaLN_modulation.0.weight", "layers.N.adaLN_modulation.0.weight"),
        "flux2": (_variant("flux", **{"double_stream_modulation_img.lin.weight": torch.zeros(8, 8)}),
                  "not a Flux model quantize supports: 'double_stream_modulation_img.lin.weight' belongs to another "
                  "model family", "double_stream_modulation_img.lin.weight"),
        "zimage prefixed": ({f"model.diffusion_model.{k}": v for k, v in zsd.items()},
                            "not a Z-Image diffusion model file: its keys carry the prefix 'model.diffusion_model.' "
                            "(quantize takes a diffusion_models file, keys starting layers.)", None),
        "flux prefixed": ({f"model.diffusion_model.{k}": v for k, v in fsd.items()},
                          "not a Flux diffusion model file: its keys carry the prefix 'model.diffusion_model.'", None),
        "unrelated": ({"down_blocks.0.weight": torch.zeros(8, 8)},
                      "not a supported architecture (Qwen-Image, Z-Image, Flux): none of "
                      "transformer_blocks.N.attn.to_q.weight (Qwen-Image), layers.N.attention.qkv.weight (Z-Image), "
                      "double_blocks.N.img_attn.qkv.weight (Flux)", None),
    }[name]


REFUSALS = ["zimage no w1", "zimage no w3", "zimage int8 w3", "zimage w1 width", "flux fp8 linear2",
            "flux fp8 mod bias", "flux no mlp.2 bias", "flux linear2 split", "lumina2", "flux2", "zimage prefixed",
            "flux prefixed", "unrelated"]


@pytest.mark.parametrize("name", REFUSALS)
def test_inputs_quantize_cannot_use_are_refused_naming_the_tensor(name, tmp_path, monkeypatch, capsys):
    sd, message, tensor = _refusal(name)
    src, out = tmp_path / "in.safetensors", tmp_path / "int4.safetensors"
    save_file(sd, str(src))

    def work(*_a, **_k):
        raise AssertionError("quantization started")

    monkeypatch.setattr(quantizer, "_write", work)
    with pytest.raises(QuantizeInputError) as info:
        quantize_file(src, out, OPTS, progress=False)
    e = info.value
    assert isinstance(e, QuantFileError) and e.file == str(src) and message in str(e), str(e)
    assert e.tensor == tensor
    if tensor is not None and "N." not in tensor:
        assert tensor in str(e)
    code = cli.main(["quantize", str(src), str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_in_memory_quantizer_refuses_a_missing_share_member():
    sd = _variant("zimage", drop=("layers.0.feed_forward.w1.weight",))
    with pytest.raises(QuantizeInputError, match=r"joint w3/w1 quantization needs \['layers\.0\.feed_forward\.w1'\]"):
        quantize_state_dict(sd, OPTS, progress=False)


def test_quantize_svdquant_refuses_inconsistent_splits():
    w = torch.randn(64, 320)
    for splits, flags in (([64, 192], [False, True]), ([64, 256], [True]), ([96, 224], [False, True])):
        with pytest.raises(ValueError, match="in_splits"):
            quantize_svdquant([w], [torch.zeros(64)], act_unsigned=flags, in_splits=splits)
    with pytest.raises(ValueError, match="needs a bias"):
        quantize_svdquant([w], [None], act_unsigned=[False, True], in_splits=[64, 256])
    with pytest.raises(ValueError, match="expected a bool"):
        quantize_svdquant([w], [None], act_unsigned=[False])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
