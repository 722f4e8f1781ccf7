"""All-or-nothing loading of int4 models: a file is checked before a model is built from it, and the
model is returned only if every tensor of it came from the file.

* ``check_state_dict(sd, metadata)`` before anything is built: the ``_quantization_metadata`` header
  parses (bounded, ``comfy.quant.metadata``) and describes each layer as an object with a ``format``;
  a layer whose tensors only an int4 format writes (``weight_proj_down``, ``weight_zeros``, ...) has
  quantization metadata (else a plain ``Linear`` would meet packed bytes and torch's "Error(s) in
  loading state_dict").
* ``load_state_dict(model, sd, strict, assign)`` in place of ``model.load_state_dict`` for a file with
  int4 layers: before anything is copied, every float tensor must have the shape the model expects and a
  float dtype (torch would stop halfway with "Error(s) in loading state_dict", or copy an int tensor into
  a float one); after, ``check_complete``.
* ``check_complete(model, missing, unexpected)``: a model that holds int4 weights raises
  ``IncompleteModelError`` for any missing tensor (a bias or norm weight would stay ``torch.empty``) and
  any tensor of a module the model does not have (a stray block), and ``QuantFileError`` for a float
  tensor that is not finite (the int4 layers check their own tensors as they load). Float-only models
  keep the host's lenient warning. A missing tensor with no elements (a marker buffer such as
  Qwen-Image-Edit's ``__index_timestep_zero__``) carries no data and is not counted.
"""
from __future__ import annotations

import json

import torch

from comfy.quant import formats
from comfy.quant.errors import IncompleteModelError, MetadataError, QuantFileError, QuantizedLayerError
from comfy.quant.formats.base import nonfinite_summary
from comfy.quant.metadata import FILE_JSON_BYTES, LAYER_JSON_BYTES, parse_object

HEADER_KEY = "_quantization_metadata"


def quantization_layers(metadata) -> dict[str, dict]:
    """``{layer: JSON object}`` of the file-level header (empty when there is none), checked."""
    raw = (metadata or {}).get(HEADER_KEY)
    if raw is None:
        return {}
    layers = parse_object(raw, HEADER_KEY).get("layers")
    if not isinstance(layers, dict):
        raise MetadataError(HEADER_KEY, "an object with a 'layers' object", f"layers = {str(layers)[:80]}")
    for layer, conf in layers.items():
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            raise MetadataError(HEADER_KEY, 'each layer a JSON object with a "format" string',
                                f"{layer!r}: {str(conf)[:80]}")
    return layers


def int4_only_suffixes() -> set[str]:
    """Tensor names (after ``<layer>.``) that only this package's int4 formats write."""
    shared = {"weight", "weight_scale", "bias"}  # float and FP8 layers have these too
    return {name for fmt in formats.FORMATS.values() for slot in fmt.slots for name in slot.spellings} - shared


def names_int4(raw) -> bool:
    """Whether a ``comfy_quant`` tensor is a JSON object naming an int4 format of this package. Lenient: a
    malformed or oversized entry is not ours to judge here (the host's loader raises its own error for it)."""
    if raw.numel() > LAYER_JSON_BYTES:
        return False
    try:
        conf = json.loads(raw.detach().to("cpu", torch.uint8).flatten().numpy().tobytes())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
        return False
    return isinstance(conf, dict) and conf.get("format") in formats.FORMATS


def header_names_int4(metadata) -> bool:
    """Whether the file-level header parses (leniently, as ``names_int4``) and names an int4 format."""
    raw = (metadata or {}).get(HEADER_KEY)
    if not isinstance(raw, str) or len(raw) > FILE_JSON_BYTES:
        return False
    try:
        layers = json.loads(raw).get("layers")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(layers, dict) and any(isinstance(c, dict) and c.get("format") in formats.FORMATS
                                            for c in layers.values())


def involves_int4(sd, metadata) -> bool:
    """Whether a file is (meant to be) an int4 file: its header names an int4 format, or it holds a tensor
    only int4 formats write. Only such files get this module's checks; others load as the host loads them."""
    if header_names_int4(metadata):
        return True
    suffixes = int4_only_suffixes()
    return any(key.rpartition(".")[2] in suffixes for key in sd)


def header_prefix(keys, layers) -> str:
    """The prefix the tensors of ``keys`` carry before the ``_quantization_metadata`` layer names ``layers``:
    ``""`` when they match, else e.g. ``model.diffusion_model.`` (what ComfyUI's checkpoint savers write; the
    loader strips it before ``convert_old_quants``). Learnt from the first layer whose weight is not found as
    named."""
    keys = set(keys)
    for layer in layers:
        if f"{layer}.weight" in keys:
            continue
        tail = f".{layer}.weight"
        return next((k[: -len(tail) + 1] for k in sorted(keys) if k.endswith(tail)), "")
    return ""


def check_state_dict(sd, metadata) -> None:
    """Raise before a model is built when the file's quantization metadata is unusable (see module doc)."""
    layers = quantization_layers(metadata)
    prefix = header_prefix(sd.keys(), layers)
    described = {prefix + layer for layer in layers}
    described.update(k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant"))
    suffixes = int4_only_suffixes()
    for key in sd:
        layer, _, name = key.rpartition(".")
        if name in suffixes and layer not in described:
            raise QuantizedLayerError(layer, name, "quantization metadata for this layer (a '<layer>.comfy_quant' "
                                      f"tensor or an entry in {HEADER_KEY})", "none: an int4 tensor without it")
    int4 = {prefix + layer for layer, conf in layers.items() if conf.get("format") in formats.FORMATS}
    int4.update(k[: -len(".comfy_quant")] for k, v in sd.items() if k.endswith(".comfy_quant") and names_int4(v))
    _check_layer_tensors(sd, described, int4)


def _check_layer_tensors(sd, described, int4) -> None:
    """In a file with int4 layers: an int4 layer holds only tensors an int4 format has (no stray
    ``weight_foo``), and a layer without quantization metadata is float, so its weight must be float
    (an int8 weight would be cast to float silently)."""
    allowed = int4_only_suffixes() | {"weight", "weight_scale", "bias", "comfy_quant"}
    for key, t in sd.items():
        layer, _, name = key.rpartition(".")
        if layer in int4 and name not in allowed:
            raise QuantizedLayerError(layer, name, f"only tensors of an int4 layer ({', '.join(sorted(allowed))})",
                                      f"'{name}', which no int4 format has")
        if name == "weight" and layer not in described and not t.is_floating_point():
            raise QuantFileError(f"tensor '{key}': expected a float dtype (a layer without quantization metadata "
                                 f"is a float layer), got {t.dtype}", tensor=key, expected="a float dtype", got=t.dtype)


def holds_int4(model) -> bool:
    return any(formats.format_of(getattr(m, "weight", None)) is not None for m in model.modules())


def _own_tensors(model) -> dict:
    """``{state-dict key: tensor}`` of the parameters and persistent buffers the model holds now (read
    from the modules, not ``state_dict()``, which a host's linear without a weight yet cannot write)."""
    out = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        named = list(module._parameters.items()) + [(n, b) for n, b in module._buffers.items()
                                                    if n not in module._non_persistent_buffers_set]
        out.update((prefix + n, t) for n, t in named if t is not None)
    return out


def _float_tensors(model) -> dict:
    """``{key: tensor}`` of the model's own float parameters and buffers (int4 weights excluded)."""
    return {k: t for k, t in _own_tensors(model).items() if formats.format_of(t) is None and t.is_floating_point()}


def check_shapes(model, sd) -> None:
    """Every tensor of ``sd`` that loads into a float tensor of ``model`` has its shape and a float dtype."""
    for key, target in _float_tensors(model).items():
        t = sd.get(key)
        if t is None:
            continue
        if tuple(t.shape) != tuple(target.shape):
            raise QuantFileError(f"tensor '{key}': expected shape {tuple(target.shape)}, got {tuple(t.shape)}",
                                 tensor=key, expected=tuple(target.shape), got=tuple(t.shape))
        if not t.is_floating_point():
            raise QuantFileError(f"tensor '{key}': expected a float dtype, got {t.dtype}", tensor=key,
                                 expected="a float dtype", got=t.dtype)


def check_finite(model) -> None:
    for key, t in _float_tensors(model).items():
        got = nonfinite_summary(t)
        if got is not None:
            raise QuantFileError(f"tensor '{key}': expected finite values, got {got}", tensor=key,
                                 expected="finite values", got=got)


def check_complete(model, missing_keys, unexpected_keys) -> None:
    """Raise when ``model`` holds int4 weights and did not load whole, or holds a non-finite float tensor."""
    if not holds_int4(model):
        return
    if missing_keys or unexpected_keys:
        tensors = _own_tensors(model)
        missing = [k for k in missing_keys if k not in tensors or tensors[k] is None or tensors[k].numel()]
        if missing or unexpected_keys:
            raise IncompleteModelError(missing, unexpected_keys)
    check_finite(model)


def load_state_dict(model, sd, strict=False, assign=False):
    """``model.load_state_dict(sd, strict=strict, assign=assign)``, all-or-nothing when ``sd`` has int4 layers."""
    quantized = any(k.endswith(".comfy_quant") and names_int4(v) for k, v in sd.items())
    if quantized:
        check_shapes(model, sd)
    result = model.load_state_dict(sd, strict=strict, assign=assign)
    if quantized:
        check_complete(model, result.missing_keys, result.unexpected_keys)
    return result
