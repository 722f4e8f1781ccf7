"""Convert Nunchaku SVDQuant int4 checkpoints to ComfyUI's native int4 layout.

Nunchaku stores its W4A4 (SVDQuant) and W4A16 (AWQ) layers in the tile order of its own GPU kernels.
ComfyUI core (and comfy-kitchen) read the natural row-major layout instead:

* SVDQuant W4A4 layer ``<L>``: ``<L>.weight`` int8 (N, K/2) two's-complement nibbles (low nibble =
  even column), ``<L>.weight_scale`` (K/64, N), ``<L>.weight_proj_down`` (K, R),
  ``<L>.weight_proj_up`` (N, R), ``<L>.weight_smooth_factor`` (K,), ``<L>.bias`` (N,) and
  ``<L>.comfy_quant`` (uint8 UTF-8 JSON ``{"format": "svdquant_w4a4", "group_size": 64, "rank": R,
  "act_unsigned": bool}``).
* AWQ W4A16 layer ``<L>``: ``<L>.weight`` int8 (N, K/2) unsigned nibbles, ``<L>.weight_scale`` and
  ``<L>.weight_zeros`` (K/64, N) with ``W = (q - 8) * scale + zeros``, ``<L>.bias``, ``<L>.comfy_quant``
  ``{"format": "awq_w4a16", "group_size": 64}``.

The file also gets the safetensors metadata ``_quantization_metadata`` (``{"format_version": "1.0",
"layers": {<L>: <comfy_quant dict>}}``) and keeps the model ``config`` JSON.

Public API
----------
Pure unpack functions (one per tensor kind), small pack helpers, :func:`is_nunchaku_checkpoint`,
:func:`convert_nunchaku_state_dict` (in memory, consumes its input) and :func:`convert_nunchaku_file`
(streams module by module from ``safe_open`` into a safetensors file). Both converters share the
per-module code below. Only Qwen-Image / Qwen-Image-Edit int4 checkpoints are supported so far.

All byte reinterpretations (``view(torch.int32)`` etc.) assume a little-endian host, as the Nunchaku
format itself does.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "NunchakuConversionError",
    "W4A4_GROUP_SIZE",
    "AWQ_GROUP_SIZE",
    "pack_int4_rowmajor",
    "unpack_int4_rowmajor",
    "unpack_w4a4_qweight",
    "unpack_w4a4_qweight_packed",
    "unpack_w4a4_wscales",
    "unpack_chunk16",
    "unpack_bias",
    "unpack_smooth_factor",
    "unpack_proj_up",
    "unpack_proj_down",
    "unpack_awq_qweight",
    "awq_deinterleave",
    "awq_zeros_to_kitchen",
    "unfold_modulation_scale_bias",
    "is_nunchaku_checkpoint",
    "check_convertible",
    "convert_nunchaku_state_dict",
    "convert_nunchaku_file",
]

W4A4_GROUP_SIZE = 64
AWQ_GROUP_SIZE = 64
_AWQ_GROUP_PAD = 16  # the AWQ group axis of wscales/wzeros is padded to a multiple of 16 groups


class NunchakuConversionError(ValueError):
    """A Nunchaku checkpoint could not be converted; the message names module, tensor, expectation."""


def _err(module: str, tensor: str, expected, got) -> NunchakuConversionError:
    return NunchakuConversionError(
        f"Nunchaku checkpoint, module '{module}', tensor '{tensor}': expected {expected}, got {got}"
    )


# ----------------------------------------------------------------------------------------------
# Kitchen row-major nibble packing
# ----------------------------------------------------------------------------------------------

def pack_int4_rowmajor(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) integer codes in [-8, 7] (signed) or [0, 15] (unsigned) -> (..., K/2) int8.

    Kitchen's natural layout: byte j holds column 2j in bits 0..3 and column 2j+1 in bits 4..7.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4_rowmajor: last dim must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16) & 0x0F
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_rowmajor(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """(..., K/2) int8 -> (..., K) int8 codes; two's complement [-8, 7] when ``signed`` else [0, 15]."""
    b = packed.contiguous().view(torch.uint8).to(torch.int16)
    lo, hi = b & 0x0F, b >> 4
    if signed:
        lo = lo - ((lo & 0x8) << 1)
        hi = hi - ((hi & 0x8) << 1)
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# SVDQuant W4A4 unpacking (tile order -> natural order)
# ----------------------------------------------------------------------------------------------

def _w4a4_qweight_dims(qweight: torch.Tensor) -> tuple[int, int]:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"W4A4 qweight: expected a 2-D int8 tensor (N, K/2), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 128 or k % 64:
        raise ValueError(f"W4A4 qweight: expected N % 128 == 0 and K % 64 == 0, got N={n}, K={k}")
    return n, k


def unpack_w4a4_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``qweight`` (N, K/2) int8 -> natural signed codes (N, K) int8 in [-8, 7].

    Each int32 word of the tile holds 8 nibbles r (bits 4r); the word grid is
    (nt, kt, np, nl, kl, ns, ks) with n = nt*128 + np*16 + ns*8 + nl and k = kt*64 + ks*32 + kl*8 + r.
    The code -8 is kept as is.
    """
    n, k = _w4a4_qweight_dims(qweight)
    words = qweight.contiguous().view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0x0F
    codes = nib - ((nib & 0x8) << 1)
    return codes.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k).to(torch.int8)


def unpack_w4a4_qweight_packed(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``qweight`` -> kitchen's row-major packed (N, K/2) int8.

    Byte b of a tile word holds nibbles r = 2b (low) and 2b + 1 (high), i.e. two adjacent columns,
    so the conversion is a pure byte permutation (bit-exact, equal to
    ``pack_int4_rowmajor(unpack_w4a4_qweight(qweight))``).
    """
    n, k = _w4a4_qweight_dims(qweight)
    tiles = qweight.contiguous().reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 4)
    return tiles.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k // 2).contiguous()


def unpack_w4a4_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``wscales`` (stored shape (G, N)) -> kitchen's natural (G, N)."""
    if wscales.dim() != 2 or wscales.shape[1] % 128:
        raise ValueError(f"W4A4 wscales: expected (G, N) with N % 128 == 0, got {tuple(wscales.shape)}")
    g, n = wscales.shape
    nat = wscales.contiguous().reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, g)
    return nat.t().contiguous()


def unpack_chunk16(vec: torch.Tensor) -> torch.Tensor:
    """16-chunk packed vector (W4A4 ``bias`` / ``smooth_factor``) -> natural order.

    Within every 16 elements the stored order is [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15].
    """
    if vec.dim() != 1 or vec.shape[0] % 16:
        raise ValueError(f"16-chunk vector: expected 1-D with length % 16 == 0, got {tuple(vec.shape)}")
    length = vec.shape[0]
    return vec.contiguous().reshape(length // 16, 4, 2, 2).permute(0, 2, 1, 3).reshape(length).contiguous()


unpack_bias = unpack_chunk16
unpack_smooth_factor = unpack_chunk16


def unpack_proj_up(proj_up: torch.Tensor) -> torch.Tensor:
    """Nunchaku 16x16 tile-packed ``proj_up`` (N, R) -> natural (N, R)."""
    if proj_up.dim() != 2 or proj_up.shape[0] % 16 or proj_up.shape[1] % 16:
        raise ValueError(f"proj_up: expected (N, R) with N, R multiples of 16, got {tuple(proj_up.shape)}")
    n, r = proj_up.shape
    return (proj_up.contiguous().reshape(n // 16, r // 16, 8, 4, 2, 2, 2)
            .permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r).contiguous())


def unpack_proj_down(proj_down: torch.Tensor) -> torch.Tensor:
    """Nunchaku 16x16 tile-packed ``proj_down`` (stored (K, R)) -> kitchen's ``proj_down`` (K, R) = Aᵀ."""
    if proj_down.dim() != 2 or proj_down.shape[0] % 16 or proj_down.shape[1] % 16:
        raise ValueError(f"proj_down: expected (K, R) with K, R multiples of 16, got {tuple(proj_down.shape)}")
    k, r = proj_down.shape
    a = (proj_down.contiguous().reshape(k // 16, r // 16, 8, 4, 2, 2, 2)
         .permute(1, 4, 2, 0, 5, 3, 6).reshape(r, k))
    return a.t().contiguous()


# ----------------------------------------------------------------------------------------------
# AWQ W4A16 unpacking
# ----------------------------------------------------------------------------------------------

def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku AWQ ``qweight`` (N/4, K/2) int32 -> unsigned codes (N, K) uint8 in [0, 15].

    Rows stay in stored (interleaved) output order; see :func:`awq_deinterleave`.
    Within every 32 input channels, 16-bit word j holds channel k = j + 8t at nibble t.
    """
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"AWQ qweight: expected a 2-D int32 tensor (N/4, K/2), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    if k % 64:
        raise ValueError(f"AWQ qweight: expected K % 64 == 0, got K={k}")
    words = (qweight.contiguous().view(torch.int16).reshape(n // 4, k // 64, 4, 16)
             .permute(0, 2, 1, 3).reshape(n, k // 4))
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int16, device=qweight.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0x0F  # (N, K/4, 4), masked so the arithmetic shift is harmless
    return nib.reshape(n, k // 32, 8, 4).permute(0, 1, 3, 2).reshape(n, k).to(torch.uint8)


def awq_deinterleave(t: torch.Tensor, s: int, dim: int = 0) -> torch.Tensor:
    """Undo Nunchaku's modulation output interleave along ``dim``.

    Stored output index ``d*S + j`` holds original output ``j*D + d``; the result is planar
    (``[slot 0 | slot 1 | ... | slot S-1]``, each D long).
    """
    dim = dim % t.dim()
    n = t.shape[dim]
    if n % s:
        raise ValueError(f"awq_deinterleave: size {n} of dim {dim} is not a multiple of {s}")
    shape = list(t.shape)
    v = t.reshape(*shape[:dim], n // s, s, *shape[dim + 1:])
    return v.transpose(dim, dim + 1).reshape(shape).contiguous()


def awq_zeros_to_kitchen(wzeros: torch.Tensor, wscales: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nunchaku zero points (``W = q*s + wzeros``) -> kitchen's (``W = (q - 8)*s + zeros``).

    ``zeros = wzeros + 8*wscales``, computed in fp32 and rounded once to ``dtype`` (default: wzeros').
    """
    if wzeros.shape != wscales.shape:
        raise ValueError(f"awq_zeros_to_kitchen: wzeros {tuple(wzeros.shape)} and wscales {tuple(wscales.shape)} differ")
    out = wzeros.to(torch.float32) + 8.0 * wscales.to(torch.float32)
    return out.to(dtype or wzeros.dtype)


def unfold_modulation_scale_bias(bias: torch.Tensor, s: int, scale_slots: Iterable[int]) -> torch.Tensor:
    """Subtract the folded "+1" of ``(1 + scale)`` from the scale slots of a planar modulation bias.

    The subtraction runs in fp32 and is rounded once to the bias dtype.
    """
    n = bias.shape[0]
    if bias.dim() != 1 or n % s:
        raise ValueError(f"modulation bias: expected 1-D length multiple of {s}, got {tuple(bias.shape)}")
    b = bias.to(torch.float32).reshape(s, n // s).clone()
    for j in scale_slots:
        b[j] -= 1.0
    return b.reshape(n).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# Recognising a Nunchaku checkpoint
# ----------------------------------------------------------------------------------------------

_NUNCHAKU_KEY_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth_factor", ".smooth_factor_orig",
                          ".wcscales", ".wtscale")


def _parse_json_meta(metadata: Mapping | None, key: str, strict: bool):
    if not metadata or key not in metadata or metadata[key] is None:
        return None
    value = metadata[key]
    if isinstance(value, (dict, list)):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError) as e:
        if strict:
            raise NunchakuConversionError(
                f"Nunchaku checkpoint: metadata '{key}' must be JSON, got {str(value)[:200]!r} ({e})") from e
        return None


def is_nunchaku_checkpoint(keys: Iterable[str], metadata: Mapping | None = None) -> bool:
    """True if the keys/metadata look like a Nunchaku SVDQuant checkpoint (any model, any precision).

    Recognised by metadata ``model_class`` (``Nunchaku...``) or ``quantization_config``
    (``method: svdquant``), or by Nunchaku-only tensor names (``.qweight``, ``.wscales``, ``.wzeros``,
    ``.smooth_factor``, ...). A converted (ComfyUI-native) file is not recognised.
    """
    if metadata:
        model_class = metadata.get("model_class")
        if isinstance(model_class, str) and model_class.startswith("Nunchaku"):
            return True
        qc = _parse_json_meta(metadata, "quantization_config", strict=False)
        if isinstance(qc, dict) and str(qc.get("method", "")).lower() == "svdquant":
            return True
    return any(k.endswith(_NUNCHAKU_KEY_SUFFIXES) for k in keys)


# ----------------------------------------------------------------------------------------------
# Model tables
# ----------------------------------------------------------------------------------------------

# Qwen-Image / Qwen-Image-Edit: per-block W4A4 module -> ComfyUI module(s) (split by output rows).
_QWEN_W4A4 = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.to_out.0": ("attn.to_out.0",),
    "attn.to_add_out": ("attn.to_add_out",),
    "img_mlp.net.0.proj": ("img_mlp.net.0.proj",),
    "txt_mlp.net.0.proj": ("txt_mlp.net.0.proj",),
    "img_mlp.net.2": ("img_mlp.net.2",),
    "txt_mlp.net.2": ("txt_mlp.net.2",),
    # already separate q/k/v (not in published files, harmless to accept)
    "attn.to_q": ("attn.to_q",), "attn.to_k": ("attn.to_k",), "attn.to_v": ("attn.to_v",),
    "attn.add_q_proj": ("attn.add_q_proj",), "attn.add_k_proj": ("attn.add_k_proj",),
    "attn.add_v_proj": ("attn.add_v_proj",),
}
_QWEN_UNSIGNED = frozenset({"img_mlp.net.2", "txt_mlp.net.2"})
# AWQ modulation: module -> (interleave S, scale slots holding the folded "+1")
_QWEN_AWQ = {"img_mod.1": (6, (1, 4)), "txt_mod.1": (6, (1, 4))}
_QWEN_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")

_W4A4_SUFFIXES = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias")
_AWQ_SUFFIXES = ("qweight", "wscales", "wzeros", "bias")
_LEGACY_ALIASES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                   "lora_down": "proj_down", "lora_up": "proj_up"}
_NVFP4_SUFFIXES = (".wcscales", ".wtscale")

_TORCH_TO_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _TORCH_TO_ST_DTYPE[getattr(torch, _name)] = _st


def _detect_model(keys: list[str], metadata: Mapping | None) -> str:
    """Returns "qwen_image" or raises naming what was found."""
    model_class = (metadata or {}).get("model_class")
    if model_class:
        mc = str(model_class)
        low = mc.lower()
        if "qwenimage" in low:
            return "qwen_image"
        if "zimage" in low:
            raise NunchakuConversionError(
                f"Nunchaku checkpoint: model_class '{mc}' (Z-Image) is not supported yet; "
                "supported: NunchakuQwenImageTransformer2DModel (Qwen-Image, Qwen-Image-Edit)")
        if "flux" in low:
            raise NunchakuConversionError(
                f"Nunchaku checkpoint: model_class '{mc}' (Flux) is not supported yet; "
                "supported: NunchakuQwenImageTransformer2DModel (Qwen-Image, Qwen-Image-Edit)")
        raise NunchakuConversionError(
            f"Nunchaku checkpoint: unsupported model_class '{mc}'; "
            "supported: NunchakuQwenImageTransformer2DModel (Qwen-Image, Qwen-Image-Edit)")
    # No metadata: infer from the key names.
    if any(".attn.add_qkv_proj." in k or ".img_mod.1." in k for k in keys):
        return "qwen_image"
    if any(".attention.to_qkv." in k or ".feed_forward." in k or k.startswith(("noise_refiner.", "context_refiner."))
           for k in keys):
        raise NunchakuConversionError(
            "Nunchaku checkpoint without model_class metadata looks like Z-Image "
            "(keys 'attention.to_qkv' / 'feed_forward' / refiners): Z-Image is not supported yet")
    if any(k.startswith("single_transformer_blocks.") or ".qkv_proj_context." in k or ".norm1_context.linear." in k
           for k in keys):
        raise NunchakuConversionError(
            "Nunchaku checkpoint without model_class metadata looks like Flux "
            "(keys 'single_transformer_blocks' / 'qkv_proj_context'): Flux is not supported yet")
    raise NunchakuConversionError(
        "Nunchaku checkpoint: cannot identify the model (no 'model_class' metadata and no Qwen-Image keys "
        f"such as 'transformer_blocks.0.attn.add_qkv_proj.qweight'); first keys: {sorted(keys)[:5]}")


def _check_precision(keys: list[str], qconfig: dict | None) -> None:
    weight = (qconfig or {}).get("weight") or {}
    wdtype = weight.get("dtype") if isinstance(weight, dict) else None
    nvfp4_keys = [k for k in keys if k.endswith(_NVFP4_SUFFIXES)]
    if (wdtype and "fp4" in str(wdtype).lower()) or nvfp4_keys:
        found = f"weight dtype '{wdtype}'" if wdtype else f"tensor '{nvfp4_keys[0]}'"
        raise NunchakuConversionError(
            f"Nunchaku checkpoint is NVFP4 ({found}; expected int4): NVFP4 files ('fp4_e2m1_all', group 16, "
            "fp8 scales, 'wcscales'/'wtscale') target Blackwell GPUs only and are not supported; "
            "use the int4 release ('svdq-int4_...') of the model")
    if wdtype is not None and str(wdtype).lower() != "int4":
        raise NunchakuConversionError(
            f"Nunchaku checkpoint: quantization_config weight dtype: expected 'int4', got '{wdtype}'")
    gs = weight.get("group_size") if isinstance(weight, dict) else None
    if gs is not None and int(gs) != W4A4_GROUP_SIZE:
        raise NunchakuConversionError(
            f"Nunchaku checkpoint: quantization_config weight group_size: expected {W4A4_GROUP_SIZE}, got {gs}")


# ----------------------------------------------------------------------------------------------
# Conversion plan (shared by the in-memory and the streaming path)
# ----------------------------------------------------------------------------------------------

@dataclass
class _Unit:
    kind: str                   # "float", "w4a4" or "awq"
    name: str                   # input module name (or the key itself for float tensors)
    keys: dict = field(default_factory=dict)  # canonical suffix -> input key ("" for a float tensor)
    out_names: tuple = ()       # w4a4: ComfyUI module name(s); awq: (name,)
    act_unsigned: bool = False
    interleave: int = 0
    scale_slots: tuple = ()


@dataclass
class _Plan:
    model: str
    inner_dim: int | None
    units: list
    config_str: str | None
    model_class: str | None
    qconfig: dict | None


def _inner_dim(config: dict | None, shape_of: Callable[[str], tuple], keys: set) -> int | None:
    if isinstance(config, dict):
        heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
        if heads and head_dim:
            return int(heads) * int(head_dim)
    if "img_in.weight" in keys:
        dim = int(shape_of("img_in.weight")[0])
        logger.warning("Nunchaku checkpoint has no usable 'config' metadata; inner dim %d taken from img_in.weight", dim)
        return dim
    return None


def _build_plan(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple]) -> _Plan:
    keys = sorted(keys)
    key_set = set(keys)
    qconfig = _parse_json_meta(metadata, "quantization_config", strict=True)
    config = _parse_json_meta(metadata, "config", strict=True)
    _check_precision(keys, qconfig if isinstance(qconfig, dict) else None)
    model = _detect_model(keys, metadata)
    inner = _inner_dim(config if isinstance(config, dict) else None, shape_of, key_set)

    modules = {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
    units: list[_Unit] = []
    by_module: dict[str, _Unit] = {}
    for key in keys:
        mod, _, suffix = key.rpartition(".")
        if mod in modules:
            unit = by_module.get(mod)
            if unit is None:
                unit = by_module[mod] = _Unit(kind="", name=mod)
                units.append(unit)
            canon = _LEGACY_ALIASES.get(suffix, suffix)
            if canon in unit.keys:
                raise _err(mod, suffix, "one tensor per kind", f"both '{unit.keys[canon]}' and '{key}'")
            unit.keys[canon] = key
        else:
            units.append(_Unit(kind="float", name=key, keys={"": key}))

    for unit in by_module.values():
        m = _QWEN_BLOCK_RE.match(unit.name)
        rel = m.group(2) if m else None
        prefix = unit.name[: len(unit.name) - len(rel)] if rel else ""
        is_awq = "wzeros" in unit.keys
        if is_awq:
            if rel not in _QWEN_AWQ:
                raise _err(unit.name, "wzeros", f"AWQ W4A16 only on transformer_blocks.N.{{{', '.join(_QWEN_AWQ)}}}",
                           "an AWQ layer elsewhere")
            allowed = _AWQ_SUFFIXES
            unit.kind = "awq"
            unit.out_names = (unit.name,)
            unit.interleave, unit.scale_slots = _QWEN_AWQ[rel]
        else:
            if rel not in _QWEN_W4A4:
                raise _err(unit.name, "qweight",
                           f"an SVDQuant W4A4 layer under transformer_blocks.N.{{{', '.join(list(_QWEN_W4A4)[:8])}}}"
                           + (" (modulation must be AWQ with 'wzeros')" if rel in _QWEN_AWQ else ""),
                           "an unknown module")
            allowed = _W4A4_SUFFIXES
            unit.kind = "w4a4"
            unit.out_names = tuple(prefix + n for n in _QWEN_W4A4[rel])
            unit.act_unsigned = rel in _QWEN_UNSIGNED
        for canon, key in unit.keys.items():
            if canon not in allowed:
                raise _err(unit.name, key.rpartition(".")[2], f"one of {allowed} for a {unit.kind.upper()} layer",
                           "an unexpected tensor")
        required = ("qweight", "wscales", "wzeros") if is_awq else ("qweight", "wscales", "smooth_factor",
                                                                   "proj_down", "proj_up")
        for r in required:
            if r not in unit.keys:
                raise _err(unit.name, r, "present", "missing")
        if is_awq and "bias" not in unit.keys:
            raise _err(unit.name, "bias", "present (it carries the folded '+1' of the modulation scale)", "missing")

    config_str = None
    if metadata and metadata.get("config") is not None:
        raw = metadata["config"]
        config_str = raw if isinstance(raw, str) else json.dumps(raw)
    model_class = (metadata or {}).get("model_class")
    return _Plan(model=model, inner_dim=inner, units=units, config_str=config_str,
                 model_class=str(model_class) if model_class else None,
                 qconfig=qconfig if isinstance(qconfig, dict) else None)


def check_convertible(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple]) -> dict:
    """Run every check that needs no tensor values; returns unit counts by kind or raises the first problem."""
    plan = _build_plan(keys, metadata, shape_of)
    counts: dict = {}
    for unit in plan.units:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# Per-module conversion
# ----------------------------------------------------------------------------------------------

def _json_tensor(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _expect_shape(module: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise _err(module, name, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _expect_float(module: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.element_size() < 2:
        raise _err(module, name, "a bf16/fp16/fp32 tensor", f"dtype {t.dtype}")


def _convert_w4a4(unit: _Unit, t: dict, plan: _Plan) -> tuple[list, dict]:
    mod = unit.name
    qweight = t["qweight"]
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise _err(mod, "qweight", "int8 (N, K/2)", f"{qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 128 or k % 128:
        raise _err(mod, "qweight", "N and K multiples of 128", f"N={n}, K={k} (shape {tuple(qweight.shape)})")
    wscales, smooth, down, up = t["wscales"], t["smooth_factor"], t["proj_down"], t["proj_up"]
    for name in ("wscales", "smooth_factor", "proj_down", "proj_up", "bias", "smooth_factor_orig"):
        if name in t:
            _expect_float(mod, name, t[name])
    _expect_shape(mod, "wscales", wscales, (k // W4A4_GROUP_SIZE, n))
    _expect_shape(mod, "smooth_factor", smooth, (k,))
    if down.dim() != 2 or down.shape[0] != k or down.shape[1] % 16 or down.shape[1] == 0:
        raise _err(mod, "proj_down", f"shape ({k}, R) with R a positive multiple of 16", f"shape {tuple(down.shape)}")
    rank = down.shape[1]
    _expect_shape(mod, "proj_up", up, (n, rank))
    bias = t.get("bias")
    if bias is not None:
        _expect_shape(mod, "bias", bias, (n,))
    orig = t.get("smooth_factor_orig")
    if orig is not None:
        _expect_shape(mod, "smooth_factor_orig", orig, (k,))
        if bool(torch.all(smooth == 1)) and not bool(torch.all(orig == 1)):
            logger.warning(
                "Nunchaku layer '%s': smooth_factor is all ones but smooth_factor_orig is not: the quantizer folded "
                "this layer's smoothing upstream (into the V rows of the qkv projection). The converted model runs "
                "as Nunchaku does, but an external LoRA on '%s' (or on attn.to_v) is off by diag(smooth_factor_orig).",
                mod, mod)

    w_packed = unpack_w4a4_qweight_packed(qweight)
    scales = unpack_w4a4_wscales(wscales)
    smooth_n = unpack_chunk16(smooth)
    down_n = unpack_proj_down(down)
    up_n = unpack_proj_up(up)
    bias_n = unpack_chunk16(bias) if bias is not None else None

    parts = len(unit.out_names)
    if parts > 1:
        if plan.inner_dim is not None and n != parts * plan.inner_dim:
            raise _err(mod, "qweight", f"N = {parts} x inner dim {plan.inner_dim} = {parts * plan.inner_dim} "
                                       "(fused q/k/v, dims from the 'config' metadata)", f"N={n}")
        if n % parts:
            raise _err(mod, "qweight", f"N divisible by {parts} (fused q/k/v)", f"N={n}")
    step = n // parts
    jcfg = {"format": "svdquant_w4a4", "group_size": W4A4_GROUP_SIZE, "rank": int(rank),
            "act_unsigned": bool(unit.act_unsigned)}
    out, layers = [], {}
    for i, name in enumerate(unit.out_names):
        rows = slice(i * step, (i + 1) * step)
        first = i == 0
        out.append((f"{name}.weight", w_packed[rows].contiguous() if parts > 1 else w_packed))
        out.append((f"{name}.weight_scale", scales[:, rows].contiguous() if parts > 1 else scales))
        out.append((f"{name}.weight_proj_down", down_n if first else down_n.clone()))
        out.append((f"{name}.weight_proj_up", up_n[rows].contiguous() if parts > 1 else up_n))
        out.append((f"{name}.weight_smooth_factor", smooth_n if first else smooth_n.clone()))
        if bias_n is not None:
            out.append((f"{name}.bias", bias_n[rows].contiguous() if parts > 1 else bias_n))
        out.append((f"{name}.comfy_quant", _json_tensor(jcfg)))
        layers[name] = dict(jcfg)
    return out, layers


def _convert_awq(unit: _Unit, t: dict, plan: _Plan) -> tuple[list, dict]:
    mod = unit.name
    s = unit.interleave
    qweight, wscales, wzeros, bias = t["qweight"], t["wscales"], t["wzeros"], t["bias"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise _err(mod, "qweight", "int32 (N/4, K/2) (AWQ W4A16)", f"{qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    if k % AWQ_GROUP_SIZE:
        raise _err(mod, "qweight", f"K a multiple of {AWQ_GROUP_SIZE}", f"K={k} (shape {tuple(qweight.shape)})")
    if n % s:
        raise _err(mod, "qweight", f"N a multiple of the interleave {s}", f"N={n}")
    if plan.inner_dim is not None and n != s * plan.inner_dim:
        raise _err(mod, "qweight", f"N = {s} x inner dim {plan.inner_dim} = {s * plan.inner_dim} "
                                   "(dims from the 'config' metadata)", f"N={n}")
    groups = k // AWQ_GROUP_SIZE
    padded = math.ceil(groups / _AWQ_GROUP_PAD) * _AWQ_GROUP_PAD
    for name, v in (("wscales", wscales), ("wzeros", wzeros)):
        _expect_float(mod, name, v)
        if v.dim() != 2 or v.shape[1] != n or v.shape[0] not in (groups, padded):
            exp = f"({groups}, {n})" + (f" or padded ({padded}, {n})" if padded != groups else "")
            raise _err(mod, name, f"shape {exp}", f"shape {tuple(v.shape)}")
    if wscales.shape != wzeros.shape:
        raise _err(mod, "wzeros", f"the shape of wscales {tuple(wscales.shape)}", f"shape {tuple(wzeros.shape)}")
    _expect_float(mod, "bias", bias)
    _expect_shape(mod, "bias", bias, (n,))
    if wscales.shape[0] > groups:
        pad_s, pad_z = wscales[groups:], wzeros[groups:]
        if bool((pad_s != 0).any()) or bool((pad_z != 0).any()):
            logger.warning("Nunchaku AWQ layer '%s': padded group rows %d..%d of wscales/wzeros are not zero; "
                           "dropping them anyway (K=%d gives %d groups)", mod, groups, wscales.shape[0] - 1, k, groups)
        wscales, wzeros = wscales[:groups], wzeros[:groups]

    codes = awq_deinterleave(unpack_awq_qweight(qweight), s, dim=0)
    weight = pack_int4_rowmajor(codes)
    del codes
    scales = awq_deinterleave(wscales, s, dim=1)
    zeros = awq_zeros_to_kitchen(awq_deinterleave(wzeros, s, dim=1), scales, dtype=wzeros.dtype)
    bias_n = unfold_modulation_scale_bias(awq_deinterleave(bias, s, dim=0), s, unit.scale_slots)
    jcfg = {"format": "awq_w4a16", "group_size": AWQ_GROUP_SIZE}
    name = unit.out_names[0]
    out = [(f"{name}.weight", weight), (f"{name}.weight_scale", scales), (f"{name}.weight_zeros", zeros),
           (f"{name}.bias", bias_n), (f"{name}.comfy_quant", _json_tensor(jcfg))]
    return out, {name: dict(jcfg)}


def _convert_unit(unit: _Unit, tensors: dict, plan: _Plan) -> tuple[list, dict]:
    """tensors: canonical suffix -> tensor (for a float unit: "" -> tensor)."""
    if unit.kind == "float":
        return [(unit.name, tensors[""])], {}
    if unit.kind == "w4a4":
        return _convert_w4a4(unit, tensors, plan)
    return _convert_awq(unit, tensors, plan)


def _output_metadata(plan: _Plan, layers: dict) -> dict:
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    if plan.config_str is not None:
        meta["config"] = plan.config_str
    source = {"format": "nunchaku"}
    if plan.model_class:
        source["model_class"] = plan.model_class
    if plan.qconfig is not None:
        source["quantization_config"] = plan.qconfig
    meta["converted_from"] = json.dumps(source)
    return meta


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return None
    return tqdm(total=total, disable=not enabled, desc=desc, unit="module")


def _log_summary(plan: _Plan, layers: dict) -> None:
    n_w4a4 = sum(1 for v in layers.values() if v["format"] == "svdquant_w4a4")
    n_awq = sum(1 for v in layers.values() if v["format"] == "awq_w4a16")
    logger.info("Converted Nunchaku %s checkpoint: %d SVDQuant W4A4 layers, %d AWQ W4A16 layers",
                plan.model, n_w4a4, n_awq)


# ----------------------------------------------------------------------------------------------
# In-memory conversion
# ----------------------------------------------------------------------------------------------

def convert_nunchaku_state_dict(sd: dict, metadata: Mapping | None = None,
                                progress: bool = False) -> tuple[dict, dict]:
    """Convert a Nunchaku state dict to ComfyUI's native int4 layout, in memory.

    ``sd`` is consumed: every tensor is popped as its module is converted, so the input and the
    output never both hold the whole model (on error, ``sd`` is left partially consumed; all
    checks that need no tensor values run before anything is popped).
    Returns ``(new_sd, new_metadata)``; ``new_metadata`` holds ``_quantization_metadata`` (and
    ``config`` when the input metadata had it).
    """
    plan = _build_plan(list(sd.keys()), metadata, lambda key: tuple(sd[key].shape))
    new_sd: dict = {}
    layers: dict = {}
    bar = _progress(len(plan.units), progress, "Converting Nunchaku checkpoint")
    try:
        for unit in plan.units:
            tensors = {canon: sd.pop(key) for canon, key in unit.keys.items()}
            out, lay = _convert_unit(unit, tensors, plan)
            del tensors
            for name, tensor in out:
                new_sd[name] = tensor
            layers.update(lay)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _log_summary(plan, layers)
    return new_sd, _output_metadata(plan, layers)


# ----------------------------------------------------------------------------------------------
# Streaming file conversion
# ----------------------------------------------------------------------------------------------

class _StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor with bounded memory.

    The header goes last, into a region reserved up front (an upper bound of its size) and padded
    with spaces, which the safetensors format allows.
    """

    def __init__(self, path: str, header_reserve: int):
        self.path = path
        self.reserve = int(math.ceil(header_reserve / 8) * 8)
        self.entries: dict = {}
        self.offset = 0
        self.f = open(path, "wb")
        self.f.seek(8 + self.reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate output tensor name '{name}'")
        st_dtype = _TORCH_TO_ST_DTYPE.get(tensor.dtype)
        if st_dtype is None:
            raise ValueError(f"tensor '{name}': dtype {tensor.dtype} cannot be written to safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.f.write(ctypes.string_at(t.data_ptr(), nbytes))
        self.entries[name] = {"dtype": st_dtype, "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def finish(self, metadata: dict) -> None:
        header = {"__metadata__": metadata, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.reserve:
            raise RuntimeError(f"safetensors header ({len(raw)} bytes) exceeds the reserved {self.reserve} bytes")
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.reserve))
        self.f.write(raw + b" " * (self.reserve - len(raw)))
        self.f.close()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()


def _header_bound(plan: _Plan, get_shape: Callable[[str], tuple], metadata_sizes: int) -> int:
    """An upper bound on the output header size: every input key yields at most 3 outputs whose
    names are at most 32 bytes longer; a tensor entry's fixed JSON is < 120 bytes plus 21 per dim;
    quantized modules add comfy_quant entries and their _quantization_metadata line."""
    total = metadata_sizes + 4096
    for unit in plan.units:
        fan = max(1, len(unit.out_names))
        for key in unit.keys.values():
            ndim = max(1, len(get_shape(key)))
            total += fan * (len(json.dumps(key)) + 32 + 120 + 21 * ndim)
        if unit.kind != "float":
            total += fan * 2 * (len(json.dumps(unit.name)) + 32 + 240)
    return total


def convert_nunchaku_file(in_path: str, out_path: str, progress: bool = True) -> dict:
    """Convert a Nunchaku ``.safetensors`` file to ComfyUI's native int4 layout on disk.

    Reads module by module through ``safe_open`` and writes each converted tensor straight to
    ``out_path`` (via ``<out_path>.partial``, renamed at the end), so memory holds one module at a
    time. Returns the output file's metadata.
    """
    from safetensors import safe_open

    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise ValueError(f"convert_nunchaku_file: output path equals input path '{in_path}'")
    with safe_open(in_path, framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        shapes = {}

        def get_shape(key: str) -> tuple:
            if key not in shapes:
                shapes[key] = tuple(f.get_slice(key).get_shape())
            return shapes[key]

        plan = _build_plan(keys, metadata, get_shape)
        # the output repeats model_class / quantization_config (escaped, inside converted_from) once more
        meta_size = 3 * sum(len(json.dumps(k)) + len(json.dumps(v)) + 8 for k, v in metadata.items())
        tmp_path = out_path + ".partial"
        writer = _StreamingSafetensorsWriter(tmp_path, _header_bound(plan, get_shape, meta_size))
        layers: dict = {}
        bar = _progress(len(plan.units), progress, f"Converting {os.path.basename(in_path)}")
        try:
            for unit in plan.units:
                tensors = {canon: f.get_tensor(key) for canon, key in unit.keys.items()}
                out, lay = _convert_unit(unit, tensors, plan)
                del tensors
                for name, tensor in out:
                    writer.add(name, tensor)
                del out
                layers.update(lay)
                if bar is not None:
                    bar.update(1)
            out_meta = _output_metadata(plan, layers)
            writer.finish(out_meta)
        except BaseException:
            writer.abort()
            try:
                os.remove(tmp_path)
            except OSError:
                pass
            raise
        finally:
            if bar is not None:
                bar.close()
    os.replace(tmp_path, out_path)
    _log_summary(plan, layers)
    return out_meta
