"""JSON read from files (a layer's ``comfy_quant``, the ``_quantization_metadata`` header, a model's
``config``), parsed with bounds: a stranger's file decides these bytes.

Bounds: a layer entry is at most ``LAYER_JSON_BYTES``, a file-level entry at most ``FILE_JSON_BYTES``,
and no value nests deeper than ``MAX_DEPTH`` (real entries nest 2 or 3 deep; without a bound a deeply
nested value ends in ``RecursionError``).
"""
from __future__ import annotations

import json

from comfy.quant.errors import MetadataError

LAYER_JSON_BYTES = 64 * 1024
FILE_JSON_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 32


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion of its own)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json(raw, entry: str, *, layer: str | None = None, max_bytes: int = FILE_JSON_BYTES):
    """The value of JSON text ``raw`` (str / bytes; an already parsed dict or list is checked as is),
    or ``MetadataError`` naming ``entry`` (and ``layer``) with what was wrong."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise MetadataError(entry, f"at most {max_bytes} bytes of JSON", f"{len(raw)} bytes", layer=layer)
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MetadataError(entry, "UTF-8 JSON", f"undecodable bytes ({e.reason})", layer=layer) from None
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise MetadataError(entry, f"at most {max_bytes} bytes of JSON", f"{len(raw)} characters", layer=layer)
        try:
            value = json.loads(raw)
        except RecursionError:
            raise MetadataError(entry, f"JSON nested at most {MAX_DEPTH} deep", "deeper nesting",
                                layer=layer) from None
        except ValueError as e:
            raise MetadataError(entry, "valid JSON", f"{raw[:80]!r} ({e})", layer=layer) from None
    elif isinstance(raw, (dict, list)):
        value = raw
    else:
        raise MetadataError(entry, "JSON text", type(raw).__name__, layer=layer)
    if _depth(value) > MAX_DEPTH:
        raise MetadataError(entry, f"JSON nested at most {MAX_DEPTH} deep", "deeper nesting", layer=layer)
    return value


def parse_object(raw, entry: str, **kw) -> dict:
    """``parse_json`` that must give a JSON object."""
    value = parse_json(raw, entry, **kw)
    if not isinstance(value, dict):
        raise MetadataError(entry, "a JSON object", f"a JSON {type(value).__name__} ({str(value)[:80]})",
                            layer=kw.get("layer"))
    return value
