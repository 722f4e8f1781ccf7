"""Quantized layouts known to this ComfyUI (mirrors upstream ``comfy/quant_ops.py``).

comfy-kitchen is imported once, guarded, in ``comfy.quant.kitchen``: if it fails, this module still
imports and the int4 formats are simply absent from ``QUANT_ALGOS``. A kitchen build missing one
layout drops only that format.
"""
import logging

import torch

from comfy.quant import kitchen
from comfy.quant.formats import FORMATS, available_formats

QuantizedTensor = kitchen.QuantizedTensor
ck = kitchen.ck

# Backend set-up, as upstream does it: kitchen's CUDA kernels need torch built for CUDA >= 13.
if ck is not None and torch.version.cuda is not None:
    try:
        if int(torch.version.cuda.split(".")[0]) < 13:
            ck.disable_backend("cuda")
            logging.getLogger(__name__).info("comfy-kitchen CUDA backend disabled: torch CUDA %s < 13",
                                             torch.version.cuda)
    except Exception as e:
        logging.getLogger(__name__).warning("could not configure comfy-kitchen backends: %s", e)

_LAYOUT_REGISTRY = {}


def register_layout_class(name, cls):
    _LAYOUT_REGISTRY[name] = cls


def get_layout_class(name):
    try:
        return _LAYOUT_REGISTRY[name]
    except KeyError:
        raise ValueError(f"quantized layout '{name}' is not available; registered: {sorted(_LAYOUT_REGISTRY)}") from None


QUANT_ALGOS = {}
for _name, _fmt in FORMATS.items():
    if _fmt.available:
        register_layout_class(_fmt.layout, kitchen.layout_class(_fmt.layout))
        QUANT_ALGOS[_name] = _fmt.algo_entry()

logging.getLogger(__name__).debug("quantized formats available: %s", available_formats())
