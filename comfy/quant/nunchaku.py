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
The pure unpack functions (one per tensor kind) live in ``nunchaku_layout`` and are re-exported here;
:func:`is_nunchaku_checkpoint`, :func:`check_convertible`,
:func:`convert_nunchaku_state_dict` (in memory, consumes its input) and :func:`convert_nunchaku_file`
(streams module by module from ``safe_open`` into a safetensors file). Both converters share the
per-module code below. Only Qwen-Image / Qwen-Image-Edit int4 checkpoints are supported so far.

What is checked: the metadata JSON (``config``, ``quantization_config``) parses within the bounds of
``comfy.quant.metadata`` and its numbers are integers; every Nunchaku tensor belongs to a module with
its ``qweight`` and each module has all its tensors; shapes and dtypes; and the values of the float
tensors (``wscales``, ``wzeros``, ``smooth_factor``, ``proj_down``, ``proj_up``, ``bias``) by the target
format's own rules (``QuantFormat.check_values``: finite, ``smooth_factor`` non-zero, zero ``wscales``
accepted). ``smooth_factor_orig`` only feeds a warning and is not value-checked. Any failure is a
``NunchakuConversionError`` (or ``MetadataError``) naming module, tensor, expectation and what came.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from comfy.quant import formats
from comfy.quant.errors import MetadataError, QuantFileError, QuantizedLayerError
from comfy.quant.metadata import parse_json, parse_object
from comfy.quant.nunchaku_layout import (  # noqa: F401  (re-exported: the converter's public API)
    awq_deinterleave,
    awq_zeros_to_kitchen,
    unfold_modulation_scale_bias,
    unpack_awq_qweight,
    unpack_bias,
    unpack_chunk16,
    unpack_proj_down,
    unpack_proj_up,
    unpack_smooth_factor,
    unpack_w4a4_qweight,
    unpack_w4a4_qweight_packed,
    unpack_w4a4_wscales,
)
from comfy.quant.formats.base import (check_finite, check_slot_values, encode_config, is_int, nonfinite_summary,
                                     quantization_header)
from comfy.quant.packing import pack_int4
from comfy.quant.safetensors_stream import check_output, entry_bound, open_checked, streaming_file

logger = logging.getLogger(__name__)

__all__ = [
    "NunchakuConversionError",
    "W4A4_GROUP_SIZE",
    "AWQ_GROUP_SIZE",
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
    "value_problems",
    "convert_nunchaku_state_dict",
    "convert_nunchaku_file",
]

W4A4_GROUP_SIZE = 64
AWQ_GROUP_SIZE = 64
_AWQ_GROUP_PAD = 16  # the AWQ group axis of wscales/wzeros is padded to a multiple of 16 groups


class NunchakuConversionError(QuantFileError):
    """A Nunchaku checkpoint could not be converted; the message names module, tensor, expectation."""


def _err(module: str, tensor: str, expected, got) -> NunchakuConversionError:
    return NunchakuConversionError(
        f"Nunchaku checkpoint, module '{module}', tensor '{tensor}': expected {expected}, got {got}",
        layer=module, tensor=tensor, expected=expected, got=got)


# ----------------------------------------------------------------------------------------------
# Recognising a Nunchaku checkpoint
# ----------------------------------------------------------------------------------------------

_NUNCHAKU_KEY_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth_factor", ".smooth_factor_orig",
                          ".wcscales", ".wtscale")


def _parse_json_meta(metadata: Mapping | None, key: str, strict: bool):
    """Metadata entry ``key`` parsed (bounded): strict, a JSON object or ``MetadataError``; else any JSON
    value, or None when it does not parse."""
    if not metadata or key not in metadata or metadata[key] is None:
        return None
    if strict:
        return parse_object(metadata[key], key)
    try:
        return parse_json(metadata[key], key)
    except MetadataError:
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
# tensors only a quantized module has: one without its module's qweight is an incomplete module
_SIDE_SUFFIXES = frozenset({"wscales", "wzeros", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up",
                            *_LEGACY_ALIASES})



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
    if gs is not None and (not is_int(gs) or gs != W4A4_GROUP_SIZE):
        raise NunchakuConversionError(
            f"Nunchaku checkpoint: quantization_config weight group_size: expected {W4A4_GROUP_SIZE}, got {gs!r}")


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


def _config_int(config: dict, name: str) -> int | None:
    """A positive integer field of the ``config`` metadata, None when absent, else ``MetadataError``."""
    value = config.get(name)
    if value is not None and (not is_int(value) or value <= 0):
        raise MetadataError("config", f"'{name}' a positive integer", repr(value)[:80])
    return value


def _inner_dim(config: dict | None, shape_of: Callable[[str], tuple], keys: set) -> int | None:
    if isinstance(config, dict):
        heads, head_dim = _config_int(config, "num_attention_heads"), _config_int(config, "attention_head_dim")
        if heads and head_dim:
            return heads * head_dim
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
        elif suffix in _SIDE_SUFFIXES:
            raise _err(mod, "qweight", f"present (the module has '{suffix}')", "missing")
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


def value_problems(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple],
                   read: Callable[[str], torch.Tensor]) -> tuple[list[str], list[str]]:
    """The converter's value checks on every quantized module's float tensors, read with ``read(key)``
    (never ``qweight``): ``(problems, warnings)`` as text, one problem per module at most. Raises what
    ``check_convertible`` raises."""
    plan = _build_plan(keys, metadata, shape_of)
    problems, warnings = [], []
    for unit in plan.units:
        if unit.kind == "float":
            continue
        checked = (*_VALUE_SLOTS[unit.kind][1], "bias")
        tensors = {canon: read(key) for canon, key in unit.keys.items() if canon in checked}
        if unit.kind == "awq":  # the padded group rows are dropped by the conversion: not checked
            groups = tuple(shape_of(unit.keys["qweight"]))[-1] * 2 // AWQ_GROUP_SIZE
            tensors.update({n: tensors[n][:groups] for n in ("wscales", "wzeros") if tensors[n].dim() == 2})
        try:
            warnings.extend(f"Nunchaku module '{unit.name}': {w}" for w in _check_values(unit, tensors))
        except NunchakuConversionError as e:
            problems.append(str(e))
    return problems, warnings


# ----------------------------------------------------------------------------------------------
# Per-module conversion
# ----------------------------------------------------------------------------------------------

def _expect_shape(module: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise _err(module, name, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _expect_float(module: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.element_size() < 2:
        raise _err(module, name, "a bf16/fp16/fp32 tensor", f"dtype {t.dtype}")


# Nunchaku tensor -> the slot of the target format whose value rules apply to it
_VALUE_SLOTS = {
    "w4a4": ("svdquant_w4a4", {"wscales": "weight_scale", "smooth_factor": "weight_smooth_factor",
                               "proj_down": "weight_proj_down", "proj_up": "weight_proj_up"}),
    "awq": ("awq_w4a16", {"wscales": "weight_scale", "wzeros": "weight_zeros"}),
}


def _check_values(unit: _Unit, t: dict) -> list[str]:
    """The target format's value rules (``QuantFormat.check_values``' per-slot rules) on a module's stored
    tensors, plus a finite bias: ``NunchakuConversionError`` on a refused value; the warnings as text."""
    fmt_name, slots = _VALUE_SLOTS[unit.kind]
    fmt = formats.get_format(fmt_name)
    warnings = []
    try:
        for name, key in slots.items():
            if name in t:
                warning = check_slot_values(fmt.slot(key), unit.name, t[name], name)
                if warning is not None:
                    warnings.append(warning)
        if "bias" in t:
            check_finite(unit.name, "bias", t["bias"])
    except QuantizedLayerError as e:
        raise _err(unit.name, e.tensor, e.expected, e.got) from None
    for warning in warnings:
        logger.info("Nunchaku module '%s': %s", unit.name, warning)
    return warnings


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
    _check_values(unit, t)

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
        out.append((f"{name}.comfy_quant", encode_config(jcfg)))
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
    _check_values(unit, {"wscales": wscales, "wzeros": wzeros, "bias": bias})

    codes = awq_deinterleave(unpack_awq_qweight(qweight), s, dim=0)
    weight = pack_int4(codes)
    del codes
    scales = awq_deinterleave(wscales, s, dim=1)
    zeros = awq_zeros_to_kitchen(awq_deinterleave(wzeros, s, dim=1), scales, dtype=wzeros.dtype)
    overflow = nonfinite_summary(zeros)  # finite inputs, but wzeros + 8·wscales can overflow fp16
    if overflow is not None:
        raise _err(mod, "wzeros", f"finite kitchen zero points wzeros + 8·wscales in {wzeros.dtype}", overflow)
    bias_n = unfold_modulation_scale_bias(awq_deinterleave(bias, s, dim=0), s, unit.scale_slots)
    jcfg = {"format": "awq_w4a16", "group_size": AWQ_GROUP_SIZE}
    name = unit.out_names[0]
    out = [(f"{name}.weight", weight), (f"{name}.weight_scale", scales), (f"{name}.weight_zeros", zeros),
           (f"{name}.bias", bias_n), (f"{name}.comfy_quant", encode_config(jcfg))]
    return out, {name: dict(jcfg)}


def _convert_unit(unit: _Unit, tensors: dict, plan: _Plan) -> tuple[list, dict]:
    """tensors: canonical suffix -> tensor (for a float unit: "" -> tensor)."""
    if unit.kind == "float":
        return [(unit.name, tensors[""])], {}
    if unit.kind == "w4a4":
        return _convert_w4a4(unit, tensors, plan)
    return _convert_awq(unit, tensors, plan)


def _output_metadata(plan: _Plan, layers: dict) -> dict:
    meta = {"_quantization_metadata": quantization_header(layers)}
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
    # enabled: shown on a terminal only (disable=None), so logs and pipes get no bar around an error line
    return tqdm(total=total, disable=None if enabled else True, desc=desc, unit="module")


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

def _header_bound(plan: _Plan, get_shape: Callable[[str], tuple], metadata_sizes: int) -> int:
    """Upper bound of the output header: every input key yields at most 3 outputs whose names are at
    most 32 bytes longer; quantized modules add comfy_quant entries and their _quantization_metadata line."""
    total = metadata_sizes + 4096
    for unit in plan.units:
        fan = max(1, len(unit.out_names))
        for key in unit.keys.values():
            total += fan * (entry_bound(key, len(get_shape(key))) + 32)
        if unit.kind != "float":
            total += fan * 2 * (len(json.dumps(unit.name)) + 32 + 240)
    return total


def _not_nunchaku(in_path, keys: list[str], metadata: Mapping) -> NunchakuConversionError:
    """The refusal of a file that is no Nunchaku checkpoint, saying what it is instead."""
    native = sum(k.endswith(".comfy_quant") for k in keys)
    if native or "_quantization_metadata" in metadata:
        got = f"a ComfyUI-native int4 checkpoint ({native} layers with comfy_quant)"
        why = "already converted: load it as it is"
    else:
        got = "no Nunchaku tensors (.qweight, .wscales, ...) or metadata (model_class, quantization_config)"
        why = "not a Nunchaku checkpoint (a float model?)"
    return NunchakuConversionError(f"convert_nunchaku_file: {why}; expected a Nunchaku SVDQuant checkpoint, got {got}",
                                   file=in_path, expected="a Nunchaku SVDQuant checkpoint", got=got)


def convert_nunchaku_file(in_path: str, out_path: str, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert a Nunchaku ``.safetensors`` file to ComfyUI's native int4 layout on disk.

    Reads module by module through ``safe_open`` and writes each converted tensor straight to
    ``out_path`` (via ``<out_path>.partial``, renamed at the end), so memory holds one module at a
    time; on any failure nothing is left at ``out_path``. Refused before any work: an output that
    ``check_output`` refuses (an existing file unless ``overwrite``), an unreadable input
    (``UnreadableFileError``) and a file that is no Nunchaku checkpoint. Errors about the input name
    ``in_path``. Returns the output file's metadata.
    """
    check_output(in_path, out_path, "convert_nunchaku_file", overwrite=overwrite)
    with open_checked(in_path) as f:
        try:
            return _convert_open_file(f, in_path, out_path, progress)
        except QuantFileError as e:
            raise e.with_file(in_path)


def _convert_open_file(f, in_path: str, out_path: str, progress: bool) -> dict:
    metadata = dict(f.metadata() or {})
    keys = list(f.keys())
    if not is_nunchaku_checkpoint(keys, metadata):
        raise _not_nunchaku(in_path, keys, metadata)
    shapes = {}

    def get_shape(key: str) -> tuple:
        if key not in shapes:
            shapes[key] = tuple(f.get_slice(key).get_shape())
        return shapes[key]

    plan = _build_plan(keys, metadata, get_shape)
    # the output repeats model_class / quantization_config (escaped, inside converted_from) once more
    meta_size = 3 * sum(len(json.dumps(k)) + len(json.dumps(v)) + 8 for k, v in metadata.items())
    layers: dict = {}
    bar = _progress(len(plan.units), progress, f"Converting {os.path.basename(in_path)}")
    try:
        with streaming_file(out_path, _header_bound(plan, get_shape, meta_size)) as writer:
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
    finally:
        if bar is not None:
            bar.close()
    _log_summary(plan, layers)
    return out_meta
