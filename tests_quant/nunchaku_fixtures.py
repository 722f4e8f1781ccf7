"""A tiny fake Nunchaku Qwen-Image checkpoint built from known NATURAL tensors, for loader tests.

Helpers for ``test_nunchaku_loading.py``. Everything here is written from
shared/specs/nunchaku-format.md and formats.md; the Nunchaku tile order comes from the independent
test-side packer ``nunchaku_packer.py``. Nothing is imported from ``comfy.quant``.

``make_natural`` draws one model's natural tensors (kitchen / ComfyUI layout, planar modulation,
modulation bias without the "+1"). From them:

* ``to_nunchaku(nat)`` → the Nunchaku file content (fused ``to_qkv`` / ``add_qkv_proj``, tile-packed
  W4A4 tensors, AWQ modulation with the 6-way output interleave, ``+1`` folded into the scale slots,
  group axis padded to 16, Nunchaku zero points ``wzeros``) and its metadata;
* ``to_native(nat)`` → the ComfyUI-native int4 state dict (kitchen names, split q/k/v).

Value choices that make the conversion exact (so the converted model and the native model can be
compared bit for bit):

* W4A4: the conversion is a pure permutation/split of the stored tensors, exact for any values.
* AWQ scales ``s = k·2⁻¹⁰`` (k ∈ [1, 15]) and kitchen zeros ``z = j·2⁻¹⁰`` (j ∈ [−16, 16]): Nunchaku's
  ``wzeros = z − 8s = (j − 8k)·2⁻¹⁰`` with |j − 8k| ≤ 136 < 2⁸ is exact in bf16 (8 significant bits),
  and the converter's ``wzeros + 8·wscales`` (fp32, then bf16) gives back exactly ``z``.
* Modulation bias ``b = m·2⁻⁷`` with m ∈ [−64, 64] (so b ∈ [−½, ½] ⊂ [−1, 1]): ``1 + b = (128 + m)·2⁻⁷``
  is a multiple of 2⁻⁷ in [½, 1½], i.e. at most 8 significant bits, so ``bf16(1 + b) = 1 + b`` exactly
  and the converter's fp32 subtraction of 1 returns ``b`` exactly. (A general bf16 b would come back
  only to bf16 rounding of 1 + b, ~2⁻⁸.)
"""
from __future__ import annotations

import json
import math

import torch

import nunchaku_packer as P

NUM_BLOCKS = 2
HEADS = 2
HEAD_DIM = 128
DIM = HEADS * HEAD_DIM        # 256
TXT_DIM = 256
RANK = 32
IN_CH = 64
OUT_CH = 16                   # proj_out: 4 * OUT_CH = 64 = IN_CH (patch 2x2)
GROUP = 64
MOD_S = 6                     # Qwen-Image img_mod.1 / txt_mod.1 output interleave
MOD_SCALE_SLOTS = (1, 4)      # shift, scale, gate, shift, scale, gate
AXES = [16, 56, 56]

# Nunchaku module (relative to transformer_blocks.N.) -> (ComfyUI modules, (N, K), act_unsigned)
W4A4_MODULES = {
    "attn.to_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (3 * DIM, DIM), False),
    "attn.add_qkv_proj": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (3 * DIM, DIM), False),
    "attn.to_out.0": (("attn.to_out.0",), (DIM, DIM), False),
    "attn.to_add_out": (("attn.to_add_out",), (DIM, DIM), False),
    "img_mlp.net.0.proj": (("img_mlp.net.0.proj",), (4 * DIM, DIM), False),
    "txt_mlp.net.0.proj": (("txt_mlp.net.0.proj",), (4 * DIM, DIM), False),
    "img_mlp.net.2": (("img_mlp.net.2",), (DIM, 4 * DIM), True),
    "txt_mlp.net.2": (("txt_mlp.net.2",), (DIM, 4 * DIM), True),
}
AWQ_MODULES = ("img_mod.1", "txt_mod.1")


def config_dict(num_blocks=NUM_BLOCKS):
    return {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": HEAD_DIM,
            "axes_dims_rope": list(AXES), "in_channels": IN_CH, "joint_attention_dim": TXT_DIM,
            "num_attention_heads": HEADS, "num_layers": num_blocks, "out_channels": OUT_CH, "patch_size": 2,
            "guidance_embeds": False, "pooled_projection_dim": 768}


def qconfig_dict(weight_dtype="int4", group_size=GROUP):
    return {"method": "svdquant",
            "weight": {"dtype": weight_dtype, "scale_dtype": None, "group_size": group_size},
            "activation": {"dtype": "int4", "scale_dtype": None, "unsigned": False, "group_size": group_size},
            "rank": RANK}


def nunchaku_metadata(num_blocks=NUM_BLOCKS, weight_dtype="int4", group_size=GROUP):
    return {"config": json.dumps(config_dict(num_blocks)), "model_class": "NunchakuQwenImageTransformer2DModel",
            "quantization_config": json.dumps(qconfig_dict(weight_dtype, group_size))}


def json_u8(d: dict) -> torch.Tensor:
    """A ``comfy_quant`` entry: UTF-8 JSON bytes as a uint8 tensor (written here, not by the library)."""
    return text_u8(json.dumps(d))


def text_u8(text: str) -> torch.Tensor:
    """Any text as a ``comfy_quant``-style uint8 tensor (for malformed entries)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def w4a4_config(act_unsigned):
    return {"format": "svdquant_w4a4", "group_size": GROUP, "rank": RANK, "act_unsigned": bool(act_unsigned)}


AWQ_CONFIG = {"format": "awq_w4a16", "group_size": GROUP}


# ----------------------------------------------------------------------------------------------
# natural tensors
# ----------------------------------------------------------------------------------------------

def _bf16(t):
    return t.to(torch.bfloat16)


def make_natural(seed=0, num_blocks=NUM_BLOCKS):
    """Natural tensors of the whole tiny model.

    Returns ``{"float": {key: bf16 tensor}, "w4a4": {nunchaku module: {...}}, "awq": {module: {...}}}``.
    W4A4 entries: ``codes`` (N, K) int8 in [−8, 7] (−8 present), ``weight_scale`` (K/64, N),
    ``weight_proj_down`` (K, R), ``weight_proj_up`` (N, R), ``weight_smooth_factor`` (K,), ``bias`` (N,),
    ``names`` (ComfyUI modules, rows split evenly), ``act_unsigned``.
    AWQ entries (planar output order): ``codes`` (N, K) uint8 in [0, 15], ``weight_scale`` and
    ``weight_zeros`` (kitchen: W = (q − 8)·s + z) (K/64, N), ``bias`` (N,) without the "+1".
    """
    g = torch.Generator().manual_seed(seed)
    nat = {"float": {}, "w4a4": {}, "awq": {}}

    def lin(key, n, k, bias=True):
        nat["float"][key + ".weight"] = _bf16(torch.randn(n, k, generator=g) / math.sqrt(k))
        if bias:
            nat["float"][key + ".bias"] = _bf16(torch.randn(n, generator=g) * 0.02)

    def norm(key, n):
        nat["float"][key + ".weight"] = _bf16(1.0 + 0.1 * torch.randn(n, generator=g))

    lin("img_in", DIM, IN_CH)
    norm("txt_norm", TXT_DIM)
    lin("txt_in", DIM, TXT_DIM)
    lin("time_text_embed.timestep_embedder.linear_1", DIM, 256)
    lin("time_text_embed.timestep_embedder.linear_2", DIM, DIM)
    lin("norm_out.linear", 2 * DIM, DIM)
    lin("proj_out", 4 * OUT_CH, DIM)
    for b in range(num_blocks):
        p = f"transformer_blocks.{b}."
        for nm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            norm(p + f"attn.{nm}", HEAD_DIM)
        for mod, (names, (n, k), uns) in W4A4_MODULES.items():
            codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int64).to(torch.int8)
            codes[0, 0] = -8
            nat["w4a4"][p + mod] = {
                "codes": codes,
                "weight_scale": _bf16(torch.rand(k // GROUP, n, generator=g) * 0.02 + 0.002),
                "weight_proj_down": _bf16(torch.randn(k, RANK, generator=g) * 0.05),
                "weight_proj_up": _bf16(torch.randn(n, RANK, generator=g) * 0.05),
                "weight_smooth_factor": _bf16(torch.rand(k, generator=g) * 1.5 + 0.5),
                "bias": _bf16(torch.randn(n, generator=g) * 0.1),
                "names": tuple(p + x for x in names),
                "act_unsigned": uns,
            }
        for mod in AWQ_MODULES:
            n, k = MOD_S * DIM, DIM
            kq = torch.randint(1, 16, (k // GROUP, n), generator=g)
            jz = torch.randint(-16, 17, (k // GROUP, n), generator=g)
            nat["awq"][p + mod] = {
                "codes": torch.randint(0, 16, (n, k), generator=g).to(torch.uint8),
                "weight_scale": _bf16(kq * 2.0 ** -10),
                "weight_zeros": _bf16(jz * 2.0 ** -10),
                "bias": _bf16(torch.randint(-64, 65, (n,), generator=g) * 2.0 ** -7),
            }
    return nat


def awq_nunchaku_tensors(a):
    """Nunchaku-order tensors of one AWQ modulation layer, before packing.

    ``codes_stored`` (interleaved rows), ``wscales``/``wzeros`` (G, N) interleaved columns (unpadded),
    ``bias_stored`` interleaved with bf16(1 + b) at the scale slots. Stored index d·S + j holds planar j·D + d.
    """
    s, z = a["weight_scale"], a["weight_zeros"]
    wzeros = (z.double() - 8 * s.double()).to(torch.bfloat16)
    assert torch.equal(wzeros.double(), z.double() - 8 * s.double()), "fixture: wzeros must be exact in bf16"
    folded = a["bias"].double().reshape(MOD_S, -1).clone()
    for j in MOD_SCALE_SLOTS:
        folded[j] += 1.0
    folded = folded.reshape(-1)
    bias = folded.to(torch.bfloat16)
    assert torch.equal(bias.double(), folded), "fixture: bf16(1 + b) must be exact"
    return {"codes_stored": P.interleave(a["codes"], MOD_S, 0),
            "wscales": P.interleave(s, MOD_S, 1), "wzeros": P.interleave(wzeros, MOD_S, 1),
            "bias_stored": P.interleave(bias, MOD_S, 0)}


def to_nunchaku(nat, weight_dtype="int4"):
    """(state dict, metadata) of the Nunchaku file holding ``nat``."""
    sd = {k: v.clone() for k, v in nat["float"].items()}
    for mod, w in nat["w4a4"].items():
        sd[mod + ".qweight"] = P.pack_w4a4_qweight(w["codes"])
        sd[mod + ".wscales"] = P.pack_w4a4_wscales(w["weight_scale"])
        sd[mod + ".smooth_factor"] = P.pack_chunk16(w["weight_smooth_factor"])
        sd[mod + ".smooth_factor_orig"] = P.pack_chunk16(w["weight_smooth_factor"])  # not folded upstream
        sd[mod + ".proj_down"] = P.pack_proj_down(w["weight_proj_down"])
        sd[mod + ".proj_up"] = P.pack_proj_up(w["weight_proj_up"])
        sd[mod + ".bias"] = P.pack_chunk16(w["bias"])
    for mod, a in nat["awq"].items():
        t = awq_nunchaku_tensors(a)
        sd[mod + ".qweight"] = P.pack_awq_qweight(t["codes_stored"])
        sd[mod + ".wscales"] = P.pad_groups(t["wscales"])
        sd[mod + ".wzeros"] = P.pad_groups(t["wzeros"])
        sd[mod + ".bias"] = t["bias_stored"]
    num_blocks = len({m.split(".")[1] for m in nat["awq"]})
    return sd, nunchaku_metadata(num_blocks, weight_dtype)


def native_layers(nat):
    """ComfyUI layer name -> (natural tensors in kitchen names incl. packed ``weight``, layer JSON)."""
    out = {}
    for mod, w in nat["w4a4"].items():
        n = w["codes"].shape[0]
        step = n // len(w["names"])
        for i, name in enumerate(w["names"]):
            rows = slice(i * step, (i + 1) * step)
            out[name] = ({
                "weight": P.kitchen_pack(w["codes"][rows]),
                "weight_scale": w["weight_scale"][:, rows].contiguous(),
                "weight_proj_down": w["weight_proj_down"].clone(),
                "weight_proj_up": w["weight_proj_up"][rows].contiguous(),
                "weight_smooth_factor": w["weight_smooth_factor"].clone(),
                "bias": w["bias"][rows].contiguous(),
            }, w4a4_config(w["act_unsigned"]))
    for mod, a in nat["awq"].items():
        out[mod] = ({"weight": P.kitchen_pack(a["codes"]), "weight_scale": a["weight_scale"].clone(),
                     "weight_zeros": a["weight_zeros"].clone(), "bias": a["bias"].clone()}, dict(AWQ_CONFIG))
    return out


def to_native(nat):
    """(state dict, metadata) of the ComfyUI-native int4 file holding ``nat`` (per-layer comfy_quant)."""
    sd = {k: v.clone() for k, v in nat["float"].items()}
    for name, (tensors, cfg) in native_layers(nat).items():
        for key, v in tensors.items():
            sd[f"{name}.{key}"] = v
        sd[f"{name}.comfy_quant"] = json_u8(cfg)
    num_blocks = len({m.split(".")[1] for m in nat["awq"]})
    return sd, {"config": json.dumps(config_dict(num_blocks))}


def nvfp4_nunchaku(nat):
    """An NVFP4-shaped Nunchaku file: group-16 fp8 ``wscales``, ``wcscales`` (N,), scalar ``wtscale``."""
    sd, meta = to_nunchaku(nat, weight_dtype="fp4_e2m1_all")
    qc = json.loads(meta["quantization_config"])
    qc["weight"] = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    meta["quantization_config"] = json.dumps(qc)
    for mod, w in nat["w4a4"].items():
        n, k = w["codes"].shape
        sd[mod + ".wscales"] = torch.full((k // 16, n), 0.5).to(torch.float8_e4m3fn)
        sd[mod + ".wcscales"] = torch.ones(n, dtype=torch.bfloat16)
        sd[mod + ".wtscale"] = torch.tensor(1.0, dtype=torch.float32)
    return sd, meta
