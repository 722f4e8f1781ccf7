"""Tiny Z-Image-Turbo (NextDiT) and Flux.1 model fixtures: float, Nunchaku int4 and ComfyUI-native int4.

Test-side foundation for issue #11, written from shared/specs/nunchaku-format.md, formats.md and
comfyui-core.md and from READING upstream ComfyUI's model code for names and shapes
(comfy/ldm/lumina/model.py, comfy/ldm/flux/{model,layers}.py, comfy/model_detection.py,
comfy/supported_models.py). Nothing here imports ``comfy.quant``: the tile packing comes from the
independent test-side packer ``nunchaku_packer.py``, and the unpackers below (``from_nunchaku``) are a
second, independent implementation of the spec's unpack rules, so a library converter can be checked
against two implementations that share no code with it.

API (``arch`` is ``"zimage"`` or ``"flux"``; ``cfg`` defaults to ``tiny_config(arch)``)
-----------------------------------------------------------------------------------
* ``tiny_config(arch)`` -> ``ZImageConfig`` / ``FluxConfig``.
* ``comfy_shapes(arch, cfg)`` -> ``{key: shape}``: exactly the state dict upstream's model has when
  upstream's loader builds it for such a file (checked against real upstream by test_arch_fixtures.py).
* ``comfy_float_state_dict(arch, cfg=None, seed=0, dtype=torch.bfloat16)``: seeded float weights with
  those keys and shapes, shaped like trained weights (a few strong singular directions over noise and a
  handful of outlier input channels, as comfy/quant_tools/demo.py's synthetic_state_dict does).
* ``natural_int4(arch, cfg=None, seed=0)`` -> ``nat``: natural-layout int4 tensors per Nunchaku module
  (see "natural tensors" below), plus the unquantized tensors under ComfyUI names.
* ``to_nunchaku(nat)`` -> ``(state dict, metadata)``: the Nunchaku file holding ``nat`` (Nunchaku's module
  names, GPU-tile order, AWQ output interleave, "+1" folded, group axis padded, diffusers names for the
  unquantized tensors, ``model_class`` / ``config`` / ``quantization_config`` (+ Flux ``comfy_config``)).
* ``from_nunchaku(sd, metadata, cfg=None)`` -> ``nat``: the test-side unpacker (spec §3-§5), the exact
  inverse of ``to_nunchaku``.
* ``native_layers(nat)`` -> ``{ComfyUI layer: (tensors, comfy_quant JSON)}`` and ``to_native(nat)`` ->
  ``(state dict, metadata)``: the ComfyUI-native int4 file a converter must produce from the Nunchaku file.
* ``w4a4_reference(x, tensors, conf, dtype)``: float64 reference of a native SVDQuant layer, including the
  input-split form used for Flux ``linear2`` (below).

Tiny configs
------------
* Z-Image: dim 384 = 3 heads x 128 (RoPE axes 32/48/48), 2 layers, 2 noise_refiner + 2 context_refiner,
  caption dim 128, 16 latent channels, patch 2, rank 32, ``skip_refiners`` (the released files' setting).
  Why 384 and not 256, and why 2 refiners:
  - upstream's NextDiT makes the FFN ``256·ceil(int(8/3·dim)/256)`` wide, diffusers' Z-Image (what
    Nunchaku quantized) ``int(dim/3·8)``; they agree (and are a multiple of 128, as W4A4 needs) only when
    dim is a multiple of 96: 384 -> 1024. At dim 256 diffusers would be 682 wide, upstream 768.
  - upstream's detection never reads ``n_refiner_layers``: NextDiT's default (2 each) is always built, so a
    file with 1 refiner each would load with missing keys.
  - the one shape that still differs from a tiny *diffusers* model: ``t_embedder``'s hidden width is
    ``min(dim, 1024)`` upstream but a fixed 1024 in diffusers (equal at the real dim 3840). The fixture's
    Nunchaku file uses upstream's shape (the tensor passes through a converter unchanged).
* Flux.1-dev: hidden 256 = 2 heads x 128 (axes 16/56/56), 2 double + 2 single blocks, MLP x4, T5 dim 128,
  CLIP-pooled dim 64, guidance embedder, 16 latent channels, patch 2, rank 32.

What upstream's detection reads (comfy/model_detection.py at 4f874c5; why the configs look as they do)
------------------------------------------------------------------------------------------------------
* Lumina 2 family: ``cap_embedder.1.weight`` + ``noise_refiner.0.attention.k_norm.weight``; dim and caption
  dim from ``cap_embedder.1.weight``, n_layers by counting ``layers.N.``; patch 2, in_channels 16 and
  qk_norm hardcoded. Then ``dim == 2304`` -> Lumina 2 (24 heads, 8 kv heads, ...), ``dim == 3840`` -> Z-Image
  (30 heads, axes 32/48/48, rope_theta 256, FFN x8/3, z_image_modulation, time_scale 1000,
  ``cap_pad_token`` -> pad_tokens_multiple 32, ``allow_fp16`` from layers.{n−2}.ffn_norm1, siglip /
  dec_net variants); any other dim gets NextDiT's defaults (32 heads, axes 16/56/56) and fails its
  ``dim // n_heads == sum(axes_dims)`` assertion. ``supported_models.ZImage`` also matches on
  ``dim: 3840``. Z-Image vs Lumina 2 is visible in the keys: Z-Image's block modulation is
  ``adaLN_modulation.0`` (no SiLU), Lumina 2's ``adaLN_modulation.1``.
* Flux family: ``double_blocks.0.img_attn.norm.key_norm.{weight,scale}`` and ``img_in.weight``; hidden size
  from ``img_in.weight``/``txt_in.weight`` rows, in_channels = ``img_in.weight`` columns / 4, context dim
  from ``txt_in.weight``, vec_in_dim from ``vector_in.in_layer.weight``, heads = hidden / 128 (axes
  16/56/56 hardcoded), depths by counting, guidance_embed from ``guidance_in.in_layer.weight`` (Flux vs
  FluxSchnell; FluxInpaint needs in_channels 96); out_channels 16, mlp_ratio 4, qkv_bias, theta 10000
  hardcoded; ``double_stream_modulation_img.lin.weight`` -> Flux 2. So a small Flux.1 loads as is.

Natural tensors (``nat``)
-------------------------
``{"arch", "cfg", "float": {ComfyUI key: tensor}, "w4a4": {Nunchaku module: entry}, "awq": {module: entry}}``.
* W4A4 entry: ``codes`` (N, K) int8 in [-8, 7] (-8 present), ``weight_scale`` (K/64, N),
  ``weight_proj_down`` (K, R) (= Aᵀ), ``weight_proj_up`` (N, R), ``weight_smooth_factor`` (K,),
  ``smooth_orig`` (K,) (what the file stores as smooth_factor_orig / smooth_orig), ``bias`` (N,) when the
  module has one, ``act_unsigned``. All bf16.
* AWQ entry (planar output order, ComfyUI's chunk order): ``codes`` (N, K) uint8 in [0, 15],
  ``weight_scale`` and kitchen ``weight_zeros`` (W = (q − 8)·s + z) (K/64, N), ``bias`` (N,) without the
  "+1", ``s`` (interleave factor), ``scale_slots``.
* ``float``: every tensor of ``comfy_float_state_dict(arch, cfg, seed)`` that is not part of a quantized
  layer (same values, so a native int4 file and the float file share their unquantized tensors).

Exactness guarantees (what "exact" means for each conversion)
-------------------------------------------------------------
* W4A4: Nunchaku -> native is a permutation, a split or a concatenation of stored values (plus exact
  zeros for the block structure of fused low-rank branches): bit-exact for ANY values.
* AWQ: scales ``s = k·2⁻¹⁰`` (k in [1, 15]) and kitchen zeros ``z = j·2⁻¹⁰`` (j in [−16, 16]), so
  Nunchaku's ``wzeros = z − 8s = (j − 8k)·2⁻¹⁰`` (|j − 8k| ≤ 136 < 2⁸) is exact in bf16 and the converter's
  ``wzeros + 8·wscales`` (fp32, rounded to bf16 once) returns ``z`` exactly. Modulation biases
  ``b = m·2⁻⁷`` (m in [−64, 64]): ``1 + b`` has at most 8 significant bits, so ``bf16(1 + b) = 1 + b``
  and the fp32 subtraction of 1 returns ``b`` exactly. (``to_nunchaku`` asserts both.)
* Float tensors: renames, splits/concatenations (q/k/v, Z-Image's [w3; w1]) and Flux's final-layer half
  swap: exact.
* Flux ``linear2`` bias = ``out_proj`` bias + ``mlp_fc2`` bias; ``out_proj`` stores a zero bias (as real
  files do), so the sum is exact (asserted).

Flux single blocks: how ``linear1`` and ``linear2`` become native layers
------------------------------------------------------------------------
ComfyUI's SingleStreamBlock has ``linear1`` (dim -> 3·dim + 4·dim: [q; k; v; mlp]) and ``linear2``
(dim + 4·dim -> dim, applied to cat(attention output, GELU(mlp))). Nunchaku splits both.

``linear1`` = ``qkv_proj`` (rows 0..3·dim) + ``mlp_fc1`` (rows 3·dim..7·dim), an OUTPUT-axis split whose parts
share one smooth factor (deepcompressor smooths ``proj_mlp`` with ``to_q``'s factor) and are both signed.
Everything per output row concatenates; the two low-rank branches have different A's, so the native layer
has rank 2R: ``proj_down = [D_qkv | D_mlp]`` (dim, 2R), ``proj_up`` block-diagonal ((7·dim, 2R): rows of the
qkv part use columns 0..R, rows of the mlp part columns R..2R). ONE plain kitchen layer, exact.

``linear2`` = ``out_proj`` (input columns 0..dim, the attention output: SIGNED activations, smooth folded
to 1, zero bias) + ``mlp_fc2`` (input columns dim..5·dim, the GELU output: UNSIGNED activations, own smooth
factor, the whole shift-compensated bias), an INPUT-axis split. Per-input-channel tensors (codes columns,
scale groups, smooth) concatenate, the 64-groups do not straddle the boundary (dim is a multiple of 64),
the low-rank branch sees the raw input so it separates exactly (``proj_down`` block-diagonal (5·dim, 2R),
``proj_up = [U_out | U_fc2]``), and the biases add. What does NOT concatenate is ``act_unsigned``: kitchen
quantizes a whole layer's activations either signed (absmax/7 on [−7, 7]) or unsigned (x + 0.171875,
absmax/15 on [0, 15]); neither grid reproduces the other half, so no single kitchen layer (one bool) is
exact. Decision: ``linear2`` stays ONE native layer under ComfyUI's own name, with the tensors concatenated
along K as above and its layer JSON carrying the split:
``{"format": "svdquant_w4a4", "group_size": 64, "rank": 2R, "act_unsigned": [false, true],
"in_splits": [dim, 4·dim]}``. A runtime evaluates it as two kitchen calls on the column/group/row slices of
the same tensors (segment i: weight[:, bytes of i], weight_scale[groups of i], smooth[i],
proj_down[rows of i] (2R columns, the other segment's columns exact zeros), the full proj_up,
act_unsigned[i]) summed, plus the bias once: mathematically exactly Nunchaku's out_proj(attn) +
mlp_fc2(mlp). Why not two layers under new names: upstream's block calls one ``linear2`` on the
concatenated input, its LoRA key map targets ``linear2`` (diffusers ``proj_out``), ComfyUI's LoRA offsets
address only the output axis, and the dense equivalent of the one layer, [W_out | W_fc2], is what a LoRA
for ``linear2`` is a delta of (an extra-rank branch on the whole input stays exact). Why a LIST for
``act_unsigned``: the only per-layer fact that cannot be concatenated is made explicit, and a reader that
only knows the bool form refuses it loudly (this project's loader already raises QuantizedLayerError for a
non-bool act_unsigned) instead of silently running one half on the wrong grid. ``w4a4_reference``
implements exactly this semantics.

Z-Image ``feed_forward.net.0.proj`` is fused **[w3; w1]** (diffusers' SwiGLU: first half the linear branch,
second half the gate that gets SiLU): ComfyUI's ``w3`` = rows 0..F, ``w1`` = rows F..2F, both sharing
``proj_down`` and the smooth factor (two plain layers, rank R each).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import zlib
from dataclasses import dataclass, replace

import torch

import nunchaku_packer as P

GROUP = 64
BF16 = torch.bfloat16
ARCHS = ("zimage", "flux")


# ============================================================================================ configs

@dataclass(frozen=True)
class ZImageConfig:
    dim: int = 384
    n_heads: int = 3
    n_layers: int = 2
    n_refiner_layers: int = 2        # upstream always builds NextDiT's default 2 (detection never reads it)
    cap_feat_dim: int = 128
    in_channels: int = 16
    patch_size: int = 2
    rank: int = 32
    skip_refiners: bool = True       # True: refiners stay bf16, diffusers layout (the released files)
    ffn_dim_multiplier: float = 8.0 / 3.0
    multiple_of: int = 256

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self):
        """Upstream NextDiT's FeedForward width; asserted equal to diffusers' int(dim / 3 * 8)."""
        h = int(self.ffn_dim_multiplier * self.dim)
        h = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        return h

    @property
    def t_hidden(self):
        return min(self.dim, 1024)

    @property
    def adaln_dim(self):
        return min(self.dim, 256)

    @property
    def patch_features(self):
        return self.patch_size * self.patch_size * self.in_channels

    def check(self):
        assert self.head_dim == 128 and self.dim == self.n_heads * 128, "head dim 128 (RoPE axes 32/48/48)"
        assert self.ffn_hidden == int(self.dim / 3 * 8), (
            f"dim {self.dim}: upstream FFN width {self.ffn_hidden} != diffusers' {int(self.dim / 3 * 8)}")
        for n in (self.dim, self.ffn_hidden):
            assert n % 128 == 0, f"W4A4 needs widths that are multiples of 128, got {n}"
        assert self.rank % 16 == 0
        return self


@dataclass(frozen=True)
class FluxConfig:
    hidden_size: int = 256
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2
    context_in_dim: int = 128
    vec_in_dim: int = 64
    guidance_embed: bool = True      # Flux.1-dev (FluxSchnell without)
    in_channels: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    rank: int = 32
    fold_out_smooth: bool = True     # deepcompressor's default: every out_proj* stores smooth = 1

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_features(self):
        return self.patch_size * self.patch_size * self.in_channels

    def check(self):
        assert self.head_dim == 128, "head dim 128 (RoPE axes 16/56/56, which upstream's detection hardcodes)"
        assert self.in_channels == 16 and self.patch_size == 2, "upstream's detection hardcodes out_channels 16, patch 2"
        for n in (self.hidden_size, self.mlp_hidden):
            assert n % 128 == 0
        assert self.rank % 16 == 0
        return self


def tiny_config(arch: str):
    """The default tiny config of ``arch`` (see the module docstring)."""
    if arch == "zimage":
        return ZImageConfig().check()
    if arch == "flux":
        return FluxConfig().check()
    raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")


def _cfg(arch, cfg):
    cfg = tiny_config(arch) if cfg is None else cfg
    want = ZImageConfig if arch == "zimage" else FluxConfig
    if not isinstance(cfg, want):
        raise TypeError(f"{arch}: expected {want.__name__}, got {type(cfg).__name__}")
    return cfg.check()


# ============================================================================================ shapes

def _zimage_blocks(cfg: ZImageConfig):
    """(prefix, modulated, quantized) of every transformer block, in state-dict order."""
    out = []
    for i in range(cfg.n_refiner_layers):
        out.append((f"noise_refiner.{i}", True, not cfg.skip_refiners))
    for i in range(cfg.n_refiner_layers):
        out.append((f"context_refiner.{i}", False, not cfg.skip_refiners))
    for i in range(cfg.n_layers):
        out.append((f"layers.{i}", True, True))
    return out


def _zimage_shapes(cfg: ZImageConfig) -> dict:
    d, f, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
    s = {
        "x_embedder.weight": (d, cfg.patch_features), "x_embedder.bias": (d,),
        "x_pad_token": (1, d), "cap_pad_token": (1, d),
        "cap_embedder.0.weight": (cfg.cap_feat_dim,),
        "cap_embedder.1.weight": (d, cfg.cap_feat_dim), "cap_embedder.1.bias": (d,),
        "t_embedder.mlp.0.weight": (cfg.t_hidden, 256), "t_embedder.mlp.0.bias": (cfg.t_hidden,),
        "t_embedder.mlp.2.weight": (256, cfg.t_hidden), "t_embedder.mlp.2.bias": (256,),
        "final_layer.linear.weight": (cfg.patch_features, d), "final_layer.linear.bias": (cfg.patch_features,),
        "final_layer.adaLN_modulation.1.weight": (d, cfg.adaln_dim), "final_layer.adaLN_modulation.1.bias": (d,),
    }
    for p, modulated, _ in _zimage_blocks(cfg):
        s[f"{p}.attention.qkv.weight"] = (3 * d, d)            # n_kv_heads = n_heads, no bias
        s[f"{p}.attention.out.weight"] = (d, d)                # out_bias False
        s[f"{p}.attention.q_norm.weight"] = (hd,)
        s[f"{p}.attention.k_norm.weight"] = (hd,)
        s[f"{p}.feed_forward.w1.weight"] = (f, d)
        s[f"{p}.feed_forward.w2.weight"] = (d, f)
        s[f"{p}.feed_forward.w3.weight"] = (f, d)
        for nm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s[f"{p}.{nm}.weight"] = (d,)
        if modulated:                                          # z_image_modulation: Sequential(Linear) -> ".0"
            s[f"{p}.adaLN_modulation.0.weight"] = (4 * d, cfg.adaln_dim)
            s[f"{p}.adaLN_modulation.0.bias"] = (4 * d,)
    return s


def _flux_shapes(cfg: FluxConfig) -> dict:
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    s = {}

    def lin(key, n, k):
        s[key + ".weight"] = (n, k)
        s[key + ".bias"] = (n,)

    lin("img_in", d, cfg.patch_features)
    lin("time_in.in_layer", d, 256)
    lin("time_in.out_layer", d, d)
    lin("vector_in.in_layer", d, cfg.vec_in_dim)
    lin("vector_in.out_layer", d, d)
    if cfg.guidance_embed:
        lin("guidance_in.in_layer", d, 256)
        lin("guidance_in.out_layer", d, d)
    lin("txt_in", d, cfg.context_in_dim)
    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        for st in ("img", "txt"):
            lin(f"{p}.{st}_mod.lin", 6 * d, d)
            lin(f"{p}.{st}_attn.qkv", 3 * d, d)               # qkv_bias True for Flux.1
            s[f"{p}.{st}_attn.norm.query_norm.weight"] = (hd,)
            s[f"{p}.{st}_attn.norm.key_norm.weight"] = (hd,)
            lin(f"{p}.{st}_attn.proj", d, d)
            lin(f"{p}.{st}_mlp.0", m, d)
            lin(f"{p}.{st}_mlp.2", d, m)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * d + m, d)
        lin(f"{p}.linear2", d, d + m)
        s[f"{p}.norm.query_norm.weight"] = (hd,)
        s[f"{p}.norm.key_norm.weight"] = (hd,)
        lin(f"{p}.modulation.lin", 3 * d, d)
    lin("final_layer.linear", cfg.patch_features, d)
    lin("final_layer.adaLN_modulation.1", 2 * d, d)
    return s


def comfy_shapes(arch: str, cfg=None) -> dict:
    """``{key: shape}`` of upstream's diffusion model for ``arch`` at ``cfg`` (ComfyUI naming)."""
    cfg = _cfg(arch, cfg)
    return _zimage_shapes(cfg) if arch == "zimage" else _flux_shapes(cfg)


def _float_tensor(key: str, shape: tuple, seed: int) -> torch.Tensor:
    """One float tensor, from its own generator (seeded by ``seed`` and the key), in fp32."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode("utf-8")))
    if key.endswith(".weight") and len(shape) == 2:
        n, k = shape
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        r = min(8, n, k)
        w += 3 * (torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g)) / math.sqrt(k * r)
        outliers = torch.randint(0, k, (max(1, k // 64),), generator=g)
        w[:, outliers] *= 4
        return w
    if key.endswith(".bias"):
        return torch.randn(shape, generator=g) * 0.02
    if key.endswith("pad_token"):
        return torch.randn(shape, generator=g) * 0.5
    return 1 + 0.1 * torch.randn(shape, generator=g)


@functools.lru_cache(maxsize=8)
def _float_cached(arch, cfg, seed, dtype, keys):
    shapes = comfy_shapes(arch, cfg)
    return {k: _float_tensor(k, shapes[k], seed).to(dtype) for k in (keys if keys is not None else shapes)}


def comfy_float_state_dict(arch: str, cfg=None, seed: int = 0, dtype=BF16, keys=None) -> dict:
    """A seeded float state dict with exactly ``comfy_shapes(arch, cfg)``'s keys and shapes (or just ``keys``).

    2-D weights: N(0, 1/K) noise + 3·(a rank-8 product)/√(K·8) + ×4 on K/64 random input channels
    (the strong singular directions SVDQuant's branch takes and the outliers its smoothing is for);
    biases N(0, 0.02²); 1-D weights (norm scales) 1 + N(0, 0.1²); pad tokens N(0, 0.5²). Each tensor comes
    from its own generator seeded by (seed, key), so a subset (``keys``) has the same values as the full
    dict, and the same (arch, cfg, seed, dtype) always gives bit-identical tensors. Results are cached;
    every call returns fresh copies."""
    cfg = _cfg(arch, cfg)
    keys = None if keys is None else tuple(keys)
    if keys is not None:
        unknown = set(keys) - set(comfy_shapes(arch, cfg))
        if unknown:
            raise KeyError(f"{arch}: not keys of the model: {sorted(unknown)[:5]}")
    return {k: v.clone() for k, v in _float_cached(arch, cfg, seed, dtype, keys).items()}


# ============================================================================================ plan

@dataclass(frozen=True)
class W4A4Module:
    """One Nunchaku W4A4 module: (N, K), signedness, which bias / smoothing it stores."""
    n: int
    k: int
    act_unsigned: bool = False
    bias: str | None = "random"      # "random" | "zero" | None (no bias tensor)
    smooth: str = "own"              # "own" | "ones" | "shared:<group>"
    smooth_orig: str = "same"        # "same" (= smooth) | "shared:<group>"


@dataclass(frozen=True)
class AWQModule:
    d: int                           # output chunk width D (N = s·D)
    k: int
    s: int                           # output interleave factor
    scale_slots: tuple


@dataclass(frozen=True)
class NativeLayer:
    """How one ComfyUI layer is made from Nunchaku modules.

    kind: "w4a4" (one module as is), "rows" (rows [start, stop) of one module), "cat_out" (modules
    concatenated on the output axis, rank ΣR, block-diagonal proj_up), "cat_in" (modules concatenated on the
    input axis, rank ΣR, block-diagonal proj_down, act_unsigned per segment), "awq"."""
    kind: str
    sources: tuple
    rows: tuple | None = None


@dataclass
class Plan:
    w4a4: dict          # Nunchaku module -> W4A4Module
    awq: dict           # Nunchaku module -> AWQModule
    native: dict        # ComfyUI layer -> NativeLayer
    floats: list        # (comfy keys, nunchaku keys, transform)


def _zimage_plan(cfg: ZImageConfig) -> Plan:
    d, f = cfg.dim, cfg.ffn_hidden
    w4a4, native, floats = {}, {}, []

    def same(ck, nk=None):
        floats.append(((ck,), (nk or ck,), "same"))

    for name in ("x_embedder.weight", "x_embedder.bias", "final_layer.linear.weight", "final_layer.linear.bias",
                 "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        top, rest = name.split(".", 1)
        same(name, f"all_{top}.{cfg.patch_size}-1.{rest}")    # diffusers: all_x_embedder.2-1, all_final_layer.2-1
    for name in ("x_pad_token", "cap_pad_token", "cap_embedder.0.weight", "cap_embedder.1.weight",
                 "cap_embedder.1.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                 "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"):
        same(name)
    for p, modulated, quantized in _zimage_blocks(cfg):
        same(f"{p}.attention.q_norm.weight", f"{p}.attention.norm_q.weight")
        same(f"{p}.attention.k_norm.weight", f"{p}.attention.norm_k.weight")
        for nm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            same(f"{p}.{nm}.weight")
        if modulated:
            same(f"{p}.adaLN_modulation.0.weight")
            same(f"{p}.adaLN_modulation.0.bias")
        if quantized:
            w4a4[f"{p}.attention.to_qkv"] = W4A4Module(3 * d, d, bias=None)
            w4a4[f"{p}.attention.to_out.0"] = W4A4Module(d, d, bias=None)
            w4a4[f"{p}.feed_forward.net.0.proj"] = W4A4Module(2 * f, d, bias=None)
            w4a4[f"{p}.feed_forward.net.2"] = W4A4Module(d, f, bias=None)   # after SwiGLU: signed
            native[f"{p}.attention.qkv"] = NativeLayer("w4a4", (f"{p}.attention.to_qkv",))
            native[f"{p}.attention.out"] = NativeLayer("w4a4", (f"{p}.attention.to_out.0",))
            native[f"{p}.feed_forward.w3"] = NativeLayer("rows", (f"{p}.feed_forward.net.0.proj",), (0, f))
            native[f"{p}.feed_forward.w1"] = NativeLayer("rows", (f"{p}.feed_forward.net.0.proj",), (f, 2 * f))
            native[f"{p}.feed_forward.w2"] = NativeLayer("w4a4", (f"{p}.feed_forward.net.2",))
        else:   # bf16 refiner in diffusers layout
            floats.append(((f"{p}.attention.qkv.weight",),
                           tuple(f"{p}.attention.{x}.weight" for x in ("to_q", "to_k", "to_v")), "split_rows"))
            same(f"{p}.attention.out.weight", f"{p}.attention.to_out.0.weight")
            floats.append(((f"{p}.feed_forward.w1.weight", f"{p}.feed_forward.w3.weight"),
                           (f"{p}.feed_forward.net.0.proj.weight",), "fuse_w3_w1"))
            same(f"{p}.feed_forward.w2.weight", f"{p}.feed_forward.net.2.weight")
    return Plan(w4a4, {}, native, floats)


FLUX_TOP_FLOATS = {   # ComfyUI module -> diffusers module (what Nunchaku's Flux files hold unquantized)
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def _flux_plan(cfg: FluxConfig) -> Plan:
    d, m = cfg.hidden_size, cfg.mlp_hidden
    w4a4, awq, native, floats = {}, {}, {}, []
    for cm, dm in FLUX_TOP_FLOATS.items():
        if cm.startswith("guidance_in") and not cfg.guidance_embed:
            continue
        for end in ("weight", "bias"):
            floats.append(((f"{cm}.{end}",), (f"{dm}.{end}",), "same"))
    for end in ("weight", "bias"):   # diffusers' norm_out.linear is [scale; shift], ComfyUI's [shift; scale]
        floats.append(((f"final_layer.adaLN_modulation.1.{end}",), (f"norm_out.linear.{end}",), "swap_halves"))

    def out_smooth(group):
        if cfg.fold_out_smooth:
            return dict(smooth="ones", smooth_orig=f"shared:{group}")
        return {}

    for i in range(cfg.depth):
        p, q = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for st, sfx, norms in (("img", "", ("norm_q", "norm_k")), ("txt", "_context", ("norm_added_q", "norm_added_k"))):
            ctx = "context_" if st == "txt" else ""
            w4a4[f"{q}.qkv_proj{sfx}"] = W4A4Module(3 * d, d)
            w4a4[f"{q}.out_proj{sfx}"] = W4A4Module(d, d, **out_smooth(f"{q}.out_proj"))   # img & txt share one
            w4a4[f"{q}.mlp_{ctx}fc1"] = W4A4Module(m, d)
            w4a4[f"{q}.mlp_{ctx}fc2"] = W4A4Module(d, m, act_unsigned=True)
            awq[f"{q}.norm1{sfx}.linear"] = AWQModule(d, d, 6, (1, 4))
            native[f"{p}.{st}_attn.qkv"] = NativeLayer("w4a4", (f"{q}.qkv_proj{sfx}",))
            native[f"{p}.{st}_attn.proj"] = NativeLayer("w4a4", (f"{q}.out_proj{sfx}",))
            native[f"{p}.{st}_mlp.0"] = NativeLayer("w4a4", (f"{q}.mlp_{ctx}fc1",))
            native[f"{p}.{st}_mlp.2"] = NativeLayer("w4a4", (f"{q}.mlp_{ctx}fc2",))
            native[f"{p}.{st}_mod.lin"] = NativeLayer("awq", (f"{q}.norm1{sfx}.linear",))
            floats.append(((f"{p}.{st}_attn.norm.query_norm.weight",), (f"{q}.{norms[0]}.weight",), "same"))
            floats.append(((f"{p}.{st}_attn.norm.key_norm.weight",), (f"{q}.{norms[1]}.weight",), "same"))
    for i in range(cfg.depth_single_blocks):
        p, q = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        w4a4[f"{q}.qkv_proj"] = W4A4Module(3 * d, d, smooth=f"shared:{q}.linear1")
        w4a4[f"{q}.mlp_fc1"] = W4A4Module(m, d, smooth=f"shared:{q}.linear1")
        w4a4[f"{q}.out_proj"] = W4A4Module(d, d, bias="zero", **out_smooth(f"{q}.out_proj"))
        w4a4[f"{q}.mlp_fc2"] = W4A4Module(d, m, act_unsigned=True)
        awq[f"{q}.norm.linear"] = AWQModule(d, d, 3, (1,))
        native[f"{p}.linear1"] = NativeLayer("cat_out", (f"{q}.qkv_proj", f"{q}.mlp_fc1"))
        native[f"{p}.linear2"] = NativeLayer("cat_in", (f"{q}.out_proj", f"{q}.mlp_fc2"))
        native[f"{p}.modulation.lin"] = NativeLayer("awq", (f"{q}.norm.linear",))
        floats.append(((f"{p}.norm.query_norm.weight",), (f"{q}.norm_q.weight",), "same"))
        floats.append(((f"{p}.norm.key_norm.weight",), (f"{q}.norm_k.weight",), "same"))
    return Plan(w4a4, awq, native, floats)


def plan(arch: str, cfg=None) -> Plan:
    """Which Nunchaku modules the file has, how ComfyUI layers are made of them, how floats are renamed."""
    cfg = _cfg(arch, cfg)
    return _zimage_plan(cfg) if arch == "zimage" else _flux_plan(cfg)


def quantized_comfy_keys(arch: str, cfg=None) -> set:
    """The float-model keys that an int4 file replaces by int4 layers (each layer's weight and bias)."""
    shapes = comfy_shapes(arch, cfg)
    keys = set()
    for layer in plan(arch, cfg).native:
        keys |= {k for k in (f"{layer}.weight", f"{layer}.bias") if k in shapes}
    return keys


# ============================================================================================ natural

def _bf16(t):
    return t.to(BF16)


def natural_int4(arch: str, cfg=None, seed: int = 0) -> dict:
    """Natural-layout int4 tensors of the whole tiny model (see the module docstring for the layout).

    Seeded and deterministic. W4A4 values are arbitrary bf16 (their conversion is exact for any values);
    AWQ values are on the exact grids described above. Smooth factors follow the plan: Flux single-block
    ``qkv_proj`` and ``mlp_fc1`` share one; with ``fold_out_smooth`` every Flux ``out_proj*`` has smooth 1 and
    a ``smooth_orig`` shared by the img/txt out projections of a block. Cached; every call returns a
    fresh deep copy."""
    return copy.deepcopy(_natural_cached(arch, _cfg(arch, cfg), seed))


@functools.lru_cache(maxsize=8)
def _natural_cached(arch, cfg, seed):
    pl = plan(arch, cfg)
    quantized = quantized_comfy_keys(arch, cfg)
    keys = [k for k in comfy_shapes(arch, cfg) if k not in quantized]
    g = torch.Generator().manual_seed(1_000_003 + seed)
    nat = {"arch": arch, "cfg": cfg, "float": comfy_float_state_dict(arch, cfg, seed, keys=keys),
           "w4a4": {}, "awq": {}}
    shared = {}

    def smooth_vec(spec, k):
        if spec == "ones":
            return torch.ones(k, dtype=BF16)
        draw = lambda: _bf16(torch.rand(k, generator=g) * 1.5 + 0.5)  # noqa: E731
        if spec.startswith("shared:"):
            if spec not in shared:
                shared[spec] = draw()
            return shared[spec].clone()
        return draw()

    for mod, spec in pl.w4a4.items():
        n, k = spec.n, spec.k
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int64).to(torch.int8)
        codes[0, 0] = -8
        e = {
            "codes": codes,
            "weight_scale": _bf16(torch.rand(k // GROUP, n, generator=g) * 0.02 + 0.002),
            "weight_proj_down": _bf16(torch.randn(k, cfg.rank, generator=g) * 0.05),
            "weight_proj_up": _bf16(torch.randn(n, cfg.rank, generator=g) * 0.05),
            "act_unsigned": spec.act_unsigned,
        }
        e["weight_smooth_factor"] = smooth_vec(spec.smooth, k)
        e["smooth_orig"] = e["weight_smooth_factor"].clone() if spec.smooth_orig == "same" else smooth_vec(spec.smooth_orig, k)
        if spec.bias == "random":
            e["bias"] = _bf16(torch.randn(n, generator=g) * 0.1)
        elif spec.bias == "zero":
            e["bias"] = torch.zeros(n, dtype=BF16)
        nat["w4a4"][mod] = e
    for mod, spec in pl.awq.items():
        n, k = spec.s * spec.d, spec.k
        kq = torch.randint(1, 16, (k // GROUP, n), generator=g)
        jz = torch.randint(-16, 17, (k // GROUP, n), generator=g)
        nat["awq"][mod] = {
            "codes": torch.randint(0, 16, (n, k), generator=g).to(torch.uint8),
            "weight_scale": _bf16(kq * 2.0 ** -10),
            "weight_zeros": _bf16(jz * 2.0 ** -10),
            "bias": _bf16(torch.randint(-64, 65, (n,), generator=g) * 2.0 ** -7),
            "s": spec.s, "scale_slots": tuple(spec.scale_slots),
        }
    return nat


# ============================================================================================ Nunchaku file

W4A4_KEYS = {   # natural name -> stored name (current files: Qwen-Image, Z-Image)
    "smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "down": "proj_down", "up": "proj_up"}
W4A4_KEYS_LEGACY = {"smooth": "smooth", "smooth_orig": "smooth_orig", "down": "lora_down", "up": "lora_up"}  # Flux


def _w4a4_names(arch):
    return W4A4_KEYS_LEGACY if arch == "flux" else W4A4_KEYS


def _float_to_nunchaku(floats_plan, comfy: dict) -> dict:
    out = {}
    for cks, nks, how in floats_plan:
        if how == "same":
            out[nks[0]] = comfy[cks[0]].clone()
        elif how == "swap_halves":
            a, b = comfy[cks[0]].chunk(2, 0)
            out[nks[0]] = torch.cat([b, a], 0).contiguous()
        elif how == "split_rows":
            for nk, part in zip(nks, comfy[cks[0]].chunk(len(nks), 0)):
                out[nk] = part.contiguous()
        elif how == "fuse_w3_w1":   # cks = (w1, w3) -> [w3; w1]
            out[nks[0]] = torch.cat([comfy[cks[1]], comfy[cks[0]]], 0).contiguous()
        else:
            raise AssertionError(how)
    return out


def _float_from_nunchaku(floats_plan, sd: dict) -> dict:
    out = {}
    for cks, nks, how in floats_plan:
        if how == "same":
            out[cks[0]] = sd[nks[0]].clone()
        elif how == "swap_halves":
            a, b = sd[nks[0]].chunk(2, 0)
            out[cks[0]] = torch.cat([b, a], 0).contiguous()
        elif how == "split_rows":
            out[cks[0]] = torch.cat([sd[nk] for nk in nks], 0).contiguous()
        elif how == "fuse_w3_w1":
            w3, w1 = sd[nks[0]].chunk(2, 0)
            out[cks[0]], out[cks[1]] = w1.contiguous(), w3.contiguous()
        else:
            raise AssertionError(how)
    return out


def awq_nunchaku_tensors(a: dict) -> dict:
    """Nunchaku-order tensors of one AWQ module before packing: interleaved codes rows, interleaved
    (unpadded) wscales/wzeros columns with wzeros = z − 8s, bias interleaved with bf16(1 + b) at the scale
    slots. Stored index d·S + j holds planar j·D + d. Asserts the exactness of the value choices."""
    s_ = a["s"]
    s, z = a["weight_scale"], a["weight_zeros"]
    wzeros = (z.double() - 8 * s.double()).to(BF16)
    assert torch.equal(wzeros.double(), z.double() - 8 * s.double()), "fixture: wzeros must be exact in bf16"
    folded = a["bias"].double().reshape(s_, -1).clone()
    for j in a["scale_slots"]:
        folded[j] += 1.0
    folded = folded.reshape(-1)
    bias = folded.to(BF16)
    assert torch.equal(bias.double(), folded), "fixture: bf16(1 + b) must be exact"
    return {"codes_stored": P.interleave(a["codes"], s_, 0), "wscales": P.interleave(s, s_, 1),
            "wzeros": P.interleave(wzeros, s_, 1), "bias_stored": P.interleave(bias, s_, 0)}


def _zimage_config_json(cfg: ZImageConfig) -> dict:
    return {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [cfg.patch_size], "all_f_patch_size": [1],
            "in_channels": cfg.in_channels, "dim": cfg.dim, "n_layers": cfg.n_layers,
            "n_refiner_layers": cfg.n_refiner_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
            "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": cfg.cap_feat_dim, "rope_theta": 256.0,
            "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512]}


def _flux_config_json(cfg: FluxConfig) -> dict:
    return {"_class_name": "FluxTransformer2DModel", "attention_head_dim": cfg.head_dim,
            "axes_dims_rope": [16, 56, 56], "guidance_embeds": cfg.guidance_embed,
            "in_channels": cfg.patch_features, "joint_attention_dim": cfg.context_in_dim,
            "num_attention_heads": cfg.num_heads, "num_layers": cfg.depth,
            "num_single_layers": cfg.depth_single_blocks, "patch_size": 1,
            "pooled_projection_dim": cfg.vec_in_dim}


def flux_comfy_config(cfg: FluxConfig) -> dict:
    """The ``comfy_config`` metadata of a Flux single-file release: ComfyUI's model class and unet config."""
    return {"model_class": "Flux" if cfg.guidance_embed else "FluxSchnell",
            "model_config": {"image_model": "flux", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
                             "vec_in_dim": cfg.vec_in_dim, "context_in_dim": cfg.context_in_dim,
                             "hidden_size": cfg.hidden_size, "mlp_ratio": cfg.mlp_ratio, "num_heads": cfg.num_heads,
                             "depth": cfg.depth, "depth_single_blocks": cfg.depth_single_blocks,
                             "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                             "guidance_embed": cfg.guidance_embed, "patch_size": cfg.patch_size,
                             "txt_ids_dims": []}}


def nunchaku_metadata(arch: str, cfg=None, weight_dtype="int4", group_size=GROUP) -> dict:
    cfg = _cfg(arch, cfg)
    qc = {"method": "svdquant", "weight": {"dtype": weight_dtype, "scale_dtype": None, "group_size": group_size},
          "activation": {"dtype": "int4", "scale_dtype": None, "unsigned": False, "group_size": group_size},
          "rank": cfg.rank}
    if arch == "zimage":
        qc["skip_refiners"] = cfg.skip_refiners
        return {"model_class": "NunchakuZImageTransformer2DModel", "config": json.dumps(_zimage_config_json(cfg)),
                "quantization_config": json.dumps(qc)}
    return {"model_class": "NunchakuFluxTransformer2dModel", "config": json.dumps(_flux_config_json(cfg)),
            "quantization_config": json.dumps(qc), "comfy_config": json.dumps(flux_comfy_config(cfg))}


def to_nunchaku(nat: dict) -> tuple[dict, dict]:
    """(state dict, metadata) of the Nunchaku file holding ``nat``.

    W4A4 modules: ``qweight`` (N, K/2) int8 tile-packed, ``wscales`` (K/64, N) tile-packed, smooth /
    smooth_orig 16-chunk packed, proj_down / proj_up 16x16-tile packed (Flux: legacy names ``smooth``,
    ``smooth_orig``, ``lora_down``, ``lora_up``), ``bias`` 16-chunk packed where the module has one (Z-Image:
    none; Flux single ``out_proj``: zeros). AWQ modules: ``qweight`` (N/4, K/2) int32, ``wscales`` /
    ``wzeros`` interleaved and padded to 16 groups, ``bias`` interleaved with the "+1" folded in. Unquantized
    tensors under Nunchaku's / diffusers' names. The natural → file mapping is exact (asserted for AWQ)."""
    arch, cfg = nat["arch"], nat["cfg"]
    pl = plan(arch, cfg)
    names = _w4a4_names(arch)
    sd = _float_to_nunchaku(pl.floats, nat["float"])
    for mod, w in nat["w4a4"].items():
        sd[f"{mod}.qweight"] = P.pack_w4a4_qweight(w["codes"])
        sd[f"{mod}.wscales"] = P.pack_w4a4_wscales(w["weight_scale"])
        sd[f"{mod}.{names['smooth']}"] = P.pack_chunk16(w["weight_smooth_factor"])
        sd[f"{mod}.{names['smooth_orig']}"] = P.pack_chunk16(w["smooth_orig"])
        sd[f"{mod}.{names['down']}"] = P.pack_proj_down(w["weight_proj_down"])
        sd[f"{mod}.{names['up']}"] = P.pack_proj_up(w["weight_proj_up"])
        if "bias" in w:
            sd[f"{mod}.bias"] = P.pack_chunk16(w["bias"])
    for mod, a in nat["awq"].items():
        t = awq_nunchaku_tensors(a)
        sd[f"{mod}.qweight"] = P.pack_awq_qweight(t["codes_stored"])
        sd[f"{mod}.wscales"] = P.pad_groups(t["wscales"])
        sd[f"{mod}.wzeros"] = P.pad_groups(t["wzeros"])
        sd[f"{mod}.bias"] = t["bias_stored"]
    return sd, nunchaku_metadata(arch, cfg)


# --------------------------------------------------------------------------- independent unpackers (spec)

def unpack_w4a4_qweight(q: torch.Tensor) -> torch.Tensor:
    """Nunchaku qweight (N, K/2) int8 -> natural signed codes (N, K) int8 (spec §3)."""
    n, k = q.shape[0], q.shape[1] * 2
    words = q.contiguous().view(torch.int32).to(torch.int64).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
    nib = torch.stack([(words >> (4 * r)) & 0xF for r in range(8)], -1)
    nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k).to(torch.int8)


def unpack_w4a4_wscales(ws: torch.Tensor) -> torch.Tensor:
    """Stored (G, N) in tile order -> natural (G, N)."""
    g, n = ws.shape
    return ws.contiguous().reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, g).t().contiguous()


def unpack_chunk16(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[0]
    return v.reshape(n // 128, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(n).contiguous()


def unpack_proj_up(up: torch.Tensor) -> torch.Tensor:
    n, r = up.shape
    return up.reshape(n // 16, r // 16, 8, 4, 2, 2, 2).permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r).contiguous()


def unpack_proj_down(down: torch.Tensor) -> torch.Tensor:
    """Stored (K, R) -> kitchen proj_down (K, R) = Aᵀ."""
    k, r = down.shape
    a = down.reshape(k // 16, r // 16, 8, 4, 2, 2, 2).permute(1, 4, 2, 0, 5, 3, 6).reshape(r, k)
    return a.t().contiguous()


def unpack_awq_qweight(q: torch.Tensor) -> torch.Tensor:
    """Nunchaku AWQ qweight (N/4, K/2) int32 -> unsigned codes (N, K) uint8 (spec §4)."""
    n4, k = q.shape[0], q.shape[1] * 2
    n = n4 * 4
    w = q.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF                      # (N/4, K)
    w = w.view(n4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 4)
    nib = torch.stack([(w >> (4 * t)) & 0xF for t in range(4)], -1).reshape(n, k)
    return nib.view(n, k // 32, 8, 4).permute(0, 1, 3, 2).reshape(n, k).to(torch.uint8)


def deinterleave(t: torch.Tensor, s: int, dim: int = 0) -> torch.Tensor:
    """Nunchaku modulation order -> planar: stored d·S + j holds original j·D + d."""
    t = t.movedim(dim, 0)
    n = t.shape[0]
    out = t.reshape(n // s, s, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return out.movedim(0, dim).contiguous()


def _config_from_metadata(metadata: dict):
    conf = json.loads(metadata["config"])
    qc = json.loads(metadata["quantization_config"])
    cls = metadata["model_class"]
    if cls == "NunchakuZImageTransformer2DModel":
        return "zimage", ZImageConfig(dim=conf["dim"], n_heads=conf["n_heads"], n_layers=conf["n_layers"],
                                      n_refiner_layers=conf["n_refiner_layers"], cap_feat_dim=conf["cap_feat_dim"],
                                      in_channels=conf["in_channels"], patch_size=conf["all_patch_size"][0],
                                      rank=qc["rank"], skip_refiners=bool(qc.get("skip_refiners", False)))
    if cls == "NunchakuFluxTransformer2dModel":
        return "flux", FluxConfig(hidden_size=conf["num_attention_heads"] * conf["attention_head_dim"],
                                  num_heads=conf["num_attention_heads"], depth=conf["num_layers"],
                                  depth_single_blocks=conf["num_single_layers"],
                                  context_in_dim=conf["joint_attention_dim"],
                                  vec_in_dim=conf["pooled_projection_dim"], guidance_embed=conf["guidance_embeds"],
                                  in_channels=conf["in_channels"] // 4, rank=qc["rank"])
    raise ValueError(f"not a Z-Image / Flux Nunchaku file: model_class {cls!r}")


def from_nunchaku(sd: dict, metadata: dict, cfg=None) -> dict:
    """Test-side reader: the natural tensors held by a Nunchaku Z-Image / Flux file (the inverse of
    ``to_nunchaku``, written from the spec's unpack rules independently of ``nunchaku_packer``'s packers).

    AWQ: codes/scales/zeros de-interleaved and sliced to K/64 groups, kitchen zeros = wzeros + 8·wscales
    in fp32 rounded once, the "+1" subtracted in fp32 at the scale slots. ``cfg`` defaults to the one read
    from the metadata (``fold_out_smooth`` only affects values, so it need not be known)."""
    arch, meta_cfg = _config_from_metadata(metadata)
    cfg = _cfg(arch, cfg if cfg is not None else meta_cfg)
    pl = plan(arch, cfg)
    names = _w4a4_names(arch)
    nat = {"arch": arch, "cfg": cfg, "float": _float_from_nunchaku(pl.floats, sd), "w4a4": {}, "awq": {}}
    for mod, spec in pl.w4a4.items():
        e = {"codes": unpack_w4a4_qweight(sd[f"{mod}.qweight"]),
             "weight_scale": unpack_w4a4_wscales(sd[f"{mod}.wscales"]),
             "weight_proj_down": unpack_proj_down(sd[f"{mod}.{names['down']}"]),
             "weight_proj_up": unpack_proj_up(sd[f"{mod}.{names['up']}"]),
             "weight_smooth_factor": unpack_chunk16(sd[f"{mod}.{names['smooth']}"]),
             "smooth_orig": unpack_chunk16(sd[f"{mod}.{names['smooth_orig']}"]),
             "act_unsigned": spec.act_unsigned}
        if f"{mod}.bias" in sd:
            e["bias"] = unpack_chunk16(sd[f"{mod}.bias"])
        nat["w4a4"][mod] = e
    for mod, spec in pl.awq.items():
        g = spec.k // GROUP
        ws = deinterleave(sd[f"{mod}.wscales"][:g], spec.s, 1)
        wz = deinterleave(sd[f"{mod}.wzeros"][:g], spec.s, 1)
        bias = deinterleave(sd[f"{mod}.bias"], spec.s, 0).float().reshape(spec.s, -1).clone()
        for j in spec.scale_slots:
            bias[j] -= 1.0
        nat["awq"][mod] = {"codes": deinterleave(unpack_awq_qweight(sd[f"{mod}.qweight"]), spec.s, 0),
                           "weight_scale": ws, "weight_zeros": (wz.float() + 8 * ws.float()).to(ws.dtype),
                           "bias": bias.reshape(-1).to(sd[f"{mod}.bias"].dtype),
                           "s": spec.s, "scale_slots": tuple(spec.scale_slots)}
    return nat


# ============================================================================================ native file

def json_u8(d: dict) -> torch.Tensor:
    """A ``comfy_quant`` entry: UTF-8 JSON bytes as a uint8 tensor."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _w4a4_json(rank, act_unsigned, in_splits=None):
    conf = {"format": "svdquant_w4a4", "group_size": GROUP, "rank": rank, "act_unsigned": act_unsigned}
    if in_splits is not None:
        conf["in_splits"] = list(in_splits)
    return conf


def _block_diag_cols(mats):
    """Stack matrices (rows_i, R_i) into (Σrows, ΣR) with mats on the diagonal, exact zeros elsewhere."""
    rows, cols = sum(m.shape[0] for m in mats), sum(m.shape[1] for m in mats)
    out = torch.zeros(rows, cols, dtype=mats[0].dtype)
    r = c = 0
    for m in mats:
        out[r:r + m.shape[0], c:c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


def _w4a4_tensors(codes, scale, down, up, smooth, bias):
    t = {"weight": P.kitchen_pack(codes), "weight_scale": scale.contiguous(), "weight_proj_down": down.contiguous(),
         "weight_proj_up": up.contiguous(), "weight_smooth_factor": smooth.contiguous()}
    if bias is not None:
        t["bias"] = bias.contiguous()
    return t


def native_layers(nat: dict) -> dict:
    """ComfyUI layer -> (kitchen-named tensors incl. packed ``weight``, layer JSON) for every int4 layer."""
    pl = plan(nat["arch"], nat["cfg"])
    out = {}
    for layer, nl in pl.native.items():
        if nl.kind == "awq":
            a = nat["awq"][nl.sources[0]]
            out[layer] = ({"weight": P.kitchen_pack(a["codes"]), "weight_scale": a["weight_scale"].clone(),
                           "weight_zeros": a["weight_zeros"].clone(), "bias": a["bias"].clone()},
                          {"format": "awq_w4a16", "group_size": GROUP})
            continue
        ws = [nat["w4a4"][s] for s in nl.sources]
        if nl.kind in ("w4a4", "rows"):
            w = ws[0]
            rows = slice(*nl.rows) if nl.rows else slice(None)
            b = w.get("bias")
            out[layer] = (_w4a4_tensors(w["codes"][rows], w["weight_scale"][:, rows], w["weight_proj_down"].clone(),
                                        w["weight_proj_up"][rows], w["weight_smooth_factor"].clone(),
                                        None if b is None else b[rows]),
                          _w4a4_json(w["weight_proj_down"].shape[1], w["act_unsigned"]))
        elif nl.kind == "cat_out":   # Flux linear1: [qkv_proj; mlp_fc1]
            smooth = ws[0]["weight_smooth_factor"]
            assert all(torch.equal(w["weight_smooth_factor"], smooth) for w in ws), f"{layer}: parts must share smooth"
            assert len({w["act_unsigned"] for w in ws}) == 1, f"{layer}: parts must share act_unsigned"
            out[layer] = (_w4a4_tensors(torch.cat([w["codes"] for w in ws], 0),
                                        torch.cat([w["weight_scale"] for w in ws], 1),
                                        torch.cat([w["weight_proj_down"] for w in ws], 1),
                                        _block_diag_cols([w["weight_proj_up"] for w in ws]),
                                        smooth.clone(), torch.cat([w["bias"] for w in ws], 0)),
                          _w4a4_json(sum(w["weight_proj_down"].shape[1] for w in ws), ws[0]["act_unsigned"]))
        elif nl.kind == "cat_in":    # Flux linear2: [out_proj | mlp_fc2] on the input axis
            bias = sum(w["bias"].float() for w in ws)
            assert torch.equal(bias.to(BF16).float(), bias), f"{layer}: summed bias must be exact"
            out[layer] = (_w4a4_tensors(torch.cat([w["codes"] for w in ws], 1),
                                        torch.cat([w["weight_scale"] for w in ws], 0),
                                        _block_diag_cols([w["weight_proj_down"] for w in ws]),
                                        torch.cat([w["weight_proj_up"] for w in ws], 1),
                                        torch.cat([w["weight_smooth_factor"] for w in ws], 0), bias.to(BF16)),
                          _w4a4_json(sum(w["weight_proj_down"].shape[1] for w in ws),
                                     [bool(w["act_unsigned"]) for w in ws], [w["codes"].shape[1] for w in ws]))
        else:
            raise AssertionError(nl.kind)
    return out


def to_native(nat: dict) -> tuple[dict, dict]:
    """(state dict, metadata) of the ComfyUI-native int4 file holding ``nat``: the unquantized tensors under
    ComfyUI names, every int4 layer's kitchen tensors and its ``comfy_quant`` JSON tensor; metadata
    ``config`` = the Nunchaku file's diffusers config. Its keys, with each int4 layer's packed ``weight``
    standing for the float weight, are exactly ``comfy_shapes``'s."""
    sd = {k: v.clone() for k, v in nat["float"].items()}
    for name, (tensors, conf) in native_layers(nat).items():
        for key, v in tensors.items():
            sd[f"{name}.{key}"] = v
        sd[f"{name}.comfy_quant"] = json_u8(conf)
    meta = nunchaku_metadata(nat["arch"], nat["cfg"])
    return sd, {"config": meta["config"]}


# ============================================================================================ references

def natural_w4a4_tensors(e: dict) -> dict:
    """A natural W4A4 entry as kitchen-named tensors (packed ``weight``), for reference.py."""
    return _w4a4_tensors(e["codes"], e["weight_scale"], e["weight_proj_down"], e["weight_proj_up"],
                         e["weight_smooth_factor"], e.get("bias"))


def natural_awq_tensors(a: dict) -> dict:
    return {"weight": P.kitchen_pack(a["codes"]), "weight_scale": a["weight_scale"], "weight_zeros": a["weight_zeros"],
            "bias": a["bias"]}


def w4a4_reference(x, tensors, conf, dtype=torch.float32):
    """(float64 y, Σ|terms|) of a native SVDQuant layer (reference.svdquant_forward), including the
    input-split form (``in_splits`` + a list ``act_unsigned``): each segment's main path quantizes its
    own columns with its own signedness, the low-rank branch runs once on the raw input, the bias is added
    once."""
    from reference import svdquant_forward
    au = conf["act_unsigned"]
    if "in_splits" not in conf:
        return svdquant_forward(x, tensors, bool(au), tensors.get("bias"), dtype)
    splits = conf["in_splits"]
    assert isinstance(au, list) and len(au) == len(splits) and sum(splits) == tensors["weight"].shape[1] * 2
    y = mag = 0
    start = 0
    for width, unsigned in zip(splits, au):
        stop = start + width
        seg = {"weight": tensors["weight"][:, start // 2:stop // 2],
               "weight_scale": tensors["weight_scale"][start // GROUP:stop // GROUP],
               "weight_smooth_factor": tensors["weight_smooth_factor"][start:stop],
               "weight_proj_down": tensors["weight_proj_down"][start:stop],
               "weight_proj_up": tensors["weight_proj_up"]}
        ys, ms = svdquant_forward(x[..., start:stop], seg, bool(unsigned), None, dtype)
        y, mag = y + ys, mag + ms
        start = stop
    if tensors.get("bias") is not None:
        y = y + tensors["bias"].double()
        mag = mag + tensors["bias"].double().abs()
    return y, mag


def with_cfg(arch: str, **changes):
    """``tiny_config(arch)`` with some fields changed (checked)."""
    return replace(tiny_config(arch), **changes).check()


# ---------------------------------------------------------------------------------- test helpers
VARIANTS = {   # id -> (arch, config): the fixture variants the architecture tests run over
    "zimage": ("zimage", None),
    "zimage-refiners-quantized": ("zimage", with_cfg("zimage", skip_refiners=False)),
    "flux-dev": ("flux", None),
    "flux-schnell-unfolded": ("flux", with_cfg("flux", guidance_embed=False, fold_out_smooth=False)),
}


def bits_equal(a, b):
    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def decode_json(t):
    return json.loads(bytes(t.tolist()).decode("utf-8"))
