"""Nunchaku -> ComfyUI-native int4 conversion (comfy.quant.nunchaku).

The packer (tests_quant/nunchaku_packer.py) is an independent implementation of the inverse
permutations of shared/specs/nunchaku-format.md; every unpack function must undo it bit-exactly.
"""
import json
import logging
import os

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nunchaku_packer as P
from factories import partial_files
from comfy.quant import nunchaku as nk
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
from comfy.quant.packing import pack_int4, unpack_int4

U32 = 2.0 ** -24   # unit roundoff of fp32
UBF16 = 2.0 ** -8  # unit roundoff of bf16 (8-bit significand incl. the implicit bit, round to nearest)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def decode_json(t):
    return json.loads(bytes(t.tolist()).decode("utf-8"))


# ------------------------------------------------------------------ per-tensor-kind round trips

@pytest.mark.parametrize("n,k", [(128, 128), (384, 640), (256, 1152), (128, 64)])
def test_w4a4_qweight_roundtrip(n, k):
    codes = torch.randint(-8, 8, (n, k), generator=gen(n + k)).to(torch.int8)
    codes[0, :3] = -8
    codes[-1, -1] = -8
    stored = P.pack_w4a4_qweight(codes)
    assert stored.dtype == torch.int8 and stored.shape == (n, k // 2)
    assert bits_equal(nk.unpack_w4a4_qweight(stored), codes)
    packed = nk.unpack_w4a4_qweight_packed(stored)
    assert bits_equal(packed, P.kitchen_pack(codes))          # kitchen layout, code -8 kept
    assert bits_equal(unpack_int4(packed, signed=True).to(torch.int8), codes)
    assert bits_equal(pack_int4(codes), packed)


def test_w4a4_qweight_tile_positions_match_spec_prose():
    """The packer puts code (n, k) in int32 word (nt, kt, np, nl, kl, ns, ks) at nibble r, with
    n = nt*128 + np*16 + ns*8 + nl and k = kt*64 + ks*32 + kl*8 + r (spec §3, by explicit index math)."""
    n, k = 256, 192
    g = gen(7)
    for _ in range(40):
        i, j = int(torch.randint(n, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))
        val = int(torch.randint(-8, 8, (1,), generator=g)) or 5
        codes = torch.zeros(n, k, dtype=torch.int8)
        codes[i, j] = val
        words = P.pack_w4a4_qweight(codes).view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
        nt, rn = divmod(i, 128)
        np_, rn = divmod(rn, 16)
        ns, nl = divmod(rn, 8)
        kt, rk = divmod(j, 64)
        ks, rk = divmod(rk, 32)
        kl, r = divmod(rk, 8)
        word = int(words[nt, kt, np_, nl, kl, ns, ks])
        assert (word >> (4 * r)) & 0xF == val & 0xF
        assert int((words != 0).sum()) == 1
        assert int(nk.unpack_w4a4_qweight(P.pack_w4a4_qweight(codes))[i, j]) == val


@pytest.mark.parametrize("g_,n", [(2, 128), (5, 384), (18, 256)])
def test_w4a4_wscales_roundtrip(g_, n):
    scales = (torch.rand(g_, n, generator=gen(g_)) + 0.01).to(torch.bfloat16)
    stored = P.pack_w4a4_wscales(scales)
    assert stored.shape == (g_, n)
    assert not torch.equal(stored, scales)  # really permuted
    assert bits_equal(nk.unpack_w4a4_wscales(stored), scales)
    half = scales.to(torch.float16)
    assert bits_equal(nk.unpack_w4a4_wscales(P.pack_w4a4_wscales(half)), half)


@pytest.mark.parametrize("length", [16, 48, 128, 640])
def test_chunk16_roundtrip(length):
    v = torch.randn(length, generator=gen(length)).to(torch.bfloat16)
    assert bits_equal(nk.unpack_chunk16(P.pack_chunk16(v)), v)
    assert nk.unpack_bias is nk.unpack_chunk16 and nk.unpack_smooth_factor is nk.unpack_chunk16


def test_chunk16_stored_order_matches_spec():
    order = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    stored = P.pack_chunk16(torch.arange(32))
    assert stored.tolist() == order + [16 + o for o in order]
    assert nk.unpack_chunk16(stored).tolist() == list(range(32))


@pytest.mark.parametrize("n,r", [(16, 16), (128, 32), (144, 48), (384, 128)])
def test_proj_up_roundtrip(n, r):
    up = torch.randn(n, r, generator=gen(n * r)).to(torch.bfloat16)
    stored = P.pack_proj_up(up)
    assert stored.shape == (n, r)
    assert bits_equal(nk.unpack_proj_up(stored), up)


@pytest.mark.parametrize("k,r", [(16, 16), (128, 32), (640, 48), (256, 128)])
def test_proj_down_roundtrip(k, r):
    down = torch.randn(k, r, generator=gen(k + r)).to(torch.bfloat16)  # kitchen (K, R) = Aᵀ
    stored = P.pack_proj_down(down)
    assert stored.shape == (k, r)
    assert bits_equal(nk.unpack_proj_down(stored), down)


@pytest.mark.parametrize("n,k", [(4, 64), (128, 256), (1536, 256), (132, 192)])
def test_awq_qweight_roundtrip(n, k):
    codes = torch.randint(0, 16, (n, k), generator=gen(n + k)).to(torch.uint8)
    codes[0, 0], codes[-1, -1] = 15, 8
    stored = P.pack_awq_qweight(codes)
    assert stored.dtype == torch.int32 and stored.shape == (n // 4, k // 2)
    assert bits_equal(nk.unpack_awq_qweight(stored), codes)
    assert bits_equal(unpack_int4(pack_int4(codes), signed=False).to(torch.int8), codes.to(torch.int8))


def test_awq_qweight_word_positions_match_spec_prose():
    """Within every 32 input channels, 16-bit word j holds k = j + 8t at nibble t; the words of a row
    group are laid out (N/4, K/64, 4, 16) with n = i*4 + a (spec §4, explicit index math)."""
    n, k = 8, 128
    g = gen(3)
    for _ in range(30):
        i, j = int(torch.randint(n, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))
        codes = torch.zeros(n, k, dtype=torch.uint8)
        codes[i, j] = 11
        w16 = P.pack_awq_qweight(codes).view(torch.int16).reshape(n // 4, k // 64, 4, 16)
        block, rem = divmod(j, 32)
        t, jj = divmod(rem, 8)
        kw = block * 8 + jj
        word = int(w16[i // 4, kw // 16, i % 4, kw % 16]) & 0xFFFF
        assert (word >> (4 * t)) & 0xF == 11
        assert int((w16 != 0).sum()) == 1


def test_awq_deinterleave():
    d, s = 5, 6
    planar = torch.arange(s * d)
    stored = P.interleave(planar, s)
    for dd in range(d):
        for jj in range(s):
            assert int(stored[dd * s + jj]) == jj * d + dd  # stored d*S + j holds original j*D + d
    assert torch.equal(nk.awq_deinterleave(stored, s), planar)
    m = torch.randn(3, s * d, generator=gen()).to(torch.bfloat16)  # (G, N): columns
    assert bits_equal(nk.awq_deinterleave(P.interleave(m, s, dim=1), s, dim=1), m)
    r = torch.randn(s * d, 7, generator=gen()).to(torch.bfloat16)  # rows
    assert bits_equal(nk.awq_deinterleave(P.interleave(r, s, dim=0), s, dim=0), r)


def test_awq_zeros_conversion_fp32_once():
    scale = (torch.rand(4, 256, generator=gen()) * 0.02 + 0.002).to(torch.bfloat16)
    wzeros = (-7.0 * scale.float()).to(torch.bfloat16)
    wzeros[0] = (torch.randn(256, generator=gen(1)) * 0.05).to(torch.bfloat16)
    z = nk.awq_zeros_to_kitchen(wzeros, scale)
    assert z.dtype == torch.bfloat16
    assert bits_equal(z, (wzeros.float() + 8.0 * scale.float()).to(torch.bfloat16))
    exact = wzeros.double() + 8.0 * scale.double()
    assert ((z.double() - exact).abs() <= UBF16 * exact.abs() * 1.0001).all()


def test_unfold_modulation_bias():
    b = torch.randn(12, generator=gen()).to(torch.bfloat16)
    out = nk.unfold_modulation_scale_bias(b, 6, (1, 4))
    ref = b.float().reshape(6, 2).clone()
    ref[1] -= 1
    ref[4] -= 1
    assert bits_equal(out, ref.reshape(12).to(torch.bfloat16))


# ------------------------------------------------------------------ detection

def test_is_nunchaku_checkpoint():
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1)
    assert nk.is_nunchaku_checkpoint(stored.keys(), meta)
    assert nk.is_nunchaku_checkpoint(stored.keys(), None)
    assert nk.is_nunchaku_checkpoint(["a.weight"], {"model_class": "NunchakuFluxTransformer2dModel"})
    assert nk.is_nunchaku_checkpoint(["a.weight"], {"quantization_config": json.dumps({"method": "svdquant"})})
    assert nk.is_nunchaku_checkpoint(["blocks.0.mod.wzeros"], {})
    assert not nk.is_nunchaku_checkpoint(["img_in.weight", "txt_norm.weight"], {"format": "pt"})
    new_sd, new_meta = nk.convert_nunchaku_state_dict(stored, meta)
    assert not nk.is_nunchaku_checkpoint(new_sd.keys(), new_meta)


# ------------------------------------------------------------------ full tiny Qwen-Image file

@pytest.fixture(scope="module")
def fake():
    stored, meta, natural = P.build_fake_qwen_image(num_blocks=2, heads=2, head_dim=128, joint_dim=128, rank=32)
    out_sd, out_meta = nk.convert_nunchaku_state_dict(dict(stored), meta)
    return stored, meta, natural, out_sd, out_meta


def test_convert_qwen_image_exact(fake):
    stored, meta, natural, out, out_meta = fake
    expected_keys = set(natural["float"])
    for name in natural["w4a4"]:
        expected_keys |= {f"{name}.{s}" for s in ("weight", "weight_scale", "weight_proj_down", "weight_proj_up",
                                                   "weight_smooth_factor", "bias", "comfy_quant")}
    for name in natural["awq"]:
        expected_keys |= {f"{name}.{s}" for s in ("weight", "weight_scale", "weight_zeros", "bias", "comfy_quant")}
    assert set(out) == expected_keys
    # q/k/v are split into ComfyUI's separate layers
    assert "transformer_blocks.1.attn.add_v_proj.weight" in out and "transformer_blocks.0.attn.to_k.weight" in out
    assert not any("qkv" in key for key in out)

    for key, t in natural["float"].items():
        assert bits_equal(out[key], t), key

    layers = json.loads(out_meta["_quantization_metadata"])
    assert layers["format_version"] == "1.0"
    assert json.loads(out_meta["config"]) == json.loads(meta["config"])
    for name, nat in natural["w4a4"].items():
        assert bits_equal(out[f"{name}.weight"], P.kitchen_pack(nat["codes"])), name
        for s in ("weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor", "bias"):
            assert bits_equal(out[f"{name}.{s}"], nat[s].contiguous()), (name, s)
        cfg = {"format": "svdquant_w4a4", "group_size": 64, "rank": 32, "act_unsigned": nat["act_unsigned"]}
        assert decode_json(out[f"{name}.comfy_quant"]) == cfg
        assert out[f"{name}.comfy_quant"].dtype == torch.uint8
        assert layers["layers"][name] == cfg
    assert {n for n, c in layers["layers"].items() if c.get("act_unsigned")} == natural["unsigned"]
    assert natural["unsigned"] == {f"transformer_blocks.{b}.{m}_mlp.net.2" for b in range(2) for m in ("img", "txt")}
    # q, k and v share proj_down / smooth_factor (so one activation quantization serves all three)
    for p in ("transformer_blocks.0.attn.to_", "transformer_blocks.1.attn.add_"):
        suffix = ("q", "k", "v") if p.endswith("to_") else ("q_proj", "k_proj", "v_proj")
        for s in ("weight_proj_down", "weight_smooth_factor"):
            a, b, c = (out[f"{p}{x}.{s}"] for x in suffix)
            assert torch.equal(a, b) and torch.equal(a, c)

    for name, nat in natural["awq"].items():
        assert bits_equal(out[f"{name}.weight"], P.kitchen_pack(nat["codes"])), name
        assert bits_equal(out[f"{name}.weight_scale"], nat["weight_scale"])  # planar, padding sliced
        assert out[f"{name}.weight_scale"].shape == (256 // 64, 6 * 256)  # 4 real groups of 16 stored
        assert bits_equal(out[f"{name}.weight_zeros"],
                          (nat["wzeros"].float() + 8.0 * nat["weight_scale"].float()).to(torch.bfloat16))
        # bias: planar, "+1" removed from scale slots 1 and 4 in fp32 and rounded once
        expect = nat["stored_bias_planar"].float().reshape(6, -1).clone()
        expect[1] -= 1
        expect[4] -= 1
        got = out[f"{name}.bias"]
        assert bits_equal(got, expect.reshape(-1).to(torch.bfloat16))
        b = nat["bias"].double().reshape(6, -1)
        diff = (got.double().reshape(6, -1) - b).abs()
        for j in (0, 2, 3, 5):
            assert torch.equal(got.reshape(6, -1)[j], nat["bias"].reshape(6, -1)[j])
        # bf16(1 + b) then bf16(. - 1): two roundings, <= u(|b| + 1) + u|b| with u = 2^-8 (the spec's ~4e-3)
        for j in (1, 4):
            assert (diff[j] <= UBF16 * (2 * b[j].abs() + 1) * 1.01).all()
        assert float(diff.max()) <= 4.0e-3
        assert decode_json(out[f"{name}.comfy_quant"]) == {"format": "awq_w4a16", "group_size": 64}


def test_awq_dequant_matches_nunchaku_order(fake):
    """Kitchen dequant (q - 8)*scale + zeros of the converted tensors == Nunchaku's q*wscales + wzeros
    computed in stored (interleaved) order and then de-interleaved."""
    _, _, natural, out, _ = fake
    for name, nat in natural["awq"].items():
        st = nat["stored"]
        n, k = nat["codes"].shape
        g = k // 64
        # converted file, own fp32 dequant
        q = P.kitchen_unpack(out[f"{name}.weight"], signed=False).float()
        s = out[f"{name}.weight_scale"].float().t().repeat_interleave(64, 1)
        z = out[f"{name}.weight_zeros"].float().t().repeat_interleave(64, 1)
        w_kitchen = (q - 8) * s + z
        # Nunchaku order: the stored (interleaved) codes, the stored scales/zeros minus padding rows
        q_st = P.interleave(nat["codes"], 6, 0).float()
        ws = st["wscales"][:g].float().t().repeat_interleave(64, 1)
        wz = st["wzeros"][:g].float().t().repeat_interleave(64, 1)
        w_nunchaku = (q_st * ws + wz).reshape(n // 6, 6, k).transpose(0, 1).reshape(n, k)
        assert (st["wscales"][g:] == 0).all() and st["wscales"].shape[0] == 16  # padded rows existed
        # only difference: zeros rounded once to bf16 (<= u_bf16 |zeros|) + a few fp32 roundings
        zf = (wz + 8 * ws).reshape(n // 6, 6, k).transpose(0, 1).reshape(n, k)
        tol = UBF16 * zf.abs() + 8 * U32 * (16 * s.abs() + z.abs() + w_kitchen.abs())
        err = (w_kitchen - w_nunchaku).abs()
        assert (err <= tol).all(), float((err - tol).max())


def test_file_and_memory_paths_identical(fake, tmp_path):
    stored, meta, _, _, _ = fake
    src = tmp_path / "svdq-int4_r32-tiny.safetensors"
    dst = tmp_path / "tiny-comfy.safetensors"
    save_file(stored, str(src), metadata=meta)
    file_meta = convert_nunchaku_file(str(src), str(dst), progress=False)
    assert not partial_files(dst.parent)

    sd = dict(stored)
    mem_sd, mem_meta = nk.convert_nunchaku_state_dict(sd, meta)
    assert sd == {}  # consumed

    from_file = load_file(str(dst))
    assert set(from_file) == set(mem_sd)
    for key, t in mem_sd.items():
        assert bits_equal(from_file[key], t), key
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == mem_meta == file_meta
    assert "_quantization_metadata" in mem_meta and "config" in mem_meta


def test_hazard_warning(caplog):
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1, hazard=True)
    with caplog.at_level(logging.WARNING, logger="comfy.quant.nunchaku"):
        nk.convert_nunchaku_state_dict(stored, meta)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("transformer_blocks.0.attn.to_out.0" in m and "smooth_factor_orig" in m for m in msgs), msgs

    caplog.clear()
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1, hazard=False)
    with caplog.at_level(logging.WARNING, logger="comfy.quant.nunchaku"):
        nk.convert_nunchaku_state_dict(stored, meta)
    assert not [r for r in caplog.records if "smooth_factor_orig" in r.getMessage()]


# ------------------------------------------------------------------ rejections

def test_nvfp4_rejected():
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1)
    qc = json.loads(meta["quantization_config"])
    qc["weight"] = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    bad_meta = {**meta, "quantization_config": json.dumps(qc)}
    sd = dict(stored)
    with pytest.raises(ValueError, match="NVFP4.*fp4_e2m1_all"):
        nk.convert_nunchaku_state_dict(sd, bad_meta)
    assert len(sd) == len(stored)  # nothing consumed
    sd["transformer_blocks.0.attn.to_qkv.wcscales"] = torch.ones(768, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="NVFP4.*wcscales"):
        nk.convert_nunchaku_state_dict(sd, None)


@pytest.mark.parametrize("model_class,what", [("NunchakuZImageTransformer2DModel", "Z-Image"),
                                              ("NunchakuFluxTransformer2dModel", "Flux"),
                                              ("NunchakuSanaTransformer2DModel", "unsupported")])
def test_unsupported_models_rejected(model_class, what):
    """A Qwen-Image file whose model_class says another architecture (Z-Image and Flux are supported since
    issue 11: the error names the first module the other architecture's tables do not know, and the
    mismatch); an unknown model_class is refused as such."""
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1)
    with pytest.raises(ValueError, match=what) as exc:
        nk.convert_nunchaku_state_dict(dict(stored), {**meta, "model_class": model_class})
    assert model_class in str(exc.value)
    if what != "unsupported":
        assert "transformer_blocks.0." in str(exc.value) and "keys look like Qwen-Image" in str(exc.value)


def test_model_from_keys_without_metadata():
    """No metadata: Z-Image is recognised by its key names (then its incomplete module is reported)."""
    sd = {"layers.0.attention.to_qkv.qweight": torch.zeros(384, 64, dtype=torch.int8)}
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.to_qkv.*'wscales'.*expected present"):
        nk.convert_nunchaku_state_dict(sd, None)
    with pytest.raises(ValueError, match="cannot identify the model"):
        nk.convert_nunchaku_state_dict({"foo.qweight": torch.zeros(128, 64, dtype=torch.int8)}, None)


def test_errors_name_module_tensor_expected_got():
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1)
    sd = dict(stored)
    sd["transformer_blocks.0.attn.to_add_out.wscales"] = sd["transformer_blocks.0.attn.to_add_out.wscales"][:2]
    with pytest.raises(ValueError) as exc:
        nk.convert_nunchaku_state_dict(sd, meta)
    msg = str(exc.value)
    assert "transformer_blocks.0.attn.to_add_out" in msg and "wscales" in msg
    assert "expected shape (4, 256)" in msg and "got shape (2, 256)" in msg

    sd = dict(stored)
    del sd["transformer_blocks.0.img_mod.1.bias"]
    with pytest.raises(ValueError, match=r"img_mod\.1.*'bias'.*expected present"):
        nk.convert_nunchaku_state_dict(sd, meta)

    sd = dict(stored)
    sd["transformer_blocks.0.attn.to_qkv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"attn\.to_qkv.*'weight'.*expected one of"):
        nk.convert_nunchaku_state_dict(sd, meta)

    bad_cfg = json.loads(meta["config"])
    bad_cfg["num_attention_heads"] = 3
    with pytest.raises(ValueError, match=r"qkv.*qweight.*expected N = 3 x inner dim 384.*got N=768"):
        nk.convert_nunchaku_state_dict(dict(stored), {**meta, "config": json.dumps(bad_cfg)})


# ------------------------------------------------------------------ layer-level check through kitchen

def _reference_w4a4(x, nat):
    """fp64 reference from the natural tensors, with the activation quantized exactly as the spec says
    (fp32 elementwise: x_main = x (+0.171875 unsigned), x_main/smooth, per row per 64-group
    scale = absmax/7 signed or /15 unsigned, round half-even, clamp). Returns (y, bound) with
    bound = |A|·|W|ᵀ + (|x|·|Pd|)·|Pu|ᵀ + |b|, the sum of magnitudes the fp32 kernel accumulates."""
    uns = nat["act_unsigned"]
    m, k = x.shape
    n = nat["codes"].shape[0]
    smooth = nat["weight_smooth_factor"].float()
    x_main = x + 0.171875 if uns else x
    grp = (x_main / smooth).view(m, k // 64, 64)
    qmax = 15 if uns else 7
    sc = grp.abs().amax(-1).clamp(min=1e-10) / qmax
    q = (grp / sc.unsqueeze(-1)).round().clamp(0 if uns else -7, qmax)
    a = (q.double() * sc.double().unsqueeze(-1)).view(m, k)
    w = (nat["codes"].double().view(n, k // 64, 64) * nat["weight_scale"].double().t().unsqueeze(-1)).view(n, k)
    pd, pu, b = (nat[s].double() for s in ("weight_proj_down", "weight_proj_up", "bias"))
    y = a @ w.t() + (x.double() @ pd) @ pu.t() + b
    bound = a.abs() @ w.abs().t() + (x.double().abs() @ pd.abs()) @ pu.abs().t() + b.abs()
    return y, bound


@pytest.mark.parametrize("name", ["transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.add_v_proj",
                                  "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.0.txt_mlp.net.0.proj"])
def test_kitchen_linear_matches_reference(fake, name):
    """F.linear through comfy_kitchen's TensorCoreSVDQuantW4A4Layout (eager CPU, fp32) on the converted
    tensors == fp64 reference on the natural tensors.

    Tolerance: the quantized activation codes and scales are bit-identical (same fp32 elementwise
    ops), so the only error is fp32 arithmetic in the kernel: one rounding per product q·ascale,
    a K-term dot product, a K-term then R-term low-rank product and two additions. By Higham's
    bound |fl(Σ) − Σ| ≤ γ_n·Σ|terms| with γ_n = n·u/(1 − n·u), u = 2^-24, n = K + R + 4, so
    |y_kitchen − y_ref| ≤ γ_n·bound elementwise (about 6e-5·bound for K = 1024). A wrong layout
    (e.g. tile-order proj_up) breaks it by orders of magnitude (checked below).
    """
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreSVDQuantW4A4Layout

    _, _, natural, out, _ = fake
    nat = natural["w4a4"][name]
    cfg = decode_json(out[f"{name}.comfy_quant"])
    n, k = nat["codes"].shape
    r = cfg["rank"]

    def qt_from(tensors):
        params = TensorCoreSVDQuantW4A4Layout.Params(
            scale=tensors["weight_scale"].float(), orig_dtype=torch.float32, orig_shape=(n, k),
            proj_down=tensors["weight_proj_down"].float(), proj_up=tensors["weight_proj_up"].float(),
            smooth_factor=tensors["weight_smooth_factor"].float(), act_unsigned=cfg["act_unsigned"])
        return QuantizedTensor(tensors["weight"], "TensorCoreSVDQuantW4A4Layout", params)

    conv = {s: out[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_proj_down", "weight_proj_up",
                                            "weight_smooth_factor", "bias")}
    g = gen(11)
    x = torch.randn(5, k, generator=g)
    if cfg["act_unsigned"]:
        x = torch.nn.functional.gelu(x * 2, approximate="tanh")  # post-GELU input, >= -0.17
    y = torch.nn.functional.linear(x, qt_from(conv), conv["bias"].float())
    assert y.dtype == torch.float32 and y.shape == (5, n)

    y_ref, bound = _reference_w4a4(x, nat)
    nn_ = k + r + 4
    gamma = nn_ * U32 / (1 - nn_ * U32)
    err = (y.double() - y_ref).abs()
    assert (err <= gamma * bound).all(), float((err / bound).max())

    # negative control: the tile-order proj_up (what an unconverted file holds) is far outside the bound
    bad = dict(conv, weight_proj_up=P.pack_proj_up(conv["weight_proj_up"]))
    y_bad = torch.nn.functional.linear(x, qt_from(bad), conv["bias"].float())
    assert ((y_bad.double() - y_ref).abs() > 100 * gamma * bound).any()


def test_kitchen_awq_linear_matches_own_dequant(fake):
    """comfy_kitchen's TensorCoreAWQW4A16Layout reads the converted modulation tensors as our dequant does."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreAWQW4A16Layout

    _, _, natural, out, _ = fake
    name = "transformer_blocks.1.txt_mod.1"
    w, s, z, b = (out[f"{name}.{t}"].float() if t != "weight" else out[f"{name}.{t}"]
                  for t in ("weight", "weight_scale", "weight_zeros", "bias"))
    n, k = w.shape[0], w.shape[1] * 2
    params = TensorCoreAWQW4A16Layout.Params(scale=s, orig_dtype=torch.float32, orig_shape=(n, k), zeros=z,
                                             group_size=64)
    qt = QuantizedTensor(w, "TensorCoreAWQW4A16Layout", params)
    x = torch.randn(2, k, generator=gen(5))
    y = torch.nn.functional.linear(x, qt, b)
    q = P.kitchen_unpack(w, signed=False).double()
    wd = (q - 8) * s.double().t().repeat_interleave(64, 1) + z.double().t().repeat_interleave(64, 1)
    y_ref = x.double() @ wd.t() + b.double()
    bound = x.double().abs() @ wd.abs().t() + b.double().abs()
    gamma = (k + 4) * U32 / (1 - (k + 4) * U32)
    assert ((y.double() - y_ref).abs() <= gamma * bound).all()


def test_file_conversion_error_leaves_no_output(tmp_path):
    stored, meta, _ = P.build_fake_qwen_image(num_blocks=1)
    sd = dict(stored)
    sd["transformer_blocks.0.txt_mlp.net.2.proj_up"] = sd["transformer_blocks.0.txt_mlp.net.2.proj_up"][:, :16].contiguous()
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src), metadata=meta)
    with pytest.raises(ValueError, match=r"txt_mlp\.net\.2.*proj_up.*expected shape \(256, 32\).*got shape \(256, 16\)"):
        convert_nunchaku_file(str(src), str(dst), progress=False)
    assert not dst.exists() and not partial_files(dst.parent)
