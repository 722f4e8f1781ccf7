"""All-or-nothing loading of int4 models: a file is checked before a model is built from it, and the
model is returned only if every tensor of it came from the file.

* ``check_state_dict(sd, metadata)`` before anything is built: the ``_quantization_metadata`` header
  parses (bounded, ``comfy.quant.metadata``) and describes each layer as an object with a ``format``;
  a layer whose tensors only an int4 format writes (``weight_proj_down``, ``weight_zeros``, ...) has
  quantization metadata (else a plain ``Linear`` would meet packed bytes and torch's "Error(s) in
  loading state_dict").
* ``check_complete(model, missing, unexpected)`` after ``load_state_dict(strict=False)``: a model that
  holds int4 weights raises ``IncompleteModelError`` for any missing tensor (a bias or norm weight would
  stay ``torch.empty``) and any tensor of a module the model does not have (a stray block). Float-only
  models keep the host's lenient warning. A missing tensor with no elements (a marker buffer such as
  Qwen-Image-Edit's ``__index_timestep_zero__``) carries no data and is not counted.
"""
from __future__ import annotations

from comfy.quant import formats
from comfy.quant.errors import IncompleteModelError, MetadataError, QuantizedLayerError
from comfy.quant.metadata import parse_object

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


def _int4_only_suffixes() -> set[str]:
    """Tensor names (after ``<layer>.``) that only this package's int4 formats write."""
    shared = {"weight", "weight_scale", "bias"}  # float and FP8 layers have these too
    return {name for fmt in formats.FORMATS.values() for slot in fmt.slots for name in slot.spellings} - shared


def check_state_dict(sd, metadata) -> None:
    """Raise before a model is built when the file's quantization metadata is unusable (see module doc)."""
    described = set(quantization_layers(metadata))
    described.update(k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant"))
    suffixes = _int4_only_suffixes()
    for key in sd:
        layer, _, name = key.rpartition(".")
        if name in suffixes and layer not in described:
            raise QuantizedLayerError(layer, name, "quantization metadata for this layer (a '<layer>.comfy_quant' "
                                      f"tensor or an entry in {HEADER_KEY})", "none: an int4 tensor without it")


def holds_int4(model) -> bool:
    return any(formats.format_of(getattr(m, "weight", None)) is not None for m in model.modules())


def check_complete(model, missing_keys, unexpected_keys) -> None:
    """Raise ``IncompleteModelError`` when ``model`` holds int4 weights and did not load whole."""
    if not (missing_keys or unexpected_keys) or not holds_int4(model):
        return
    tensors = dict(model.state_dict(keep_vars=True)) if missing_keys else {}
    missing = [k for k in missing_keys if k not in tensors or tensors[k] is None or tensors[k].numel()]
    if missing or unexpected_keys:
        raise IncompleteModelError(missing, unexpected_keys)
