"""Loading a Nunchaku int4 Qwen-Image checkpoint end to end (loader, nodes, LoRA, inspector, CLI).

The fake checkpoint (``nunchaku_fixtures.py``) is built from known NATURAL tensors: 2 blocks,
2 heads × 128 = dim 256, text dim 256, rank 32, in_channels 64, bf16; fused ``to_qkv`` /
``add_qkv_proj``; AWQ modulation with the 6-way interleave and the "+1" folded into the scale slots.
Its values are chosen so the conversion is exact (see the fixtures' docstring), hence the converted
model, the directly loaded model and a model written straight from the natural tensors in
ComfyUI-native layout must agree bit for bit.

Float references are float64 (``reference.py``). Notation: u = 2⁻²⁴ (fp32 unit roundoff);
``kernel_tolerance(mag, fp32, k) = 2·(4u + k·u)·mag`` bounds an fp32 kernel's error on an output whose
terms sum to ``mag = Σ|terms|`` (one rounding per operand, a k-term accumulation, the output/bias
roundings, doubled; see its docstring).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from safetensors.torch import load_file, save_file

import comfy.ops
import comfy.sd
import nunchaku_fixtures as F
import nunchaku_packer as P
from comfy.nodes import LoraLoaderModelOnly, UNETLoader
from comfy.quant import nunchaku as nk
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
from comfy.quant_tools.inspect_file import inspect_checkpoint
from factories import partial_files
from reference import awq_forward, kernel_tolerance, svdquant_forward

REPO = Path(__file__).resolve().parents[1]
FP32 = {"dtype": torch.float32}
U32 = 2.0 ** -24


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """These matrices are tiny; on a busy 2-core CPU torch's thread pool oversubscribes and the file
    takes ~60 s instead of ~8 s. One intra-op thread for this module, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def natural():
    return F.make_natural(seed=0)


@pytest.fixture(scope="module")
def files(natural, tmp_path_factory):
    """{"nunchaku": path, "converted": path} (converted with the library's file converter)."""
    d = tmp_path_factory.mktemp("nunchaku")
    sd, meta = F.to_nunchaku(natural)
    src = d / "svdq-int4_r32-tiny-qwen-image.safetensors"
    save_file(sd, str(src), metadata=meta)
    dst = d / "tiny-qwen-image-comfy-int4.safetensors"
    convert_nunchaku_file(str(src), str(dst), progress=False)
    return {"nunchaku": str(src), "converted": str(dst), "dir": d}


def model_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)          # 4×4 = 16 image tokens of 64 channels
    ctx = torch.randn(1, 7, F.TXT_DIM, generator=g)    # 7 text tokens
    t = torch.tensor([0.37])
    return x, t, ctx


def forward(patcher, inputs):
    with torch.no_grad():
        return patcher.model.diffusion_model(*inputs)


def loader_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("comfy")]


def decode_json(t):
    return json.loads(bytes(t.tolist()).decode("utf-8"))


# ------------------------------------------------------------------------------------ 1

def test_direct_load_equals_convert_then_load(files, caplog):
    """``load_diffusion_model(nunchaku file)`` (converted in memory) and ``convert_nunchaku_file`` followed by
    ``load_diffusion_model(converted file)`` give the same model: same state-dict keys, every tensor
    ``torch.equal`` (int4 codes, scales, side tensors, biases, float layers, comfy_quant JSON), and a
    bit-identical fp32 forward of the whole model. Neither load leaves missing/unexpected/left-over keys."""
    with caplog.at_level(logging.INFO):
        direct = comfy.sd.load_diffusion_model(files["nunchaku"], model_options=FP32)
        converted = comfy.sd.load_diffusion_model(files["converted"], model_options=FP32)
    assert not loader_warnings(caplog), loader_warnings(caplog)
    assert not [r for r in caplog.records if "left over keys" in r.getMessage()]

    sd_d = direct.model.diffusion_model.state_dict()
    sd_c = converted.model.diffusion_model.state_dict()
    assert sorted(sd_d) == sorted(sd_c)
    for key in sd_d:
        assert sd_d[key].dtype == sd_c[key].dtype and torch.equal(sd_d[key], sd_c[key]), key

    # the split layers are there, the fused Nunchaku names are not; all int4 layers are quantized
    dm = direct.model.diffusion_model
    blk = dm.transformer_blocks[0]
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert getattr(blk.attn, name).weight._layout_cls == "TensorCoreSVDQuantW4A4Layout", name
    assert blk.img_mod[1].weight._layout_cls == "TensorCoreAWQW4A16Layout"
    assert not any("qkv" in k for k in sd_d)
    assert blk.img_mlp.net[2].weight._params.act_unsigned and not blk.img_mlp.net[0].proj.weight._params.act_unsigned

    inputs = model_inputs()
    y_d, y_c = forward(direct, inputs), forward(converted, inputs)
    assert y_d.shape == (1, 16, 8, 8) and y_d.dtype == torch.float32
    assert torch.isfinite(y_d).all()
    # Bit-identity of two models' outputs holds here because every float tensor either model hands to a
    # matmul is a fresh 64-byte-aligned allocation: the fixture is bf16 and loads into fp32 (a copy), the
    # int4 codes are unpacked per call. An fp32 file would leave views into the file buffer at unaligned
    # offsets, and MKL may then sum in another order (see test_qwen_image_loading's round-trip test).
    assert torch.equal(y_d, y_c)


# ------------------------------------------------------------------------------------ 2

def test_converted_equals_native_from_natural_tensors(natural, files):
    """The converter's output equals a ComfyUI-native int4 state dict written by the test directly from the
    natural tensors (kitchen names and layouts, planar modulation, bias without "+1"), tensor for tensor,
    and the two loaded models give bit-identical fp32 outputs.

    Bit-identity is the right expectation (no tolerance needed) because the fixture values make every step
    of the conversion exact: W4A4 is a pure permutation/split; the AWQ zeros ``wzeros + 8·wscales`` are
    exact (scales k·2⁻¹⁰, zeros j·2⁻¹⁰, |j − 8k| < 2⁸); and the modulation bias b is a multiple of 2⁻⁷ in
    [−½, ½], so 1 + b is a multiple of 2⁻⁷ in [½, 1½] (≤ 8 significant bits): bf16(1 + b) = 1 + b and
    subtracting 1 gives back exactly b. (For a general bf16 b the "+1" round trip is only good to one
    bf16 rounding of 1 + b, ≤ 2⁻⁸; that case is not what this test is about.)
    """
    sd_n, meta_n = F.to_nunchaku(natural)
    conv_sd, conv_meta = nk.convert_nunchaku_state_dict(sd_n, meta_n)
    native_sd, native_meta = F.to_native(natural)

    assert sorted(conv_sd) == sorted(native_sd)
    for key, t in native_sd.items():
        if key.endswith(".comfy_quant"):
            assert decode_json(conv_sd[key]) == decode_json(t), key
        else:
            assert conv_sd[key].dtype == t.dtype and torch.equal(conv_sd[key], t), key
    layers = json.loads(conv_meta["_quantization_metadata"])["layers"]
    assert layers == {name: cfg for name, (_, cfg) in F.native_layers(natural).items()}

    m_native = comfy.sd.load_diffusion_model_state_dict(dict(native_sd), model_options=FP32, metadata=native_meta)
    m_conv = comfy.sd.load_diffusion_model(files["converted"], model_options=FP32)
    sd_a, sd_b = m_native.model.diffusion_model.state_dict(), m_conv.model.diffusion_model.state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    for seed in (3, 4):  # bit-identical: both models' float tensors are fresh bf16 → fp32 copies (see test 1)
        inputs = model_inputs(seed)
        assert torch.equal(forward(m_native, inputs), forward(m_conv, inputs))


# ------------------------------------------------------------------------------------ 3

def _f64_layer_norm(v, eps=1e-6):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps)


def _f64_rms_norm(v, w, eps=1e-6):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w


def _f64_silu(v):
    return v / (1 + torch.exp(-v))


def _f64_gelu_tanh(v):
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def _f64_rotate(v, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of v (B, S, H, D) by angle θ_{s,i} given as cos/sin (B, S, 1, D/2)."""
    a, b = v[..., 0::2], v[..., 1::2]
    out = torch.empty_like(v)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def act_codes(x, smooth, unsigned):
    """The int4 activation codes an SVDQuant layer computes for input x (spec: fp32, x (+0.171875) / smooth,
    per row per 64-group scale = absmax/7 (absmax/15 unsigned), round half-even, clamp)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xs = ((x2 + 0.171875) if unsigned else x2) / smooth.float()
    g = xs.view(xs.shape[0], -1, 64)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / (15 if unsigned else 7)
    return (g / scale).round().clamp(0 if unsigned else -7, 15 if unsigned else 7).to(torch.int8)


class RefBlock:
    """float64 Qwen-Image block from the NATURAL tensors: int4 layers through reference.svdquant_forward /
    reference.awq_forward (dequantized in float64; activations quantized as the spec says), float layers in
    float64; records every int4 layer's input."""

    def __init__(self, natural, block=0, mod_bias_offset=None):
        self.p = f"transformer_blocks.{block}."
        self.layers = F.native_layers(natural)
        self.flt = {k: v.double() for k, v in natural["float"].items()}
        self.inputs = {}
        self.mod_bias_offset = mod_bias_offset  # negative control: perturb the planar modulation bias

    def svd(self, x, name):
        self.inputs[name] = x
        t, cfg = self.layers[self.p + name]
        return svdquant_forward(x, t, cfg["act_unsigned"], t["bias"], torch.float32)[0]

    def awq(self, x, name):
        t, cfg = self.layers[self.p + name]
        bias = t["bias"].double()
        if self.mod_bias_offset is not None:
            bias = bias + self.mod_bias_offset
        return awq_forward(x, t, cfg["group_size"], bias)[0]

    def __call__(self, hs, es, temb, cos, sin):
        hs, es, temb = hs.double(), es.double(), temb.double()
        B, T, S = hs.shape[0], es.shape[1], hs.shape[1]
        H, D = F.HEADS, F.HEAD_DIM
        x = _f64_silu(temb)
        ish, isc, ig, ish2, isc2, ig2 = (u[:, None] for u in self.awq(x, "img_mod.1").chunk(6, -1))
        tsh, tsc, tg, tsh2, tsc2, tg2 = (u[:, None] for u in self.awq(x, "txt_mod.1").chunk(6, -1))
        hi = _f64_layer_norm(hs) * (1 + isc) + ish
        ci = _f64_layer_norm(es) * (1 + tsc) + tsh

        def heads(t):
            return t.reshape(B, -1, H, D)

        a = self.p + "attn."
        q = torch.cat([_f64_rms_norm(heads(self.svd(ci, "attn.add_q_proj")), self.flt[a + "norm_added_q.weight"]),
                       _f64_rms_norm(heads(self.svd(hi, "attn.to_q")), self.flt[a + "norm_q.weight"])], 1)
        k = torch.cat([_f64_rms_norm(heads(self.svd(ci, "attn.add_k_proj")), self.flt[a + "norm_added_k.weight"]),
                       _f64_rms_norm(heads(self.svd(hi, "attn.to_k")), self.flt[a + "norm_k.weight"])], 1)
        v = torch.cat([heads(self.svd(ci, "attn.add_v_proj")), heads(self.svd(hi, "attn.to_v"))], 1)
        q, k = _f64_rotate(q, cos, sin), _f64_rotate(k, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        prob = torch.exp(scores - scores.amax(-1, keepdim=True))
        prob = prob / prob.sum(-1, keepdim=True)
        o = torch.einsum("bhqk,bkhd->bqhd", prob, v).reshape(B, T + S, H * D)
        h = hs + ig * self.svd(o[:, T:], "attn.to_out.0")
        c = es + tg * self.svd(o[:, :T], "attn.to_add_out")
        h = h + ig2 * self.svd(_f64_gelu_tanh(self.svd(_f64_layer_norm(h) * (1 + isc2) + ish2, "img_mlp.net.0.proj")),
                               "img_mlp.net.2")
        c = c + tg2 * self.svd(_f64_gelu_tanh(self.svd(_f64_layer_norm(c) * (1 + tsc2) + tsh2, "txt_mlp.net.0.proj")),
                               "txt_mlp.net.2")
        return c, h


def _capture_block_inputs(blk):
    """Hooks recording the input every int4 layer of the block receives in the model's forward."""
    seen, handles = {}, []

    def attn_hook(_mod, _args, kwargs):
        for n in ("to_q", "to_k", "to_v"):
            seen[f"attn.{n}"] = kwargs["hidden_states"]
        for n in ("add_q_proj", "add_k_proj", "add_v_proj"):
            seen[f"attn.{n}"] = kwargs["encoder_hidden_states"]

    handles.append(blk.attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    for name in ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mlp.net.0.proj", "txt_mlp.net.2"):
        def hook(_mod, args, name=name):
            seen[name] = args[0]
        handles.append(blk.get_submodule(name).register_forward_pre_hook(hook))
    return seen, handles


def test_modulation_and_block_match_nunchaku_order_math(natural, files):
    """(a) Modulation: from the Nunchaku-ORDER tensors of the file, float64
    ``y_stored = SiLU(temb) @ W_storedᵀ + b_stored`` with ``W_stored = q·wscales + wzeros`` (stored,
    interleaved order, padding groups dropped), de-interleaved by the spec's rule (stored d·6 + j →
    planar j·D + d) and with 1 subtracted at the scale slots j = 1, 4, equals the loaded model's
    ``transformer_blocks.0.img_mod`` (and ``txt_mod``) output.

    Tolerance: the converted W (kitchen (q − 8)·s + z) equals W_stored's entries exactly (exact fixture
    values), and b − 1 is exact, so only the fp32 GEMV differs: ``kernel_tolerance(|x|·|W|ᵀ + |b|, fp32, K)``
    with K = 256 (≈ 3e-5 relative to Σ|terms|). Negative controls: skipping the de-interleave, skipping
    the "−1", or a bias off by one bf16 ulp of 1 + b (2⁻⁸, what a real file's rounding costs) all fail it.

    (b) One full block: ``transformer_blocks[0](hidden, encoder, None, temb, rope)`` of the loaded model
    (fp32) equals a float64 block computed from the NATURAL tensors (int4 layers dequantized in float64 by
    reference.py, activations quantized as the spec says).

    Tolerance (stated): |model − ref| ≤ 2⁻¹² · max|ref| elementwise. First the test checks that every int4
    layer in the model saw activations with the SAME int4 codes as the reference (else a code flip at a
    rounding tie, a fixture artifact, would dominate). With equal codes every difference is fp32 rounding
    along the block's longest chain of reductions (modulation K = 256, 2 LayerNorms, q/k/v K + R = 288,
    RMSNorm 128, attention 128 + 23 keys, out-proj 288, MLP 288 + 1056): ≈ 2.5·10³ roundings, each ≤ u of
    terms of the size of the block's output, i.e. ≲ 2.5·10³·u ≈ 1.5e-4 ≤ 2⁻¹² ≈ 2.4e-4 of max|ref|
    (measured: ~4e-7). Negative control: the same bf16-ulp (2⁻⁸) modulation-bias error breaks it.
    """
    model = comfy.sd.load_diffusion_model(files["nunchaku"], model_options=FP32)
    dm = model.model.diffusion_model
    blk = dm.transformer_blocks[0]
    stored = load_file(files["nunchaku"])

    g = torch.Generator().manual_seed(5)
    B, T, S = 1, 7, 16
    hs = torch.randn(B, S, F.DIM, generator=g)
    es = torch.randn(B, T, F.DIM, generator=g)
    temb = torch.randn(2, F.DIM, generator=g)
    D, G = F.DIM, F.DIM // 64

    # ---- (a) modulation from the Nunchaku-order tensors
    x64 = _f64_silu(temb.double())
    for mod, module in (("img_mod.1", blk.img_mod), ("txt_mod.1", blk.txt_mod)):
        key = "transformer_blocks.0." + mod
        codes_stored = F.awq_nunchaku_tensors(natural["awq"][key])["codes_stored"]
        assert torch.equal(stored[key + ".qweight"], P.pack_awq_qweight(codes_stored))
        ws = stored[key + ".wscales"]
        assert ws.shape == (16, 6 * D) and (ws[G:] == 0).all()  # 4 real groups, padded to 16
        ws = ws[:G].double().t().repeat_interleave(64, 1)
        wz = stored[key + ".wzeros"][:G].double().t().repeat_interleave(64, 1)
        w_stored = codes_stored.double() * ws + wz                      # (6D, K), stored order
        b_stored = stored[key + ".bias"].double()
        y_stored = x64 @ w_stored.t() + b_stored
        y_planar = y_stored.view(B * 2, D, 6).transpose(1, 2).reshape(B * 2, 6 * D)  # d·6 + j -> j·D + d
        expect = y_planar.clone().view(B * 2, 6, D)
        expect[:, list(F.MOD_SCALE_SLOTS)] -= 1.0
        expect = expect.reshape(B * 2, 6 * D)

        w_planar = w_stored.view(D, 6, -1).transpose(0, 1).reshape(6 * D, -1)
        b_planar = b_stored.view(D, 6).t().reshape(-1)
        mag = x64.abs() @ w_planar.abs().t() + b_planar.abs()
        tol = kernel_tolerance(mag, torch.float32, F.DIM)
        with torch.no_grad():
            got = module(temb).double()
        err = (got - expect).abs()
        assert (err <= tol).all(), f"{mod}: max err {float(err.max()):.3e}, worst err/tol {float((err / tol).max()):.3f}"
        # negative controls: (i) "−1" applied at the stored scale slots but no de-interleave
        stored_scale_slot = torch.isin(torch.arange(6 * D) % 6, torch.tensor(F.MOD_SCALE_SLOTS))
        assert ((y_stored - stored_scale_slot.double() - got).abs() > tol).double().mean() > 0.9
        # (ii) de-interleaved but the folded "+1" kept; (iii) the scale-slot bias off by 2⁻⁸
        assert ((y_planar - got).abs() > tol).any(dim=0).view(6, D)[list(F.MOD_SCALE_SLOTS)].all()
        off = torch.zeros(6, D, dtype=torch.float64)
        off[list(F.MOD_SCALE_SLOTS)] = 2.0 ** -8
        assert ((expect + off.reshape(-1) - got).abs() > tol).view(B * 2, 6, D)[:, list(F.MOD_SCALE_SLOTS)].all()

    # ---- (b) one full block against the float64 reference from the natural tensors
    temb = temb[:1]
    ang = torch.rand(B, T + S, 1, F.HEAD_DIM // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    cos, sin = ang.cos().float(), ang.sin().float()                 # the model gets fp32 cos/sin
    rope = torch.stack([cos, -sin, sin, cos], -1).unflatten(-1, (2, 2))  # (B, S, 1, D/2, 2, 2)
    seen, handles = _capture_block_inputs(blk)
    try:
        with torch.no_grad():
            c_m, h_m = blk(hs, es, None, temb, rope)
    finally:
        for h in handles:
            h.remove()
    ref = RefBlock(natural)
    c_r, h_r = ref(hs, es, temb, cos.double(), sin.double())

    assert sorted(seen) == sorted(ref.inputs)
    for name, x_model in seen.items():
        t, cfg = ref.layers["transformer_blocks.0." + name]
        same = torch.equal(act_codes(x_model, t["weight_smooth_factor"], cfg["act_unsigned"]),
                           act_codes(ref.inputs[name], t["weight_smooth_factor"], cfg["act_unsigned"]))
        assert same, f"{name}: activation codes differ between model and reference (a rounding tie: pick another seed)"

    for got, exp, what in ((h_m, h_r, "hidden_states"), (c_m, c_r, "encoder_hidden_states")):
        assert got.shape == exp.shape and got.dtype == torch.float32
        tol = 2.0 ** -12 * float(exp.abs().max())
        err = float((got.double() - exp).abs().max())
        assert err <= tol, f"block {what}: max err {err:.3e} > tol {tol:.3e}"

    # negative control: a 2⁻⁸ (bf16 ulp of 1 + b) error in the modulation scale bias is visible
    off = torch.zeros(6, D, dtype=torch.float64)
    off[list(F.MOD_SCALE_SLOTS)] = 2.0 ** -8
    c_x, h_x = RefBlock(natural, mod_bias_offset=off.reshape(-1))(hs, es, temb, cos.double(), sin.double())
    assert float((h_m.double() - h_x).abs().max()) > 2.0 ** -12 * float(h_x.abs().max())
    assert float((c_m.double() - c_x).abs().max()) > 2.0 ** -12 * float(c_x.abs().max())


# ------------------------------------------------------------------------------------ 4

LORA_RANK = 4
STRENGTH = 0.75


def _lora_factors(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(n, LORA_RANK, generator=g) * 0.3               # B
    down = torch.randn(LORA_RANK, k, generator=g) / math.sqrt(k)    # A
    return up, down


def _lowrank_delta(x, up, down, s):
    """s·(x Aᵀ) Bᵀ and its Σ|terms|, float64."""
    xd = x.reshape(-1, x.shape[-1]).double()
    d = s * (xd @ down.double().t()) @ up.double().t()
    mag = abs(s) * (xd.abs() @ down.double().abs().t()) @ up.double().abs().t()
    return d, mag


@pytest.mark.parametrize("which", ["nunchaku", "converted"])
def test_unet_loader_and_lora(files, which, caplog):
    """``UNETLoader().load_unet(full path)`` loads the Nunchaku file directly and the converted one; a
    diffusers-format LoRA (``transformer.<module>.lora_A/lora_B.weight``, no alpha) on block 0's
    ``attn.to_q``, ``attn.to_k`` and ``img_mod.1`` applied with ``LoraLoaderModelOnly`` at strength s:

    * after ``patch_model()``, to_q / to_k outputs (single-layer call and the grouped q/k/v call the
      attention uses) change by s·(xAᵀ)Bᵀ; to_v does not change (beyond fp32 reordering: checked to the
      same tolerance); q/k/v still share one activation quantization;
    * img_mod.1's output changes by s·(xAᵀ)Bᵀ with B's rows in PLANAR order (the layer input is SiLU(temb));
      the interleaved-order delta does not fit;
    * ``unpatch_model()`` restores bit-exact layer outputs and full-model outputs.

    Tolerance (fp32 low-rank branch): the LoRA is appended to the layer's low-rank branch (SVDQuant:
    proj_down ← [Pd | Aᵀ], proj_up ← [Pu | s·B]) or added as an fp32 output term (AWQ); the activation codes
    of the main path are unchanged. Each of y_u, y_p is within ``kernel_tolerance(Σ|terms|, fp32, n)`` of
    its exact value, with n = K + R + r accumulated products (K inputs, R + r low-rank columns) and the
    fp32 rounding of s·B covered by the 4u operand term; the exact difference is s·(xAᵀ)Bᵀ. Hence
    |(y_p − y_u) − Δ| ≤ kernel_tolerance(mag_u, fp32, n) + kernel_tolerance(mag_u + mag_Δ, fp32, n)
    (≈ 2e-5 relative here), with mag_u from ``reference.svdquant_forward`` / ``awq_forward`` and
    mag_Δ = s·(|x||A|ᵀ)|B|ᵀ. The bound must also be tight enough to see a 10 % error in Δ.
    """
    with caplog.at_level(logging.INFO):
        (model,) = UNETLoader().load_unet(files[which], "fp32")  # fp32 compute on any machine: the bounds are fp32
    assert not loader_warnings(caplog), loader_warnings(caplog)
    dm = model.model.diffusion_model
    blk = dm.transformer_blocks[0]
    assert blk.attn.to_q.weight._layout_cls == "TensorCoreSVDQuantW4A4Layout"
    assert blk.img_mod[1].weight._layout_cls == "TensorCoreAWQW4A16Layout"

    n_qk, k = F.DIM, F.DIM
    lora = {}
    factors = {}
    for i, path in enumerate(("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                              "transformer_blocks.0.img_mod.1")):
        n = 6 * F.DIM if path.endswith("img_mod.1") else n_qk
        up, down = _lora_factors(n, k, 100 + i)
        factors[path] = (up, down)
        lora[f"transformer.{path}.lora_B.weight"] = up
        lora[f"transformer.{path}.lora_A.weight"] = down
    lora_path = files["dir"] / f"lora-{which}.safetensors"
    save_file(lora, str(lora_path))

    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, k, generator=g)
    temb = torch.randn(2, F.DIM, generator=g)
    inputs = model_inputs(4)

    def outputs():
        with torch.no_grad():
            single = {n: getattr(blk.attn, n)(x) for n in ("to_q", "to_k", "to_v")}
            grouped = dict(zip(("to_q", "to_k", "to_v"),
                               comfy.ops.run_linear_group(x, (blk.attn.to_q, blk.attn.to_k, blk.attn.to_v))))
            return single, grouped, blk.img_mod(temb), forward(model, inputs)

    single_u, grouped_u, mod_u, full_u = outputs()

    caplog.clear()
    with caplog.at_level(logging.INFO):
        (patched,) = LoraLoaderModelOnly().load_lora_model_only(model, str(lora_path), STRENGTH)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not msgs, msgs  # every LoRA key mapped and accepted
    assert len(patched.patches) == 3
    patched.patch_model()
    try:
        single_p, grouped_p, mod_p, full_p = outputs()
        share = {blk.attn.to_q.weight._params.proj_down.data_ptr(),
                 blk.attn.to_k.weight._params.proj_down.data_ptr(),
                 blk.attn.to_v.weight._params.proj_down.data_ptr()}
        assert len(share) == 1, "q/k/v no longer share their activation quantization"
        assert blk.attn.to_q.weight._params.proj_down.shape[1] == F.RANK + 2 * LORA_RANK
    finally:
        patched.unpatch_model()
    single_r, grouped_r, mod_r, full_r = outputs()

    # --- to_q / to_k / to_v
    n_acc = k + F.RANK + 2 * LORA_RANK
    for name in ("to_q", "to_k", "to_v"):
        layer = f"transformer_blocks.0.attn.{name}"
        t = {kk: v for kk, v in getattr(blk.attn, name).state_dict().items()}
        mag_u = svdquant_forward(x, t, False, t["bias"], torch.float32)[1]
        if name == "to_v":
            delta, mag_d = torch.zeros_like(mag_u), torch.zeros_like(mag_u)
        else:
            delta, mag_d = _lowrank_delta(x, *factors[layer], STRENGTH)
        tol = kernel_tolerance(mag_u, torch.float32, n_acc) + kernel_tolerance(mag_u + mag_d, torch.float32, n_acc)
        for kind, y_p, y_u in (("single", single_p, single_u), ("grouped", grouped_p, grouped_u)):
            err = ((y_p[name].double() - y_u[name].double()) - delta).abs()
            assert (err <= tol).all(), f"{name} {kind}: max err {float(err.max()):.3e}, err/tol {float((err / tol).max()):.3f}"
            if name != "to_v":
                assert float(((0.1 * delta.abs()) > tol).double().mean()) > 0.5, "tolerance too loose"
        assert torch.equal(single_r[name], single_u[name]) and torch.equal(grouped_r[name], grouped_u[name])

    # --- img_mod.1: planar-order delta on the SiLU(temb) input
    mod_layer = blk.img_mod[1]
    t = mod_layer.state_dict()
    xs = TF.silu(temb)
    mag_u = awq_forward(xs, t, 64, t["bias"])[1]
    up, down = factors["transformer_blocks.0.img_mod.1"]
    delta, mag_d = _lowrank_delta(xs, up, down, STRENGTH)
    n_acc = k + LORA_RANK
    tol = kernel_tolerance(mag_u, torch.float32, n_acc) + kernel_tolerance(mag_u + mag_d, torch.float32, n_acc)
    diff = mod_p.double() - mod_u.double()
    err = (diff - delta).abs()
    assert (err <= tol).all(), f"img_mod.1: max err {float(err.max()):.3e}, err/tol {float((err / tol).max()):.3f}"
    assert float(((0.1 * delta.abs()) > tol).double().mean()) > 0.5
    inter, _ = _lowrank_delta(xs, P.interleave(up, 6, 0), down, STRENGTH)  # B rows in Nunchaku's order
    assert float(((diff - inter).abs() > tol).double().mean()) > 0.5
    assert torch.equal(mod_r, mod_u)

    # --- whole model: the LoRA changes the output, unpatching restores it bit for bit
    assert not torch.equal(full_p, full_u) and float((full_p - full_u).abs().max()) > 1e-3
    assert torch.equal(full_r, full_u)


# ------------------------------------------------------------------------------------ 5

def test_inspect_and_cli(natural, files):
    """``inspect_checkpoint`` recognises the Nunchaku file (kind "nunchaku", no problems, module counts in
    the notes); ``python -m comfy.quant convert-nunchaku IN OUT`` exits 0 and writes the same tensors as the
    library's converter; ``python -m comfy.quant inspect OUT`` exits 0 and lists the split q/k/v layers."""
    report = inspect_checkpoint(files["nunchaku"])
    assert report.kind == "nunchaku"
    assert report.problems == []
    n_w4a4, n_awq = len(natural["w4a4"]), len(natural["awq"])
    assert any(f"{n_w4a4} W4A4, {n_awq} AWQ, {len(natural['float'])} float tensors" in n for n in report.notes), \
        report.notes
    conv_report = inspect_checkpoint(files["converted"])
    assert conv_report.kind == "comfyui" and conv_report.problems == []
    assert len(conv_report.layers) == len(F.native_layers(natural))

    out = files["dir"] / "cli-converted.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "comfy.quant", "convert-nunchaku", files["nunchaku"], str(out)],
                         cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert out.exists() and not partial_files(out.parent)
    a, b = load_file(str(out)), load_file(files["converted"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)

    run = subprocess.run([sys.executable, "-m", "comfy.quant", "inspect", str(out)],
                         cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for b_ in range(F.NUM_BLOCKS):
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            row = [ln for ln in lines if ln.split() and ln.split()[0] == f"transformer_blocks.{b_}.attn.{name}"]
            assert len(row) == 1 and "svdquant_w4a4" in row[0] and f"{F.DIM}x{F.DIM}" in row[0], (name, row)
    assert not any("qkv" in ln for ln in lines)
    assert "problems: 0" in run.stdout


# ------------------------------------------------------------------------------------ 6

@pytest.mark.parametrize("variant", ["metadata_only", "nvfp4_tensors"])
def test_nvfp4_file_rejected(natural, files, variant):
    """An NVFP4 Nunchaku file (quantization_config weight dtype ``fp4_e2m1_all``; in the second variant also
    group-16 fp8 ``wscales``, ``wcscales`` and ``wtscale``) is refused by ``load_diffusion_model`` and by the
    UNETLoader node with a ValueError that names the file, NVFP4/fp4_e2m1_all and the int4 alternative;
    no model comes back."""
    if variant == "metadata_only":
        sd, meta = F.to_nunchaku(natural, weight_dtype="fp4_e2m1_all")
    else:
        sd, meta = F.nvfp4_nunchaku(natural)
    assert json.loads(meta["quantization_config"])["weight"]["dtype"] == "fp4_e2m1_all"
    path = files["dir"] / f"svdq-fp4_r32-tiny-{variant}.safetensors"
    save_file(sd, str(path), metadata=meta)

    result = None
    with pytest.raises(ValueError) as exc:
        result = comfy.sd.load_diffusion_model(str(path), model_options=FP32)
    assert result is None
    msg = str(exc.value)
    assert str(path) in msg
    assert "NVFP4" in msg and "fp4_e2m1_all" in msg and "int4" in msg, msg
    assert "Blackwell" in msg

    with pytest.raises(ValueError, match="NVFP4"):
        UNETLoader().load_unet(str(path))
