"""Helpers for ``test_lora_int4.py``: a tiny quantized Qwen-Image checkpoint, LoRA files in every
naming users bring, and float64 expectations written from the LoRA tensors alone (never from the
library's adapters or patch code).

Tolerance model (``delta_tolerance``) for ``y_patched − y_unpatched`` against the exact delta Δ:
a patch leaves an int4 layer's main path (codes, weight scales, smoothing, bias) untouched, so that part
is computed identically in both outputs and cancels; what remains is
  * the rounding of each output to the compute dtype: u·(|y_p| + |y_u|);
  * the delta's factors (Aᵀ, s·B, or a dense ΔW) stored in the compute dtype (≤ 2u relative per product
    term), plus an intermediate x·Aᵀ and the term's own output rounding (AWQ / dense output terms,
    ≤ 2u more): 4u·Σ|Δ terms|;
  * fp32 accumulation of every sum involved (k products + a few additions): (k+4)·2⁻²⁴·Σ|all terms|;
  * float targets only: W + ΔW stored back in the compute dtype: u·Σ|all terms|;
  * dense deltas applied as an SVD truncation of relative Frobenius error e: e·‖x_row‖₂·‖ΔW‖_F per element
    (Cauchy–Schwarz), e measured from the appended factors.
Σ|terms| comes from ``reference.svdquant_forward`` / ``awq_forward`` (base) and ``s·(|x||A|ᵀ)|B|ᵀ`` /
``|x||ΔW|ᵀ`` (delta). ``kernel_tolerance`` (the generic, looser bound of ``reference``) is used only where
a different kernel (CUDA) computes the outputs.
"""
from __future__ import annotations

import functools

import pytest
import torch

import comfy.ops
import comfy.sd
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.quant_tools.quantizer import QuantizeOptions, quantize_state_dict
from reference import awq_forward, svdquant_forward, unit_roundoff

HEADS, HEAD_DIM, TXT_DIM, IN_CH = 4, 64, 128, 64
INNER = HEADS * HEAD_DIM  # 256
NUM_LAYERS = 2
QUANT_RANK = 16


# ------------------------------------------------------------------------------- checkpoint
@functools.lru_cache(maxsize=None)
def _checkpoint():
    g = torch.Generator().manual_seed(1234)
    m = QwenImageTransformer2DModel(in_channels=IN_CH, num_layers=NUM_LAYERS, attention_head_dim=HEAD_DIM,
                                    num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                                    axes_dims_rope=(8, 28, 28), operations=comfy.ops.disable_weight_init,
                                    device="meta")
    sd = {}
    for k, v in m.state_dict().items():
        if v.ndim == 2:
            sd[k] = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
        elif k.endswith("bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.02
        else:
            sd[k] = torch.ones(v.shape) + 0.1 * torch.randn(v.shape, generator=g)
    q, meta = quantize_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()},
                                  QuantizeOptions(rank=QUANT_RANK), progress=False)
    return q, meta


def checkpoint():
    """A fresh copy (tensors cloned) of the tiny int4 Qwen-Image checkpoint and its metadata."""
    q, meta = _checkpoint()
    return {k: v.clone() for k, v in q.items()}, dict(meta)


def load_model(dtype=torch.float32):
    sd, meta = checkpoint()
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype}, metadata=meta)


# ------------------------------------------------------------------------------- LoRA files
def factors(n, k, r, seed, up_scale=0.3, down_scale=None):
    """LoRA up (N, r) and down (r, K), fp32."""
    g = torch.Generator().manual_seed(seed)
    down_scale = (1.0 / k ** 0.5) if down_scale is None else down_scale
    return torch.randn(n, r, generator=g) * up_scale, torch.randn(r, k, generator=g) * down_scale


def lora_keys(style, path):
    """(prefix, up suffix, down suffix) of a LoRA pair on module ``path`` in naming ``style``."""
    flat = path.replace(".", "_")
    return {
        "diffusers": ("transformer." + path, "lora_B.weight", "lora_A.weight"),
        "kohya": ("lora_unet_" + flat, "lora_up.weight", "lora_down.weight"),
        "comfy": ("diffusion_model." + path, "lora_up.weight", "lora_down.weight"),
        "lycoris": ("lycoris_" + flat, "lora_up.weight", "lora_down.weight"),  # LyCORIS LoCon (SimpleTuner)
    }[style]


def lora_sd(style, path, up, down, alpha=None):
    prefix, u, d = lora_keys(style, path)
    sd = {f"{prefix}.{u}": up, f"{prefix}.{d}": down}
    if alpha is not None:
        sd[prefix + ".alpha"] = torch.tensor(float(alpha))
    return sd


def loha_sd(path, w1a, w1b, w2a, w2b, alpha=None):
    x = "lycoris_" + path.replace(".", "_")
    sd = {x + ".hada_w1_a": w1a, x + ".hada_w1_b": w1b, x + ".hada_w2_a": w2a, x + ".hada_w2_b": w2b}
    if alpha is not None:
        sd[x + ".alpha"] = torch.tensor(float(alpha))
    return sd


def lokr_sd(path, w1, w2):
    x = "lycoris_" + path.replace(".", "_")
    return {x + ".lokr_w1": w1, x + ".lokr_w2": w2}


def module_of(mp, path):
    return mp.model.diffusion_model.get_submodule(path)


def lora_for(mp, paths, style="diffusers", r=4, alpha=None, seed=0):
    """A LoRA file with one pair per module path (shapes from ``mp``'s model), fp32, and
    ``{path: (up, down, alpha / r)}``."""
    sd, fac = {}, {}
    for i, p in enumerate(paths):
        mod = module_of(mp, p)
        up, down = factors(mod.out_features, mod.in_features, r, seed + 31 * i)
        sd.update(lora_sd(style, p, up, down, alpha))
        fac[p] = (up, down, 1.0 if alpha is None else alpha / r)
    return sd, fac


# one malformed or non-finite module per kind: what ``hostile_module`` builds, and a phrase of the refusal
HOSTILE = {
    "nan_factor": "1 NaN",  # lora_B holds one NaN
    "inf_factor": "2 Inf",  # lora_A holds +Inf and -Inf
    "huge_factor": "float32",  # finite factors whose product overflows float32
    "nan_alpha": "alpha is nan",
    "alpha_shape": "alpha has shape (2,)",  # alpha is not a scalar
    "zero_d_factor": "has shape ()",  # a 0-d lora_B
    "rank_mismatch": "rank 5 != 4",
    "loha_inconsistent": "differ in shape",  # hada_w1 and hada_w2 products of different shapes
    "loha_inf": "Inf",
    "lokr_inconsistent": "do not compose",  # lokr_w1_a @ lokr_w1_b ranks differ
    "lokr_nan": "NaN",
    "nan_diff": "NaN",  # a dense delta with a NaN
    "nan_dora": "NaN",  # a DoRA magnitude with a NaN
}


def _poisoned(t, value, at=((0, 0),)):
    t = t.clone()
    for i in at:
        t[i] = value
    return t


def hostile_module(kind, path, n, k, seed=0) -> dict:
    """LoRA keys of one module ``path`` (weight (n, k)) that no patcher may apply, of kind ``kind``
    (a key of ``HOSTILE``). Each is consistent except for the one fault its kind names."""
    up, down = factors(n, k, 4, seed)
    nan, inf = float("nan"), float("inf")
    if kind in ("nan_factor", "inf_factor", "huge_factor", "nan_alpha", "alpha_shape", "zero_d_factor"):
        sd = lora_sd("diffusers", path, up, down)
        prefix = lora_keys("diffusers", path)[0]
        if kind == "nan_factor":
            sd[prefix + ".lora_B.weight"] = _poisoned(up, nan)
        elif kind == "inf_factor":
            sd[prefix + ".lora_A.weight"] = _poisoned(_poisoned(down, inf), -inf, at=((1, 1),))
        elif kind == "huge_factor":
            sd[prefix + ".lora_B.weight"], sd[prefix + ".lora_A.weight"] = up * 1e30, down * 1e30
        elif kind == "nan_alpha":
            sd[prefix + ".alpha"] = torch.tensor(nan)
        elif kind == "alpha_shape":
            sd[prefix + ".alpha"] = torch.tensor([4.0, 4.0])
        else:
            sd[prefix + ".lora_B.weight"] = torch.tensor(0.5)
        return sd
    if kind == "rank_mismatch":
        return lora_sd("comfy", path, factors(n, k, 5, seed)[0], down)
    if kind == "nan_dora":
        sd = lora_sd("comfy", path, up, down, alpha=4.0)
        sd[f"diffusion_model.{path}.dora_scale"] = _poisoned(torch.ones(1, k), nan)
        return sd
    if kind == "nan_diff":
        return {f"diffusion_model.{path}.diff": _poisoned(torch.randn(n, k) * 0.01, nan)}
    if kind.startswith("loha"):
        w1a, w1b = factors(n, k, 2, seed)
        w2a, w2b = factors(n, k + (8 if kind == "loha_inconsistent" else 0), 2, seed + 1)
        return loha_sd(path, w1a, w1b, _poisoned(w2a, inf) if kind == "loha_inf" else w2a, w2b, alpha=2.0)
    a, b = 16, 4  # LoKr: w1 (16, 4) from w1_a @ w1_b, w2 (n/16, k/4)
    x = "lycoris_" + path.replace(".", "_")
    w1a, w1b = factors(a, b, 2, seed)
    w2 = factors(n // a, k // b, 1, seed + 1)[0] @ factors(n // a, k // b, 1, seed + 2)[1]
    if kind == "lokr_inconsistent":
        w1b = factors(a, b, 3, seed)[1]  # (3, 4) after a (16, 2) w1_a
    return {x + ".lokr_w1_a": w1a, x + ".lokr_w1_b": w1b, x + ".alpha": torch.tensor(2.0),
            x + ".lokr_w2": _poisoned(w2, nan) if kind == "lokr_nan" else w2}


def weight_key(path):
    """The model patcher's key of module ``path``'s weight."""
    return f"diffusion_model.{path}.weight"


@pytest.fixture
def no_grad():
    """Run a test under ``torch.no_grad()`` (use it as ``pytestmark = pytest.mark.usefixtures("no_grad")``
    after importing it into the test module)."""
    with torch.no_grad():
        yield


def model_state(mp):
    """A copy of every tensor of the model's state dict."""
    return {k: v.clone() for k, v in mp.model.state_dict().items()}


def assert_same_state(before, after):
    """Every tensor bit-exact: same keys, dtypes, shapes and values."""
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape, k
        assert torch.equal(before[k], after[k]), k


# ------------------------------------------------------------------------------ expectations
def lowrank_delta(x, up, down, s):
    """(s·(x Aᵀ)Bᵀ, Σ|terms|) in float64 from the LoRA tensors."""
    xd = x.reshape(-1, x.shape[-1]).double()
    d = s * ((xd @ down.double().t()) @ up.double().t())
    mag = abs(s) * ((xd.abs() @ down.double().abs().t()) @ up.double().abs().t())
    shape = (*x.shape[:-1], up.shape[0])
    return d.view(shape), mag.view(shape)


def dense_delta(x, dw):
    """(x ΔWᵀ, Σ|terms|) in float64."""
    xd = x.reshape(-1, x.shape[-1]).double()
    shape = (*x.shape[:-1], dw.shape[0])
    return (xd @ dw.double().t()).view(shape), (xd.abs() @ dw.double().abs().t()).view(shape)


def layer_tensors(module):
    """The layer's stored tensors under the canonical (unprefixed) names, as the reference wants."""
    return {k: v for k, v in module.state_dict().items()}


def base_magnitude(module, x, dtype):
    """Σ|terms| of the unpatched layer output for input ``x`` (float64)."""
    w = module.weight
    t = layer_tensors(module)
    fmt = getattr(w, "_layout_cls", None)
    if fmt == "TensorCoreSVDQuantW4A4Layout":
        return svdquant_forward(x, t, bool(w._params.act_unsigned), t.get("bias"), dtype)[1]
    if fmt == "TensorCoreAWQW4A16Layout":
        return awq_forward(x, t, int(w._params.group_size), t.get("bias"))[1]
    xd = x.reshape(-1, x.shape[-1]).double()
    mag = xd.abs() @ t["weight"].double().abs().t()
    if "bias" in t:
        mag = mag + t["bias"].double().abs()
    return mag.view(*x.shape[:-1], -1)


def delta_tolerance(y_p, y_u, mag_base, mag_delta, dtype, k, merged_weight=False, svd_term=None):
    """Bound on |(y_p − y_u) − Δ| (see the module docstring for the derivation)."""
    u = unit_roundoff(dtype)
    gamma = (k + 4) * 2.0 ** -24  # fp32 accumulation over k products + the few fp32 additions
    tol = (u * (y_p.double().abs() + y_u.double().abs()) + 4 * u * mag_delta
           + gamma * (mag_base + mag_delta))
    if merged_weight:  # a float weight W + ΔW stored back in the compute dtype
        tol = tol + u * (mag_base + mag_delta)
    if svd_term is not None:
        tol = tol + svd_term
    return tol + 1e-30


def svd_truncation_term(x, dw, rel_tol=1e-3):
    """Per-element bound of an SVD truncation with relative Frobenius error ``rel_tol`` (Cauchy–Schwarz)."""
    xn = x.reshape(-1, x.shape[-1]).double().norm(dim=-1, keepdim=True)
    return (rel_tol * float(dw.double().norm()) * xn).expand(-1, dw.shape[0]).reshape(*x.shape[:-1], dw.shape[0])


def assert_delta(got, expected, tol, discriminate=0.1, min_frac=0.5, what=""):
    """|got − expected| ≤ tol elementwise, and the bound is tight enough that a delta off by
    ``discriminate`` of itself would fail on more than ``min_frac`` of the elements."""
    err = (got.double() - expected).abs()
    ratio = err / tol
    assert bool((err <= tol).all()), (f"{what}: max err {float(err.max()):.3e}, worst err/tol "
                                      f"{float(ratio.max()):.3f}, |delta| max {float(expected.abs().max()):.3e}")
    if discriminate:
        frac = float(((discriminate * expected.abs()) > tol).double().mean())
        assert frac > min_frac, f"{what}: tolerance too loose to see a {discriminate:.0%} error ({frac:.2f} of elements)"


def rand_input(shape, dtype, seed, gelu=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if gelu:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype)

