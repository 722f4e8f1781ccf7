"""Test-side PACKER for Nunchaku checkpoints, written from shared/specs/nunchaku-format.md.

Each function is the inverse of one unpack rule of the spec: natural (ComfyUI / kitchen) tensors
in, Nunchaku tile-order tensors out. It deliberately imports nothing from ``comfy.quant`` so the
round-trip tests compare two independent implementations of the spec.
"""
from __future__ import annotations

import json
import math

import torch

GROUP = 64


# ---------------------------------------------------------------- kitchen side (natural layout)

def kitchen_pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes ([-8, 7] or [0, 15]) -> (N, K/2) int8, low nibble = even column."""
    c = codes.to(torch.int32) & 0xF
    out = c[:, 0::2] + 16 * c[:, 1::2]          # 0..255
    out = torch.where(out >= 128, out - 256, out)  # reinterpret as signed byte
    return out.to(torch.int8)


def kitchen_unpack(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    b = packed.to(torch.int32) & 0xFF
    lo, hi = b & 0xF, b >> 4
    if signed:
        lo = torch.where(lo >= 8, lo - 16, lo)
        hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------- W4A4 packers (spec §3 inverses)

def pack_w4a4_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Natural signed codes (N, K) in [-8, 7] -> Nunchaku qweight (N, K/2) int8 in tile order.

    Natural n = nt*128 + np*16 + ns*8 + nl, k = kt*64 + ks*32 + kl*8 + r; int32 words are laid out
    (nt, kt, np, nl, kl, ns, ks) and hold nibble r at bits 4r, little-endian.
    """
    n, k = codes.shape
    c = codes.to(torch.int64).reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8)  # nt np ns nl kt ks kl r
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7)                                    # nt kt np nl kl ns ks r
    word = torch.zeros(c.shape[:-1], dtype=torch.int64)
    for r in range(8):
        word |= (c[..., r] & 0xF) << (4 * r)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.reshape(n, k // 8).view(torch.int8).reshape(n, k // 2)


def pack_w4a4_wscales(scales: torch.Tensor) -> torch.Tensor:
    """Natural (G, N) -> Nunchaku wscales, stored shape (G, N) but memory in tile order."""
    g, n = scales.shape
    nat = scales.t().reshape(n // 128, 8, 2, 4, 2, g)  # n = nt*128 + a*16 + c*8 + b*2 + d ; axes nt a c b d g
    return nat.permute(0, 5, 1, 3, 2, 4).contiguous().reshape(g, n)  # nt g a b c d


def pack_chunk16(vec: torch.Tensor) -> torch.Tensor:
    """Natural (L,) -> 16-chunk stored order [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15] per 16."""
    order = torch.tensor([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15])
    idx = (torch.arange(vec.shape[0] // 16).unsqueeze(1) * 16 + order).reshape(-1)
    return vec[idx].contiguous()


def pack_proj_up(up: torch.Tensor) -> torch.Tensor:
    """Natural (N, R) -> stored; natural n = nb*16 + c*8 + a, r = rb*16 + d*8 + b*2 + e."""
    n, r = up.shape
    nat = up.reshape(n // 16, 2, 8, r // 16, 2, 4, 2)  # nb c a rb d b e
    return nat.permute(0, 3, 2, 5, 1, 4, 6).contiguous().reshape(n, r)  # nb rb a b c d e


def pack_proj_down(down_kr: torch.Tensor) -> torch.Tensor:
    """Kitchen proj_down (K, R) = Aᵀ -> stored (K, R); A (R, K): r = rb*16 + c*8 + a, k = kb*16 + d*8 + b*2 + e."""
    k, r = down_kr.shape
    a = down_kr.t().reshape(r // 16, 2, 8, k // 16, 2, 4, 2)  # rb c a kb d b e
    return a.permute(3, 0, 2, 5, 1, 4, 6).contiguous().reshape(k, r)  # kb rb a b c d e


# ---------------------------------------------------------------- AWQ packers (spec §4 inverses)

def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes (N, K) in [0, 15] -> Nunchaku AWQ qweight (N/4, K/2) int32.

    Within every 32 input channels, 16-bit word j holds k = j + 8t at nibble t; words are laid out
    (N/4, K/64, 4, 16) with row n = i*4 + (axis of 4).
    """
    n, k = codes.shape
    c = codes.to(torch.int64).reshape(n, k // 32, 4, 8).permute(0, 1, 3, 2)  # n, block, j, t
    words = c[..., 0] | (c[..., 1] << 4) | (c[..., 2] << 8) | (c[..., 3] << 12)  # (n, K/32, 8)
    words = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16).reshape(n, k // 4)
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).contiguous()
    return words.reshape(n // 4, k).view(torch.int32)


def interleave(t: torch.Tensor, s: int, dim: int = 0) -> torch.Tensor:
    """Planar -> Nunchaku modulation order: stored index d*S + j holds original j*D + d."""
    t = t.movedim(dim, 0)
    n = t.shape[0]
    out = t.reshape(s, n // s, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return out.movedim(0, dim).contiguous()


def pad_groups(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    g = t.shape[0]
    gp = math.ceil(g / multiple) * multiple
    if gp == g:
        return t
    return torch.cat([t, torch.zeros(gp - g, *t.shape[1:], dtype=t.dtype)], 0)


# ---------------------------------------------------------------- layer builders

def make_w4a4_layer(n, k, rank, gen, dtype=torch.bfloat16, bias=True, smooth_orig=False, hazard=False):
    """Returns (natural, stored). natural holds codes (N, K) int8 and kitchen-layout float tensors."""
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int64).to(torch.int8)
    codes[0, 0] = -8  # make sure the code -8 is present
    nat = {
        "codes": codes,
        "weight_scale": (torch.rand(k // GROUP, n, generator=gen) * 0.02 + 0.002).to(dtype),
        "weight_proj_down": (torch.randn(k, rank, generator=gen) * 0.05).to(dtype),
        "weight_proj_up": (torch.randn(n, rank, generator=gen) * 0.05).to(dtype),
        "weight_smooth_factor": (torch.rand(k, generator=gen) * 1.5 + 0.5).to(dtype),
    }
    if hazard:
        nat["weight_smooth_factor"] = torch.ones(k, dtype=dtype)
    if bias:
        nat["bias"] = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    stored = {
        "qweight": pack_w4a4_qweight(codes),
        "wscales": pack_w4a4_wscales(nat["weight_scale"]),
        "smooth_factor": pack_chunk16(nat["weight_smooth_factor"]),
        "proj_down": pack_proj_down(nat["weight_proj_down"]),
        "proj_up": pack_proj_up(nat["weight_proj_up"]),
    }
    if bias:
        stored["bias"] = pack_chunk16(nat["bias"])
    if smooth_orig or hazard:
        stored["smooth_factor_orig"] = pack_chunk16((torch.rand(k, generator=gen) * 1.5 + 0.5).to(dtype))
    return nat, stored


def make_awq_modulation_layer(d, k, gen, s=6, scale_slots=(1, 4), dtype=torch.bfloat16):
    """Modulation linear (K -> S*D). natural = planar codes/scales, Nunchaku zeros and biases;
    stored = the interleaved, +1-folded, padded Nunchaku tensors."""
    n = s * d
    g = k // GROUP
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)
    scale = (torch.rand(g, n, generator=gen) * 0.02 + 0.002).to(dtype)
    wzeros = (-7.0 * scale.float()).to(dtype)               # real files: symmetric, zero point 7
    wzeros[0, :3] = (torch.randn(3, generator=gen) * 0.05).to(dtype)  # and a few arbitrary ones
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    folded = bias.float().reshape(s, d).clone()
    for j in scale_slots:
        folded[j] += 1.0
    stored_bias = folded.reshape(n).to(dtype)               # the file holds bf16(1 + b)
    nat = {"codes": codes, "weight_scale": scale, "wzeros": wzeros, "bias": bias,
           "stored_bias_planar": stored_bias}
    stored = {
        "qweight": pack_awq_qweight(interleave(codes, s, 0)),
        "wscales": pad_groups(interleave(scale, s, 1)),
        "wzeros": pad_groups(interleave(wzeros, s, 1)),
        "bias": interleave(stored_bias, s, 0),
    }
    return nat, stored


QWEN_W4A4 = {
    # nunchaku module -> (ComfyUI names, act_unsigned)
    "attn.to_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), False),
    "attn.add_qkv_proj": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    "attn.to_out.0": (("attn.to_out.0",), False),
    "attn.to_add_out": (("attn.to_add_out",), False),
    "img_mlp.net.0.proj": (("img_mlp.net.0.proj",), False),
    "txt_mlp.net.0.proj": (("txt_mlp.net.0.proj",), False),
    "img_mlp.net.2": (("img_mlp.net.2",), True),
    "txt_mlp.net.2": (("txt_mlp.net.2",), True),
}


def _w4a4_shape(mod, dim):
    return {
        "attn.to_qkv": (3 * dim, dim), "attn.add_qkv_proj": (3 * dim, dim),
        "attn.to_out.0": (dim, dim), "attn.to_add_out": (dim, dim),
        "img_mlp.net.0.proj": (4 * dim, dim), "txt_mlp.net.0.proj": (4 * dim, dim),
        "img_mlp.net.2": (dim, 4 * dim), "txt_mlp.net.2": (dim, 4 * dim),
    }[mod]


def build_fake_qwen_image(num_blocks=2, heads=2, head_dim=128, joint_dim=128, rank=32,
                          dtype=torch.bfloat16, seed=0, hazard=False):
    """A tiny Nunchaku Qwen-Image checkpoint.

    Returns (stored_sd, metadata, natural) where natural maps every converted layer name to its
    natural tensors (``codes`` + kitchen-layout float tensors, or the AWQ natural dict), plus
    ``"float"`` -> {key: tensor} for the unquantized tensors and ``"unsigned"`` -> set of names.
    """
    gen = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    stored, natural, unsigned = {}, {"float": {}, "awq": {}, "w4a4": {}}, set()

    def flt(key, *shape):
        t = (torch.randn(*shape, generator=gen) * 0.1).to(dtype)
        stored[key] = t
        natural["float"][key] = t

    flt("img_in.weight", dim, 64); flt("img_in.bias", dim)
    flt("txt_norm.weight", joint_dim)
    flt("txt_in.weight", dim, joint_dim); flt("txt_in.bias", dim)
    flt("time_text_embed.timestep_embedder.linear_1.weight", dim, 256)
    flt("time_text_embed.timestep_embedder.linear_1.bias", dim)
    flt("norm_out.linear.weight", 2 * dim, dim); flt("norm_out.linear.bias", 2 * dim)
    flt("proj_out.weight", 64, dim); flt("proj_out.bias", 64)
    for b in range(num_blocks):
        p = f"transformer_blocks.{b}."
        for nm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            flt(p + f"attn.{nm}.weight", head_dim)
        for mod, (names, uns) in QWEN_W4A4.items():
            n, k = _w4a4_shape(mod, dim)
            nat, st = make_w4a4_layer(n, k, rank, gen, dtype, bias=True,
                                      smooth_orig=(mod == "attn.to_out.0"),
                                      hazard=(hazard and b == 0 and mod == "attn.to_out.0"))
            for key, v in st.items():
                stored[p + mod + "." + key] = v
            step = n // len(names)
            for i, name in enumerate(names):
                rows = slice(i * step, (i + 1) * step)
                natural["w4a4"][p + name] = {
                    "codes": nat["codes"][rows],
                    "weight_scale": nat["weight_scale"][:, rows],
                    "weight_proj_down": nat["weight_proj_down"],
                    "weight_proj_up": nat["weight_proj_up"][rows],
                    "weight_smooth_factor": nat["weight_smooth_factor"],
                    "bias": nat["bias"][rows],
                    "rank": rank,
                    "act_unsigned": uns,
                }
                if uns:
                    unsigned.add(p + name)
        for mod in ("img_mod.1", "txt_mod.1"):
            nat, st = make_awq_modulation_layer(dim, dim, gen, dtype=dtype)
            for key, v in st.items():
                stored[p + mod + "." + key] = v
            natural["awq"][p + mod] = {**nat, "stored": st}
    natural["unsigned"] = unsigned
    config = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": head_dim,
              "axes_dims_rope": [16, 56, 56], "in_channels": 64, "joint_attention_dim": joint_dim,
              "num_attention_heads": heads, "num_layers": num_blocks, "out_channels": 16, "patch_size": 2}
    qconfig = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
               "activation": {"dtype": "int4", "scale_dtype": None, "unsigned": False, "group_size": 64},
               "rank": rank}
    metadata = {"config": json.dumps(config), "model_class": "NunchakuQwenImageTransformer2DModel",
                "quantization_config": json.dumps(qconfig)}
    return stored, metadata, natural
