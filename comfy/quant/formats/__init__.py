"""Registry of int4 formats: name -> format object, kitchen layout -> format object."""
from __future__ import annotations

import logging

from comfy.quant import kitchen
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats.awq_w4a16 import AWQW4A16
from comfy.quant.formats.base import QuantFormat, decode_config, encode_config, quantization_header
from comfy.quant.formats.svdquant_w4a4 import SVDQuantW4A4

logger = logging.getLogger(__name__)

FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> None:
    FORMATS[fmt.name] = fmt
    if not fmt.available:
        logger.warning("int4 format '%s' disabled: %s", fmt.name, kitchen.missing_layout_reason(fmt.layout))


for _fmt in (SVDQuantW4A4(), AWQW4A16()):
    register_format(_fmt)


def available_formats() -> list[str]:
    return sorted(name for name, fmt in FORMATS.items() if fmt.available)


def get_format(name: str, layer: str = "?") -> QuantFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise QuantizedLayerError(layer, "comfy_quant.format", f"one of {sorted(FORMATS)}", repr(name))
    return fmt


def resolve(raw, layer: str) -> tuple[QuantFormat, dict]:
    """Format and validated config from a layer's ``comfy_quant`` entry."""
    conf = decode_config(raw, layer)
    fmt = get_format(conf["format"], layer)
    return fmt, fmt.parse_config(conf, layer)


def format_of(tensor) -> QuantFormat | None:
    """The format of a loaded weight, or None for a plain tensor."""
    if not isinstance(tensor, kitchen.QuantizedTensor):
        return None
    for fmt in FORMATS.values():
        if fmt.layout == tensor._layout_cls:
            return fmt
    return None


__all__ = ["FORMATS", "QuantFormat", "available_formats", "decode_config", "encode_config", "format_of",
           "get_format", "quantization_header", "register_format", "resolve"]
