"""Convert Nunchaku SVDQuant int4 checkpoints to ComfyUI's native int4 layout.

Nunchaku stores its W4A4 (SVDQuant) and W4A16 (AWQ) layers in the tile order of its own GPU kernels.
ComfyUI core (and comfy-kitchen) read the natural row-major layout instead:

* SVDQuant W4A4 layer ``<L>``: ``<L>.weight`` int8 (N, K/2) two's-complement nibbles (low nibble =
  even column), ``<L>.weight_scale`` (K/64, N), ``<L>.weight_proj_down`` (K, R),
  ``<L>.weight_proj_up`` (N, R), ``<L>.weight_smooth_factor`` (K,), ``<L>.bias`` (N,) and
  ``<L>.comfy_quant`` (uint8 UTF-8 JSON ``{"format": "svdquant_w4a4", "group_size": 64, "rank": R,
  "act_unsigned": bool}``; a layer concatenated along K from parts of different signedness, Flux's
  ``linear2``, has ``"act_unsigned": [bool, ...]`` and ``"in_splits": [K_0, ...]``, one per input segment).
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
per-module code below. Supported: the int4 checkpoints of Qwen-Image / Qwen-Image-Edit, Z-Image(-Turbo) and
Flux.1, by the tables of ``comfy.quant.architectures`` (module names, splits and concatenations, float renames).

Per architecture: Qwen-Image's fused q/k/v split by rows into ``to_q/k/v``; Z-Image's ``attention.to_qkv``
kept fused as ``attention.qkv``, ``feed_forward.net.0.proj`` ([w3; w1]) split into ``w3`` and ``w1``, float
refiners in diffusers layout renamed and concatenated; Flux's modules renamed to ComfyUI's, single-block
``linear1`` = [qkv_proj; mlp_fc1] (one layer, rank 2R) and ``linear2`` = [out_proj | mlp_fc2] along K (one
layer, rank 2R, ``act_unsigned: [false, true]`` and ``in_splits: [dim, mlp]`` in its JSON), ``norm_out``'s
[scale; shift] swapped to ``final_layer.adaLN_modulation.1``'s [shift; scale]. A layer whose smoothing the
quantizer folded upstream (``smooth_factor`` all ones, ``smooth_factor_orig`` not: every Flux ``out_proj*``)
gets a warning: an external LoRA on it is off by diag(smooth_factor_orig).

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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from comfy.quant import architectures as AR
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
    "is_native_int4",
    "is_nunchaku_checkpoint",
    "check_convertible",
    "value_problems",
    "convert_nunchaku_state_dict",
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

# Names only Nunchaku writes. ``.smooth_factor`` / ``.proj_down`` / ``.proj_up`` are not among them: ComfyUI PR
# #13580 spells native int4 layers that way too (``comfy.quant.formats``), and every Nunchaku quantized module
# has a ``.qweight`` and ``.wscales`` anyway.
_NUNCHAKU_KEY_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth_factor_orig", ".wcscales", ".wtscale")


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


def is_native_int4(keys: Iterable[str], metadata: Mapping | None = None) -> bool:
    """True if the file marks its quantized layers the ComfyUI way: a ``<layer>.comfy_quant`` tensor or a
    ``_quantization_metadata`` header (whatever spelling its tensors use, and under any key prefix)."""
    return bool(metadata and metadata.get("_quantization_metadata") is not None) or any(
        k.endswith(".comfy_quant") for k in keys)


def is_nunchaku_checkpoint(keys: Iterable[str], metadata: Mapping | None = None) -> bool:
    """True if the keys/metadata look like a Nunchaku SVDQuant checkpoint (any model, any precision).

    Recognised by metadata ``model_class`` (``Nunchaku...``) or ``quantization_config``
    (``method: svdquant``), or by Nunchaku-only tensor names (``.qweight``, ``.wscales``, ``.wzeros``,
    ``.smooth_factor_orig``, ...). A ComfyUI-native file (``is_native_int4``: converted, quantized here, or
    written in PR #13580's spellings) never is, whatever else its metadata says.
    """
    keys = list(keys)
    if is_native_int4(keys, metadata):
        return False
    if metadata:
        model_class = metadata.get("model_class")
        if isinstance(model_class, str) and model_class.startswith("Nunchaku"):
            return True
        qc = _parse_json_meta(metadata, "quantization_config", strict=False)
        if isinstance(qc, dict) and str(qc.get("method", "")).lower() == "svdquant":
            return True
    return any(k.endswith(_NUNCHAKU_KEY_SUFFIXES) for k in keys)


# ----------------------------------------------------------------------------------------------
# Model tables: comfy.quant.architectures (one per architecture, shared with the quantizer)
# ----------------------------------------------------------------------------------------------

_W4A4_SUFFIXES = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias")
_AWQ_SUFFIXES = ("qweight", "wscales", "wzeros", "bias")
_LEGACY_ALIASES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                   "lora_down": "proj_down", "lora_up": "proj_up"}
_NVFP4_SUFFIXES = (".wcscales", ".wtscale")
# tensors only a quantized module has: one without its module's qweight is an incomplete module
_SIDE_SUFFIXES = frozenset({"wscales", "wzeros", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up",
                            *_LEGACY_ALIASES})


def _supported() -> str:
    return ", ".join(f"{a.model_class} ({a.title})" for a in AR.ARCHITECTURES)


def _detect_model(keys: list[str], metadata: Mapping | None) -> AR.Architecture:
    """The architecture of a Nunchaku file, from ``model_class`` or else its key names; raises naming what
    was found."""
    model_class = (metadata or {}).get("model_class")
    if model_class:
        arch = AR.from_model_class(str(model_class))
        if arch is None:
            raise NunchakuConversionError(
                f"Nunchaku checkpoint: unsupported model_class '{model_class}'; supported: {_supported()}")
        return arch
    arch = AR.from_nunchaku_keys(keys)
    if arch is None:
        raise NunchakuConversionError(
            "Nunchaku checkpoint: cannot identify the model (no 'model_class' metadata and no Qwen-Image, Z-Image "
            "or Flux keys such as 'transformer_blocks.0.attn.add_qkv_proj.qweight', "
            "'layers.0.attention.to_qkv.qweight' or 'single_transformer_blocks.0.qkv_proj.qweight'); "
            f"first keys: {sorted(keys)[:5]}")
    return arch


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
class _Source:
    name: str                   # Nunchaku module (or, for a float tensor, its key)
    keys: dict = field(default_factory=dict)  # canonical suffix -> input key ("" for a float tensor)


@dataclass
class _Unit:
    """One conversion step: the input modules (or float tensors) that make one group of outputs."""
    kind: str                   # "float", "w4a4" or "awq"
    name: str                   # the (first) input module, or float key: what messages name
    sources: list = field(default_factory=list)  # [_Source], in part order
    how: str = AR.KEEP          # AR.KEEP | SPLIT_ROWS | CONCAT_ROWS | CONCAT_K (| SWAP_HALVES for floats)
    out_names: tuple = ()       # ComfyUI layer name(s), or float key(s)
    act_unsigned: bool | tuple = False
    interleave: int = 0
    scale_slots: tuple = ()
    inner_rows: bool = False    # SPLIT_ROWS: every part has inner-dim rows (fused q/k/v)
    layer: AR.Layer | None = None
    part_names: tuple = ()      # CONCAT_*: the Nunchaku module of every part

    def input_keys(self) -> list[str]:
        return [key for src in self.sources if src is not None for key in src.keys.values()]


@dataclass
class Plan:
    model: str
    arch: AR.Architecture
    inner_dim: int | None
    units: list
    config_str: str | None
    model_class: str | None
    qconfig: dict | None
    comfy_config: dict | None = None


def _config_int(config: dict, name: str) -> int | None:
    """A positive integer field of the ``config`` metadata, None when absent, else ``MetadataError``."""
    value = config.get(name)
    if value is not None and (not is_int(value) or value <= 0):
        raise MetadataError("config", f"'{name}' a positive integer", repr(value)[:80])
    return value


def _inner_dim(arch: AR.Architecture, config: dict | None, shape_of: Callable[[str], tuple],
               keys: set) -> int | None:
    if isinstance(config, dict) and arch.inner_dim_config:
        values = [_config_int(config, name) for name in arch.inner_dim_config]
        if all(values):
            return math.prod(values)
    if arch.inner_dim_key and arch.inner_dim_key in keys:
        dim = int(shape_of(arch.inner_dim_key)[0])
        logger.warning("Nunchaku checkpoint has no usable 'config' metadata; inner dim %d taken from %s",
                       dim, arch.inner_dim_key)
        return dim
    return None


def _places(arch: AR.Architecture, kinds, awq: bool, limit: int | None = None) -> str:
    """Where the Nunchaku modules of one kind (AWQ or W4A4) may be, for messages."""
    out = []
    for kind in kinds:
        rels = [rel for rel, spec in kind.modules.items() if (kind.layers[spec.targets[0]].kind == AR.AWQ) == awq]
        if rels:
            out.append(f"{kind.nunchaku_prefix.format('N')}.{{{', '.join(rels[:limit])}}}")
    return " or ".join(out) if out else f"nowhere ({arch.title} has none)"


def _quantized_unit(arch: AR.Architecture, src: _Source, concat: dict, hint: str = "") -> _Unit:
    """The unit of one quantized Nunchaku module (a concatenation's unit is shared by its parts)."""
    found = arch.nunchaku_block(src.name)
    kind, nblock, cblock, rel = found if found else (None, "", "", None)
    spec = kind.modules.get(rel) if kind else None
    layer = kind.layers[spec.targets[0]] if spec else None
    is_awq = "wzeros" in src.keys
    if is_awq:
        if layer is None or layer.kind != AR.AWQ:
            raise _err(src.name, "wzeros", f"AWQ W4A16 only on {_places(arch, [kind] if kind else arch.blocks, True)}",
                       "an AWQ layer elsewhere" + hint)
        allowed, unit_kind = _AWQ_SUFFIXES, "awq"
    else:
        if layer is None or layer.kind != AR.SVDQUANT:
            raise _err(src.name, "qweight",
                       f"a {arch.title} SVDQuant W4A4 layer under "
                       f"{_places(arch, [kind] if kind else arch.blocks, False, 8)}"
                       + (" (modulation must be AWQ with 'wzeros')" if layer is not None and layer.kind == AR.AWQ
                          else ""),
                       "an unknown module" + hint)
        allowed, unit_kind = _W4A4_SUFFIXES, "w4a4"
    for canon, key in src.keys.items():
        if canon not in allowed:
            raise _err(src.name, key.rpartition(".")[2], f"one of {allowed} for a {unit_kind.upper()} layer",
                       "an unexpected tensor")
    required = ("qweight", "wscales", "wzeros") if is_awq else ("qweight", "wscales", "smooth_factor",
                                                               "proj_down", "proj_up")
    for r in required:
        if r not in src.keys:
            raise _err(src.name, r, "present", "missing")
    if is_awq and "bias" not in src.keys:
        raise _err(src.name, "bias", "present (it carries the folded '+1' of the modulation scale)", "missing")

    targets = tuple(f"{cblock}.{t}" for t in spec.targets)
    if spec.how in (AR.CONCAT_ROWS, AR.CONCAT_K):
        unit = concat.get(targets[0])
        if unit is None:
            names = [None] * spec.parts
            for other_rel, other in kind.modules.items():
                if other.targets == spec.targets and other.how == spec.how:
                    names[other.part] = f"{nblock}.{other_rel}"
            unit = concat[targets[0]] = _Unit(kind=unit_kind, name=src.name, sources=[None] * spec.parts,
                                              how=spec.how, out_names=targets, act_unsigned=layer.act_unsigned,
                                              layer=layer, part_names=tuple(names))
        unit.sources[spec.part] = src
        return unit
    return _Unit(kind=unit_kind, name=src.name, sources=[src], how=spec.how, out_names=targets,
                 act_unsigned=layer.act_unsigned, interleave=layer.interleave, scale_slots=layer.scale_slots,
                 inner_rows=spec.inner_rows, layer=layer)


def _split_key(key: str) -> tuple[str, str]:
    module, _, tensor = key.rpartition(".")
    return module or key, tensor


def _float_units(arch: AR.Architecture, keys: list[str]) -> dict:
    """Float key -> its unit: the architecture's float rules (renames, q/k/v concatenated, [w3; w1] split,
    halves swapped), module prefix renames, or the key kept as it is."""
    top = {s: rule for rule in arch.floats for s in rule.sources}
    pending: dict = {}   # (rule, block) -> (rule, nunchaku block, comfy block, {source: key})
    out: dict = {}
    for key in keys:
        if key in top:
            rule = top[key]
            pending.setdefault((id(rule), ""), (rule, "", "", {}))[3][key] = key
            continue
        found = arch.nunchaku_block(key)
        if found:
            kind, nblock, cblock, rel = found
            rule = next((r for r in kind.floats if rel in r.sources), None)
            if rule is not None:
                pending.setdefault((id(rule), nblock), (rule, nblock + ".", cblock + ".", {}))[3][rel] = key
                continue
            target = f"{cblock}.{rel}"
        else:
            target = key
            for prefix, new in arch.renames.items():
                if key.startswith(prefix + "."):
                    target = new + key[len(prefix):]
                    break
        out[key] = _Unit(kind="float", name=key, sources=[_Source(key, {"": key})], out_names=(target,))
    for rule, nprefix, cprefix, got in pending.values():
        missing = [s for s in rule.sources if s not in got]
        if missing:
            module, tensor = _split_key(nprefix + missing[0])
            other = next(iter(got.values()))
            raise _err(module, tensor, f"present (with '{other}' it makes '{cprefix + rule.targets[0]}')", "missing")
        full = [got[s] for s in rule.sources]
        unit = _Unit(kind="float", name=full[0], sources=[_Source(k, {"": k}) for k in full], how=rule.how,
                     out_names=tuple(cprefix + t for t in rule.targets))
        for k in full:
            out[k] = unit
    return out


_LAYER_OUTPUTS = ("weight", "weight_scale", "weight_zeros", "weight_proj_down", "weight_proj_up",
                  "weight_smooth_factor", "bias", "comfy_quant")


def _check_outputs(units: list) -> None:
    """Two units that would write the same output (a layer twice, or a float tensor over a layer's) are refused
    before anything is converted."""
    made: dict = {}
    for unit in units:
        if unit.kind == "float":
            outs = unit.out_names
        else:
            outs = tuple(f"{name}.{s}" for name in unit.out_names for s in _LAYER_OUTPUTS)
        for out in outs:
            if out in made:
                first = made[out]
                module, tensor = (unit.name, "qweight") if unit.kind != "float" else _split_key(unit.name)
                raise _err(module, tensor, f"the only input that becomes '{out}'", f"'{first}' becomes it too")
            made[out] = unit.name


def build_plan(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple]) -> Plan:
    keys = sorted(keys)
    key_set = set(keys)
    qconfig = _parse_json_meta(metadata, "quantization_config", strict=True)
    config = _parse_json_meta(metadata, "config", strict=True)
    _check_precision(keys, qconfig if isinstance(qconfig, dict) else None)
    arch = _detect_model(keys, metadata)
    inner = _inner_dim(arch, config if isinstance(config, dict) else None, shape_of, key_set)

    modules = {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
    entries: list = []           # (is_module, name), in the order of each one's first key
    by_module: dict[str, _Source] = {}
    for key in keys:
        mod, _, suffix = key.rpartition(".")
        if mod in modules:
            src = by_module.get(mod)
            if src is None:
                src = by_module[mod] = _Source(mod)
                entries.append((True, mod))
            canon = _LEGACY_ALIASES.get(suffix, suffix)
            if canon in src.keys:
                raise _err(mod, suffix, "one tensor per kind", f"both '{src.keys[canon]}' and '{key}'")
            src.keys[canon] = key
        elif suffix in _SIDE_SUFFIXES:
            raise _err(mod, "qweight", f"present (the module has '{suffix}')", "missing")
        else:
            entries.append((False, key))

    hint = ""
    by_keys = AR.from_nunchaku_keys(keys)
    if by_keys is not None and by_keys is not arch:
        hint = (f" (the file's model_class '{(metadata or {}).get('model_class')}' says {arch.title}, but its keys "
                f"look like {by_keys.title})")
    concat: dict = {}
    unit_of = {(True, mod): _quantized_unit(arch, src, concat, hint) for mod, src in by_module.items()}
    for unit in concat.values():
        for i, src in enumerate(unit.sources):
            if src is None:
                other = next(s.name for s in unit.sources if s is not None)
                raise _err(unit.part_names[i], "qweight",
                           f"present (part {i + 1} of {len(unit.sources)} of '{unit.out_names[0]}', with '{other}')",
                           "missing")
        unit.name = unit.sources[0].name
    unit_of.update(((False, k), u) for k, u in _float_units(arch, [n for is_mod, n in entries if not is_mod]).items())
    units, seen = [], set()
    for entry in entries:
        unit = unit_of[entry]
        if id(unit) not in seen:
            seen.add(id(unit))
            units.append(unit)
    _check_outputs(units)

    config_str = None
    if metadata and metadata.get("config") is not None:
        raw = metadata["config"]
        config_str = raw if isinstance(raw, str) else json.dumps(raw)
    model_class = (metadata or {}).get("model_class")
    comfy_config = _parse_json_meta(metadata, "comfy_config", strict=False)
    return Plan(model=arch.name, arch=arch, inner_dim=inner, units=units, config_str=config_str,
                 model_class=str(model_class) if model_class else None,
                 qconfig=qconfig if isinstance(qconfig, dict) else None,
                 comfy_config=comfy_config if isinstance(comfy_config, dict) else None)


def check_convertible(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple]) -> dict:
    """Run every check that needs no tensor values; returns unit counts by kind or raises the first problem."""
    plan = build_plan(keys, metadata, shape_of)
    counts: dict = {}
    for unit in plan.units:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    return counts


def value_problems(keys: Iterable[str], metadata: Mapping | None, shape_of: Callable[[str], tuple],
                   read: Callable[[str], torch.Tensor]) -> tuple[list[str], list[str]]:
    """The converter's value checks on every quantized module's float tensors, read with ``read(key)``
    (never ``qweight``): ``(problems, warnings)`` as text, one problem per module at most. Raises what
    ``check_convertible`` raises."""
    plan = build_plan(keys, metadata, shape_of)
    problems, warnings = [], []
    for unit in plan.units:
        if unit.kind == "float":
            continue
        checked = (*_VALUE_SLOTS[unit.kind][1], "bias")
        for src in unit.sources:
            tensors = {canon: read(key) for canon, key in src.keys.items() if canon in checked}
            if unit.kind == "awq":  # the padded group rows are dropped by the conversion: not checked
                groups = tuple(shape_of(src.keys["qweight"]))[-1] * 2 // AWQ_GROUP_SIZE
                tensors.update({n: tensors[n][:groups] for n in ("wscales", "wzeros") if tensors[n].dim() == 2})
            try:
                warnings.extend(f"Nunchaku module '{src.name}': {w}"
                                for w in _check_values(unit.kind, src.name, tensors))
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


def _check_values(kind: str, module: str, t: dict) -> list[str]:
    """The target format's value rules (``QuantFormat.check_values``' per-slot rules) on a module's stored
    tensors, plus a finite bias: ``NunchakuConversionError`` on a refused value; the warnings as text."""
    fmt_name, slots = _VALUE_SLOTS[kind]
    fmt = formats.get_format(fmt_name)
    warnings = []
    try:
        for name, key in slots.items():
            if name in t:
                warning = check_slot_values(fmt.slot(key), module, t[name], name)
                if warning is not None:
                    warnings.append(warning)
        if "bias" in t:
            check_finite(module, "bias", t["bias"])
    except QuantizedLayerError as e:
        raise _err(module, e.tensor, e.expected, e.got) from None
    for warning in warnings:
        logger.info("Nunchaku module '%s': %s", module, warning)
    return warnings


def _w4a4_natural(mod: str, t: dict, targets: tuple) -> dict:
    """One Nunchaku W4A4 module checked (shapes, dtypes, values) and unpacked to kitchen's natural layout:
    ``weight`` (packed), ``weight_scale``, ``weight_smooth_factor``, ``weight_proj_down``, ``weight_proj_up``,
    ``bias`` (or None), with ``n``, ``k``, ``rank``."""
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
                "as Nunchaku does, but an external LoRA on '%s' (ComfyUI '%s', or on the V rows of the qkv "
                "projection) is off by diag(smooth_factor_orig).", mod, mod, "', '".join(targets))
    _check_values("w4a4", mod, t)
    return {"weight": unpack_w4a4_qweight_packed(qweight), "weight_scale": unpack_w4a4_wscales(wscales),
            "weight_smooth_factor": unpack_chunk16(smooth), "weight_proj_down": unpack_proj_down(down),
            "weight_proj_up": unpack_proj_up(up), "bias": unpack_chunk16(bias) if bias is not None else None,
            "n": n, "k": k, "rank": int(rank)}


def _w4a4_json(rank: int, act_unsigned, in_splits=None) -> dict:
    conf = {"format": "svdquant_w4a4", "group_size": W4A4_GROUP_SIZE, "rank": int(rank),
            "act_unsigned": list(act_unsigned) if isinstance(act_unsigned, tuple) else bool(act_unsigned)}
    if in_splits is not None:
        conf["in_splits"] = [int(x) for x in in_splits]
    return conf


def _layer_out(name: str, tensors: dict, jcfg: dict) -> list:
    out = [(f"{name}.{s}", tensors[s]) for s in ("weight", "weight_scale", "weight_proj_down", "weight_proj_up",
                                                  "weight_smooth_factor")]
    if tensors.get("bias") is not None:
        out.append((f"{name}.bias", tensors["bias"]))
    out.append((f"{name}.comfy_quant", encode_config(jcfg)))
    return out


def _same_dtypes(unit: _Unit, nats: list) -> None:
    """The parts of one concatenated layer hold each tensor kind in one dtype (``torch.cat`` would promote)."""
    first = unit.sources[0].name
    for src, nat in zip(unit.sources[1:], nats[1:]):
        for name, canon in (("weight_scale", "wscales"), ("weight_smooth_factor", "smooth_factor"),
                            ("weight_proj_down", "proj_down"), ("weight_proj_up", "proj_up"), ("bias", "bias")):
            a, b = nats[0][name], nat[name]
            if a is not None and b is not None and a.dtype != b.dtype:
                raise _err(src.name, canon, f"dtype {a.dtype} (as '{first}': parts of one layer)", f"dtype {b.dtype}")


def _block_diagonal(mats: list) -> torch.Tensor:
    out = mats[0].new_zeros(sum(m.shape[0] for m in mats), sum(m.shape[1] for m in mats))
    r = c = 0
    for m in mats:
        out[r:r + m.shape[0], c:c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


def _concat_rows(unit: _Unit, nats: list) -> tuple[list, dict]:
    """Parts on the output axis (Flux ``linear1`` = [qkv_proj; mlp_fc1]): one layer of rank ΣR with
    ``proj_down`` side by side, ``proj_up`` block-diagonal, the one smooth factor the parts share."""
    first = unit.sources[0].name
    for src, nat in zip(unit.sources[1:], nats[1:]):
        if nat["k"] != nats[0]["k"]:
            raise _err(src.name, "qweight", f"K={nats[0]['k']} (as '{first}': the parts read one input)",
                       f"K={nat['k']}")
    _same_dtypes(unit, nats)
    for src, nat in zip(unit.sources[1:], nats[1:]):
        if not torch.equal(nat["weight_smooth_factor"], nats[0]["weight_smooth_factor"]):
            raise _err(src.name, "smooth_factor", f"the smooth_factor of '{first}' (the parts of "
                                                  f"'{unit.out_names[0]}' read one input and share it)",
                       "different values")
    biases = [nat["bias"] for nat in nats]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        src = unit.sources[[b is None for b in biases].index(True)]
        raise _err(src.name, "bias", "present (the other parts of the layer have one)", "missing")
    tensors = {"weight": torch.cat([nat["weight"] for nat in nats], 0),
               "weight_scale": torch.cat([nat["weight_scale"] for nat in nats], 1),
               "weight_proj_down": torch.cat([nat["weight_proj_down"] for nat in nats], 1),
               "weight_proj_up": _block_diagonal([nat["weight_proj_up"] for nat in nats]),
               "weight_smooth_factor": nats[0]["weight_smooth_factor"],
               "bias": None if biases[0] is None else torch.cat(biases, 0)}
    jcfg = _w4a4_json(sum(nat["rank"] for nat in nats), unit.act_unsigned)
    name = unit.out_names[0]
    return _layer_out(name, tensors, jcfg), {name: jcfg}


def _concat_k(unit: _Unit, nats: list) -> tuple[list, dict]:
    """Parts on the input axis (Flux ``linear2`` = [out_proj | mlp_fc2]): one layer of rank ΣR with
    ``proj_down`` block-diagonal, ``proj_up`` side by side, the biases summed (fp32, rounded once), and the
    JSON's ``act_unsigned`` list and ``in_splits`` saying what each input segment is."""
    first = unit.sources[0].name
    n = nats[0]["n"]
    for src, nat in zip(unit.sources[1:], nats[1:]):
        if nat["n"] != n:
            raise _err(src.name, "qweight", f"N={n} (as '{first}': the parts make one output)", f"N={nat['n']}")
    _same_dtypes(unit, nats)
    splits = tuple(nat["k"] for nat in nats)
    want = unit.layer.input_splits(n, sum(splits)) if unit.layer is not None else None
    if want is not None and tuple(want) != splits:
        raise _err(first, "qweight", f"K={want[0]} (the input segments of '{unit.out_names[0]}' are {list(want)})",
                   f"K={splits[0]} (segments {list(splits)})")
    present = [nat["bias"] for nat in nats if nat["bias"] is not None]
    if not present:
        bias = None
    elif len(present) == 1:
        bias = present[0]
    else:
        total = present[0].to(torch.float32)
        for b in present[1:]:
            total = total + b.to(torch.float32)
        bias = total.to(present[0].dtype)
    tensors = {"weight": torch.cat([nat["weight"] for nat in nats], 1),
               "weight_scale": torch.cat([nat["weight_scale"] for nat in nats], 0),
               "weight_proj_down": _block_diagonal([nat["weight_proj_down"] for nat in nats]),
               "weight_proj_up": torch.cat([nat["weight_proj_up"] for nat in nats], 1),
               "weight_smooth_factor": torch.cat([nat["weight_smooth_factor"] for nat in nats], 0),
               "bias": bias}
    act = unit.act_unsigned if isinstance(unit.act_unsigned, tuple) else (unit.act_unsigned,) * len(nats)
    jcfg = _w4a4_json(sum(nat["rank"] for nat in nats), act, splits)
    name = unit.out_names[0]
    return _layer_out(name, tensors, jcfg), {name: jcfg}


def _convert_w4a4(unit: _Unit, parts: list, plan: Plan) -> tuple[list, dict]:
    nats = [_w4a4_natural(src.name, t, unit.out_names) for src, t in zip(unit.sources, parts)]
    if unit.how == AR.CONCAT_ROWS:
        return _concat_rows(unit, nats)
    if unit.how == AR.CONCAT_K:
        return _concat_k(unit, nats)
    mod, nat = unit.name, nats[0]
    n = nat["n"]
    w_packed, scales, smooth_n = nat["weight"], nat["weight_scale"], nat["weight_smooth_factor"]
    down_n, up_n, bias_n = nat["weight_proj_down"], nat["weight_proj_up"], nat["bias"]
    parts = len(unit.out_names)
    if parts > 1:
        if unit.inner_rows and plan.inner_dim is not None and n != parts * plan.inner_dim:
            raise _err(mod, "qweight", f"N = {parts} x inner dim {plan.inner_dim} = {parts * plan.inner_dim} "
                                       "(fused q/k/v, dims from the 'config' metadata)", f"N={n}")
        if n % parts:
            what = "fused q/k/v" if unit.inner_rows else f"split into {', '.join(unit.out_names)}"
            raise _err(mod, "qweight", f"N divisible by {parts} ({what})", f"N={n}")
    step = n // parts
    jcfg = _w4a4_json(nat["rank"], unit.act_unsigned)
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


def _convert_awq(unit: _Unit, parts: list, plan: Plan) -> tuple[list, dict]:
    t = parts[0]
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
    _check_values("awq", mod, {"wscales": wscales, "wzeros": wzeros, "bias": bias})

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


def _float_tensor_of(unit: _Unit, i: int) -> tuple[str, str]:
    return _split_key(unit.sources[i].name)


def _convert_float(unit: _Unit, parts: list) -> list:
    """A float unit: renamed, or q/k/v concatenated, [w3; w1] split by rows, halves swapped (exact)."""
    ts = [p[""] for p in parts]
    if unit.how == AR.KEEP:
        return [(unit.out_names[0], ts[0])]
    if unit.how == AR.CONCAT_ROWS:
        for i, t in enumerate(ts[1:], 1):
            if t.dim() == 0 or t.dim() != ts[0].dim() or t.shape[1:] != ts[0].shape[1:] or t.dtype != ts[0].dtype:
                module, tensor = _float_tensor_of(unit, i)
                raise _err(module, tensor, f"{ts[0].dtype} (*, {', '.join(map(str, ts[0].shape[1:]))}) as "
                                           f"'{unit.sources[0].name}' (concatenated into '{unit.out_names[0]}')",
                           f"{t.dtype} {tuple(t.shape)}")
        return [(unit.out_names[0], torch.cat(ts, 0))]
    t, parts_n = ts[0], (len(unit.out_names) if unit.how == AR.SPLIT_ROWS else 2)
    if t.dim() == 0 or t.shape[0] % parts_n:
        module, tensor = _float_tensor_of(unit, 0)
        into = ", ".join(unit.out_names) if unit.how == AR.SPLIT_ROWS else "two halves to swap"
        raise _err(module, tensor, f"rows divisible by {parts_n} (split into {into})", f"shape {tuple(t.shape)}")
    chunks = [c.contiguous() for c in t.chunk(parts_n, 0)]
    if unit.how == AR.SPLIT_ROWS:
        return list(zip(unit.out_names, chunks))
    return [(unit.out_names[0], torch.cat(chunks[::-1], 0))]   # SWAP_HALVES


def convert_unit(unit: _Unit, parts: list, plan: Plan) -> tuple[list, dict]:
    """parts: one dict per source, canonical suffix -> tensor (for a float source: "" -> tensor)."""
    if unit.kind == "float":
        return _convert_float(unit, parts), {}
    if unit.kind == "w4a4":
        return _convert_w4a4(unit, parts, plan)
    return _convert_awq(unit, parts, plan)


def output_metadata(plan: Plan, layers: dict) -> dict:
    meta = {"_quantization_metadata": quantization_header(layers)}
    if plan.config_str is not None:
        meta["config"] = plan.config_str
    source = {"format": "nunchaku"}
    if plan.model_class:
        source["model_class"] = plan.model_class
    if plan.qconfig is not None:
        source["quantization_config"] = plan.qconfig
    if plan.comfy_config is not None:
        source["comfy_config"] = plan.comfy_config
    meta["converted_from"] = json.dumps(source)
    return meta


def progress_bar(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return None
    # enabled: shown on a terminal only (disable=None), so logs and pipes get no bar around an error line
    return tqdm(total=total, disable=None if enabled else True, desc=desc, unit="module")


def log_summary(plan: Plan, layers: dict) -> None:
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
    plan = build_plan(list(sd.keys()), metadata, lambda key: tuple(sd[key].shape))
    new_sd: dict = {}
    layers: dict = {}
    bar = progress_bar(len(plan.units), progress, "Converting Nunchaku checkpoint")
    try:
        for unit in plan.units:
            tensors = [{canon: sd.pop(key) for canon, key in src.keys.items()} for src in unit.sources]
            out, lay = convert_unit(unit, tensors, plan)
            del tensors
            for name, tensor in out:
                new_sd[name] = tensor
            layers.update(lay)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log_summary(plan, layers)
    return new_sd, output_metadata(plan, layers)
