"""Recognise an architecture and its dimensions from a state dict (mirrors upstream ``comfy/model_detection.py``).

Only unquantized tensors are measured: a packed int4 weight has half its logical width.
"""
import logging
import re

from comfy import supported_models
from comfy.quant.errors import IncompleteModelError, MetadataError, QuantFileError
from comfy.quant.metadata import parse_object

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def unet_prefix_from_state_dict(state_dict):
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "model."):
        if any(k.startswith(prefix) for k in state_dict):
            return prefix
    return ""


def default_axes_dims_rope(head_dim):
    """(t, h, w) RoPE widths; the real model's (16, 56, 56) at head dim 128, the same proportions otherwise."""
    t = head_dim // 8
    if t % 2 or (head_dim - t) % 4:
        raise MetadataError("config", f"axes_dims_rope (head dim {head_dim} has no default RoPE split)", "none")
    return (t, (head_dim - t) // 2, (head_dim - t) // 2)


def rope_axes(metadata, head_dim, heads):
    """RoPE axes from the file's ``config`` metadata, checked against the tensors, else the default split."""
    raw = (metadata or {}).get("config")
    file_config = parse_object(raw, "config") if raw else {}
    for name, value in (("attention_head_dim", head_dim), ("num_attention_heads", heads)):
        if name in file_config and file_config[name] != value:
            raise MetadataError("config", f"{name} = {value} (from the tensors)", repr(file_config[name])[:80])
    axes = file_config.get("axes_dims_rope")
    if axes is None:
        return default_axes_dims_rope(head_dim)
    if (not isinstance(axes, list) or len(axes) != 3
            or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 and a % 2 == 0 for a in axes)):
        raise MetadataError("config", "axes_dims_rope: three positive even integers", repr(axes)[:80])
    if sum(axes) != head_dim:
        raise MetadataError("config", f"axes_dims_rope summing to the head dim {head_dim}", f"{axes} (sum {sum(axes)})")
    return tuple(axes)


def detect_unet_config(state_dict, key_prefix, metadata=None):
    if f"{key_prefix}txt_norm.weight" not in state_dict:
        return None
    def shape(name, ndim):
        key = f"{key_prefix}{name}"
        if key not in state_dict:
            raise IncompleteModelError([key], [])
        got = tuple(state_dict[key].shape)
        if len(got) != ndim:
            raise QuantFileError(f"tensor '{key}': expected {ndim} dimension(s), got shape {got}", tensor=key,
                                 expected=f"{ndim}-D", got=got)
        return got

    inner_dim, in_channels = shape("img_in.weight", 2)
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight", 1)[0]
    if head_dim == 0 or inner_dim % head_dim:
        raise QuantFileError(f"Qwen-Image checkpoint: img_in.weight width {inner_dim} is not a multiple of the head "
                             f"dim {head_dim} (transformer_blocks.0.attn.norm_q.weight)", tensor="img_in.weight",
                             expected=f"a multiple of {head_dim}", got=inner_dim)
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k[len(key_prefix):]))}
    if blocks != set(range(len(blocks))):
        first_gap = min(set(range(len(blocks) + 1)) - blocks)
        raise QuantFileError(f"Qwen-Image checkpoint: transformer_blocks numbered {sorted(blocks)}: expected 0..N-1 "
                             f"without gaps (block {first_gap} is missing)", tensor=f"transformer_blocks.{first_gap}",
                             expected="blocks 0..N-1", got=sorted(blocks))
    config = {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight", 2)[0] // 4,
        "num_layers": len(blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner_dim // head_dim,
        "joint_attention_dim": shape("txt_norm.weight", 1)[0],
    }
    config["axes_dims_rope"] = rope_axes(metadata, head_dim, config["num_attention_heads"])
    if f"{key_prefix}__index_timestep_zero__" in state_dict:
        config["default_ref_method"] = "index_timestep_zero"
    if f"{key_prefix}time_text_embed.addition_t_embedding.weight" in state_dict:
        config["use_additional_t_cond"] = True
    return config


def model_config_from_unet(state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
    unet_config = detect_unet_config(state_dict, unet_key_prefix, metadata=metadata)
    if unet_config is None:
        return None
    logger.info("Detected Qwen-Image: %s", unet_config)
    return supported_models.QwenImage(unet_config)
