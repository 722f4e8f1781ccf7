"""File helpers (mirrors upstream ``comfy/utils.py``, the parts on the int4 path)."""
from __future__ import annotations

import logging

import safetensors.torch
import torch

from comfy.quant import host as int4
from comfy.quant.errors import MetadataError
from comfy.quant.loading import HEADER_KEY as QUANT_METADATA_KEY, quantization_layers
from comfy.quant.formats import decode_config, encode_config
from comfy.quant.files import open_checked

logger = logging.getLogger(__name__)


def load_torch_file(ckpt, safe_load=True, device=None, return_metadata=False):
    """Load a ``.safetensors`` file (the only format on this path) → ``sd`` or ``(sd, metadata)``."""
    if device is None:
        device = torch.device("cpu")
    if not str(ckpt).lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"{ckpt}: only safetensors files are supported")
    with open_checked(ckpt, device) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return (sd, metadata) if return_metadata else sd


def save_torch_file(sd, ckpt, metadata=None):
    """Save as safetensors; tensors shared between keys (tied q/k/v side tensors) are written once each."""
    sd = int4.saveable({k: v.contiguous() for k, v in sd.items()})
    safetensors.torch.save_file(sd, str(ckpt), metadata=metadata)


def convert_old_quants(state_dict, model_prefix="", metadata=None):
    """Turn a file-level ``_quantization_metadata`` header into per-layer ``<layer>.comfy_quant`` tensors."""
    metadata = dict(metadata or {})
    layers = quantization_layers(metadata)
    metadata.pop(QUANT_METADATA_KEY, None)
    if not layers:
        return state_dict, metadata
    for layer, conf in layers.items():
        key = f"{model_prefix}{layer}.comfy_quant"
        if key in state_dict and decode_config(state_dict[key], layer) != conf:
            raise MetadataError("comfy_quant", f"the same JSON as its {QUANT_METADATA_KEY} entry {conf}",
                                decode_config(state_dict[key], layer), layer=layer)
        state_dict[key] = encode_config(conf)
    return state_dict, metadata


def detect_layer_quantization(state_dict, prefix=""):
    for k in state_dict:
        if k.startswith(prefix) and k.endswith(".comfy_quant"):
            logger.info("Found per-layer quantization metadata")
            return {"mixed_ops": True}
    return None


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for rp, new in replace_prefix.items():
        for k in [k for k in state_dict if k.startswith(rp)]:
            out[new + k[len(rp):]] = state_dict.pop(k)
    return out
